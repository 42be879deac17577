"""fetch_to against a real HTTP server on 127.0.0.1: caps, digests, truncation, HTTP errors, cleanup."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from banger.errors import BadRequest, BangerError
from banger.system.download import fetch_to

BODY = bytes(range(256)) * 1024  # 256 KiB, several chunks
BODY_SHA = hashlib.sha256(BODY).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/files/blob.bin":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)
        elif self.path == "/unannounced/blob.bin":
            # No Content-Length: the body ends when the connection closes (HTTP/1.0), so only the
            # running byte count can enforce the cap.
            self.send_response(200)
            self.end_headers()
            self.wfile.write(BODY)
            self.close_connection = True
        elif self.path == "/truncated/blob.bin":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY) + 1000))
            self.end_headers()
            self.wfile.write(BODY)
            self.wfile.flush()
            self.close_connection = True
        else:
            self.send_error(404, "Not Found")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _assert_one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


def test_ok_with_hash_size_and_progress(server: str, tmp_path: Path) -> None:
    seen: list[tuple[int, int | None]] = []
    path = fetch_to(
        f"{server}/files/blob.bin",
        tmp_path,
        max_bytes=len(BODY),
        sha256=BODY_SHA,
        size=len(BODY),
        progress=lambda got, total: seen.append((got, total)),
    )
    assert path == tmp_path / "blob.bin"
    assert path.read_bytes() == BODY
    assert list(tmp_path.iterdir()) == [path]
    assert seen[-1] == (len(BODY), len(BODY))
    assert [got for got, _ in seen] == sorted(got for got, _ in seen)


def test_uppercase_digest_is_accepted(server: str, tmp_path: Path) -> None:
    path = fetch_to(f"{server}/files/blob.bin", tmp_path, max_bytes=len(BODY), sha256=BODY_SHA.upper())
    assert path.read_bytes() == BODY


def test_wrong_hash_names_both_digests_and_leaves_nothing(server: str, tmp_path: Path) -> None:
    wrong = "0" * 64
    with pytest.raises(BangerError) as info:
        fetch_to(f"{server}/files/blob.bin", tmp_path, max_bytes=len(BODY), sha256=wrong)
    text = _assert_one_line(info.value)
    assert wrong in text and BODY_SHA in text and "sha256 mismatch" in text
    assert list(tmp_path.iterdir()) == []


def test_announced_oversize_refused(server: str, tmp_path: Path) -> None:
    with pytest.raises(BangerError) as info:
        fetch_to(f"{server}/files/blob.bin", tmp_path, max_bytes=len(BODY) - 1)
    text = _assert_one_line(info.value)
    assert f"cap of {len(BODY) - 1} bytes" in text
    assert list(tmp_path.iterdir()) == []


def test_unannounced_oversize_stops_at_the_cap(server: str, tmp_path: Path) -> None:
    cap = 100_000
    got: list[int] = []
    with pytest.raises(BangerError) as info:
        fetch_to(
            f"{server}/unannounced/blob.bin", tmp_path, max_bytes=cap, progress=lambda n, _t: got.append(n)
        )
    text = _assert_one_line(info.value)
    assert f"exceeds the cap of {cap} bytes" in text
    assert max(got, default=0) <= cap  # nothing past the cap was accepted
    assert list(tmp_path.iterdir()) == []


def test_unannounced_within_cap_is_fine(server: str, tmp_path: Path) -> None:
    path = fetch_to(f"{server}/unannounced/blob.bin", tmp_path, max_bytes=len(BODY), sha256=BODY_SHA)
    assert path.read_bytes() == BODY


def test_truncated_body_refused(server: str, tmp_path: Path) -> None:
    with pytest.raises(BangerError) as info:
        fetch_to(f"{server}/truncated/blob.bin", tmp_path, max_bytes=10 * len(BODY))
    text = _assert_one_line(info.value)
    assert f"{server}/truncated/blob.bin" in text
    assert list(tmp_path.iterdir()) == []


def test_declared_size_mismatch_refused(server: str, tmp_path: Path) -> None:
    with pytest.raises(BangerError) as info:
        fetch_to(f"{server}/files/blob.bin", tmp_path, max_bytes=10 * len(BODY), size=len(BODY) + 1)
    text = _assert_one_line(info.value)
    assert str(len(BODY)) in text and str(len(BODY) + 1) in text
    assert list(tmp_path.iterdir()) == []


def test_declared_size_mismatch_without_content_length(server: str, tmp_path: Path) -> None:
    with pytest.raises(BangerError, match=f"received {len(BODY)} bytes, expected {len(BODY) - 5}"):
        fetch_to(f"{server}/unannounced/blob.bin", tmp_path, max_bytes=10 * len(BODY), size=len(BODY) - 5)
    assert list(tmp_path.iterdir()) == []


def test_404_is_one_line_with_status_and_url(server: str, tmp_path: Path) -> None:
    url = f"{server}/missing/blob.bin"
    with pytest.raises(BangerError) as info:
        fetch_to(url, tmp_path, max_bytes=1000)
    text = _assert_one_line(info.value)
    assert "404" in text and url in text
    assert list(tmp_path.iterdir()) == []


def test_connection_refused_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(BangerError) as info:
        fetch_to("http://127.0.0.1:9/x.bin", tmp_path, max_bytes=1000, timeout=5)
    _assert_one_line(info.value)
    assert list(tmp_path.iterdir()) == []


def test_interrupt_removes_partial_file(server: str, tmp_path: Path) -> None:
    def interrupt(got: int, total: int | None) -> None:
        if got > 50_000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fetch_to(f"{server}/files/blob.bin", tmp_path, max_bytes=len(BODY), progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_replaced_only_on_success(server: str, tmp_path: Path) -> None:
    old = tmp_path / "blob.bin"
    old.write_bytes(b"old")
    with pytest.raises(BangerError):
        fetch_to(f"{server}/files/blob.bin", tmp_path, max_bytes=len(BODY), sha256="1" * 64)
    assert old.read_bytes() == b"old"
    fetch_to(f"{server}/files/blob.bin", tmp_path, max_bytes=len(BODY), sha256=BODY_SHA)
    assert old.read_bytes() == BODY
    assert list(tmp_path.iterdir()) == [old]


def test_file_url(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "blob.bin").write_bytes(BODY)
    dest = tmp_path / "dest"
    dest.mkdir()
    path = fetch_to((src / "blob.bin").as_uri(), dest, max_bytes=len(BODY), sha256=BODY_SHA, size=len(BODY))
    assert path.read_bytes() == BODY
    with pytest.raises(BangerError, match="cap"):
        fetch_to((src / "blob.bin").as_uri(), dest, max_bytes=10)
    with pytest.raises(BangerError, match="sha256 mismatch"):
        fetch_to((src / "blob.bin").as_uri(), dest, max_bytes=len(BODY), sha256="2" * 64)
    with pytest.raises(BangerError, match="cannot read"):
        fetch_to((src / "nope.bin").as_uri(), dest, max_bytes=len(BODY))
    assert list(dest.iterdir()) == [path]


@pytest.mark.parametrize(
    ("url", "kwargs", "message"),
    [
        ("ftp://example.org/x.bin", {}, "scheme 'ftp'"),
        ("http://127.0.0.1/", {}, "file name"),
        ("http://127.0.0.1/x.bin", {"sha256": "abc"}, "64 hex digits"),
        ("http://127.0.0.1/x.bin", {"size": 2000}, "over the cap"),
    ],
)
def test_bad_arguments(tmp_path: Path, url: str, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(BangerError, match=message):
        fetch_to(url, tmp_path, max_bytes=1000, **kwargs)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_bad_scheme_is_bad_request(tmp_path: Path) -> None:
    with pytest.raises(BadRequest):
        fetch_to("gopher://x/y", tmp_path, max_bytes=1)
