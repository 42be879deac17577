"""The blob cache: an OCI image layout under `<cache>/oci`, filled lazily while images are pulled.

    <cache>/oci/oci-layout            {"imageLayoutVersion": "1.0.0"}
    <cache>/oci/index.json            one entry per pulled reference (annotation ref.name)
    <cache>/oci/blobs/sha256/<hex>    manifests, configs and layers, each verified before it lands

A blob is streamed into a temporary file next to its final name and renamed into place only after
its size and digest matched, so a blob in the cache is always complete and correct when it was
written; reading it back goes through the same digest check (for free, while flattening) and a blob
that no longer matches is deleted. index.json is rewritten atomically under a lock. Pulls hold a
shared lock on `<cache>/oci.lock` for their whole run; `prune` takes it exclusively and refuses
while any pull is using the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from banger.errors import BangerError
from banger.images.oci.manifest import OCI_INDEX, Descriptor, parse_descriptor
from banger.images.oci.reference import digest_hex
from banger.images.oci.verify import DigestMismatch, SizeMismatch, VerifyingReader, check_bytes

log = logging.getLogger("banger.images.oci.layout")

REF_ANNOTATION = "org.opencontainers.image.ref.name"
_CHUNK = 1 << 20
_STALE_TEMP_SECONDS = 24 * 3600


@dataclass(frozen=True)
class CacheUsage:
    blobs: int
    bytes: int


class BlobWriter:
    """A blob on its way into the cache: write the bytes, then `commit` (verified rename) or `abort`."""

    def __init__(self, layout: OciLayout, digest: str, size: int) -> None:
        self.digest = digest
        self.size = size
        self.final = layout.blob_path(digest)
        fd, name = tempfile.mkstemp(prefix=f".tmp-{digest_hex(digest)[:16]}-", dir=self.final.parent)
        self.temp = Path(name)
        self.file: BinaryIO = os.fdopen(fd, "wb")
        self.done = False

    def commit(self, reader: VerifyingReader) -> Path:
        """Rename into place; `reader` must be the stream that fed `file` and must have verified."""
        if not reader.verified:
            raise BangerError(f"internal error: blob {self.digest} committed before it was verified")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.chmod(self.temp, 0o644)
        os.replace(self.temp, self.final)
        self.done = True
        return self.final

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        with contextlib.suppress(OSError):
            self.file.close()
        self.temp.unlink(missing_ok=True)


class OciLayout:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.lock_path = root.parent / f"{root.name}.lock"

    # ----------------------------------------------------------------------------------- setup

    def ensure(self) -> OciLayout:
        self.blobs.mkdir(parents=True, exist_ok=True)
        marker = self.root / "oci-layout"
        if not marker.exists():
            _write_atomic(marker, json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        if not (self.root / "index.json").exists():
            self._write_index([])
        self._sweep_temps()
        return self

    def _sweep_temps(self) -> None:
        # Left behind only by a crash (a failed pull removes its own); old ones are safe to delete.
        cutoff = time.time() - _STALE_TEMP_SECONDS
        for temp in self.blobs.glob(".tmp-*"):
            with contextlib.suppress(OSError):
                if temp.lstat().st_mtime < cutoff:
                    temp.unlink()

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Held (shared) for the duration of a pull so `prune` cannot pull the cache from under it."""
        self.root.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    # ----------------------------------------------------------------------------------- blobs

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest_hex(digest)

    def has_blob(self, desc: Descriptor) -> bool:
        try:
            info = self.blob_path(desc.digest).lstat()
        except FileNotFoundError:
            return False
        return info.st_size == desc.size and not os.path.islink(self.blob_path(desc.digest))

    def writer(self, desc: Descriptor) -> BlobWriter:
        return BlobWriter(self, desc.digest, desc.size)

    def put_bytes(self, digest: str, data: bytes, what: str) -> Path:
        """Store a small blob (manifest, config) after checking it against `digest`."""
        check_bytes(data, digest, None, what)
        path = self.blob_path(digest)
        if not path.exists():
            _write_atomic(path, data)
        return path

    def read_bytes(self, desc: Descriptor, what: str) -> bytes | None:
        """A cached small blob, verified; None if absent. A corrupt one is deleted and reported as absent."""
        path = self.blob_path(desc.digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return check_bytes(data, desc.digest, desc.size if desc.size >= 0 else None, what)
        except (DigestMismatch, SizeMismatch) as exc:
            log.warning("dropping corrupt cached blob %s: %s", path, exc)
            path.unlink(missing_ok=True)
            return None

    @contextlib.contextmanager
    def open_verified(self, desc: Descriptor, what: str) -> Iterator[VerifyingReader]:
        """A cached blob as a stream that checks its digest at the end; a mismatch deletes the blob."""
        path = self.blob_path(desc.digest)
        with path.open("rb") as handle:

            def chunks() -> Iterator[bytes]:
                while chunk := handle.read(_CHUNK):
                    yield chunk

            reader = VerifyingReader(chunks(), desc.digest, desc.size, what)
            try:
                yield reader
            except (DigestMismatch, SizeMismatch):
                log.warning("cached blob %s is corrupt; deleted", path)
                path.unlink(missing_ok=True)
                raise

    # ----------------------------------------------------------------------------------- index

    def _read_index(self) -> list[dict[str, Any]]:
        try:
            data = json.loads((self.root / "index.json").read_bytes())
        except FileNotFoundError:
            return []
        except ValueError as exc:
            log.warning("ignoring unreadable %s: %s", self.root / "index.json", exc)
            return []
        entries = data.get("manifests") if isinstance(data, dict) else None
        return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []

    def _write_index(self, entries: list[dict[str, Any]]) -> None:
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        _write_atomic(self.root / "index.json", json.dumps(doc, indent=2).encode() + b"\n")

    @contextlib.contextmanager
    def _index_lock(self) -> Iterator[None]:
        fd = os.open(self.root / ".index.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def record(self, ref_name: str, desc: Descriptor) -> None:
        """Point `ref_name` at `desc` in index.json (replacing what it pointed at before)."""
        entry = desc.to_json()
        entry["annotations"] = {**desc.annotations, REF_ANNOTATION: ref_name}
        with self._index_lock():
            entries = [e for e in self._read_index()
                       if (e.get("annotations") or {}).get(REF_ANNOTATION) != ref_name]
            entries.append(entry)
            self._write_index(entries)

    def lookup(self, ref_name: str) -> Descriptor | None:
        for entry in self._read_index():
            if (entry.get("annotations") or {}).get(REF_ANNOTATION) == ref_name:
                with contextlib.suppress(BangerError):
                    return parse_descriptor(entry, f"cached index entry for {ref_name}")
        return None

    # ----------------------------------------------------------------------------------- upkeep

    def usage(self) -> CacheUsage:
        count = total = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.blobs):
                if entry.is_file(follow_symlinks=False) and not entry.name.startswith("."):
                    count += 1
                    total += entry.stat(follow_symlinks=False).st_size
        return CacheUsage(count, total)

    def prune(self, *, dry_run: bool = False) -> CacheUsage:
        """Empty the cache (what `image cache prune` does); refused while a pull holds it."""
        usage = self.usage()
        if dry_run or not self.root.exists():
            return usage
        self.root.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BangerError(f"the OCI cache {self.root} is in use by a pull",
                                  hint="retry when the pull has finished") from None
            # Rename aside first: the cache is empty at once, and a crash mid-delete leaves only debris.
            aside = self.root.parent / f".pruning-{self.root.name}-{os.getpid()}-{time.monotonic_ns()}"
            os.rename(self.root, aside)
            self.ensure()
            shutil.rmtree(aside, ignore_errors=True)
        finally:
            os.close(fd)
        return usage


def _write_atomic(path: Path, data: bytes) -> None:
    fd, name = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(name, 0o644)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
