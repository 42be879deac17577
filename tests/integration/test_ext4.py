"""Layers -> staging dir -> ext4 image with exact owners, using the real mkfs.ext4/debugfs/e2fsck.

No mounts, no loop devices; the last tests repeat the build as an unprivileged user to prove that.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger.errors import BadRequest, BangerError, NotFound
from banger.images import ext4
from banger.images.ext4 import FileMeta, apply_metadata, build_ext4, inode_info, read_file, stat
from banger.images.flatten import flatten_layers
from banger.images.inject import GuestFile, inject
from tests.unit.test_flatten import E, tar_bytes

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t, path="/usr/sbin:/sbin:/usr/bin:/bin") for t in ("mkfs.ext4", "debugfs", "e2fsck")),
    reason="e2fsprogs not installed",
)

SRC = Path(__file__).resolve().parents[2] / "src"
LONG_TARGET = "/usr/lib/x86_64-linux-gnu/" + "very-long-directory-name/" * 4 + "libsomething.so.1"
GIB = 1 << 30


def rootfs_layers() -> list[tuple[str, io.BytesIO]]:
    base = tar_bytes(
        E("./", "dir", mode=0o755),
        E("etc", "dir", mode=0o755),
        E("etc/shadow", data=b"root:*:19000:0:99999:7:::\n", mode=0o640, uid=0, gid=42),
        E("etc/with space", data=b"spaces are fine\n"),
        E("etc/café", data=b"utf-8 is fine\n", mode=0o600, uid=7, gid=8),
        E("usr/share/a b/c d", data=b"x", mode=0o664, uid=3, gid=4),
        E("usr/bin/sudo", data=b"\x7fELF sudo", mode=0o4755),
        E("usr/bin/perl", data=b"\x7fELF perl", mode=0o755),
        E("usr/bin/perl5.36", "hardlink", target="usr/bin/perl", mode=0o755),
        E("usr/bin/vi", "symlink", target="/usr/bin/vim.tiny"),
        E("usr/lib/libslow.so", "symlink", target=LONG_TARGET),
        E("bin", "symlink", target="usr/bin"),
        E("tmp", "dir", mode=0o1777),
        E("home/u", "dir", mode=0o700, uid=1000, gid=1000),
        E("home/u/notes", data=b"mine\n", mode=0o600, uid=1000, gid=1000),
        E("root", "dir", mode=0o700),
        E("root/.ssh", "dir", mode=0o700),
        E("root/.ssh/authorized_keys", data=b"ssh-ed25519 AAAA test\n", mode=0o600),
        E("root/.bashrc", data=b"PS1='# '\n", mode=0o644),
        E("dev/null", "chr", mode=0o666),
    )
    top = tar_bytes(E("etc/.wh.with space"), E("etc/motd", data=b"hello\n", mode=0o644), compress="zstd")
    return [("sha256:" + "11" * 32, io.BytesIO(base)), ("sha256:" + "22" * 32, io.BytesIO(top))]


def sparse_copy(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


def fsck_clean(image: Path) -> None:
    proc = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("ext4")
    meta = flatten_layers(rootfs_layers(), tmp / "staging", max_bytes=1 << 26)
    image = tmp / "rootfs.ext4"
    build_ext4(tmp / "staging", image)
    apply_metadata(image, meta)
    yield image


def test_owners_and_modes_are_exact(built: Path) -> None:
    assert stat(built, "/usr/bin/sudo") == (0, 0, 0o104755)
    assert stat(built, "/etc/shadow") == (0, 42, 0o100640)
    assert stat(built, "/home/u/notes") == (1000, 1000, 0o100600)
    assert stat(built, "/home/u") == (1000, 1000, 0o40700)
    assert stat(built, "/tmp") == (0, 0, 0o41777)
    assert stat(built, "/root") == (0, 0, 0o40700)
    assert stat(built, "/") == (0, 0, 0o40755)
    assert stat(built, "/usr") == (0, 0, 0o40755)  # implicit parent
    assert stat(built, "/etc/café") == (7, 8, 0o100600)
    assert stat(built, "/usr/share/a b/c d") == (3, 4, 0o100664)


def test_links_and_contents(built: Path) -> None:
    vi = inode_info(built, "/usr/bin/vi")
    assert (vi.mode, vi.target) == (0o120777, "/usr/bin/vim.tiny")
    assert inode_info(built, "/bin").target == "usr/bin"
    assert inode_info(built, "/usr/lib/libslow.so").target == LONG_TARGET  # not a fast symlink
    perl, perl536 = inode_info(built, "/usr/bin/perl"), inode_info(built, "/usr/bin/perl5.36")
    assert perl.links == perl536.links == 2
    assert read_file(built, "/usr/bin/perl5.36") == b"\x7fELF perl"
    assert read_file(built, "/etc/motd") == b"hello\n"
    assert read_file(built, "/etc/shadow").startswith(b"root:*:")
    with pytest.raises(NotFound):
        read_file(built, "/etc/with space")  # whited out by the second layer
    with pytest.raises(NotFound):
        stat(built, "/dev/null")  # device nodes are skipped


def test_image_is_sparse_sized_and_fsck_clean(built: Path) -> None:
    info = built.stat()
    assert info.st_size == GIB  # 1 GiB floor
    assert info.st_blocks * 512 < 64 << 20
    fsck_clean(built)


def test_write_files_round_trip(built: Path, tmp_path: Path) -> None:
    image = tmp_path / "copy.ext4"
    sparse_copy(built, image)
    inject(
        image,
        [
            GuestFile("/usr/local/libexec/banger/agent", b"#!/bin/sh\necho hi\n", 0o755),
            GuestFile("/etc/shadow", b"root:!:1::::::\n", 0o640, gid=42),  # overwrite
            GuestFile("/usr/bin/vi", b"not a link any more", 0o755),  # replaces a symlink
            GuestFile("/etc/systemd/system/a b.service", b"[Unit]\n", 0o644),
            GuestFile("/etc/systemd/system/multi-user.target.wants", None, 0o755, kind="dir"),
            GuestFile(
                "/etc/systemd/system/multi-user.target.wants/a b.service",
                None,
                0o777,
                kind="symlink",
                target="/etc/systemd/system/a b.service",
            ),
            GuestFile("/home/u/.ssh", None, 0o700, uid=1000, gid=1000, kind="dir"),
            GuestFile("/home/u/.ssh/authorized_keys", b"ssh-ed25519 KEY\n", 0o600, uid=1000, gid=1000),
            GuestFile("/usr/bin/sudo2", b"x", 0o4711),
        ],
    )
    assert read_file(image, "/usr/local/libexec/banger/agent") == b"#!/bin/sh\necho hi\n"
    assert stat(image, "/usr/local/libexec/banger/agent") == (0, 0, 0o100755)
    for parent in ("/usr/local", "/usr/local/libexec", "/usr/local/libexec/banger", "/etc/systemd/system"):
        assert stat(image, parent) == (0, 0, 0o40755), parent
    assert read_file(image, "/etc/shadow") == b"root:!:1::::::\n"
    assert stat(image, "/etc/shadow") == (0, 42, 0o100640)
    assert read_file(image, "/usr/bin/vi") == b"not a link any more"
    link = inode_info(image, "/etc/systemd/system/multi-user.target.wants/a b.service")
    assert (link.mode, link.target) == (0o120777, "/etc/systemd/system/a b.service")
    assert stat(image, "/home/u/.ssh") == (1000, 1000, 0o40700)
    assert stat(image, "/home/u/.ssh/authorized_keys") == (1000, 1000, 0o100600)
    assert stat(image, "/usr/bin/sudo2") == (0, 0, 0o104711)
    fsck_clean(image)

    # A second write over the same paths replaces them in place.
    inject(image, [GuestFile("/usr/local/libexec/banger/agent", b"v2", 0o700)])
    assert read_file(image, "/usr/local/libexec/banger/agent") == b"v2"
    assert stat(image, "/usr/local/libexec/banger/agent") == (0, 0, 0o100700)
    fsck_clean(image)


def _debugfs(image: Path, request: str) -> str:
    """A raw debugfs request, bypassing banger's quoting (the request holds no names that need any)."""
    proc = subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, check=True)
    return proc.stdout.decode("utf-8", "surrogateescape")


