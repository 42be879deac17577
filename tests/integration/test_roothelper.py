"""bangerd-root for real: a helper process in a throwaway network namespace, called as root, as the
owner user and as a foreign user, making real bridges and taps and signalling real processes."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from banger import log as blog
from banger.roothelper.client import HelperClient, HelperUnreachable
from banger.rpc import client
from banger.rpc.protocol import RpcError
from tests.integration.conftest import SystemUser

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, users)"),
]

CLIENT_SCRIPT = r"""
import json, sys
from pathlib import Path
from banger.rpc import client, protocol
answers = []
for _ in range(int(sys.argv[4])):
    try:
        answers.append({"result": client.call(Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), timeout=10)})
    except protocol.RpcError as exc:
        answers.append({"error": {"code": exc.code, "message": exc.message}})
    except client.Unreachable as exc:
        answers.append({"unreachable": exc.message})
    except OSError as exc:
        answers.append({"oserror": str(exc)})
print(json.dumps(answers))
"""

# What an unprivileged VMM does with its tap: TUNSETIFF(IFF_TAP | IFF_NO_PI) on a tun device node.
TAP_OPEN_SCRIPT = r"""
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", sys.argv[2].encode(), 0x0002 | 0x1000))
    print("opened")
except OSError as exc:
    print(f"errno {exc.errno}")
