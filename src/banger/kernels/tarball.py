"""Tarball kernels: `<name>-<arch>.tar.zst` holding `vmlinux`, optional `initrd.img`, optional `modules/`.

A pull downloads the archive with `fetch_to` (bounded by the download cap, size and sha256 checked
*before* anything is decompressed), then extracts it into a staging directory that is renamed into
place. `kernel import` (the maintainer flow) feeds a local directory through the same checks.

Extraction accepts only what a kernel directory may hold: the regular files `vmlinux` (which must be
an ELF image) and `initrd.img`, and below `modules/` directories, regular files and relative symlinks
that stay inside `modules/`. Anything else (another name, `..`, an absolute path, a device, a
hardlink, a symlink elsewhere or escaping, a duplicate) is a one-line error and leaves nothing behind.
Nothing is ever written through a symlink: every parent of an entry must be a real directory.

One exception: `modules/<version>/build` and `modules/<version>/source`, which `make modules_install`
and distribution packages point at the kernel's build tree (`/usr/src/linux-headers-...`), outside the
kernel. They are dropped (logged, never created, never followed): without those headers in the guest
they lead nowhere, and a link out of the kernel directory is one nothing should ever resolve.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from banger.errors import BadRequest, BangerError
from banger.model import validate_artifact_name
from banger.system.download import Progress, fetch_to, sha256_file

log = logging.getLogger("banger.kernels.tarball")

ELF_MAGIC = b"\x7fELF"
VMLINUX = "vmlinux"
INITRD = "initrd.img"
MODULES = "modules"
BUILD_LINKS = frozenset({"build", "source"})
_CHUNK = 1 << 20


def _is_build_link(name: str) -> bool:
    """`modules/<version>/build` or `modules/<version>/source` (a normalized entry name)."""
    parts = name.split("/")
    return len(parts) == 3 and parts[0] == MODULES and parts[2] in BUILD_LINKS


@dataclass(frozen=True)
class InstalledKernel:
    directory: Path
    vmlinux: Path
    initrd: Path | None
    modules: Path | None
    manifest_path: Path
    manifest: dict[str, Any]


class _Tree:
    """Writes validated entries below `root`; `where` names the source in error messages."""

    def __init__(self, root: Path, where: str, max_bytes: int) -> None:
        self.root = root
        self.where = where
        self.max_bytes = max_bytes
        self.written = 0
        self.seen: set[str] = set()
        self.symlinks: list[str] = []
        self.dropped: list[str] = []

    def fail(self, name: str, problem: str) -> BangerError:
        return BangerError(f"{self.where}: entry {name!r} refused: {problem}")

    def check_name(self, raw: str, kind: str) -> str:
        """The normalized relative name, or an error for anything outside the expected layout."""
        if "\0" in raw or "\\" in raw:
            raise self.fail(raw, "the name holds a NUL or backslash")
        if raw.startswith("/"):
            raise self.fail(raw, "absolute paths are not allowed")
        parts = [p for p in raw.split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts):
            raise self.fail(raw, "'..' is not allowed")
        name = "/".join(parts)
        if not name:
            return ""  # the archive root ("./")
        if name in (VMLINUX, INITRD):
            if kind != "file":
                raise self.fail(raw, f"{name} must be a regular file, not a {kind}")
        elif name == MODULES:
            if kind != "dir":
                raise self.fail(raw, f"{MODULES} must be a directory, not a {kind}")
        elif name.startswith(MODULES + "/"):
            if kind not in ("file", "dir", "symlink"):
                raise self.fail(raw, f"a {kind} is not allowed (only files, directories and symlinks)")
        else:
            raise self.fail(raw, f"unexpected entry (allowed: {VMLINUX}, {INITRD}, {MODULES}/)")
        if kind == "symlink" and not name.startswith(MODULES + "/"):
            raise self.fail(raw, f"symlinks are only allowed inside {MODULES}/")
        if name in self.seen:
            raise self.fail(raw, "duplicate entry")
        self.seen.add(name)
        return name

    def _parent(self, name: str) -> Path:
        """The host directory for `name`'s parent, created as real directories (never through a symlink)."""
        current = self.root
        for part in name.split("/")[:-1]:
            current = current / part
            try:
                info = current.lstat()
            except FileNotFoundError:
                current.mkdir(mode=0o755)
                continue
            if not stat.S_ISDIR(info.st_mode):
                raise self.fail(name, f"its parent {part!r} is not a directory")
        return current

    def add_dir(self, raw: str, mode: int) -> None:
        name = self.check_name(raw, "dir")
        if not name:
            return
        path = self._parent(name) / name.rsplit("/", 1)[-1]
        try:
            info = path.lstat()
        except FileNotFoundError:
            path.mkdir(mode=0o755)
        else:
            if not stat.S_ISDIR(info.st_mode):
                raise self.fail(raw, "a directory would replace another entry")
        os.chmod(path, (mode & 0o755) | 0o700)

    def add_file(self, raw: str, mode: int, source: IO[bytes]) -> None:
        name = self.check_name(raw, "file")
        path = self._parent(name) / name.rsplit("/", 1)[-1]
        if path.exists() or path.is_symlink():
            raise self.fail(raw, "a file would replace another entry")
        # O_EXCL|O_NOFOLLOW: never follow or reuse whatever is there.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(_CHUNK):
                self.written += len(chunk)
                if self.written > self.max_bytes:
                    raise BangerError(f"{self.where}: refused: the contents exceed the cap of {self.max_bytes} bytes")
                out.write(chunk)
        os.chmod(path, 0o755 if mode & 0o111 else 0o644)

    def add_symlink(self, raw: str, target: str) -> None:
        name = self.check_name(raw, "symlink")
        if not target or "\0" in target:
            raise self.fail(raw, f"symlink target {target!r} must be a relative path")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
        inside = not target.startswith("/") and (resolved == MODULES or resolved.startswith(MODULES + "/"))
        if not inside and _is_build_link(name):
            log.info("%s: dropping %s -> %s (a link to the kernel's build tree, outside the kernel)",
                     self.where, name, target)
            self.dropped.append(name)
            return
        if target.startswith("/"):
            raise self.fail(raw, f"symlink target {target!r} must be a relative path (absolute links are "
                                 f"dropped only as {MODULES}/<version>/build or source)")
        if not inside:
            raise self.fail(raw, f"symlink target {target!r} escapes {MODULES}/")
        path = self._parent(name) / name.rsplit("/", 1)[-1]
        if path.exists() or path.is_symlink():
            raise self.fail(raw, "a symlink would replace another entry")
        os.symlink(target, path)
        self.symlinks.append(name)

    def finish(self) -> None:
        """Whole-tree checks: symlinks resolve inside modules/ physically too, vmlinux is an ELF."""
        modules_root = os.path.realpath(self.root / MODULES)
        for name in self.symlinks:
            real = os.path.realpath(self.root / name)
            if real != modules_root and not real.startswith(modules_root + os.sep):
                raise self.fail(name, f"symlink resolves outside {MODULES}/")
        if VMLINUX not in self.seen:
            raise BangerError(f"{self.where}: no {VMLINUX} in it (expected {VMLINUX}, optional {INITRD} "
                              f"and {MODULES}/)")
        with (self.root / VMLINUX).open("rb") as handle:
            if handle.read(4) != ELF_MAGIC:
                raise BangerError(f"{self.where}: {VMLINUX} is not an ELF image (an uncompressed kernel is "
                                  "required, not a bzImage)")


