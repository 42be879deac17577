"""Layer replay: OCI semantics (whiteouts, opaque dirs, hardlinks) and a hostile-layer corpus.

Every hostile case checks the exact one-line error and that nothing next to `dest` changed: the
symlinks in the corpus point at a sentinel directory beside `dest`, so a write-through would show.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import stat
import tarfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard

from banger.errors import BadRequest
from banger.images.ext4 import FileMeta
from banger.images.flatten import flatten_layers, flatten_tar_file

D1 = "sha256:" + "a1" * 32
D2 = "sha256:" + "b2" * 32
L1 = "layer 1 (sha256:a1a1a1a1a1a1…)"
L2 = "layer 2 (sha256:b2b2b2b2b2b2…)"
ENC = '(control characters, " and non-UTF-8 bytes are not allowed)'
MB = 1 << 20


@dataclass
class E:
    """One tar entry."""

    name: str
    kind: str = "file"  # file dir symlink hardlink chr fifo
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    target: str = ""
    mtime: int = 1_700_000_000
    extra: dict[str, str] = field(default_factory=dict)


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def tar_bytes(*entries: E, compress: str = "", fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = _TYPES[e.kind]
            info.mode = e.mode
            info.uid, info.gid = e.uid, e.gid
            info.mtime = e.mtime
            info.linkname = e.target
            if e.kind in ("chr", "blk"):
                info.devmajor, info.devminor = 1, 3
            if e.kind == "file":
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                tar.addfile(info)
    raw = buf.getvalue()
    if compress == "gzip":
        return gzip.compress(raw)
    if compress == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    return raw


def layers(*tars: bytes) -> list[tuple[str, io.BytesIO]]:
    names = [D1, D2, "sha256:" + "c3" * 32]
    return [(names[i], io.BytesIO(t)) for i, t in enumerate(tars)]


@dataclass
class Box:
    root: Path
    dest: Path
    sentinel: Path

    def snapshot(self) -> dict[str, tuple[int, bytes | str | None]]:
        """Everything under the test's tmp dir except `dest`: path -> (mode, content/target)."""
        seen: dict[str, tuple[int, bytes | str | None]] = {}
        for root, dirs, files in os.walk(self.root):
            if Path(root) == self.root and "dest" in dirs:
                dirs.remove("dest")
            for name in (*dirs, *files):
                path = Path(root) / name
                info = path.lstat()
                content: bytes | str | None = None
                if stat.S_ISREG(info.st_mode):
                    content = path.read_bytes()
                elif stat.S_ISLNK(info.st_mode):
                    content = os.readlink(path)
                seen[str(path.relative_to(self.root))] = (info.st_mode, content)
        return seen


