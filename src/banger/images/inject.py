"""Files banger puts into guest images (agents, units, keys), written without mounting the image.

`GuestFile` describes one file, directory or symlink by its absolute guest path; `inject` checks a
batch and writes it with `ext4.write_files` (one debugfs run). What banger injects is decided by the
callers; this module only guarantees that whatever they ask for lands exactly where they said.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from banger.errors import BadRequest
from banger.images import ext4
from banger.images.ext4 import Kind


@dataclass(frozen=True)
class GuestFile:
    path: str  # absolute path inside the guest
    data: bytes | None  # contents for kind "file"; None otherwise
    mode: int  # permission bits (0o7777); the type bits come from `kind`
    uid: int = 0
    gid: int = 0
    kind: Kind = "file"
    target: str = ""  # for kind "symlink"


def validate(files: Sequence[GuestFile]) -> None:
    """Raise BadRequest for the first file that cannot be written as asked."""
    seen: set[str] = set()
    for f in files:
        ext4.check_guest_path(f.path, allow_root=f.kind == "dir")
        shown = ext4.show_name(f.path)
        if f.path in seen:
            raise BadRequest(f'guest path "{shown}" is listed twice')
        seen.add(f.path)
        if f.kind not in ("file", "dir", "symlink"):
            raise BadRequest(f'guest path "{shown}": kind {f.kind!r} is not one of file, dir, symlink')
        if not 0 <= f.mode <= 0o7777:
            raise BadRequest(f'guest path "{shown}": mode {f.mode:#o} is not within 0o7777')
        if f.kind == "file" and f.data is None:
            raise BadRequest(f'guest file "{shown}" has no data')
        if f.kind != "file" and f.data is not None:
            raise BadRequest(f'guest {f.kind} "{shown}" cannot carry data')
        if f.kind == "symlink":
            if not f.target or not ext4.encodable(f.target):
                raise BadRequest(
                    f'guest symlink "{shown}" has target "{ext4.show_name(f.target)}"; it must be non-empty '
                    f"and encodable ({ext4.ENCODING_RULE})"
                )
        elif f.target:
            raise BadRequest(f'guest {f.kind} "{shown}" cannot have a symlink target')
    kinds = {f.path: f.kind for f in files}
    for f in files:
        # Something listed inside an entry that is not a directory could never be written.
        parent = posixpath.dirname(f.path)
        while parent != "/":
            if kinds.get(parent, "dir") != "dir":
                raise BadRequest(
                    f'guest path "{ext4.show_name(f.path)}" is inside "{ext4.show_name(parent)}", '
                    f"which is listed as a {kinds[parent]}"
                )
            parent = posixpath.dirname(parent)


def inject(image: Path, files: Sequence[GuestFile]) -> None:
    """Write `files` into the ext4 `image` (owners and modes exact, parents created as root:root 0755)."""
    validate(files)
    ext4.write_files(image, files)
