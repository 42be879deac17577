"""The files every image carries: paths, modes, exact script bytes, and units that systemd would enable."""

from __future__ import annotations

import configparser
import fnmatch
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import banger
from banger.images.guestfiles import guest_files
from banger.images.inject import GuestFile, validate

PACKAGE_FILES = Path(banger.__file__).resolve().parent / "guest" / "files"
REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ("banger-init", "banger-fast-init", "banger-network")
UNITS = "/etc/systemd/system"

EXPECTED: dict[str, tuple[str, int]] = {
    "/usr/local/libexec/banger-init": ("file", 0o755),
    "/usr/local/libexec/banger-fast-init": ("file", 0o755),
    "/usr/local/libexec/banger-network": ("file", 0o755),
    "/usr/local/bin/banger-agent": ("file", 0o755),
    "/usr/local/lib/banger": ("dir", 0o755),
    "/usr/local/lib/banger/banger_agent.py": ("file", 0o644),
    "/usr/local/lib/banger/__pycache__": ("dir", 0o755),
    f"/usr/local/lib/banger/__pycache__/banger_agent.{sys.implementation.cache_tag}.pyc": ("file", 0o644),
    f"{UNITS}/banger-agent.service": ("file", 0o644),
    f"{UNITS}/multi-user.target.wants/banger-agent.service": ("symlink", 0o777),
    "/etc/banger": ("dir", 0o755),
    f"{UNITS}/banger-network.service": ("file", 0o644),
    f"{UNITS}/multi-user.target.wants/banger-network.service": ("symlink", 0o777),
    f"{UNITS}/banger-ssh-hostkeys.service": ("file", 0o644),
    f"{UNITS}/multi-user.target.wants/banger-ssh-hostkeys.service": ("symlink", 0o777),
    f"{UNITS}/ctrl-alt-del.target": ("symlink", 0o777),
    f"{UNITS}/e2scrub_reap.service": ("symlink", 0o777),
    f"{UNITS}/e2scrub_all.timer": ("symlink", 0o777),
    "/etc/ssh/sshd_config.d/banger.conf": ("file", 0o644),
    "/etc/fstab": ("file", 0o644),
}


def by_path() -> dict[str, GuestFile]:
    return {f.path: f for f in guest_files()}


