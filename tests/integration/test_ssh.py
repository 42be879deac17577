"""banger's SSH layer against a real OpenSSH sshd in a throwaway network namespace.

sshd listens on 127.0.0.1:22 inside the namespace, with a host key and authorized_keys from a temp
directory. The client side (the TCP probe, ssh-keyscan and ssh) runs in a worker thread that has joined
the namespace with setns(2); network namespaces are per thread, and children inherit the thread's.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from banger.errors import BangerError
from banger.guest import knownhosts, ssh
from banger.guest.knownhosts import HostKeyMismatch

T = TypeVar("T")
ALIAS = "web.vm"
IP = "127.0.0.1"
CLONE_NEWNET = 0x40000000
needs_root = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespace, sshd)"),
]


# --- argv (no root, no sshd) -------------------------------------------------------------------------------


def test_ssh_argv_shape(tmp_path: Path) -> None:
    argv = ssh.ssh_argv(
        "172.30.0.2", key=tmp_path / "id", known_hosts=tmp_path / "kh", host_alias=ALIAS,
        command=["sh", "-c", "exit 42"], tty=False, control_dir=Path("/run/b/c"), extra_opts=["Foo=bar"],
    )  # fmt: skip
    assert argv[:7] == ["ssh", "-F", "none", "-i", str(tmp_path / "id"), "-p", "22"]
    opts = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
    assert opts[0] == "Foo=bar"  # ssh keeps the first value, so extra options win
    for expected in (
        "IdentitiesOnly=yes", f"UserKnownHostsFile={tmp_path / 'kh'}", "StrictHostKeyChecking=yes",
        f"HostKeyAlias={ALIAS}", "BatchMode=yes", "LogLevel=ERROR", "KexAlgorithms=curve25519-sha256",
        "ConnectTimeout=5", "ControlMaster=auto", "ControlPersist=60",
    ):  # fmt: skip
        assert expected in opts
    control = next(o for o in opts if o.startswith("ControlPath="))
    assert re.fullmatch(r"ControlPath=/run/b/c/[0-9a-f]{16}", control)
    assert argv[-5:-1] == ["-l", "root", "--", "172.30.0.2"]
    assert argv[-1] == "sh -c 'exit 42'"
    assert "-T" in argv and "-t" not in argv

    interactive = ssh.ssh_argv(
        "172.30.0.2", key=tmp_path / "id", known_hosts=tmp_path / "kh", host_alias=ALIAS,
        command=None, tty=True, control_dir=None, batch=False,
    )  # fmt: skip
    assert interactive[-1] == "172.30.0.2" and "-t" in interactive
    assert "BatchMode=yes" not in interactive and not any(a.startswith("Control") for a in interactive)


def test_control_path_differs_per_alias_and_ip_and_refuses_long_dirs() -> None:
    d = Path("/run/banger/ssh")
    assert ssh.control_path(d, "a.vm", "10.0.0.2") != ssh.control_path(d, "b.vm", "10.0.0.2")
    assert ssh.control_path(d, "a.vm", "10.0.0.2") != ssh.control_path(d, "a.vm", "10.0.0.3")
    with pytest.raises(BangerError, match="too long for a Unix socket path"):
        ssh.control_path(Path("/" + "x" * 80), "a.vm", "10.0.0.2")


def test_ensure_key_creates_the_pair_with_modes(tmp_path: Path) -> None:
    key = tmp_path / "state" / "ssh" / "id_ed25519"
    pub = ssh.ensure_key(key)
    assert pub == tmp_path / "state" / "ssh" / "id_ed25519.pub"
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    text = ssh.public_key(key)
    assert re.fullmatch(r"ssh-ed25519 [A-Za-z0-9+/=]+ banger", text)
    assert ssh.public_key(pub) == text
    # Idempotent: the same key comes back, nothing regenerated.
    assert ssh.ensure_key(key) == pub and ssh.public_key(key) == text
    assert sorted(p.name for p in key.parent.iterdir()) == ["id_ed25519", "id_ed25519.pub"]
    # A missing .pub is derived from the private key.
    pub.unlink()
    ssh.ensure_key(key)
    assert ssh.public_key(key).split()[:2] == text.split()[:2]


def test_ensure_key_refuses_a_key_others_can_read(tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    ssh.ensure_key(key)
    os.chmod(key, 0o644)
    with pytest.raises(BangerError, match=r"readable by others \(mode 0644\); it must be 0600") as info:
        ssh.ensure_key(key)
    assert info.value.hint is not None and f"chmod 600 {key}" in info.value.hint


# --- a real sshd in a network namespace -------------------------------------------------------------------


class Netns:
    """A network namespace with lo up, and a worker thread inside it that runs the client side."""

    def __init__(self, name: str) -> None:
        self.name = name
        subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        self._pool = ThreadPoolExecutor(max_workers=1, initializer=self._enter)

    def _enter(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        finally:
            os.close(fd)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._pool.submit(fn, *args, **kwargs).result()

    def run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return self.call(subprocess.run, argv, capture_output=True, text=True, timeout=60, check=False)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        subprocess.run(["ip", "netns", "del", self.name], check=False)


class Sshd:
    """OpenSSH's sshd in the namespace on 127.0.0.1:22; `restart(new_host_key=True)` plays a recreated VM."""

    def __init__(self, ns: Netns, workdir: Path, authorized_key: str) -> None:
        self.ns = ns
        self.dir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        (workdir / "authorized_keys").write_text(authorized_key + "\n")
        self.config = workdir / "sshd_config"
        self.config.write_text(
            "Port 22\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {workdir / 'host_ed25519'}\n"
            f"AuthorizedKeysFile {workdir / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "StrictModes no\n"
            "UsePAM no\n"
            f"PidFile {workdir / 'sshd.pid'}\n"
        )
        self._new_host_key()
        # sshd's privilege-separation chroot; Debian's service unit creates it, we don't run the unit.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)

    def _new_host_key(self) -> None:
        for p in (self.dir / "host_ed25519", self.dir / "host_ed25519.pub"):
            p.unlink(missing_ok=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.dir / "host_ed25519"], check=True
        )

    @property
    def host_key(self) -> str:
        return knownhosts.normalise_key((self.dir / "host_ed25519.pub").read_text())

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns.name, "/usr/sbin/sshd", "-D", "-e", "-f", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "sshd.log", "ab"),  # noqa: SIM115
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"sshd exited {self.proc.returncode}: {(self.dir / 'sshd.log').read_text()}"
                )
            if self.ns.call(_accepts, IP, 22):
                return
            time.sleep(0.05)
        raise RuntimeError("sshd did not listen within 10s")

    def stop(self) -> None:
        # Only the listener: sessions it already forked (and so ControlMaster connections) live on.
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self, *, new_host_key: bool = False) -> None:
        self.stop()
        if new_host_key:
            self._new_host_key()
        self.start()

    def kill_all(self) -> None:
        self.stop()
        # Session processes forked by our sshd (they run in the namespace; nothing else there).
        out = subprocess.run(
            ["ip", "netns", "pids", self.ns.name], capture_output=True, text=True, check=False
        )
        for pid in out.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _accepts(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=1):
            return True
    except OSError:
        return False


