"""A whole banger (CLI, daemon, root helper, bridge, taps, VMs) inside a network namespace of its own.

Everything the tests start lives in that namespace: the bridge, the taps, QEMU, the DNS server on the
namespace's 127.0.0.1, and every ssh connection, so nothing touches the host's network.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("BANGER_TEST_CACHE", "/var/tmp/banger-test-cache"))

CONFIG = """\
bridge_name = "{bridge}"
bridge_ip = "172.30.{net}.1"
cidr = 24
tap_pool_size = 1
ssh_wait_timeout = "240s"
log_level = "debug"

[vm_defaults]
vcpu = 1
memory_mib = 512
disk_size = "1G"
system_overlay_size = "1G"
"""


class BangerNetns:
    def __init__(self) -> None:
        suffix = secrets.token_hex(2)
        self.ns = f"banger-e2e-{suffix}"
        self.bridge = f"br-fc-e{suffix}"
        self.root = Path(tempfile.mkdtemp(prefix="bge-"))
        # The caches survive the run (CI keeps /var/tmp/banger-test-cache between runs on one machine).
        cache = CACHE / "xdg-cache"
        cache.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, HOME=str(self.root / "home"), XDG_CONFIG_HOME=str(self.root / "cfg"),
                        XDG_STATE_HOME=str(self.root / "state"), XDG_CACHE_HOME=str(cache),
                        XDG_RUNTIME_DIR=str(self.root / "run"), NO_COLOR="1")
        self.env.pop("BANGER_SYSTEM_PREFIX", None)
        (self.root / "home").mkdir()
        (self.root / "run").mkdir(mode=0o700)
        (self.root / "cfg/banger").mkdir(parents=True)
        (self.root / "cfg/banger/config.toml").write_text(
            CONFIG.format(bridge=self.bridge, net=int(suffix, 16) % 250 + 1))
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        subprocess.run(["ip", "-n", self.ns, "link", "set", "lo", "up"], check=True)

    @property
    def state_dir(self) -> Path:
        return self.root / "state/banger"

    def exec_argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]

    def banger(self, *args: str, timeout: float = 600, check: bool = False, input: str | None = None,
               host_network: bool = False) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "banger", *args]
        proc = subprocess.run(argv if host_network else self.exec_argv(argv), env=self.env,
                              capture_output=True, text=True, timeout=timeout, cwd=REPO, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"banger {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def pull_image(self, name: str) -> None:
        """Images and kernels come from Debian's archive, which the namespace cannot reach: pull them with
        services in the host's namespace, then stop those so the VM tests start their own inside."""
        self.banger("image", "pull", name, check=True, timeout=1800, host_network=True)
        self.banger("system", "stop", check=True, host_network=True)

    def vms(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = json.loads(self.banger("vm", "list", "--json", check=True).stdout)
        return result

    def links(self) -> list[str]:
        out = subprocess.run(["ip", "-n", self.ns, "-j", "link"], capture_output=True, text=True, check=True).stdout
        return [link["ifname"] for link in json.loads(out)]

    def qemu_pids(self) -> list[int]:
        return qemu_pids_under(self.root)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            for vm in self.vms():
                self.banger("vm", "delete", vm["name"], timeout=120)
        self.banger("system", "stop", timeout=60)
        for pid in self.qemu_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        subprocess.run(["ip", "netns", "del", self.ns], check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def qemu_pids_under(root: Path) -> list[int]:
    """QEMU processes whose command line names a path under `root` (their disks, sockets, logs)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes()
            is_qemu = cmdline.startswith(b"qemu-system-x86_64") or b"/qemu-system-x86_64\0" in cmdline[:200]
            if is_qemu and str(root).encode() in cmdline:
                pids.append(int(proc.name))
    return pids


def debian_kernel_files(name: str, out: Path) -> str:
    """vmlinux and initrd.img of Debian catalog kernel `name`, built into `out` by this checkout's code from
    the package cached in CACHE/debs (fetched first, from the Debian archive, when missing; the e2e kernel
    fixture keeps it there); returns the kernel version. Not the e2e cache's own initrd.img: that one is
    built once per cache and may predate the modules banger's images need now (overlay)."""
    import fcntl

    from banger.kernels.catalog import load_catalog, pull_debian_kernel
    from banger.kernels.debian import extract_deb
    from banger.kernels.initrd import build_mini_initrd
    from banger.kernels.vmlinux import extract_vmlinux

    kernel_dir, debs = CACHE / "kernels" / name, CACHE / "debs"
    mirror = os.environ.get("BANGER_TEST_DEBIAN_MIRROR") or "http://deb.debian.org/debian"
    (CACHE / "locks").mkdir(parents=True, exist_ok=True)
    with (CACHE / "locks" / f"kernel-{name}").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the lock tests/e2e/conftest.py takes for the same directory
        manifest_path = kernel_dir / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        if not (debs / f"{manifest.get('sha256')}.deb").is_file():
            pull_debian_kernel(load_catalog().get(name), mirror, kernel_dir, 300 << 20, cache_dir=debs)
            manifest = json.loads(manifest_path.read_text())
        kver = str(manifest["kernel_version"])
        with tempfile.TemporaryDirectory(dir=out.parent) as work:
            root = Path(work) / "root"
            extract_deb(debs / f"{manifest['sha256']}.deb", root)
            out.mkdir(parents=True, exist_ok=True)
            extract_vmlinux(root / "boot" / f"vmlinuz-{kver}", out / "vmlinux")
            build_mini_initrd(root, kver, out / "initrd.img")
    return kver


def golden_tarball(name: str = "debian-bookworm") -> tuple[Path, Path]:
    """The cached mmdebstrap tarball of golden image `name` and its record, where `pull_image` leaves them
    (CACHE/xdg-cache/banger/downloads); built there first, from the Debian archive, when missing. A test
    copies them into another banger's downloads directory to build that image without the network."""
    import fcntl

    from banger.images import catalog, golden
    from banger.images.progress import Silent

    entry = catalog.load_catalog().get(name)
    assert isinstance(entry, catalog.GoldenImage), f"{name} is not a golden image"
    variant = golden.GoldenVariant(name=entry.name, suite=entry.suite, variant=entry.variant,
                                   kernel_ref=entry.kernel_ref, arch=entry.arch)
    cache_dir = CACHE / "xdg-cache/banger/downloads"
    mirror = os.environ.get("BANGER_TEST_DEBIAN_MIRROR") or "http://deb.debian.org/debian"
    (CACHE / "locks").mkdir(parents=True, exist_ok=True)
    with (CACHE / "locks" / f"golden-{name}").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent sessions share the cache: one build, not two
        with tempfile.TemporaryDirectory(dir=CACHE) as work:
            golden._obtain_tar(variant, mirror, Path(work), cache_dir, Silent(), None)
    return golden._cache_paths(cache_dir, variant)
