"""bangerd-root for real: a helper process in a throwaway network namespace, called as root, as the
owner user and as a foreign user, making real bridges and taps and signalling real processes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
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
from banger.errors import BangerError
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
    ns: str  # "" when the helper runs in the test's own namespaces
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


def helper_argv(ns: str | None, base: Path, owner_uid: int, sock: Path) -> list[str]:
    # Without a namespace the helper shares the test's mounts (the jail tests mount inside jails).
    return [
        *(["ip", "netns", "exec", ns] if ns else []), sys.executable, "-m", "banger.roothelper.main",
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


def write_config(base: Path, **keys: str) -> None:
    """The helper's config.toml (root's layout points into `base`, see helper_env)."""
    path = base / "root-home/config/banger/config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items()))


@pytest.fixture
def base(owner_user: SystemUser) -> Iterator[Path]:
    # Not pytest's tmp_path: that is 0700 root, and the owner user must reach the socket.
    path = Path(tempfile.mkdtemp(prefix="banger-rh-"))
    path.chmod(0o755)
    for sub in ("state", "cache", "run"):
        (path / sub).mkdir()
        os.chown(path / sub, owner_user.uid, owner_user.gid)
    # Jails under a root-only directory; the jailer is missing unless a test configures one.
    write_config(path, jailer_chroot_base=str(path / "jail"), jailer_bin=str(path / "no-jailer" / "jailer"))
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
                if line.split()[4].startswith(str(path) + "/"):
                    subprocess.run(["umount", "-l", line.split()[4]], check=False)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def helper(netns: str, base: Path, owner_user: SystemUser) -> Iterator[Helper]:
    with running_helper(netns, base, owner_user) as h:
        yield h


@contextlib.contextmanager
def running_helper(netns: str | None, base: Path, owner_user: SystemUser, name: str = "helper-run") -> Iterator[Helper]:
    sock = base / name / "bangerd-root.sock"
    with open(base / f"{name}.stderr", "wb") as stderr:
        proc = subprocess.Popen(helper_argv(netns, base, owner_user.uid, sock), env=helper_env(base),
                                stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
    h = Helper(netns or "", base, owner_user, sock, base / "helper.log", base / "state", base / "cache", base / "run", proc)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.fail(f"bangerd-root exited with {proc.returncode}: {(base / f'{name}.stderr').read_text()}")
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


# --- jails (priv.jail_*) ------------------------------------------------------------------------------

VM_ID = "0a1b2c3d4e5f60718293a4b5c6d7e8f9"
JAIL_ID = VM_ID[:8]
REAL_JAILER = os.environ.get("BANGER_JAILER_BIN") or shutil.which("jailer")
NO_JAILER = ("no jailer binary (set BANGER_JAILER_BIN or put `jailer` on PATH): the real jailed launch did NOT run; "
             "staging, cleanup and every refusal of priv.jail_launch did")


@dataclass
class JailFiles:
    """One VM's files as the daemon lays them out, and a fake (root-owned) firecracker binary to copy in."""

    base: Path
    owner: SystemUser
    exec_file: Path
    kernel: Path
    initrd: Path
    rootfs: Path
    overlay: Path
    blockdev: Path
    run_dir: Path
    console: Path

    @property
    def jail_base(self) -> Path:
        return self.base / "jail"

    def jail_dir(self, binary: str = "firecracker") -> Path:
        return self.jail_base / binary / JAIL_ID

    def params(self, **changes: Any) -> dict[str, Any]:
        params: dict[str, Any] = {
            "vm_id": VM_ID, "run_dir": str(self.run_dir), "chroot_base": str(self.jail_base),
            "exec_file": str(self.exec_file), "uid": self.owner.uid, "gid": self.owner.gid,
            "kernel": str(self.kernel), "initrd": str(self.initrd),
            "drives": [{"id": "rootfs", "path": str(self.rootfs), "read_only": True, "root": True},
                       {"id": "overlay", "path": str(self.overlay), "read_only": False},
                       {"id": "scratch", "path": str(self.blockdev), "read_only": False}],
            "log": str(self.run_dir / "firecracker.log"), "metrics": str(self.run_dir / "firecracker.metrics"),
            "vsock": str(self.run_dir / "vsock.sock"),
        }
        params.update(changes)
        return {k: v for k, v in params.items() if v is not ...}


