"""Session fixtures for VM-booting tests: a guest kernel + mini initrd, and a tiny busybox root disk.

The kernel comes from banger's own kernel catalog (`pull_debian_kernel`: signature-verified Debian
cloud kernel, PVH vmlinux, busybox mini initramfs) and is cached under $BANGER_TEST_CACHE (default
/var/tmp/banger-test-cache), keyed by catalog name, so reruns and CI with a restored cache never
download again. Delete `<cache>/kernels/<name>` to refresh it.

Knobs: BANGER_TEST_KERNEL (catalog name, default debian-12-cloud), BANGER_TEST_DEBIAN_MIRROR.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.banger_env import BangerNetns

DEFAULT_CACHE = "/var/tmp/banger-test-cache"
DEFAULT_KERNEL = "debian-12-cloud"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
KERNEL_MAX_BYTES = 300 << 20
# Loaded by the e2e init only when asked to: with them the ACPI power button reaches the guest.
POWER_MODULES = ("evdev", "button")
BUSYBOX_APPLETS = (
    "sh", "mount", "umount", "cat", "echo", "sleep", "insmod", "dd", "sync", "poweroff", "cut", "ls",
    "basename", "dirname", "kill", "uname",
)  # fmt: skip


@dataclass(frozen=True)
class BootKernel:
    name: str
    kernel_version: str
    vmlinux: Path
    initrd: Path
    modules_dir: Path  # extra modules (POWER_MODULES) for the test rootfs


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock, so concurrent test sessions sharing the cache do not build the same thing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _require_tools(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]
    if missing:
        pytest.skip(f"VM tests need {', '.join(missing)} (see docs: apt packages for CI)")


@pytest.fixture(scope="session")
def e2e_cache_dir() -> Path:
    path = Path(os.environ.get("BANGER_TEST_CACHE") or DEFAULT_CACHE)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _extract_modules(deb: Path, kernel_version: str, names: tuple[str, ...], dest: Path) -> None:
    with tempfile.TemporaryDirectory(dir=dest.parent) as work:
        subprocess.run(["dpkg-deb", "-x", str(deb), work], check=True)
        moddir = Path(work) / "lib/modules" / kernel_version
        if not moddir.is_dir():
            moddir = Path(work) / "usr/lib/modules" / kernel_version
        staging = Path(work) / "out"
        staging.mkdir()
        for name in names:
            found = sorted(moddir.rglob(f"{name}.ko*"))
            if not found:
                raise RuntimeError(f"module {name} not found in {deb}")
            data = found[0].read_bytes()
            if found[0].name.endswith(".xz"):
                import lzma

                data = lzma.decompress(data)
            elif found[0].name.endswith(".zst"):
                import zstandard

                data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
            (staging / f"{name}.ko").write_bytes(data)
        os.replace(staging, dest)


@pytest.fixture(scope="session")
def boot_kernel(e2e_cache_dir: Path) -> BootKernel:
    _require_tools("qemu-system-x86_64", "mkfs.ext4", "dpkg-deb", "depmod", "gpgv")
    from banger.kernels.catalog import load_catalog, pull_debian_kernel

    name = os.environ.get("BANGER_TEST_KERNEL") or DEFAULT_KERNEL
    mirror = os.environ.get("BANGER_TEST_DEBIAN_MIRROR") or DEFAULT_MIRROR
    # Keyed by the initramfs builder's source too: an initrd cached by an older checkout may lack what
    # today's boot needs (a module, a loader change).
    import banger.kernels.initrd as initrd_mod

    builder = hashlib.sha256(Path(initrd_mod.__file__).read_bytes()).hexdigest()[:12]
    kernel_dir = e2e_cache_dir / "kernels" / f"{name}-{builder}"
    debs = e2e_cache_dir / "debs"
    with _locked(e2e_cache_dir / "locks" / f"kernel-{name}"):
        manifest_path = kernel_dir / "manifest.json"
        if not manifest_path.is_file():
            pull_debian_kernel(load_catalog().get(name), mirror, kernel_dir, KERNEL_MAX_BYTES, cache_dir=debs)
        manifest = json.loads(manifest_path.read_text())
        kver = manifest["kernel_version"]
        modules_dir = e2e_cache_dir / "modules" / name / kver
        if not modules_dir.is_dir():
            deb = debs / f"{manifest['sha256']}.deb"
            if not deb.is_file():  # the kernel dir was restored without the .deb: fetch it again
                pull_debian_kernel(load_catalog().get(name), mirror, kernel_dir, KERNEL_MAX_BYTES, cache_dir=debs)
                manifest = json.loads(manifest_path.read_text())
                kver = manifest["kernel_version"]
                modules_dir = e2e_cache_dir / "modules" / name / kver
                deb = debs / f"{manifest['sha256']}.deb"
            modules_dir.parent.mkdir(parents=True, exist_ok=True)
            _extract_modules(deb, kver, POWER_MODULES, modules_dir)
    return BootKernel(name, kver, kernel_dir / "vmlinux", kernel_dir / "initrd.img", modules_dir)


# PID 1 of the test rootfs. It prints the ready marker (with the guest's uptime), answers the agent
# channel, writes a marker to the scratch disk, and, with `e2e.power=1`, powers off on the ACPI power
# button; without it the guest ignores the button, which exercises stop()'s kill fallback.
INIT_SCRIPT = r"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
power=0
for x in $(cat /proc/cmdline); do
    case $x in e2e.power=1) power=1 ;; esac
done
if [ -b /dev/vdb ]; then
    echo BANGER-E2E-DISK > /dev/vdb && sync
fi
agent() {
    port=
    i=0
    while [ -z "$port" ] && [ $i -lt 100 ]; do
        for n in /sys/class/virtio-ports/*/name; do
            [ "$(cat $n 2>/dev/null)" = org.banger.agent ] && port=/dev/$(basename $(dirname $n))
        done
        [ -n "$port" ] || sleep 0.1
        i=$((i + 1))
    done
    [ -n "$port" ] || { echo "e2e-init: no agent port"; return; }
    exec 3<>$port
    while :; do
        if read -r line <&3; then echo "pong ${line#ping }" >&3; else sleep 0.5; fi
    done
}
agent &
if [ $power = 1 ]; then
    for m in evdev button; do insmod /lib/modules/$m.ko || echo "e2e-init: insmod $m failed"; done
    mount -t tmpfs tmpfs /run
    trap 'echo BANGER-E2E-POWEROFF; sync; poweroff -f' USR1
    # One reader per input device; each opens its device, says so in /run, and signals us on any event.
    n=0
    for e in /dev/input/event*; do
        [ -e "$e" ] || continue
        n=$((n + 1))
        (exec 4<"$e"; : > /run/watch.$n; dd bs=24 count=1 <&4 >/dev/null 2>&1 && kill -USR1 $$) &
    done
    [ $n -gt 0 ] || echo "e2e-init: no input devices; the power button will be ignored"
    # The marker means "ready for the power button", so wait until every reader has its device open.
    while :; do
        set -- /run/watch.*
        [ -e "$1" ] && [ $# -ge $n ] && break
        [ $n -eq 0 ] && break
        sleep 0.05
    done
fi
echo "BANGER-E2E-READY uptime=$(cut -d' ' -f1 /proc/uptime)"
while :; do sleep 1; done
"""


