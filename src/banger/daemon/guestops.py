"""Guest operations through the VM's agent: `vm.exec` and `vm.ports` (`vm.cp.*` is in daemon/guestcp.py).

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
import threading
from collections.abc import Callable, Iterator
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


# --- plumbing shared with daemon/guestcp.py and daemon/workspace.py --------------------------------


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
            threading.Thread(target=handle.feed, args=(stdin,), daemon=True, name="agent-stdin").start()
        return handle.wait()
    finally:
        cancel.forget(handle)


def chunks(source: Any, cancel: Cancel | None = None) -> Iterator[bytes]:
    """The agent client's chunks of `source`, stopping with an error once cancelled."""
    from banger.guest.agent_client import chunks as agent_chunks

    for part in agent_chunks(source):
        if cancel is not None:
            cancel.check()
        yield part


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
