"""The host side of the guest agent (banger/guest/agent.py; wire format: agent_protocol.md).

`AgentClient` holds one stream to a guest's agent: a Firecracker-style hybrid vsock unix socket
(`CONNECT <port>\\n` → `OK <n>\\n`, served by Firecracker or by vhost-device-vsock under QEMU), or the
unix socket of QEMU's virtio-serial chardev. One stream runs many requests at once, each on its own
channel: a reader thread routes incoming frames to per-channel queues and the calling thread consumes
its own queue, so the API is synchronous and thread-safe (the daemon calls it via `asyncio.to_thread`).

The serial chardev needs two precautions. QEMU drops the connection when a client half-closes, so
nothing here ever calls `shutdown(SHUT_WR)`. And the port may still hold the tail of an earlier
session's output (QEMU buffers what the guest wrote after the last client left), so `hello()` carries
a random nonce and skips bytes until the reply that echoes it.

Here: the stream, its channels, `ExecHandle` and `wait_ready`. What travels on the stream (the
protocol constants, the frame codec, the errors and the result types) is in agent_wire.py.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Final

from banger.errors import BAD_VERSION, BadRequest, BangerError
from banger.guest.agent_wire import (
    CHUNK,
    DEFAULT_VSOCK_PORT,
    PROTOCOL_VERSION,
    AgentInfo,
    AgentProtocolError,
    AgentUnavailable,
    AgentVersionMismatch,
    DirEntry,
    ExecResult,
    ExitStatus,
    FileMeta,
    Header,
    Health,
    ListeningSocket,
    _agent_error,
    encode_frame,
    parse_connect_reply,
    pop_frame,
)

log = logging.getLogger("banger.guest.agent_client")

_READ_SIZE: Final = 256 * 1024
_CLOSE_WAIT: Final = 2.0

StdinSource = bytes | IO[bytes] | Iterable[bytes]


# --- channels -----------------------------------------------------------------------------------------

_Item = tuple[Header, bytes]
_LOST: Final[_Item] = ({"t": "_lost", "ch": -1}, b"")


class _Channel:
    def __init__(self, client: AgentClient, ch: int, op: str) -> None:
        self.client = client
        self.id = ch
        self.op = op
        self.queue: queue.Queue[_Item] = queue.Queue()
        self.finished = False

    def send(self, kind: str, payload: bytes = b"", **fields: Any) -> None:
        header: Header = {"t": kind, "ch": self.id}
        header.update(fields)
        self.client._send(header, payload)

    def next(self, deadline: float | None) -> _Item:
        """The next frame from the agent; raises on an error frame, a lost stream or the deadline."""
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            header, payload = self.queue.get(timeout=timeout)
        except queue.Empty:
            raise BangerError(f"guest agent did not finish {self.op} in time") from None
        if header is _LOST[0]:
            raise AgentUnavailable(f"lost the guest agent during {self.op}: {self.client.lost_reason}")
        if header["t"] == "error":
            self.finished = True
            raise _agent_error(header, self.op)
        return header, payload

    def poll_error(self) -> None:
        """Raise at once if the agent already refused or the stream broke (checked while uploading)."""
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            if item[0] is _LOST[0] or item[0]["t"] == "error":
                self.queue.put(item)
                self.next(None)

    def close(self) -> None:
        """Forget the channel; if the agent is still working on it, tell it to stop (kills a command)."""
        self.client._forget(self.id)
        if not self.finished:
            self.finished = True
            with contextlib.suppress(BangerError):
                self.send("close")


class ExecHandle:
    """A running command. `wait()` delivers its output to the callbacks in the calling thread."""

    def __init__(self, chan: _Channel, on_stdout: Callable[[bytes], object] | None,
                 on_stderr: Callable[[bytes], object] | None) -> None:
        self._chan = chan
        self._on = {"stdout": on_stdout, "stderr": on_stderr}
        self.status: ExitStatus | None = None

    def _check_running(self) -> None:
        if self._chan.finished:
            raise BangerError(f"the command has already ended ({self.status or 'cancelled'})")

    def write_stdin(self, data: bytes) -> None:
        self._check_running()
        for start in range(0, len(data), CHUNK):
            self._chan.send("stdin", data[start : start + CHUNK])

    def close_stdin(self) -> None:
        self._check_running()
        self._chan.send("stdin_eof")

    def feed(self, stdin: StdinSource) -> None:
        """All of `stdin`, then its end (meant for a thread of its own). A command that ends or a
        source that fails stops the feed quietly: the command's exit status is what reports."""
        try:
            for chunk in chunks(stdin):
                self.write_stdin(chunk)
            self.close_stdin()
        except (BangerError, OSError, ValueError) as exc:
            log.debug("stdin feed stopped: %s", exc)

    def resize(self, rows: int, cols: int) -> None:
        self._chan.send("resize", rows=rows, cols=cols)

    def signal(self, sig: int | str) -> None:
        """Send a signal to the command's process group (with a tty: the terminal's foreground group)."""
        self._chan.send("signal", signal=sig)

    def wait(self, timeout: float | None = None) -> ExitStatus:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while self.status is None:
                header, payload = self._chan.next(deadline)
                kind = header["t"]
                if kind == "exit":
                    self._chan.finished = True
                    self.status = ExitStatus(header.get("code"), header.get("signal"), bool(header.get("timed_out")))
                elif kind in self._on:
                    callback = self._on[kind]
                    if callback is not None:
                        callback(payload)
        except BaseException:
            self.cancel()
            raise
        self._chan.close()
        return self.status

    def cancel(self) -> None:
        """Stop waiting; the agent kills the command's process group."""
        self._chan.close()

    def __enter__(self) -> ExecHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


