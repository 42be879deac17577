#!/usr/bin/python3
"""banger-agent: the guest half of banger's host<->guest channel (wire format: agent_protocol.md).

Copied into every image as /usr/local/bin/banger-agent and started at boot. It must run on any
Python 3.9+ with nothing but the standard library: no banger imports, no `match`, no 3.10+ APIs.

Every host stream carries the same frames, `[u32 length][JSON header]\\n[payload]`, each tagged with a
channel id, so one stream multiplexes many requests and every transport shares one code path:
* AF_VSOCK port 1024: each host connection is a stream. Connections drop on a snapshot restore; the
  listener keeps accepting, so the host just reconnects.
* virtio-serial port "org.banger.agent": one stream shared by every host request. read() returns EOF
  while no host is connected, so the agent backs off 0.5 s and reads again (a tight loop costs a
  quarter of a core under TCG). A new `hello` on it means a new host session.
Whatever a stream was running (commands, half-written files) is killed or removed when it ends.
The agent never exits on bad input; it logs to stderr and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pwd
import queue
import select
import signal
import socket
import stat
import struct
import sys
import threading
import time

# Start-up time is boot time: under software emulation every import costs ~30x what it does on the host,
# so argparse, logging, subprocess, pty and typing are not imported before the agent listens (argparse
# only for a command line with options, subprocess and pty on the first command).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable
    from typing import Any

    Header = dict[str, Any]

PROTOCOL_VERSION = 1
AGENT_VERSION = "0.1.0"
VSOCK_PORT = 1024
SERIAL_PORT_NAME = "org.banger.agent"
MAX_FRAME = 4 * 1024 * 1024  # header + newline + payload
MAX_HEADER = 1024 * 1024
CHUNK = 128 * 1024  # payload bytes per data frame we send
READ_SIZE = 256 * 1024
EOF_BACKOFF = 0.5  # serial: pause after EOF (no host connected) before reading again
INBOX_FRAMES = 64  # frames queued per channel before the stream reader waits for the handler
EXIT_DRAIN = 2.0  # after a command exits, how long its output may still flow before `exit` is sent
ITEMS_PER_FRAME = 256
HELLO_MARK = b'{"t":"hello"'  # a host's hello header starts with these bytes; serial resyncs on them
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DATA_TYPES = frozenset({"stdin", "stdin_eof", "resize", "signal", "data", "eof"})

class Log:
    """What the agent needs of `logging`: timestamped lines on stderr (the console log or the journal)."""

    def __init__(self) -> None:
        self.verbose = False
        self.lock = threading.Lock()

    def _emit(self, msg: str, args: tuple[object, ...]) -> None:
        text = msg % args if args else msg
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} banger-agent: {text}\n"
        with self.lock, contextlib.suppress(OSError, ValueError):
            sys.stderr.write(line)
            sys.stderr.flush()

    def debug(self, msg: str, *args: object) -> None:
        if self.verbose:
            self._emit(msg, args)

    def info(self, msg: str, *args: object) -> None:
        self._emit(msg, args)

    warning = error = info

    def exception(self, msg: str, *args: object) -> None:
        import traceback

        self._emit(msg + "\n" + traceback.format_exc().rstrip(), args)


log = Log()


class AgentError(Exception):
    """A request failed in a way the host should see: the message goes into an `error` frame."""

    def __init__(self, message: str, code: str = "operation_failed") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class FramingLost(Exception):
    """The byte stream no longer lines up with frame boundaries."""


def os_error(exc: OSError, what: str) -> AgentError:
    text = (exc.strerror or str(exc)).lower()
    code = {errno.ENOENT: "not_found", errno.EEXIST: "already_exists", errno.EISDIR: "bad_request",
            errno.ENOTDIR: "bad_request", errno.EINVAL: "bad_request"}.get(exc.errno or 0, "operation_failed")
    return AgentError(f"{what}: {text}", code)


# --- frames -------------------------------------------------------------------------------------------


def encode_frame(header: Header, payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode("ascii")
    size = len(head) + 1 + len(payload)
    if len(head) > MAX_HEADER or size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes is over the {MAX_FRAME}-byte limit")
    return struct.pack(">I", size) + head + b"\n" + payload


class Frame:
    __slots__ = ("ch", "error", "header", "payload")

    def __init__(self, header: Header | None, payload: bytes, ch: int | None, error: str | None) -> None:
        self.header = header
        self.payload = payload
        self.ch = ch
        self.error = error


def parse_body(body: bytes) -> Frame:
    """One frame body; a bad header is reported in `error` (the stream itself is still in step)."""
    end = body.find(b"\n")
    if end < 0:
        return Frame(None, b"", None, "the header is not terminated by a newline")
    try:
        header = json.loads(body[:end])
    except ValueError as exc:
        return Frame(None, b"", None, f"the header is not JSON ({exc})")
    if not isinstance(header, dict):
        return Frame(None, b"", None, "the header is not a JSON object")
    ch = header.get("ch")
    if type(ch) is not int or not 0 <= ch < 2**31:
        return Frame(None, b"", None, "the header needs 'ch', a channel id in 0..2^31-1")
    kind = header.get("t")
    if not isinstance(kind, str) or not kind:
        return Frame(None, b"", ch, "the header needs 't', the frame type")
    return Frame(header, body[end + 1 :], ch, None)


class FrameReader:
    """Splits a byte stream into frames. A length out of range raises FramingLost."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next(self) -> Frame | None:
        if len(self.buf) < 4:
            return None
        (size,) = struct.unpack_from(">I", self.buf)
        if not 2 <= size <= MAX_FRAME:
            raise FramingLost(f"frame length {size} is out of range (2..{MAX_FRAME})")
        if len(self.buf) < 4 + size:
            return None
        body = bytes(self.buf[4 : 4 + size])
        del self.buf[: 4 + size]
        return parse_body(body)

    def resync(self, marker: bytes) -> bool:
        """After FramingLost: drop bytes up to the next frame whose header starts with `marker`."""
        index = self.buf.find(marker, 5)  # past the frame that failed, so this always makes progress
        if index < 0:
            keep = len(marker) + 4
            if len(self.buf) > keep:
                del self.buf[: len(self.buf) - keep]
            return False
        del self.buf[: index - 4]
        return True