def _listing(image: Path, directory: str) -> dict[str, tuple[int, int, int]]:
    """name -> (uid, gid, mode) from `ls -p`, which prints names raw: /ino/mode/uid/gid/name/size/."""
    entries = {}
    for line in _debugfs(image, f"ls -p {directory}").split("\n"):
        fields = line.split("/")
        if len(fields) == 8 and fields[5] not in (".", ".."):
            entries[fields[5]] = (int(fields[3]), int(fields[4]), int(fields[2], 8))
    return entries


def test_backslash_names_round_trip(tmp_path: Path) -> None:
    # OCI layer -> staging -> mkfs -> apply_metadata (inode numbers from `ls -p`) -> debugfs reads.
    layer = tar_bytes(
        E("srv", "dir", mode=0o755),
        E("srv/dir\\with", "dir", mode=0o750, uid=7, gid=8),
        E("srv/dir\\with/a\\b\\c", data=b"abc", mode=0o640, uid=7, gid=8),
        E("srv/end\\", data=b"end", mode=0o600, uid=1, gid=2),
        E("srv/\\", data=b"one", mode=0o4755),
        E("srv/\\\\", data=b"two", uid=3, gid=4),
        E("srv/link\\", "symlink", target="dir\\with/a\\b\\c"),
        E("srv/line\u2028sep\u0085x", data=b"u2028", uid=5, gid=6),  # not line breaks to debugfs
    )
    staging, image = tmp_path / "staging", tmp_path / "rootfs.ext4"
    meta = flatten_layers([("sha256:" + "33" * 32, io.BytesIO(layer))], staging, max_bytes=1 << 20)
    build_ext4(staging, image)
    apply_metadata(image, meta)

    # Read back without banger's quoting: the names and owners are in the image as the layer said.
    assert _listing(image, "/srv") == {
        "dir\\with": (7, 8, 0o40750),
        "end\\": (1, 2, 0o100600),
        "\\": (0, 0, 0o104755),
        "\\\\": (3, 4, 0o100644),
        "link\\": (0, 0, 0o120777),
        "line\u2028sep\u0085x": (5, 6, 0o100644),
    }
    assert _listing(image, "/srv/dir\\with") == {"a\\b\\c": (7, 8, 0o100640)}
    # `ls -l` escapes a backslash (and any non-ASCII byte) as \xNN; `ls -p` above prints names raw.
    long_names = {line.split()[-1] for line in _debugfs(image, "ls -l /srv").split("\n") if line.strip()}
    assert {"dir\\x5cwith", "end\\x5c", "\\x5c", "\\x5c\\x5c", "link\\x5c"} <= long_names
    out = tmp_path / "out"
    out.mkdir()
    _debugfs(image, f"rdump /srv {out}")
    assert sorted(os.listdir(out / "srv")) == sorted(["dir\\with", "end\\", "\\", "\\\\", "link\\",
                                                      "line\u2028sep\u0085x"])
    assert (out / "srv/dir\\with/a\\b\\c").read_bytes() == b"abc"
    assert os.readlink(out / "srv/link\\") == "dir\\with/a\\b\\c"

    # And through banger's own debugfs scripts, where each name is a quoted argument.
    assert read_file(image, "/srv/\\\\") == b"two"
    assert read_file(image, "/srv/end\\") == b"end"
    assert stat(image, "/srv/dir\\with/a\\b\\c") == (7, 8, 0o100640)
    assert inode_info(image, "/srv/link\\").target == "dir\\with/a\\b\\c"
    inject(image, [GuestFile("/srv/new\\dir\\/f\\", b"new", 0o640, uid=9, gid=9),
                   GuestFile("/srv/l\\", None, 0o777, kind="symlink", target="/srv/\\\\")])
    assert read_file(image, "/srv/new\\dir\\/f\\") == b"new"
    assert _listing(image, "/srv/new\\dir\\") == {"f\\": (9, 9, 0o100640)}
    assert inode_info(image, "/srv/l\\").target == "/srv/\\\\"
    fsck_clean(image)