@pytest.fixture
def box(tmp_path: Path) -> Box:
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep").write_text("keep me\n")
    (sentinel / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    return Box(tmp_path, tmp_path / "dest", sentinel)


def read(box: Box, rel: str) -> bytes:
    return (box.dest / rel).read_bytes()


# ------------------------------------------------------------------------------------------- replay


def test_backslash_names_are_ordinary_names(box: Box) -> None:
    # OCI layers may name files with "\\"; it is just a byte (Windows paths, escaped unit names, ...).
    base = tar_bytes(
        E("srv/dir\\with", "dir", mode=0o750, uid=7, gid=8),
        E("srv/dir\\with/a\\b\\c", data=b"abc", mode=0o640, uid=7, gid=8),
        E("srv/end\\", data=b"end"),
        E("srv/\\", data=b"one"),
        E("srv/\\\\", data=b"two"),
        E("srv/link\\", "symlink", target="dir\\with/a\\b\\c"),
        E("srv/hard\\link", "hardlink", target="srv/end\\"),
        E("srv/gone\\x", data=b"old"),
        E("etc/systemd/system/dev-disk-by\\x2dlabel.mount", data=b"[Mount]\n"),
    )
    top = tar_bytes(E("srv/.wh.gone\\x"))
    meta = flatten_layers(layers(base, top), box.dest, max_bytes=MB)

    assert sorted(os.listdir(box.dest / "srv")) == ["\\", "\\\\", "dir\\with", "end\\", "hard\\link", "link\\"]
    assert read(box, "srv/dir\\with/a\\b\\c") == b"abc"
    assert read(box, "srv/link\\") == b"abc"  # the relative target stays inside the tree
    assert os.readlink(box.dest / "srv/link\\") == "dir\\with/a\\b\\c"
    assert (box.dest / "srv/hard\\link").stat().st_ino == (box.dest / "srv/end\\").stat().st_ino
    assert (read(box, "srv/\\"), read(box, "srv/\\\\")) == (b"one", b"two")
    assert meta["/srv/dir\\with"] == FileMeta(7, 8, 0o40750, "dir")
    assert meta["/srv/dir\\with/a\\b\\c"] == FileMeta(7, 8, 0o100640, "file")
    assert meta["/srv/hard\\link"] == meta["/srv/end\\"]
    assert "/srv/gone\\x" not in meta
    assert read(box, "etc/systemd/system/dev-disk-by\\x2dlabel.mount") == b"[Mount]\n"


def test_multi_layer_replay(box: Box) -> None:
    base = tar_bytes(
        E("./", "dir", mode=0o755),
        E("etc", "dir", mode=0o755),
        E("etc/passwd", data=b"root:x:0:0\n"),
        E("etc/shadow", data=b"root:*:1\n", mode=0o640, gid=42),
        E("usr/bin/sudo", data=b"\x7fELF", mode=0o4755),  # parents implicit
        E("bin", "symlink", target="usr/bin", mode=0o777),
        E("etc/alternatives/awk", "symlink", target="/usr/bin/mawk"),  # absolute targets are fine
        E("opt/x", "dir", mode=0o700, uid=1000, gid=1000),
        E("opt/x/child", data=b"c", uid=1000, gid=1000),
        E("home/u/secret", data=b"s", mode=0o000, uid=1000, gid=1000),
    )
    top = tar_bytes(
        E("etc/passwd", data=b"root:x:0:0\nu:x:1000:1000\n"),
        E("opt/x", data=b"now a file", mode=0o600),  # a file replaces a whole directory
        E("usr/bin/new", data=b"n", mode=0o755),
    )
    meta = flatten_layers(layers(base, top), box.dest, max_bytes=MB)

    assert read(box, "etc/passwd") == b"root:x:0:0\nu:x:1000:1000\n"
    assert read(box, "opt/x") == b"now a file"
    assert os.readlink(box.dest / "bin") == "usr/bin"
    assert os.readlink(box.dest / "etc/alternatives/awk") == "/usr/bin/mawk"
    assert meta["/"] == FileMeta(0, 0, 0o40755, "dir")
    assert meta["/etc/shadow"] == FileMeta(0, 42, 0o100640, "file")
    assert meta["/usr/bin/sudo"] == FileMeta(0, 0, 0o104755, "file")
    assert meta["/usr"] == FileMeta(0, 0, 0o40755, "dir")  # implicit parents: root:root 0755
    assert meta["/bin"] == FileMeta(0, 0, 0o120777, "symlink")
    assert meta["/opt/x"] == FileMeta(0, 0, 0o100600, "file")
    assert "/opt/x/child" not in meta
    assert meta["/home/u/secret"] == FileMeta(1000, 1000, 0o100000, "file")
    # Host copies: special bits off, builder can always read/write (and enter directories).
    assert stat.S_IMODE((box.dest / "usr/bin/sudo").stat().st_mode) == 0o755
    assert stat.S_IMODE((box.dest / "home/u/secret").stat().st_mode) == 0o600
    assert read(box, "home/u/secret") == b"s"
    assert (box.dest / "usr/bin/sudo").stat().st_mtime == 1_700_000_000
    assert (box.dest / "etc").stat().st_mtime == 1_700_000_000  # dir times set after all writes
    on_disk = {"/" + str(p.relative_to(box.dest)) for p in box.dest.rglob("*")} | {"/"}
    assert on_disk == set(meta)


@pytest.mark.parametrize("compress", ["", "gzip", "zstd"])
def test_compressed_layers(box: Box, compress: str) -> None:
    first = tar_bytes(E("a/one", data=b"1" * 5000), compress=compress)
    second = tar_bytes(E("a/two", data=b"2"), compress="zstd")
    meta = flatten_layers(layers(first, second), box.dest, max_bytes=MB)
    assert read(box, "a/one") == b"1" * 5000
    assert read(box, "a/two") == b"2"
    assert set(meta) == {"/", "/a", "/a/one", "/a/two"}


class Trickle(io.RawIOBase):
    """A non-seekable stream that returns at most 7 bytes per read, like a slow socket."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(7, len(buffer), len(self._data))
        buffer[:n] = self._data[:n]
        self._data = self._data[n:]
        return n


@pytest.mark.parametrize("compress", ["", "gzip", "zstd"])
def test_non_seekable_short_reads(box: Box, compress: str) -> None:
    blob = tar_bytes(E("etc/os-release", data=b"ID=debian\n" * 500), compress=compress)
    stream = io.BufferedReader(Trickle(blob))
    flatten_layers([(D1, stream)], box.dest, max_bytes=MB)
    assert read(box, "etc/os-release") == b"ID=debian\n" * 500


def test_concatenated_zstd_frames(box: Box) -> None:
    raw = tar_bytes(E("f", data=b"x" * 3000))
    cctx = zstandard.ZstdCompressor()
    blob = cctx.compress(raw[:1024]) + cctx.compress(raw[1024:])
    flatten_layers(layers(blob), box.dest, max_bytes=MB)
    assert read(box, "f") == b"x" * 3000


def test_layers_from_files(box: Box) -> None:
    path = box.root / "rootfs.tar.gz"
    path.write_bytes(tar_bytes(E("etc/hostname", data=b"h\n"), compress="gzip"))
    meta = flatten_tar_file(path, box.dest, MB)
    assert read(box, "etc/hostname") == b"h\n"
    assert "/etc/hostname" in meta
    with pytest.raises(BadRequest) as err:
        flatten_tar_file(path, box.root / "dest2", 1)
    assert str(err.value) == 'tarball rootfs.tar.gz: entry "etc/hostname" would take the extracted size over the limit of 1 bytes'


def test_whiteout_file_and_dir(box: Box) -> None:
    base = tar_bytes(
        E("etc/motd", data=b"hi"),
        E("etc/keep", data=b"k"),
        E("var/cache/apt", "dir"),
        E("var/cache/apt/pkg.bin", data=b"p"),
        E("link", "symlink", target=str(box.sentinel)),  # whiting out a symlink must not follow it
    )
    top = tar_bytes(E("etc/.wh.motd"), E("var/cache/.wh.apt"), E(".wh.link"), E("etc/.wh.never-existed"))
    meta = flatten_layers(layers(base, top), box.dest, max_bytes=MB)
    assert not (box.dest / "etc/motd").exists()
    assert read(box, "etc/keep") == b"k"
    assert not (box.dest / "var/cache/apt").exists()
    assert not (box.dest / "link").is_symlink()
    for gone in ("/etc/motd", "/var/cache/apt", "/var/cache/apt/pkg.bin", "/link"):
        assert gone not in meta
    assert not any(".wh." in p for p in meta)
    assert (box.sentinel / "keep").read_text() == "keep me\n"


def test_opaque_dir_keeps_same_layer_entries(box: Box) -> None:
    base = tar_bytes(
        E("d", "dir"),
        E("d/old", data=b"o"),
        E("d/sub", "dir"),
        E("d/sub/old2", data=b"o2"),
        E("other/x", data=b"x"),
    )
    top = tar_bytes(
        E("d/new", data=b"n"),  # before the marker: same layer, kept
        E("d/.wh..wh..opq"),
        E("d/sub", "dir", mode=0o750),
        E("d/sub/new2", data=b"n2"),  # after the marker
    )
    meta = flatten_layers(layers(base, top), box.dest, max_bytes=MB)
    names = sorted(str(p.relative_to(box.dest / "d")) for p in (box.dest / "d").rglob("*"))
    assert names == ["new", "sub", "sub/new2"]
    assert read(box, "other/x") == b"x"
    assert "/d/old" not in meta and "/d/sub/old2" not in meta
    assert meta["/d/sub"] == FileMeta(0, 0, 0o40750, "dir")


def test_hardlink_inside(box: Box) -> None:
    base = tar_bytes(
        E("usr/bin/perl", data=b"perl", mode=0o755, uid=0, gid=0),
        E("usr/bin/perl5.36", "hardlink", target="usr/bin/perl", mode=0o755),
        E("./usr/bin/perl-again", "hardlink", target="./usr/bin/perl", mode=0o755),
    )
    meta = flatten_layers(layers(base), box.dest, max_bytes=MB)
    a, b = (box.dest / "usr/bin/perl").stat(), (box.dest / "usr/bin/perl5.36").stat()
    assert a.st_ino == b.st_ino and a.st_nlink == 3
    assert meta["/usr/bin/perl5.36"] == meta["/usr/bin/perl"] == FileMeta(0, 0, 0o100755, "file")
    assert meta["/usr/bin/perl-again"] == meta["/usr/bin/perl"]


def test_leaf_symlink_is_replaced_not_followed(box: Box) -> None:
    before = box.snapshot()
    base = tar_bytes(
        E("x", "symlink", target=str(box.sentinel / "keep")),
        E("lib", "symlink", target=str(box.sentinel)),
    )
    top = tar_bytes(
        E("x", data=b"replaced"),  # a file over a symlink: the link goes, the target stays
        E("lib", "dir"),  # a directory over a symlink: same
        E("lib/libc.so", data=b"libc"),
    )
    meta = flatten_layers(layers(base, top), box.dest, max_bytes=MB)
    assert read(box, "x") == b"replaced" and not (box.dest / "x").is_symlink()
    assert read(box, "lib/libc.so") == b"libc" and not (box.dest / "lib").is_symlink()
    assert meta["/lib"].kind == "dir"
    assert box.snapshot() == before


def test_devices_and_fifos_are_skipped(box: Box, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="banger.images.flatten")
    meta = flatten_layers(
        layers(tar_bytes(E("dev/null", "chr", mode=0o666), E("dev/sda", "blk"), E("run/initctl", "fifo"),
                         E("etc/ok", data=b"ok"))),
        box.dest,
        max_bytes=MB,
    )
    assert read(box, "etc/ok") == b"ok"
    assert not (box.dest / "dev").exists() and not (box.dest / "run").exists()
    assert set(meta) == {"/", "/etc", "/etc/ok"}
    assert "skipped 3 device node/fifo entries" in caplog.text


# ---------------------------------------------------------------------------------------- hostile


Layers = Callable[[Box], list[bytes]]


def _sym_etc(box: Box) -> bytes:
    return tar_bytes(E("etc", "symlink", target=str(box.sentinel)), E("file", data=b"f"))


HOSTILE: list[tuple[str, Layers, str]] = [
    ("traversal", lambda b: [tar_bytes(E("../../etc/passwd", data=b"x"))],
     f'{L1}: entry "../../etc/passwd" escapes the root'),
    ("traversal-mid", lambda b: [tar_bytes(E("a/../../sentinel/keep", data=b"x"))],
     f'{L1}: entry "a/../../sentinel/keep" escapes the root'),
    ("absolute", lambda b: [tar_bytes(E("/etc/passwd", data=b"x"))],
     f'{L1}: entry "/etc/passwd" is an absolute path'),
    ("write-through-symlink", lambda b: [_sym_etc(b), tar_bytes(E("etc/passwd", data=b"pwned"))],
     f'{L2}: entry "etc/passwd" goes through the symlink "etc"'),
    ("write-through-symlink-same-layer",
     lambda b: [tar_bytes(E("etc", "symlink", target=str(b.sentinel)), E("etc/new", data=b"pwned"))],
     f'{L1}: entry "etc/new" goes through the symlink "etc"'),
    ("dir-through-symlink", lambda b: [_sym_etc(b), tar_bytes(E("etc/sub", "dir"))],
     f'{L2}: entry "etc/sub" goes through the symlink "etc"'),
    ("whiteout-through-symlink", lambda b: [_sym_etc(b), tar_bytes(E("etc/.wh.keep"))],
     f'{L2}: entry "etc/.wh.keep" goes through the symlink "etc"'),
    ("opaque-through-symlink", lambda b: [_sym_etc(b), tar_bytes(E("etc/.wh..wh..opq"))],
     f'{L2}: entry "etc/.wh..wh..opq" goes through the symlink "etc"'),
    ("hardlink-target-through-symlink",
     lambda b: [_sym_etc(b), tar_bytes(E("x", "hardlink", target="etc/keep"))],
     f'{L2}: entry "x" is a hardlink to "etc/keep", which goes through the symlink "etc"'),
    ("hardlink-placed-through-symlink",
     lambda b: [_sym_etc(b), tar_bytes(E("etc/x", "hardlink", target="file"))],
     f'{L2}: entry "etc/x" goes through the symlink "etc"'),
    ("hardlink-outside", lambda b: [tar_bytes(E("x", "hardlink", target="../x"))],
     f'{L1}: entry "x" is a hardlink to "../x", which escapes the root'),
    ("hardlink-absolute", lambda b: [tar_bytes(E("x", "hardlink", target="/etc/passwd"))],
     f'{L1}: entry "x" is a hardlink to "/etc/passwd", which escapes the root'),
    ("hardlink-not-yet-extracted", lambda b: [tar_bytes(E("x", "hardlink", target="later"), E("later"))],
     f'{L1}: entry "x" is a hardlink to "later", which has not been extracted before it'),
    ("hardlink-to-dir", lambda b: [tar_bytes(E("d", "dir"), E("x", "hardlink", target="d"))],
     f'{L1}: entry "x" is a hardlink to "d", which is a directory'),
    ("relative-symlink-escape", lambda b: [tar_bytes(E("a/b", "symlink", target="../../.."))],
     f'{L1}: entry "a/b" is an unsafe symlink: target "../../.." escapes the root'),
    ("relative-symlink-escape-top", lambda b: [tar_bytes(E("up", "symlink", target="../sentinel"))],
     f'{L1}: entry "up" is an unsafe symlink: target "../sentinel" escapes the root'),
    ("newline-name", lambda b: [tar_bytes(E("etc/bad\nname", data=b"x"))],
     f'{L1}: entry "etc/bad\\nname" has a name the image tooling cannot encode {ENC}'),
    ("quote-name", lambda b: [tar_bytes(E('etc/bad"name', data=b"x"))],
     f'{L1}: entry "etc/bad\\"name" has a name the image tooling cannot encode {ENC}'),
    ("carriage-return-name", lambda b: [tar_bytes(E("etc/bad\rname", data=b"x"))],
     f'{L1}: entry "etc/bad\\x0dname" has a name the image tooling cannot encode {ENC}'),
    ("backslash-dotdot", lambda b: [tar_bytes(E("a\\/../../x", data=b"x"))],
     f'{L1}: entry "a\\\\/../../x" escapes the root'),
    ("backslash-absolute", lambda b: [tar_bytes(E("/\\etc/x", data=b"x"))],
     f'{L1}: entry "/\\\\etc/x" is an absolute path'),
    ("backslash-hardlink-outside", lambda b: [tar_bytes(E("x", "hardlink", target="..\\/../x"))],
     f'{L1}: entry "x" is a hardlink to "..\\\\/../x", which escapes the root'),
    ("non-utf8-name", lambda b: [tar_bytes(E("etc/bad\udcffname", data=b"x"))],
     f'{L1}: entry "etc/bad\\xffname" has a name the image tooling cannot encode {ENC}'),
    ("control-char-pax", lambda b: [tar_bytes(E("etc/bell\x07", data=b"x"), fmt=tarfile.PAX_FORMAT)],
     f'{L1}: entry "etc/bell\\x07" has a name the image tooling cannot encode {ENC}'),
    ("too-big", lambda b: [tar_bytes(E("small", data=b"s" * 600)), tar_bytes(E("big", data=b"b" * 600))],
     f'{L2}: entry "big" would take the extracted size over the limit of 1000 bytes'),
    ("hardlink-into-itself", lambda b: [tar_bytes(E("d/f", data=b"f"), E("d", "hardlink", target="d/f"))],
     f'{L1}: entry "d" is a hardlink to "d/f", which is inside the entry itself'),
    ("long-component", lambda b: [tar_bytes(E("a/" + "x" * 256, data=b"x"))],
     f'{L1}: entry "a/{"x" * 256}" has a path component longer than 255 bytes'),
    ("long-path", lambda b: [tar_bytes(E("/".join(["y" * 200] * 25), data=b"x"))],
     f'{L1}: entry "{"/".join(["y" * 200] * 25)}" has a path too long to extract'),
    ("owner-out-of-range", lambda b: [tar_bytes(E("f", uid=1 << 32), fmt=tarfile.PAX_FORMAT)],
     f'{L1}: entry "f" has owner 4294967296:0, outside 0..4294967295'),
    ("whiteout-dotdot", lambda b: [tar_bytes(E("a/.wh..."))], f'{L1}: entry "a/.wh..." escapes the root'),
    ("root-replaced", lambda b: [tar_bytes(E(".", "symlink", target="/"))],
     f'{L1}: entry "." replaces the root directory with a non-directory'),
]


@pytest.mark.parametrize(("case", "make", "expected"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_layers(box: Box, case: str, make: Layers, expected: str) -> None:
    before = box.snapshot()
    with pytest.raises(BadRequest) as err:
        flatten_layers(layers(*make(box)), box.dest, max_bytes=1000)
    message = str(err.value)
    assert message == expected
    assert "\n" not in message
    assert box.snapshot() == before, "something outside dest changed"
    assert sorted(p.name for p in box.root.iterdir()) == ["dest", "sentinel"]


def test_symlink_to_absolute_outside_path_is_inert(box: Box) -> None:
    outside = Path("/tmp") / f"banger-test-outside-{uuid.uuid4().hex}"
    base = tar_bytes(E("etc", "symlink", target=str(outside)))
    with pytest.raises(BadRequest) as err:
        flatten_layers(layers(base, tar_bytes(E("etc/passwd", data=b"pwned"))), box.dest, max_bytes=MB)
    assert str(err.value) == f'{L2}: entry "etc/passwd" goes through the symlink "etc"'
    assert not outside.exists()


def test_not_a_tar(box: Box) -> None:
    with pytest.raises(BadRequest) as err:
        flatten_layers([(D1, io.BytesIO(b"this is not a tar archive" * 40))], box.dest, max_bytes=MB)
    assert str(err.value).startswith(f"{L1}: not a valid tar stream (")
    with pytest.raises(BadRequest) as err:
        flatten_layers([(D1, io.BytesIO(b"\x28\xb5\x2f\xfd garbage"))], box.root / "d2", max_bytes=MB)
    assert str(err.value).startswith(f"{L1}: not a valid zstd tar stream (")
    truncated = tar_bytes(E("f", data=b"x" * 5000))[:2048]
    with pytest.raises(BadRequest) as err:
        flatten_layers([(D1, io.BytesIO(truncated))], box.root / "d3", max_bytes=MB)
    assert str(err.value).startswith(f"{L1}: not a valid tar stream (")