def negotiate(hello: Header) -> Header:
    """The reply to a host's hello: ours, or a bad_version error. The nonce is echoed second so a host
    reading a serial port that still holds a previous session's bytes can find the reply."""
    version = hello.get("version")
    nonce = hello.get("nonce")
    ok = type(version) is int and version == PROTOCOL_VERSION
    reply: Header = {"t": "hello" if ok else "error"}
    if isinstance(nonce, str) and len(nonce) <= 64:
        reply["nonce"] = nonce
    reply["ch"] = hello.get("ch", 0)
    if ok:
        reply.update(version=PROTOCOL_VERSION, agent_version=AGENT_VERSION, features=sorted([*HANDLERS, "tty", "signal", "resize"]))
    else:
        shown = str(version) if type(version) is int else json.dumps(version)
        reply.update(code="bad_version", version=PROTOCOL_VERSION,
                     message=f"unsupported protocol version {shown} (agent speaks {PROTOCOL_VERSION})")
    return reply


# --- streams, sessions, channels ----------------------------------------------------------------------


class Conn:
    """One host stream over a non-blocking fd (socket or serial port). Reads and writes wait with
    select() in 0.5 s steps so they notice a stop or a dead stream."""

    def __init__(self, fd: int, name: str, owner: socket.socket | None = None) -> None:
        self.fd = fd
        self.name = name
        self.owner = owner  # keeps a socket object (and so its fd) alive
        self.dead = threading.Event()
        os.set_blocking(fd, False)

    def read(self, stop: threading.Event) -> bytes:
        while not stop.is_set() and not self.dead.is_set():
            try:
                return os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                select.select([self.fd], [], [], 0.5)
        return b""

    def write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.dead.is_set():
                raise ConnectionError(f"{self.name} is closed")
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                select.select([], [self.fd], [], 0.5)


