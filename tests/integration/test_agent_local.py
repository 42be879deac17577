"""The real guest agent (src/banger/guest/agent.py) as a local process, driven by the real AgentClient.

No VM: the agent's hidden test transports stand in for the VM's channels. `--listen-unix` accepts
streams exactly as the vsock listener does (same code path). `--serial-unix` connects to a relay that
plays QEMU's virtio-serial chardev: one agent stream, one host client at a time, EOF to the agent when
the host leaves, and bytes the agent wrote meanwhile kept for the next client, as QEMU does.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import banger.guest
from banger.errors import AlreadyExists, BadRequest, NotFound
from banger.guest.agent_client import AgentClient, wait_ready
from banger.guest.agent_wire import AgentUnavailable, AgentVersionMismatch, encode_frame, pop_frame

AGENT = Path(banger.guest.__file__).parent / "agent.py"
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def wait_until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone before, or while, we read
        return True


_started: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _reap_agents() -> Iterator[None]:
    """Whatever a test does or fails to do, no agent it started outlives it."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


class AgentProcess:
    def __init__(self, workdir: Path, *args: str, python: str = PYTHON) -> None:
        self.log = workdir / f"agent-{time.monotonic_ns()}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([python, str(AGENT), "-v", *args], stdout=out, stderr=out)
        _started.append(self.proc)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"agent ignored SIGTERM; log:\n{self.log.read_text()}") from None
        log = self.log.read_text()
        assert "Traceback" not in log, f"the agent logged an exception:\n{log}"
        return self.proc.returncode


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ag-", dir="/tmp"))  # short: unix socket paths max out at 107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_unix_agent(workdir: Path, *extra: str, python: str = PYTHON) -> tuple[AgentProcess, Path]:
    sock = workdir / "agent.sock"
    agent = AgentProcess(workdir, "--listen-unix", str(sock), *extra, python=python)
    wait_until(lambda: sock.exists() or agent.proc.poll() is not None, what="the agent's socket")
    assert agent.proc.poll() is None, agent.log.read_text()
    return agent, sock


@pytest.fixture
def unix_agent(workdir: Path) -> Iterator[tuple[AgentProcess, Path]]:
    agent, sock = start_unix_agent(workdir)
    yield agent, sock
    assert agent.stop() == 0


@pytest.fixture
def client(unix_agent: tuple[AgentProcess, Path]) -> Iterator[AgentClient]:
    with AgentClient.connect_unix(unix_agent[1]) as c:
        yield c


def raw_connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    return sock


def raw_recv_frame(sock: socket.socket, buf: bytearray) -> tuple[dict[str, object], bytes] | None:
    """The next frame, or None at EOF."""
    while (frame := pop_frame(buf)) is None:
        data = sock.recv(65536)
        if not data:
            return None
        buf += data
    return frame


# --- hello, health, ports ------------------------------------------------------------------------------


def test_hello_negotiates_and_refuses_unknown_versions(unix_agent: tuple[AgentProcess, Path]) -> None:
    sock, buf = raw_connect(unix_agent[1]), bytearray()
    sock.sendall(encode_frame({"t": "health", "ch": 1}))
    frame = raw_recv_frame(sock, buf)
    assert frame is not None and frame[0]["t"] == "error"
    assert frame[0]["message"] == "send hello {version: 1} first"

    sock.sendall(encode_frame({"t": "hello", "ch": 0, "version": 99}))
    frame = raw_recv_frame(sock, buf)
    assert frame is not None
    assert frame[0]["t"] == "error" and frame[0]["code"] == "bad_version"
    assert frame[0]["message"] == "unsupported protocol version 99 (agent speaks 1)"

    sock.sendall(encode_frame({"t": "hello", "ch": 0, "version": 1}))
    frame = raw_recv_frame(sock, buf)
    assert frame is not None and frame[0]["t"] == "hello" and frame[0]["version"] == 1
    features = frame[0]["features"]
    assert isinstance(features, list) and {"exec", "file_write", "ports", "tty"} <= set(features)
    sock.close()

    with AgentClient.connect_unix(unix_agent[1], handshake=False) as c:
        with pytest.raises(AgentVersionMismatch) as refused:
            c.hello(version=99)
        assert refused.value.message == "guest agent speaks protocol 1, banger speaks 99"
        assert c.hello().protocol == 1  # the stream is still usable after a refused version
        assert c.health().ok


