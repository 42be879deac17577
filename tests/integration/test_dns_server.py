"""The `.vm` DNS server over real sockets on 127.0.0.1: dnslib's client and, when installed, dig.

The server runs in its own event loop on a background thread, as in the daemon; the tests talk to it
with blocking clients from the main thread and change records through that loop.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from banger.errors import BangerError
from banger.network.dns import VmDnsServer

T = TypeVar("T")
HOST = "127.0.0.1"


class LoopThread:
    """An asyncio loop running forever on a thread; `call`/`wait` run work on it from the test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="dns-loop", daemon=True)
        self.thread.start()

    def wait(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        async def on_loop() -> T:
            return fn(*args)

        return self.wait(on_loop())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    try:
        yield lt
    finally:
        lt.stop()


@pytest.fixture
def server(loop: LoopThread) -> Iterator[VmDnsServer]:
    srv = VmDnsServer()
    loop.call(srv.set_record, "devbox", "172.16.0.2")
    loop.wait(srv.start(HOST, 0))
    try:
        yield srv
    finally:
        loop.wait(srv.close())


def query(port: int, name: str, qtype: str = "A", *, tcp: bool = False) -> DNSRecord:
    request = DNSRecord.question(name, qtype)
    reply = DNSRecord.parse(request.send(HOST, port, tcp=tcp, timeout=3))
    assert reply.header.id == request.header.id
    return reply


def a_records(reply: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]


def free_port_for_both() -> int:
    """A port free for UDP and TCP right now (the server's own port=0 logic, done by hand)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((HOST, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP")


# --- answers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_a_record(server: VmDnsServer, tcp: bool) -> None:
    assert server.port > 0
    assert server.address == f"{HOST}:{server.port}"
    reply = query(server.port, "devbox.vm", tcp=tcp)
    assert reply.header.rcode == RCODE.NOERROR
    assert reply.header.aa == 1
    assert a_records(reply) == ["172.16.0.2"]
    assert reply.rr[0].ttl == 5


def test_removed_record_is_nxdomain(server: VmDnsServer, loop: LoopThread) -> None:
    assert a_records(query(server.port, "devbox.vm")) == ["172.16.0.2"]
    assert loop.call(server.remove_record, "devbox") is True
    for tcp in (False, True):
        reply = query(server.port, "devbox.vm", tcp=tcp)
        assert reply.header.rcode == RCODE.NXDOMAIN
        assert [rr.rtype for rr in reply.auth] == [QTYPE.SOA]


def test_set_record_updates_the_answer(server: VmDnsServer, loop: LoopThread) -> None:
    loop.call(server.set_record, "devbox", "172.16.0.99")
    assert a_records(query(server.port, "devbox.vm")) == ["172.16.0.99"]


def test_replace_all(server: VmDnsServer, loop: LoopThread) -> None:
    loop.call(server.replace_all, {"web": "172.16.0.10", "db": "172.16.0.11"})
    assert query(server.port, "devbox.vm").header.rcode == RCODE.NXDOMAIN
    assert a_records(query(server.port, "web.vm")) == ["172.16.0.10"]
    assert a_records(query(server.port, "db.vm", tcp=True)) == ["172.16.0.11"]
    assert loop.call(server.records) == {"web": "172.16.0.10", "db": "172.16.0.11"}


def test_case_insensitive(server: VmDnsServer) -> None:
    for name in ("DEVBOX.VM", "DevBox.vm", "devbox.Vm."):
        reply = query(server.port, name)
        assert a_records(reply) == ["172.16.0.2"], name


def test_aaaa_is_nodata(server: VmDnsServer) -> None:
    reply = query(server.port, "devbox.vm", "AAAA")
    assert reply.header.rcode == RCODE.NOERROR
    assert reply.rr == []
    assert [rr.rtype for rr in reply.auth] == [QTYPE.SOA]


def test_apex_soa_and_ns(server: VmDnsServer) -> None:
    assert [rr.rtype for rr in query(server.port, "vm", "SOA").rr] == [QTYPE.SOA]
    assert [rr.rtype for rr in query(server.port, "vm", "NS", tcp=True).rr] == [QTYPE.NS]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_outside_zone_is_refused(server: VmDnsServer, tcp: bool) -> None:
    for name in ("example.com", "devbox.vm.example.com"):
        reply = query(server.port, name, tcp=tcp)
        assert reply.header.rcode == RCODE.REFUSED
        assert reply.rr == []


def test_each_query_is_logged_at_debug(server: VmDnsServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="banger.dns"):
        query(server.port, "nope.vm", "AAAA")
    entries = [r for r in caplog.records if r.name == "banger.dns" and r.getMessage().startswith("dns query")]
    assert [(r.__dict__["qname"], r.__dict__["qtype"], r.__dict__["rcode"]) for r in entries] == [
        ("nope.vm.", "AAAA", "NXDOMAIN")
    ]


# --- robustness ------------------------------------------------------------------------------------------


def test_garbage_udp_is_ignored_and_the_server_keeps_answering(server: VmDnsServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        for junk in (b"\x00", b"not a dns packet at all", bytes(range(256)) * 4):
            sock.sendto(junk, (HOST, server.port))
        with pytest.raises(TimeoutError):
            sock.recvfrom(4096)
    assert a_records(query(server.port, "devbox.vm")) == ["172.16.0.2"]


def test_tcp_garbage_closes_the_connection_and_the_server_keeps_serving(server: VmDnsServer) -> None:
    junk = b"this is not dns"
    with socket.create_connection((HOST, server.port), timeout=3) as sock:
        sock.sendall(struct.pack("!H", len(junk)) + junk)
        assert sock.recv(4096) == b""  # closed without an answer
    assert a_records(query(server.port, "devbox.vm", tcp=True)) == ["172.16.0.2"]


def test_tcp_connection_carries_several_queries(server: VmDnsServer) -> None:
    # RFC 7766: pipelined queries on one connection, answered in order.
    questions = [DNSRecord.question("devbox.vm"), DNSRecord.question("nope.vm")]
    with socket.create_connection((HOST, server.port), timeout=3) as sock:
        sock.sendall(b"".join(struct.pack("!H", len(q.pack())) + q.pack() for q in questions))
        stream = sock.makefile("rb")
        replies = []
        for _ in questions:
            (length,) = struct.unpack("!H", stream.read(2))
            replies.append(DNSRecord.parse(stream.read(length)))
    assert [r.header.id for r in replies] == [q.header.id for q in questions]
    assert [r.header.rcode for r in replies] == [RCODE.NOERROR, RCODE.NXDOMAIN]


def test_close_drops_open_tcp_connections(loop: LoopThread) -> None:
    srv = VmDnsServer()
    loop.wait(srv.start(HOST, 0))
    question = DNSRecord.question("x.vm").pack()
    with socket.create_connection((HOST, srv.port), timeout=3) as sock:
        # One full exchange proves the connection's handler runs; then leave it mid-frame.
        sock.sendall(struct.pack("!H", len(question)) + question)
        stream = sock.makefile("rb")
        (length,) = struct.unpack("!H", stream.read(2))
        assert DNSRecord.parse(stream.read(length)).header.rcode == RCODE.NXDOMAIN
        sock.sendall(b"\x00")
        loop.wait(srv.close())
        assert sock.recv(16) == b""  # the server hung up (without close() it would wait 10 s)


# --- binding ---------------------------------------------------------------------------------------------


def test_port_in_use_by_udp(loop: LoopThread) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((HOST, 0))
        port = taken.getsockname()[1]
        with pytest.raises(BangerError) as info:
            loop.wait(VmDnsServer().start(HOST, port))
    assert str(info.value) == f"DNS port {HOST}:{port} is in use (by another banger daemon?)"


def test_port_in_use_by_tcp_releases_the_udp_socket(loop: LoopThread) -> None:
    port = free_port_for_both()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((HOST, port))
        taken.listen()
        with pytest.raises(BangerError) as info:
            loop.wait(VmDnsServer().start(HOST, port))
        assert str(info.value) == f"DNS port {HOST}:{port} is in use (by another banger daemon?)"
        # The half-made server let go of its UDP socket.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, port))


def test_second_server_on_the_same_port(server: VmDnsServer, loop: LoopThread) -> None:
    with pytest.raises(
        BangerError, match=r"^DNS port 127\.0\.0\.1:\d+ is in use \(by another banger daemon\?\)$"
    ):
        loop.wait(VmDnsServer().start(HOST, server.port))
    assert a_records(query(server.port, "devbox.vm")) == ["172.16.0.2"]


def test_close_frees_the_port(loop: LoopThread) -> None:
    first = VmDnsServer()
    loop.wait(first.start(HOST, 0))
    port = first.port
    assert query(port, "devbox.vm").header.rcode == RCODE.NXDOMAIN
    loop.wait(first.close())
    assert not first.listening
    second = VmDnsServer()
    loop.call(second.set_record, "devbox", "172.16.0.5")
    loop.wait(second.start(HOST, port))
    try:
        assert second.port == port
        assert a_records(query(port, "devbox.vm")) == ["172.16.0.5"]
        assert a_records(query(port, "devbox.vm", tcp=True)) == ["172.16.0.5"]
    finally:
        loop.wait(second.close())


def test_start_twice_is_an_error(server: VmDnsServer, loop: LoopThread) -> None:
    with pytest.raises(BangerError, match="already listening"):
        loop.wait(server.start(HOST, 0))


# --- dig ----------------------------------------------------------------------------------------------------


@pytest.fixture
def dig() -> str:
    path = shutil.which("dig")
    if path is None:
        pytest.skip("dig is not installed (Debian package bind9-dnsutils; scripts/setup installs it)")
    return path


def run_dig(dig: str, port: int, *args: str) -> str:
    proc = subprocess.run(
        [dig, f"@{HOST}", "-p", str(port), "+tries=1", "+time=3", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return proc.stdout


@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_dig_a_record(dig: str, server: VmDnsServer, transport: str) -> None:
    assert run_dig(dig, server.port, transport, "+short", "devbox.vm").split() == ["172.16.0.2"]
    full = run_dig(dig, server.port, transport, "DevBox.VM")
    assert "status: NOERROR" in full
    assert " aa" in full.split("flags:")[1].split(";")[0]


def test_dig_nxdomain_nodata_refused(dig: str, server: VmDnsServer) -> None:
    assert "status: NXDOMAIN" in run_dig(dig, server.port, "nope.vm")
    nodata = run_dig(dig, server.port, "devbox.vm", "AAAA")
    assert "status: NOERROR" in nodata and "ANSWER: 0" in nodata and "AUTHORITY: 1" in nodata
    assert "status: REFUSED" in run_dig(dig, server.port, "example.com")
    assert "status: NOERROR" in run_dig(dig, server.port, "+noedns", "devbox.vm")
