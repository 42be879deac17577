"""The owner daemon's authoritative DNS server for the `.vm` zone (reference §7.5).

Every running VM gets `<name>.vm` → its guest IP. The server listens on UDP and TCP (RFC 7766 framing)
on the same port, by default 127.0.0.1:42069; systemd-resolved (or dnsmasq, see `resolver`) routes the
`~vm` domain to it. It answers only for its zone: anything else is REFUSED, so it can never be abused as
an open resolver.

`dnslib` is imported inside the functions that need it: this module is loaded by the daemon only, but the
validation helpers are cheap to import from anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

from banger import model
from banger.errors import BadRequest, BangerError
from banger.roothelper import validate

log = logging.getLogger("banger.dns")

ZONE: Final = "vm"
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 42069
RECORD_TTL: Final = 5
# Without EDNS a UDP answer must fit in 512 bytes; with it, the client's size up to the common safe
# maximum (no fragmentation on any sane path).
UDP_PLAIN_MAX: Final = 512
UDP_EDNS_MAX: Final = 1232
# The name servers / SOA live outside the zone so that no VM name can shadow them.
SOA_MNAME: Final = "localhost."
SOA_RNAME: Final = "hostmaster.vm."
TCP_IDLE_TIMEOUT: Final = 10.0
_PORT_ZERO_RETRIES: Final = 20


def validate_record_name(name: str) -> str:
    """A record name is a VM name: one DNS label of [a-z0-9-], 1..63, no leading or trailing '-'."""
    if not isinstance(name, str):
        raise BadRequest(f"dns record name must be a string, got {type(name).__name__}")
    return model.validate_vm_name(name)


def validate_record_ip(ip: str) -> str:
    """A unicast IPv4 address in canonical dotted form."""
    return validate.ipv4_address(ip, "vm ip")


def record_name(vm_name: str) -> str:
    """The DNS name a VM is reachable under: `<name>.vm`."""
    return f"{validate_record_name(vm_name)}.{ZONE}"


@dataclass(frozen=True)
class Zone:
    """A snapshot of the zone: bare VM names → IPv4, and the SOA serial (bumped on every change)."""

    records: Mapping[str, str]
    serial: int


def _soa_rr(zone: Zone) -> Any:
    from dnslib import QTYPE, RR, SOA

    # times: serial, refresh, retry, expire, minimum (the negative-caching TTL, RFC 2308).
    soa = SOA(SOA_MNAME, SOA_RNAME, (zone.serial, 60, 30, 600, RECORD_TTL))
    return RR(f"{ZONE}.", QTYPE.SOA, rdata=soa, ttl=RECORD_TTL)


def _udp_limit(request: Any) -> int:
    from dnslib import QTYPE

    for rr in request.ar:
        if rr.rtype == QTYPE.OPT:
            return max(UDP_PLAIN_MAX, min(int(rr.rclass), UDP_EDNS_MAX))
    return UDP_PLAIN_MAX


def _has_edns(request: Any) -> bool:
    from dnslib import QTYPE

    return any(rr.rtype == QTYPE.OPT for rr in request.ar)


def _truncated(reply: Any) -> Any:
    """The header and question only, with TC set: the client retries over TCP."""
    from dnslib import DNSHeader, DNSRecord

    header = DNSHeader(id=reply.header.id, bitmap=reply.header.bitmap, tc=1)
    return DNSRecord(header, questions=list(reply.questions))


def answer(zone: Zone, packet: bytes, *, max_size: int | None) -> bytes | None:
    """The wire-format response to one query, or None when the packet must be ignored.

    `max_size` is None for TCP (no limit below 64 KiB) or a cap on the UDP payload size; the real UDP
    limit is 512 bytes, or the client's EDNS size up to the cap, and a larger answer is replaced by a
    truncated one (TC set). Malformed packets and packets that are themselves responses get no
    answer at all (answering responses could start a loop between two servers).
    """
    from dnslib import EDNS0, NS, OPCODE, QTYPE, RCODE, RR, A, DNSRecord

    try:
        request = DNSRecord.parse(packet)
    except Exception:  # dnslib raises DNSError, but also struct/Unicode errors on garbage
        log.debug("dns: ignoring malformed packet", extra={"size": len(packet)})
        return None
    if request.header.qr:
        return None

    reply = request.reply(ra=0, aa=1)
    # The request's flags are copied; AD would claim DNSSEC validation we never do, TC is ours to set.
    reply.header.ad = 0
    reply.header.tc = 0
    reply.header.z = 0
    if _has_edns(request):
        reply.add_ar(EDNS0(udp_len=UDP_EDNS_MAX))
    qname_text, qtype_text = "", ""
    if request.header.opcode != OPCODE.QUERY:
        reply.header.aa = 0
        reply.header.rcode = RCODE.NOTIMP
    elif len(request.questions) != 1:
        reply.header.aa = 0
        reply.header.rcode = RCODE.FORMERR
    else:
        question = request.questions[0]
        qname, qtype = question.qname, question.qtype
        qname_text, qtype_text = str(qname), str(QTYPE.get(qtype))
        labels = [label.decode("ascii", "replace").lower() for label in qname.label]
        if not labels or labels[-1] != ZONE:
            reply.header.aa = 0
            reply.header.rcode = RCODE.REFUSED
        elif len(labels) == 1:  # the apex `vm.`
            if qtype in (QTYPE.SOA, QTYPE.ANY):
                reply.add_answer(_soa_rr(zone))
            if qtype in (QTYPE.NS, QTYPE.ANY):
                reply.add_answer(RR(qname, QTYPE.NS, rdata=NS(SOA_MNAME), ttl=RECORD_TTL))
            if not reply.rr:
                reply.add_auth(_soa_rr(zone))
        else:
            ip = zone.records.get(labels[0]) if len(labels) == 2 else None
            if ip is None:
                reply.header.rcode = RCODE.NXDOMAIN
                reply.add_auth(_soa_rr(zone))
            elif qtype in (QTYPE.A, QTYPE.ANY):
                # The owner name is echoed as asked (0x20-randomising resolvers compare case).
                reply.add_answer(RR(qname, QTYPE.A, rdata=A(ip), ttl=RECORD_TTL))
            else:  # NODATA: the name exists, just not with this type
                reply.add_auth(_soa_rr(zone))

    data: bytes = reply.pack()
    if max_size is not None:
        limit = min(max_size, _udp_limit(request))
        if len(data) > limit:
            data = _truncated(reply).pack()
    log.debug(
        "dns query %s %s -> %s",
        qname_text or "-",
        qtype_text or "-",
        RCODE.get(reply.header.rcode),
        extra={"qname": qname_text, "qtype": qtype_text, "rcode": str(RCODE.get(reply.header.rcode))},
    )
    return data


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: VmDnsServer) -> None:
        self._server = server
        self.transport: asyncio.DatagramTransport | None = None
        # The socket is closed only when asyncio calls connection_lost, a loop iteration after close().
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # asyncio's contract for datagrams

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            response = answer(self._server.zone, data, max_size=UDP_EDNS_MAX)
        except Exception:  # one bad query must never take the listener down
            log.warning("dns: failed to answer a UDP query", exc_info=True)
            return
        if response is not None and self.transport is not None:
            self.transport.sendto(response, addr)

    def sockname(self) -> tuple[str, int]:
        if self.transport is None:
            raise BangerError("DNS UDP socket is not open")
        host, port = self.transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            await self.closed

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a client that went away; nothing to do.
        log.debug("dns: UDP error: %s", exc)


class VmDnsServer:
    """Authoritative `.vm` server on UDP + TCP; records are changed from the daemon's event loop."""

    def __init__(self) -> None:
        self._records: dict[str, str] = {}
        self._serial = int(time.time()) & 0xFFFFFFFF
        self._zone = Zone({}, self._serial)
        self._udp: _UdpProtocol | None = None
        self._tcp: asyncio.Server | None = None
        self._conns: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        # A connection accepted just before close() gets its handler task a few loop turns later; the
        # flag tells that handler to hang up instead of serving a closed server.
        self._closing = False
        self._host = DEFAULT_HOST
        self._port = 0

    # --- records ------------------------------------------------------------------------------------

    @property
    def zone(self) -> Zone:
        return self._zone

    def _publish(self) -> None:
        self._serial = (self._serial + 1) & 0xFFFFFFFF
        self._zone = Zone(dict(self._records), self._serial)

    def set_record(self, name: str, ip: str) -> None:
        """Point `<name>.vm` at `ip` (replacing any previous address)."""
        name = validate_record_name(name)
        ip = validate_record_ip(ip)
        if self._records.get(name) != ip:
            self._records[name] = ip
            self._publish()
            log.debug("dns record set", extra={"record": f"{name}.{ZONE}", "ip": ip})

    def remove_record(self, name: str) -> bool:
        """Drop `<name>.vm`; False if there was no such record (stop/delete may run twice)."""
        if self._records.pop(name, None) is None:
            return False
        self._publish()
        log.debug("dns record removed", extra={"record": f"{name}.{ZONE}"})
        return True

    def replace_all(self, records: Mapping[str, str]) -> None:
        """Swap in a whole new record set (daemon start / reconcile); nothing changes if one is bad."""
        fresh = {validate_record_name(name): validate_record_ip(ip) for name, ip in records.items()}
        self._records = fresh
        self._publish()
        log.debug("dns records replaced", extra={"count": len(fresh)})

    def records(self) -> dict[str, str]:
        """A copy of the records: bare VM name → IPv4."""
        return dict(self._records)

    # --- listener -------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (the real one when started with port=0); 0 before start."""
        return self._port

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    @property
    def listening(self) -> bool:
        return self._udp is not None

    async def start(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
        """Bind UDP and TCP on `host:port`; port 0 picks a free port that is free for both."""
        if self._udp is not None:
            raise BangerError(f"DNS server already listening on {self.address}")
        self._closing = False
        attempts = _PORT_ZERO_RETRIES if port == 0 else 1
        for attempt in range(1, attempts + 1):
            udp = await self._bind_udp(host, port)
            bound = int(udp.sockname()[1])
            try:
                tcp = await asyncio.start_server(self._handle_tcp, host, bound)
            except OSError as exc:
                await udp.close()
                # With port 0 the kernel picked a UDP port whose TCP twin is taken; try another.
                if exc.errno == errno.EADDRINUSE and attempt < attempts:
                    continue
                raise _bind_error(host, port, exc) from None
            self._udp, self._tcp = udp, tcp
            self._host, self._port = host, bound
            log.info("dns listening", extra={"address": self.address, "zone": ZONE})
            return

    async def _bind_udp(self, host: str, port: int) -> _UdpProtocol:
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(host, port)
            )
        except OSError as exc:
            raise _bind_error(host, port, exc) from None
        return protocol

    async def close(self) -> None:
        """Stop listening and drop open TCP connections; the port is free when this returns."""
        udp, tcp, self._udp, self._tcp = self._udp, self._tcp, None, None
        self._closing = True
        if udp is not None:
            await udp.close()
        if tcp is not None:
            tcp.close()
            await tcp.wait_closed()
        for writer in list(self._conns.values()):
            writer.close()
        handlers = list(self._conns)
        if handlers:
            # Closing a writer ends its handler's pending read; wait so nothing outlives the server.
            await asyncio.wait(handlers, timeout=5)
        if udp is not None or tcp is not None:
            log.info("dns stopped", extra={"address": self.address})

    async def _handle_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns[task] = writer
        try:
            if self._closing:
                return
            # RFC 7766: a client may send several queries on one connection; idle ones are closed.
            while True:
                header = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT)
                (length,) = struct.unpack("!H", header)
                packet = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE_TIMEOUT)
                response = answer(self._zone, packet, max_size=None)
                if response is None:  # malformed: the framing can no longer be trusted
                    break
                writer.write(struct.pack("!H", len(response)) + response)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        except Exception:
            log.warning("dns: failed to answer a TCP query", exc_info=True)
        finally:
            if task is not None:
                self._conns.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _bind_error(host: str, port: int, exc: OSError) -> BangerError:
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return BangerError(f"DNS port {where} is in use (by another banger daemon?)")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return BangerError(f"DNS port {where} needs privileges to bind (use a port above 1023)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return BangerError(f"DNS address {where} is not an address of this host")
    return BangerError(f"cannot listen for DNS on {where}: {exc.strerror or exc}")
