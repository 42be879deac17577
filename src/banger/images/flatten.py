"""Replay image layers (tar streams) into one staging directory, safely and without root.

The layers come from registries we do not trust, so every entry is checked before anything touches
the disk, and nothing is ever written outside `dest`:

* entry names must be relative, without `..`, and encodable for the debugfs tooling that later fixes
  ownership (`ext4.encodable`);
* every intermediate component of an entry's path is lstat-ed and a symlink there is refused, so an
  earlier `etc -> /tmp/x` cannot make a later `etc/passwd` (or a whiteout or hardlink) reach outside;
* the leaf is always replaced, never written through: a previous file, symlink or even directory at
  that path is removed first and the new file is created with O_EXCL|O_NOFOLLOW;
* symlinks may point anywhere absolute (they are resolved inside the guest) but a relative target
  that climbs out of the root is refused; hardlinks must name an already extracted, non-directory
  entry inside the tree;
* device nodes and fifos are skipped (the guest's devtmpfs provides /dev); the total number of
  extracted bytes is capped.

The files on disk belong to the builder and carry only the permission bits it needs to keep working;
the real owners and modes, from the tar headers, are returned as `Metadata` for `ext4.apply_metadata`.
OCI whiteouts are honoured: `.wh.<name>` deletes `<name>` and `.wh..wh..opq` empties its directory,
both only of what earlier layers put there.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import posixpath
import re
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import IO, BinaryIO, cast

from banger.errors import BadRequest
from banger.images.ext4 import ENCODING_RULE, FileMeta, Kind, Metadata, encodable, show_name

__all__ = ["FileMeta", "Metadata", "flatten_layers", "flatten_tar_file"]

log = logging.getLogger("banger.images.flatten")

_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20
_DIGEST = re.compile(r"^([a-z0-9]+):([0-9a-f]{13,})$")
_IMPLICIT_DIR = FileMeta(0, 0, stat.S_IFDIR | 0o755, "dir")
_NAME_MAX = 255  # ext4's limit for one path component
_ID_LIMIT = 1 << 32


def flatten_layers(layers: Iterable[tuple[str, BinaryIO | Path]], dest: Path, *, max_bytes: int) -> Metadata:
    """Replay `layers` (name, tar stream or file; plain, gzip or zstd) oldest first into `dest`.

    Returns the owner and mode of every path in the result. Raises BadRequest naming the layer and the
    entry on the first unsafe or unsupported entry; the caller then removes `dest`.
    """
    flattener = _Flattener(dest, max_bytes)
    for index, (name, source) in enumerate(layers, 1):
        flattener.apply(f"layer {index} ({_short(name)})", source)
    flattener.finish()
    return flattener.metadata


def flatten_tar_file(path: Path, dest: Path, max_bytes: int) -> Metadata:
    """Extract one root filesystem tarball (e.g. mmdebstrap's output) with the same rules as a layer."""
    flattener = _Flattener(dest, max_bytes)
    flattener.apply(f"tarball {show_name(path.name)}", path)
    flattener.finish()
    return flattener.metadata


def _short(name: str) -> str:
    m = _DIGEST.match(name)
    if m:
        return f"{m.group(1)}:{m.group(2)[:12]}…"
    return show_name(name)


class _Prefixed(io.RawIOBase):
    """A stream with some already-read bytes put back in front (to sniff compression magic)."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer)
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(len(view))
        view[: len(data)] = data
        return len(data)


def _read_head(stream: BinaryIO, size: int) -> bytes:
    head = b""
    while len(head) < size:
        chunk = stream.read(size - len(head))
        if not chunk:
            break
        head += chunk
    return head


class _Flattener:
    def __init__(self, dest: Path, max_bytes: int) -> None:
        dest.mkdir(mode=0o700, exist_ok=True)
        if dest.is_symlink() or not dest.is_dir():
            raise BadRequest(f"staging directory {dest} is not a plain directory")
        self.dest = dest
        self.max_bytes = max_bytes
        self.total = 0
        self.metadata: Metadata = {"/": _IMPLICIT_DIR}
        self._dir_mtimes: dict[str, float] = {}
        self._label = ""
        # Paths written by the current layer and their ancestors: whiteouts spare them.
        self._written: set[str] = set()
        self._written_dirs: set[str] = set()

    # --------------------------------------------------------------------------------- streams

    def apply(self, label: str, source: BinaryIO | Path) -> None:
        self._label = label
        self._written = set()
        self._written_dirs = set()
        if isinstance(source, Path):
            with source.open("rb") as handle:
                self._apply_stream(handle)
        else:
            self._apply_stream(source)

    def _apply_stream(self, stream: BinaryIO) -> None:
        head = _read_head(stream, len(_ZSTD_MAGIC))
        raw = io.BufferedReader(_Prefixed(head, stream), _CHUNK)
        bad_stream: tuple[type[Exception], ...] = (tarfile.TarError, EOFError, zlib.error)
        if head == _ZSTD_MAGIC:
            import zstandard

            bad_stream = (*bad_stream, zstandard.ZstdError)
            try:
                reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)
                with tarfile.open(fileobj=reader, mode="r|") as tar:
                    self._apply_tar(tar)
            except bad_stream as exc:
                raise BadRequest(f"{self._label}: not a valid zstd tar stream ({exc})") from exc
            return
        if head[:2] == _GZIP_MAGIC:
            # gzip.GzipFile rather than tarfile's "r|gz": it reads multi-member streams, and Python
            # 3.11's tarfile raises AttributeError instead of ReadError on a corrupt gzip stream.
            import gzip

            bad_stream = (*bad_stream, gzip.BadGzipFile)
            source: IO[bytes] = cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
            kind = "gzip tar"
        else:
            source = raw
            kind = "tar"
        try:
            with tarfile.open(fileobj=source, mode="r|") as tar:
                self._apply_tar(tar)
        except bad_stream as exc:
            raise BadRequest(f"{self._label}: not a valid {kind} stream ({exc})") from exc

    def _apply_tar(self, tar: tarfile.TarFile) -> None:
        skipped = 0
        for member in tar:
            try:
                applied = self._entry(tar, member)
            except OSError as exc:
                if exc.errno == errno.ENAMETOOLONG:
                    raise self._fail(member.name, "has a path too long to extract") from exc
                raise
            skipped += not applied
        if skipped:
            log.info("%s: skipped %d device node/fifo entries", self._label, skipped)

    def finish(self) -> None:
        # Writing into a directory bumps its mtime, so directory times are set once everything is in.
        for key, mtime in self._dir_mtimes.items():
            meta = self.metadata.get(key)
            path = self._host(key[1:])
            if meta is not None and meta.kind == "dir" and path.is_dir() and not path.is_symlink():
                _set_mtime(path, mtime)

    # --------------------------------------------------------------------------------- entries

    def _fail(self, name: str, problem: str) -> BadRequest:
        return BadRequest(f'{self._label}: entry "{show_name(name)}" {problem}')

    def _host(self, rel: str) -> Path:
        return self.dest / rel if rel else self.dest

    def _split(self, name: str) -> list[str]:
        """Check an entry name and return its components ([] for the root directory)."""
        if not encodable(name):
            raise self._fail(name, f"has a name the image tooling cannot encode ({ENCODING_RULE})")
        if name.startswith("/"):
            raise self._fail(name, "is an absolute path")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise self._fail(name, "escapes the root")
        if any(len(p.encode()) > _NAME_MAX for p in parts):
            raise self._fail(name, f"has a path component longer than {_NAME_MAX} bytes")
        return parts

    def _entry(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> bool:
        """Apply one tar member; False if it was skipped."""
        name = m.name
        parts = self._split(name)
        if parts and parts[-1].startswith(_WHITEOUT):
            self._whiteout(name, parts)
            return True
        if not (0 <= m.uid < _ID_LIMIT and 0 <= m.gid < _ID_LIMIT):
            raise self._fail(name, f"has owner {m.uid}:{m.gid}, outside 0..{_ID_LIMIT - 1}")
        if m.ischr() or m.isblk() or m.isfifo():
            log.debug("%s: skipping %s entry %r", self._label, "fifo" if m.isfifo() else "device", name)
            return False
        if not parts:
            if not m.isdir():
                raise self._fail(name, "replaces the root directory with a non-directory")
            self.metadata["/"] = FileMeta(m.uid, m.gid, stat.S_IFDIR | (m.mode & 0o7777), "dir")
            self._dir_mtimes["/"] = m.mtime
            return True
        if not (m.islnk() or m.isdir() or m.issym() or m.isreg()):
            raise self._fail(name, f"has the unsupported tar entry type {m.type!r}")
        rel = "/".join(parts)
        if m.islnk():
            self._hardlink(name, parts, m.linkname)
        elif m.isdir():
            self._dir(m, rel, self._leaf(name, parts))
        elif m.issym():
            self._symlink(name, m, rel, self._leaf(name, parts))
        else:
            self._file(tar, name, m, rel, self._leaf(name, parts))
        self._written.add(rel)
        self._written_dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
        return True

    def _parent(self, name: str, parts: list[str], *, create: bool, lead: str = "") -> Path | None:
        """The host directory for the last component of `parts`, lstat-checking every ancestor.

        A symlink or non-directory ancestor is refused. A missing one is created (root:root 0755 in
        the image unless a later entry says otherwise) when `create`, else None is returned.
        """
        cur = self.dest
        for i in range(len(parts) - 1):
            cur = cur / parts[i]
            try:
                info = os.lstat(cur)
            except FileNotFoundError:
                if not create:
                    return None
                os.mkdir(cur, 0o700)
                os.chmod(cur, 0o755)
                self.metadata.setdefault("/" + "/".join(parts[: i + 1]), _IMPLICIT_DIR)
                continue
            if stat.S_ISLNK(info.st_mode):
                shown = show_name("/".join(parts[: i + 1]))
                raise self._fail(name, f'{lead}goes through the symlink "{shown}"')
            if not stat.S_ISDIR(info.st_mode):
                shown = show_name("/".join(parts[: i + 1]))
                raise self._fail(name, f'{lead}goes through "{shown}", which is not a directory')
        return cur

    def _leaf(self, name: str, parts: list[str]) -> Path:
        """The host path an entry is written to, its missing parents created."""
        parent = self._parent(name, parts, create=True)
        if parent is None:  # unreachable with create=True; keeps the type exact
            raise self._fail(name, "has no parent directory")
        return parent / parts[-1]

    def _remove(self, rel: str) -> None:
        """Delete whatever is at `rel` (a whole tree for a directory) and forget its metadata."""
        path = self._host(rel)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            for root, dirs, files in os.walk(path):
                base = os.path.relpath(root, self.dest)
                for child in (*dirs, *files):
                    self.metadata.pop(f"/{base}/{child}", None)
                    self._dir_mtimes.pop(f"/{base}/{child}", None)
            shutil.rmtree(path)
        else:
            os.unlink(path)
        self.metadata.pop("/" + rel, None)
        self._dir_mtimes.pop("/" + rel, None)

    def _dir(self, m: tarfile.TarInfo, rel: str, path: Path) -> None:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            info = None
        if info is None or not stat.S_ISDIR(info.st_mode):
            if info is not None:
                self._remove(rel)
            os.mkdir(path, 0o700)
        # The builder must keep being able to enter and write the directory, whatever the layer says.
        os.chmod(path, (m.mode & 0o777) | 0o700)
        self.metadata["/" + rel] = FileMeta(m.uid, m.gid, stat.S_IFDIR | (m.mode & 0o7777), "dir")
        self._dir_mtimes["/" + rel] = m.mtime

    def _file(self, tar: tarfile.TarFile, name: str, m: tarfile.TarInfo, rel: str, path: Path) -> None:
        if self.total + m.size > self.max_bytes:
            raise self._fail(name, f"would take the extracted size over the limit of {self.max_bytes} bytes")
        self._remove(rel)
        source = tar.extractfile(m)
        if source is None:
            raise self._fail(name, "has no data")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(_CHUNK):
                self.total += len(chunk)
                if self.total > self.max_bytes:
                    raise self._fail(name, f"would take the extracted size over the limit of {self.max_bytes} bytes")
                out.write(chunk)
            # Special bits stay off on the host copy (they would be the builder's own setuid); the
            # builder keeps read/write. The real mode lands in the image via the metadata.
            out.flush()  # before the mtime, which a late buffered write would bump
            os.fchmod(out.fileno(), (m.mode & 0o777) | 0o600)
            _set_mtime(out.fileno(), m.mtime)
        self.metadata["/" + rel] = FileMeta(m.uid, m.gid, stat.S_IFREG | (m.mode & 0o7777), "file")

    def _symlink(self, name: str, m: tarfile.TarInfo, rel: str, path: Path) -> None:
        target = m.linkname
        if not target:
            raise self._fail(name, "is a symlink with an empty target")
        if not target.startswith("/"):
            # Absolute targets are resolved inside the guest; relative ones must not climb out of it.
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
            if resolved == ".." or resolved.startswith("../"):
                raise self._fail(name, f'is an unsafe symlink: target "{show_name(target)}" escapes the root')
        self._remove(rel)
        os.symlink(target, path)
        _set_mtime(path, m.mtime)
        self.metadata["/" + rel] = FileMeta(m.uid, m.gid, stat.S_IFLNK | 0o777, "symlink")

    def _hardlink(self, name: str, parts: list[str], linkname: str) -> None:
        shown = show_name(linkname)
        lead = f'is a hardlink to "{shown}", which '
        if not encodable(linkname):
            raise self._fail(name, f"{lead}the image tooling cannot encode ({ENCODING_RULE})")
        target_parts = [p for p in linkname.split("/") if p not in ("", ".")]
        if linkname.startswith("/") or ".." in target_parts:
            raise self._fail(name, f"{lead}escapes the root")
        if not target_parts:
            raise self._fail(name, "is a hardlink to the root directory")
        target_dir = self._parent(name, target_parts, create=False, lead=lead)
        target = (target_dir / target_parts[-1]) if target_dir is not None else None
        try:
            info = os.lstat(target) if target is not None else None
        except FileNotFoundError:
            info = None
        if target is None or info is None:
            raise self._fail(name, f"{lead}has not been extracted before it")
        if stat.S_ISDIR(info.st_mode):
            raise self._fail(name, f"{lead}is a directory")
        rel = "/".join(parts)
        target_rel = "/".join(target_parts)
        if rel == target_rel:
            return
        if target_rel.startswith(rel + "/"):
            raise self._fail(name, f"{lead}is inside the entry itself")
        leaf = self._leaf(name, parts)
        self._remove(rel)
        os.link(target, leaf, follow_symlinks=False)
        # Both names share one inode, so they must carry identical metadata.
        kind: Kind = "symlink" if stat.S_ISLNK(info.st_mode) else "file"
        self.metadata["/" + rel] = self.metadata.get(
            "/" + target_rel, FileMeta(0, 0, stat.S_IFMT(info.st_mode) | 0o644, kind)
        )

    def _whiteout(self, name: str, parts: list[str]) -> None:
        base = parts[-1]
        dir_parts = parts[:-1]
        if base.startswith(_WHITEOUT + _WHITEOUT) and base != _OPAQUE:
            log.debug("%s: ignoring whiteout metadata entry %r", self._label, name)
            return
        victim = "" if base == _OPAQUE else base[len(_WHITEOUT) :]
        if base != _OPAQUE and victim in ("", ".", ".."):
            raise self._fail(name, "is a whiteout that names no entry" if victim != ".." else "escapes the root")
        parent = self._parent(name, parts, create=False)
        if parent is None:
            return  # nothing below a missing directory to hide
        if base == _OPAQUE:
            if not parent.is_dir():
                return
            prefix = "/".join(dir_parts)
            for child in sorted(os.listdir(parent)):
                self._prune(f"{prefix}/{child}" if prefix else child)
        else:
            self._prune("/".join([*dir_parts, victim]))

    def _prune(self, rel: str) -> None:
        """Remove `rel` as far as earlier layers put it there; keep what the current layer wrote."""
        path = self._host(rel)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return
        if rel in self._written or rel in self._written_dirs:
            if stat.S_ISDIR(info.st_mode):
                for child in sorted(os.listdir(path)):
                    self._prune(f"{rel}/{child}")
            return
        self._remove(rel)


def _set_mtime(target: Path | int, mtime: float) -> None:
    # A nonsensical timestamp in a tar header is not worth failing the image for.
    try:
        if isinstance(target, int):
            os.utime(target, (mtime, mtime))
        else:
            os.utime(target, (mtime, mtime), follow_symlinks=False)
    except (OverflowError, OSError, ValueError):
        log.debug("cannot set mtime %r on %s", mtime, target)