def test_health(client: AgentClient) -> None:
    health = client.health()
    assert health.ok and health.uptime > 0
    assert health.hostname == socket.gethostname()
    assert health.boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert client.info is not None and health.agent_version == client.info.agent_version


def test_ports_lists_tcp_and_udp_listeners_with_process_names(client: AgentClient) -> None:
    server = subprocess.Popen(
        ["/usr/bin/python3", "-c",
         "import socket, sys, time\n"
         "t = socket.socket(); t.bind(('127.0.0.1', 0)); t.listen()\n"
         "u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.bind(('::1', 0))\n"
         "print(t.getsockname()[1], u.getsockname()[1], flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert server.stdout is not None
        tcp_port, udp_port = map(int, server.stdout.readline().split())
        ports = client.ports()
        tcp = [p for p in ports if p.proto == "tcp" and p.port == tcp_port]
        udp = [p for p in ports if p.proto == "udp" and p.port == udp_port]
        assert len(tcp) == 1 and tcp[0].address == "127.0.0.1" and tcp[0].family == 4
        assert tcp[0].processes == ("python3",) and tcp[0].pids == (server.pid,)
        assert len(udp) == 1 and udp[0].address == "::1" and udp[0].family == 6
        assert udp[0].processes == ("python3",)
    finally:
        server.kill()
        server.wait()
    assert not [p for p in client.ports() if p.port == tcp_port and p.proto == "tcp"]


# --- exec ----------------------------------------------------------------------------------------------


def test_exec_exit_codes(client: AgentClient) -> None:
    assert client.exec(["true"]).code == 0
    status = client.exec(shell="exit 42")
    assert (status.code, status.signal, status.returncode) == (42, None, 42)
    killed = client.exec(["sh", "-c", "kill -9 $$"])
    assert (killed.code, killed.signal, killed.returncode) == (None, 9, 137)
    with pytest.raises(NotFound, match="no-such-command-xyz: command not found"):
        client.exec(["no-such-command-xyz"])
    with pytest.raises(NotFound, match="working directory /nonexistent-dir does not exist"):
        client.exec(["true"], cwd="/nonexistent-dir")
    with pytest.raises(BadRequest, match="'argv' must be a non-empty list of strings"):
        client.exec([])


def test_exec_streams_output_as_it_comes(client: AgentClient) -> None:
    events: list[tuple[float, str, bytes]] = []
    start = time.monotonic()
    status = client.exec(
        shell="echo first; sleep 1; echo second >&2; sleep 0.3; echo third",
        on_stdout=lambda b: events.append((time.monotonic(), "out", b)),
        on_stderr=lambda b: events.append((time.monotonic(), "err", b)),
    )
    end = time.monotonic()
    assert status.code == 0
    assert [(kind, data) for _, kind, data in events] == [
        ("out", b"first\n"), ("err", b"second\n"), ("out", b"third\n")]  # fmt: skip
    assert events[0][0] - start < 0.9, "the first line must arrive while the command still sleeps"
    assert end - events[0][0] > 1.0


def test_exec_stdin_env_cwd(client: AgentClient, workdir: Path) -> None:
    payload = os.urandom(700_000)
    result = client.run(["sh", "-c", "cat; echo done >&2"], stdin=payload)
    assert result.status.code == 0 and result.stdout == payload and result.stderr == b"done\n"

    streamed = client.run(["wc", "-c"], stdin=io.BytesIO(payload))
    assert streamed.stdout.strip() == b"700000"
    chunks = client.run(["cat"], stdin=iter([b"a", b"b", b"c"]))
    assert chunks.stdout == b"abc"

    result = client.run(shell='echo "$FOO"; pwd; echo "$HOME"', env={"FOO": "bar baz"}, cwd=str(workdir))
    assert result.stdout.decode().splitlines() == ["bar baz", str(workdir), os.path.expanduser("~root")]


def test_exec_timeout_kills_the_process_group(client: AgentClient) -> None:
    out = bytearray()
    start = time.monotonic()
    status = client.exec(shell="sleep 100 & echo $!; wait", timeout=1.0, on_stdout=out.extend)
    assert time.monotonic() - start < 5
    assert status.timed_out and status.signal == signal.SIGKILL
    child = int(out.decode().strip())
    wait_until(lambda: pid_gone(child), 5, "the background child to die")


def test_background_processes_outlive_the_command(client: AgentClient) -> None:
    start = time.monotonic()
    result = client.run(shell="(sleep 0.5; echo late) & sleep 30 & echo $!; echo early")
    assert time.monotonic() - start < 4  # exit is sent at most ~2 s after the command ends
    pid, *rest = result.stdout.decode().split()
    assert result.status.code == 0 and rest == ["early", "late"]
    try:
        time.sleep(0.3)
        assert not pid_gone(int(pid)), "a command's background process must not be killed when it exits"
    finally:
        os.kill(int(pid), signal.SIGKILL)


def test_host_disconnect_kills_the_running_command(unix_agent: tuple[AgentProcess, Path], workdir: Path) -> None:
    pidfile = workdir / "pid"
    c = AgentClient.connect_unix(unix_agent[1])
    c.start_exec(shell=f"echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; exec sleep 100")
    wait_until(pidfile.exists, what="the command to start")
    pid = int(pidfile.read_text())
    assert not pid_gone(pid)
    c.close()
    wait_until(lambda: pid_gone(pid), 5, "the command to be killed")


def test_exec_signal(client: AgentClient) -> None:
    ready = threading.Event()
    out = bytearray()

    def on_out(data: bytes) -> None:
        out.extend(data)
        ready.set()

    handle = client.start_exec(shell="trap 'echo got INT; exit 7' INT; echo ready; while :; do sleep 0.1; done",
                               on_stdout=on_out)
    waiter = threading.Thread(target=lambda: handle.wait(10))
    waiter.start()
    assert ready.wait(5)
    handle.signal("INT")
    waiter.join(10)
    assert handle.status is not None and handle.status.code == 7 and b"got INT" in out


def test_tty_exec(client: AgentClient) -> None:
    out = bytearray()
    assert client.exec(["tty"], tty=True, on_stdout=out.extend).code == 0
    assert out.decode().strip().startswith("/dev/pts/")

    sizes = bytearray()
    with client.start_exec(["stty", "size"], tty=True, rows=40, cols=100, on_stdout=sizes.extend) as handle:
        assert handle.wait(10).code == 0
    assert sizes.decode().strip() == "40 100"

    echoed = bytearray()
    with client.start_exec(shell="read x; stty size", tty=True, stdin=True, on_stdout=echoed.extend) as handle:
        handle.resize(50, 132)
        handle.write_stdin(b"go\n")
        assert handle.wait(10).code == 0
    assert b"50 132" in echoed


def test_concurrent_channels_on_one_connection(client: AgentClient) -> None:
    results: dict[int, bytes] = {}

    def one(i: int) -> None:
        results[i] = client.run(shell=f"sleep 1; echo {i}").stdout

    start = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(5)]
    for thread in threads:
        thread.start()
    assert client.health().ok  # answered while the five commands sleep
    assert time.monotonic() - start < 0.9
    for thread in threads:
        thread.join(10)
    assert time.monotonic() - start < 2.5
    assert results == {i: f"{i}\n".encode() for i in range(5)}


def test_exec_true_latency(client: AgentClient, capsys: pytest.CaptureFixture[str]) -> None:
    samples = []
    for _ in range(50):
        start = time.perf_counter()
        assert client.exec(["true"]).code == 0
        samples.append(time.perf_counter() - start)
    median = statistics.median(samples)
    with capsys.disabled():
        print(f"\nagent `exec true` round trip over the unix transport: median {median * 1000:.2f} ms "
              f"(min {min(samples) * 1000:.2f}, max {max(samples) * 1000:.2f}, n={len(samples)})")
    assert median < 0.5


# --- files ---------------------------------------------------------------------------------------------


def test_file_write_read_round_trip_5mb(client: AgentClient, workdir: Path) -> None:
    data = os.urandom(5 * 1024 * 1024 + 17)
    target = workdir / "blob.bin"
    uid, gid = (12345, 23456) if os.geteuid() == 0 else (None, None)
    assert client.write_file(str(target), data, mode=0o640, uid=uid, gid=gid) == len(data)
    info = target.stat()
    assert info.st_mode & 0o7777 == 0o640 and info.st_size == len(data)
    if uid is not None:
        assert (info.st_uid, info.st_gid) == (uid, gid)
    assert [p.name for p in workdir.iterdir() if p.name.startswith(".")] == []

    back, meta = client.read_file(str(target))
    assert hashlib.sha256(back).hexdigest() == hashlib.sha256(data).hexdigest()
    assert (meta.mode, meta.size) == (0o640, len(data))
    if uid is not None:
        assert (meta.uid, meta.gid) == (uid, gid)

    # Replacing keeps the old mode and owner unless told otherwise; a new file gets 0644.
    client.write_file(str(target), b"small")
    assert target.read_bytes() == b"small" and target.stat().st_mode & 0o7777 == 0o640
    if uid is not None:
        assert target.stat().st_uid == uid
    client.write_file(str(workdir / "new"), io.BytesIO(b"x" * 300_000))
    assert (workdir / "new").stat().st_mode & 0o777 == 0o644 and (workdir / "new").stat().st_size == 300_000


def test_file_write_aborted_leaves_nothing(client: AgentClient, workdir: Path) -> None:
    workdir = workdir / "files"
    workdir.mkdir()
    (workdir / "keep").write_bytes(b"old")

    def chunks() -> Iterator[bytes]:
        yield b"a" * 200_000
        yield b"b" * 200_000
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError, match="source failed"):
        client.write_file(str(workdir / "keep"), chunks())
    wait_until(lambda: sorted(p.name for p in workdir.iterdir()) == ["keep"], 5, "the temp file to be removed")
    assert (workdir / "keep").read_bytes() == b"old"


