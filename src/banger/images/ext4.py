"""ext4 images built and edited without root, mounts or loop devices.

`mkfs.ext4 -d` copies a host directory into a fresh image, and `debugfs` edits inodes in place. Both
work on a plain file the unprivileged daemon owns. mkfs gives every inode the builder's uid and the
host file's mode, so `apply_metadata` then replays the real owners and modes (captured from the tar
headers) in one `debugfs -w` batch: that is how setuid-root `sudo` and a root-owned 0640 `/etc/shadow`
come out right without ever chown-ing anything on the host.

debugfs scripts quote each path in double quotes. Inside them debugfs' parser (libss) takes every byte
literally, backslashes included, and a script line ends at a newline or carriage return; control
characters, `"` and non-UTF-8 bytes are refused up front (`encodable`). debugfs exits 0 even when
commands fail, so every run's stderr is parsed and anything but the version banner (and
the few messages a caller tolerates) is raised.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import stat as st
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

from banger.errors import BadRequest, BangerError, NotFound
from banger.system.run import run

if TYPE_CHECKING:
    from banger.images.inject import GuestFile

log = logging.getLogger("banger.images.ext4")

Kind = Literal["file", "dir", "symlink"]

GIB = 1 << 30
MIB = 1 << 20
_MIN_SIZE = GIB
_BLOCK = 4096
_INODE_OVERHEAD = 256  # bytes of inode table per entry (mke2fs.conf inode_size)
_DEBUGFS_ENV = {"DEBUGFS_PAGER": "__none__", "PAGER": "__none__"}
_BANNER = re.compile(r"^debugfs \d+\.\d+")
_NOT_FOUND = re.compile(r"File not found by ext2_lookup")
_NOT_A_DIR = re.compile(r"Ext2 inode is not a directory")
_MKDIR_EXISTS = re.compile(r"^(ext2fs_)?mkdir: Ext2 directory already exists")
_CHOWN_DENIED = re.compile(r"Operation not permitted while changing ownership")
# Control characters (incl. newline, which ends a script line), the quote character, and lone
# surrogates (how Python represents the bytes of a non-UTF-8 name). A backslash is an ordinary byte to
# debugfs (tests/integration/test_ext4.py round-trips such names), so OCI layers may use it.
_UNENCODABLE = re.compile('[\x00-\x1f\x7f"\ud800-\udfff]')
_LABEL = re.compile(r"^[A-Za-z0-9._-]{1,16}$")
_TYPE_BITS = {
    "regular": st.S_IFREG,
    "directory": st.S_IFDIR,
    "symlink": st.S_IFLNK,
    "character special": st.S_IFCHR,
    "block special": st.S_IFBLK,
    "FIFO": st.S_IFIFO,
    "socket": st.S_IFSOCK,
}


class FileMeta(NamedTuple):
    """Owner and mode (including the S_IF* type bits) of one path inside the image."""

    uid: int
    gid: int
    mode: int
    kind: Kind


# Absolute guest path ("/" for the root directory) -> what its inode must say.
Metadata = dict[str, FileMeta]


class Ext4Stat(NamedTuple):
    uid: int
    gid: int
    mode: int  # including type bits


@dataclass(frozen=True)
class InodeInfo:
    uid: int
    gid: int
    mode: int
    links: int
    size: int
    target: str  # symlink target; "" for anything else


# ---------------------------------------------------------------------------------------------- names


def encodable(name: str) -> bool:
    """True if `name` can be passed to debugfs: no control characters, `"` or non-UTF-8 bytes."""
    return _UNENCODABLE.search(name) is None


ENCODING_RULE = 'control characters, " and non-UTF-8 bytes are not allowed'


def show_name(name: str) -> str:
    """`name` made printable on one line (for error messages), without the surrounding quotes."""
    out: list[str] = []
    for ch in name:
        code = ord(ch)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif 0xDC80 <= code <= 0xDCFF:  # surrogateescape'd byte of a non-UTF-8 name
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def check_guest_path(path: str, *, allow_root: bool = False) -> None:
    """Refuse a guest path debugfs would misread: it must be absolute, normalised and encodable."""
    shown = show_name(path)
    if not encodable(path):
        raise BadRequest(f'guest path "{shown}" cannot be encoded for debugfs ({ENCODING_RULE})')
    if not path.startswith("/"):
        raise BadRequest(f'guest path "{shown}" is not absolute')
    if path == "/":
        if allow_root:
            return
        raise BadRequest('guest path "/" names the root directory; a file path is needed here')
    parts = path[1:].split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise BadRequest(f'guest path "{shown}" is not normalised (empty, "." and ".." components are not allowed)')


def _q(text: str) -> str:
    """One debugfs argument. Unencodable text never reaches a script, whoever the caller is."""
    if not encodable(text):
        raise BadRequest(f'"{show_name(text)}" cannot be encoded for debugfs ({ENCODING_RULE})')
    return f'"{text}"'


# -------------------------------------------------------------------------------------------- debugfs


def _problems(stderr: bytes, tolerate: Sequence[re.Pattern[str]] = ()) -> list[str]:
    found = []
    for line in stderr.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if not line or _BANNER.match(line) or any(p.search(line) for p in tolerate):
            continue
        found.append(line)
    return found


def _raise_problems(image: Path, what: str, problems: list[str]) -> None:
    if not problems:
        return
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise BangerError(f"debugfs {what} on {image} failed: {problems[0]}{more}")


def _script(image: Path, lines: Sequence[str], *, write: bool, what: str,
            tolerate: Sequence[re.Pattern[str]] = ()) -> bytes:
    """Run `lines` in one debugfs process and raise on any error it reports; returns its stdout."""
    argv = ["debugfs", *(["-w"] if write else []), "-f", "-", os.fspath(image)]
    script = "".join(line + "\n" for line in lines).encode("utf-8")
    proc = run(argv, input=script, env=_DEBUGFS_ENV)
    _raise_problems(image, what, _problems(proc.stderr, tolerate))
    return proc.stdout


def _request(image: Path, request: str, *, path: str, tolerate: Sequence[re.Pattern[str]] = ()) -> bytes:
    """One read-only `debugfs -R` request about `path`; a missing path is NotFound."""
    proc = run(["debugfs", "-R", request, os.fspath(image)], env=_DEBUGFS_ENV)
    problems = _problems(proc.stderr, tolerate)
    if problems and any(_NOT_FOUND.search(p) for p in problems):
        raise NotFound(f'"{show_name(path)}" does not exist in {image}')
    _raise_problems(image, request.split(" ", 1)[0], problems)
    return proc.stdout


# ------------------------------------------------------------------------------------------ building


def _content_size(src_dir: Path) -> tuple[int, int]:
    """Bytes the tree needs on ext4 (data rounded to blocks plus inode overhead) and its entry count."""
    total = 0
    entries = 1
    for root, dirs, files in os.walk(src_dir):
        for name in (*dirs, *files):
            info = os.lstat(os.path.join(root, name))
            entries += 1
            size = info.st_size if not st.S_ISLNK(info.st_mode) or info.st_size > 60 else 0
            total += -(-size // _BLOCK) * _BLOCK + _INODE_OVERHEAD
    return total, entries


def _check_label(label: str) -> None:
    if not _LABEL.fullmatch(label):
        raise BadRequest(f"ext4 label {label!r} is not allowed (1-16 of A-Z a-z 0-9 . _ -)")


def _fresh_sparse(out: Path, size_bytes: int) -> None:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    os.close(fd)
    os.truncate(out, size_bytes)


def _mkfs(out: Path, label: str, extra: Sequence[str]) -> None:
    # No positional size: mke2fs would read it in 1 KiB units; the file's own size is what we mean.
    argv = ["mkfs.ext4", "-q", "-F", "-L", label, *extra, "-E", "root_owner=0:0", os.fspath(out)]
    try:
        run(argv)
    except BaseException:
        out.unlink(missing_ok=True)
        raise


def build_ext4(src_dir: Path, out: Path, *, size_bytes: int | None = None, label: str = "rootfs") -> None:
    """Make `out` an ext4 image holding a copy of `src_dir` (root directory owned by root:root).

    Owners and modes are the builder's until `apply_metadata` runs. The default size is 1.5 × the
    content, at least 1 GiB; the file is sparse, so unused space costs nothing on the host.
    """
    _check_label(label)
    content, entries = _content_size(src_dir)
    if size_bytes is None:
        size_bytes = max(_MIN_SIZE, content * 3 // 2)
    size_bytes = -(-size_bytes // MIB) * MIB
    extra = ["-d", os.fspath(src_dir)]
    # mke2fs allots one inode per 16 KiB (4 KiB below 512 MiB); a tree of many small files needs more.
    ratio = 16384 if size_bytes >= 512 * MIB else 4096
    needed = entries * 5 // 4 + 1024
    if needed > size_bytes // ratio:
        extra = ["-N", str(needed), *extra]
    _fresh_sparse(out, size_bytes)
    log.debug("building %s (%d bytes, %d entries) from %s", out, size_bytes, entries, src_dir)
    _mkfs(out, label, extra)


def make_empty_ext4(out: Path, size_bytes: int, label: str = "work") -> None:
    """A sparse, empty ext4 image whose root directory is 0755 root:root (what sshd's StrictModes wants)."""
    _check_label(label)
    if size_bytes < 8 * MIB:
        raise BadRequest(f"ext4 image size {size_bytes} bytes is too small (at least 8 MiB)")
    _fresh_sparse(out, -(-size_bytes // MIB) * MIB)
    _mkfs(out, label, [])


def _sif_lines(path: str, uid: int, gid: int, mode: int, *, ref: str | None = None) -> list[str]:
    """set_inode_field commands for one inode, addressed by `ref` (e.g. "<12>") or else by path."""
    if not (0 <= uid < 1 << 32 and 0 <= gid < 1 << 32):
        raise BadRequest(f'"{show_name(path)}": uid {uid} / gid {gid} out of range (0..4294967295)')
    if not (0 <= mode <= 0o177777) or st.S_IFMT(mode) not in _TYPE_BITS.values():
        raise BadRequest(f'"{show_name(path)}": mode {mode:#o} is not a valid inode mode (type bits needed)')
    q = ref if ref is not None else _q(path)
    return [f"sif {q} uid {uid}", f"sif {q} gid {gid}", f"sif {q} mode 0{mode:o}"]


def _inode_numbers(image: Path, paths: Sequence[str]) -> dict[str, int]:
    """Inode number of each path, found by listing directories breadth-first by inode number.

    debugfs resolves a path by scanning every directory on the way linearly (libext2fs does not use
    the htree index for lookups), so addressing 100k inodes by path costs seconds per big directory;
    one `ls -p <ino>` per directory, one run per tree level, costs milliseconds.
    """
    wanted = set(paths)
    dirs = {"/"} | {parent for p in wanted for parent in _parents(p)}
    found: dict[str, int] = {"/": 2}
    frontier = {2: "/"}
    while frontier:
        out = _script(image, [f"ls -p <{ino}>" for ino in sorted(frontier)], write=False, what="list")
        listing: str | None = None
        next_frontier: dict[int, str] = {}
        # Split at "\n" only: splitlines() would also cut a name at U+0085, U+2028 and the like.
        for line in out.decode("utf-8", "surrogateescape").split("\n"):
            if line.startswith("debugfs: ls -p <"):
                listing = frontier.get(int(line[len("debugfs: ls -p <") : -1]))
                continue
            # "/<ino>/<mode>/<uid>/<gid>/<name>/<size>/" (size empty for directories); names have no "/".
            fields = line.split("/")
            if listing is None or len(fields) != 8 or fields[0] or fields[5] in (".", ".."):
                continue
            child = listing.rstrip("/") + "/" + fields[5]
            if child in wanted or child in dirs:
                found[child] = int(fields[1])
                if child in dirs and st.S_ISDIR(int(fields[2], 8)):
                    next_frontier[int(fields[1])] = child
        frontier = next_frontier
    return found


def apply_metadata(image: Path, metadata: Metadata) -> None:
    """Set uid, gid and mode of every path in `metadata`: one debugfs -w run, sorted by path.

    The commands address inodes by number (see `_inode_numbers`); a path missing from the image is
    an error, as it would be for debugfs.
    """
    for path in metadata:
        check_guest_path(path, allow_root=True)
    inodes = _inode_numbers(image, list(metadata))
    missing = sorted(set(metadata) - set(inodes))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise BangerError(f'cannot set ownership in {image}: "{show_name(missing[0])}" is not in the image{more}')
    lines: list[str] = []
    for path in sorted(metadata):
        meta = metadata[path]
        lines += _sif_lines(path, meta.uid, meta.gid, meta.mode, ref=f"<{inodes[path]}>")
    if lines:
        _script(image, lines, write=True, what="set ownership")


# ------------------------------------------------------------------------------------------ editing


def _probe(image: Path, paths: Sequence[str]) -> dict[str, str | None]:
    """The inode type ("regular", "directory", "symlink", ...) of each path, or None if it is missing.

    One read-only run: each `stat` is echoed as `debugfs: stat "<path>"` on stdout, so the output is
    split at those lines; a path with no `Inode:` line after its echo does not exist.
    """
    if not paths:
        return {}
    out = _script(image, [f"stat {_q(p)}" for p in paths], write=False, what="stat",
                  tolerate=(_NOT_FOUND, _NOT_A_DIR))
    types: dict[str, str | None] = dict.fromkeys(paths)
    index = -1
    for line in out.decode("utf-8", "replace").split("\n"):  # not splitlines(): see _inode_numbers
        if line.startswith("debugfs: "):
            index += 1
            continue
        m = re.match(r"^Inode: \d+\s+Type: (.+?)\s+Mode:", line)
        if m and 0 <= index < len(paths):
            types[paths[index]] = m.group(1)
    return types


def _describe(kind: str) -> str:
    return "regular file" if kind == "regular" else kind


def _parents(path: str) -> list[str]:
    parts = path[1:].split("/")[:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def write_files(image: Path, files: Sequence[GuestFile]) -> None:
    """Create or replace files, directories and symlinks inside `image`, with exact owners and modes.

    Missing parent directories are created (root:root 0755, shallow first); an existing file or
    symlink at a target path is removed first (never written through); an existing directory where a
    file should go, or a non-directory in the way of a parent, is refused before anything changes.
    Everything is one read-only probe plus one `debugfs -w` run.
    """
    if not files:
        return
    for f in files:
        check_guest_path(f.path, allow_root=f.kind == "dir")
    wanted = {f.path for f in files}
    parents = sorted({p for f in files for p in _parents(f.path)} - wanted, key=lambda p: (p.count("/"), p))
    types = _probe(image, [*parents, *(f.path for f in files)])

    mkdirs: list[str] = []
    for p in parents:
        kind = types[p]
        if kind is None:
            mkdirs.append(p)
        elif kind not in ("directory", "symlink"):  # a symlinked parent is followed, as in the guest
            raise BadRequest(
                f'cannot create files under "{show_name(p)}" in {image}: it is a {_describe(kind)}, not a directory'
            )
    for f in files:
        kind = types[f.path]
        if f.kind == "dir":
            if kind is None:
                mkdirs.append(f.path)
            elif kind != "directory":
                raise BadRequest(f'cannot make directory "{show_name(f.path)}" in {image}: a {_describe(kind)} is there')
        elif kind == "directory":
            raise BadRequest(f'cannot write {f.kind} "{show_name(f.path)}" in {image}: a directory is there')
    mkdirs.sort(key=lambda p: (p.count("/"), p))

    with tempfile.TemporaryDirectory(prefix="banger-ext4-") as tmp:
        lines = [f"mkdir {_q(p)}" for p in mkdirs]
        for i, f in enumerate(files):
            if f.kind == "dir":
                continue
            if types[f.path] is not None:
                lines.append(f"rm {_q(f.path)}")
            if f.kind == "symlink":
                lines.append(f"symlink {_q(f.path)} {_q(f.target)}")
            else:
                host = Path(tmp) / str(i)
                fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(f.data or b"")
                lines.append(f"write {_q(os.fspath(host))} {_q(f.path)}")
        for f in files:
            type_bits = {"file": st.S_IFREG, "dir": st.S_IFDIR, "symlink": st.S_IFLNK}[f.kind]
            lines += _sif_lines(f.path, f.uid, f.gid, type_bits | (f.mode & 0o7777))
        _script(image, lines, write=True, what="write", tolerate=(_MKDIR_EXISTS,))


# ------------------------------------------------------------------------------------------ reading


def read_file(image: Path, path: str) -> bytes:
    """The contents of `path` in `image` (for a symlink: its target)."""
    check_guest_path(path)
    return _request(image, f"cat {_q(path)}", path=path)


def inode_info(image: Path, path: str) -> InodeInfo:
    check_guest_path(path, allow_root=True)
    text = _request(image, f"stat {_q(path)}", path=path).decode("utf-8", "replace")
    head = re.search(r"^Inode: \d+\s+Type: (.+?)\s+Mode:\s+([0-7]+)", text, re.M)
    owner = re.search(r"^User:\s+(\d+)\s+Group:\s+(\d+)(?:\s+Project:\s+\d+)?\s+Size:\s+(\d+)", text, re.M)
    links = re.search(r"^Links:\s+(\d+)", text, re.M)
    if not head or not owner or not links:
        raise BangerError(f'cannot parse debugfs stat output for "{show_name(path)}" in {image}')
    kind = head.group(1)
    mode = _TYPE_BITS.get(kind, 0) | int(head.group(2), 8)
    target = ""
    if kind == "symlink":
        fast = re.search(r'^Fast link dest: "(.*)"$', text, re.M)
        target = fast.group(1) if fast else read_file(image, path).decode("utf-8", "surrogateescape")
    return InodeInfo(
        uid=int(owner.group(1)),
        gid=int(owner.group(2)),
        mode=mode,
        links=int(links.group(1)),
        size=int(owner.group(3)),
        target=target,
    )


def stat(image: Path, path: str) -> Ext4Stat:
    """(uid, gid, mode incl. type bits) of `path` inside `image`."""
    info = inode_info(image, path)
    return Ext4Stat(info.uid, info.gid, info.mode)


def rdump(image: Path, guest_dir: str, host_dir: Path) -> Path:
    """Copy the directory tree `guest_dir` out of `image` into `host_dir/<basename>`; returns that path.

    Run unprivileged, the copies belong to the caller (debugfs' chown attempts fail and are ignored);
    modes are kept. `host_dir/<basename>` must not exist yet.
    """
    check_guest_path(guest_dir)
    target = host_dir / posixpath.basename(guest_dir)
    if target.exists() or target.is_symlink():
        raise BangerError(f"{target} already exists; refusing to rdump over it")
    _request(image, f"rdump {_q(guest_dir)} {_q(os.fspath(host_dir))}", path=guest_dir,
             tolerate=(_CHOWN_DENIED,))
    return target


def rdump_root(image: Path, host_dir: Path) -> None:
    """Copy everything in `image` (its root directory's contents) into the existing `host_dir`."""
    _request(image, f"rdump / {_q(os.fspath(host_dir))}", path="/", tolerate=(_CHOWN_DENIED,))
