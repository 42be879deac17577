from __future__ import annotations

import os
from pathlib import Path

import pytest

from banger import paths
from banger.errors import BangerError


def test_user_layout_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    layout = paths.resolve_user()
    assert layout.config_file == tmp_path / "cfg/banger/config.toml"
    assert layout.db_path == tmp_path / "state/banger/state.db"
    assert layout.oci_cache_dir == tmp_path / "cache/banger/oci"
    assert layout.daemon_socket == tmp_path / "run/banger/bangerd.sock"
    assert layout.known_hosts == tmp_path / "home/.local/state/banger/ssh/known_hosts"
    assert layout.vm_dir("abc") == tmp_path / "state/banger/vms/abc"


def test_user_layout_defaults_and_runtime_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    layout = paths.resolve_user()
    assert layout.config_dir == tmp_path / ".config/banger"
    assert layout.state_dir == tmp_path / ".local/state/banger"
    assert layout.cache_dir == tmp_path / ".cache/banger"
    assert layout.runtime_dir == Path(f"/tmp/banger-runtime-{os.getuid()}")


def test_system_layout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BANGER_SYSTEM_PREFIX", raising=False)
    layout = paths.resolve_system(Path("/home/alice"))
    assert layout.config_file == Path("/etc/banger/config.toml")
    assert layout.db_path == Path("/var/lib/banger/state.db")
    assert layout.oci_cache_dir == Path("/var/cache/banger/oci")
    assert layout.daemon_socket == Path("/run/banger/bangerd.sock")
    assert layout.helper_socket == Path("/run/banger-root/bangerd-root.sock")
    assert layout.known_hosts == Path("/home/alice/.local/state/banger/ssh/known_hosts")
    monkeypatch.setenv("BANGER_SYSTEM_PREFIX", str(tmp_path))
    assert paths.resolve_system(Path("/h")).state_dir == tmp_path / "var/lib/banger"
    assert paths.system_install_meta() == tmp_path / "etc/banger/install.toml"


def test_private_dir_created_0700(tmp_path: Path) -> None:
    target = tmp_path / "rt"
    paths.ensure_private_dir(target)
    assert (target.stat().st_mode & 0o777) == 0o700
    target.chmod(0o755)
    paths.ensure_private_dir(target)
    assert (target.stat().st_mode & 0o777) == 0o700


def test_private_dir_refuses_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(BangerError, match="is a symlink; refusing to use it"):
        paths.ensure_private_dir(link)


def test_private_dir_refuses_file(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(BangerError, match="is not a directory"):
        paths.ensure_private_dir(f)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make a directory owned by someone else")
def test_private_dir_refuses_foreign_owner(tmp_path: Path) -> None:
    d = tmp_path / "foreign"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(BangerError, match="is owned by uid 65534"):
        paths.ensure_private_dir(d)