class Session:
    """The frames of one host stream: hello, then requests on channels, each served by its own thread."""

    def __init__(self, agent: Agent, conn: Conn, serial: bool) -> None:
        self.agent = agent
        self.conn = conn
        self.serial = serial
        self.wlock = threading.Lock()
        self.lock = threading.Lock()
        self.channels: dict[int, Channel] = {}
        self.negotiated = False
        self.failure: OSError | None = None

    def send(self, header: Header, payload: bytes = b"") -> bool:
        """Write one frame; False if the stream is gone (the caller then stops producing)."""
        data = encode_frame(header, payload)
        try:
            with self.wlock:
                self.conn.write_all(data)
        except OSError as exc:
            log.debug("%s: send failed: %s", self.conn.name, exc)
            return False
        return True

    def error(self, ch: int, message: str, code: str) -> None:
        self.send({"t": "error", "ch": ch, "code": code, "message": message})

    def run(self) -> bool:
        """Serve frames until EOF or a stop; True if any data arrived. Everything started here ends too."""
        reader = FrameReader()
        syncing = False
        got_data = False
        try:
            while not self.agent.stopping.is_set():
                data = self.conn.read(self.agent.stopping)
                if not data:
                    if got_data:
                        log.info("%s: host disconnected", self.conn.name)
                    return got_data
                got_data = True
                reader.feed(data)
                while True:
                    if syncing:
                        if not reader.resync(HELLO_MARK):
                            break
                        syncing = False
                    try:
                        frame = reader.next()
                    except FramingLost as exc:
                        self.error(0, f"malformed frame: {exc}", "bad_request")
                        if not self.serial:
                            log.warning("%s: %s; closing the connection", self.conn.name, exc)
                            return got_data
                        log.warning("%s: %s; waiting for the next hello", self.conn.name, exc)
                        self.abort_all()
                        self.negotiated = False
                        syncing = True
                        continue
                    if frame is None:
                        break
                    self.dispatch(frame)
        except OSError as exc:
            log.info("%s: %s", self.conn.name, exc)
            self.failure = exc
        finally:
            self.end()
        return got_data

    def end(self) -> None:
        self.conn.dead.set()
        with self.wlock:  # no writer of this session is still inside write_all after this
            pass
        self.abort_all()

    def abort_all(self) -> None:
        with self.lock:
            channels = list(self.channels.values())
        for channel in channels:
            channel.abort()

    def forget(self, channel: Channel) -> None:
        with self.lock:
            if self.channels.get(channel.id) is channel:
                del self.channels[channel.id]

    def dispatch(self, frame: Frame) -> None:
        header = frame.header
        if header is None:
            ch = frame.ch or 0
            log.warning("%s: malformed frame on channel %d: %s", self.conn.name, ch, frame.error)
            with self.lock:
                broken = self.channels.get(ch)
            if broken is not None:
                broken.abort()
            self.error(ch, f"malformed frame: {frame.error}", "bad_request")
            return
        ch, kind = header["ch"], header["t"]
        if kind == "hello":
            if self.serial and self.negotiated:
                log.info("%s: new host session", self.conn.name)
                self.abort_all()
            reply = negotiate(header)
            self.negotiated = reply["t"] == "hello"
            if not self.negotiated:
                log.warning("%s: %s", self.conn.name, reply["message"])
            self.send(reply)
            return
        if not self.negotiated:
            self.error(ch, f"send hello {{version: {PROTOCOL_VERSION}}} first", "bad_request")
            return
        with self.lock:
            channel = self.channels.get(ch)
        if channel is not None:
            if kind == "close":
                channel.abort()
            else:
                channel.deliver(header, frame.payload)
            return
        if kind in HANDLERS and ch != 0:
            channel = Channel(self, ch, kind)
            with self.lock:
                if self.conn.dead.is_set():  # ending: abort_all() may already have run
                    return
                self.channels[ch] = channel
            threading.Thread(target=channel.serve, args=(header,), daemon=True, name=f"{kind}-{ch}").start()
        elif kind in DATA_TYPES or kind == "close":
            log.debug("%s: dropping %s for finished channel %d", self.conn.name, kind, ch)
        elif ch == 0:
            self.error(0, f"channel 0 only carries hello, not {kind!r}", "bad_request")
        else:
            self.error(ch, f"unknown request {kind!r} (known: {', '.join(sorted(HANDLERS))})", "unknown_method")


class Channel:
    """One request. It ends with exactly one terminal frame (result, exit or error) unless the host
    closed it or the stream died, in which case its aborters run (kill the command, remove the temp file)."""

    def __init__(self, session: Session, ch: int, op: str) -> None:
        self.session = session
        self.id = ch
        self.op = op
        self.inbox: queue.Queue[tuple[Header, bytes] | None] = queue.Queue(maxsize=INBOX_FRAMES)
        self.lock = threading.Lock()
        self.done = False
        self.aborters: list[Callable[[], None]] = []

    def serve(self, request: Header) -> None:
        try:
            result = HANDLERS[self.op](self, request)
            if result is not None:
                self.finish("result", result)
        except AgentError as exc:
            self.finish("error", {"code": exc.code, "message": exc.message})
        except Exception as exc:
            log.exception("%s on channel %d failed", self.op, self.id)
            self.finish("error", {"code": "operation_failed", "message": f"agent error in {self.op}: {exc!r}"})
        finally:
            if not self.done:
                self.finish("error", {"code": "operation_failed", "message": f"{self.op} ended without a result"})

    def send(self, kind: str, payload: bytes = b"", **fields: Any) -> bool:
        if self.done:
            return False
        header: Header = {"t": kind, "ch": self.id}
        header.update(fields)
        return self.session.send(header, payload)

    def send_items(self, items: list[Header]) -> None:
        for start in range(0, len(items), ITEMS_PER_FRAME):
            self.send("items", items=items[start : start + ITEMS_PER_FRAME])

    def finish(self, kind: str, fields: Header) -> None:
        with self.lock:
            if self.done:
                return
            self.done = True
        self.session.forget(self)  # before the terminal frame, so the host may reuse the id at once
        header: Header = {"t": kind, "ch": self.id}
        header.update(fields)
        self.session.send(header)
        self._wake()

    def abort(self) -> None:
        with self.lock:
            if self.done:
                return
            self.done = True
            aborters = list(self.aborters)
        self.session.forget(self)
        for aborter in aborters:
            try:
                aborter()
            except Exception:
                log.exception("cleaning up %s on channel %d", self.op, self.id)
        self._wake()

    def deliver(self, header: Header, payload: bytes) -> None:
        while not self.done:
            try:
                self.inbox.put((header, payload), timeout=0.5)
                return
            except queue.Full:
                continue

    def next(self) -> tuple[Header, bytes] | None:
        """The next frame the host sent on this channel, or None once the channel is over."""
        while True:
            try:
                item = self.inbox.get(timeout=0.5)
            except queue.Empty:
                if self.done:
                    return None
                continue
            if item is None:
                return None
            return item

    def _wake(self) -> None:
        with contextlib.suppress(queue.Full):
            self.inbox.put_nowait(None)