def test_write_files_refuses_conflicts(built: Path, tmp_path: Path) -> None:
    image = tmp_path / "copy.ext4"
    sparse_copy(built, image)
    before = image.stat().st_mtime_ns
    with pytest.raises(BadRequest, match=r'cannot write file "/etc" in .*: a directory is there'):
        inject(image, [GuestFile("/etc", b"x", 0o644)])
    with pytest.raises(BadRequest, match=r'cannot create files under "/etc/motd" .*: it is a regular file, not a directory'):
        inject(image, [GuestFile("/etc/motd/x", b"x", 0o644)])
    with pytest.raises(BadRequest, match=r'cannot make directory "/etc/motd" .*: a regular file is there'):
        inject(image, [GuestFile("/etc/motd", None, 0o755, kind="dir")])
    assert image.stat().st_mtime_ns == before, "a refused write touched the image"
    fsck_clean(image)


@pytest.mark.parametrize(
    ("file", "message"),
    [
        (GuestFile("etc/x", b"", 0o644), 'guest path "etc/x" is not absolute'),
        (GuestFile("/etc/../x", b"", 0o644), 'guest path "/etc/../x" is not normalised'),
        (GuestFile('/etc/a"b', b"", 0o644), 'guest path "/etc/a\\"b" cannot be encoded for debugfs'),
        (GuestFile("/etc/a\nb", b"", 0o644), 'guest path "/etc/a\\nb" cannot be encoded for debugfs'),
        (GuestFile("/etc/x", None, 0o644), 'guest file "/etc/x" has no data'),
        (GuestFile("/etc/x", b"", 0o10644), 'guest path "/etc/x": mode 0o10644 is not within 0o7777'),
        (GuestFile("/etc/l", None, 0o777, kind="symlink", target='a"b'), 'guest symlink "/etc/l" has target'),
    ],
)
def test_inject_validation(built: Path, file: GuestFile, message: str) -> None:
    with pytest.raises(BadRequest) as err:
        inject(built, [file])
    assert str(err.value).startswith(message)


