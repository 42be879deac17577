"""Image bundles: `<name>-<arch>-<sha256 prefix>.tar.zst` holding exactly `rootfs.ext4` and `manifest.json`.

`pull_bundle` downloads a catalog bundle with `fetch_to` (bounded by the download cap; size and sha256
checked *before* anything is decompressed) and extracts only those two regular files; any other entry,
a duplicate, a link or a device is a one-line error. The rootfs is written sparse (runs of zeros become
holes), as `mkfs.ext4` made it. `make_bundle` is the maintainer side (`banger internal make-bundle`):
a root filesystem tarball goes through the same rootless pipeline as every image (flatten, mkfs.ext4
-d, owners and modes, guest files) and comes out as a content-addressed bundle.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
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

log = logging.getLogger("banger.images.bundle")

ROOTFS = "rootfs.ext4"
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20
SHA_PREFIX_LEN = 12
_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)


@dataclass(frozen=True)
class Bundle:
    path: Path
    sha256: str
    size: int


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_sparse(source: IO[bytes], path: Path, limit: int, where: str) -> int:
    """Copy `source` into a new file at `path`, seeking over all-zero chunks; returns the byte count."""
    total = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        while chunk := source.read(_CHUNK):
            total += len(chunk)
            if total > limit:
                raise BangerError(f"{where}: refused: the contents exceed the cap of {limit} bytes")
            if chunk == _ZEROS[: len(chunk)]:
                out.seek(len(chunk), os.SEEK_CUR)
            else:
                out.write(chunk)
        out.truncate(total)
        out.flush()
        os.fsync(out.fileno())
    return total


def extract_bundle(archive: Path, dest: Path, max_bytes: int) -> dict[str, Any]:
    """Extract `rootfs.ext4` and `manifest.json` from `archive` into `dest`; returns the manifest."""
    import zstandard

    where = archive.name
    seen: set[str] = set()
    written = 0
    try:
        with archive.open("rb") as raw:
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for m in tar:
                    name = m.name.removeprefix("./")
                    if name in ("", ".") and m.isdir():
                        continue  # the archive's own root
                    if name not in (ROOTFS, MANIFEST):
                        raise BangerError(f"{where}: entry {m.name!r} refused: unexpected entry "
                                          f"(a bundle holds exactly {ROOTFS} and {MANIFEST})")
                    if not m.isreg():
                        raise BangerError(f"{where}: entry {m.name!r} refused: not a regular file")
                    if name in seen:
                        raise BangerError(f"{where}: entry {m.name!r} refused: duplicate entry")
                    seen.add(name)
                    source = tar.extractfile(m)
                    if source is None:
                        raise BangerError(f"{where}: entry {m.name!r} is unreadable")
                    limit = MAX_MANIFEST_BYTES if name == MANIFEST else max_bytes - written
                    written += write_sparse(source, dest / name, limit, f"{where}: {name}")
    except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
        raise BangerError(f"{where}: not a valid .tar.zst archive: {' '.join(str(exc).split())}") from exc
    missing = [n for n in (ROOTFS, MANIFEST) if n not in seen]
    if missing:
        raise BangerError(f"{where}: missing {', '.join(missing)} (a bundle holds exactly {ROOTFS} and {MANIFEST})")
    try:
        manifest = json.loads((dest / MANIFEST).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BangerError(f"{where}: {MANIFEST} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise BangerError(f"{where}: {MANIFEST} must be a JSON object")
    with (dest / ROOTFS).open("rb") as handle:
        handle.seek(1080)  # the ext2/3/4 superblock magic
        if handle.read(2) != b"\x53\xef":
            raise BangerError(f"{where}: {ROOTFS} is not an ext4 image")
    return manifest


def pull_bundle(url: str, sha256: str, size: int, work: Path, out_dir: Path, max_bytes: int, *,
                progress: Progress | None = None) -> dict[str, Any]:
    """Download the bundle into `work` and extract it into `out_dir` (both the caller's to remove)."""
    archive = fetch_to(url, work, max_bytes=max_bytes, sha256=sha256, size=size, progress=progress)
    try:
        return extract_bundle(archive, out_dir, max_bytes)
    finally:
        archive.unlink(missing_ok=True)  # as big as the image: free it before the work seed is built


def make_bundle(rootfs_tar: Path, out_dir: Path, *, name: str, distro: str, arch: str, kernel_ref: str,
                description: str = "", size_bytes: int | None = None, max_bytes: int = 8 << 30,
                level: int = 19) -> Bundle:
    """Turn a root filesystem tarball into `<out_dir>/<name>-<arch>-<sha prefix>.tar.zst`."""
    import zstandard

    from banger.images import catalog, ext4
    from banger.images.flatten import flatten_tar_file
    from banger.images.guestfiles import guest_files
    from banger.images.inject import inject

    validate_artifact_name("image", name)
    validate_artifact_name("kernel", kernel_ref)
    if distro not in catalog.DISTROS:
        raise BadRequest(f"--distro {distro!r} is not supported (allowed: {', '.join(catalog.DISTROS)})")
    if arch not in catalog.ARCHES:
        raise BadRequest(f"--arch {arch!r} is not supported (allowed: {', '.join(catalog.ARCHES)})")
    if not out_dir.is_dir():
        raise BadRequest(f"--out {str(out_dir)!r} is not a directory")
    work = Path(tempfile.mkdtemp(prefix=".make-bundle-", dir=out_dir))
    try:
        tree = work / "tree"
        metadata = flatten_tar_file(rootfs_tar, tree, max_bytes)
        rootfs = work / ROOTFS
        ext4.build_ext4(tree, rootfs, size_bytes=size_bytes, label="rootfs")
        shutil.rmtree(tree, ignore_errors=True)
        ext4.apply_metadata(rootfs, metadata)
        inject(rootfs, guest_files())
        manifest = {"name": name, "distro": distro, "arch": arch, "kernel_ref": kernel_ref,
                    "description": description, "created_at": _now(), "source_sha256": sha256_file(rootfs_tar)}
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        tmp = work / "bundle.tar.zst"
        with tmp.open("wb") as raw:
            cctx = zstandard.ZstdCompressor(level=level, threads=-1)
            with cctx.stream_writer(raw, closefd=False) as zout, tarfile.open(
                fileobj=zout, mode="w|", format=tarfile.PAX_FORMAT
            ) as tar:
                for member in (ROOTFS, MANIFEST):
                    info = tar.gettarinfo(str(work / member), arcname=member)
                    info.uid = info.gid = 0
                    info.uname = info.gname = "root"
                    info.mode = 0o644
                    with (work / member).open("rb") as handle:
                        tar.addfile(info, handle)
        digest = sha256_file(tmp)
        final = out_dir / f"{name}-{arch}-{digest[:SHA_PREFIX_LEN]}.tar.zst"
        os.replace(tmp, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("bundle %s made (%d bytes)", final, final.stat().st_size)
    return Bundle(final, digest, final.stat().st_size)


@contextlib.contextmanager
def staged_stdin(stdin: IO[bytes], out_dir: Path) -> Iterator[Path]:
    """`--rootfs-tar -`: stdin saved to a temporary file in `out_dir` (flattening needs a file)."""
    fd, name = tempfile.mkstemp(prefix=".rootfs-", suffix=".tar", dir=out_dir)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(stdin, out, _CHUNK)
        yield path
    finally:
        path.unlink(missing_ok=True)