# --- request fields -----------------------------------------------------------------------------------


def field(req: Header, key: str, kind: type, default: Any = None, required: bool = False) -> Any:
    value = req.get(key)
    if value is None:
        if required:
            raise AgentError(f"{req['t']}: {key!r} is required", "bad_request")
        return default
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise AgentError(f"{req['t']}: {key!r} must be a {kind.__name__}, not {value!r}", "bad_request")
    return value


def path_field(req: Header) -> str:
    path: str = field(req, "path", str, required=True)
    if not path.startswith("/"):
        raise AgentError(f"{req['t']}: path {path!r} must be absolute", "bad_request")
    return path


# --- health, ports ------------------------------------------------------------------------------------


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def op_health(ch: Channel, req: Header) -> Header:
    uptime = read_text("/proc/uptime").split()
    return {"ok": True, "uptime": float(uptime[0]) if uptime else 0.0, "hostname": socket.gethostname(),
            "boot_id": read_text("/proc/sys/kernel/random/boot_id").strip(), "agent_version": AGENT_VERSION,
            "agent_uptime": round(time.monotonic() - ch.session.agent.started, 3)}


def decode_address(text: str) -> str:
    """An address from /proc/net/*: hex, in 32-bit words of host byte order."""
    raw = bytes.fromhex(text)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def parse_proc_net(text: str, proto: str, family: int) -> list[Header]:
    """Listening sockets in one /proc/net table: TCP in LISTEN (0A), UDP unconnected (07, remote port 0)."""
    found: list[Header] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        local, remote, state = fields[1], fields[2], fields[3]
        if proto == "tcp" and state != "0A":
            continue
        if proto == "udp" and (state != "07" or int(remote.rsplit(":", 1)[1], 16) != 0):
            continue
        try:
            address_hex, port_hex = local.rsplit(":", 1)
            found.append({"proto": proto, "family": family, "address": decode_address(address_hex),
                          "port": int(port_hex, 16), "inode": int(fields[9])})
        except ValueError:
            continue
    return found


def socket_owners(inodes: set[int], proc: str = "/proc") -> dict[int, list[int]]:
    """Which pids hold each socket inode, from the /proc/<pid>/fd/* -> socket:[inode] links."""
    owners: dict[int, list[int]] = {}
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        fd_dir = f"{proc}/{entry}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inode = int(link[8:-1])
                if inode in inodes and int(entry) not in owners.setdefault(inode, []):
                    owners[inode].append(int(entry))
    return owners


def listening_sockets(proc: str = "/proc") -> list[Header]:
    found: list[Header] = []
    for name, proto, family in (("tcp", "tcp", 4), ("tcp6", "tcp", 6), ("udp", "udp", 4), ("udp6", "udp", 6)):
        found += parse_proc_net(read_text(f"{proc}/net/{name}"), proto, family)
    owners = socket_owners({s["inode"] for s in found if s["inode"]}, proc) if found else {}
    for sock in found:
        pids = sorted(owners.get(sock["inode"], []))
        sock["pids"] = pids
        sock["processes"] = sorted({read_text(f"{proc}/{pid}/comm").strip() for pid in pids} - {""})
    found.sort(key=lambda s: (s["proto"], s["port"], s["family"], s["address"]))
    return found


def op_ports(ch: Channel, req: Header) -> Header:
    sockets = listening_sockets()
    ch.send_items(sockets)
    return {"count": len(sockets)}


# --- exec ---------------------------------------------------------------------------------------------


def exec_env(req: Header) -> dict[str, str]:
    try:
        user = pwd.getpwuid(os.geteuid())
        home, name, shell = user.pw_dir, user.pw_name, user.pw_shell
    except KeyError:
        home, name, shell = "/", "root", "/bin/sh"
    env = {"PATH": DEFAULT_PATH, "HOME": home, "USER": name, "LOGNAME": name, "SHELL": shell, "LANG": "C.UTF-8"}
    if req.get("tty"):
        env["TERM"] = "xterm-256color"
    extra = field(req, "env", dict, {})
    for key, value in extra.items():
        if not isinstance(value, str) or not key or "=" in key:
            raise AgentError(f"exec: env entry {key!r} must be NAME: string", "bad_request")
        env[key] = value
    return env