def _tar_kind(m: tarfile.TarInfo) -> str:
    if m.isreg():
        return "file"
    if m.isdir():
        return "dir"
    if m.issym():
        return "symlink"
    if m.islnk():
        return "hardlink"
    if m.ischr() or m.isblk():
        return "device"
    if m.isfifo():
        return "fifo"
    return "special file"


def extract_tarball(archive: Path, dest: Path, max_bytes: int) -> None:
    """Extract the zstd tarball `archive` into the empty directory `dest`, validating every entry."""
    import zstandard

    tree = _Tree(dest, archive.name, max_bytes)
    try:
        with archive.open("rb") as raw:
            reader = zstandard.ZstdDecompressor().stream_reader(raw)
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for m in tar:
                    kind = _tar_kind(m)
                    if kind == "dir":
                        tree.add_dir(m.name, m.mode)
                    elif kind == "file":
                        source = tar.extractfile(m)
                        if source is None:
                            raise tree.fail(m.name, "unreadable file entry")
                        tree.add_file(m.name, m.mode, source)
                    elif kind == "symlink":
                        tree.add_symlink(m.name, m.linkname)
                    else:
                        tree.check_name(m.name, kind)  # raises: only files, dirs and symlinks are allowed
                        raise tree.fail(m.name, f"a {kind} is not allowed")
    except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
        raise BangerError(f"{archive.name}: not a valid .tar.zst archive: {' '.join(str(exc).split())}") from exc
    tree.finish()


