"""The root helper gives /dev/net/tun udev's default mode where no udev runs (real device nodes, real chmod)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from banger.roothelper.devices import ensure_tun_mode

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mknod")


def _tun_node(directory: Path, mode: int = 0o600) -> Path:
    node = directory / "tun"
    os.mknod(node, stat.S_IFCHR | mode, os.makedev(10, 200))
    node.chmod(mode)
    return node


def test_without_udev_the_node_gets_udevs_mode(tmp_path: Path) -> None:
    node = _tun_node(tmp_path)
    said = ensure_tun_mode(1000, node, tmp_path / "no-udev")
    assert said == f"{node} was 0600 with no udev to set it; made it 0666 as udev's default rule does"
    assert stat.S_IMODE(node.stat().st_mode) == 0o666
    assert ensure_tun_mode(1000, node, tmp_path / "no-udev") is None  # idempotent


@pytest.mark.parametrize("case", ["udev runs", "owner is root", "not a device", "a symlink", "missing"])
def test_left_alone(tmp_path: Path, case: str) -> None:
    udev = tmp_path / "udev"
    owner = 1000
    if case == "udev runs":
        udev.mkdir()
        target = _tun_node(tmp_path)
    elif case == "owner is root":
        owner = 0
        target = _tun_node(tmp_path)
    elif case == "not a device":
        target = tmp_path / "tun"
        target.write_text("")
        target.chmod(0o600)
    elif case == "a symlink":
        real = _tun_node(tmp_path)
        target = tmp_path / "link"
        target.symlink_to(real)
    else:
        target = tmp_path / "absent"
    assert ensure_tun_mode(owner, target, udev) is None
    if case == "a symlink":
        assert stat.S_IMODE((tmp_path / "tun").stat().st_mode) == 0o600
    elif target.exists():
        assert stat.S_IMODE(target.lstat().st_mode) == 0o600