def exec_argv(req: Header) -> list[str]:
    argv = req.get("argv")
    shell = req.get("shell")
    if (argv is None) == (shell is None):
        raise AgentError("exec: give exactly one of 'argv' (a list of strings) or 'shell' (a string)", "bad_request")
    if shell is not None:
        if not isinstance(shell, str):
            raise AgentError("exec: 'shell' must be a string", "bad_request")
        return ["/bin/sh", "-c", shell]
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise AgentError("exec: 'argv' must be a non-empty list of strings", "bad_request")
    return list(argv)


def set_winsize(fd: int, rows: int, cols: int) -> None:
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _take_controlling_tty() -> None:  # runs in the child between fork and exec
    import termios

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def signal_number(value: Any) -> int:
    if type(value) is int and 0 < value < 65:
        return value
    if isinstance(value, str):
        name = value.upper() if value.upper().startswith("SIG") else "SIG" + value.upper()
        number = getattr(signal, name, None)
        if isinstance(number, int):
            return number
    raise AgentError(f"exec: unknown signal {value!r}", "bad_request")


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def spawn_command(argv: list[str], env: dict[str, str], cwd: str, tty: bool, want_stdin: bool, rows: int,
                  cols: int) -> tuple[subprocess.Popen[bytes], list[tuple[Any, str]], Any]:
    """Start `argv` in its own session: (process, [(output stream, frame type)], stdin stream or None)."""
    import pty
    import subprocess

    master = -1
    try:
        if tty:
            master, slave = pty.openpty()
            set_winsize(master, rows, cols)
            try:
                proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
                                        start_new_session=True, preexec_fn=_take_controlling_tty)
            finally:
                os.close(slave)
            return proc, [(os.fdopen(master, "rb", buffering=0), "stdout")], os.fdopen(os.dup(master), "wb", 0)
        proc = subprocess.Popen(argv, bufsize=0, cwd=cwd, env=env, start_new_session=True,
                                stdin=subprocess.PIPE if want_stdin else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return proc, [(proc.stdout, "stdout"), (proc.stderr, "stderr")], proc.stdin
    except FileNotFoundError as exc:
        if master >= 0:
            os.close(master)
        raise AgentError(f"{argv[0]}: command not found", "not_found") from exc
    except (OSError, ValueError) as exc:
        if master >= 0:
            os.close(master)
        if isinstance(exc, ValueError):  # e.g. a NUL byte in an argument
            raise AgentError(f"exec: {exc}", "bad_request") from exc
        raise os_error(exc, argv[0]) from exc


def op_exec(ch: Channel, req: Header) -> None:
    argv = exec_argv(req)
    env = exec_env(req)
    cwd = field(req, "cwd", str) or env["HOME"]
    if not os.path.isdir(cwd):
        cwd = "/" if req.get("cwd") is None else cwd
        if not os.path.isdir(cwd):
            raise AgentError(f"exec: working directory {cwd} does not exist", "not_found")
    tty = field(req, "tty", bool, False)
    timeout = field(req, "timeout", float)
    if timeout is not None and timeout <= 0:
        raise AgentError(f"exec: timeout must be positive, not {timeout!r}", "bad_request")
    rows, cols = field(req, "rows", int, 24), field(req, "cols", int, 80)

    with ch.lock:  # abort() waits for a spawn in flight, then kills what it started
        if ch.done:
            return
        proc, outputs, stdin = spawn_command(argv, env, cwd, tty, bool(req.get("stdin")), rows, cols)
        pgid = proc.pid
        ch.aborters.append(lambda: kill_group(pgid))
    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        log.info("%s on channel %d: timed out after %gs; killing process group %d", argv[0], ch.id, timeout, pgid)
        kill_group(pgid)

    timer = threading.Timer(timeout, on_timeout) if timeout else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    pumps = [threading.Thread(target=pump_output, args=(ch, f, kind), daemon=True) for f, kind in outputs]
    for thread in pumps:
        thread.start()
    threading.Thread(target=feed_input, args=(ch, stdin, proc.pid, tty), daemon=True).start()
    returncode = proc.wait()
    drain_until = time.monotonic() + EXIT_DRAIN
    for thread in pumps:
        thread.join(max(drain_until - time.monotonic(), 0.0))
    if timer is not None:
        timer.cancel()
    status: Header = {"signal": -returncode} if returncode < 0 else {"code": returncode}
    if timed_out.is_set():
        status["timed_out"] = True
    ch.finish("exit", status)


def pump_output(ch: Channel, stream: Any, kind: str) -> None:
    """Forward output until EOF. Once the channel is over, keep reading and drop it: a process the
    command left in the background (a server, say) must not die of SIGPIPE when it next logs."""
    try:
        while True:
            try:
                data = stream.read(CHUNK)
            except OSError:  # EIO: the pty's last slave fd closed
                break
            if not data:
                break
            ch.send(kind, data)
    finally:
        stream.close()


def feed_input(ch: Channel, stdin: Any, pgid: int, tty: bool) -> None:
    """The host's frames on an exec channel: stdin data, stdin_eof, resize, signal."""
    try:
        while True:
            item = ch.next()
            if item is None:
                return
            header, payload = item
            kind = header["t"]
            try:
                if kind == "stdin" and stdin is not None and payload:
                    view = memoryview(payload)
                    while view:
                        view = view[stdin.write(view) :]
                elif kind == "stdin_eof" and stdin is not None:
                    if tty:
                        stdin.write(b"\x04")
                    else:
                        stdin.close()
                        stdin = None
                elif kind == "resize" and tty:
                    set_winsize(stdin.fileno(), int(header.get("rows", 24)), int(header.get("cols", 80)))
                elif kind == "signal":
                    target = os.tcgetpgrp(stdin.fileno()) if tty and stdin is not None else pgid
                    os.killpg(target, signal_number(header.get("signal")))
            except (OSError, ValueError, TypeError, AgentError) as exc:
                log.debug("exec channel %d: %s frame: %s", ch.id, kind, exc)
                if kind == "stdin" and not tty and stdin is not None:
                    stdin.close()  # the command stopped reading (EPIPE): drop the rest
                    stdin = None
    finally:
        if stdin is not None:
            with contextlib.suppress(OSError):
                stdin.close()


# --- files --------------------------------------------------------------------------------------------


def op_file_read(ch: Channel, req: Header) -> Header | None:
    path = path_field(req)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise os_error(exc, path) from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise AgentError(f"{path}: is {kind}", "bad_request")
    os.set_blocking(fd, True)
    with os.fdopen(fd, "rb", buffering=0) as handle:
        size = 0
        while True:
            data = handle.read(CHUNK)
            if not data:
                break
            if not ch.send("data", data):
                return None
            size += len(data)
    return {"mode": stat.S_IMODE(info.st_mode), "uid": info.st_uid, "gid": info.st_gid, "size": size,
            "mtime": info.st_mtime}


def op_file_write(ch: Channel, req: Header) -> Header | None:
    path = path_field(req).rstrip("/") or "/"
    mode = field(req, "mode", int)
    uid, gid = field(req, "uid", int), field(req, "gid", int)
    atomic = field(req, "atomic", bool, True)
    directory, base = os.path.split(path)
    if not base:
        raise AgentError(f"file_write: {path} is not a file path", "bad_request")
    if not os.path.isdir(directory):
        raise AgentError(f"file_write: directory {directory} does not exist", "not_found")
    try:
        existing: os.stat_result | None = os.stat(path)
    except OSError:
        existing = None
    if existing is not None and stat.S_ISDIR(existing.st_mode):
        raise AgentError(f"file_write: {path} is a directory", "bad_request")
    if mode is None:
        mode = stat.S_IMODE(existing.st_mode) if existing is not None else 0o644
    if existing is not None and os.geteuid() == 0:
        uid = existing.st_uid if uid is None else uid
        gid = existing.st_gid if gid is None else gid
    target = os.path.join(directory, f".{base}.banger-{os.getpid()}-{ch.id}-{os.urandom(4).hex()}") if atomic else path
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL | os.O_NOFOLLOW if atomic else os.O_TRUNC)

    def remove_temp() -> None:
        if atomic:
            with contextlib.suppress(OSError):
                os.unlink(target)

    with ch.lock:  # created and registered for removal as one step, as far as abort() can tell
        if ch.done:
            return None
        try:
            fd = os.open(target, flags, 0o600)
        except OSError as exc:
            raise os_error(exc, path) from exc
        ch.aborters.append(remove_temp)
    size = 0
    try:
        with os.fdopen(fd, "wb") as handle:
            while True:
                item = ch.next()
                if item is None:
                    return None  # the host went away: the aborter removed the temp file
                header, payload = item
                if header["t"] == "eof":
                    break
                if header["t"] != "data":
                    raise AgentError(f"file_write: unexpected {header['t']!r} frame (want data or eof)", "bad_request")
                handle.write(payload)
                size += len(payload)
            handle.flush()
            if uid is not None or gid is not None:
                os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
            os.fchmod(fd, mode)  # after chown, which clears set-id bits
            os.fsync(fd)
        if atomic:
            os.rename(target, path)
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        remove_temp()
        raise
    return {"size": size}


