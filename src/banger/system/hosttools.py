"""Host tools that banger installs itself, from a Debian archive, when Debian 12 does not package them.

Today that is `vhost-device-vsock` (only in sid; its binary needs glibc >= 2.34, so it runs on
bookworm). Behind QEMU's `vhost-user-vsock-device` it gives the QEMU backend Firecracker's hybrid-vsock
agent transport on hosts without /dev/vhost-vsock.

The package comes through the same chain of trust as kernels (`banger.kernels.debian`): InRelease
checked by gpgv against the Debian archive keyring, the Packages index by the sha256 the signed Release
lists, the .deb by the sha256 and size the index lists, downloads bounded. One file of the package is
installed, never the package itself (no maintainer scripts, no dpkg database): it is staged next to its
destination, run once (`--version`) to prove it works with this host's libc, and renamed into place, so
a running copy keeps its inode and a failure leaves the previous file untouched. `<file>.version`
records the package version and the installed file's sha256, which makes a re-run with the same
version a no-op and lets `banger doctor` name the version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from banger.errors import BadRequest, BangerError, NotFound
from banger.kernels import debian, debian_index
from banger.system.download import Progress, sha256_file
from banger.system.run import run

log = logging.getLogger("banger.hosttools")

DEFAULT_DEST = Path("/usr/local/bin")
DEFAULT_SUITE = "sid"
MAX_DEB_BYTES = 64 << 20  # vhost-device-vsock's .deb is about 1 MB; the cap only bounds a bad index
SMOKE_TIMEOUT = 10.0
RECORD_SUFFIX = ".version"

_DEBIAN_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


@dataclass(frozen=True)
class HostTool:
    package: str  # Debian binary package
    member: str  # the one file installed from it, relative to the package root
    smoke_args: tuple[str, ...] = ("--version",)  # must exit 0 on this host before the file is installed

    @property
    def name(self) -> str:
        return PurePosixPath(self.member).name


VHOST_VSOCK = HostTool("vhost-device-vsock", "usr/bin/vhost-device-vsock")


@dataclass(frozen=True)
class InstallResult:
    path: Path
    package: str
    version: str
    suite: str
    changed: bool  # False: this version was already installed, nothing was downloaded
    deb_size: int  # bytes downloaded (0 when unchanged)
    expired_at: datetime | None  # set when the suite's Release was past Valid-Until and allowed


def record_path(binary: Path) -> Path:
    return binary.with_name(binary.name + RECORD_SUFFIX)


def installed_version(binary: Path) -> str | None:
    """The Debian version recorded by `install` for `binary`, if `binary` is still the file it installed.

    A binary replaced by hand (or a record left by a half-finished run) has another sha256: None then.
    """
    try:
        record = json.loads(record_path(binary).read_text())
        version, digest = record["version"], record["sha256"]
        if isinstance(version, str) and isinstance(digest, str) and sha256_file(binary) == digest:
            return version
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def debian_arch(machine: str | None = None) -> str:
    machine = machine or platform.machine()
    arch = _DEBIAN_ARCH.get(machine)
    if arch is None:
        raise BadRequest(f"no Debian architecture known for machine {machine!r} (known: {', '.join(_DEBIAN_ARCH)})")
    return arch


def _check_dest(dest_dir: Path, tool: HostTool) -> Path:
    if not dest_dir.is_absolute():
        raise BadRequest(f"destination {str(dest_dir)!r} must be an absolute path")
    if not dest_dir.is_dir():
        raise BadRequest(f"destination {dest_dir} is not a directory")
    if not os.access(dest_dir, os.W_OK | os.X_OK):
        raise BadRequest(f"cannot write to {dest_dir}", hint="run it as root (sudo)")
    target = dest_dir / tool.name
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(target.lstat().st_mode):
            raise BadRequest(f"{target} is a directory; refusing to replace it")
    return target


def _stage(member: Path, dest_dir: Path, name: str) -> Path:
    """A 0755 copy of `member` under a hidden temporary name in `dest_dir` (same file system as the target)."""
    fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{name}.", suffix=".part")
    staged = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, member.open("rb") as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
            os.fchmod(out.fileno(), 0o755)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged


def _smoke_test(staged: Path, tool: HostTool, version: str, suite: str) -> None:
    proc = run([staged, *tool.smoke_args], check=False, timeout=SMOKE_TIMEOUT)
    if proc.returncode != 0:
        output = " ".join((proc.stderr or proc.stdout or b"").decode("utf-8", "replace").split())[-300:]
        raise BangerError(
            f"{tool.package} {version} from {suite} does not run on this host "
            f"(`{tool.name} {' '.join(tool.smoke_args)}` exited with {proc.returncode}: {output or 'no output'})",
            hint="this host's libc may be too old for that build; nothing was installed",
        )


def _write_record(target: Path, tool: HostTool, version: str, suite: str, digest: str) -> None:
    record = {"package": tool.package, "version": version, "suite": suite, "sha256": digest,
              "installed_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    path = record_path(target)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def install(
    tool: HostTool,
    dest_dir: Path,
    *,
    mirror: str,
    suite: str = DEFAULT_SUITE,
    keyring: Path = debian.DEFAULT_KEYRING,
    arch: str | None = None,
    allow_expired: bool = False,
    max_bytes: int = MAX_DEB_BYTES,
    progress: Progress | None = None,
    stage: Callable[[str], None] | None = None,
    work_root: Path | None = None,
) -> InstallResult:
    """Install `tool.member` from the newest `tool.package` in `suite` as `dest_dir/<name>`, mode 0755.

    `allow_expired` accepts a Release past its Valid-Until (a frozen or snapshot mirror); the signature
    and every checksum are still checked. Nothing is left in `dest_dir` or `work_root` on failure.
    """
    target = _check_dest(dest_dir, tool)
    debian.check_suite(suite)
    arch = arch or debian_arch()
    with tempfile.TemporaryDirectory(prefix="banger-hosttool-", dir=work_root) as work_name:
        work = Path(work_name)
        if stage is not None:
            stage(f"checking {suite} at {mirror}")
        release = debian.fetch_release(mirror, suite, keyring, work_dir=work)
        now = datetime.now(UTC)
        try:
            debian_index.check_release(release, suite, now, allow_expired=allow_expired)
        except debian_index.ExpiredRelease as exc:
            raise debian_index.ExpiredRelease(
                exc.message, hint="the mirror is stale or replays old metadata: try another mirror, or accept "
                "it with --allow-expired (the signature and checksums are still checked)") from None
        expired_at = release.valid_until if release.valid_until is not None and now > release.valid_until else None
        if expired_at is not None:
            log.info("accepting the %s Release that expired at %s", suite, expired_at.isoformat())
        text = debian.fetch_packages_text(mirror, suite, release, arch, work_dir=work)
        try:
            pkg = debian_index.select_package(text, tool.package, arch)
        except NotFound as exc:
            raise NotFound(f"{exc.message} of {suite} at {mirror}") from None
        del text
        if installed_version(target) == pkg.version:
            return InstallResult(target, pkg.name, pkg.version, suite, False, 0, expired_at)
        if stage is not None:
            stage(f"downloading {pkg.name} {pkg.version} ({pkg.size / 1e6:.1f} MB)")
        deb = debian.fetch_deb(mirror, pkg, work, max_bytes, progress=progress)
        root = work / "root"
        debian.extract_deb(deb, root)
        member = root / tool.member
        try:
            member_st = member.lstat()
        except FileNotFoundError:
            raise BangerError(f"{pkg.name} {pkg.version} has no file /{tool.member}") from None
        if not stat.S_ISREG(member_st.st_mode):
            raise BangerError(f"/{tool.member} in {pkg.name} {pkg.version} is not a regular file; refused")
        staged = _stage(member, dest_dir, tool.name)
        try:
            _smoke_test(staged, tool, pkg.version, suite)
            digest = sha256_file(staged)
            os.replace(staged, target)
        finally:
            staged.unlink(missing_ok=True)
        _write_record(target, tool, pkg.version, suite, digest)
        log.info("installed %s %s from %s at %s", pkg.name, pkg.version, suite, target)
        return InstallResult(target, pkg.name, pkg.version, suite, True, pkg.size, expired_at)
