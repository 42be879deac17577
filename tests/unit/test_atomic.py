from __future__ import annotations

import os
from pathlib import Path

import pytest

from banger.errors import BadRequest, BangerError
from banger.system.atomic import atomic_replace, atomic_replace_rollback, remove_backup

SUFFIX = ".previous"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_happy_path_keeps_the_previous_file(tmp_path: Path) -> None:
    dst = _write(tmp_path / "banger", "old")
    new = _write(tmp_path / "banger.new", "new")
    old_inode = dst.stat().st_ino
    assert atomic_replace(new, dst, SUFFIX) is True
    assert dst.read_text() == "new"
    backup = tmp_path / "banger.previous"
    assert backup.read_text() == "old"
    assert backup.stat().st_ino == old_inode  # the same file, not a copy
    assert not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["banger", "banger.previous"]


def test_fresh_install_has_no_backup(tmp_path: Path) -> None:
    dst = tmp_path / "banger"
    new = _write(tmp_path / "banger.new", "new")
    assert atomic_replace(new, dst, SUFFIX) is False
    assert dst.read_text() == "new"
    assert not (tmp_path / "banger.previous").exists()


def test_stale_previous_from_a_half_finished_run_is_replaced(tmp_path: Path) -> None:
    dst = _write(tmp_path / "banger", "current")
    _write(tmp_path / "banger.previous", "stale from an earlier crash")
    new = _write(tmp_path / "banger.new", "new")
    atomic_replace(new, dst, SUFFIX)
    assert dst.read_text() == "new"
    assert (tmp_path / "banger.previous").read_text() == "current"
    atomic_replace_rollback(dst, SUFFIX)
    assert dst.read_text() == "current"


def test_stale_previous_is_dropped_on_fresh_install(tmp_path: Path) -> None:
    dst = tmp_path / "banger"
    _write(tmp_path / "banger.previous", "stale")
    atomic_replace(_write(tmp_path / "new", "new"), dst, SUFFIX)
    assert not (tmp_path / "banger.previous").exists()
    atomic_replace_rollback(dst, SUFFIX)  # must remove dst, not resurrect the stale file
    assert not dst.exists()


def test_empty_suffix_is_refused(tmp_path: Path) -> None:
    dst = _write(tmp_path / "banger", "old")
    new = _write(tmp_path / "banger.new", "new")
    with pytest.raises(BadRequest, match="must not be empty"):
        atomic_replace(new, dst, "")
    with pytest.raises(BadRequest, match="must not be empty"):
        atomic_replace_rollback(dst, "")
    assert dst.read_text() == "old" and new.read_text() == "new"


def test_rollback_restores_the_previous_file(tmp_path: Path) -> None:
    dst = _write(tmp_path / "banger", "old")
    dst.chmod(0o755)
    atomic_replace(_write(tmp_path / "banger.new", "new"), dst, SUFFIX)
    atomic_replace_rollback(dst, SUFFIX)
    assert dst.read_text() == "old"
    assert dst.stat().st_mode & 0o777 == 0o755
    assert not (tmp_path / "banger.previous").exists()


def test_rollback_without_backup_removes_the_new_file(tmp_path: Path) -> None:
    dst = tmp_path / "banger"
    atomic_replace(_write(tmp_path / "banger.new", "new"), dst, SUFFIX)
    atomic_replace_rollback(dst, SUFFIX)
    assert not dst.exists()
    atomic_replace_rollback(dst, SUFFIX)  # nothing there at all: still fine


def test_symlink_swap_never_leaves_the_link_missing(tmp_path: Path) -> None:
    (tmp_path / "versions/1").mkdir(parents=True)
    (tmp_path / "versions/2").mkdir(parents=True)
    current = tmp_path / "current"
    current.symlink_to("versions/1")
    new = tmp_path / "current.new"
    new.symlink_to("versions/2")
    atomic_replace(new, current, SUFFIX)
    assert os.readlink(current) == "versions/2"
    assert os.readlink(tmp_path / "current.previous") == "versions/1"
    atomic_replace_rollback(current, SUFFIX)
    assert os.readlink(current) == "versions/1"
    remove_backup(current, SUFFIX)


def test_failed_rename_leaves_the_target_and_no_backup(tmp_path: Path) -> None:
    dst = _write(tmp_path / "banger", "old")
    (tmp_path / "dir").mkdir()
    with pytest.raises(BangerError, match="is a directory"):
        atomic_replace(tmp_path / "dir", dst, SUFFIX)
    with pytest.raises(BangerError, match="does not exist"):
        atomic_replace(tmp_path / "missing", dst, SUFFIX)
    assert dst.read_text() == "old"
    assert not (tmp_path / "banger.previous").exists()


def test_rename_error_after_backup_keeps_dst(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Fault injection: the final rename fails (as it would on EIO or a read-only remount) after the
    # backup was made; dst must be untouched and the backup dropped again.
    dst = _write(tmp_path / "banger", "old")
    new = _write(tmp_path / "banger.new", "new")
    real_replace = os.replace

    def failing_replace(src: object, target: object) -> None:
        if Path(str(src)) == new:
            raise OSError(5, "Input/output error")
        real_replace(src, target)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(BangerError, match=r"cannot replace .*Input/output error"):
        atomic_replace(new, dst, SUFFIX)
    assert dst.read_text() == "old"
    assert new.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["banger", "banger.new"]
