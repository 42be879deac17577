"""The agent's wire format, pure parts of agent.py, and the client's handshake over a socketpair."""

from __future__ import annotations

import ast
import json
import socket
import struct
import sys
import threading
from pathlib import Path

import pytest

from banger.errors import AlreadyExists, BadRequest, BangerError, NotFound
from banger.guest import agent
from banger.guest.agent_client import AgentClient
from banger.guest.agent_wire import (
    MAX_FRAME,
    AgentProtocolError,
    AgentUnavailable,
    AgentVersionMismatch,
    ExitStatus,
    _agent_error,
    encode_frame,
    parse_connect_reply,
    pop_frame,
)

AGENT_SOURCE = Path(agent.__file__)


# --- the agent file itself -----------------------------------------------------------------------------


def test_agent_is_a_stdlib_only_script_for_python_3_9() -> None:
    source = AGENT_SOURCE.read_text()
    assert source.startswith("#!/usr/bin/python3\n")
    tree = ast.parse(source, feature_version=(3, 9))  # no match, no parenthesised context managers
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Match):
            pytest.fail("match statements need Python 3.10")
    assert imported, "the import scan found nothing: the test would pass vacuously"
    assert imported - sys.stdlib_module_names == {"__future__"} - sys.stdlib_module_names
    assert "banger" not in imported


def test_codecs_agree() -> None:
    header = {"t": "stdout", "ch": 7, "path": "/tmp/\udcff-not-utf8", "note": "é"}
    payload = bytes(range(256)) * 3
    frame = agent.encode_frame(header, payload)
    assert frame == encode_frame(header, payload)
    assert frame[4:].split(b"\n", 1)[0].isascii()
    buf = bytearray(frame + frame)
    assert pop_frame(buf) == (header, payload)
    assert pop_frame(buf) == (header, payload)
    assert pop_frame(buf) is None and not buf


def test_frame_reader_handles_any_split() -> None:
    frames = [({"t": "hello", "ch": 0, "version": 1}, b""), ({"t": "data", "ch": 3}, b"\n\n\x00payload\n"),
              ({"t": "eof", "ch": 3}, b"")]
    stream = b"".join(agent.encode_frame(h, p) for h, p in frames)
    reader = agent.FrameReader()
    got = []
    for i in range(len(stream)):  # one byte at a time
        reader.feed(stream[i : i + 1])
        while (frame := reader.next()) is not None:
            assert frame.error is None and frame.header is not None
            got.append((frame.header, frame.payload))
    assert got == frames


@pytest.mark.parametrize("size", [0, 1, agent.MAX_FRAME + 1, 0xFFFFFFFF])
def test_a_length_out_of_range_loses_the_framing(size: int) -> None:
    reader = agent.FrameReader()
    reader.feed(struct.pack(">I", size) + b"x" * 10)
    with pytest.raises(agent.FramingLost, match=f"frame length {size} is out of range"):
        reader.next()
    buf = bytearray(struct.pack(">I", size) + b"x" * 10)
    with pytest.raises(AgentProtocolError):
        pop_frame(buf)


@pytest.mark.parametrize(
    ("body", "ch", "error"),
    [
        (b"no newline at all", None, "not terminated by a newline"),
        (b"{not json\n", None, "not JSON"),
        (b"[1, 2]\n", None, "not a JSON object"),
        (b'{"t":"x","ch":-1}\n', None, "needs 'ch'"),
        (b'{"t":"x","ch":true}\n', None, "needs 'ch'"),
        (b'{"t":"x","ch":2147483648}\n', None, "needs 'ch'"),
        (b'{"ch":5}\n', 5, "needs 't'"),
        (b'{"ch":5,"t":""}\n', 5, "needs 't'"),
    ],
)
def test_bad_headers_keep_the_stream_in_step(body: bytes, ch: int | None, error: str) -> None:
    reader = agent.FrameReader()
    good = agent.encode_frame({"t": "health", "ch": 9})
    reader.feed(struct.pack(">I", len(body)) + body + good)
    bad = reader.next()
    assert bad is not None and bad.header is None and bad.ch == ch and error in str(bad.error)
    after = reader.next()
    assert after is not None and after.header == {"t": "health", "ch": 9}


def test_resync_finds_the_next_hello_and_always_progresses() -> None:
    hello = agent.encode_frame({"t": "hello", "nonce": "ab", "ch": 0, "version": 1})
    reader = agent.FrameReader()
    reader.feed(b"\xff\xff\xff\xff" + b"junk" * 100)
    with pytest.raises(agent.FramingLost):
        reader.next()
    assert reader.resync(agent.HELLO_MARK) is False
    assert len(reader.buf) <= len(agent.HELLO_MARK) + 4  # junk does not pile up
    reader.feed(b"more junk" + hello)
    assert reader.resync(agent.HELLO_MARK) is True
    frame = reader.next()
    assert frame is not None and frame.header is not None and frame.header["t"] == "hello"

    # A hello marker behind a bad length: resync must move past it, not find it again forever.
    reader = agent.FrameReader()
    reader.feed(b"\xff\xff\xff\xff" + agent.HELLO_MARK + b"}\n" + hello)
    for _ in range(3):
        try:
            frame = reader.next()
            break
        except agent.FramingLost:
            assert reader.resync(agent.HELLO_MARK)
    assert frame is not None and frame.header is not None and frame.header.get("nonce") == "ab"