def test_file_errors(client: AgentClient, workdir: Path) -> None:
    with pytest.raises(NotFound, match=f"{workdir}/missing: no such file or directory"):
        client.read_file(str(workdir / "missing"))
    with pytest.raises(BadRequest, match="is a directory"):
        client.read_file(str(workdir))
    with pytest.raises(NotFound, match="directory /nonexistent-dir does not exist"):
        client.write_file("/nonexistent-dir/x", b"data")
    with pytest.raises(BadRequest, match="must be absolute"):
        client.list_dir("relative/path")
    assert client.health().ok


def test_list_dir_and_mkdir(client: AgentClient, workdir: Path) -> None:
    workdir = workdir / "files"
    workdir.mkdir()
    (workdir / "f").write_bytes(b"abc")
    (workdir / "f").chmod(0o600)
    (workdir / "link").symlink_to("f")
    assert client.mkdir(str(workdir / "a" / "b" / "c"), mode=0o700, parents=True) is True
    assert (workdir / "a" / "b" / "c").stat().st_mode & 0o7777 == 0o700
    assert client.mkdir(str(workdir / "a" / "b" / "c"), parents=True) is False
    with pytest.raises(AlreadyExists):
        client.mkdir(str(workdir / "a"))
    with pytest.raises(NotFound):
        client.mkdir(str(workdir / "x" / "y"))

    entries = {e.name: e for e in client.list_dir(str(workdir))}
    assert set(entries) == {"f", "link", "a"}
    assert (entries["f"].type, entries["f"].mode, entries["f"].size) == ("file", 0o600, 3)
    assert (entries["link"].type, entries["link"].target) == ("symlink", "f")
    assert entries["a"].type == "dir"
    assert entries["f"].mtime == pytest.approx((workdir / "f").stat().st_mtime)

    many = workdir / "many"
    many.mkdir()
    for i in range(600):  # more than one `items` frame
        (many / f"n{i:03d}").touch()
    assert [e.name for e in client.list_dir(str(many))] == [f"n{i:03d}" for i in range(600)]


