"""Tarball kernels from a local HTTP server: bounded, hash-checked before extraction, nothing left on failure."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger.errors import BangerError
from banger.kernels.tarball import pull_tarball_kernel
from tests.embedded import Embedded
from tests.tarballs import FAKE_VMLINUX, Entry, Served, good_kernel_entries, http_server, sha256, tar_zst

GOOD = tar_zst(good_kernel_entries())
CAP = 1 << 20


def _hostile(entries: list[Entry]) -> bytes:
    return tar_zst([Entry("vmlinux", data=FAKE_VMLINUX), *entries])


FILES = {
    "/good-amd64.tar.zst": Served(GOOD),
    "/truncated-amd64.tar.zst": Served(GOOD, send=len(GOOD) // 2),
    "/big-amd64.tar.zst": Served(b"\0" * (CAP + 10)),
    "/unannounced-amd64.tar.zst": Served(b"\0" * (CAP + 10), content_length=-1),
    "/traversal-amd64.tar.zst": Served(_hostile([Entry("../../escaped", data=b"x")])),
    "/symlink-amd64.tar.zst": Served(_hostile([Entry("modules", "dir"),
                                               Entry("modules/x", "symlink", target="../../../etc")])),
    "/extra-amd64.tar.zst": Served(_hostile([Entry("extra.txt", data=b"x")])),
    "/notelf-amd64.tar.zst": Served(tar_zst([Entry("vmlinux", data=b"MZ bzImage")])),
}


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with http_server(FILES) as url:
        yield url


def _pull(base_url: str, tmp_path: Path, file: str, *, digest: str | None = None, size: int | None = None) -> Path:
    body = FILES[f"/{file}"].body
    dest = tmp_path / "kernels" / "k"
    pull_tarball_kernel("k", f"{base_url}/{file}", digest or sha256(body), size or len(body), dest, CAP,
                        kernel_version="")
    return dest


def test_good_tarball(base_url: str, tmp_path: Path) -> None:
    dest = _pull(base_url, tmp_path, "good-amd64.tar.zst")
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["kernel_version"] == "6.1.99" and manifest["sha256"] == sha256(GOOD)
    assert (dest / "vmlinux").read_bytes() == FAKE_VMLINUX
    assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == ["k"]


BAD = [
    ("truncated-amd64.tar.zst", {}, r"without sending complete message body \(received \d+ bytes, expected \d+\)"),
    ("big-amd64.tar.zst", {}, f"is {CAP + 10} bytes, over the cap of {CAP} bytes"),
    ("unannounced-amd64.tar.zst", {"size": 100}, f"refused: the body exceeds the cap of {CAP} bytes"),
    ("good-amd64.tar.zst", {"digest": "0" * 64}, "sha256 mismatch: expected 0000"),
    ("traversal-amd64.tar.zst", {}, "entry '../../escaped' refused: '..' is not allowed"),
    ("symlink-amd64.tar.zst", {}, "symlink target '../../../etc' escapes modules/"),
    ("extra-amd64.tar.zst", {}, "entry 'extra.txt' refused: unexpected entry"),
    ("notelf-amd64.tar.zst", {}, "vmlinux is not an ELF image"),
]


@pytest.mark.parametrize(("file", "kw", "message"), BAD)
def test_bad_tarball_leaves_nothing(base_url: str, tmp_path: Path, file: str, kw: dict[str, object],
                                    message: str) -> None:
    with pytest.raises(BangerError, match=message) as caught:
        _pull(base_url, tmp_path, file, **kw)  # type: ignore[arg-type]
    assert "\n" not in caught.value.message
    assert list((tmp_path / "kernels").iterdir()) == []
    assert not (tmp_path / "escaped").exists()


def test_bad_pull_keeps_the_installed_kernel(base_url: str, tmp_path: Path) -> None:
    dest = _pull(base_url, tmp_path, "good-amd64.tar.zst")
    before = (dest / "manifest.json").read_text()
    with pytest.raises(BangerError):
        _pull(base_url, tmp_path, "notelf-amd64.tar.zst")
    assert (dest / "manifest.json").read_text() == before
    assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == ["k"]


# --- through the real daemon ---------------------------------------------------------------------


@pytest.fixture
def emb(base_url: str, tmp_path: Path) -> Iterator[Embedded]:
    if os.getuid() != 0:
        pytest.skip("embedded mode needs root")
    catalog = tmp_path / "kernels.json"
    entries = [
        {"kind": "tarball", "name": name, "url": f"{base_url}/{file}", "sha256": sha256(FILES[f"/{file}"].body),
         "size": len(FILES[f"/{file}"].body), "distro": "generic", "kernel_version": "6.1.99"}
        for name, file in (("test-good", "good-amd64.tar.zst"), ("test-extra", "extra-amd64.tar.zst"))
    ]
    catalog.write_text(json.dumps({"version": 1, "entries": entries}))
    e = Embedded()
    e.env["BANGER_KERNEL_CATALOG"] = str(catalog)
    try:
        yield e
    finally:
        e.close()


def test_kernel_pull_and_import_through_the_daemon(emb: Embedded, tmp_path: Path) -> None:
    available = json.loads(emb.run("kernel", "list", "--available", "--json", check=True).stdout)
    assert {"test-good", "test-extra"} <= {e["name"] for e in available}

    pulled = json.loads(emb.run("kernel", "pull", "test-good", "--json", check=True).stdout)
    kdir = emb.state_dir / "kernels" / "test-good"
    assert pulled["vmlinux_path"] == str(kdir / "vmlinux")
    assert pulled["initrd_path"] == str(kdir / "initrd.img") and pulled["modules_path"] == str(kdir / "modules")
    assert pulled["distro"] == "generic" and pulled["kernel_version"] == "6.1.99"
    assert json.loads((kdir / "manifest.json").read_text())["sha256"] == pulled["sha256"]

    bad = emb.run("kernel", "pull", "test-extra")
    assert bad.returncode != 0
    assert "entry 'extra.txt' refused: unexpected entry" in bad.stderr
    assert sorted(p.name for p in (emb.state_dir / "kernels").iterdir()) == ["test-good"]

    build = tmp_path / "build"
    (build / "modules").mkdir(parents=True)
    (build / "vmlinux").write_bytes(FAKE_VMLINUX)
    imported = json.loads(emb.run("kernel", "import", "mine", "--from", str(build), "--distro", "generic",
                                  "--kernel-version", "6.1.140", "--json", check=True).stdout)
    assert imported["source"] == f"import:{build}" and imported["initrd_path"] == ""
    shown = json.loads(emb.run("kernel", "show", "mine", "--json", check=True).stdout)
    assert shown["kernel_version"] == "6.1.140"

    (build / "vmlinux").write_bytes(b"MZ")
    refused = emb.run("kernel", "import", "mine2", "--from", str(build), "--distro", "generic",
                      "--kernel-version", "6.1.140")
    assert refused.returncode != 0
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "vmlinux is not an ELF image" in lines[0]
    assert not (emb.state_dir / "kernels" / "mine2").exists()


# --- image bundles ------------------------------------------------------------------------------------


def _rootfs_tar(path: Path) -> Path:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data, mode in (("etc/os-release", b"ID=debian\n", 0o644), ("root/.bashrc", b"PS1='$ '\n", 0o644),
                                 ("usr/bin/sudo", b"#!/bin/sh\n", 0o4755)):
            parent = ""
            for part in name.split("/")[:-1]:
                parent = f"{parent}{part}/"
                if parent.rstrip("/") not in tar.getnames():
                    info = tarfile.TarInfo(parent.rstrip("/"))
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return path


def test_make_bundle_then_pull_through_the_daemon(base_url: str, tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("embedded mode needs root")
    out = tmp_path / "dist"
    out.mkdir()
    e = Embedded()
    try:
        made = e.run("internal", "make-bundle", "--rootfs-tar", str(_rootfs_tar(tmp_path / "rootfs.tar")),
                     "--name", "test-img", "--distro", "debian", "--arch", "amd64", "--kernel-ref", "test-good",
                     "--size", "64M", "--out", str(out), "--json", check=True, timeout=300)
        info = json.loads(made.stdout)
        bundle = Path(info["path"])
        assert bundle.name == f"test-img-amd64-{info['sha256'][:12]}.tar.zst"
        assert bundle.stat().st_size == info["size"] and sha256(bundle.read_bytes()) == info["sha256"]
        assert sorted(p.name for p in out.iterdir()) == [bundle.name]

        body = bundle.read_bytes()
        extra = tar_zst([Entry("rootfs.ext4", data=b"x"), Entry("manifest.json", data=b"{}"),
                         Entry("evil.sh", data=b"x")])
        link = tar_zst([Entry("rootfs.ext4", "symlink", target="/etc/shadow"), Entry("manifest.json", data=b"{}")])
        files = {f"/{bundle.name}": Served(body), "/extra.tar.zst": Served(extra), "/link.tar.zst": Served(link)}
        with http_server(files) as url:
            def entry(name: str, path: str, data: bytes, digest: str | None = None) -> dict[str, object]:
                return {"kind": "bundle", "name": name, "url": f"{url}{path}", "sha256": digest or sha256(data),
                        "size": len(data), "kernel_ref": "test-good"}

            images = [entry("test-img", f"/{bundle.name}", body), entry("bad-extra", "/extra.tar.zst", extra),
                      entry("bad-link", "/link.tar.zst", link),
                      entry("bad-hash", f"/{bundle.name}", body, digest="f" * 64)]
            kernels = [{"kind": "tarball", "name": "test-good", "url": f"{base_url}/good-amd64.tar.zst",
                        "sha256": sha256(GOOD), "size": len(GOOD)}]
            (tmp_path / "images.json").write_text(json.dumps({"version": 1, "entries": images}))
            (tmp_path / "kernels.json").write_text(json.dumps({"version": 1, "entries": kernels}))
            e.env["BANGER_IMAGE_CATALOG"] = str(tmp_path / "images.json")
            e.env["BANGER_KERNEL_CATALOG"] = str(tmp_path / "kernels.json")

            for name, message in (("bad-extra", "entry 'evil.sh' refused: unexpected entry"),
                                  ("bad-link", "entry 'rootfs.ext4' refused: not a regular file"),
                                  ("bad-hash", "sha256 mismatch: expected ffff")):
                proc = e.run("image", "pull", name, timeout=120)
                assert proc.returncode != 0 and message in proc.stderr, proc.stderr
                assert [p.name for p in (e.state_dir / "images").iterdir()] == []

            pulled = json.loads(e.run("image", "pull", "test-img", "--json", check=True, timeout=300).stdout)
        shown = json.loads(e.run("image", "show", "test-img", "--json", check=True).stdout)
        assert shown["id"] == pulled["id"] and shown["kernel_ref"] == "test-good" and shown["managed"]
        assert shown["source"].startswith("bundle:http://127.0.0.1:")
        image_dir = e.state_dir / "images" / shown["id"]
        assert shown["rootfs_path"] == str(image_dir / "rootfs.ext4")
        assert shown["work_seed_path"] == str(image_dir / "work-seed.ext4")
        assert sorted(p.name for p in (e.state_dir / "images").iterdir()) == [shown["id"]]
        assert json.loads(e.run("kernel", "show", "test-good", "--json", check=True).stdout)["name"] == "test-good"

        from banger.images import ext4

        assert ext4.read_file(image_dir / "rootfs.ext4", "/etc/os-release") == b"ID=debian\n"
        sudo = ext4.stat(image_dir / "rootfs.ext4", "/usr/bin/sudo")
        assert sudo.mode & 0o7777 == 0o4755 and sudo.uid == 0
        assert ext4.read_file(image_dir / "work-seed.ext4", "/.bashrc") == b"PS1='$ '\n"
        assert ext4.stat(image_dir / "rootfs.ext4", "/usr/local/bin/banger-agent").mode & 0o111
    finally:
        e.close()
