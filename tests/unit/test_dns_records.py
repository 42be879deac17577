"""The `.vm` zone's pure parts: record validation and the answer function (resolver: test_resolver.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from dnslib import EDNS0, OPCODE, QTYPE, RCODE, DNSRecord

from banger.errors import BadRequest
from banger.network import dns

# --- record names and addresses -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "devbox", "web-1", "0", "x" * 63, "a-b-c"])
def test_valid_record_names(name: str) -> None:
    assert dns.validate_record_name(name) == name
    assert dns.record_name(name) == f"{name}.vm"


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "required"),
        ("x" * 64, "max is 63"),
        ("-web", "cannot start or end with '-'"),
        ("web-", "cannot start or end with '-'"),
        ("Web", "invalid character 'W'"),
        ("web.vm", "invalid character '.'"),
        ("we_b", "invalid character '_'"),
        ("wéb", "invalid character 'é'"),
    ],
)
def test_invalid_record_names(name: str, fragment: str) -> None:
    with pytest.raises(BadRequest, match=fragment):
        dns.validate_record_name(name)


@pytest.mark.parametrize("ip", ["1.2.3", "172.16.0.300", "::1", "", "172.16.0.2/24", "127.0.0.1", "0.0.0.0"])
def test_set_record_rejects_bad_ipv4(ip: str) -> None:
    server = dns.VmDnsServer()
    with pytest.raises(BadRequest, match="vm ip"):
        server.set_record("devbox", ip)
    assert server.records() == {}


def test_record_bookkeeping_and_serial() -> None:
    server = dns.VmDnsServer()
    serial0 = server.zone.serial
    server.set_record("devbox", "172.16.0.2")
    server.set_record("web", "172.16.0.3")
    assert server.records() == {"devbox": "172.16.0.2", "web": "172.16.0.3"}
    serial1 = server.zone.serial
    assert serial1 > serial0
    server.set_record("web", "172.16.0.3")  # unchanged: no new serial
    assert server.zone.serial == serial1
    assert server.remove_record("web") is True
    assert server.remove_record("web") is False
    assert server.records() == {"devbox": "172.16.0.2"}
    # records() is a copy, not a window into the server.
    server.records()["evil"] = "1.1.1.1"
    assert "evil" not in server.zone.records


def test_replace_all_is_all_or_nothing() -> None:
    server = dns.VmDnsServer()
    server.set_record("old", "172.16.0.9")
    with pytest.raises(BadRequest, match="BAD"):
        server.replace_all({"fine": "172.16.0.2", "BAD": "172.16.0.3"})
    assert server.records() == {"old": "172.16.0.9"}
    server.replace_all({"a": "172.16.0.2", "b": "172.16.0.3"})
    assert server.records() == {"a": "172.16.0.2", "b": "172.16.0.3"}
    assert dict(server.zone.records) == server.records()


# --- the answer function --------------------------------------------------------------------------------

ZONE = dns.Zone({"devbox": "172.16.0.2"}, serial=7)


def ask(name: str, qtype: str = "A", *, max_size: int | None = None, zone: dns.Zone = ZONE) -> DNSRecord:
    query = DNSRecord.question(name, qtype)
    data = dns.answer(zone, query.pack(), max_size=max_size)
    assert data is not None
    reply = DNSRecord.parse(data)
    assert reply.header.id == query.header.id
    assert reply.header.qr == 1
    return reply


def test_a_record_answer() -> None:
    reply = ask("devbox.vm")
    assert reply.header.rcode == RCODE.NOERROR
    assert reply.header.aa == 1
    assert reply.header.ra == 0
    assert [(str(rr.rname), rr.rtype, str(rr.rdata), rr.ttl) for rr in reply.rr] == [
        ("devbox.vm.", QTYPE.A, "172.16.0.2", 5)
    ]


def test_names_are_case_insensitive_and_echoed_as_asked() -> None:
    reply = ask("DevBox.VM")
    assert reply.header.rcode == RCODE.NOERROR
    assert str(reply.rr[0].rdata) == "172.16.0.2"
    assert str(reply.rr[0].rname) == "DevBox.VM."


def test_other_type_of_known_name_is_nodata_with_soa() -> None:
    for qtype in ("AAAA", "MX", "TXT"):
        reply = ask("devbox.vm", qtype)
        assert reply.header.rcode == RCODE.NOERROR
        assert reply.rr == []
        assert [rr.rtype for rr in reply.auth] == [QTYPE.SOA]
        soa = reply.auth[0].rdata
        assert soa.times[0] == 7  # the zone serial
        assert soa.times[4] == dns.RECORD_TTL  # negative-caching TTL


@pytest.mark.parametrize("name", ["nope.vm", "sub.devbox.vm", "a.b.c.vm"])
def test_unknown_name_is_nxdomain_with_soa(name: str) -> None:
    reply = ask(name)
    assert reply.header.rcode == RCODE.NXDOMAIN
    assert reply.header.aa == 1
    assert reply.rr == []
    assert [str(rr.rname) for rr in reply.auth] == ["vm."]


def test_apex_soa_and_ns() -> None:
    soa = ask("vm", "SOA")
    assert soa.header.rcode == RCODE.NOERROR
    assert [rr.rtype for rr in soa.rr] == [QTYPE.SOA]
    assert str(soa.rr[0].rdata.mname) == dns.SOA_MNAME
    ns = ask("VM.", "NS")
    assert [(rr.rtype, str(rr.rdata)) for rr in ns.rr] == [(QTYPE.NS, dns.SOA_MNAME)]
    a = ask("vm", "A")
    assert a.header.rcode == RCODE.NOERROR
    assert a.rr == []
    assert [rr.rtype for rr in a.auth] == [QTYPE.SOA]


@pytest.mark.parametrize("name", ["example.com", "devbox.vm.example.com", "vmx", "devbox.notvm", "."])
def test_outside_the_zone_is_refused(name: str) -> None:
    reply = ask(name)
    assert reply.header.rcode == RCODE.REFUSED
    assert reply.header.aa == 0
    assert reply.rr == [] and reply.auth == []


def test_malformed_packets_and_responses_get_no_answer() -> None:
    for packet in (b"", b"\x00", b"garbage that is not dns", bytes(range(256)), b"\xff" * 12 + b"\x07"):
        assert dns.answer(ZONE, packet, max_size=None) is None
    a_response = DNSRecord.question("devbox.vm").reply()
    assert dns.answer(ZONE, a_response.pack(), max_size=None) is None


def test_non_query_opcode_is_notimp() -> None:
    query = DNSRecord.question("devbox.vm")
    query.header.opcode = OPCODE.UPDATE
    data = dns.answer(ZONE, query.pack(), max_size=None)
    assert data is not None
    assert DNSRecord.parse(data).header.rcode == RCODE.NOTIMP


def test_copied_request_flags_are_cleared() -> None:
    query = DNSRecord.question("devbox.vm")
    query.header.ad = 1
    query.header.tc = 1
    data = dns.answer(ZONE, query.pack(), max_size=None)
    assert data is not None
    header = DNSRecord.parse(data).header
    assert (header.ad, header.tc, header.rd) == (0, 0, 1)


def test_oversized_udp_answer_is_truncated() -> None:
    full = ask("devbox.vm")
    assert len(full.pack()) < dns.UDP_PLAIN_MAX
    # No A answer gets near 512 bytes, so squeeze the cap to exercise the path.
    truncated = ask("devbox.vm", max_size=30)
    assert truncated.header.tc == 1
    assert truncated.rr == []
    assert [str(q.qname) for q in truncated.questions] == ["devbox.vm."]
    # TCP (max_size None) is never truncated.
    assert ask("devbox.vm").header.tc == 0


def test_udp_limit_is_512_without_edns_and_the_clients_size_with_it() -> None:
    plain = DNSRecord.question("devbox.vm")
    assert dns._udp_limit(plain) == 512
    edns = DNSRecord.question("devbox.vm")
    edns.add_ar(EDNS0(udp_len=4096))
    assert dns._udp_limit(edns) == dns.UDP_EDNS_MAX
    data = dns.answer(ZONE, edns.pack(), max_size=dns.UDP_EDNS_MAX)
    assert data is not None
    assert [rr.rtype for rr in DNSRecord.parse(data).ar] == [QTYPE.OPT]


def test_importing_the_modules_does_not_load_dnslib() -> None:
    # The CLI imports nothing heavy at start-up; the DNS code must not drag dnslib in on import.
    code = (
        "import sys, banger.cli, banger.network.dns, banger.network.resolver; print('dnslib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