# --- robustness ----------------------------------------------------------------------------------------


def test_malformed_frames_get_errors_and_the_agent_keeps_serving(unix_agent: tuple[AgentProcess, Path]) -> None:
    sock, buf = raw_connect(unix_agent[1]), bytearray()
    sock.sendall(encode_frame({"t": "hello", "ch": 0, "version": 1}))
    assert (raw_recv_frame(sock, buf) or ({},))[0]["t"] == "hello"

    body = b"this is not json\npayload"
    sock.sendall(len(body).to_bytes(4, "big") + body)
    frame = raw_recv_frame(sock, buf)
    assert frame is not None and frame[0]["ch"] == 0 and frame[0]["code"] == "bad_request"
    assert str(frame[0]["message"]).startswith("malformed frame: the header is not JSON")

    sock.sendall(encode_frame({"ch": 7, "no_type": True}))
    frame = raw_recv_frame(sock, buf)
    assert frame is not None and frame[0]["ch"] == 7 and "needs 't'" in str(frame[0]["message"])

    sock.sendall(encode_frame({"t": "frobnicate", "ch": 8}))
    frame = raw_recv_frame(sock, buf)
    assert frame is not None and frame[0]["code"] == "unknown_method" and frame[0]["ch"] == 8

    sock.sendall(encode_frame({"t": "exec", "ch": 9, "argv": "not-a-list"}))
    frame = raw_recv_frame(sock, buf)
    assert frame is not None and frame[0]["code"] == "bad_request" and frame[0]["ch"] == 9

    sock.sendall(encode_frame({"t": "health", "ch": 10}))  # the same stream still works
    frame = raw_recv_frame(sock, buf)
    assert frame is not None and frame[0]["t"] == "result" and frame[0]["ok"] is True

    sock.sendall(b"\xff\xff\xff\xffgarbage")  # the framing is lost: error, then the connection closes
    frame = raw_recv_frame(sock, buf)
    assert frame is not None and "frame length 4294967295 is out of range" in str(frame[0]["message"])
    assert raw_recv_frame(sock, buf) is None
    sock.close()

    with AgentClient.connect_unix(unix_agent[1]) as c:
        assert c.health().ok
    assert unix_agent[0].proc.poll() is None