def entry_type(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "char"),
                       (stat.S_ISBLK, "block")):
        if test(mode):
            return name
    return "other"


def op_list_dir(ch: Channel, req: Header) -> Header:
    path = path_field(req)
    entries: list[Header] = []
    try:
        with os.scandir(path) as scan:
            for entry in scan:
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # removed while we listed
                item: Header = {"name": entry.name, "type": entry_type(info.st_mode),
                                "mode": stat.S_IMODE(info.st_mode), "size": info.st_size, "uid": info.st_uid,
                                "gid": info.st_gid, "mtime": info.st_mtime}
                if stat.S_ISLNK(info.st_mode):
                    with contextlib.suppress(OSError):
                        item["target"] = os.readlink(entry.path)
                entries.append(item)
    except OSError as exc:
        raise os_error(exc, path) from exc
    entries.sort(key=lambda e: e["name"])
    ch.send_items(entries)
    return {"count": len(entries)}


def op_mkdir(ch: Channel, req: Header) -> Header:
    path = path_field(req)
    mode = field(req, "mode", int, 0o755)
    parents = field(req, "parents", bool, False)
    uid, gid = field(req, "uid", int), field(req, "gid", int)
    created = not os.path.isdir(path)
    try:
        if parents:
            os.makedirs(path, mode, exist_ok=True)
        else:
            os.mkdir(path, mode)
        if created:
            os.chmod(path, mode)  # exactly `mode`, whatever the umask
        if uid is not None or gid is not None:
            os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    except OSError as exc:
        raise os_error(exc, path) from exc
    return {"created": created}