@pytest.fixture(scope="session")
def e2e_rootfs(boot_kernel: BootKernel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32 MiB ext4 image (made with `mkfs.ext4 -d`, no mount) holding busybox and INIT_SCRIPT."""
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        pytest.skip("VM tests need busybox-static")
    work = tmp_path_factory.mktemp("rootfs")
    tree = work / "tree"
    for directory in ("bin", "sbin", "dev", "proc", "sys", "tmp", "run", "lib/modules"):
        (tree / directory).mkdir(parents=True)
    shutil.copy2(busybox, tree / "bin/busybox")
    for applet in BUSYBOX_APPLETS:
        (tree / "bin" / applet).symlink_to("busybox")
    for module in POWER_MODULES:
        shutil.copy2(boot_kernel.modules_dir / f"{module}.ko", tree / "lib/modules" / f"{module}.ko")
    init = tree / "sbin/init"
    init.write_text(INIT_SCRIPT)
    init.chmod(0o755)
    image = work / "rootfs.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "e2e", "-d", str(tree), str(image), "32M"],
                   check=True, capture_output=True)
    return image


@pytest.fixture(scope="module")
def env() -> Iterator[BangerNetns]:
    """A whole banger in a network namespace of its own with the default image pulled, one per module."""
    e = BangerNetns()
    try:
        started = time.monotonic()
        e.pull_image("debian-bookworm")
        print(f"\nimage pull: {time.monotonic() - started:.1f}s")
        yield e
    finally:
        e.close()
