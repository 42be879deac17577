"""Tarball kernel extraction and `kernel import` copying: only the expected entries, nothing escapes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from banger.errors import BangerError
from banger.kernels.tarball import copy_tree, extract_tarball, import_kernel
from tests.tarballs import FAKE_VMLINUX, Entry, good_kernel_entries, tar_zst

CAP = 1 << 20


def _archive(tmp_path: Path, entries: list[Entry]) -> Path:
    path = tmp_path / "k-amd64.tar.zst"
    path.write_bytes(tar_zst(entries))
    return path


def _extract(tmp_path: Path, entries: list[Entry]) -> Path:
    dest = tmp_path / "dest"
    dest.mkdir()
    extract_tarball(_archive(tmp_path, entries), dest, CAP)
    return dest


def test_good_tarball_extracts_everything(tmp_path: Path) -> None:
    dest = _extract(tmp_path, [Entry("./", "dir"), *good_kernel_entries()])
    assert (dest / "vmlinux").read_bytes() == FAKE_VMLINUX
    assert (dest / "vmlinux").stat().st_mode & 0o777 == 0o755
    assert (dest / "initrd.img").read_bytes() == b"initrd-bytes"
    link = dest / "modules/6.1.99/latest.ko"
    assert os.readlink(link) == "kernel/virtio_blk.ko" and link.read_bytes() == b"ko"


def test_vmlinux_alone_is_enough(tmp_path: Path) -> None:
    dest = _extract(tmp_path, [Entry("vmlinux", data=FAKE_VMLINUX)])
    assert sorted(p.name for p in dest.iterdir()) == ["vmlinux"]


HOSTILE = [
    ([Entry("../evil", data=b"x")], "entry '../evil' refused: '..' is not allowed"),
    ([Entry("/etc/evil", data=b"x")], "entry '/etc/evil' refused: absolute paths are not allowed"),
    ([Entry("modules", "dir"), Entry("modules/../../x", data=b"x")], "'..' is not allowed"),
    ([Entry("vmlinux", data=FAKE_VMLINUX), Entry("README", data=b"x")],
     "entry 'README' refused: unexpected entry (allowed: vmlinux, initrd.img, modules/)"),
    ([Entry("vmlinux", "symlink", target="/boot/vmlinuz")],
     "entry 'vmlinux' refused: vmlinux must be a regular file, not a symlink"),
    ([Entry("modules", "dir"), Entry("modules/x", "symlink", target="../../../etc/passwd")],
     "entry 'modules/x' refused: symlink target '../../../etc/passwd' escapes modules/"),
    ([Entry("modules", "dir"), Entry("modules/x", "symlink", target="../vmlinux")],
     "symlink target '../vmlinux' escapes modules/"),
    ([Entry("modules", "dir"), Entry("modules/x", "symlink", target="/lib/modules")],
     "symlink target '/lib/modules' must be a relative path"),
    # Absolute links are dropped only as modules/<version>/build or source, nowhere else.
    ([Entry("modules", "dir"), Entry("modules/build", "symlink", target="/usr/src/linux")],
     "entry 'modules/build' refused: symlink target '/usr/src/linux' must be a relative path (absolute "
     "links are dropped only as modules/<version>/build or source)"),
    ([Entry("modules/6.1.99/kernel", "dir"), Entry("modules/6.1.99/kernel/source", "symlink", target="/etc")],
     "entry 'modules/6.1.99/kernel/source' refused: symlink target '/etc' must be a relative path"),
    ([Entry("modules/6.1.99", "dir"), Entry("modules/6.1.99/builds", "symlink", target="/etc")],
     "entry 'modules/6.1.99/builds' refused: symlink target '/etc' must be a relative path"),
    ([Entry("modules/6.1.99", "dir"), Entry("modules/6.1.99/build", "symlink", target="/usr/src/x"),
      Entry("modules/6.1.99/build", "dir")], "entry 'modules/6.1.99/build' refused: duplicate entry"),
    ([Entry("modules", "dir"), Entry("modules/h", "hardlink", target="vmlinux")],
     "entry 'modules/h' refused: a hardlink is not allowed"),
    ([Entry("modules", "dir"), Entry("modules/f", "fifo")], "a fifo is not allowed"),
    ([Entry("modules", "dir"), Entry("modules/d", "chr")], "a device is not allowed"),
    ([Entry("vmlinux", data=b"MZ not an elf")], "vmlinux is not an ELF image"),
    ([Entry("initrd.img", data=b"x")], "no vmlinux in it"),
    ([Entry("vmlinux", data=FAKE_VMLINUX), Entry("vmlinux", data=FAKE_VMLINUX)], "duplicate entry"),
    # A symlink to a directory, then an entry written through it: refused, nothing written there.
    ([Entry("modules", "dir"), Entry("modules/l", "symlink", target="."), Entry("modules/l/x", data=b"x")],
     "entry 'modules/l/x' refused: its parent 'l' is not a directory"),
    # Lexically inside, physically outside: `s` is modules/ itself, so s/../x would be the kernel dir.
    ([Entry("vmlinux", data=FAKE_VMLINUX), Entry("modules", "dir"), Entry("modules/s", "symlink", target="."),
      Entry("modules/t", "symlink", target="s/s/../x")], "symlink resolves outside modules/"),
]


@pytest.mark.parametrize(("entries", "message"), HOSTILE)
def test_hostile_entries_are_refused(tmp_path: Path, entries: list[Entry], message: str) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(BangerError) as caught:
        extract_tarball(_archive(tmp_path, entries), dest, CAP)
    assert message in caught.value.message
    assert "\n" not in caught.value.message
    assert not (tmp_path / "evil").exists() and not Path("/etc/evil").exists()


def test_contents_over_the_cap_are_refused(tmp_path: Path) -> None:
    # A small archive that decompresses to more than the cap (a zstd bomb, in miniature).
    dest = tmp_path / "dest"
    dest.mkdir()
    archive = _archive(tmp_path, [Entry("vmlinux", data=FAKE_VMLINUX + b"\0" * (2 * CAP))])
    assert archive.stat().st_size < CAP
    with pytest.raises(BangerError, match="exceed the cap of 1048576 bytes"):
        extract_tarball(archive, dest, CAP)


def test_not_a_tarball(tmp_path: Path) -> None:
    archive = tmp_path / "k.tar.zst"
    archive.write_bytes(b"plain text, not zstd")
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(BangerError, match=r"^k.tar.zst: not a valid .tar.zst archive"):
        extract_tarball(archive, dest, CAP)


def _build_dir(root: Path) -> Path:
    src = root / "build"
    (src / "modules/6.1.99/kernel").mkdir(parents=True)
    (src / "vmlinux").write_bytes(FAKE_VMLINUX)
    (src / "initrd.img").write_bytes(b"initrd")
    (src / "System.map").write_text("ignored")
    (src / "modules/6.1.99/kernel/a.ko").write_bytes(b"ko")
    os.symlink("kernel/a.ko", src / "modules/6.1.99/a.ko")
    return src


def test_copy_tree_takes_the_kernel_files_only(tmp_path: Path) -> None:
    src = _build_dir(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    copy_tree(src, dest, CAP)
    assert sorted(p.name for p in dest.iterdir()) == ["initrd.img", "modules", "vmlinux"]
    assert os.readlink(dest / "modules/6.1.99/a.ko") == "kernel/a.ko"


def test_copy_tree_refuses_escaping_symlink_and_bzimage(tmp_path: Path) -> None:
    src = _build_dir(tmp_path)
    os.symlink("/usr/src/linux", src / "modules/6.1.99/kernel/build")  # not modules/<version>/build
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(BangerError, match="symlink target '/usr/src/linux' must be a relative path"):
        copy_tree(src, dest, CAP)
    (src / "modules/6.1.99/kernel/build").unlink()
    (src / "vmlinux").write_bytes(b"MZ bzImage")
    dest2 = tmp_path / "dest2"
    dest2.mkdir()
    with pytest.raises(BangerError, match="vmlinux is not an ELF image"):
        copy_tree(src, dest2, CAP)


def test_extra_catalog_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from banger.kernels import catalog

    entry = {"kind": "tarball", "name": "t1", "url": "http://127.0.0.1:9/t1-amd64.tar.zst", "sha256": "a" * 64,
             "size": 10}
    path = tmp_path / "extra.json"
    monkeypatch.setenv("BANGER_KERNEL_CATALOG", str(path))
    try:
        path.write_text(json.dumps({"version": 1, "entries": [entry]}))
        catalog.load_catalog.cache_clear()
        got = catalog.load_catalog().get("t1")
        assert isinstance(got, catalog.TarballKernel) and got.distro == "generic"
        assert catalog.load_catalog().get("debian-12-cloud").kind == "debian"

        path.write_text(json.dumps({"version": 1, "entries": [{**entry, "url": "http://example.com/t1.tar.zst"}]}))
        catalog.load_catalog.cache_clear()
        with pytest.raises(BangerError, match=r"must be an https:// URL"):
            catalog.load_catalog()

        path.write_text(json.dumps({"version": 1, "entries": [{**entry, "name": "debian-12-cloud"}]}))
        catalog.load_catalog.cache_clear()
        with pytest.raises(BangerError, match="entry 'debian-12-cloud' clashes with the embedded catalog"):
            catalog.load_catalog()
        # The embedded catalog alone never accepts plain http.
        with pytest.raises(BangerError, match=r"must be an https:// URL"):
            catalog.parse_catalog({"version": 1, "entries": [entry]})
    finally:
        catalog.load_catalog.cache_clear()


# --- build/source links of a real modules_install, through the real tar and zstd -----------------------------


def _modules_install_tree(root: Path, headers: Path) -> Path:
    """What `make modules_install` (or a distribution package) leaves: build/source link out of the tree."""
    src = _build_dir(root)
    os.symlink(headers, src / "modules/6.1.99/build")  # absolute, and the target exists on this host
    os.symlink("/usr/src/linux-source-6.1.99", src / "modules/6.1.99/source")  # absolute, dangling
    (src / "modules/6.2.0/kernel").mkdir(parents=True)
    (src / "modules/6.2.0/kernel/b.ko").write_bytes(b"kob")
    os.symlink("../../../../usr/src/linux-headers-6.2.0", src / "modules/6.2.0/build")  # relative, escaping
    return src


def _headers(root: Path) -> tuple[Path, dict[str, bytes]]:
    headers = root / "usr-src-linux-headers-6.1.99"
    (headers / "include").mkdir(parents=True)
    (headers / "Makefile").write_bytes(b"# the host's headers\n")
    (headers / "include/secret.h").write_bytes(b"#define HOST 1\n")
    return headers, {p.relative_to(headers).as_posix(): p.read_bytes() for p in headers.rglob("*") if p.is_file()}


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


EXPECTED = {"vmlinux", "initrd.img", "modules", "modules/6.1.99", "modules/6.1.99/kernel",
            "modules/6.1.99/kernel/a.ko", "modules/6.1.99/a.ko", "modules/6.2.0", "modules/6.2.0/kernel",
            "modules/6.2.0/kernel/b.ko"}


@pytest.mark.skipif(shutil.which("tar") is None or shutil.which("zstd") is None, reason="needs tar and zstd")
def test_real_tarball_drops_build_and_source_links(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    headers, before = _headers(tmp_path)
    src = _modules_install_tree(tmp_path, headers)
    archive = tmp_path / "k-amd64.tar.zst"
    subprocess.run(["tar", "--zstd", "-cf", str(archive), "-C", str(src), "vmlinux", "initrd.img", "modules"],
                   check=True)
    listing = subprocess.run(["tar", "--zstd", "-tvf", str(archive)], capture_output=True, text=True,
                             check=True).stdout
    assert f"modules/6.1.99/build -> {headers}" in listing  # the archive really holds the absolute link

    dest = tmp_path / "dest"
    dest.mkdir()
    caplog.set_level("INFO", logger="banger.kernels.tarball")
    extract_tarball(archive, dest, CAP)
    assert _files(dest) == EXPECTED
    for name in ("modules/6.1.99/build", "modules/6.1.99/source", "modules/6.2.0/build"):
        assert not os.path.lexists(dest / name), name
    assert os.readlink(dest / "modules/6.1.99/a.ko") == "kernel/a.ko"
    assert "dropping modules/6.1.99/build -> " + str(headers) in caplog.text
    # Never followed: the host's headers are untouched and none of their contents came along.
    assert {p.relative_to(headers).as_posix(): p.read_bytes() for p in headers.rglob("*") if p.is_file()} == before


def test_kernel_import_drops_build_and_source_links(tmp_path: Path) -> None:
    headers, before = _headers(tmp_path)
    src = _modules_install_tree(tmp_path, headers)
    dest = tmp_path / "kernels" / "mine"
    installed = import_kernel("mine", src, dest, distro="custom", arch="amd64", kernel_version="6.1.99",
                              max_bytes=CAP)
    assert _files(dest) == EXPECTED | {"manifest.json"}
    assert installed.modules == dest / "modules"
    assert not os.path.lexists(dest / "modules/6.1.99/build")
    assert {p.relative_to(headers).as_posix(): p.read_bytes() for p in headers.rglob("*") if p.is_file()} == before