def op_poweroff(ch: Channel, req: Header) -> None:
    ch.finish("result", {})  # answer first: the host waits for the VM to go away afterwards
    timer = threading.Timer(0.2, ch.session.agent.poweroff)
    timer.daemon = True
    timer.start()


HANDLERS: dict[str, Callable[[Channel, Header], Header | None]] = {
    "health": op_health, "ports": op_ports, "exec": op_exec, "file_read": op_file_read,
    "file_write": op_file_write, "list_dir": op_list_dir, "mkdir": op_mkdir, "poweroff": op_poweroff,
}


# --- transports ---------------------------------------------------------------------------------------


def find_serial_port(name: str = SERIAL_PORT_NAME) -> str | None:
    """/dev/vportNpM whose virtio name is `name` (no udev symlinks under banger's own init)."""
    try:
        ports = sorted(p for p in os.listdir("/sys/class/virtio-ports") if p.startswith("vport"))
    except OSError:
        return None
    for port in ports:
        if read_text(f"/sys/class/virtio-ports/{port}/name").strip() == name:
            return "/dev/" + port
    return None


def unix_listener(path: str) -> socket.socket:
    """Listen on `path`; the path appears only once it accepts connections (bind, listen, rename)."""
    temp = f"{path}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(temp)
        os.chmod(temp, 0o600)
        sock.listen(16)
        os.rename(temp, path)
    except OSError:
        sock.close()
        raise
    return sock


def vsock_listener(port: int) -> socket.socket:
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise OSError(errno.EAFNOSUPPORT, "this Python has no AF_VSOCK")
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((getattr(socket, "VMADDR_CID_ANY", 0xFFFFFFFF), port))
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    return sock


