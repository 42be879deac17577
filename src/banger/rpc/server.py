"""The asyncio RPC server shared by bangerd and bangerd-root.

It owns: binding the socket with the right mode and owner, the SO_PEERCRED check, parsing, op_id
minting (or trusting the caller's, for the root helper), cancellation when the client disconnects,
error serialisation and one log line per call with its duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from banger import log as blog
from banger.errors import OPERATION_FAILED, UNKNOWN_METHOD, BangerError
from banger.rpc import protocol


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


class CallContext:
    """What a handler gets besides its params: who called, the op_id, and a way to stream events."""

    def __init__(self, peer: PeerCred, op_id: str, method: str, writer: asyncio.StreamWriter) -> None:
        self.peer = peer
        self.op_id = op_id
        self.method = method
        self._writer = writer

    async def emit(self, event: dict[str, Any]) -> None:
        if not self._writer.is_closing():
            self._writer.write(protocol.encode_event(event))
            await self._writer.drain()


Handler = Callable[[CallContext, dict[str, Any]], Awaitable[Any]]
Authorizer = Callable[[PeerCred], str | None]  # returns a refusal reason, or None to accept


def peer_cred(sock: socket.socket) -> PeerCred:
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return PeerCred(pid, uid, gid)


class RpcServer:
    def __init__(
        self,
        name: str,
        handlers: Mapping[str, Handler],
        *,
        authorize: Authorizer,
        trust_op_id: bool,
        logger: logging.Logger,
        done_level: int = logging.DEBUG,
    ) -> None:
        self.name = name
        self.handlers = dict(handlers)
        self.authorize = authorize
        self.trust_op_id = trust_op_id
        self.log = logger
        self.done_level = done_level
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, socket_path: Path, *, mode: int = 0o600, owner_uid: int | None = None) -> None:
        """Bind with a restrictive umask so the socket is never briefly world-accessible."""
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._on_connect, path=str(socket_path), limit=protocol.MAX_LINE
            )
        finally:
            os.umask(old)
        if owner_uid is not None and owner_uid != os.getuid():
            os.chown(socket_path, owner_uid, -1)
        os.chmod(socket_path, mode)

    async def close(self, grace: float = 2.0) -> None:
        """Stop accepting; let in-flight calls (e.g. the shutdown call itself) finish within `grace`."""
        if self._server is not None:
            self._server.close()
        current = asyncio.current_task()
        pending = [t for t in self._tasks if t is not current]
        if pending:
            await asyncio.wait(pending, timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._serve_one(reader, writer)
        except (ConnectionError, BrokenPipeError):
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        peer = peer_cred(sock)
        op_id = blog.new_op_id()
        token = blog.current_op_id.set(op_id)
        started = time.monotonic()
        method = "?"
        try:
            refusal = self.authorize(peer)
            if refusal is not None:
                self.log.warning("%s refused a caller", self.name,
                                 extra={"peer_uid": peer.uid, "peer_pid": peer.pid, "reason": refusal})
                await _discard_request(reader)
                writer.write(protocol.encode_error("unauthorized", refusal, None, op_id))
                await writer.drain()
                return
            try:
                line = await reader.readline()
            except (asyncio.LimitOverrunError, ValueError):
                raise BangerError(f"request larger than {protocol.MAX_LINE} bytes", code="bad_request") from None
            if not line:
                return
            try:
                request = protocol.decode_request(line)
            except BangerError:
                raise
            method = request.method
            if self.trust_op_id and request.op_id:
                op_id = request.op_id
                blog.current_op_id.set(op_id)
            handler = self.handlers.get(method)
            if handler is None:
                raise BangerError(f"unknown method {method!r}", code=UNKNOWN_METHOD)
            ctx = CallContext(peer, op_id, method, writer)
            result = await self._run_cancellable(handler(ctx, request.params), reader, method)
            writer.write(protocol.encode_result(result, op_id))
            await writer.drain()
            self.log.log(self.done_level, "%s rpc completed", self.name,
                         extra={"method": method, "duration_ms": _ms(started), "peer_uid": peer.uid})
        except asyncio.CancelledError:
            self.log.debug("%s request canceled", self.name, extra={"method": method, "duration_ms": _ms(started)})
            raise
        except _ClientGone:
            self.log.info("%s request canceled by client disconnect", self.name,
                          extra={"method": method, "duration_ms": _ms(started)})
        except BangerError as exc:
            self.log.info("%s rpc failed", self.name, extra={
                "method": method, "duration_ms": _ms(started), "code": exc.code, "error": exc.message})
            writer.write(protocol.encode_error(exc.code, exc.message, exc.hint, op_id))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        except Exception as exc:
            self.log.exception("%s rpc crashed", self.name, extra={"method": method, "duration_ms": _ms(started)})
            writer.write(protocol.encode_error(OPERATION_FAILED, f"internal error in {method}: {exc}", None, op_id))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            blog.current_op_id.reset(token)

    async def _run_cancellable(self, coro: Awaitable[Any], reader: asyncio.StreamReader, method: str) -> Any:
        """Run the handler; if the client hangs up first, cancel it (and so its children)."""
        work = asyncio.ensure_future(coro)
        gone = asyncio.ensure_future(reader.read(1))
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                return work.result()
            # Any byte after the request line or EOF both mean the client is not waiting any more.
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
            raise _ClientGone(method)
        finally:
            if not gone.done():
                gone.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await gone
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work


class _ClientGone(Exception):
    pass


REFUSED_READ_TIMEOUT = 5.0


async def _discard_request(reader: asyncio.StreamReader) -> None:
    """Consume a refused caller's request line before answering.

    Answering first races the client's write: its send fails with EPIPE, or our close with unread
    data resets the connection, and the client sees a broken pipe instead of the refusal.
    """
    with contextlib.suppress(TimeoutError, asyncio.LimitOverrunError, ValueError, ConnectionError):
        await asyncio.wait_for(reader.readline(), REFUSED_READ_TIMEOUT)


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
