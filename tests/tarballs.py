"""Building .tar.zst archives (good and hostile) and serving them from a local HTTP server, for tests."""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import zstandard

FAKE_VMLINUX = b"\x7fELF\x02\x01\x01" + b"\0" * 4089


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str = "file"  # file, dir, symlink, hardlink, fifo, chr
    data: bytes = b""
    target: str = ""
    mode: int = 0o644


def tar_zst(entries: Sequence[Entry]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.mode = e.mode
            if e.kind == "file":
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                         "fifo": tarfile.FIFOTYPE, "chr": tarfile.CHRTYPE}[e.kind]
            if e.kind == "dir":
                info.mode = 0o755
            info.linkname = e.target
            tar.addfile(info)
    return zstandard.ZstdCompressor(level=3).compress(raw.getvalue())


def good_kernel_entries() -> list[Entry]:
    return [
        Entry("vmlinux", data=FAKE_VMLINUX, mode=0o755),
        Entry("initrd.img", data=b"initrd-bytes"),
        Entry("modules", "dir"),
        Entry("modules/6.1.99", "dir"),
        Entry("modules/6.1.99/kernel", "dir"),
        Entry("modules/6.1.99/kernel/virtio_blk.ko", data=b"ko"),
        Entry("modules/6.1.99/modules.dep", data=b"kernel/virtio_blk.ko:\n"),
        Entry("modules/6.1.99/latest.ko", "symlink", target="kernel/virtio_blk.ko"),
    ]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Served:
    body: bytes
    # Overrides of what the server claims or sends: a Content-Length (-1: none), a cut-off body.
    content_length: int | None = None
    send: int | None = None


class _Handler(http.server.BaseHTTPRequestHandler):
    files: ClassVar[dict[str, Served]] = {}

    def do_GET(self) -> None:
        served = self.files.get(self.path)
        if served is None:
            self.send_error(404)
            return
        self.send_response(200)
        length = served.content_length if served.content_length is not None else len(served.body)
        if length >= 0:  # -1: no Content-Length, the body ends when the connection closes
            self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(served.body[: served.send] if served.send is not None else served.body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def http_server(files: dict[str, Served]) -> Iterator[str]:
    """Serve `files` (path -> Served) on 127.0.0.1; yields the base URL."""
    handler = type("Handler", (_Handler,), {"files": files})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