def test_negotiate() -> None:
    ok = agent.negotiate({"t": "hello", "nonce": "n1", "ch": 0, "version": 1})
    assert list(ok)[:3] == ["t", "nonce", "ch"]  # the client finds the reply by this prefix
    assert ok["version"] == 1 and {"exec", "tty"} <= set(ok["features"])
    assert agent.encode_frame(ok)[4:].startswith(b'{"t":"hello","nonce":"n1"')

    refused = agent.negotiate({"t": "hello", "nonce": "n2", "ch": 0, "version": 99})
    assert refused["t"] == "error" and refused["code"] == "bad_version" and refused["version"] == 1
    assert refused["message"] == "unsupported protocol version 99 (agent speaks 1)"
    assert agent.negotiate({"t": "hello", "ch": 0, "version": "1"})["message"] == (
        'unsupported protocol version "1" (agent speaks 1)')
    assert agent.negotiate({"t": "hello", "ch": 0})["t"] == "error"
    assert "nonce" not in agent.negotiate({"t": "hello", "ch": 0, "version": 1, "nonce": "x" * 65})


# --- /proc/net parsing ---------------------------------------------------------------------------------

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1 0 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 2222 1 0 20 4 30 10 -1
   2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3333 1 0 100 0 0 10 0
"""
TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0 100 0 0 10 0
   1: 0000000000000000FFFF00000100007F:0051 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5555 1 0 100 0 0 10 0
"""
UDP = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 6666 2 0 0
  101: 0100007F:A000 0100007F:0035 01 00000000:00000000 00:00000000 00000000     0        0 7777 2 0 0
