"""Image bundle extraction: exactly rootfs.ext4 and manifest.json, regular files only, written sparse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from banger.errors import BangerError
from banger.images.bundle import extract_bundle
from tests.tarballs import Entry, tar_zst

CAP = 32 << 20


def fake_ext4(size: int = 16 << 20) -> bytes:
    data = bytearray(size)
    data[1080:1082] = b"\x53\xef"
    data[-4:] = b"tail"
    return bytes(data)


MANIFEST = json.dumps({"name": "t", "distro": "debian", "arch": "amd64", "kernel_ref": "k"}).encode()


def _extract(tmp_path: Path, entries: list[Entry]) -> tuple[Path, dict[str, object]]:
    archive = tmp_path / "t-amd64-0123456789ab.tar.zst"
    archive.write_bytes(tar_zst(entries))
    dest = tmp_path / "dest"
    dest.mkdir()
    return dest, extract_bundle(archive, dest, CAP)


def test_good_bundle_is_extracted_sparse(tmp_path: Path) -> None:
    rootfs = fake_ext4()
    dest, manifest = _extract(tmp_path, [Entry("./", "dir"), Entry("./rootfs.ext4", data=rootfs),
                                         Entry("manifest.json", data=MANIFEST)])
    assert manifest["kernel_ref"] == "k"
    assert (dest / "rootfs.ext4").read_bytes() == rootfs
    # Mostly zeros: holes, not written blocks.
    assert (dest / "rootfs.ext4").stat().st_blocks * 512 < len(rootfs) // 2


BAD = [
    ([Entry("rootfs.ext4", data=fake_ext4()), Entry("manifest.json", data=MANIFEST), Entry("extra", data=b"x")],
     "entry 'extra' refused: unexpected entry (a bundle holds exactly rootfs.ext4 and manifest.json)"),
    ([Entry("rootfs.ext4", "symlink", target="/etc/shadow"), Entry("manifest.json", data=MANIFEST)],
     "entry 'rootfs.ext4' refused: not a regular file"),
    ([Entry("../rootfs.ext4", data=fake_ext4())], "entry '../rootfs.ext4' refused: unexpected entry"),
    ([Entry("rootfs.ext4", data=fake_ext4()), Entry("rootfs.ext4", data=fake_ext4())], "duplicate entry"),
    ([Entry("rootfs.ext4", data=fake_ext4())], "missing manifest.json"),
    ([Entry("rootfs.ext4", data=b"\0" * 4096), Entry("manifest.json", data=MANIFEST)],
     "rootfs.ext4 is not an ext4 image"),
    ([Entry("rootfs.ext4", data=fake_ext4()), Entry("manifest.json", data=b"[1]")],
     "manifest.json must be a JSON object"),
    ([Entry("rootfs.ext4", data=fake_ext4(CAP + 4096)), Entry("manifest.json", data=MANIFEST)],
     f"rootfs.ext4: refused: the contents exceed the cap of {CAP} bytes"),
]


@pytest.mark.parametrize(("entries", "message"), BAD)
def test_bad_bundles(tmp_path: Path, entries: list[Entry], message: str) -> None:
    with pytest.raises(BangerError) as caught:
        _extract(tmp_path, entries)
    assert message in caught.value.message
    assert "\n" not in caught.value.message
    assert not (tmp_path / "rootfs.ext4").exists()


def test_extra_image_catalog_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from banger.images import catalog

    entry = {"kind": "bundle", "name": "t-img", "url": "http://127.0.0.1:9/t-amd64-0123.tar.zst",
             "sha256": "a" * 64, "size": 10, "kernel_ref": "debian-12-cloud"}
    path = tmp_path / "images.json"
    monkeypatch.setenv("BANGER_IMAGE_CATALOG", str(path))
    try:
        path.write_text(json.dumps({"version": 1, "entries": [entry]}))
        catalog.load_catalog.cache_clear()
        assert isinstance(catalog.load_catalog().get("t-img"), catalog.BundleImage)
        assert "debian-bookworm" in catalog.load_catalog().names()

        path.write_text(json.dumps({"version": 1, "entries": [{**entry, "kernel_ref": "nope"}]}))
        catalog.load_catalog.cache_clear()
        with pytest.raises(BangerError, match="kernel_ref 'nope' is not in the kernel catalog"):
            catalog.load_catalog()

        path.write_text(json.dumps({"version": 1, "entries": [{**entry, "url": "http://example.com/x.tar.zst"}]}))
        catalog.load_catalog.cache_clear()
        with pytest.raises(BangerError, match="must be an https:// URL"):
            catalog.load_catalog()
    finally:
        catalog.load_catalog.cache_clear()


def test_staged_stdin_is_removed_afterwards(tmp_path: Path) -> None:
    import io

    from banger.images.bundle import staged_stdin

    with staged_stdin(io.BytesIO(b"tar bytes"), tmp_path) as path:
        assert path.parent == tmp_path and path.read_bytes() == b"tar bytes"
    assert list(tmp_path.iterdir()) == []
