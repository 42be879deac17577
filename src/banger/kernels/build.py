"""Source-built kernels (catalog kind `source-build`, e.g. `generic-6.1`).

The source comes from Debian's archive through the same chain of trust as the cloud kernel: the
suite's InRelease checked with gpgv, the Packages index accepted only with the signed sha256, the
`linux-source-<v>` .deb only with the index's sha256 (banger.kernels.debian). Its source tarball is
unpacked and built with a configuration shipped in this package (`configs/`, Firecracker's microVM
guest config): `make olddefconfig`, then `make -j<cpus> vmlinux bzImage`. Everything the guest needs
is built in: no modules, no initramfs.

The build takes minutes (about 7 on 2 cores); the output goes to a log file whose last line is shown
as progress. The manifest records the inputs (package and version, the config's sha256).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from banger.errors import BangerError, NotFound
from banger.kernels import debian
from banger.kernels.debian import DEFAULT_KEYRING
from banger.kernels.debian_index import DebPackage, check_release, select_package
from banger.system.run import find_binary, run, spawn

if TYPE_CHECKING:
    from banger.kernels.catalog import SourceBuildKernel
    from banger.kernels.tarball import InstalledKernel

log = logging.getLogger("banger.kernels.build")

# Catalog `config` value -> file under configs/.
CONFIGS = {"firecracker microvm-kernel-ci-x86_64-6.1": "microvm-kernel-ci-x86_64-6.1.config"}
# linux-source-6.1 is in bookworm; the catalog entry names only the package.
SOURCE_SUITES = {"linux-source-6.1": "bookworm"}
BUILD_PACKAGES = ("build-essential", "flex", "bison", "bc", "libelf-dev", "libssl-dev")
BUILD_TIMEOUT = 3 * 3600.0
_TOOLS = {"make": "build-essential", "gcc": "build-essential", "flex": "flex", "bison": "bison", "bc": "bc"}
_HEADERS = {"/usr/include/gelf.h": "libelf-dev", "/usr/include/openssl/ssl.h": "libssl-dev"}


class Canceled(BangerError):
    def __init__(self) -> None:
        super().__init__("kernel build canceled", code="canceled")


def missing_build_packages() -> list[str]:
    """The Debian packages of BUILD_PACKAGES whose tools or headers are absent on this host."""
    missing = [pkg for tool, pkg in _TOOLS.items() if find_binary(tool) is None]
    missing += [pkg for header, pkg in _HEADERS.items() if not Path(header).is_file()]
    return sorted(set(missing))


def config_text(name: str) -> bytes:
    if name not in CONFIGS:
        raise NotFound(f"kernel config {name!r} is not shipped with banger (known: {', '.join(CONFIGS)})")
    return resources.files("banger.kernels").joinpath("configs", CONFIGS[name]).read_bytes()


def resolve_source_package(mirror: str, suite: str, package: str, *, keyring: Path, work_dir: Path,
                           arch: str = "amd64") -> DebPackage:
    """`package` (Architecture: all) from `suite`'s verified Packages index: binary-all, else binary-<arch>."""
    release = debian.fetch_release(mirror, suite, keyring, work_dir=work_dir)
    check_release(release, suite, datetime.now(UTC))
    for index_arch in ("all", arch):
        try:
            text = debian.fetch_packages_text(mirror, suite, release, index_arch, work_dir=work_dir)
            return select_package(text, package, arch)
        except NotFound:
            continue  # no such index in the Release, or no such package in it (downloads raise no NotFound)
    raise NotFound(f"package {package!r} not found in {suite}'s main index")


def _tail(path: Path, lines: int = 20) -> list[str]:
    with contextlib.suppress(OSError), path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - 16384))
        return handle.read().decode("utf-8", "replace").splitlines()[-lines:]
    return []


