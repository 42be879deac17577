"""What the unpacked tree of an OCI image has and lacks, and what banger adds so its init can run.

Paths are resolved inside the tree the way the guest would resolve them (absolute symlinks from the
tree's root, `..` never above it), so a hostile image cannot make the host read its own files here.
Container images often lack tools banger's init scripts call (`ip`, `reboot`; minimal ones even
`/bin/sh`) and mount points (`/proc`, `/run`); a static busybox from the host fills the gaps.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from banger.images.ext4 import FileMeta, Metadata
from banger.images.inject import GuestFile
from banger.system.run import find_binary

BUSYBOX_PATH = "/usr/local/libexec/banger-busybox"
SHIM_DIR = "/usr/local/sbin"
# Tools banger-init, banger-fast-init, banger-network and banger-first-boot call; a missing one is
# provided by a static busybox from the host (container images often lack `ip` and `reboot`).
SHIM_TOOLS = ("ip", "reboot", "mount", "umount", "pivot_root", "chroot", "hostname", "sleep", "cat",
              "mkdir", "tail", "grep", "rm")
_BIN_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
# Mount points banger-init and banger-fast-init mount on; minimal images (busybox) lack some.
MOUNT_POINTS = {"/proc": 0o555, "/sys": 0o555, "/dev": 0o755, "/run": 0o755, "/tmp": 0o1777, "/mnt": 0o755,
                "/root": 0o700}


def guest_path(tree: Path, path: str, hops: int = 40) -> Path | None:
    """Where guest `path` lives inside `tree`, symlinks resolved as the guest would (never leaving the
    tree); None if it does not exist or resolves in circles."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    cur: list[str] = []
    while parts:
        part = parts.pop(0)
        if part == "..":
            if cur:
                cur.pop()
            continue
        candidate = tree.joinpath(*cur, part)
        try:
            info = os.lstat(candidate)
        except OSError:
            return None
        if stat.S_ISLNK(info.st_mode):
            hops -= 1
            if hops < 0:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                cur = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        cur.append(part)
    return tree.joinpath(*cur)


def read_guest(tree: Path, path: str, limit: int = 65536) -> str:
    found = guest_path(tree, path)
    if found is None:
        return ""
    try:
        fd = os.open(found, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            return ""
        return handle.read(limit).decode("utf-8", "replace")


def has_tool(tree: Path, tool: str) -> bool:
    for directory in _BIN_DIRS:
        found = guest_path(tree, f"{directory}/{tool}")
        if found is not None:
            with contextlib.suppress(OSError):
                info = os.stat(found, follow_symlinks=False)
                if stat.S_ISREG(info.st_mode) and info.st_mode & 0o111:
                    return True
    return False


def add_mount_points(tree: Path, metadata: Metadata, warnings: list[str]) -> None:
    for path, mode in MOUNT_POINTS.items():
        host = tree / path[1:]
        try:
            info = os.lstat(host)
        except FileNotFoundError:
            host.mkdir(mode=0o755)
            metadata[path] = FileMeta(0, 0, stat.S_IFDIR | mode, "dir")
            continue
        if not stat.S_ISDIR(info.st_mode):
            warnings.append(f"{path} is not a directory in this image; banger's init needs it to be one")


def static_busybox() -> Path | None:
    """The host's busybox if it is a static x86-64 ELF (no program interpreter), else None."""
    found = find_binary("busybox")
    if found is None:
        return None
    try:
        data = Path(found).read_bytes()
    except OSError:
        return None
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[18] != 62:  # ELF64, x86-64
        return None
    phoff = int.from_bytes(data[32:40], "little")
    phentsize = int.from_bytes(data[54:56], "little")
    phnum = int.from_bytes(data[56:58], "little")
    for i in range(phnum):
        if int.from_bytes(data[phoff + i * phentsize : phoff + i * phentsize + 4], "little") == 3:  # PT_INTERP
            return None
    return Path(found)


def shims(tree: Path, warnings: list[str]) -> list[GuestFile]:
    missing = [tool for tool in SHIM_TOOLS if not has_tool(tree, tool)]
    no_sh = guest_path(tree, "/bin/sh") is None
    if not missing and not no_sh:
        return []
    busybox = static_busybox()
    if busybox is None:
        warnings.append(f"the image lacks {', '.join(missing or ['/bin/sh'])} and the host has no static busybox "
                        "to provide them (install busybox-static)")
        return []
    files = [GuestFile(BUSYBOX_PATH, busybox.read_bytes(), 0o755)]
    files += [GuestFile(f"{SHIM_DIR}/{tool}", None, 0o777, kind="symlink", target=BUSYBOX_PATH) for tool in missing]
    if no_sh:
        files.append(GuestFile("/bin/sh", None, 0o777, kind="symlink", target=BUSYBOX_PATH))
    return files
