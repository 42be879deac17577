"""The shared RPC server over a real Unix socket: framing, errors, op_id, cancellation, SO_PEERCRED."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from banger import log as blog
from banger.errors import NotFound
from banger.rpc import client, protocol
from banger.rpc.server import CallContext, PeerCred, RpcServer


class Harness:
    def __init__(self, sock: Path, authorize_uid: int | None = None, trust_op_id: bool = False) -> None:
        self.sock = sock
        self.cancelled = threading.Event()
        self.started = threading.Event()
        self.seen_op_ids: list[str] = []
        self.records: list[logging.LogRecord] = []
        self.loop = asyncio.new_event_loop()
        self.authorize_uid = authorize_uid
        self.trust_op_id = trust_op_id
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def handlers(self) -> dict[str, Any]:
        async def echo(ctx: CallContext, params: dict[str, Any]) -> Any:
            self.seen_op_ids.append(ctx.op_id)
            logging.getLogger("banger.test").info("echo handled")
            return {"params": params, "op_id": ctx.op_id, "log_op_id": blog.current_op_id.get()}

        async def missing(ctx: CallContext, params: dict[str, Any]) -> Any:
            raise NotFound("no vm named 'x'", hint="see `banger vm list`")

        async def crash(ctx: CallContext, params: dict[str, Any]) -> Any:
            raise ZeroDivisionError("boom")

        async def slow(ctx: CallContext, params: dict[str, Any]) -> Any:
            self.started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return "late"

        async def progress(ctx: CallContext, params: dict[str, Any]) -> Any:
            for i in range(3):
                await ctx.emit({"stage": f"step-{i}"})
            return "done"

        return {
            "t.echo": echo,
            "t.missing": missing,
            "t.crash": crash,
            "t.slow": slow,
            "t.progress": progress,
        }

    def __enter__(self) -> Harness:
        self.thread.start()
        logger = logging.getLogger("banger.test.rpc")
        harness = self

        class Capture(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                record.op_id_seen = blog.current_op_id.get()
                harness.records.append(record)

        logger.addHandler(Capture())
        logger.setLevel(logging.DEBUG)

        def authorize(peer: PeerCred) -> str | None:
            if self.authorize_uid is None or peer.uid == self.authorize_uid:
                return None
            return f"uid {peer.uid} is not allowed"

        self.server = RpcServer(
            "test", self.handlers(), authorize=authorize, trust_op_id=self.trust_op_id, logger=logger
        )
        asyncio.run_coroutine_threadsafe(self.server.start(self.sock), self.loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    with Harness(tmp_path / "s.sock") as h:
        yield h


def test_socket_mode_is_0600(harness: Harness) -> None:
    assert stat.S_IMODE(harness.sock.stat().st_mode) == 0o600


def test_echo_mints_op_id_and_sets_context(harness: Harness) -> None:
    result = client.call(harness.sock, "t.echo", {"a": 1}, op_id="op-aaaaaa")
    assert result["params"] == {"a": 1}
    # The daemon mints its own id for every call, ignoring the caller's.
    assert protocol.OP_ID_RE.match(result["op_id"]) and result["op_id"] != "op-aaaaaa"
    assert result["log_op_id"] == result["op_id"]


def test_helper_mode_trusts_forwarded_op_id(tmp_path: Path) -> None:
    with Harness(tmp_path / "h.sock", trust_op_id=True) as h:
        assert client.call(h.sock, "t.echo", {}, op_id="op-abcdef")["op_id"] == "op-abcdef"


def test_errors_carry_code_and_op_id(harness: Harness) -> None:
    with pytest.raises(protocol.RpcError) as exc:
        client.call(harness.sock, "t.missing")
    assert exc.value.code == "not_found"
    assert exc.value.hint == "see `banger vm list`"
    assert exc.value.op_id and protocol.OP_ID_RE.match(exc.value.op_id)


def test_unknown_method(harness: Harness) -> None:
    with pytest.raises(protocol.RpcError) as exc:
        client.call(harness.sock, "t.nope")
    assert exc.value.code == "unknown_method" and exc.value.op_id


def test_crash_is_operation_failed_not_traceback(harness: Harness) -> None:
    with pytest.raises(protocol.RpcError) as exc:
        client.call(harness.sock, "t.crash")
    assert exc.value.code == "operation_failed"
    assert exc.value.message == "internal error in t.crash: boom"


def _raw(sock_path: Path, payload: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock_path))
        s.sendall(payload)
        data = s.makefile("rb").readline()
    result: dict[str, Any] = json.loads(data)
    return result


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"garbage\n", "bad_request"),
        (b'{"v":99,"method":"t.echo"}\n', "bad_version"),
        (b'{"v":1,"method":"t.echo","params":"x"}\n', "bad_request"),
    ],
)
def test_malformed_requests_answered_with_op_id(harness: Harness, payload: bytes, code: str) -> None:
    err = _raw(harness.sock, payload)["error"]
    assert err["code"] == code
    assert protocol.OP_ID_RE.match(err["op_id"])


def test_events_stream_before_result(harness: Harness) -> None:
    events: list[dict[str, Any]] = []
    assert client.call(harness.sock, "t.progress", on_event=events.append) == "done"
    assert [e["stage"] for e in events] == ["step-0", "step-1", "step-2"]


def test_disconnect_cancels_the_request(harness: Harness) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(harness.sock))
    s.sendall(protocol.encode_request("t.slow"))
    assert harness.started.wait(5)
    s.close()
    assert harness.cancelled.wait(5), "handler was not cancelled after the client went away"


def test_async_client_roundtrip(harness: Harness) -> None:
    async def go() -> Any:
        return await client.acall(harness.sock, "t.echo", {"x": 2})

    assert asyncio.run(go())["params"] == {"x": 2}


def test_unreachable_socket(tmp_path: Path) -> None:
    with pytest.raises(client.Unreachable, match="no server socket"):
        client.call(tmp_path / "absent.sock", "t.echo")


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another uid")
def test_peercred_refusal(tmp_path: Path) -> None:
    with Harness(tmp_path / "p.sock", authorize_uid=12345) as h:
        with pytest.raises(protocol.RpcError) as exc:
            client.call(h.sock, "t.echo")
        assert exc.value.code == "unauthorized"
        assert exc.value.message == "uid 0 is not allowed"