def _home_ssh_state() -> dict[str, object]:
    import pwd

    state: dict[str, object] = {}
    for home in {os.environ.get("HOME", ""), pwd.getpwuid(os.getuid()).pw_dir}:
        d = Path(home) / ".ssh"
        state[str(d)] = sorted((p.name, p.stat().st_mtime_ns) for p in d.iterdir()) if d.exists() else None
    return state


class Env:
    def __init__(self, ns: Netns, sshd: Sshd, work: Path) -> None:
        self.ns = ns
        self.sshd = sshd
        self.key = work / "ssh" / "id_ed25519"
        self.known_hosts = work / "kh" / "known_hosts"
        self.control_dir = work / "cm"
        self.control_dir.mkdir(mode=0o700)

    def argv(self, command: list[str] | None, *, control: bool = False, port: int = 22) -> list[str]:
        return ssh.ssh_argv(
            IP, key=self.key, known_hosts=self.known_hosts, host_alias=ALIAS, command=command, tty=False,
            control_dir=self.control_dir if control else None, port=port,
        )  # fmt: skip

    def wait(self, seconds: float = 15, **kwargs: Any) -> float:
        return self.ns.call(
            ssh.wait_for_ssh, IP, kwargs.pop("port", 22), deadline=time.monotonic() + seconds, key=self.key,
            known_hosts=self.known_hosts, alias=ALIAS, **kwargs,
        )  # fmt: skip


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespace, sshd)")
    if not Path("/usr/sbin/sshd").exists():
        pytest.skip("openssh-server is not installed (scripts/setup installs it)")
    # Short: the ControlMaster socket must fit in 108 bytes.
    work = Path(tempfile.mkdtemp(prefix="bgr-ssh-", dir="/tmp"))
    home_before = _home_ssh_state()
    ns = Netns(f"bgr-ssh-{os.getpid()}")
    sshd: Sshd | None = None
    try:
        key = work / "ssh" / "id_ed25519"
        ssh.ensure_key(key)
        sshd = Sshd(ns, work, ssh.public_key(key))
        sshd.start()
        yield Env(ns, sshd, work)
    finally:
        if sshd is not None:
            sshd.kill_all()
        ns.close()
        shutil.rmtree(work, ignore_errors=True)
    # Checked after everything ran, including the mismatch and re-pin cases.
    assert _home_ssh_state() == home_before, "banger's ssh wrote to ~/.ssh"


