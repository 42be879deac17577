"""Guest operations through the VM's agent: `vm.exec`, `vm.ports`, `vm.cp.push` and `vm.cp.pull`.

The agent client is synchronous (a reader thread routes frames to channels), so each operation runs in
a thread of its own, not the default executor: a long `vm exec` must not take a worker that VM starts
need. Output reaches the caller as RPC events, emitted from that thread with backpressure (the thread
waits for each event to be written). A caller that disconnects cancels the handler task; the handler
then kills the guest command's process group and waits for the thread to finish.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar

from banger import model
from banger.errors import BadRequest, BangerError, NotFound
from banger.rpc.protocol import Params

if TYPE_CHECKING:
    from banger.daemon.app import Daemon
    from banger.guest.agent_client import AgentClient, ExecHandle
    from banger.guest.agent_wire import DirEntry, ExitStatus
    from banger.rpc.server import CallContext

log = logging.getLogger("banger.guestops")

T = TypeVar("T")
Emit = Callable[[dict[str, Any]], None]
MAX_STDIN = 64 << 20
AGENT_CONNECT_TIMEOUT = 3.0
HTTP_PROBE_TIMEOUT = 1.0
CANCEL_GRACE = 10.0
_NAME_RE = r"^[A-Za-z_][A-Za-z0-9_]*$"


# --- plumbing shared with daemon/workspace.py ------------------------------------------------------


async def in_thread(fn: Callable[[], T], name: str) -> T:
    """Run `fn` in a thread of its own and await its result. Cancelling the caller does not stop the
    thread (see `run_cancellable` for operations that must be stopped)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def runner() -> None:
        try:
            result: Any = fn()
            ok = True
        except BaseException as exc:
            result, ok = exc, False
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, ok, result)

    threading.Thread(target=runner, daemon=True, name=name).start()
    return await fut


def thread_emitter(ctx: CallContext, loop: asyncio.AbstractEventLoop) -> Emit:
    """An `emit` for worker threads: blocks until the event is written (so output keeps its order and a
    slow client slows the producer down); raises once the client is gone."""

    def emit(event: dict[str, Any]) -> None:
        asyncio.run_coroutine_threadsafe(ctx.emit(event), loop).result()

    return emit


class Cancel:
    """Cancellation for guest commands started from a worker thread: `fire()` (from the loop) kills
    the process groups of the commands in flight; later starts are refused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handles: set[ExecHandle] = set()
        self.fired = False

    def register(self, handle: ExecHandle) -> None:
        with self._lock:
            self._handles.add(handle)
            fired = self.fired
        if fired:
            _kill(handle)

    def forget(self, handle: ExecHandle) -> None:
        with self._lock:
            self._handles.discard(handle)

    def fire(self) -> None:
        with self._lock:
            self.fired = True
            handles = list(self._handles)
        for handle in handles:
            _kill(handle)

    def check(self) -> None:
        if self.fired:
            raise BangerError("canceled")


def _kill(handle: ExecHandle) -> None:
    # SIGKILL to the process group: the agent then reports the exit and the waiting thread returns.
    # (Closing the channel would kill it too, but leave the waiter blocked on a channel nobody feeds.)
    with contextlib.suppress(BangerError, OSError):
        handle.signal("KILL")


async def run_cancellable(fn: Callable[[Cancel], T], name: str) -> T:
    """Run `fn(cancel)` in a thread; if the caller is cancelled, fire `cancel` and wait (bounded) for
    the thread to wind down before re-raising."""
    cancel = Cancel()
    fut = asyncio.ensure_future(in_thread(lambda: fn(cancel), name))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        cancel.fire()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(fut, CANCEL_GRACE)
        raise


def running_vm(d: Daemon, ref: str) -> model.VmRecord:
    vm = d.vms.resolve(ref)
    if vm.state != model.VmState.RUNNING:
        raise BangerError(f"vm {vm.name!r} is {vm.state}, not running", hint=f"start it: banger vm start {vm.name}")
    return vm


async def agent_for(d: Daemon, vm: model.VmRecord, timeout: float = AGENT_CONNECT_TIMEOUT) -> AgentClient:
    endpoint = d.vms.agent_endpoint(vm)
    return await in_thread(lambda: d.agents.get(vm.id, endpoint, timeout=timeout), f"agent-connect {vm.name}")


def guest_command(agent: AgentClient, argv: list[str], cancel: Cancel, *, cwd: str | None = None,
                  env: dict[str, str] | None = None, stdin: Any = None, timeout: float | None = None,
                  on_stdout: Callable[[bytes], object] | None = None,
                  on_stderr: Callable[[bytes], object] | None = None) -> ExitStatus:
    """Run one guest command to its end (blocking), killable through `cancel`. `stdin` is bytes, a
    binary file or an iterable of chunks, fed from a thread so a command that does not read it cannot
    stall its own output."""
    cancel.check()
    handle = agent.start_exec(argv, env=env, cwd=cwd, stdin=stdin is not None, timeout=timeout,
                              on_stdout=on_stdout, on_stderr=on_stderr)
    cancel.register(handle)
    try:
        if stdin is not None:
            threading.Thread(target=_feed, args=(handle, stdin), daemon=True, name="agent-stdin").start()
        return handle.wait()
    finally:
        cancel.forget(handle)


def chunks(source: Any, cancel: Cancel | None = None, size: int = 128 * 1024) -> Iterator[bytes]:
    """Bytes, a binary file or an iterable of chunks, as chunks; stops with an error once cancelled."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        parts: Iterable[bytes] = (data[i : i + size] for i in range(0, len(data), size))
    elif callable(getattr(source, "read", None)):
        parts = iter(lambda: bytes(source.read(size)), b"")
    else:
        parts = source
    for part in parts:
        if cancel is not None:
            cancel.check()
        if part:
            yield part