"""

# A stand-in VMM: argv[0] says qemu-system-x86_64, the arguments name banger's directories.
SLEEPER = "import time; time.sleep(120)"


@dataclass
class Helper:
    ns: str
    base: Path
    owner: SystemUser
    socket: Path
    log_file: Path
    state_dir: Path
    cache_dir: Path
    runtime_dir: Path
    proc: subprocess.Popen[bytes]

    @property
    def pidfile(self) -> Path:
        return self.socket.with_suffix(".pid")

    def call(self, method: str, params: dict[str, Any] | None = None, *, op_id: str | None = None) -> Any:
        return client.call(self.socket, method, params, op_id=op_id, timeout=15)

    def error(self, method: str, params: dict[str, Any] | None = None) -> RpcError:
        with pytest.raises(RpcError) as exc:
            self.call(method, params)
        return exc.value

    def call_as(
        self, user: SystemUser, method: str, params: dict[str, Any] | None = None, *, repeat: int = 1
    ) -> list[dict[str, Any]]:
        """The answers to `repeat` calls made by `user` (a fresh connection each)."""
        argv = user.argv([sys.executable, "-c", CLIENT_SCRIPT, str(self.socket), method, json.dumps(params or {}),
                          str(repeat)])
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True,
                              env={"PATH": os.environ["PATH"], "HOME": "/"})
        answers: list[dict[str, Any]] = json.loads(proc.stdout)
        return answers

    def ip(self, *args: str) -> Any:
        out = subprocess.run(["ip", "-n", self.ns, "-j", "-d", *args], capture_output=True, text=True, check=True)
        return json.loads(out.stdout) if out.stdout.strip() else []

    def links(self) -> dict[str, dict[str, Any]]:
        return {link["ifname"]: link for link in self.ip("link", "show")}

    def sys_net(self, dev: str, attr: str) -> str:
        return subprocess.run(["ip", "netns", "exec", self.ns, "cat", f"/sys/class/net/{dev}/{attr}"],
                              capture_output=True, text=True, check=True).stdout.strip()

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_file.read_text().splitlines() if line.strip()]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)


def helper_argv(ns: str, base: Path, owner_uid: int, sock: Path) -> list[str]:
    return [
        "ip", "netns", "exec", ns, sys.executable, "-m", "banger.roothelper.main",
        "--owner-uid", str(owner_uid), "--socket", str(sock),
        "--state-dir", str(base / "state"), "--cache-dir", str(base / "cache"),
        "--runtime-dir", str(base / "run"), "--log-file", str(base / "helper.log"),
    ]


def helper_env(base: Path) -> dict[str, str]:
    # Root's own layout points into the scratch directory, so the helper never touches /root or /run.
    return {
        "PATH": os.environ["PATH"], "HOME": str(base / "root-home"),
        "XDG_RUNTIME_DIR": str(base / "root-xdg-run"), "XDG_STATE_HOME": str(base / "root-home/state"),
        "XDG_CACHE_HOME": str(base / "root-home/cache"), "XDG_CONFIG_HOME": str(base / "root-home/config"),
    }


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"banger-t-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        # Deleting the namespace also deletes every bridge and tap created in it.
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def base(owner_user: SystemUser) -> Iterator[Path]:
    # Not pytest's tmp_path: that is 0700 root, and the owner user must reach the socket.
    path = Path(tempfile.mkdtemp(prefix="banger-rh-"))
    path.chmod(0o755)
    for sub in ("state", "cache", "run"):
        (path / sub).mkdir()
        os.chown(path / sub, owner_user.uid, owner_user.gid)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def helper(netns: str, base: Path, owner_user: SystemUser) -> Iterator[Helper]:
    sock = base / "helper-run" / "bangerd-root.sock"
    with open(base / "helper.stderr", "wb") as stderr:
        proc = subprocess.Popen(helper_argv(netns, base, owner_user.uid, sock), env=helper_env(base),
                                stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
    h = Helper(netns, base, owner_user, sock, base / "helper.log", base / "state", base / "cache", base / "run", proc)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.fail(f"bangerd-root exited with {proc.returncode}: {(base / 'helper.stderr').read_text()}")
            try:
                h.call("priv.ping")
                break
            except client.Unreachable:
                if time.monotonic() > deadline:
                    pytest.fail("bangerd-root did not answer within 20s")
                time.sleep(0.05)
        yield h
    finally:
        h.stop()


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)


# --- process, socket, authorization -------------------------------------------------------------------


def test_ping_as_root_and_owner_and_socket_permissions(helper: Helper, owner_user: SystemUser) -> None:
    answer = helper.call("priv.ping")
    assert answer["pid"] == helper.proc.pid
    assert answer["owner_uid"] == owner_user.uid
    assert isinstance(answer["version"], str) and answer["version"]

    (as_owner,) = helper.call_as(owner_user, "priv.ping")
    assert as_owner["result"]["pid"] == helper.proc.pid

    st = helper.socket.lstat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == owner_user.uid
    dst = helper.socket.parent.lstat()
    assert stat.S_IMODE(dst.st_mode) == 0o711 and dst.st_uid == 0
    assert helper.pidfile.read_text().strip() == str(helper.proc.pid)


def test_foreign_user_refused_by_peer_credentials(
    helper: Helper, owner_user: SystemUser, foreign_user: SystemUser
) -> None:
    # With the socket file permissions wide open, only SO_PEERCRED stands in the way.
    helper.socket.chmod(0o666)
    # Many times over: the refusal must win the race against the client still writing its request.
    answers = helper.call_as(foreign_user, "priv.ensure_bridge", {"name": "br-fc", "ip": "172.16.0.1", "prefix": 24},
                             repeat=200)
    expected = {"error": {
        "code": "unauthorized",
        "message": f"uid {foreign_user.uid} is not allowed to use the root helper (owner uid is {owner_user.uid})",
    }}
    assert [a for a in answers if a != expected] == []
    assert "br-fc" not in helper.links()
    refusals = [line for line in helper.log_lines() if line["msg"] == "helper refused a caller"]
    assert len(refusals) == 200
    assert all(line["level"] == "warning" and line["peer_uid"] == foreign_user.uid for line in refusals)
    # The owner is still served.
    assert helper.call_as(owner_user, "priv.ping")[0]["result"]["owner_uid"] == owner_user.uid


def test_foreign_user_cannot_connect_with_default_permissions(helper: Helper, foreign_user: SystemUser) -> None:
    assert helper.call_as(foreign_user, "priv.ping") == [{"unreachable": f"permission denied on {helper.socket}"}]


def test_unknown_method(helper: Helper) -> None:
    err = helper.error("priv.exec", {"argv": ["sh"]})
    assert err.code == "unknown_method"
    assert err.message == "unknown method 'priv.exec'"
    assert err.op_id
    assert err.render() == f"unknown method 'priv.exec' ({err.op_id})"


def test_clean_shutdown_and_single_instance(helper: Helper, netns: str, base: Path) -> None:
    second = subprocess.run(helper_argv(netns, base, helper.owner.uid, helper.socket), env=helper_env(base),
                            capture_output=True, text=True, timeout=30)
    assert second.returncode == 1
    assert second.stderr.strip() == (
        f"bangerd-root: another bangerd-root is already serving {helper.socket} (stop it first, or pass another --socket)"
    )
    assert helper.call("priv.ping")["pid"] == helper.proc.pid  # the first one is untouched

    assert helper.stop() == 0
    assert not helper.socket.exists()
    assert not helper.pidfile.exists()
    assert helper.log_lines()[-1]["msg"] == "bangerd-root stopped"


def test_system_mode_reads_owner_from_install_meta(netns: str, base: Path, owner_user: SystemUser) -> None:
    prefix = base / "sys"
    (prefix / "etc/banger").mkdir(parents=True)
    (prefix / "etc/banger/install.toml").write_text(
        f'owner_user = "{owner_user.name}"\nowner_uid = {owner_user.uid}\nowner_gid = {owner_user.gid}\n'
        f'owner_home = "{base}"\n'
    )
    env = {**helper_env(base), "BANGER_SYSTEM_PREFIX": str(prefix)}
    argv = ["ip", "netns", "exec", netns, sys.executable, "-m", "banger.roothelper.main"]

    clash = subprocess.run([*argv, "--system", "--owner-uid", "0"], env=env, capture_output=True, text=True,
                           timeout=30)
    assert (clash.returncode, clash.stderr.strip()) == (
        1, "bangerd-root: --owner-uid cannot be combined with --system (the owner comes from install.toml)")

    sock = prefix / "run/banger-root/bangerd-root.sock"
    proc = subprocess.Popen([*argv, "--system"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        answer = client.call(sock, "priv.ping", {}, timeout=10)
        assert answer["owner_uid"] == owner_user.uid
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o711
        assert sock.stat().st_uid == owner_user.uid
        # A managed path under the system state dir makes a process signallable.
        link = base / "bin" / "firecracker"
        link.parent.mkdir()
        link.symlink_to(os.path.realpath(sys.executable))
        vmm = subprocess.Popen([str(link), "-c", SLEEPER, f"--api-sock={prefix}/run/banger/fc-x.sock"])
        try:
            wait_running(vmm, str(link))
            assert client.call(sock, "priv.kill_process", {"pid": vmm.pid}, timeout=10)["signal"] == "KILL"
            assert vmm.wait(10) == -signal.SIGKILL
        finally:
            if vmm.poll() is None:
                vmm.kill()
                vmm.wait()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert not sock.exists()
    # System mode logs JSON lines to stderr, for journald.
    lines = [json.loads(line) for line in stderr.decode().splitlines()]
    assert lines[0]["msg"] == "bangerd-root started" and lines[0]["mode"] == "system"
    assert lines[-1]["msg"] == "bangerd-root stopped"
    assert any(line["msg"] == "helper rpc completed" and line["method"] == "priv.kill_process" for line in lines)


def test_system_mode_without_install(base: Path) -> None:
    env = {**helper_env(base), "BANGER_SYSTEM_PREFIX": str(base / "none")}
    proc = subprocess.run([sys.executable, "-m", "banger.roothelper.main", "--system"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stderr.strip()) == (1, (
        f"bangerd-root: no system install ({base}/none/etc/banger/install.toml is missing) "
        "(run `sudo banger system install --owner <user>`)"))


def test_refuses_to_run_unprivileged(owner_user: SystemUser, base: Path) -> None:
    argv = owner_user.argv([sys.executable, "-m", "banger.roothelper.main", "--socket", str(base / "x.sock")])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=helper_env(base))
    assert (proc.returncode, proc.stderr.strip()) == (2, "bangerd-root: must run as root")


# --- validation before action -------------------------------------------------------------------------

BAD_ARGUMENTS: list[tuple[str, dict[str, Any], str]] = [
    ("priv.ensure_bridge", {"name": "eth0", "ip": "172.16.0.1", "prefix": 24},
     'bridge name "eth0" is not allowed (must be "br-fc" or start with "br-fc-")'),
    ("priv.ensure_bridge", {"name": "br-fc-t", "ip": "127.0.0.1", "prefix": 24},
     'bridge ip "127.0.0.1" is not allowed (must be a unicast address: not loopback, multicast, reserved or 0.0.0.0)'),
    ("priv.ensure_bridge", {"name": "br-fc-t", "ip": "172.16.0.1", "prefix": 31},
     "prefix 31 is out of range (must be 8..30)"),
    ("priv.ensure_bridge", {"name": "br-fc-t", "ip": "172.16.0.1", "prefix": "x24"},
     'prefix "x24" is not a number (must be 8..30)'),
    ("priv.ensure_bridge", {"name": "br-fc-t", "ip": "172.16.0.1", "prefix": 24, "dev": "eth0"},
     'priv.ensure_bridge does not take param "dev" (allowed: ip, name, prefix)'),
    ("priv.ensure_bridge", {"name": "br-fc-t", "ip": "172.16.0.1"}, 'priv.ensure_bridge needs param "prefix"'),
    ("priv.create_tap", {"name": "eth1", "bridge": "br-fc"}, 'tap name "eth1" is not allowed (must start with "tap-")'),
    ("priv.create_tap", {"name": "tap-abcdefghijkl", "bridge": "br-fc"},
     'tap name "tap-abcdefghijkl" is 16 characters; max is 15'),
    ("priv.create_tap", {"name": "tap-t", "bridge": "docker0"},
     'bridge name "docker0" is not allowed (must be "br-fc" or start with "br-fc-")'),
    ("priv.create_tap", {"name": "tap-t", "bridge": "br-fc", "owner_uid": 0},
     "owner_uid 0 is not allowed (taps belong to the owner uid {owner})"),
    ("priv.create_tap", {"name": "tap-t", "bridge": "br-fc", "mode": "tun"},
     'priv.create_tap does not take param "mode" (allowed: bridge, name, owner_uid)'),
    ("priv.delete_tap", {"name": "br-fc"}, 'tap name "br-fc" is not allowed (must start with "tap-")'),
    ("priv.delete_bridge", {"name": "lo"}, 'bridge name "lo" is not allowed (must be "br-fc" or start with "br-fc-")'),
    ("priv.signal_process", {"pid": 1, "signal": "TERM"}, "pid 1 is not allowed (must be 2..4194304)"),
    ("priv.signal_process", {"pid": 0, "signal": "TERM"}, "pid 0 is not allowed (must be 2..4194304)"),
    ("priv.signal_process", {"pid": 4242, "signal": "STOP"},
     'signal "STOP" is not allowed (allowed: TERM, KILL, INT, HUP, QUIT, USR1, USR2, ABRT)'),
    ("priv.signal_process", {"pid": 4242, "signal": 9},
     "signal 9 is not allowed (allowed: TERM, KILL, INT, HUP, QUIT, USR1, USR2, ABRT)"),
    ("priv.kill_process", {"pid": "4242"}, 'pid must be an integer, got "4242"'),
    ("priv.ping", {"verbose": True}, 'priv.ping does not take param "verbose" (allowed: none)'),
]


def test_bad_arguments_are_refused_before_anything_is_done(helper: Helper, owner_user: SystemUser) -> None:
    # A real bridge exists, so a create_tap that skipped validation would succeed and leave a tap behind.
    helper.call("priv.ensure_bridge", {"name": "br-fc", "ip": "172.16.0.1", "prefix": 24})
    before = set(helper.links())
    assert before == {"lo", "br-fc"}
    for method, params, message in BAD_ARGUMENTS:
        err = helper.error(method, params)
        assert (method, err.code, err.message) == (method, "bad_request", message.format(owner=owner_user.uid))
        assert set(helper.links()) == before, f"{method} {params} changed the links"
    failed = [line for line in helper.log_lines() if line["msg"] == "helper rpc failed"]
    assert len(failed) == len(BAD_ARGUMENTS)
    assert all(line["level"] == "info" and line["code"] == "bad_request" for line in failed)


# --- bridges and taps ---------------------------------------------------------------------------------


def test_bridge_and_tap_lifecycle(helper: Helper, owner_user: SystemUser, foreign_user: SystemUser) -> None:
    bridge = {"name": "br-fc-t", "ip": "172.31.7.1", "prefix": "24"}
    assert helper.call("priv.ensure_bridge", bridge) == {
        "name": "br-fc-t", "ip": "172.31.7.1", "prefix": 24, "created": True}
    assert helper.call("priv.ensure_bridge", bridge)["created"] is False  # idempotent
    (info,) = helper.ip("addr", "show", "dev", "br-fc-t")
    assert info["linkinfo"]["info_kind"] == "bridge"
    assert "UP" in info["flags"]
    inet = [(a["local"], a["prefixlen"]) for a in info["addr_info"] if a["family"] == "inet"]
    assert inet == [("172.31.7.1", 24)]

    created = helper.call("priv.create_tap", {"name": "tap-t1", "bridge": "br-fc-t"})
    assert created == {"name": "tap-t1", "bridge": "br-fc-t", "owner_uid": owner_user.uid, "created": True}
    assert helper.call("priv.create_tap", {"name": "tap-t1", "bridge": "br-fc-t"})["created"] is False
    tap = helper.links()["tap-t1"]
    assert tap["master"] == "br-fc-t"
    assert "UP" in tap["flags"]
    assert tap["linkinfo"]["info_kind"] == "tun"
    assert tap["linkinfo"]["info_data"]["type"] == "tap"
    assert tap["linkinfo"]["info_data"]["persist"] is True
    assert helper.sys_net("tap-t1", "owner") == str(owner_user.uid)

    # The point of the owner uid: the unprivileged VMM can attach to the tap, another user cannot.
    tun_node = helper.base / "tun"
    os.mknod(tun_node, stat.S_IFCHR | 0o666, os.makedev(10, 200))
    tun_node.chmod(0o666)

    def open_tap(user: SystemUser) -> str:
        argv = ["ip", "netns", "exec", helper.ns,
                *user.argv([sys.executable, "-c", TAP_OPEN_SCRIPT, str(tun_node), "tap-t1"])]
        return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout.strip()

    assert open_tap(owner_user) == "opened"
    assert open_tap(foreign_user) == "errno 1"  # EPERM

    assert helper.call("priv.delete_tap", {"name": "tap-t1"}) == {"name": "tap-t1", "deleted": True}
    assert "tap-t1" not in helper.links()
    assert helper.call("priv.delete_tap", {"name": "tap-t1"}) == {"name": "tap-t1", "deleted": False}
    assert helper.call("priv.delete_bridge", {"name": "br-fc-t"}) == {"name": "br-fc-t", "deleted": True}
    assert set(helper.links()) == {"lo"}
    assert helper.call("priv.delete_bridge", {"name": "br-fc-t"}) == {"name": "br-fc-t", "deleted": False}


def test_tap_conflicts(helper: Helper, owner_user: SystemUser) -> None:
    err = helper.error("priv.create_tap", {"name": "tap-t2", "bridge": "br-fc-none"})
    assert (err.code, err.message, err.hint) == (
        "not_found", 'bridge "br-fc-none" does not exist', "call priv.ensure_bridge first")
    assert "tap-t2" not in helper.links()

    helper.call("priv.ensure_bridge", {"name": "br-fc", "ip": "10.200.0.1", "prefix": 16})
    subprocess.run(["ip", "-n", helper.ns, "link", "add", "tap-dummy", "type", "bridge"], check=True)
    err = helper.error("priv.create_tap", {"name": "tap-dummy", "bridge": "br-fc"})
    assert (err.code, err.message) == ("already_exists", 'device "tap-dummy" exists and is not a tap')
    err = helper.error("priv.delete_tap", {"name": "tap-dummy"})
    assert (err.code, err.message) == ("bad_request", 'device "tap-dummy" is not a tap; refusing to delete it')
    assert "tap-dummy" in helper.links()

    subprocess.run(["ip", "-n", helper.ns, "tuntap", "add", "tap-rootown", "mode", "tap", "user", "0"], check=True)
    err = helper.error("priv.create_tap", {"name": "tap-rootown", "bridge": "br-fc"})
    assert (err.code, err.message) == (
        "already_exists", f'tap "tap-rootown" exists but is owned by uid 0, not {owner_user.uid}')
    assert "master" not in helper.links()["tap-rootown"]

    subprocess.run(["ip", "-n", helper.ns, "tuntap", "add", "br-fc-d", "mode", "tap"], check=True)
    err = helper.error("priv.ensure_bridge", {"name": "br-fc-d", "ip": "10.201.0.1", "prefix": 16})
    assert (err.code, err.message) == ("already_exists", 'device "br-fc-d" exists and is not a bridge')
    err = helper.error("priv.delete_bridge", {"name": "br-fc-d"})
    assert (err.code, err.message) == ("bad_request", 'device "br-fc-d" is not a bridge; refusing to delete it')


# --- signalling processes -----------------------------------------------------------------------------


def fake_vmm(helper: Helper, arg: str) -> list[str]:
    """argv of a real process whose argv[0] is …/qemu-system-x86_64 (a symlink to the Python binary)."""
    link = helper.base / "bin" / "qemu-system-x86_64"
    if not link.exists():
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(os.path.realpath(sys.executable))
    return [str(link), "-c", SLEEPER, arg]


def wait_running(proc: subprocess.Popen[bytes], argv0: str) -> None:
    """Until the child has exec'd (its cmdline shows argv0), so the helper sees the real command line."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[0] == argv0.encode():
                return
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    pytest.fail(f"process {proc.pid} did not start")