def test_apply_metadata_reports_debugfs_errors(built: Path, tmp_path: Path) -> None:
    image = tmp_path / "copy.ext4"
    sparse_copy(built, image)
    with pytest.raises(BangerError, match=r'cannot set ownership in .*: "/nope" is not in the image'):
        apply_metadata(image, {"/etc/motd": FileMeta(0, 0, 0o100600, "file"), "/nope": FileMeta(0, 0, 0o100644, "file")})
    with pytest.raises(BadRequest, match="not a valid inode mode"):
        apply_metadata(image, {"/etc/motd": FileMeta(0, 0, 0o644, "file")})
    not_ext4 = tmp_path / "zero.img"
    not_ext4.write_bytes(bytes(1 << 20))
    with pytest.raises(BangerError, match="Bad magic number"):
        apply_metadata(not_ext4, {"/x": FileMeta(0, 0, 0o100644, "file")})


def test_rdump_for_the_work_seed(built: Path, tmp_path: Path) -> None:
    out = ext4.rdump(built, "/root", tmp_path)
    assert out == tmp_path / "root"
    assert (out / ".ssh/authorized_keys").read_bytes() == b"ssh-ed25519 AAAA test\n"
    assert (out / ".bashrc").read_bytes() == b"PS1='# '\n"
    with pytest.raises(NotFound):
        ext4.rdump(built, "/nope", tmp_path)


def test_make_empty_ext4(tmp_path: Path) -> None:
    image = tmp_path / "work.ext4"
    ext4.make_empty_ext4(image, 256 << 20, "work")
    assert image.stat().st_size == 256 << 20
    assert image.stat().st_blocks * 512 < 32 << 20
    assert stat(image, "/") == (0, 0, 0o40755)
    fsck_clean(image)


