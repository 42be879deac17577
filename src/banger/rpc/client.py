"""RPC clients: blocking (the CLI, where start-up time matters) and asyncio (daemon → root helper)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from banger.errors import OPERATION_FAILED, BangerError
from banger.rpc import protocol

EventHandler = Callable[[dict[str, Any]], None]


class Unreachable(BangerError):
    """Nothing answers on the socket (not running, stale socket, or no permission)."""


def _interpret(line: bytes, on_event: EventHandler | None) -> tuple[bool, Any]:
    try:
        msg = json.loads(line)
    except ValueError as exc:
        raise protocol.RpcError(OPERATION_FAILED, f"malformed response from server: {exc}") from None
    if not isinstance(msg, dict):
        raise protocol.RpcError(OPERATION_FAILED, "malformed response from server")
    if "event" in msg:
        if on_event is not None and isinstance(msg["event"], dict):
            on_event(msg["event"])
        return False, None
    if "error" in msg:
        raise protocol.error_from_response(msg["error"])
    return True, msg.get("result")


def call(
    socket_path: Path,
    method: str,
    params: dict[str, Any] | None = None,
    *,
    op_id: str | None = None,
    timeout: float | None = None,
    connect_timeout: float = 5.0,
    on_event: EventHandler | None = None,
) -> Any:
    """Send one request and wait for its final answer; raises RpcError or Unreachable."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(connect_timeout)
        try:
            sock.connect(str(socket_path))
        except FileNotFoundError:
            raise Unreachable(f"no server socket at {socket_path}") from None
        except PermissionError:
            raise Unreachable(f"permission denied on {socket_path}") from None
        except (ConnectionRefusedError, TimeoutError, OSError) as exc:
            raise Unreachable(f"cannot connect to {socket_path}: {exc.strerror or exc}") from None
        sock.settimeout(timeout)
        sock.sendall(protocol.encode_request(method, params, op_id))
        reader = sock.makefile("rb")
        while True:
            try:
                line = reader.readline(protocol.MAX_LINE)
            except TimeoutError:
                raise BangerError(f"{method} did not answer within {timeout:g}s") from None
            if not line:
                raise protocol.RpcError(OPERATION_FAILED, f"server closed the connection during {method}")
            done, result = _interpret(line, on_event)
            if done:
                return result
    finally:
        sock.close()


async def acall(
    socket_path: Path,
    method: str,
    params: dict[str, Any] | None = None,
    *,
    op_id: str | None = None,
    timeout: float | None = None,
    on_event: EventHandler | None = None,
) -> Any:
    """Async `call`. Cancelling the caller closes the connection, which cancels the request remotely."""
    import asyncio

    try:
        reader, writer = await asyncio.open_unix_connection(str(socket_path), limit=protocol.MAX_LINE)
    except FileNotFoundError:
        raise Unreachable(f"no server socket at {socket_path}") from None
    except PermissionError:
        raise Unreachable(f"permission denied on {socket_path}") from None
    except OSError as exc:
        raise Unreachable(f"cannot connect to {socket_path}: {exc.strerror or exc}") from None
    try:
        writer.write(protocol.encode_request(method, params, op_id))
        await writer.drain()

        async def read_until_done() -> Any:
            while True:
                line = await reader.readline()
                if not line:
                    raise protocol.RpcError(OPERATION_FAILED, f"server closed the connection during {method}")
                done, result = _interpret(line, on_event)
                if done:
                    return result

        try:
            return await asyncio.wait_for(read_until_done(), timeout)
        except TimeoutError:
            raise BangerError(f"{method} did not answer within {timeout:g}s") from None
    finally:
        writer.close()