def test_signal_process_refuses_non_banger_processes(
    helper: Helper, spawned: list[subprocess.Popen[bytes]]
) -> None:
    sleeper = subprocess.Popen(["sleep", "100"])
    spawned.append(sleeper)
    wait_running(sleeper, "sleep")
    err = helper.error("priv.signal_process", {"pid": sleeper.pid, "signal": "TERM"})
    assert (err.code, err.message) == ("bad_request", (
        f'pid {sleeper.pid} ("sleep") is not a banger-launched process '
        "(program must be one of: firecracker, jailer, qemu-system-x86_64, vhost-device-vsock)"))
    err = helper.error("priv.kill_process", {"pid": sleeper.pid})
    assert err.code == "bad_request"

    # The right program name is not enough: it must name one of banger's directories.
    argv = fake_vmm(helper, "/srv/images/disk.img")
    outsider = subprocess.Popen(argv)
    spawned.append(outsider)
    wait_running(outsider, argv[0])
    err = helper.error("priv.kill_process", {"pid": outsider.pid})
    assert (err.code, err.message) == ("bad_request", (
        f'pid {outsider.pid} ("qemu-system-x86_64") is not a banger-launched process '
        "(no argument under banger's directories)"))

    time.sleep(0.2)
    assert sleeper.poll() is None and outsider.poll() is None

    gone = subprocess.Popen(["true"])
    gone.wait()
    err = helper.error("priv.signal_process", {"pid": gone.pid, "signal": "KILL"})
    assert (err.code, err.message) == ("not_found", f"no process with pid {gone.pid}")


