"""The blob cache (an OCI image layout) and the digest-checking stream everything passes through."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from pathlib import Path

import pytest

from banger.errors import BangerError
from banger.images.oci.layout import REF_ANNOTATION, OciLayout
from banger.images.oci.manifest import OCI_MANIFEST, Descriptor
from banger.images.oci.verify import DigestMismatch, SizeMismatch, VerifyingReader


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chunks(data: bytes, size: int = 3) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


# --------------------------------------------------------------------------------------- the stream


def test_reader_passes_verified_bytes() -> None:
    data = b"hello, layer" * 10
    seen: list[int] = []
    sink = open(os.devnull, "wb")  # noqa: SIM115 - closed below
    reader = VerifyingReader(iter(chunks(data)), digest(data), len(data), "blob", sink=sink, on_chunk=seen.append)
    assert reader.read(5) == b"hel"  # never more than one chunk per read: no copies
    assert reader.read(-1) == data[3:]
    reader.finish()
    sink.close()
    assert reader.verified and reader.received == len(data) and sum(seen) == len(data)


def test_reader_finish_drains_what_the_consumer_left() -> None:
    data = b"x" * 100
    reader = VerifyingReader(iter(chunks(data, 10)), digest(data), len(data), "blob")
    reader.read(4)
    assert not reader.verified
    reader.finish()
    assert reader.verified


def test_reader_digest_mismatch() -> None:
    data = b"tampered"
    reader = VerifyingReader(iter([data]), digest(b"original"), len(data), "layer 2 of x")
    with pytest.raises(DigestMismatch) as info:
        reader.finish()
    assert info.value.message == (f"layer 2 of x does not match its digest: expected {digest(b'original')}, "
                                  f"got {digest(data)}")


def test_reader_refuses_more_than_announced_at_once() -> None:
    pulled: list[int] = []

    def source() -> object:
        for i in range(1000):
            pulled.append(i)
            yield b"y" * 10

    reader = VerifyingReader(source(), digest(b""), 25, "blob")  # type: ignore[arg-type]
    with pytest.raises(SizeMismatch, match="blob is larger than the 25 bytes its descriptor says; refusing the rest"):
        reader.read(-1)
    assert len(pulled) == 3  # stopped at the first chunk over the size, not at the end of the stream


def test_reader_truncated() -> None:
    reader = VerifyingReader(iter([b"abc"]), digest(b"abcdef"), 6, "blob")
    with pytest.raises(SizeMismatch, match="blob ended after 3 of the 6 bytes its descriptor says"):
        reader.finish()


# ---------------------------------------------------------------------------------------- the cache


def test_layout_files(tmp_path: Path) -> None:
    layout = OciLayout(tmp_path / "oci").ensure()
    assert json.loads((tmp_path / "oci/oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert json.loads((tmp_path / "oci/index.json").read_text())["manifests"] == []
    body = b'{"schemaVersion": 2}'
    layout.put_bytes(digest(body), body, "manifest")
    desc = Descriptor(OCI_MANIFEST, digest(body), len(body))
    assert layout.read_bytes(desc, "manifest") == body
    layout.record("127.0.0.1:5000/a/b:v1", desc)
    layout.record("127.0.0.1:5000/a/b:v1", desc)  # re-pulling replaces, not appends
    layout.record("127.0.0.1:5000/a/b:v2", desc)
    index = json.loads((tmp_path / "oci/index.json").read_text())
    assert [m["annotations"][REF_ANNOTATION] for m in index["manifests"]] == ["127.0.0.1:5000/a/b:v1",
                                                                              "127.0.0.1:5000/a/b:v2"]
    assert layout.lookup("127.0.0.1:5000/a/b:v2") == Descriptor(OCI_MANIFEST, digest(body), len(body),
                                                                annotations={REF_ANNOTATION: "127.0.0.1:5000/a/b:v2"})
    assert layout.lookup("nope") is None


def test_put_bytes_refuses_a_lie(tmp_path: Path) -> None:
    layout = OciLayout(tmp_path / "oci").ensure()
    with pytest.raises(DigestMismatch):
        layout.put_bytes(digest(b"a"), b"b", "config")
    assert list(layout.blobs.iterdir()) == []


def test_corrupt_cached_blob_is_dropped(tmp_path: Path) -> None:
    layout = OciLayout(tmp_path / "oci").ensure()
    body = b"config bytes"
    path = layout.put_bytes(digest(body), body, "config")
    path.write_bytes(b"config bytez")  # same size, different bytes
    assert layout.read_bytes(Descriptor("x", digest(body), len(body)), "config") is None
    assert not path.exists()


def test_writer_commits_only_verified(tmp_path: Path) -> None:
    layout = OciLayout(tmp_path / "oci").ensure()
    data = b"layer" * 1000
    desc = Descriptor("l", digest(data), len(data))
    writer = layout.writer(desc)
    reader = VerifyingReader(iter(chunks(data, 100)), desc.digest, desc.size, "layer", sink=writer.file)
    with pytest.raises(BangerError, match="committed before it was verified"):
        writer.commit(reader)
    reader.finish()
    writer.commit(reader)
    assert layout.blob_path(desc.digest).read_bytes() == data
    assert layout.has_blob(desc)
    assert [p.name for p in layout.blobs.iterdir()] == [desc.digest[7:]]

    bad = layout.writer(Descriptor("l", digest(b"other"), 5))
    bad.file.write(b"wrong")
    bad.abort()
    assert [p.name for p in layout.blobs.iterdir()] == [desc.digest[7:]]  # no temporary file left


def _hold_cache(root: str, ready: object, release: object) -> None:
    layout = OciLayout(Path(root))
    with layout.in_use():
        ready.set()  # type: ignore[attr-defined]
        release.wait(10)  # type: ignore[attr-defined]


def test_prune(tmp_path: Path) -> None:
    layout = OciLayout(tmp_path / "oci").ensure()
    for body in (b"a" * 10, b"b" * 20):
        layout.put_bytes(digest(body), body, "blob")
    assert layout.prune(dry_run=True).bytes == 30
    assert len(list(layout.blobs.iterdir())) == 2

    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_cache, args=(str(layout.root), ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(BangerError, match="is in use by a pull"):
            layout.prune()
        assert len(list(layout.blobs.iterdir())) == 2
    finally:
        release.set()
        holder.join(10)

    usage = layout.prune()
    assert (usage.blobs, usage.bytes) == (2, 30)
    assert list(layout.blobs.iterdir()) == []
    assert (layout.root / "oci-layout").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruning-")]
    assert OciLayout(tmp_path / "missing").prune().blobs == 0