class TestAgainstRealSshd:
    pytestmark = needs_root

    def test_wait_for_ssh_pins_on_first_contact(self, env: Env) -> None:
        assert knownhosts.lookup(env.known_hosts, ALIAS) == []
        waited = env.wait()
        print(f"\nwait_for_ssh (sshd already up): {waited:.3f}s")
        assert knownhosts.lookup(env.known_hosts, ALIAS) == [env.sshd.host_key]
        assert env.known_hosts.read_text() == f"{ALIAS} {env.sshd.host_key}\n"
        assert stat.S_IMODE(env.known_hosts.stat().st_mode) == 0o600
        # Second contact: the pin matches, nothing is added.
        env.wait()
        assert env.known_hosts.read_text() == f"{ALIAS} {env.sshd.host_key}\n"

    def test_remote_exit_status_comes_back(self, env: Env) -> None:
        env.wait()
        proc = env.ns.run(env.argv(["sh", "-c", "exit 42"]))
        assert proc.returncode == 42, proc.stderr

    def test_arguments_with_spaces_and_quotes_survive(self, env: Env) -> None:
        env.wait()
        args = ["a b", "it's", '"dq"', "$HOME", "*", "", "back\\slash", "semi;colon", "new\nline"]
        proc = env.ns.run(env.argv(["sh", "-c", 'printf "<%s>" "$@"', "_", *args]))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "".join(f"<{a}>" for a in args)

    def test_ssh_itself_refuses_a_key_that_is_not_pinned(self, env: Env) -> None:
        env.wait()
        env.known_hosts.write_text(f"{ALIAS} {knownhosts.normalise_key(ssh.public_key(env.key))}\n")
        try:
            proc = env.ns.run(env.argv(["true"]))
            assert proc.returncode == 255
            assert "Host key verification failed" in proc.stderr
        finally:
            knownhosts.remove(env.known_hosts, [ALIAS])

    def test_control_master_is_reused(self, env: Env) -> None:
        env.wait()
        ssh.stop_master(IP, host_alias=ALIAS, control_dir=env.control_dir)
        socket_path = ssh.control_path(env.control_dir, ALIAS, IP)
        assert not socket_path.exists()

        def timed() -> float:
            t = time.monotonic()
            proc = env.ns.run(env.argv(["true"], control=True))
            assert proc.returncode == 0, proc.stderr
            return time.monotonic() - t

        plain = []
        for _ in range(5):
            t = time.monotonic()
            assert env.ns.run(env.argv(["true"])).returncode == 0
            plain.append(time.monotonic() - t)
        first = timed()
        assert stat.S_ISSOCK(socket_path.stat().st_mode)
        reused = [timed() for _ in range(5)]
        print(
            f"\nnew connection: {min(plain) * 1000:.1f} ms (min of 5); first with ControlMaster: {first * 1000:.1f} ms;"
            f" reused: {min(reused) * 1000:.1f} ms (min of 5)"
        )
        assert min(reused) < min(plain)
        # Proof that the socket carries the session: with no sshd listening, a multiplexed command works.
        env.sshd.stop()
        try:
            assert not env.ns.call(_accepts, IP, 22)
            proc = env.ns.run(env.argv(["sh", "-c", "exit 7"], control=True))
            assert proc.returncode == 7, proc.stderr
            assert env.ns.run(env.argv(["true"])).returncode == 255
        finally:
            env.sshd.start()
        ssh.stop_master(IP, host_alias=ALIAS, control_dir=env.control_dir)
        assert not socket_path.exists()

    def test_wait_for_ssh_leaves_a_master_behind(self, env: Env) -> None:
        env.wait(control_dir=env.control_dir)
        socket_path = ssh.control_path(env.control_dir, ALIAS, IP)
        try:
            assert stat.S_ISSOCK(socket_path.stat().st_mode)
        finally:
            ssh.stop_master(IP, host_alias=ALIAS, control_dir=env.control_dir)

    def test_wait_for_ssh_waits_for_a_late_sshd(self, env: Env) -> None:
        env.wait()
        env.sshd.stop()
        from threading import Timer

        timer = Timer(1.0, env.sshd.start)
        timer.start()
        try:
            waited = env.wait(seconds=15)
        finally:
            timer.join()
        print(f"\nwait_for_ssh (sshd started 1 s late): {waited:.3f}s")
        assert 0.9 < waited < 10

    def test_new_host_key_is_a_possible_mitm_and_repin_after_remove(self, env: Env) -> None:
        env.wait()
        old = env.sshd.host_key
        env.sshd.restart(new_host_key=True)
        new = env.sshd.host_key
        assert new != old
        # Through pin directly ...
        with pytest.raises(HostKeyMismatch, match="possible MITM") as info:
            knownhosts.pin(env.known_hosts, ALIAS, env.ns.call(knownhosts.scan_host_key, IP))
        assert knownhosts.fingerprint(old) in info.value.message
        assert knownhosts.fingerprint(new) in info.value.message
        # ... and through wait_for_ssh, which fails at once rather than at the deadline.
        t = time.monotonic()
        with pytest.raises(HostKeyMismatch, match="possible MITM") as info:
            env.wait(seconds=30, vm_name="web")
        assert time.monotonic() - t < 10
        assert str(info.value).endswith(
            "(if the VM was recreated, run `banger vm delete web` (which drops its pins))"
        )
        # ssh on its own refuses too (the pin is still the old key).
        assert env.ns.run(env.argv(["true"])).returncode == 255
        # What `vm delete` does: drop the alias and the IP; then the next contact pins the new key.
        assert knownhosts.remove(env.known_hosts, [ALIAS, IP]) == 1
        env.wait()
        assert knownhosts.lookup(env.known_hosts, ALIAS) == [new]
        assert env.ns.run(env.argv(["true"])).returncode == 0

    def test_wait_for_ssh_times_out_with_a_clear_message(self, env: Env) -> None:
        t = time.monotonic()
        with pytest.raises(BangerError) as info:
            env.wait(seconds=2, port=2222, vm_name="web")
        elapsed = time.monotonic() - t
        assert 2.0 <= elapsed < 3.0, elapsed
        assert type(info.value) is BangerError
        assert re.fullmatch(
            r"ssh to web\.vm \(127\.0\.0\.1:2222\) not ready after 2\.\ds: TCP 127\.0\.0\.1:2222: Connection refused",
            info.value.message,
        ), info.value.message
        assert info.value.hint == "sshd in the guest is the likely suspect; look at `banger vm logs web`"