def _make(argv: list[str], cwd: Path, log_path: Path, detail: Callable[[str], None],
          cancel: threading.Event | None) -> None:
    """Run `argv` in `cwd`, appending its output to `log_path`; the last log line is the progress detail."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, f"$ {' '.join(argv)}\n".encode())
        proc = spawn(argv, stdout=fd, stderr=fd, cwd=cwd, new_session=True, inherit_env=True)
    finally:
        os.close(fd)
    deadline = time.monotonic() + BUILD_TIMEOUT
    try:
        while proc.poll() is None:
            if cancel is not None and cancel.is_set():
                raise Canceled()
            if time.monotonic() > deadline:
                raise BangerError(f"{argv[0]} did not finish within {BUILD_TIMEOUT:.0f}s (log: {log_path})")
            last = next((ln.strip() for ln in reversed(_tail(log_path, 3)) if ln.strip()), "")
            if last:
                detail(last[:100])
            if cancel is not None:
                cancel.wait(1.0)
            else:
                time.sleep(1.0)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0:
        tail = " | ".join(_tail(log_path, 6))
        raise BangerError(f"`{' '.join(argv)}` failed with exit status {proc.returncode}: {tail[-600:]}",
                          hint=f"the full log is {log_path}")


def build_source_kernel(
    entry: SourceBuildKernel,
    mirror: str,
    dest_dir: Path,
    max_bytes: int,
    *,
    log_path: Path,
    keyring: Path = DEFAULT_KEYRING,
    cache_dir: Path | None = None,
    jobs: int | None = None,
    stage: Callable[[str], None] = lambda _s: None,
    detail: Callable[[str], None] = lambda _d: None,
    cancel: threading.Event | None = None,
) -> InstalledKernel:
    """Build `entry` from its Debian source package and install vmlinux, vmlinuz, manifest.json as `dest_dir`."""
    from banger.kernels.catalog import _install, _obtain_deb
    from banger.kernels.tarball import InstalledKernel

    missing = missing_build_packages()
    if missing:
        raise BangerError(f"building {entry.name} needs {', '.join(missing)}",
                          hint=f"install them: apt-get install {' '.join(BUILD_PACKAGES)}")
    config = config_text(entry.config)
    suite = SOURCE_SUITES.get(entry.package)
    if suite is None:
        raise NotFound(f"no suite known for source package {entry.package!r} (known: {', '.join(SOURCE_SUITES)})")
    parent = dest_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.work-", dir=parent))
    staging = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.staging-", dir=parent))
    log_path.unlink(missing_ok=True)
    started = time.monotonic()
    try:
        stage("resolving the source package")
        pkg = resolve_source_package(mirror, suite, entry.package, keyring=keyring, work_dir=work, arch=entry.arch)
        stage(f"downloading {pkg.name} {pkg.version}")
        deb = _obtain_deb(mirror, pkg, work, max_bytes, cache_dir,
                          lambda done, total: detail(f"{done / 1e6:.0f}/{(total or 0) / 1e6:.0f} MB"))
        stage("unpacking the source")
        root = work / "deb"
        debian.extract_deb(deb, root)
        tarballs = sorted((root / "usr" / "src").glob("linux-source-*.tar.*"))
        if len(tarballs) != 1:
            raise BangerError(f"{pkg.name} {pkg.version} has no single usr/src/linux-source-*.tar.* "
                              f"(found: {[t.name for t in tarballs] or 'none'})")
        run(["tar", "-xf", tarballs[0], "-C", work], timeout=1800)
        shutil.rmtree(root, ignore_errors=True)
        src = work / tarballs[0].name.split(".tar.")[0]
        if not (src / "Makefile").is_file():
            raise BangerError(f"{tarballs[0].name} did not unpack into {src.name}/")
        (src / ".config").write_bytes(config)
        if cancel is not None and cancel.is_set():
            raise Canceled()
        stage("configuring (make olddefconfig)")
        _make(["make", "olddefconfig"], src, log_path, detail, cancel)
        cpus = jobs or len(os.sched_getaffinity(0))
        stage(f"building (make -j{cpus} vmlinux bzImage; log {log_path})")
        _make(["make", f"-j{cpus}", "vmlinux", "bzImage"], src, log_path, detail, cancel)
        release = run(["make", "-s", "kernelrelease"], cwd=src).stdout.decode().strip()
        stage("installing")
        shutil.copyfile(src / "vmlinux", staging / "vmlinux")
        shutil.copyfile(src / "arch/x86/boot/bzImage", staging / "vmlinuz")
        with (staging / "vmlinux").open("rb") as handle:
            if handle.read(4) != b"\x7fELF":
                raise BangerError("the build produced a vmlinux that is not an ELF image")
        manifest: dict[str, Any] = {
            "name": entry.name, "distro": "debian-source", "arch": entry.arch, "kernel_version": release,
            "source": f"{mirror.rstrip('/')}/{pkg.filename}", "sha256": pkg.sha256, "package": pkg.name,
            "package_version": pkg.version, "suite": suite, "config": entry.config,
            "config_sha256": hashlib.sha256(config).hexdigest(),
            "imported_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "build_seconds": round(time.monotonic() - started, 1), "build_jobs": cpus,
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        shutil.copyfile(log_path, staging / "build.log")
        os.chmod(staging, 0o755)
        _install(staging, dest_dir)
        log_path.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("built kernel %s (%s %s) in %.0fs", entry.name, pkg.name, pkg.version, time.monotonic() - started)
    return InstalledKernel(directory=dest_dir, vmlinux=dest_dir / "vmlinux", initrd=None, modules=None,
                           manifest_path=dest_dir / "manifest.json", manifest=manifest)