def owned(path: Path, user: SystemUser | None, mode: int, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if user is not None:
        os.chown(path, user.uid, user.gid)
    path.chmod(mode)
    return path


@pytest.fixture
def jail_helper(base: Path, owner_user: SystemUser) -> Iterator[Helper]:
    """A helper in the test's own mount namespace: it must see (and undo) the mounts the tests make."""
    with running_helper(None, base, owner_user) as h:
        yield h


@pytest.fixture
def jail_files(base: Path, owner_user: SystemUser) -> JailFiles:
    state, run = base / "state", base / "run"
    vm_dir = state / "vms" / VM_ID
    blockdev = vm_dir / "scratch.blk"
    blockdev.parent.mkdir(parents=True)
    os.mknod(blockdev, stat.S_IFBLK | 0o600, os.makedev(7, 250))  # a loop minor nobody uses: never opened
    run_dir = run / "vms" / JAIL_ID
    run_dir.mkdir(parents=True)
    os.chown(run_dir, owner_user.uid, owner_user.gid)
    return JailFiles(
        base=base, owner=owner_user,
        exec_file=owned(base / "bin" / "firecracker", None, 0o755, b"\x7fELF not really firecracker"),
        kernel=owned(state / "kernels" / "k" / "vmlinux", owner_user, 0o644, b"\x7fELF kernel"),
        initrd=owned(state / "kernels" / "k" / "initrd.img", None, 0o644, b"initrd"),
        rootfs=owned(state / "images" / "i" / "rootfs.ext4", None, 0o644, b"rootfs"),
        overlay=owned(vm_dir / "overlay.ext4", owner_user, 0o600, b"overlay"),
        blockdev=blockdev, run_dir=run_dir, console=vm_dir / "console.log",
    )


def tree(root: Path) -> dict[str, tuple[str, int, int, int]]:
    """Every path below `root` (symlinks not followed): kind, owner uid, mode, inode."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = path.lstat()
            kind = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "link", stat.S_IFBLK: "blk",
                    stat.S_IFSOCK: "sock"}.get(stat.S_IFMT(info.st_mode), "other")
            found[str(path.relative_to(root))] = (kind, info.st_uid, stat.S_IMODE(info.st_mode), info.st_ino)
    return found


def mounts_under(path: Path) -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(str(path) + "/")]


def test_jail_stage_builds_exactly_the_planned_tree(jail_helper: Helper, jail_files: JailFiles) -> None:
    f, owner = jail_files, jail_files.owner
    before = tree(f.base / "state")
    answer = jail_helper.call("priv.jail_stage", f.params())
    jail = f.jail_dir()
    chroot = jail / "root"
    assert answer["jail_dir"] == str(jail) and answer["chroot"] == str(chroot)
    assert answer["staged"] == [
        f"copy {f.exec_file} -> {chroot}/firecracker 0500 {owner.uid}:{owner.gid}",
        f"link {f.kernel} -> {chroot}/vmlinux",
        f"link {f.initrd} -> {chroot}/initrd.img",
        f"link {f.rootfs} -> {chroot}/rootfs.ext4",
        f"link {f.overlay} -> {chroot}/overlay.ext4",
        f"mknod {chroot}/scratch.blk block 7:250 0600 {owner.uid}:{owner.gid}",
        f"touch {chroot}/firecracker.log 0600 {owner.uid}:{owner.gid}",
        f"touch {chroot}/firecracker.metrics 0600 {owner.uid}:{owner.gid}",
    ]
    got = tree(f.jail_base)
    ino = {name: info[3] for name, info in got.items()}
    expected = {
        "firecracker": ("dir", 0, 0o711),
        f"firecracker/{JAIL_ID}": ("dir", 0, 0o711),
        f"firecracker/{JAIL_ID}/banger-jail.json": ("file", 0, 0o600),
        f"firecracker/{JAIL_ID}/root": ("dir", 0, 0o700),
        f"firecracker/{JAIL_ID}/root/firecracker": ("file", owner.uid, 0o500),
        f"firecracker/{JAIL_ID}/root/vmlinux": ("file", owner.uid, 0o644),
        f"firecracker/{JAIL_ID}/root/initrd.img": ("file", 0, 0o644),
        f"firecracker/{JAIL_ID}/root/rootfs.ext4": ("file", 0, 0o644),
        f"firecracker/{JAIL_ID}/root/overlay.ext4": ("file", owner.uid, 0o600),
        f"firecracker/{JAIL_ID}/root/scratch.blk": ("blk", owner.uid, 0o600),
        f"firecracker/{JAIL_ID}/root/firecracker.log": ("file", owner.uid, 0o600),
        f"firecracker/{JAIL_ID}/root/firecracker.metrics": ("file", owner.uid, 0o600),
    }
    assert {name: info[:3] for name, info in got.items()} == expected
    # Hard links share the inode (same filesystem); the binary is a copy; the node has the host's numbers.
    for name, source in (("vmlinux", f.kernel), ("initrd.img", f.initrd), ("rootfs.ext4", f.rootfs),
                         ("overlay.ext4", f.overlay)):
        assert ino[f"firecracker/{JAIL_ID}/root/{name}"] == source.stat().st_ino
    assert (chroot / "firecracker").read_bytes() == f.exec_file.read_bytes()
    assert (chroot / "firecracker").stat().st_ino != f.exec_file.stat().st_ino
    assert (chroot / "scratch.blk").lstat().st_rdev == os.makedev(7, 250)
    assert stat.S_IMODE(f.jail_base.stat().st_mode) == 0o711 and f.jail_base.stat().st_uid == 0
    assert tree(f.base / "state") == before  # nothing of the daemon's changed
    assert list(f.run_dir.iterdir()) == []  # links come with launch

    err = jail_helper.error("priv.jail_stage", f.params())
    assert (err.code, err.message) == ("already_exists", f"a jail for VM {VM_ID} already exists ({jail})")
    assert tree(f.jail_base) == got

    assert jail_helper.call("priv.jail_cleanup", {"vm_id": VM_ID}) == {"vm_id": VM_ID, "removed": [str(jail)]}
    assert list(f.jail_base.iterdir()) == []
    assert tree(f.base / "state") == before
    assert jail_helper.call("priv.jail_cleanup", {"vm_id": VM_ID}) == {"vm_id": VM_ID, "removed": []}  # idempotent


def test_jail_stage_copies_read_only_files_from_another_filesystem(jail_helper: Helper, jail_files: JailFiles) -> None:
    f, owner = jail_files, jail_files.owner
    other = f.base / "state" / "other-fs"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(other)], check=True)
    try:
        rootfs = owned(other / "rootfs.ext4", None, 0o644, b"read-only image")
        disk = owned(other / "disk.ext4", owner, 0o600, b"writable disk")
        answer = jail_helper.call("priv.jail_stage", f.params(drives=[
            {"id": "rootfs", "path": str(rootfs), "read_only": True}]))
        chroot = f.jail_dir() / "root"
        assert f"copy {rootfs} -> {chroot}/rootfs.ext4 0400 {owner.uid}:{owner.gid}" in answer["staged"]
        copy = (chroot / "rootfs.ext4").stat()
        assert (copy.st_uid, stat.S_IMODE(copy.st_mode)) == (owner.uid, 0o400)
        assert (chroot / "rootfs.ext4").read_bytes() == b"read-only image"
        jail_helper.call("priv.jail_cleanup", {"vm_id": VM_ID})

        err = jail_helper.error("priv.jail_stage", f.params(drives=[{"id": "disk", "path": str(disk), "read_only": False}]))
        assert (err.code, err.message) == ("bad_request", (
            f"drive 'disk' {str(disk)!r} is writable and on another filesystem than the jail ({f.jail_base}); "
            "a copy would lose the guest's writes"))
        assert list(f.jail_base.iterdir()) == []
    finally:
        subprocess.run(["umount", str(other)], check=True)


def jail_refusals(f: JailFiles, owner: SystemUser) -> list[tuple[dict[str, Any], str]]:
    state = f.base / "state"
    escape = state / "escape"
    escape.symlink_to("/etc")
    root_only = owned(state / "kernels" / "secret" / "vmlinux", None, 0o600, b"\x7fELF")
    fc_link = f.base / "bin" / "fc-link"
    fc_link.symlink_to(f.exec_file)
    fc_owned = owned(f.base / "bin2" / "firecracker", owner, 0o755, b"\x7fELF")
    fc_private = owned(f.base / "bin3" / "firecracker", None, 0o700, b"\x7fELF")
    drive_not_mine = owned(state / "vms" / "x" / "disk.ext4", None, 0o644, b"")
    return [
        (f.params(vm_id="../../etc"), 'vm_id "../../etc" is not allowed (must be 8 to 32 lowercase hex digits)'),
        (f.params(chroot_base="/"), f'chroot_base "/" is not the helper\'s jailer_chroot_base "{f.jail_base}" '
                                    "(restart bangerd-root after changing config.toml)"),
        (f.params(uid=0), f"jail uid 0 is not allowed (Firecracker runs as the owner uid {owner.uid})"),
        (f.params(gid=0), f"jail gid 0 is not allowed (Firecracker runs as the owner's group {owner.gid})"),
        (f.params(uid="1000"), 'uid must be an integer, got "1000"'),
        (f.params(kernel="/etc/passwd"), 'path "/etc/passwd" is outside banger\'s directories'),
        (f.params(kernel=f"{escape}/shadow"),
         f'path "{escape}/shadow" resolves to "/etc/shadow", outside banger\'s directories'),
        (f.params(initrd=f"{state}/../x"), f'path "{state}/../x" must not contain ".." components'),
        (f.params(kernel=str(root_only)),
         f"kernel {str(root_only)!r} is not readable by the jail user {owner.uid}:{owner.gid} "
         f"(owner 0:0, mode 0600) (chown {owner.uid}:{owner.gid} {root_only})"),
        (f.params(drives=[{"id": "d", "path": str(drive_not_mine), "read_only": False}]),
         f"drive 'd' {str(drive_not_mine)!r} is not read and writeable by the jail user {owner.uid}:{owner.gid} "
         f"(owner 0:0, mode 0644) (chown {owner.uid}:{owner.gid} {drive_not_mine})"),
        (f.params(drives=[{"id": "d", "path": str(f.overlay)}]), 'a drive of priv.jail_stage needs param "read_only"'),
        (f.params(drives=[{"id": "d", "path": str(f.overlay), "read_only": "no"}]),
         'drive "d": read_only and root must be true or false'),
        (f.params(drives="all"), 'drives must be a list of at most 16 drives, got "all"'),
        (f.params(exec_file=str(fc_link)),
         f"firecracker binary {str(fc_link)!r} is not a regular file (symlinks are not followed)"),
        (f.params(exec_file=str(fc_owned)),
         f"firecracker binary {str(fc_owned)!r} must be owned by root and not group/world-writable "
         f"(owner uid {owner.uid}, mode 0755) (chown root:root {fc_owned} && chmod 0755 {fc_owned})"),
        (f.params(exec_file=str(fc_private)),
         f"firecracker binary {str(fc_private)!r} must be readable and executable by everyone (mode 0700) "
         f"(chmod 0755 {fc_private})"),
        (f.params(exec_file="/nonexistent/firecracker"),
         "firecracker binary '/nonexistent/firecracker' cannot be read: No such file or directory"),
        (f.params(log=str(f.base / "run" / "elsewhere.log")),
         f"jailed Firecracker's log {str(f.base / 'run' / 'elsewhere.log')!r} must be a file of the run directory "
         f"{f.run_dir} other than fc.sock"),
        (f.params(kernel=str(state / "kernels" / "k" / "missing")),
         f"kernel {str(state / 'kernels' / 'k' / 'missing')!r} cannot be staged into the jail: No such file or directory"),
        (f.params(netns="/run/netns/x"), 'priv.jail_stage does not take param "netns" (allowed: chroot_base, drives, '
                                         "exec_file, gid, initrd, kernel, log, metrics, run_dir, uid, vm_id, vsock)"),
        (f.params(kernel=...), 'priv.jail_stage needs param "kernel"'),
    ]


def test_jail_stage_refuses_bad_arguments_and_creates_nothing(jail_helper: Helper, jail_files: JailFiles) -> None:
    f = jail_files
    refusals = jail_refusals(f, f.owner)
    before = tree(f.base)
    for params, message in refusals:
        err = jail_helper.error("priv.jail_stage", params)
        assert (err.code, err.message if not err.hint else f"{err.message} ({err.hint})") == ("bad_request", message)
        assert tree(f.base) == before, f"{message}: something was left behind"
    assert not f.jail_base.exists()
    assert mounts_under(f.base) == []


def test_jail_base_must_be_root_only(base: Path, owner_user: SystemUser, jail_files: JailFiles) -> None:
    # Under the owner's state directory the owner could swap the base for a symlink while the jailer runs.
    unsafe = base / "state" / "jail"
    write_config(base, jailer_chroot_base=str(unsafe))
    with running_helper(None, base, owner_user) as h:
        err = h.error("priv.jail_stage", jail_files.params(chroot_base=str(unsafe)))
    assert (err.code, err.message) == ("bad_request", (
        f"jailer_chroot_base {unsafe} is not safe for the jailer: {base / 'state'} can be changed by uid "
        f"{owner_user.uid} or others (mode 0755)"))
    assert err.hint is not None and "/var/lib/banger-jail" in err.hint
    assert not unsafe.exists()


def test_jail_cleanup_unmounts_never_follows_links_and_waits_for_the_vmm(
    jail_helper: Helper, jail_files: JailFiles, spawned: list[subprocess.Popen[bytes]]
) -> None:
    f = jail_files
    jail_helper.call("priv.jail_stage", f.params())
    chroot = f.jail_dir() / "root"
    # What a jail user could leave behind: links out of the jail, and (root's doing) a mount inside it.
    outside = f.base / "outside"
    outside.mkdir()
    (outside / "keep").write_text("precious")
    (chroot / "escape").symlink_to(outside)
    (chroot / "keep-link").symlink_to(outside / "keep")
    (chroot / "mnt").mkdir()
    subprocess.run(["mount", "--bind", str(outside), str(chroot / "mnt")], check=True)
    # A process whose root is the chroot is the jailed VMM: cleanup refuses while it runs.
    jailed = subprocess.Popen([sys.executable, "-c", "import os, sys, time; os.chroot(sys.argv[1]); time.sleep(60)",
                               str(chroot)])
    spawned.append(jailed)
    deadline = time.monotonic() + 10
    while os.stat(f"/proc/{jailed.pid}/root").st_ino != chroot.stat().st_ino:
        assert time.monotonic() < deadline, "the chrooted process did not start"
        time.sleep(0.02)
    err = jail_helper.error("priv.jail_cleanup", {"vm_id": VM_ID})
    assert (err.code, err.message) == (
        "operation_failed", f"Firecracker (pid {jailed.pid}) still runs in the jail of VM {VM_ID}; stop it first")
    assert (chroot / "vmlinux").exists()
    jailed.kill()
    jailed.wait(10)

    assert jail_helper.call("priv.jail_cleanup", {"vm_id": VM_ID})["removed"] == [str(f.jail_dir())]
    assert list(f.jail_base.iterdir()) == []
    assert mounts_under(f.base) == []
    assert (outside / "keep").read_text() == "precious"
    assert f.kernel.read_bytes() == b"\x7fELF kernel"


def test_jail_launch_refusals_leave_nothing(base: Path, jail_helper: Helper, jail_files: JailFiles) -> None:
    f = jail_files
    launch = {"vm_id": VM_ID, "console_log": str(f.console)}
    err = jail_helper.error("priv.jail_launch", launch)
    assert (err.code, err.message, err.hint) == (
        "not_found", f"VM {VM_ID} has no staged jail", "call priv.jail_stage first")

    jail_helper.call("priv.jail_stage", f.params())
    staged = tree(f.jail_base)
    missing = base / "no-jailer" / "jailer"
    err = jail_helper.error("priv.jail_launch", launch)
    assert (err.code, err.message, err.hint) == (
        "not_found", f"jailer binary {missing} does not exist",
        "install Firecracker's jailer and set jailer_bin in config.toml, or set jailer_enabled = false")
    assert tree(f.jail_base) == staged and list(f.run_dir.iterdir()) == [] and not f.console.exists()

    for params, message in [
        ({"vm_id": VM_ID, "console_log": "/etc/motd"}, 'path "/etc/motd" is outside banger\'s directories'),
        ({"vm_id": VM_ID}, 'priv.jail_launch needs param "console_log"'),
        ({"vm_id": "xyz", "console_log": str(f.console)},
         'vm_id "xyz" is not allowed (must be 8 to 32 lowercase hex digits)'),
    ]:
        err = jail_helper.error("priv.jail_launch", params)
        assert (err.code, err.message) == ("bad_request", message)
    assert tree(f.jail_base) == staged and list(f.run_dir.iterdir()) == [] and not f.console.exists()
    jail_helper.call("priv.jail_cleanup", {"vm_id": VM_ID})

    # A jailer that only root may change: owned by the owner, it is refused.
    writable = owned(base / "bin" / "jailer", jail_helper.owner, 0o755, b"#!/bin/sh\n")
    write_config(base, jailer_chroot_base=str(f.jail_base), jailer_bin=str(writable))
    with running_helper(None, base, jail_helper.owner, "helper-run-2") as h2:
        h2.call("priv.jail_stage", f.params())
        err = h2.error("priv.jail_launch", launch)
        assert (err.code, err.message) == ("bad_request", (
            f"jailer binary {str(writable)!r} must be owned by root and not group/world-writable "
            f"(owner uid {jail_helper.owner.uid}, mode 0755)"))
        assert list(f.run_dir.iterdir()) == [] and not f.console.exists()
        h2.call("priv.jail_cleanup", {"vm_id": VM_ID})
    assert list(f.jail_base.iterdir()) == []


def test_jail_launch_links_the_run_directory_and_cleanup_removes_the_links(
    base: Path, owner_user: SystemUser, jail_files: JailFiles
) -> None:
    """A jailer that exits at once (/usr/bin/false; fault injection): launch's own work is all real."""
    f = jail_files
    write_config(base, jailer_chroot_base=str(f.jail_base), jailer_bin="/usr/bin/false")
    with running_helper(None, base, owner_user) as h:
        h.call("priv.jail_stage", f.params())
        (f.run_dir / "fc.sock").write_text("stale")  # a leftover of an earlier run is replaced
        answer = h.call("priv.jail_launch", {"vm_id": VM_ID, "console_log": str(f.console)})
        chroot = f.jail_dir() / "root"
        assert answer["api_socket"] == str(f.run_dir / "fc.sock") and answer["jail_dir"] == str(f.jail_dir())
        links = {p.name: os.readlink(p) for p in f.run_dir.iterdir()}
        assert links == {"fc.sock": f"{chroot}/firecracker.socket", "vsock.sock": f"{chroot}/vsock.sock",
                         "firecracker.log": f"{chroot}/firecracker.log",
                         "firecracker.metrics": f"{chroot}/firecracker.metrics"}
        assert all(p.lstat().st_uid == owner_user.uid for p in f.run_dir.iterdir())
        console = f.console.stat()
        assert (console.st_uid, stat.S_IMODE(console.st_mode)) == (owner_user.uid, 0o600)
        # The helper reaps its child: no zombie is left once the "jailer" exited.
        deadline = time.monotonic() + 10
        while Path(f"/proc/{answer['pid']}").exists():
            assert time.monotonic() < deadline, "the exited jailer was not reaped"
            time.sleep(0.02)

        # A console log that is not the owner's is refused: root must not write where the owner cannot.
        foreign = owned(f.console.with_name("other.log"), None, 0o644, b"root's")
        err = h.error("priv.jail_launch", {"vm_id": VM_ID, "console_log": str(foreign)})
        assert (err.code, err.message) == (
            "bad_request", f"console log {str(foreign)!r} belongs to uid 0, not the owner {owner_user.uid}")
        assert foreign.read_bytes() == b"root's"

        assert h.call("priv.jail_cleanup", {"vm_id": VM_ID})["removed"] == [str(f.jail_dir())]
        assert list(f.run_dir.iterdir()) == []
        assert list(f.jail_base.iterdir()) == []


def jailed_backend(f: JailFiles, sock: Path, loop: asyncio.AbstractEventLoop) -> tuple[Any, Any]:
    from banger.roothelper.client import HelperJailLauncher
    from banger.vmm.base import DriveSpec, VmSpec, VsockSpec
    from banger.vmm.firecracker.backend import FirecrackerVmm
    from banger.vmm.firecracker.launcher import JailSetup

    launcher = HelperJailLauncher(HelperClient(sock, system=False), loop)
    fc = FirecrackerVmm(firecracker_bin=str(f.exec_file),
                        jail=JailSetup(launcher, str(f.jail_base), f.owner.uid, f.owner.gid))
    spec = VmSpec(vm_id=VM_ID, name="jailed", vcpu=1, memory_mib=128, kernel=f.kernel, initrd=f.initrd,
                  cmdline="root=/dev/vda ro", console_log=f.console, run_dir=f.run_dir,
                  drives=(DriveSpec("rootfs", f.rootfs, read_only=True, root=True), DriveSpec("overlay", f.overlay)),
                  vsock=VsockSpec(3, f.run_dir / "vsock.sock"))
    return fc, spec


@contextlib.contextmanager
def daemon_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """The daemon's event loop in a thread; the test plays the worker thread that runs Vmm methods."""
    import threading

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.mark.parametrize("jailer", ["missing", "/usr/bin/false"])
def test_jailed_firecracker_backend_failures_leave_nothing(
    base: Path, owner_user: SystemUser, jail_files: JailFiles, jailer: str
) -> None:
    """FirecrackerVmm through the real helper: a missing jailer, or one that dies at once, is one line and
    leaves no jail, link, pidfile or process."""
    f = jail_files
    jailer_bin = str(base / "no-jailer" / "jailer") if jailer == "missing" else jailer
    write_config(base, jailer_chroot_base=str(f.jail_base), jailer_bin=jailer_bin)
    with running_helper(None, base, owner_user) as h, daemon_loop() as loop:
        fc, spec = jailed_backend(f, h.socket, loop)
        plan = fc.plan(spec)
        assert plan.control_socket == f.run_dir / "fc.sock"
        token = blog.current_op_id.set("op-7a11ed")  # this thread plays the daemon's worker thread
        try:
            with pytest.raises(BangerError) as info:
                fc.launch(plan, timeout=5)
        finally:
            blog.current_op_id.reset(token)
        # The op_id crossed from the worker thread through the daemon's loop into every helper call.
        calls = [line["method"] for line in h.log_lines() if line.get("op_id") == "op-7a11ed" and "method" in line]
        assert calls == ["priv.jail_stage", "priv.jail_launch", "priv.jail_cleanup"]
        message = str(info.value)
        assert "\n" not in message
        if jailer == "missing":
            assert message == (f"jailer binary {jailer_bin} does not exist (install Firecracker's jailer and set "
                               "jailer_bin in config.toml, or set jailer_enabled = false)")
        else:
            assert message.startswith(f"Firecracker for VM {VM_ID} did not start: Firecracker exited before its "
                                      f"API socket {f.run_dir}/fc.sock answered")
        assert list(f.run_dir.iterdir()) == []
        assert list(f.jail_base.iterdir()) == []


@pytest.mark.skipif(REAL_JAILER is None, reason=NO_JAILER)
def test_real_jailer_runs_firecracker_as_the_owner_in_its_chroot(
    base: Path, owner_user: SystemUser, jail_files: JailFiles
) -> None:
    from banger.vmm.firecracker.api import FirecrackerApi

    fc_bin = os.environ.get("BANGER_FIRECRACKER_BIN") or shutil.which("firecracker")
    if fc_bin is None:
        pytest.skip("no firecracker binary (BANGER_FIRECRACKER_BIN or PATH): the real jailed launch did NOT run")
    f = dataclasses.replace(jail_files, exec_file=Path(os.path.realpath(fc_bin)))
    write_config(base, jailer_chroot_base=str(f.jail_base), jailer_bin=os.path.realpath(str(REAL_JAILER)))
    with running_helper(None, base, owner_user) as h, daemon_loop() as loop:
        fc, spec = jailed_backend(f, h.socket, loop)
        proc = fc.launch(fc.plan(spec), timeout=20)
        try:
            with FirecrackerApi(proc.control_socket) as api:
                info = api.get_instance_info()
            assert (info["state"], info["id"]) == ("Not started", JAIL_ID)
            status = Path(f"/proc/{proc.pid}/status").read_text()
            assert f"Uid:\t{owner_user.uid}\t" in status
            assert os.getsid(proc.pid) == proc.pid  # its own session: it outlives the daemon
            adopted = fc.adopt(VM_ID, f.run_dir)
            assert adopted is not None and adopted.pid == proc.pid
        finally:
            fc.kill(proc)
        assert not Path(f"/proc/{proc.pid}").exists() or fc.adopt(VM_ID, f.run_dir) is None
        assert list(f.run_dir.iterdir()) == []
        assert list(f.jail_base.iterdir()) == []


def test_jail_launcher_refuses_to_block_the_daemons_loop(base: Path) -> None:
    """Called on the event loop it must wait for, the launcher would hang the daemon: it says so instead."""
    from banger.roothelper.client import HelperJailLauncher

    async def on_the_loop() -> str:
        launcher = HelperJailLauncher(HelperClient(base / "none.sock", system=False), asyncio.get_running_loop())
        with pytest.raises(BangerError) as info:
            launcher.cleanup(VM_ID)
        return info.value.message

    assert asyncio.run(on_the_loop()) == (
        "a jail launcher call was made on the daemon's event loop; run the Vmm method in a worker thread "
        "(asyncio.to_thread)")