def test_signal_and_kill_banger_processes(helper: Helper, spawned: list[subprocess.Popen[bytes]]) -> None:
    argv = fake_vmm(helper, f"file={helper.state_dir}/vms/t1/root.ext4,format=raw")
    vmm = subprocess.Popen(argv)
    spawned.append(vmm)
    wait_running(vmm, argv[0])
    assert helper.call("priv.signal_process", {"pid": vmm.pid, "signal": "sigterm"}) == {
        "pid": vmm.pid, "signal": "TERM"}
    assert vmm.wait(10) == -signal.SIGTERM

    argv = fake_vmm(helper, f"{helper.runtime_dir}/fc-t2.sock")
    vmm2 = subprocess.Popen(argv)
    spawned.append(vmm2)
    wait_running(vmm2, argv[0])
    assert helper.call("priv.kill_process", {"pid": vmm2.pid}) == {"pid": vmm2.pid, "signal": "KILL"}
    assert vmm2.wait(10) == -signal.SIGKILL

    signalled = [line for line in helper.log_lines() if line["msg"] == "process signalled"]
    assert [(line["pid"], line["signal"], line["program"]) for line in signalled] == [
        (vmm.pid, "TERM", "qemu-system-x86_64"), (vmm2.pid, "KILL", "qemu-system-x86_64")]