def _walk(source: Path) -> Iterator[tuple[str, Path]]:
    """`source`'s kernel entries as (archive-style name, host path), parents first, sorted."""
    for name in (VMLINUX, INITRD):
        if (source / name).exists() or (source / name).is_symlink():
            yield name, source / name
    modules = source / MODULES
    if not (modules.exists() or modules.is_symlink()):
        return
    yield MODULES, modules
    if not modules.is_dir() or modules.is_symlink():
        return
    for root, dirs, files in os.walk(modules):
        dirs.sort()
        rel = Path(root).relative_to(source).as_posix()
        for entry in [*sorted(dirs), *sorted(files)]:
            yield f"{rel}/{entry}", Path(root) / entry


def copy_tree(source: Path, dest: Path, max_bytes: int) -> None:
    """Copy `vmlinux`, `initrd.img` and `modules/` from the directory `source` into `dest` with the
    tarball rules (other files in `source` are ignored)."""
    if not source.is_dir():
        raise BadRequest(f"--from {str(source)!r} is not a directory")
    tree = _Tree(dest, str(source), max_bytes)
    for name, path in _walk(source):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            tree.add_symlink(name, os.readlink(path))
        elif stat.S_ISDIR(info.st_mode):
            tree.add_dir(name, info.st_mode)
        elif stat.S_ISREG(info.st_mode):
            with path.open("rb") as handle:
                tree.add_file(name, info.st_mode, handle)
        else:
            tree.check_name(name, "special file")
            raise tree.fail(name, "a special file is not allowed")
    tree.finish()


def _guess_version(staging: Path) -> str:
    """`modules/<kver>/` names the version when the catalog does not."""
    found = sorted(p.name for p in (staging / MODULES).iterdir() if p.is_dir()) if (staging / MODULES).is_dir() else []
    return found[0] if len(found) == 1 else "unknown"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _install_staging(staging: Path, dest_dir: Path, manifest: dict[str, Any]) -> InstalledKernel:
    from banger.kernels.catalog import _install

    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.chmod(staging, 0o755)  # mkdtemp made it 0700; a kernel directory is not secret
    _install(staging, dest_dir)
    initrd = dest_dir / INITRD
    modules = dest_dir / MODULES
    return InstalledKernel(
        directory=dest_dir, vmlinux=dest_dir / VMLINUX, initrd=initrd if initrd.is_file() else None,
        modules=modules if modules.is_dir() else None, manifest_path=dest_dir / "manifest.json",
        manifest=manifest)


def pull_tarball_kernel(
    name: str,
    url: str,
    sha256: str,
    size: int,
    dest_dir: Path,
    max_bytes: int,
    *,
    distro: str = "generic",
    arch: str = "amd64",
    kernel_version: str = "",
    progress: Progress | None = None,
) -> InstalledKernel:
    """Download, verify and extract a tarball kernel as `dest_dir` (replaced atomically, or left as it was)."""
    validate_artifact_name("kernel", name)
    parent = dest_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.work-", dir=parent))
    staging = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.staging-", dir=parent))
    try:
        archive = fetch_to(url, work, max_bytes=max_bytes, sha256=sha256, size=size, progress=progress)
        extract_tarball(archive, staging, max_bytes)
        manifest: dict[str, Any] = {
            "name": name, "distro": distro, "arch": arch,
            "kernel_version": kernel_version or _guess_version(staging),
            "source": url, "sha256": sha256, "imported_at": _now(),
        }
        installed = _install_staging(staging, dest_dir, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("pulled tarball kernel %s from %s", name, url)
    return installed


def import_kernel(
    name: str, source: Path, dest_dir: Path, *, distro: str, arch: str, kernel_version: str, max_bytes: int
) -> InstalledKernel:
    """`kernel import`: copy a maintainer's build from `source` into `dest_dir` after the tarball checks."""
    from banger.kernels.catalog import ARCHES

    validate_artifact_name("kernel", name)
    for flag, value in (("--distro", distro), ("--kernel-version", kernel_version)):
        if not value.strip() or any(c.isspace() or not c.isprintable() for c in value) or "/" in value:
            raise BadRequest(f"{flag} {value!r} is invalid (a non-empty word without spaces or '/')")
    if arch not in ARCHES:
        raise BadRequest(f"--arch {arch!r} is not supported (allowed: {', '.join(ARCHES)})")
    if not source.is_absolute():
        raise BadRequest(f"--from {str(source)!r} must be an absolute path")
    parent = dest_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.staging-", dir=parent))
    try:
        copy_tree(source, staging, max_bytes)
        manifest: dict[str, Any] = {
            "name": name, "distro": distro, "arch": arch, "kernel_version": kernel_version,
            "source": f"import:{source}", "sha256": sha256_file(staging / VMLINUX), "imported_at": _now(),
        }
        installed = _install_staging(staging, dest_dir, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("imported kernel %s from %s", name, source)
    return installed