def test_sigterm_stops_the_agent_and_its_commands(workdir: Path) -> None:
    agent, sock = start_unix_agent(workdir)
    pidfile = workdir / "pid"
    with AgentClient.connect_unix(sock) as c:
        c.start_exec(shell=f"echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; exec sleep 100")
        wait_until(pidfile.exists, what="the command to start")
        pid = int(pidfile.read_text())
        start = time.monotonic()
        assert agent.stop() == 0
        assert time.monotonic() - start < 3
        wait_until(lambda: pid_gone(pid), 5, "the command to be killed")


def test_poweroff_runs_the_configured_action(workdir: Path) -> None:
    marker = workdir / "powered-off"
    agent, sock = start_unix_agent(workdir, "--poweroff-command", f"touch {marker}")
    try:
        with AgentClient.connect_unix(sock) as c:
            c.poweroff()
        wait_until(marker.exists, 5, "the poweroff action")
    finally:
        assert agent.stop() == 0


def test_wait_ready_retries_until_the_agent_answers(workdir: Path) -> None:
    sock = workdir / "agent.sock"
    started: list[AgentProcess] = []
    timer = threading.Timer(0.8, lambda: started.append(AgentProcess(workdir, "--listen-unix", str(sock))))
    timer.start()
    try:
        t0 = time.monotonic()
        with wait_ready(lambda: AgentClient.connect_unix(sock, timeout=1.0), time.monotonic() + 15) as c:
            assert c.health().ok
        assert time.monotonic() - t0 >= 0.8
    finally:
        timer.join()
        for agent in started:
            assert agent.stop() == 0
    t0 = time.monotonic()
    with pytest.raises(AgentUnavailable, match="did not answer in time"):
        wait_ready(lambda: AgentClient.connect_unix(workdir / "nothing.sock"), time.monotonic() + 0.5)
    assert time.monotonic() - t0 < 2