def chunks(data: StdinSource) -> Iterable[bytes]:
    """Bytes, a binary file or an iterable of chunks, as non-empty chunks of at most CHUNK bytes."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        return (raw[i : i + CHUNK] for i in range(0, len(raw), CHUNK))
    read = getattr(data, "read", None)
    if callable(read):  # a binary file: read it in chunks, not line by line
        return iter(lambda: bytes(read(CHUNK)), b"")
    return (chunk for chunk in data if chunk)


# --- the client ---------------------------------------------------------------------------------------


class AgentClient:
    """One stream to a guest agent; create it with one of the `connect_*` class methods."""

    def __init__(self, sock: socket.socket, *, name: str, buffered: bytes = b"") -> None:
        self._sock = sock
        self.name = name
        self._buf = bytearray(buffered)
        self._wlock = threading.Lock()
        self._lock = threading.Lock()
        self._channels: dict[int, _Channel] = {}
        self._next_id = 1
        self._reader: threading.Thread | None = None
        self._closed = False
        self.lost_reason: str | None = None
        self.info: AgentInfo | None = None

    # --- connecting ---------------------------------------------------------------------------------

    @staticmethod
    def _unix(path: Path | str, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            sock.close()
            raise AgentUnavailable(f"cannot connect to the guest agent socket {str(path)!r}: "
                                   f"{exc.strerror or exc}") from exc
        return sock

    @classmethod
    def connect_vsock_uds(cls, uds_path: Path | str, port: int = DEFAULT_VSOCK_PORT, timeout: float = 5.0,
                          *, handshake: bool = True) -> AgentClient:
        """Through a hybrid vsock socket (Firecracker's `uds_path`, or vhost-device-vsock's)."""
        sock = cls._unix(uds_path, timeout)
        try:
            sock.sendall(f"CONNECT {port}\n".encode())
            data = b""
            while b"\n" not in data:
                chunk = sock.recv(256)
                if not chunk:
                    raise AgentUnavailable(f"nothing listens on vsock port {port} in the guest yet",
                                           hint="the guest may still be booting")
                data += chunk
                if len(data) > 256:
                    raise AgentUnavailable(f"no reply line to CONNECT {port} on {uds_path}")
            line, _, rest = data.partition(b"\n")
            parse_connect_reply(line, port)
            client = cls(sock, name=f"vsock {uds_path} port {port}", buffered=rest)
        except OSError as exc:
            sock.close()
            raise AgentUnavailable(f"CONNECT {port} on {uds_path} failed: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        return client._start(handshake, timeout)

    @classmethod
    def connect_serial(cls, socket_path: Path | str, timeout: float = 5.0, *, handshake: bool = True) -> AgentClient:
        """Through QEMU's virtio-serial chardev socket (one client at a time: share the client)."""
        return cls(cls._unix(socket_path, timeout), name=f"serial {socket_path}")._start(handshake, timeout)

    @classmethod
    def connect_unix(cls, path: Path | str, timeout: float = 5.0, *, handshake: bool = True) -> AgentClient:
        """A stream straight to the agent (its `--listen-unix` transport)."""
        return cls(cls._unix(path, timeout), name=f"unix {path}")._start(handshake, timeout)

    def _start(self, handshake: bool, timeout: float) -> AgentClient:
        if handshake:
            try:
                self.hello(timeout=timeout)
            except BaseException:
                self.close()
                raise
        return self

    def hello(self, version: int = PROTOCOL_VERSION, timeout: float = 5.0) -> AgentInfo:
        """Negotiate the protocol version; must come first. Raises AgentVersionMismatch."""
        if self.info is not None:
            return self.info
        nonce = secrets.token_hex(8)
        self._send({"t": "hello", "nonce": nonce, "ch": 0, "version": version})
        markers = [f'{{"t":"{kind}","nonce":"{nonce}"'.encode() for kind in ("hello", "error")]
        deadline = time.monotonic() + timeout
        self._sock.settimeout(timeout)
        frame = None
        while frame is None:
            starts = [i for i in (self._buf.find(m, 4) for m in markers) if i >= 4]
            if starts:
                del self._buf[: min(starts) - 4]  # whatever precedes the reply is an earlier session's
                frame = pop_frame(self._buf)
                if frame is not None:
                    break
            elif len(self._buf) > 64:
                del self._buf[: len(self._buf) - 64]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentUnavailable(f"guest agent did not answer hello within {timeout:g}s ({self.name})")
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(_READ_SIZE)
            except TimeoutError:
                continue
            except OSError as exc:
                raise AgentUnavailable(f"guest agent connection failed during hello: {exc}") from exc
            if not data:
                raise AgentUnavailable(f"guest agent closed the connection during hello ({self.name})")
            self._buf += data
        header, _ = frame
        agent_protocol = header.get("version")
        if header["t"] == "error" and header.get("code") != BAD_VERSION:
            raise _agent_error(header, "hello")
        if header["t"] == "error" or agent_protocol != version:
            raise AgentVersionMismatch(f"guest agent speaks protocol {agent_protocol}, banger speaks {version}",
                                       hint="rebuild or re-pull the VM's image so its agent matches this banger")
        self.info = AgentInfo(version, str(header.get("agent_version", "?")), tuple(header.get("features", ())))
        self._sock.settimeout(None)
        self._reader = threading.Thread(target=self._read_loop, daemon=True, name=f"agent-reader {self.name}")
        self._reader.start()
        return self.info

    # --- plumbing -----------------------------------------------------------------------------------

    def _send(self, header: Mapping[str, Any], payload: bytes = b"") -> None:
        data = encode_frame(header, payload)
        with self._wlock:
            if self._closed or self.lost_reason is not None:
                raise AgentUnavailable(f"guest agent connection is closed ({self.lost_reason or 'closed'})")
            try:
                self._sock.sendall(data)
            except OSError as exc:
                raise AgentUnavailable(f"cannot write to the guest agent ({self.name}): {exc}") from exc

    def _read_loop(self) -> None:
        reason = "guest agent closed the connection"
        try:
            while True:
                while (frame := pop_frame(self._buf)) is not None:
                    self._route(*frame)
                data = self._sock.recv(_READ_SIZE)
                if not data:
                    break
                self._buf += data
        except AgentProtocolError as exc:
            reason = exc.message
        except OSError as exc:
            reason = "connection closed" if self._closed else f"connection failed: {exc}"
        with self._lock:
            self.lost_reason = reason
            channels = list(self._channels.values())
        for chan in channels:
            chan.queue.put(_LOST)
        if not self._closed:
            log.info("%s: %s", self.name, reason)

    def _route(self, header: Header, payload: bytes) -> None:
        with self._lock:
            chan = self._channels.get(header["ch"])
        if chan is not None:
            chan.queue.put((header, payload))
        elif header["t"] == "error":
            log.warning("%s: guest agent error on channel %d: %s", self.name, header["ch"], header.get("message"))

    def _open(self, op: str, fields: Mapping[str, Any]) -> _Channel:
        if self.info is None:
            self.hello()
        with self._lock:
            if self.lost_reason is not None:
                raise AgentUnavailable(f"guest agent connection is closed ({self.lost_reason})")
            ch = self._next_id
            self._next_id = self._next_id % (2**31 - 1) + 1
            chan = self._channels[ch] = _Channel(self, ch, op)
        try:
            chan.send(op, **{k: v for k, v in fields.items() if v is not None})
        except BaseException:
            self._forget(ch)
            raise
        return chan

    def _forget(self, ch: int) -> None:
        with self._lock:
            self._channels.pop(ch, None)

    def _call(self, op: str, fields: Mapping[str, Any], timeout: float | None) -> tuple[Header, list[Any]]:
        """A request answered by optional `items` frames and one `result`."""
        chan = self._open(op, fields)
        deadline = None if timeout is None else time.monotonic() + timeout
        items: list[Any] = []
        try:
            while True:
                header, _ = chan.next(deadline)
                if header["t"] == "items":
                    items.extend(header.get("items") or ())
                elif header["t"] == "result":
                    chan.finished = True
                    return header, items
        finally:
            chan.close()

    # --- requests -----------------------------------------------------------------------------------

    def health(self, timeout: float = 10.0) -> Health:
        h, _ = self._call("health", {}, timeout)
        return Health(bool(h.get("ok")), float(h.get("uptime", 0.0)), str(h.get("hostname", "")),
                      str(h.get("boot_id", "")), str(h.get("agent_version", "")))

    def ports(self, timeout: float = 30.0) -> list[ListeningSocket]:
        _, items = self._call("ports", {}, timeout)
        return [ListeningSocket(i["proto"], i["family"], i["address"], i["port"], tuple(i.get("pids", ())),
                                tuple(i.get("processes", ()))) for i in items]

    def start_exec(self, argv: Sequence[str] | None = None, *, shell: str | None = None,
                   env: Mapping[str, str] | None = None, cwd: str | None = None, stdin: bool = False,
                   tty: bool = False, rows: int | None = None, cols: int | None = None,
                   timeout: float | None = None, on_stdout: Callable[[bytes], object] | None = None,
                   on_stderr: Callable[[bytes], object] | None = None) -> ExecHandle:
        """Start a command; the agent kills its process group on timeout, cancel or disconnect."""
        if (argv is None) == (shell is None):
            raise BadRequest("give exactly one of argv or shell")
        fields = {"argv": list(argv) if argv is not None else None, "shell": shell,
                  "env": dict(env) if env else None, "cwd": cwd, "stdin": stdin or None, "tty": tty or None,
                  "rows": rows, "cols": cols, "timeout": timeout}
        return ExecHandle(self._open("exec", fields), on_stdout, on_stderr)

    def exec(self, argv: Sequence[str] | None = None, *, shell: str | None = None,
             env: Mapping[str, str] | None = None, cwd: str | None = None, stdin: StdinSource | None = None,
             on_stdout: Callable[[bytes], object] | None = None,
             on_stderr: Callable[[bytes], object] | None = None, tty: bool = False,
             timeout: float | None = None) -> ExitStatus:
        """Run a command to the end, streaming its output to the callbacks (discarded if None).
        `stdin` is bytes, a binary file or an iterable of chunks; a stream is fed from a thread."""
        handle = self.start_exec(argv, shell=shell, env=env, cwd=cwd, stdin=stdin is not None, tty=tty,
                                 timeout=timeout, on_stdout=on_stdout, on_stderr=on_stderr)
        with handle:
            if isinstance(stdin, (bytes, bytearray, memoryview)):
                handle.write_stdin(bytes(stdin))
                handle.close_stdin()
            elif stdin is not None:
                threading.Thread(target=handle.feed, args=(stdin,), daemon=True).start()
            # The agent enforces `timeout`; the margin here only guards against a stuck stream.
            return handle.wait(None if timeout is None else timeout + 30.0)

    def run(self, argv: Sequence[str] | None = None, *, shell: str | None = None,
            env: Mapping[str, str] | None = None, cwd: str | None = None, stdin: StdinSource | None = None,
            timeout: float | None = None) -> ExecResult:
        """`exec` that collects stdout and stderr."""
        out, err = bytearray(), bytearray()
        status = self.exec(argv, shell=shell, env=env, cwd=cwd, stdin=stdin, on_stdout=out.extend,
                           on_stderr=err.extend, timeout=timeout)
        return ExecResult(status, bytes(out), bytes(err))

    def read_file_into(self, path: str, write: Callable[[bytes], object], timeout: float | None = 300.0) -> FileMeta:
        """Stream a guest file into `write` (e.g. a host file's write method)."""
        chan = self._open("file_read", {"path": path})
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                header, payload = chan.next(deadline)
                if header["t"] == "data":
                    write(payload)
                elif header["t"] == "result":
                    chan.finished = True
                    return FileMeta(header["mode"], header["uid"], header["gid"], header["size"], header["mtime"])
        finally:
            chan.close()

    def read_file(self, path: str, timeout: float | None = 300.0) -> tuple[bytes, FileMeta]:
        data = bytearray()
        meta = self.read_file_into(path, data.extend, timeout)
        return bytes(data), meta

    def write_file(self, path: str, data: StdinSource, *, mode: int | None = None, uid: int | None = None,
                   gid: int | None = None, atomic: bool = True, timeout: float | None = 300.0) -> int:
        """Write a guest file: to a temp file in the same directory, then fsync and rename (atomic=True).
        `mode`/owner default to the replaced file's (or 0644, root). Returns the size written."""
        chan = self._open("file_write", {"path": path, "mode": mode, "uid": uid, "gid": gid, "atomic": atomic})
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for chunk in chunks(data):
                chan.poll_error()
                chan.send("data", chunk)
            chan.send("eof")
            while True:
                header, _ = chan.next(deadline)
                if header["t"] == "result":
                    chan.finished = True
                    return int(header["size"])
        finally:
            chan.close()

    def list_dir(self, path: str, timeout: float | None = 60.0) -> list[DirEntry]:
        _, items = self._call("list_dir", {"path": path}, timeout)
        return [DirEntry(i["name"], i["type"], i["mode"], i["size"], i["uid"], i["gid"], i["mtime"],
                         i.get("target")) for i in items]

    def mkdir(self, path: str, *, mode: int = 0o755, parents: bool = False, uid: int | None = None,
              gid: int | None = None, timeout: float | None = 30.0) -> bool:
        """Create a directory; True if it was created (with `parents`, an existing one is fine)."""
        h, _ = self._call("mkdir", {"path": path, "mode": mode, "parents": parents or None, "uid": uid,
                                    "gid": gid}, timeout)
        return bool(h.get("created"))

    def poweroff(self, timeout: float = 10.0) -> None:
        """Ask the guest to power off cleanly (the VMM then exits); returns once the agent agreed."""
        self._call("poweroff", {}, timeout)

    # --- lifetime -----------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed or self.lost_reason is not None

    def close(self) -> None:
        """Close the stream (never half-close: QEMU's chardev would drop the connection anyway)."""
        with self._wlock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(_CLOSE_WAIT)
        self._sock.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_ready(connect_fn: Callable[[], AgentClient], deadline: float, *, interval: float = 0.2) -> AgentClient:
    """Connect and ask `health` until the agent answers; `deadline` is a `time.monotonic()` instant.
    A protocol version mismatch is raised at once; anything else is retried until the deadline."""
    last = "no attempt made"
    while True:
        try:
            client = connect_fn()
        except AgentVersionMismatch:
            raise
        except (BangerError, OSError) as exc:
            last = str(exc)
        else:
            try:
                client.health(timeout=min(max(deadline - time.monotonic(), 1.0), 10.0))
                return client
            except BaseException as exc:
                client.close()
                if not isinstance(exc, (BangerError, OSError)):
                    raise
                last = str(exc)
        if time.monotonic() + interval >= deadline:
            raise AgentUnavailable(f"guest agent did not answer in time: {last}",
                                   hint="see the VM's console log; is banger-agent in the image?")
        time.sleep(interval)
        interval = min(interval * 1.5, 1.0)