"""


@pytest.mark.skipif(sys.byteorder != "little", reason="the samples are from a little-endian host")
def test_parse_proc_net() -> None:
    assert agent.parse_proc_net(TCP, "tcp", 4) == [
        {"proto": "tcp", "family": 4, "address": "127.0.0.1", "port": 8080, "inode": 1111},
        {"proto": "tcp", "family": 4, "address": "0.0.0.0", "port": 22, "inode": 3333},
    ]
    assert [(s["address"], s["port"]) for s in agent.parse_proc_net(TCP6, "tcp", 6)] == [
        ("::1", 80), ("::ffff:127.0.0.1", 81)]  # fmt: skip
    assert agent.parse_proc_net(UDP, "udp", 4) == [
        {"proto": "udp", "family": 4, "address": "0.0.0.0", "port": 53, "inode": 6666}]  # fmt: skip
    assert agent.parse_proc_net("header only\n  garbage line\n", "tcp", 4) == []


def test_listening_sockets_from_a_fake_proc(tmp_path: Path) -> None:
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "tcp").write_text(TCP)
    (tmp_path / "net" / "udp").write_text(UDP)
    for pid, comm, inodes in (("41", "nginx", [1111, 3333]), ("42", "dnsmasq", [6666]), ("43", "idle", [])):
        fd_dir = tmp_path / pid / "fd"
        fd_dir.mkdir(parents=True)
        (tmp_path / pid / "comm").write_text(comm + "\n")
        for n, inode in enumerate(inodes):
            (fd_dir / str(n)).symlink_to(f"socket:[{inode}]")
        (fd_dir / "9").symlink_to("/dev/null")
    (tmp_path / "self").mkdir()
    found = agent.listening_sockets(str(tmp_path))
    assert [(s["proto"], s["port"], s["processes"], s["pids"]) for s in found] == [
        ("tcp", 22, ["nginx"], [41]), ("tcp", 8080, ["nginx"], [41]), ("udp", 53, ["dnsmasq"], [42])]  # fmt: skip


# --- client pieces -------------------------------------------------------------------------------------


@pytest.mark.parametrize("line", [b"OK 1073741824", b"OK 1024", b"ok", b"OK 5 extra"])
def test_connect_reply_is_parsed_loosely(line: bytes) -> None:
    parse_connect_reply(line, 1024)


@pytest.mark.parametrize("line", [b"", b"ERR no listener", b"KO 1"])
def test_connect_reply_refusal(line: bytes) -> None:
    with pytest.raises(AgentUnavailable, match="unexpected reply"):
        parse_connect_reply(line, 1024)


def test_pop_frame_rejects_bad_headers() -> None:
    for body in (b"nope\n", b'{"t":"x"}\n', b'{"ch":1}\n', b"no newline"):
        buf = bytearray(struct.pack(">I", len(body)) + body)
        with pytest.raises(AgentProtocolError, match="malformed frame header"):
            pop_frame(buf)
    with pytest.raises(ValueError, match="over the"):
        encode_frame({"t": "data", "ch": 1}, b"x" * MAX_FRAME)


def test_error_codes_map_to_banger_errors() -> None:
    cases = {"not_found": NotFound, "already_exists": AlreadyExists, "bad_request": BadRequest,
             "unknown_method": BadRequest, "bad_version": AgentVersionMismatch, "operation_failed": BangerError}
    for code, cls in cases.items():
        exc = _agent_error({"t": "error", "ch": 1, "code": code, "message": "m"}, "op")
        assert type(exc) is cls and exc.message == "guest agent: m"


def test_exit_status_returncode() -> None:
    assert ExitStatus(0).returncode == 0
    assert ExitStatus(42).returncode == 42
    assert ExitStatus(None, 9, timed_out=True).returncode == 137


def read_frame(sock: socket.socket, buf: bytearray) -> tuple[dict[str, object], bytes] | None:
    while (frame := pop_frame(buf)) is None:
        data = sock.recv(4096)
        if not data:
            return None
        buf += data
    return frame


def fake_agent(sock: socket.socket, reply: dict[str, object], junk: bytes) -> None:
    """Read the client's hello, then answer `junk` + `reply` (with the client's nonce) + a health result."""
    buf = bytearray()
    frame = read_frame(sock, buf)
    assert frame is not None
    hello, _ = frame
    assert list(hello)[:2] == ["t", "nonce"] and hello["t"] == "hello"
    answer = {"t": reply["t"], "nonce": hello["nonce"], **{k: v for k, v in reply.items() if k != "t"}}
    sock.sendall(junk + encode_frame(answer))
    frame = read_frame(sock, buf)
    if frame is None:
        return
    request, _ = frame
    sock.sendall(encode_frame({"t": "result", "ch": request["ch"], "ok": True, "uptime": 1.5, "hostname": "g",
                               "boot_id": "b", "agent_version": "t"}))


def test_hello_skips_stale_bytes_before_the_reply() -> None:
    host, guest = socket.socketpair()
    stale = (encode_frame({"t": "stdout", "ch": 4}, b"old output")[5:]
             + encode_frame({"t": "hello", "nonce": "someone-else", "ch": 0, "version": 1}))
    reply = {"t": "hello", "ch": 0, "version": 1, "agent_version": "9.9", "features": ["exec"]}
    thread = threading.Thread(target=fake_agent, args=(guest, reply, stale))
    thread.start()
    with AgentClient(host, name="socketpair") as client:
        info = client.hello(timeout=5)
        assert (info.protocol, info.agent_version, info.features) == (1, "9.9", ("exec",))
        assert client.health().uptime == 1.5
    thread.join()
    guest.close()


def test_hello_reports_a_newer_agent_as_a_version_mismatch() -> None:
    host, guest = socket.socketpair()
    reply = {"t": "hello", "ch": 0, "version": 2, "agent_version": "2.0", "features": []}
    thread = threading.Thread(target=fake_agent, args=(guest, reply, b""))
    thread.start()
    with AgentClient(host, name="socketpair") as client, pytest.raises(AgentVersionMismatch) as info:
        client.hello(timeout=5)
    assert info.value.message == "guest agent speaks protocol 2, banger speaks 1"
    thread.join()
    guest.close()


def test_hello_times_out_and_eof_is_unavailable() -> None:
    host, guest = socket.socketpair()
    with AgentClient(host, name="silent") as client, pytest.raises(AgentUnavailable, match="did not answer hello"):
        client.hello(timeout=0.2)
    guest.close()
    host, guest = socket.socketpair()
    guest.close()
    with AgentClient(host, name="gone") as client, pytest.raises(AgentUnavailable):
        client.hello(timeout=2)


def test_lost_connection_fails_pending_calls() -> None:
    host, guest = socket.socketpair()

    def agent_that_dies() -> None:
        buf = bytearray()
        frame = read_frame(guest, buf)
        assert frame is not None
        guest.sendall(encode_frame({"t": "hello", "nonce": frame[0]["nonce"], "ch": 0, "version": 1}))
        assert read_frame(guest, buf) is not None
        guest.close()  # dies with the health request pending

    thread = threading.Thread(target=agent_that_dies)
    thread.start()
    with AgentClient(host, name="dying") as client:
        client.hello(timeout=5)
        with pytest.raises(AgentUnavailable, match="lost the guest agent during health"):
            client.health(timeout=5)
        assert client.closed
    thread.join()


def test_protocol_doc_names_every_request() -> None:
    doc = (AGENT_SOURCE.parent / "agent_protocol.md").read_text()
    for op in agent.HANDLERS:
        assert f"`{op}`" in doc
    assert json.dumps(agent.PROTOCOL_VERSION) in doc.splitlines()[0]