def test_explicit_size_and_label(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src/f").write_bytes(b"x")
    image = tmp_path / "small.ext4"
    build_ext4(tmp_path / "src", image, size_bytes=64 << 20, label="seed")
    assert image.stat().st_size == 64 << 20
    proc = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True)
    assert "Filesystem volume name:   seed" in proc.stdout
    with pytest.raises(BadRequest):
        build_ext4(tmp_path / "src", image, label="has space")


def test_many_small_files_get_enough_inodes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for d in range(25):
        (src / f"d{d}").mkdir(parents=True)
        for f in range(800):
            (src / f"d{d}" / f"f{f}").touch()
    image = tmp_path / "many.ext4"
    # 20k entries > the 16384 inodes mke2fs gives 64 MiB by default.
    build_ext4(src, image, size_bytes=64 << 20)
    fsck_clean(image)


def test_build_timing_50mb(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = os.urandom
    entries = [E(f"usr/share/blob{i:03}/data.bin", data=rng(100_000), mode=0o644) for i in range(500)]
    entries += [E(f"usr/share/doc/pkg{i}/copyright", data=b"c" * 300, uid=0) for i in range(3000)]
    layer = tar_bytes(*entries, compress="gzip")
    t0 = time.monotonic()
    meta = flatten_layers([("sha256:" + "33" * 32, io.BytesIO(layer))], tmp_path / "staging", max_bytes=1 << 30)
    t1 = time.monotonic()
    image = tmp_path / "big.ext4"
    build_ext4(tmp_path / "staging", image)
    t2 = time.monotonic()
    apply_metadata(image, meta)
    t3 = time.monotonic()
    fsck_clean(image)
    assert stat(image, "/usr/share/blob499/data.bin") == (0, 0, 0o100644)
    with capsys.disabled():
        print(
            f"\n[timing] ~51 MB, {len(meta)} entries: flatten {t1 - t0:.2f}s, build_ext4 {t2 - t1:.2f}s, "
            f"apply_metadata {t3 - t2:.2f}s"
        )


UNPRIVILEGED_SCRIPT = textwrap.dedent(
    """
    import io, os, sys
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    from banger.images.flatten import flatten_layers
    from banger.images.ext4 import build_ext4, apply_metadata
    from banger.images.inject import GuestFile, inject
    work = Path(sys.argv[2])
    layer = (work / "layer.tar").read_bytes()
    meta = flatten_layers([("sha256:" + "44" * 32, io.BytesIO(layer))], work / "staging", max_bytes=1 << 26)
    assert (work / "staging/usr/bin/sudo").stat().st_uid == os.getuid()
    build_ext4(work / "staging", work / "rootfs.ext4")
    apply_metadata(work / "rootfs.ext4", meta)
    inject(work / "rootfs.ext4", [GuestFile("/usr/local/bin/agent", b"agent", 0o755)])
    print("uid", os.getuid())
    """
)


def test_unprivileged_build(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("already unprivileged: every other test here proves it")
    work = Path(tempfile.mkdtemp(prefix="banger-ext4-nobody-"))
    try:
        os.chown(work, 65534, 65534)
        layer = tar_bytes(
            E("usr/bin/sudo", data=b"sudo", mode=0o4755),
            E("etc/shadow", data=b"s", mode=0o640, gid=42),
            E("etc/gshadow", data=b"g", mode=0o000, gid=42),  # unreadable to its owner; mkfs must still read it
        )
        (work / "layer.tar").write_bytes(layer)
        os.chown(work / "layer.tar", 65534, 65534)
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             sys.executable, "-c", UNPRIVILEGED_SCRIPT, str(SRC), str(work)],
            capture_output=True,
            text=True,
            check=False,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(work), "TMPDIR": str(work)},
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "uid 65534"
        image = work / "rootfs.ext4"
        assert image.stat().st_uid == 65534
        assert stat(image, "/usr/bin/sudo") == (0, 0, 0o104755)
        assert stat(image, "/etc/shadow") == (0, 42, 0o100640)
        assert stat(image, "/etc/gshadow") == (0, 42, 0o100000)
        assert read_file(image, "/etc/gshadow") == b"g"
        assert stat(image, "/usr/local/bin/agent") == (0, 0, 0o100755)
        fsck_clean(image)
    finally:
        shutil.rmtree(work)