def _feed(handle: ExecHandle, stdin: Any) -> None:
    try:
        for chunk in chunks(stdin):
            handle.write_stdin(chunk)
        handle.close_stdin()
    except (BangerError, OSError, ValueError) as exc:
        log.debug("stdin feed stopped: %s", exc)


def guest_run(agent: AgentClient, argv: list[str], cancel: Cancel, *, what: str, cwd: str | None = None,
              stdin: Any = None, timeout: float | None = None) -> bytes:
    """`guest_command` that collects stdout and raises with the tail of stderr on a non-zero exit."""
    out, err = bytearray(), bytearray()
    status = guest_command(agent, argv, cancel, cwd=cwd, stdin=stdin, timeout=timeout, on_stdout=out.extend,
                           on_stderr=err.extend)
    if status.returncode != 0:
        cancel.check()
        tail = " | ".join(err.decode(errors="replace").strip().splitlines()[-4:]) or f"exit {status.returncode}"
        raise BangerError(f"{what} failed in the guest: {tail}")
    return bytes(out)


# --- vm.exec ---------------------------------------------------------------------------------------


def _env_param(value: Any) -> dict[str, str]:
    import re

    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest("param 'env' must be an object of NAME: value strings")
    for key, val in value.items():
        if not isinstance(key, str) or not re.match(_NAME_RE, key) or not isinstance(val, str):
            raise BadRequest(f"env entry {key!r} must be NAME=value with NAME a shell variable name")
    return dict(value)