def unit(path: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    data = by_path()[path].data
    assert data is not None
    parser.read_string(data.decode())
    return parser


def test_paths_kinds_modes_and_owners() -> None:
    files = guest_files()
    assert {f.path: (f.kind, f.mode) for f in files} == EXPECTED
    assert len(files) == len(EXPECTED)  # no path listed twice
    assert all(f.uid == 0 and f.gid == 0 for f in files)
    validate(files)  # what inject() checks before writing anything


def test_scripts_are_the_package_files_byte_for_byte() -> None:
    files = by_path()
    for name in SCRIPTS:
        on_disk = PACKAGE_FILES / name
        assert files[f"/usr/local/libexec/{name}"].data == on_disk.read_bytes(), name
        assert on_disk.read_bytes().startswith(b"#!/bin/sh\n"), name
        assert os.stat(on_disk).st_mode & stat.S_IXUSR, f"{name} is not executable in the source tree"


def test_scripts_ship_as_package_data() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["banger"]
    for name in SCRIPTS:
        rel = f"guest/files/{name}"
        assert any(fnmatch.fnmatch(rel, pattern) for pattern in patterns), f"{rel} is not package data"


def test_enable_symlinks_point_at_units_with_the_matching_install_section() -> None:
    files = by_path()
    for name in ("banger-network.service", "banger-ssh-hostkeys.service", "banger-agent.service"):
        link = files[f"{UNITS}/multi-user.target.wants/{name}"]
        assert link.target == f"{UNITS}/{name}"
        assert unit(f"{UNITS}/{name}")["Install"]["WantedBy"] == "multi-user.target"


def test_network_unit() -> None:
    u = unit(f"{UNITS}/banger-network.service")
    assert u["Service"]["Type"] == "oneshot"
    assert u["Service"]["RemainAfterExit"] == "yes"
    assert {"network.target", "ssh.service"} <= set(u["Unit"]["Before"].split())
    exec_start = u["Service"]["ExecStart"]
    assert exec_start == "/usr/local/libexec/banger-network" and exec_start in by_path()
    assert u["Unit"]["ConditionPathExists"] == "/etc/banger/network.env"
    script = (PACKAGE_FILES / "banger-network").read_text()
    assert ". /etc/banger/network.env" in script  # the condition names the file the script reads


def test_host_key_unit_and_sshd_agree_on_the_key() -> None:
    key = "/etc/ssh/ssh_host_ed25519_key"
    u = unit(f"{UNITS}/banger-ssh-hostkeys.service")
    assert u["Unit"]["ConditionPathExists"] == f"!{key}"
    assert u["Unit"]["Before"] == "ssh.service"
    assert u["Service"]["ExecStart"] == f'/usr/bin/ssh-keygen -q -t ed25519 -N "" -f {key}'
    conf = by_path()["/etc/ssh/sshd_config.d/banger.conf"].data
    assert conf is not None
    settings = dict(line.split(None, 1) for line in conf.decode().splitlines() if line and not line.startswith("#"))
    assert settings == {
        "HostKey": key,
        "PermitRootLogin": "prohibit-password",
        "PasswordAuthentication": "no",
        "KbdInteractiveAuthentication": "no",
        "UseDNS": "no",
    }
    # The fast init makes the same key when systemd is not used.
    assert f'ssh-keygen -q -t ed25519 -N "" -f {key}' in (PACKAGE_FILES / "banger-fast-init").read_text()


def test_fstab_mounts_only_the_work_disk() -> None:
    data = by_path()["/etc/fstab"].data
    assert data is not None
    entries = [line.split() for line in data.decode().splitlines() if line.strip() and not line.startswith("#")]
    assert entries == [["/dev/vdc", "/root", "ext4", "defaults,noatime,nofail", "0", "0"]]


def test_ctrl_alt_del_powers_off_and_slow_units_are_masked() -> None:
    files = by_path()
    assert files[f"{UNITS}/ctrl-alt-del.target"].target == "/lib/systemd/system/poweroff.target"
    assert files[f"{UNITS}/e2scrub_reap.service"].target == "/dev/null"
    assert files[f"{UNITS}/e2scrub_all.timer"].target == "/dev/null"


def test_agent_is_the_package_file_and_runs_with_the_guest_python() -> None:
    files = by_path()
    assert files["/usr/local/lib/banger/banger_agent.py"].data == (REPO / "src/banger/guest/agent.py").read_bytes()
    launcher = files["/usr/local/bin/banger-agent"].data
    assert launcher is not None and launcher.startswith(b"#!/usr/bin/python3 -S\n")


def _write_tree(root: Path, only: tuple[str, ...]) -> None:
    for f in guest_files():
        if f.path.startswith(only) and f.kind == "file" and f.data is not None:
            dest = root / f.path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.data)
            dest.chmod(f.mode)


def test_agent_starts_from_its_shipped_bytecode(tmp_path: Path) -> None:
    """The launcher imports the agent module and Python takes the shipped pyc instead of compiling the
    source (`python -v` names the file each code object came from); the launcher's path is rewritten
    to the tree written here."""
    _write_tree(tmp_path, ("/usr/local/lib/banger", "/usr/local/bin/banger-agent"))
    lib = tmp_path / "usr/local/lib/banger"
    launcher = (tmp_path / "usr/local/bin/banger-agent").read_text().replace("/usr/local/lib/banger", str(lib))
    (lib / "__pycache__").chmod(0o555)  # nothing may be (re)written: the pyc must be used as shipped
    try:
        proc = subprocess.run([sys.executable, "-B", "-v", "-c", launcher.replace("run()", "print(run)"),
                               "--help"], capture_output=True, text=True, timeout=60)
    finally:
        (lib / "__pycache__").chmod(0o755)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("<function run at ")
    pyc = lib / "__pycache__" / f"banger_agent.{sys.implementation.cache_tag}.pyc"
    assert f"# code object from '{pyc}'" in proc.stderr


def test_stale_agent_bytecode_is_not_trusted(tmp_path: Path) -> None:
    """A pyc that does not match the source beside it (an edited agent) is ignored: checked hash."""
    _write_tree(tmp_path, ("/usr/local/lib/banger",))
    lib = tmp_path / "usr/local/lib/banger"
    (lib / "banger_agent.py").write_text("run = 'edited source'\n")
    proc = subprocess.run([sys.executable, "-B", "-c", f"import sys; sys.path.insert(0, {str(lib)!r}); "
                           "import banger_agent; print(banger_agent.run)"], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout == "edited source\n", proc.stderr
