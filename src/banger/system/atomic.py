"""Swapping a file or symlink for a new one, keeping the old one to roll back to.

`atomic_replace(new_src, dst, suffix)` leaves `dst` pointing at the new content and a backup of the
old content at `dst + suffix`. The backup is made first, as a second name for the old content (a hard
link for a file, a copy of the link for a symlink), and then one `rename(2)` puts `new_src` in place:
at no moment is `dst` missing, and a failed rename leaves `dst` as it was. `atomic_replace_rollback`
renames the backup back over `dst` (one rename again) and, when there is no backup because `dst` did not
exist before, removes `dst`; so failure paths can call it unconditionally. Both work within one
directory, hence one filesystem.

The reference's AtomicReplace moved `dst` aside and then renamed the new file in, which leaves a short
window without `dst`; the link-then-rename order here has none, with the same observable results.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from pathlib import Path

from banger.errors import BadRequest, BangerError


def backup_path(dst: Path, suffix_previous: str) -> Path:
    if not suffix_previous:
        raise BadRequest("the backup suffix must not be empty (the backup would overwrite the target itself)")
    if "/" in suffix_previous or "\0" in suffix_previous:
        raise BadRequest(f"backup suffix {suffix_previous!r} must not contain '/' or NUL")
    return dst.with_name(dst.name + suffix_previous)


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except FileNotFoundError:
        return None


def _check_swappable(path: Path, st: os.stat_result, role: str) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise BangerError(f"{role} {path} is a directory; only files and symlinks are swapped atomically")


def _second_name(dst: Path, st: os.stat_result, tmp: Path) -> None:
    """Make `tmp` another name for what `dst` is now, without touching `dst`."""
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(dst), tmp)
        return
    try:
        os.link(dst, tmp, follow_symlinks=False)
    except OSError as exc:
        # Filesystems without hard links: a copy is as good a backup, only slower.
        if exc.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK):
            raise
        shutil.copy2(dst, tmp, follow_symlinks=False)


def atomic_replace(new_src: Path, dst: Path, suffix_previous: str) -> bool:
    """Put `new_src` at `dst`, keeping the previous `dst` at `dst + suffix_previous`.

    Returns True when a backup was made (dst existed). A stale backup from a half-finished earlier run
    is replaced by the current `dst`; with no `dst` (a fresh install) a stale backup is removed, so a
    rollback removes `dst` instead of resurrecting it.
    """
    backup = backup_path(dst, suffix_previous)
    src_st = _lstat(new_src)
    if src_st is None:
        raise BangerError(f"cannot swap in {new_src}: it does not exist")
    _check_swappable(new_src, src_st, "new file")
    dst_st = _lstat(dst)
    try:
        if dst_st is None:
            with contextlib.suppress(FileNotFoundError):
                backup.unlink()
            os.replace(new_src, dst)
            return False
        _check_swappable(dst, dst_st, "target")
        tmp = dst.with_name(f".{dst.name}{suffix_previous}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        _second_name(dst, dst_st, tmp)
        try:
            os.replace(tmp, backup)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        try:
            os.replace(new_src, dst)
        except OSError:
            # dst is untouched by a failed rename; drop the backup so nothing looks half-swapped.
            with contextlib.suppress(OSError):
                backup.unlink()
            raise
        return True
    except OSError as exc:
        raise BangerError(f"cannot replace {dst} with {new_src}: {exc.strerror or exc}") from exc


def atomic_replace_rollback(dst: Path, suffix_previous: str) -> None:
    """Undo `atomic_replace`: the backup goes back to `dst`; with no backup, `dst` is removed."""
    backup = backup_path(dst, suffix_previous)
    try:
        backup_st = _lstat(backup)
        if backup_st is None:
            dst_st = _lstat(dst)
            if dst_st is not None:
                _check_swappable(dst, dst_st, "target")
                dst.unlink()
            return
        _check_swappable(backup, backup_st, "backup")
        os.replace(backup, dst)
    except OSError as exc:
        raise BangerError(f"cannot restore {dst} from {backup}: {exc.strerror or exc}") from exc


def remove_backup(dst: Path, suffix_previous: str) -> None:
    """After a successful swap: the backup is no longer needed."""
    backup = backup_path(dst, suffix_previous)
    with contextlib.suppress(FileNotFoundError):
        backup.unlink()
