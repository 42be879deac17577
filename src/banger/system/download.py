"""Bounded, verified downloads into a directory.

`fetch_to` streams a URL into a temporary file *inside* the destination directory (so the final rename
is atomic and never crosses a filesystem), hashing as it goes. It stops as soon as more than `max_bytes`
arrive, checks the declared size and sha256, and only then renames the file to its final name. Any
failure, including Ctrl-C or a cancelled task, removes the partial file: a half-written download never
looks like a finished one.

`file://` URLs take the same path (for tests and local mirrors).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from banger.errors import BadRequest, BangerError

log = logging.getLogger("banger.download")

Progress = Callable[[int, int | None], None]

_CHUNK = 1 << 16


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
_SCHEMES = ("http", "https", "file")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _final_name(url: str) -> str:
    """The last path segment of the URL: the name the finished file gets in `dest_dir`."""
    name = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    if not name or name in (".", "..") or "/" in name or "\0" in name or name.startswith("."):
        raise BadRequest(f"cannot derive a file name from URL {url!r} (its path must end in a file name)")
    return name


def _open_file_url(url: str) -> tuple[Iterator[bytes], int | None, Callable[[], None]]:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise BadRequest(f"file URL {url!r} names host {parts.netloc!r}; only local files are allowed")
    path = Path(unquote(parts.path))
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise BangerError(f"cannot read {url}: {exc.strerror or exc}") from exc
    length = os.fstat(handle.fileno()).st_size

    def chunks() -> Iterator[bytes]:
        while chunk := handle.read(_CHUNK):
            yield chunk

    return chunks(), length, handle.close


def fetch_to(
    url: str,
    dest_dir: Path,
    *,
    max_bytes: int,
    sha256: str | None = None,
    size: int | None = None,
    timeout: float = 60,
    progress: Progress | None = None,
) -> Path:
    """Download `url` into `dest_dir` under its own file name and return the final path.

    Refuses more than `max_bytes`, a length other than `size` and a digest other than `sha256` (hex).
    Nothing is left behind in `dest_dir` unless the download succeeded completely.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme not in _SCHEMES:
        raise BadRequest(f"URL {url!r} has scheme {scheme!r}; allowed: {', '.join(_SCHEMES)}")
    if max_bytes <= 0:
        raise BadRequest(f"max_bytes must be positive, not {max_bytes}")
    expected_digest = sha256.lower() if sha256 is not None else None
    if expected_digest is not None and (
        len(expected_digest) != 64 or any(c not in "0123456789abcdef" for c in expected_digest)
    ):
        raise BadRequest(f"expected sha256 {sha256!r} is not 64 hex digits")
    if size is not None and size > max_bytes:
        raise BangerError(f"{url} is {size} bytes, over the cap of {max_bytes} bytes")
    final = dest_dir / _final_name(url)

    try:
        fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{final.name}.", suffix=".part")
    except OSError as exc:
        raise BangerError(f"cannot create a download file in {dest_dir}: {exc.strerror or exc}") from exc
    tmp = Path(tmp_name)
    done = False
    try:
        with os.fdopen(fd, "wb") as out:
            if scheme == "file":
                chunks, length, close = _open_file_url(url)
                try:
                    received, digest = _copy(url, chunks, length, out, max_bytes, size, progress)
                finally:
                    close()
            else:
                received, digest = _fetch_http(url, out, max_bytes, size, timeout, progress)
            out.flush()
            os.fsync(out.fileno())
        if size is not None and received != size:
            raise BangerError(f"{url}: received {received} bytes, expected {size}")
        if expected_digest is not None and digest != expected_digest:
            raise BangerError(f"{url}: sha256 mismatch: expected {expected_digest}, got {digest}")
        os.replace(tmp, final)
        done = True
    except OSError as exc:
        raise BangerError(f"download of {url} into {dest_dir} failed: {exc.strerror or exc}") from exc
    finally:
        # `finally`, not `except Exception`: KeyboardInterrupt or a cancelled task must not leave a
        # partial file that a later run could mistake for a finished one.
        if not done:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    log.debug("downloaded %s -> %s (%d bytes)", url, final, received)
    return final


def _fetch_http(
    url: str, out: BinaryIO, max_bytes: int, size: int | None, timeout: float, progress: Progress | None
) -> tuple[int, str]:
    import httpx

    try:
        with (
            httpx.Client(timeout=timeout, follow_redirects=True) as client,
            client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as resp,
        ):
            if resp.status_code != 200:
                reason = resp.reason_phrase or ""
                raise BangerError(f"GET {url} failed: HTTP {resp.status_code} {reason}".rstrip())
            length: int | None = None
            header = resp.headers.get("content-length")
            if header is not None and resp.headers.get("content-encoding", "identity") == "identity":
                try:
                    length = int(header)
                except ValueError:
                    length = None
            return _copy(url, resp.iter_bytes(_CHUNK), length, out, max_bytes, size, progress)
    except httpx.HTTPError as exc:
        raise BangerError(f"GET {url} failed: {_one_line(exc) or type(exc).__name__}") from exc


def _copy(
    url: str,
    chunks: Iterator[bytes],
    length: int | None,
    out: BinaryIO,
    max_bytes: int,
    size: int | None,
    progress: Progress | None,
) -> tuple[int, str]:
    """Stream `chunks` into `out`, hashing and enforcing the caps; returns (bytes, sha256 hex)."""
    if length is not None:
        # Refuse up front what the server announces; the running count below still guards liars.
        if length > max_bytes:
            raise BangerError(f"{url} is {length} bytes, over the cap of {max_bytes} bytes")
        if size is not None and length != size:
            raise BangerError(f"{url}: server announces {length} bytes, expected {size}")
    write = out.write
    hasher = hashlib.sha256()
    received = 0
    total = size if size is not None else length
    for chunk in chunks:
        received += len(chunk)
        if received > max_bytes:
            raise BangerError(f"{url}: refused: the body exceeds the cap of {max_bytes} bytes")
        hasher.update(chunk)
        write(chunk)
        if progress is not None:
            progress(received, total)
    if length is not None and received != length:
        raise BangerError(f"{url}: truncated: received {received} of {length} bytes")
    return received, hasher.hexdigest()
