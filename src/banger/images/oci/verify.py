"""Content checked against its digest while it streams.

`VerifyingReader` wraps a source of chunks (a registry response, a cached blob) as a file object for
`flatten`, hashes and counts every byte as it passes, optionally copies it into a sink (the cache's
temporary file), and refuses the moment more bytes arrive than the descriptor announced. At the end
of the stream the size and the sha256 must match, or `DigestMismatch` is raised. Whoever consumes
the stream calls `finish()` afterwards: it drains what the consumer did not read (a tar reader stops
at the end-of-archive marker, before the padding) and makes sure the check ran.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from typing import BinaryIO

from banger.errors import BangerError


class DigestMismatch(BangerError):
    """Bytes that are not what their digest says; nothing built from them may be kept."""


class SizeMismatch(BangerError):
    """More or fewer bytes than the descriptor announced."""


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_bytes(data: bytes, digest: str, size: int | None, what: str) -> bytes:
    """`data` if it has `size` bytes (when given) and the sha256 `digest`; else the matching error."""
    if size is not None and len(data) != size:
        raise SizeMismatch(f"{what} is {len(data)} bytes, but its descriptor says {size}")
    actual = sha256_digest(data)
    if actual != digest:
        raise DigestMismatch(f"{what} does not match its digest: expected {digest}, got {actual}")
    return data


class VerifyingReader(io.RawIOBase):
    def __init__(self, chunks: Iterator[bytes], digest: str, size: int, what: str, *,
                 sink: BinaryIO | None = None, on_chunk: Callable[[int], None] | None = None) -> None:
        self._chunks = chunks
        self._digest = digest
        self._size = size
        self._what = what
        self._sink = sink
        self._on_chunk = on_chunk
        self._hash = hashlib.sha256()
        self._pending = memoryview(b"")
        self.received = 0
        self.verified = False

    def readable(self) -> bool:
        return True

    def _next(self) -> bool:
        """Pull one more chunk into `_pending`; False at the (checked) end of the stream."""
        for chunk in self._chunks:
            if not chunk:
                continue
            self.received += len(chunk)
            if self.received > self._size:
                raise SizeMismatch(f"{self._what} is larger than the {self._size} bytes its descriptor says; "
                                   "refusing the rest")
            self._hash.update(chunk)
            if self._sink is not None:
                self._sink.write(chunk)
            if self._on_chunk is not None:
                self._on_chunk(len(chunk))
            self._pending = memoryview(chunk)
            return True
        self._check()
        return False

    def _check(self) -> None:
        if self.verified:
            return
        if self.received != self._size:
            raise SizeMismatch(f"{self._what} ended after {self.received} of the {self._size} bytes its "
                               "descriptor says")
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self._digest:
            raise DigestMismatch(f"{self._what} does not match its digest: expected {self._digest}, got {actual}")
        self.verified = True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if not self._pending and not self._next():
            return 0
        view = memoryview(buffer)
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            parts = []
            while part := self.read(1 << 20):
                parts.append(part)
            return b"".join(parts)
        # Hand whole chunks through when the caller asks for at least that much: no extra copy.
        if not self._pending and not self._next():
            return b""
        if size >= len(self._pending):
            data = bytes(self._pending)
            self._pending = memoryview(b"")
            return data
        data = bytes(self._pending[:size])
        self._pending = self._pending[size:]
        return data

    def finish(self) -> None:
        """Consume whatever is left and raise unless the whole stream matched its digest."""
        self._pending = memoryview(b"")
        while self._next():
            self._pending = memoryview(b"")
