"""`.vm` resolver wiring: planning, argument checks, detection of a running resolved, the absent path.

The wiring against a real systemd-resolved is tests/integration/test_resolved.py.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from banger.errors import BadRequest, BangerError
from banger.network import resolver

# --- planning --------------------------------------------------------------------------------------------


def test_resolvectl_argv_routes_vm_domain_on_the_bridge() -> None:
    # default-route off and the domain before the server: the link is never a catch-all route.
    assert resolver.resolvectl_argv("br-fc") == [
        ["resolvectl", "default-route", "br-fc", "false"],
        ["resolvectl", "domain", "br-fc", "~vm"],
        ["resolvectl", "dns", "br-fc", "127.0.0.1:42069"],
    ]
    assert resolver.resolvectl_argv("br-fc-test", "127.0.0.1:5353")[-1] == [
        "resolvectl", "dns", "br-fc-test", "127.0.0.1:5353",
    ]  # fmt: skip
    assert resolver.resolvectl_revert_argv("br-fc") == [["resolvectl", "revert", "br-fc"]]


@pytest.mark.parametrize("bridge", ["eth0", "docker0", "br-fc-", "br-fc-x;rm", "br-fc-" + "a" * 20, ""])
def test_resolvectl_argv_rejects_foreign_bridges(bridge: str) -> None:
    with pytest.raises(BadRequest, match="bridge name"):
        resolver.resolvectl_argv(bridge)
    with pytest.raises(BadRequest, match="bridge name"):
        resolver.resolvectl_revert_argv(bridge)


def test_dns_address_accepts_host_port() -> None:
    # The form the original helper wrongly rejected for eight releases (reference §7.5, v0.1.8).
    assert resolver.dns_address("127.0.0.1:42069") == "127.0.0.1:42069"
    assert resolver.dns_address("127.0.0.1:053") == "127.0.0.1:53"
    assert resolver.loopback_dns_address("127.0.0.2:42069") == "127.0.0.2:42069"


@pytest.mark.parametrize(
    "addr",
    [
        "127.0.0.1",
        "127.0.0.1:",
        ":42069",
        "localhost:42069",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:x",
        "[::1]:42069",
        "127.0.0.1:42069 ",
        "127.0.0.1:٣",
    ],
)
def test_dns_address_rejects(addr: str) -> None:
    with pytest.raises(BadRequest, match="dns address"):
        resolver.dns_address(addr)


@pytest.mark.parametrize("addr", ["8.8.8.8:53", "10.0.0.1:42069", "0.0.0.0:42069"])
def test_wiring_refuses_a_dns_server_off_loopback(addr: str) -> None:
    with pytest.raises(BadRequest, match=r"not allowed \(must be on loopback"):
        resolver.resolvectl_argv("br-fc", addr)
    with pytest.raises(BadRequest, match="must be on loopback"):
        resolver.wire_request({"bridge": "br-fc", "dns_addr": addr})


def test_manual_instructions() -> None:
    lines = resolver.manual_instructions(42069)
    text = "\n".join(lines)
    assert "server=/vm/127.0.0.1#42069" in text
    assert "NetworkManager" in text
    assert "/etc/resolv.conf is not enough" in text
    assert "dig @127.0.0.1 -p 42069 <name>.vm" in text
    assert all("\n" not in line for line in lines)
    assert "#5353" in "\n".join(resolver.manual_instructions(5353))
    for bad in (0, 70000):
        with pytest.raises(BadRequest, match="dns port"):
            resolver.manual_instructions(bad)


# --- request parsing (priv.resolver_wire / priv.resolver_unwire) ---------------------------------------------


def test_wire_request_defaults_to_bangers_dns_server() -> None:
    assert resolver.wire_request({"bridge": "br-fc"}) == resolver.WireRequest("br-fc", "127.0.0.1:42069")
    assert resolver.wire_request({"bridge": "br-fc-a", "dns_addr": "127.0.0.1:0053"}) == resolver.WireRequest(
        "br-fc-a", "127.0.0.1:53"
    )
    assert resolver.unwire_request({"bridge": "br-fc-a"}) == "br-fc-a"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, 'priv.resolver_wire needs param "bridge"'),
        ({"bridge": None}, 'priv.resolver_wire needs param "bridge"'),
        ({"bridge": "eth0"}, 'bridge name "eth0" is not allowed'),
        ({"bridge": 7}, "bridge name must be a string, got 7"),
        ({"bridge": "br-fc", "dns": "127.0.0.1:53"}, 'does not take param "dns" (allowed: bridge, dns_addr)'),
        ({"bridge": "br-fc", "dns_addr": 42069}, "dns address must be a string, got int"),
        ({"bridge": "br-fc", "dns_addr": "127.0.0.1"}, "must be <ipv4>:<port>"),
    ],
)
def test_wire_request_rejects(params: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest) as info:
        resolver.wire_request(params)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unwire_request_rejects() -> None:
    with pytest.raises(BadRequest, match='bridge name "lo" is not allowed'):
        resolver.unwire_request({"bridge": "lo"})
    with pytest.raises(BadRequest, match=r'does not take param "dns_addr" \(allowed: bridge\)'):
        resolver.unwire_request({"bridge": "br-fc", "dns_addr": "127.0.0.1:42069"})


# --- detection ----------------------------------------------------------------------------------------------


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "io.systemd.Resolve"


@pytest.fixture
def listening(sock_path: Path) -> Iterator[Path]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(sock_path))
        sock.listen(4)
        yield sock_path


def test_resolved_active_when_something_listens(listening: Path) -> None:
    assert resolver.resolved_active(listening) is True


def test_resolved_not_active_for_a_leftover_socket_file(sock_path: Path) -> None:
    # What a stopped resolved leaves behind: the socket file, nobody listening.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(sock_path))
    assert sock_path.is_socket()
    assert resolver.resolved_active(sock_path) is False


def test_resolved_not_active_without_a_socket(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("")
    assert resolver.resolved_active(tmp_path / "absent") is False
    assert resolver.resolved_active(plain) is False
    assert resolver.resolved_active(tmp_path) is False


# --- the absent path: fine, not an error -----------------------------------------------------------------------


def test_wire_and_unwire_without_resolved_report_not_wired(sock_path: Path) -> None:
    # No resolved (and no such bridge): nothing is run, nothing fails, the status says why.
    wired = asyncio.run(resolver.resolver_wire(resolver.WireRequest("br-fc-zz", "127.0.0.1:42069"),
                                               socket_path=sock_path))
    assert wired == {"bridge": "br-fc-zz", "dns_addr": "127.0.0.1:42069", "domain": "~vm", "wired": False,
                     "status": "not wired: systemd-resolved is not running"}
    unwired = asyncio.run(resolver.resolver_unwire("br-fc-zz", socket_path=sock_path))
    assert unwired == {"bridge": "br-fc-zz", "wired": False, "status": "not wired: systemd-resolved is not running"}


def test_handlers_validate_before_anything_else() -> None:
    with pytest.raises(BadRequest, match='bridge name "eth0" is not allowed'):
        asyncio.run(resolver.handle_resolver_wire(None, None, {"bridge": "eth0"}))
    with pytest.raises(BadRequest, match='does not take param "x"'):
        asyncio.run(resolver.handle_resolver_unwire(None, None, {"bridge": "br-fc", "x": 1}))


# --- reading back ---------------------------------------------------------------------------------------------

# Verbatim `resolvectl dns br-fc-test` / `resolvectl domain br-fc-test` output of systemd 252.
DNS_OUT = "Link 2 (br-fc-test): 127.0.0.1:42069\n"
DOMAIN_OUT = "Link 2 (br-fc-test): ~vm\n"


def test_parse_link_line() -> None:
    assert resolver.parse_link_line(DNS_OUT, "br-fc-test") == ("127.0.0.1:42069",)
    assert resolver.parse_link_line("Link 2 (br-fc-test):\n", "br-fc-test") == ()
    # br-fc must not match the line of br-fc-test.
    with pytest.raises(BangerError, match="no line for link br-fc"):
        resolver.parse_link_line(DNS_OUT, "br-fc")


def test_link_routing_routes_vm() -> None:
    routing = resolver.LinkRouting(resolver.parse_link_line(DNS_OUT, "br-fc-test"),
                                   resolver.parse_link_line(DOMAIN_OUT, "br-fc-test"))
    assert routing.routes_vm() is True
    assert routing.routes_vm("127.0.0.1:5353") is False
    assert resolver.LinkRouting(("127.0.0.1:42069",), ()).routes_vm() is False
    assert resolver.LinkRouting(("127.0.0.1",), ("~vm",)).routes_vm("127.0.0.1:53") is True