# --- the daemon's client ------------------------------------------------------------------------------


def test_client_forwards_op_id_into_helper_logs(helper: Helper) -> None:
    hc = HelperClient(helper.socket, system=False)

    async def as_daemon() -> tuple[dict[str, Any], RpcError]:
        token = blog.current_op_id.set("op-c0ffee")
        try:
            pong = await hc.ping()
            bridge = await hc.ensure_bridge("br-fc-op", "172.29.0.1", 24)
            assert bridge["created"] is True
            try:
                await hc.create_tap("tap-op", "eth0")
            except RpcError as exc:
                return pong, exc
            raise AssertionError("create_tap with bridge eth0 was accepted")
        finally:
            blog.current_op_id.reset(token)

    pong, err = asyncio.run(as_daemon())
    assert pong["pid"] == helper.proc.pid
    assert (err.code, err.op_id) == ("bad_request", "op-c0ffee")

    mine = [line for line in helper.log_lines() if line.get("op_id") == "op-c0ffee"]
    done = {(line["msg"], line["method"]) for line in mine if "method" in line}
    assert done == {("helper rpc completed", "priv.ping"), ("helper rpc completed", "priv.ensure_bridge"),
                    ("helper rpc failed", "priv.create_tap")}
    for line in mine:
        if "method" in line:
            assert line["level"] == "info"
            assert isinstance(line["duration_ms"], int) and line["duration_ms"] >= 0
    assert any(line["msg"] == "bridge ready" for line in mine)  # the op's own lines carry it too


def test_client_unreachable_helper(base: Path) -> None:
    sock = base / "nothing-here.sock"
    for system, hint in [
        (True, "run: sudo banger system restart"),
        (False, "run banger as root once so it can start the helper, or see banger doctor"),
    ]:
        with pytest.raises(HelperUnreachable) as exc:
            asyncio.run(HelperClient(sock, system=system).ping())
        assert exc.value.message == f"root helper not reachable at {sock}"
        assert exc.value.hint == hint
