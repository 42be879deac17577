"""The privilege split for real: a system-mode layout (relocated with BANGER_SYSTEM_PREFIX), the root
helper as root, the owner daemon as a real unprivileged user, and the CLI as that user."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from banger.system import installmeta
from tests.integration.conftest import SystemUser

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="needs root to run the helper and switch users")

REPO = Path(__file__).resolve().parents[2]
PY = [sys.executable, "-m"]


@dataclass
class SystemInstall:
    prefix: Path
    env: dict[str, str]
    owner: SystemUser
    helper: subprocess.Popen[bytes]
    daemon: subprocess.Popen[bytes]

    @property
    def helper_log(self) -> Path:
        return self.prefix / "helper.log"

    @property
    def daemon_log(self) -> Path:
        return self.prefix / "daemon.log"

    def cli(self, *args: str, user: SystemUser | None = None, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        argv = [*PY, "banger", *args]
        if user is not None:
            argv = user.argv(argv)
        return subprocess.run(argv, env=env or self.env, capture_output=True, text=True, timeout=60, cwd=REPO)


def _wait_socket(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited {proc.returncode}: {log.read_text()}")
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear: {log.read_text()}")


def _start(owner: SystemUser, helper_env: dict[str, str] | None = None) -> SystemInstall:
    probe = subprocess.run(owner.argv([sys.executable, "-c", "import banger"]), capture_output=True, cwd="/")
    if probe.returncode != 0:
        pytest.skip(f"the test user cannot read this checkout ({REPO}); the privilege-split test did not run")
    prefix = Path(tempfile.mkdtemp(prefix="bgs-"))
    prefix.chmod(0o755)
    home = prefix / "home/owner"
    home.mkdir(parents=True)
    os.chown(home, owner.uid, owner.gid)
    (prefix / "etc/banger").mkdir(parents=True)
    meta = installmeta.InstallMeta(owner.name, owner.uid, owner.gid, home, version="test")
    (prefix / "etc/banger/install.toml").write_text(installmeta.render(meta))
    for sub in ("var/lib/banger", "var/cache/banger", "run/banger"):
        d = prefix / sub
        d.mkdir(parents=True, mode=0o700)
        os.chown(d, owner.uid, owner.gid)
    (prefix / "run/banger-root").mkdir(mode=0o711)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "BANGER_SYSTEM_PREFIX": str(prefix), "NO_COLOR": "1",
           "LANG": "C.UTF-8"}
    with open(prefix / "helper.log", "wb") as hlog:
        helper = subprocess.Popen([*PY, "banger.roothelper.main", "--system"], env={**env, **(helper_env or {})},
                                  stdout=subprocess.DEVNULL, stderr=hlog, cwd=REPO)
    _wait_socket(prefix / "run/banger-root/bangerd-root.sock", helper, prefix / "helper.log")
    with open(prefix / "daemon.log", "wb") as dlog:
        daemon = subprocess.Popen(owner.argv([*PY, "banger.daemon.main", "--system"]), env=env,
                                  stdout=subprocess.DEVNULL, stderr=dlog, cwd=REPO)
    _wait_socket(prefix / "run/banger/bangerd.sock", daemon, prefix / "daemon.log")
    return SystemInstall(prefix, env, owner, helper, daemon)


def _stop(inst: SystemInstall) -> None:
    for proc in (inst.daemon, inst.helper):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    shutil.rmtree(inst.prefix, ignore_errors=True)


@pytest.fixture
def inst(owner_user: SystemUser) -> Iterator[SystemInstall]:
    installed = _start(owner_user)
    try:
        yield installed
    finally:
        _stop(installed)


def test_daemon_runs_as_the_unprivileged_owner(inst: SystemInstall) -> None:
    status = json.loads(inst.cli("system", "status", "--json", user=inst.owner).stdout)
    assert status["daemon"]["uid"] == inst.owner.uid != 0
    assert status["daemon"]["mode"] == "system"
    assert status["helper"]["owner_uid"] == inst.owner.uid
    # The daemon process really is the owner, and the sockets have the documented posture.
    daemon_pid = status["daemon"]["pid"]
    assert daemon_pid == inst.daemon.pid  # setpriv execs the daemon
    assert Path(f"/proc/{daemon_pid}").stat().st_uid == inst.owner.uid
    sock = inst.prefix / "run/banger/bangerd.sock"
    assert (sock.stat().st_mode & 0o777) == 0o600 and sock.stat().st_uid == inst.owner.uid
    hsock = inst.prefix / "run/banger-root/bangerd-root.sock"
    assert (hsock.stat().st_mode & 0o777) == 0o600 and hsock.stat().st_uid == inst.owner.uid
    assert json.loads(inst.cli("vm", "list", "--json", user=inst.owner).stdout) == []


def test_foreign_user_is_refused_by_cli_and_daemon(inst: SystemInstall, foreign_user: SystemUser) -> None:
    proc = inst.cli("vm", "list", user=foreign_user)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        f"banger: this banger install belongs to 'banger-owner-t' (uid {inst.owner.uid}); you are uid "
        f"{foreign_user.uid}; run banger as banger-owner-t, or reinstall with "
        "`sudo banger system install --owner $USER`")
    # Even with the socket opened up, SO_PEERCRED keeps the foreign uid out of the daemon.
    sock = inst.prefix / "run/banger/bangerd.sock"
    sock.chmod(0o666)
    (inst.prefix / "run/banger").chmod(0o755)
    code = ("from banger.rpc import client, protocol\n"
            f"try:\n    client.call(__import__('pathlib').Path('{sock}'), 'vm.list')\n"
            "except protocol.RpcError as e:\n    print(e.code, e.message)\n")
    out = subprocess.run(foreign_user.argv([sys.executable, "-c", code]), capture_output=True, text=True,
                         cwd=REPO).stdout.strip()
    assert out == f"unauthorized uid {foreign_user.uid} is not allowed to use this daemon (owner uid is {inst.owner.uid})"


def test_daemon_refuses_to_run_as_root_in_system_mode(inst: SystemInstall) -> None:
    proc = subprocess.run([*PY, "banger.daemon.main", "--system"], env=inst.env, capture_output=True, text=True,
                          timeout=30, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("bangerd: refusing to run as root in a system install; bangerd runs as the "
                                   f"owner 'banger-owner-t' (uid {inst.owner.uid})")


def test_op_id_reaches_cli_daemon_and_helper_logs(owner_user: SystemUser) -> None:
    # Fault injection: the helper fails priv.ping, so `system status` fails end to end.
    installed = _start(owner_user, helper_env={"BANGER_TEST_FAULT": "priv.ping"})
    try:
        proc = installed.cli("system", "status", user=owner_user)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        line = proc.stderr.strip()
        match = re.fullmatch(r"banger: (.*) \((op-[0-9a-f]{6})\)", line)
        assert match, line
        assert "injected fault" in match.group(1)
        op_id = match.group(2)
        daemon_entries = [json.loads(x) for x in installed.daemon_log.read_text().splitlines() if x.startswith("{")]
        helper_entries = [json.loads(x) for x in installed.helper_log.read_text().splitlines() if x.startswith("{")]
        assert any(e.get("op_id") == op_id and e.get("method") == "system.status" for e in daemon_entries)
        assert any(e.get("op_id") == op_id and e.get("method") == "priv.ping" and "duration_ms" in e
                   for e in helper_entries)
    finally:
        _stop(installed)