def _stdin_param(d: Daemon, p: Params) -> bytes | None:
    inline = p.get_str("stdin_b64")
    path = p.get_str("stdin_path")
    if inline and path:
        raise BadRequest("give stdin_b64 or stdin_path, not both")
    if inline:
        try:
            return base64.b64decode(inline, validate=True)
        except ValueError:
            raise BadRequest("param 'stdin_b64' is not valid base64") from None
    if not path:
        return None
    # A spool file the CLI wrote for stdin too large for one request line; only from the runtime dir.
    spool = Path(path)
    if spool.parent != d.layout.runtime_dir / "spool" or not spool.name.startswith("stdin-"):
        raise BadRequest(f"stdin_path {path!r} is not a banger spool file")
    try:
        fd = os.open(spool, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise BadRequest(f"cannot read stdin spool {path!r}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_STDIN + 1)
    if len(data) > MAX_STDIN:
        raise BadRequest(f"stdin is larger than {MAX_STDIN >> 20} MiB")
    return data


async def vm_exec(d: Daemon, ctx: CallContext, raw: dict[str, Any]) -> Any:
    """Run argv in the guest (no shell), streaming `{"stdout": b64}` / `{"stderr": b64}` events.

    Returns `{exit_code, signal, timed_out}`, or `{agent_unavailable, reason, cwd}` before anything ran
    when the guest has no usable agent (the CLI then falls back to SSH)."""
    from banger.guest.agent_wire import AgentUnavailable, AgentVersionMismatch

    p = Params(raw, allowed={"ref", "argv", "env", "cwd", "stdin_b64", "stdin_path", "timeout"})
    vm = running_vm(d, p.get_str("ref", required=True))
    argv = p.get_str_list("argv", required=True)
    env = _env_param(raw.get("env"))
    cwd = p.get_str("cwd") or str((vm.workspace or {}).get("guest_path") or "") or "/root"
    if not cwd.startswith("/"):
        raise BadRequest(f"cwd {cwd!r} must be an absolute guest path")
    timeout = p.get_int("timeout", minimum=1, maximum=7 * 24 * 3600)
    stdin = _stdin_param(d, p)
    try:
        agent = await agent_for(d, vm)
    except (AgentUnavailable, AgentVersionMismatch) as exc:
        log.info("exec without an agent", extra={"vm": vm.name, "error": exc.message})
        return {"agent_unavailable": True, "reason": exc.message, "cwd": cwd}
    emit = thread_emitter(ctx, asyncio.get_running_loop())

    def work(cancel: Cancel) -> ExitStatus:
        return guest_command(
            agent, argv, cancel, cwd=cwd, env=env, stdin=stdin, timeout=float(timeout) if timeout else None,
            on_stdout=lambda b: emit({"stdout": base64.b64encode(b).decode()}),
            on_stderr=lambda b: emit({"stderr": base64.b64encode(b).decode()}))

    status = await run_cancellable(work, f"exec {vm.name}")
    return {"exit_code": status.code, "signal": status.signal, "timed_out": status.timed_out}


# --- vm.ports --------------------------------------------------------------------------------------


async def _http_answers(ip: str, port: int, host: str) -> bool:
    """True when something on ip:port answers an HTTP GET within the probe timeout."""

    async def probe() -> bool:
        reader, writer = await asyncio.open_connection(ip, port)
        try:
            writer.write(f"GET / HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: banger\r\n\r\n".encode())
            await writer.drain()
            return (await reader.read(5)) == b"HTTP/"
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(probe(), HTTP_PROBE_TIMEOUT)
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False


def _loopback_only(addresses: set[str]) -> bool:
    import ipaddress

    try:
        return all(ipaddress.ip_address(a).is_loopback for a in addresses)
    except ValueError:
        return False


async def _ports_of(d: Daemon, vm: model.VmRecord) -> list[dict[str, Any]]:
    agent = await agent_for(d, vm)
    sockets = await in_thread(lambda: agent.ports(timeout=15.0), f"ports {vm.name}")
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    for s in sockets:
        row = merged.setdefault((s.proto, s.port), {"proto": s.proto, "port": s.port, "addresses": set(),
                                                    "processes": set(), "pids": set()})
        row["addresses"].add(s.address)
        row["processes"].update(s.processes)
        row["pids"].update(s.pids)
    rows = sorted(merged.values(), key=lambda r: (r["proto"], r["port"]))
    host = f"{vm.name}.vm"

    async def finish(row: dict[str, Any]) -> dict[str, Any]:
        probe = row["proto"] == "tcp" and not _loopback_only(row["addresses"])
        url = f"http://{host}:{row['port']}/" if probe and await _http_answers(vm.guest_ip, row["port"], host) \
            else None
        return {"proto": row["proto"], "port": row["port"], "addresses": sorted(row["addresses"]),
                "processes": sorted(row["processes"]), "pids": sorted(row["pids"]),
                "endpoint": f"{host}:{row['port']}", "url": url}

    return list(await asyncio.gather(*(finish(r) for r in rows)))


async def vm_ports(d: Daemon, ctx: CallContext, raw: dict[str, Any]) -> Any:
    """Listening sockets of several VMs at once (every running VM when `refs` is empty)."""
    p = Params(raw, allowed={"refs"})
    refs = model.dedupe(p.get_str_list("refs"))
    snapshot = d.vms.all()
    if not refs:
        refs = [vm.name for vm in snapshot if vm.state == model.VmState.RUNNING]

    async def one(ref: str) -> dict[str, Any]:
        try:
            vm = model.resolve_ref(ref, snapshot, kind="vm")
            if vm.state != model.VmState.RUNNING:
                raise BangerError(f"vm {vm.name!r} is {vm.state}, not running")
            return {"ref": ref, "name": vm.name, "ok": True, "ports": await _ports_of(d, vm)}
        except BangerError as exc:
            return {"ref": ref, "ok": False, "error": {"code": exc.code, "message": exc.message,
                                                       "hint": exc.hint}}

    return {"vms": list(await asyncio.gather(*(one(r) for r in refs)))}


# --- vm.cp -----------------------------------------------------------------------------------------


def guest_entry(agent: AgentClient, path: str) -> DirEntry | None:
    """What is at a guest path (not following a final symlink), or None if nothing is."""
    from banger.guest.agent_wire import DirEntry

    pure = PurePosixPath(path)
    if str(pure) == "/":
        return DirEntry("/", "dir", 0o755, 0, 0, 0, 0.0)
    try:
        entries = agent.list_dir(str(pure.parent))
    except (NotFound, BadRequest):
        return None
    return next((e for e in entries if e.name == pure.name), None)


def _abs_param(p: Params, key: str, side: str) -> str:
    value = p.get_str(key, required=True)
    if not value.startswith("/") or "\0" in value:
        raise BadRequest(f"{side} path {value!r} must be absolute")
    return value


async def vm_cp_push(d: Daemon, ctx: CallContext, raw: dict[str, Any]) -> Any:
    """Host → guest: the daemon reads `src` (a file or a tree) and writes it through the agent."""
    p = Params(raw, allowed={"ref", "src", "dst"})
    vm = running_vm(d, p.get_str("ref", required=True))
    src = _abs_param(p, "src", "host")
    dst = _abs_param(p, "dst", "guest")
    agent = await agent_for(d, vm)
    emit = thread_emitter(ctx, asyncio.get_running_loop())
    return await run_cancellable(lambda cancel: _push(agent, vm.name, src, dst, emit, cancel), f"cp {vm.name}")


def _push(agent: AgentClient, vm_name: str, src: str, dst: str, emit: Emit, cancel: Cancel) -> dict[str, Any]:
    try:
        st = os.stat(src)
    except FileNotFoundError:
        raise NotFound(f"cannot copy {src!r}: no such file or directory on the host") from None
    except OSError as exc:
        raise BangerError(f"cannot read {src!r}: {exc.strerror}") from None
    is_dir = stat.S_ISDIR(st.st_mode)
    if not is_dir and not stat.S_ISREG(st.st_mode):
        raise BadRequest(f"cannot copy {src!r}: not a regular file or directory")
    at_dst = guest_entry(agent, dst)
    if at_dst is not None and at_dst.type == "dir":
        name = os.path.basename(src.rstrip("/"))
        if not name:
            raise BadRequest("cannot copy the host's root directory")
        target = str(PurePosixPath(dst) / name)
        existing = guest_entry(agent, target)
    else:
        if at_dst is None:
            parent = str(PurePosixPath(dst).parent)
            if dst.endswith("/") or (parent_entry := guest_entry(agent, parent)) is None \
                    or parent_entry.type != "dir":
                missing = dst if dst.endswith("/") else parent
                raise NotFound(f"guest directory {vm_name}:{missing.rstrip('/') or '/'} does not exist")
        target, existing = str(PurePosixPath(dst)), at_dst
    stats = {"files": 0, "dirs": 0, "bytes": 0, "skipped": 0, "target": target}
    if not is_dir:
        if existing is not None and existing.type == "dir":
            raise BadRequest(f"cannot overwrite directory {vm_name}:{target} with non-directory {src}")
        _push_file(agent, src, target, st.st_mode, stats, cancel)
        return stats
    if existing is not None and existing.type != "dir":
        raise BadRequest(f"cannot overwrite non-directory {vm_name}:{target} with directory {src}")
    _push_dir(agent, vm_name, Path(src), target, st.st_mode, existing is not None, emit, stats, cancel)
    return stats


def _push_file(agent: AgentClient, src: str, target: str, mode: int, stats: dict[str, Any],
               cancel: Cancel) -> None:
    cancel.check()
    try:
        with open(src, "rb") as f:
            size = agent.write_file(target, chunks(f, cancel), mode=stat.S_IMODE(mode))
    except OSError as exc:
        raise BangerError(f"cannot read {src!r}: {exc.strerror}") from None
    stats["files"] += 1
    stats["bytes"] += size


def _push_dir(agent: AgentClient, vm_name: str, src: Path, target: str, mode: int, exists: bool, emit: Emit,
              stats: dict[str, Any], cancel: Cancel) -> None:
    cancel.check()
    children: dict[str, str] = {}
    if exists:
        children = {e.name: e.type for e in agent.list_dir(target)}
    else:
        agent.mkdir(target, mode=stat.S_IMODE(mode))
    stats["dirs"] += 1
    try:
        entries = sorted(os.scandir(src), key=lambda e: e.name)
    except OSError as exc:
        raise BangerError(f"cannot read directory {str(src)!r}: {exc.strerror}") from None
    for entry in entries:
        child = f"{target.rstrip('/')}/{entry.name}"
        st = entry.stat(follow_symlinks=False)
        there = children.get(entry.name)
        if stat.S_ISDIR(st.st_mode):
            if there is not None and there != "dir":
                raise BadRequest(f"cannot overwrite non-directory {vm_name}:{child} with directory {entry.path}")
            _push_dir(agent, vm_name, Path(entry.path), child, st.st_mode, there == "dir", emit, stats, cancel)
        elif stat.S_ISREG(st.st_mode):
            if there == "dir":
                raise BadRequest(f"cannot overwrite directory {vm_name}:{child} with non-directory {entry.path}")
            _push_file(agent, entry.path, child, st.st_mode, stats, cancel)
        else:
            stats["skipped"] += 1
            emit({"kind": "skip", "path": entry.path, "message": f"skipped {_kind(st.st_mode)} {entry.path}"})


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "symlink"), (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


async def vm_cp_pull(d: Daemon, ctx: CallContext, raw: dict[str, Any]) -> Any:
    """Guest → host: the daemon reads through the agent and streams events that the CLI writes out:
    `{kind: dir, path, mode}`, `{kind: file, path, mode, data_b64, eof}` (paths relative to `src`,
    "" for `src` itself) and `{kind: skip, path, message}` for symlinks and special files."""
    p = Params(raw, allowed={"ref", "src"})
    vm = running_vm(d, p.get_str("ref", required=True))
    src = _abs_param(p, "src", "guest")
    agent = await agent_for(d, vm)
    emit = thread_emitter(ctx, asyncio.get_running_loop())
    return await run_cancellable(lambda cancel: _pull(agent, vm.name, src, emit, cancel), f"cp {vm.name}")


def _pull(agent: AgentClient, vm_name: str, src: str, emit: Emit, cancel: Cancel) -> dict[str, Any]:
    entry = guest_entry(agent, src)
    if entry is None:
        raise NotFound(f"cannot copy {vm_name}:{src}: no such file or directory in the guest")
    stats = {"files": 0, "dirs": 0, "bytes": 0, "skipped": 0, "type": entry.type}
    if entry.type == "file":
        _pull_file(agent, src, "", emit, stats, cancel)
    elif entry.type == "dir":
        _pull_dir(agent, src, "", entry.mode, emit, stats, cancel)
    else:
        raise BadRequest(f"cannot copy {vm_name}:{src}: it is a {entry.type}, not a file or directory")
    return stats


def _pull_file(agent: AgentClient, path: str, rel: str, emit: Emit, stats: dict[str, Any], cancel: Cancel) -> None:
    cancel.check()
    sent = 0

    def chunk(data: bytes) -> None:
        nonlocal sent
        cancel.check()
        sent += len(data)
        emit({"kind": "file", "path": rel, "data_b64": base64.b64encode(data).decode(), "eof": False})

    meta = agent.read_file_into(path, chunk)
    emit({"kind": "file", "path": rel, "mode": meta.mode, "data_b64": "", "eof": True})
    stats["files"] += 1
    stats["bytes"] += sent


def _pull_dir(agent: AgentClient, path: str, rel: str, mode: int, emit: Emit, stats: dict[str, Any],
              cancel: Cancel) -> None:
    cancel.check()
    emit({"kind": "dir", "path": rel, "mode": mode})
    stats["dirs"] += 1
    for entry in agent.list_dir(path):
        child, child_rel = f"{path.rstrip('/')}/{entry.name}", f"{rel}/{entry.name}" if rel else entry.name
        if entry.type == "dir":
            _pull_dir(agent, child, child_rel, entry.mode, emit, stats, cancel)
        elif entry.type == "file":
            _pull_file(agent, child, child_rel, emit, stats, cancel)
        else:
            stats["skipped"] += 1
            emit({"kind": "skip", "path": child_rel, "message": f"skipped {entry.type} {child}"})