class Agent:
    def __init__(self, poweroff_command: str | None = None) -> None:
        self.stopping = threading.Event()
        self.started = time.monotonic()
        self.poweroff_command = poweroff_command
        self.lock = threading.Lock()
        self.sessions: set[Session] = set()

    def serve(self, conn: Conn, serial: bool) -> Session:
        session = Session(self, conn, serial)
        with self.lock:
            self.sessions.add(session)
        try:
            session.run()
        finally:
            with self.lock:
                self.sessions.discard(session)
        return session

    def serve_socket(self, sock: socket.socket, name: str) -> None:
        try:
            self.serve(Conn(sock.fileno(), name, sock), serial=False)
        finally:
            sock.close()

    def listen_loop(self, make: Callable[[], socket.socket], what: str) -> None:
        """Accept host streams forever; a listener that fails is made again (e.g. after a restore)."""
        delay, last_error = 0.5, ""
        while not self.stopping.is_set():
            try:
                listener = make()
            except OSError as exc:
                if str(exc) != last_error:
                    log.warning("cannot listen on %s: %s; retrying", what, exc)
                    last_error = str(exc)
                self.stopping.wait(delay)
                delay = min(delay * 2, 30.0)
                continue
            log.info("listening on %s", what)
            delay, last_error = 0.5, ""
            try:
                while not self.stopping.is_set():
                    if not select.select([listener], [], [], 1.0)[0]:
                        continue
                    sock, _ = listener.accept()
                    name = f"{what} connection {sock.fileno()}"
                    threading.Thread(target=self.serve_socket, args=(sock, name), daemon=True).start()
            except OSError as exc:
                log.warning("%s failed: %s; listening again", what, exc)
                self.stopping.wait(0.5)
            finally:
                listener.close()

    def serial_device_loop(self, fixed_path: str | None) -> None:
        delay, fd, path = 0.5, -1, ""
        while not self.stopping.is_set():
            if fd < 0:
                path = fixed_path or find_serial_port() or ""
                try:
                    if not path:
                        raise FileNotFoundError(errno.ENOENT, f"no virtio port named {SERIAL_PORT_NAME}")
                    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK)
                except OSError as exc:
                    log.debug("serial port: %s", exc)
                    self.stopping.wait(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                log.info("serving the serial port %s", path)
                delay = 0.5
            session = self.serve(Conn(fd, f"serial {path}"), serial=True)
            if session.failure is not None:
                os.close(fd)
                fd = -1
            self.stopping.wait(EOF_BACKOFF)  # EOF: no host connected

    def serial_unix_loop(self, path: str) -> None:
        """Test transport: a unix socket standing in for the serial port (EOF = host disconnected)."""
        while not self.stopping.is_set():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
            except OSError:
                sock.close()
                self.stopping.wait(EOF_BACKOFF)
                continue
            try:
                self.serve(Conn(sock.fileno(), f"serial {path}", sock), serial=True)
            finally:
                sock.close()
            self.stopping.wait(EOF_BACKOFF)

    def poweroff(self) -> None:
        import subprocess

        try:
            if self.poweroff_command:
                subprocess.Popen(["/bin/sh", "-c", self.poweroff_command])
            elif read_text("/proc/1/comm").strip() == "systemd":
                subprocess.Popen(["systemctl", "poweroff"])
            else:
                os.kill(1, signal.SIGTERM)
            log.info("poweroff requested")
        except OSError as exc:
            log.error("poweroff failed: %s", exc)

    def shutdown(self) -> None:
        with self.lock:
            sessions = list(self.sessions)
        for session in sessions:
            session.conn.dead.set()
            session.abort_all()


def load_modules(modules: tuple[str, ...] = ("vmw_vsock_virtio_transport", "virtio_console")) -> None:
    """Best effort: without udev nothing loads the vsock/virtio-console drivers for us. banger's initrd
    usually has, and a modprobe is a fork and an exec at boot, so only for what is missing."""
    missing = [m for m in modules if not os.path.isdir(f"/sys/module/{m}")]
    if not missing:
        return
    import subprocess

    for modprobe in ("/sbin/modprobe", "/usr/sbin/modprobe"):
        if os.access(modprobe, os.X_OK):
            subprocess.run([modprobe, "-qa", *missing], check=False,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=20)
            return


class Options:
    """The command line; the defaults are what the boot (no arguments) uses."""

    vsock_port = VSOCK_PORT
    serial_path: str | None = None
    no_vsock = False
    no_serial = False
    listen_unix: str | None = None
    serial_unix: str | None = None
    poweroff_command: str | None = None
    verbose = False


def parse_args(argv: list[str]) -> Options:
    if not argv:
        return Options()
    import argparse

    parser = argparse.ArgumentParser(prog="banger-agent", description="banger's guest agent")
    parser.add_argument("--vsock-port", type=int, default=VSOCK_PORT)
    parser.add_argument("--serial-path", help="serve this character device instead of looking up the virtio port")
    parser.add_argument("--no-vsock", action="store_true", help="do not listen on AF_VSOCK")
    parser.add_argument("--no-serial", action="store_true", help="do not serve the virtio-serial port")
    parser.add_argument("--listen-unix", help=argparse.SUPPRESS)  # tests: accept streams like vsock
    parser.add_argument("--serial-unix", help=argparse.SUPPRESS)  # tests: connect, and treat it as the port
    parser.add_argument("--poweroff-command", help=argparse.SUPPRESS)  # tests: run this instead of powering off
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv, namespace=Options())


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    log.verbose = opts.verbose
    agent = Agent(opts.poweroff_command)

    def stop(signum: int, frame: object) -> None:
        agent.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    loops: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
    if opts.listen_unix:
        loops.append((agent.listen_loop, (lambda: unix_listener(opts.listen_unix), f"unix:{opts.listen_unix}")))
    if opts.serial_unix:
        loops.append((agent.serial_unix_loop, (opts.serial_unix,)))
    if opts.serial_path:
        loops.append((agent.serial_device_loop, (opts.serial_path,)))
    if not (opts.listen_unix or opts.serial_unix or opts.serial_path):
        try:
            load_modules()
        except Exception as exc:  # best effort; the listeners say what is missing
            log.debug("modprobe: %s", exc)
        if not opts.no_vsock:
            loops.append((agent.listen_loop, (lambda: vsock_listener(opts.vsock_port), f"vsock:{opts.vsock_port}")))
        if not opts.no_serial:
            loops.append((agent.serial_device_loop, (None,)))
    if not loops:
        log.error("nothing to serve (--no-vsock and --no-serial)")
        return 2
    for target, args in loops:
        threading.Thread(target=target, args=args, daemon=True).start()
    log.info("banger-agent %s (protocol %d) started", AGENT_VERSION, PROTOCOL_VERSION)
    while not agent.stopping.wait(1.0):
        pass
    log.info("stopping")
    agent.shutdown()
    return 0


def run() -> None:
    """The command: main(), then exit at once (daemon threads may sit in blocking calls; nothing is
    left to clean up)."""
    code = main()
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