def test_runs_on_python_3_9(workdir: Path) -> None:
    candidates = [shutil.which("python3.9"), *sorted(glob.glob("/root/.pyenv/versions/3.9*/bin/python3.9"))]
    python = next((p for p in candidates if p and subprocess.run([p, "-c", "pass"], check=False,
                                                                   capture_output=True).returncode == 0), None)
    if python is None:
        pytest.skip("no Python 3.9 interpreter here")
    agent, sock = start_unix_agent(workdir, python=python)
    try:
        with AgentClient.connect_unix(sock) as c:
            assert c.health().ok
            assert c.run(["echo", "hi"]).stdout == b"hi\n"
            assert c.exec(["tty"], tty=True).code == 0
            c.write_file(str(workdir / "f"), b"x" * 300_000, mode=0o600)
            assert c.read_file(str(workdir / "f"))[0] == b"x" * 300_000
            assert c.list_dir(str(workdir)) and c.ports() is not None
    finally:
        assert agent.stop() == 0


# --- hybrid vsock (CONNECT handshake) ------------------------------------------------------------------


class HybridVsock:
    """Firecracker's host side of vsock in miniature: `CONNECT <port>\\n` → `OK <n>\\n`, then relay to the
    agent's stream socket; a port nobody listens on gets the connection closed."""

    def __init__(self, path: Path, agent_sock: Path, port: int = 1024) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen()
        self.agent_sock, self.port = agent_sock, port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        line = b""
        while not line.endswith(b"\n"):
            line += conn.recv(1)
        if line != f"CONNECT {self.port}\n".encode():
            conn.close()
            return
        guest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        guest.connect(str(self.agent_sock))
        conn.sendall(b"OK 1073741824\n")
        for a, b in ((conn, guest), (guest, conn)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


def test_connect_vsock_uds(unix_agent: tuple[AgentProcess, Path], workdir: Path) -> None:
    vsock = HybridVsock(workdir / "v.sock", unix_agent[1])
    try:
        with AgentClient.connect_vsock_uds(workdir / "v.sock", 1024) as c:
            assert c.health().ok
            assert c.run(["echo", "via vsock"]).stdout == b"via vsock\n"
        with pytest.raises(AgentUnavailable, match="nothing listens on vsock port 52"):
            AgentClient.connect_vsock_uds(workdir / "v.sock", 52)
    finally:
        vsock.close()


# --- virtio-serial, through a relay that behaves like QEMU's chardev -----------------------------------


class SerialRelay:
    """QEMU's side of a virtio-serial port bound to a unix socket, for an agent run with --serial-unix.

    One host client at a time, one agent stream. While no host is connected the guest reads EOF: an agent
    connection is closed at once. When the host leaves, the agent's stream gets EOF (it then reconnects).
    Bytes the agent writes while no host is connected are kept for the next host, as QEMU does."""

    def __init__(self, agent_path: Path, host_path: Path) -> None:
        self.agent_listener = self._listen(agent_path)
        self.host_listener = self._listen(host_path)
        self.agent: socket.socket | None = None
        self.agent_shut = False
        self.host: socket.socket | None = None
        self.to_agent = bytearray()
        self.to_host = bytearray()
        self.agent_attempts = 0
        self.stale_delivered = 0
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def _listen(path: Path) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen(4)
        return sock

    def inject_stale(self, data: bytes) -> None:
        with self.lock:
            self.to_host += data

    def _run(self) -> None:
        while not self.stopping:
            watched = [self.agent_listener, self.host_listener, *(s for s in (self.agent, self.host) if s)]
            ready, _, _ = select.select(watched, [], [], 0.05)
            with self.lock:
                for sock in ready:
                    self._ready(sock)

    def _ready(self, sock: socket.socket) -> None:
        if sock is self.agent_listener:
            conn, _ = sock.accept()
            self.agent_attempts += 1
            if self.host is None or self.agent is not None:
                conn.close()  # no host: the port reads EOF
                return
            self.agent, self.agent_shut = conn, False
            if self.to_agent:
                conn.sendall(self.to_agent)
                self.to_agent.clear()
        elif sock is self.host_listener:
            conn, _ = sock.accept()
            if self.host is not None:
                conn.close()
                return
            self.host = conn
            if self.to_host:
                self.stale_delivered += len(self.to_host)
                conn.sendall(self.to_host)
                self.to_host.clear()
        elif sock is self.agent:
            data = self._recv(sock)
            if not data:
                sock.close()
                self.agent = None
            elif self.host is not None:
                try:
                    self.host.sendall(data)
                except OSError:  # the host left: keep the bytes, as QEMU does
                    self.to_host += data
            else:
                self.to_host += data
        elif sock is self.host:
            data = self._recv(sock)
            if not data:
                sock.close()
                self.host = None
                if self.agent is not None and not self.agent_shut:
                    self.agent.shutdown(socket.SHUT_WR)  # EOF to the guest
                    self.agent_shut = True
            elif self.agent is not None and not self.agent_shut:
                self.agent.sendall(data)
            else:
                self.to_agent += data

    @staticmethod
    def _recv(sock: socket.socket) -> bytes:
        try:
            return sock.recv(65536)
        except OSError:
            return b""

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
        for sock in (self.agent_listener, self.host_listener, self.agent, self.host):
            if sock is not None:
                sock.close()


@pytest.fixture
def serial(workdir: Path) -> Iterator[tuple[SerialRelay, Path, AgentProcess]]:
    relay = SerialRelay(workdir / "port.sock", workdir / "agent-serial.sock")
    agent = AgentProcess(workdir, "--serial-unix", str(workdir / "port.sock"))
    yield relay, workdir / "agent-serial.sock", agent
    assert agent.stop() == 0
    relay.close()


def test_serial_session_reconnect_and_eof_backoff(serial: tuple[SerialRelay, Path, AgentProcess],
                                                 workdir: Path) -> None:
    relay, host_sock, _ = serial
    # No host connected: the agent retries every 0.5 s, it does not spin.
    time.sleep(0.3)
    before = relay.agent_attempts
    time.sleep(2.0)
    assert 2 <= relay.agent_attempts - before <= 6

    pidfile = workdir / "pid"
    first = AgentClient.connect_serial(host_sock)
    assert first.health().ok
    first.start_exec(shell=f"echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; exec yes banger")
    wait_until(pidfile.exists, what="the command to start")
    pid = int(pidfile.read_text())
    time.sleep(0.2)
    first.close()  # the host goes away while output is streaming
    wait_until(lambda: pid_gone(pid), 5, "the agent to kill the command after EOF")

    with AgentClient.connect_serial(host_sock) as second:  # skips whatever the agent wrote meanwhile
        assert second.health().ok
        assert second.run(["echo", "again"]).stdout == b"again\n"


def test_serial_client_skips_stale_bytes(serial: tuple[SerialRelay, Path, AgentProcess]) -> None:
    relay, host_sock, _ = serial
    old_frames = encode_frame({"t": "stdout", "ch": 3}, b"y\n" * 1000) + encode_frame({"t": "exit", "ch": 3, "code": 0})
    relay.inject_stale(old_frames[700:] + encode_frame({"t": "hello", "ch": 0, "version": 1})[:9])
    with AgentClient.connect_serial(host_sock) as c:
        assert relay.stale_delivered > 0
        assert c.health().ok


def test_serial_agent_resyncs_after_garbage(serial: tuple[SerialRelay, Path, AgentProcess]) -> None:
    _, host_sock, _ = serial
    sock = raw_connect(host_sock)
    sock.sendall(b"\x7f\xff\xff\xff leftovers of a frame from a host that died mid-write")
    with AgentClient(sock, name="serial after garbage") as c:
        assert c.hello().protocol == 1
        assert c.health().ok


def test_serial_version_refusal(serial: tuple[SerialRelay, Path, AgentProcess]) -> None:
    with AgentClient.connect_serial(serial[1], handshake=False) as c:
        with pytest.raises(AgentVersionMismatch) as refused:
            c.hello(version=99)
        assert refused.value.message == "guest agent speaks protocol 1, banger speaks 99"
