"""Outbound NAT for real: a real bangerd-root writes real nftables rules, real TCP goes through them.

Everything happens in network namespaces the test creates (the helper itself runs inside the "host"
namespace through `ip netns exec`, so its nftables table, its `ip_forward` and its default route are
that namespace's); all of them are deleted in finalizers. Nothing leaves the machine.

    guest ns                     host ns (bangerd-root)                          upstream ns ("internet")
    eth0 172.30.0.2/24 ── veth ── vg0 ─┐                                        TCP server 192.0.2.2:8080
         172.30.0.3/24 (2nd VM)        ├─ br-fc-t<rand> 172.30.0.1/24            that answers with the
                  tap-t<rand> (tap) ───┘   wan0 192.0.2.1/24 ── veth ── eth0    source address it sees
                                           default via 192.0.2.2 (the uplink)   (no route back to 172.30/24)

The tap/veth question. The helper's validation stays strict: `tap` must be a real tap (tun device in
tap mode) attached to a banger bridge, exactly what production VMs have. The guest's packets, though,
come from a veth whose host end is just another port of the same bridge, not from the tap: a
namespace cannot sit behind a tap without a userspace process shuttling frames, and nothing the rules
do depends on which bridge port a packet came from. The masquerade rule matches `ip saddr <guest_ip>
oifname <uplink>`, and routed traffic's input interface is the bridge whichever port it entered by.
So the tap in these tests is the VM's identity (validated, recorded in the forward rules and
reported by priv.nat_list) and the veth carries the traffic. The production rule path is unchanged
and no test-only exception exists in the helper.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from banger.roothelper.client import HelperClient
from tests.integration import test_roothelper as rh

pytestmark = rh.pytestmark

# The real helper in a throwaway "host" namespace, as tests/integration/test_roothelper.py starts it.
netns = rh.netns
base = rh.base
helper = rh.helper

UPSTREAM_IP = "192.0.2.2"
UPLINK_IP = "192.0.2.1"
GUEST_A = "172.30.0.2"
GUEST_B = "172.30.0.3"
VM_A = "a1" * 16  # a full 32-digit banger id
VM_B = "b2b2b2b2"  # the short form the helper also accepts
PORT = 8080

SERVER = r"""
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(16)
print("ready", flush=True)
while True:
    conn, peer = srv.accept()
    with conn:
        conn.sendall(peer[0].encode())
"""

CLIENT = r"""
import socket, sys
s = socket.socket()
s.settimeout(float(sys.argv[4]))
s.bind((sys.argv[1], 0))
try:
    s.connect((sys.argv[2], int(sys.argv[3])))
    print("seen as " + s.recv(64).decode())
except OSError as exc:
    print(f"failed: {exc}")
"""


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


@dataclass
class Net:
    helper: rh.Helper
    guest: str
    upstream: str
    bridge: str
    tap: str

    @property
    def host(self) -> str:
        return self.helper.ns

    def connect(self, source: str, timeout: float = 2.0) -> str:
        """What the upstream server says it saw, from a TCP connection out of the guest namespace."""
        return sh("ip", "netns", "exec", self.guest, sys.executable, "-c", CLIENT, source, UPSTREAM_IP, str(PORT),
                  str(timeout)).strip()

    def rules(self, ns: str | None = None) -> list[dict[str, Any]]:
        """Every rule in the namespace's whole ruleset (all tables), as nft lists it."""
        out = sh("ip", "netns", "exec", ns or self.host, "nft", "-j", "list", "ruleset")
        return [item["rule"] for item in json.loads(out)["nftables"] if "rule" in item]

    def comments(self) -> list[str]:
        return sorted(rule.get("comment", "") for rule in self.rules())

    def ruleset_text(self) -> str:
        return sh("ip", "netns", "exec", self.host, "nft", "list", "ruleset")

    def ip_forward(self) -> str:
        return sh("ip", "netns", "exec", self.host, "cat", "/proc/sys/net/ipv4/ip_forward").strip()


@pytest.fixture
def net(helper: rh.Helper) -> Iterator[Net]:
    suffix = secrets.token_hex(2)
    guest, upstream = f"banger-tg-{suffix}", f"banger-tu-{suffix}"
    host = helper.ns
    made: list[str] = []
    server: subprocess.Popen[str] | None = None
    try:
        for ns in (guest, upstream):
            sh("ip", "netns", "add", ns)
            made.append(ns)
        for ns in (host, guest, upstream):
            sh("ip", "-n", ns, "link", "set", "lo", "up")

        # The "internet": the host's uplink wan0, default route through it, no route back to the guests.
        sh("ip", "-n", host, "link", "add", "wan0", "type", "veth", "peer", "name", "eth0", "netns", upstream)
        sh("ip", "-n", upstream, "addr", "add", f"{UPSTREAM_IP}/24", "dev", "eth0")
        sh("ip", "-n", upstream, "link", "set", "eth0", "up")
        sh("ip", "-n", host, "addr", "add", f"{UPLINK_IP}/24", "dev", "wan0")
        sh("ip", "-n", host, "link", "set", "wan0", "up")
        sh("ip", "-n", host, "route", "add", "default", "via", UPSTREAM_IP, "dev", "wan0")

        # banger's side, made by the helper as the daemon would.
        bridge, tap = f"br-fc-t{suffix}", f"tap-t{suffix}"
        helper.call("priv.ensure_bridge", {"name": bridge, "ip": "172.30.0.1", "prefix": 24})
        helper.call("priv.create_tap", {"name": tap, "bridge": bridge})

        # The guest: a veth port on the same bridge (see the module docstring), two addresses for two VMs.
        sh("ip", "-n", host, "link", "add", "vg0", "type", "veth", "peer", "name", "eth0", "netns", guest)
        sh("ip", "-n", host, "link", "set", "vg0", "master", bridge, "up")
        for addr in (GUEST_A, GUEST_B):
            sh("ip", "-n", guest, "addr", "add", f"{addr}/24", "dev", "eth0")
        sh("ip", "-n", guest, "link", "set", "eth0", "up")
        sh("ip", "-n", guest, "route", "add", "default", "via", "172.30.0.1")

        server = subprocess.Popen(
            ["ip", "netns", "exec", upstream, sys.executable, "-c", SERVER, UPSTREAM_IP, str(PORT)],
            stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        yield Net(helper, guest, upstream, bridge, tap)
    finally:
        if server is not None:
            server.kill()
            server.wait(10)
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False)


def vm_rules(net: Net, vm_id: str) -> list[str]:
    """The VM's rules as nft prints them (no handles or counters)."""
    tag = f'comment "banger-vm:{vm_id}"'
    return [line.strip() for line in net.ruleset_text().splitlines() if tag in line]


def expected_rules(vm_id: str, guest_ip: str, tap: str, uplink: str = "wan0") -> list[str]:
    tag = f'comment "banger-vm:{vm_id}"'
    return [
        f'ip saddr {guest_ip} oifname "{uplink}" counter packets 0 bytes 0 masquerade {tag}',
        f'iifname "{tap}" oifname "{uplink}" counter packets 0 bytes 0 accept {tag}',
        f'iifname "{uplink}" oifname "{tap}" ct state established,related counter packets 0 bytes 0 accept {tag}',
    ]


def without_counters(lines: list[str]) -> list[str]:
    import re

    return [re.sub(r"counter packets \d+ bytes \d+", "counter packets 0 bytes 0", line) for line in lines]


# --- the traffic --------------------------------------------------------------------------------------


def test_nat_add_masquerades_and_nat_remove_stops_it(net: Net) -> None:
    # A fresh host: nothing forwarded, no banger table.
    assert net.ip_forward() == "0"
    assert net.rules() == []
    assert net.connect(GUEST_A).startswith("failed:")

    added = net.helper.call("priv.nat_add", {"vm_id": VM_A, "guest_ip": GUEST_A, "tap": net.tap})
    assert added == {"vm_id": VM_A, "guest_ip": GUEST_A, "tap": net.tap, "uplink": "wan0",
                     "ip_forward_enabled": True}
    assert net.ip_forward() == "1"
    assert vm_rules(net, VM_A) == expected_rules(VM_A, GUEST_A, net.tap)
    # The upstream server sees the uplink's address, not the guest's: masqueraded.
    assert net.connect(GUEST_A) == f"seen as {UPLINK_IP}"
    (masquerade,) = [r for r in net.rules() if r["chain"] == "postrouting"]
    assert masquerade["expr"][2]["counter"]["packets"] >= 1

    # Idempotent: a second add replaces the set instead of adding another.
    again = net.helper.call("priv.nat_add", {"vm_id": VM_A, "guest_ip": GUEST_A, "tap": net.tap, "uplink": "wan0"})
    assert again["ip_forward_enabled"] is False
    assert vm_rules(net, VM_A) == expected_rules(VM_A, GUEST_A, net.tap)
    assert net.comments() == [f"banger-vm:{VM_A}"] * 3
    assert net.connect(GUEST_A) == f"seen as {UPLINK_IP}"

    assert net.helper.call("priv.nat_remove", {"vm_id": VM_A}) == {"vm_id": VM_A, "removed": 3}
    assert net.rules() == []  # the last VM's removal takes the table with it
    assert net.ip_forward() == "1"  # deliberately left on, so the failure below is the rules' doing
    assert net.connect(GUEST_A).startswith("failed:")
    assert net.helper.call("priv.nat_remove", {"vm_id": VM_A}) == {"vm_id": VM_A, "removed": 0}

    logged = [line for line in net.helper.log_lines() if line["msg"] in ("nat enabled", "nat removed")]
    assert [(line["msg"], line["vm_id"]) for line in logged] == [
        ("nat enabled", VM_A), ("nat enabled", VM_A), ("nat removed", VM_A)]
    assert logged[1]["replaced_rules"] == 3


def test_two_vms_removing_one_leaves_the_other(net: Net) -> None:
    hc = HelperClient(net.helper.socket, system=False)
    tap_b = net.tap + "b"
    net.helper.call("priv.create_tap", {"name": tap_b, "bridge": net.bridge})

    async def setup() -> list[dict[str, Any]]:
        await hc.nat_add(VM_A, GUEST_A, net.tap)
        await hc.nat_add(VM_B, GUEST_B, tap_b, "wan0")
        return await hc.nat_list()

    assert asyncio.run(setup()) == [
        {"vm_id": VM_A, "guest_ip": GUEST_A, "tap": net.tap, "uplink": "wan0"},
        {"vm_id": VM_B, "guest_ip": GUEST_B, "tap": tap_b, "uplink": "wan0"},
    ]
    assert net.connect(GUEST_A) == f"seen as {UPLINK_IP}"
    assert net.connect(GUEST_B) == f"seen as {UPLINK_IP}"

    assert asyncio.run(hc.nat_remove(VM_A)) == {"vm_id": VM_A, "removed": 3}
    assert asyncio.run(hc.nat_list()) == [{"vm_id": VM_B, "guest_ip": GUEST_B, "tap": tap_b, "uplink": "wan0"}]
    assert without_counters(vm_rules(net, VM_B)) == expected_rules(VM_B, GUEST_B, tap_b)
    assert vm_rules(net, VM_A) == []
    assert net.connect(GUEST_A).startswith("failed:")
    assert net.connect(GUEST_B) == f"seen as {UPLINK_IP}"

    assert asyncio.run(hc.nat_remove(VM_B))["removed"] == 3
    assert asyncio.run(hc.nat_list()) == []
    # None of this reached the real host's ruleset.
    real = subprocess.run(["nft", "-j", "list", "ruleset"], capture_output=True, text=True, check=True).stdout
    assert f"banger-vm:{VM_A}" not in real and f"banger-vm:{VM_B}" not in real


def test_rules_are_found_by_comment_after_the_helper_restarts(net: Net, base: Path) -> None:
    """State lives in the kernel's table, not the helper: a fresh helper lists and removes the old rules."""
    net.helper.call("priv.nat_add", {"vm_id": VM_A, "guest_ip": GUEST_A, "tap": net.tap})
    assert net.helper.stop() == 0
    fresh = subprocess.Popen(rh.helper_argv(net.host, base, net.helper.owner.uid, net.helper.socket),
                             env=rh.helper_env(base), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    net.helper.proc = fresh  # the helper fixture stops whatever process this is
    wait_for_helper(net.helper)
    assert net.helper.call("priv.nat_list") == [
        {"vm_id": VM_A, "guest_ip": GUEST_A, "tap": net.tap, "uplink": "wan0"}]
    assert net.helper.call("priv.nat_remove", {"vm_id": VM_A})["removed"] == 3
    assert net.rules() == []


def wait_for_helper(h: rh.Helper) -> None:
    import time

    from banger.rpc import client

    deadline = time.monotonic() + 20
    while True:
        try:
            h.call("priv.ping")
            return
        except client.Unreachable:
            if time.monotonic() > deadline or h.proc.poll() is not None:
                pytest.fail("bangerd-root did not come back")
            time.sleep(0.05)


# --- refusals -----------------------------------------------------------------------------------------

NOT_BANGER = "is not allowed (it is a banger bridge or tap name; the uplink is the host's interface to the outside)"
BANGER_BRIDGES = 'must be on "br-fc" or a "br-fc-" bridge'


def bad_nat_arguments(net: Net) -> list[tuple[str, dict[str, Any], str, str]]:
    ok = {"vm_id": VM_A, "guest_ip": GUEST_A, "tap": net.tap}
    return [
        ("priv.nat_add", {**ok, "vm_id": "VM-1"}, "bad_request",
         'vm_id "VM-1" is not allowed (must be 8 to 32 lowercase hex digits)'),
        ("priv.nat_add", {**ok, "vm_id": 7}, "bad_request", "vm_id must be a string, got 7"),
        ("priv.nat_add", {**ok, "guest_ip": "8.8.8.8"}, "bad_request",
         'guest ip "8.8.8.8" is not allowed (must be a private address in 10.0.0.0/8, 172.16.0.0/12 '
         "or 192.168.0.0/16)"),
        ("priv.nat_add", {**ok, "guest_ip": "172.30.0.2/24"}, "bad_request",
         'guest ip "172.30.0.2/24" is not a valid IPv4 address'),
        ("priv.nat_add", {**ok, "guest_ip": "10.9.9.9"}, "bad_request",
         f'guest ip "10.9.9.9" is not in the subnet of bridge "{net.bridge}" (172.30.0.0/24)'),
        ("priv.nat_add", {**ok, "guest_ip": "172.30.0.1"}, "bad_request",
         f'guest ip "172.30.0.1" is the address of bridge "{net.bridge}" itself'),
        ("priv.nat_add", {**ok, "guest_ip": "172.30.0.255"}, "bad_request",
         f'guest ip "172.30.0.255" is not a host address of 172.30.0.0/24 (bridge "{net.bridge}")'),
        ("priv.nat_add", {**ok, "tap": "eth0"}, "bad_request",
         'tap name "eth0" is not allowed (must start with "tap-")'),
        ("priv.nat_add", {**ok, "tap": "tap-nosuch"}, "not_found", 'tap "tap-nosuch" does not exist'),
        ("priv.nat_add", {**ok, "tap": "tap-veth"}, "bad_request", 'device "tap-veth" is not a tap'),
        ("priv.nat_add", {**ok, "tap": "tap-loose"}, "bad_request",
         f'tap "tap-loose" is not attached to a banger bridge ({BANGER_BRIDGES})'),
        ("priv.nat_add", {**ok, "tap": "tap-lan"}, "bad_request",
         f'tap "tap-lan" is attached to "lanbr", not a banger bridge ({BANGER_BRIDGES})'),
        ("priv.nat_add", {**ok, "uplink": net.bridge}, "bad_request", f'uplink "{net.bridge}" {NOT_BANGER}'),
        ("priv.nat_add", {**ok, "uplink": net.tap}, "bad_request", f'uplink "{net.tap}" {NOT_BANGER}'),
        ("priv.nat_add", {**ok, "uplink": "lo"}, "bad_request",
         'uplink "lo" is not allowed (loopback cannot be an uplink)'),
        ("priv.nat_add", {**ok, "uplink": "wan0; flush"}, "bad_request",
         'uplink "wan0; flush" has invalid character ";" (allowed: a-z, A-Z, 0-9, \'_\', \'.\', \'-\')'),
        ("priv.nat_add", {**ok, "uplink": "nosuch0"}, "not_found", 'uplink "nosuch0" does not exist'),
        ("priv.nat_add", {**ok, "table": "filter"}, "bad_request",
         'priv.nat_add does not take param "table" (allowed: guest_ip, tap, uplink, vm_id)'),
        ("priv.nat_add", {"vm_id": VM_A, "tap": net.tap}, "bad_request", 'priv.nat_add needs param "guest_ip"'),
        ("priv.nat_remove", {"vm_id": "*"}, "bad_request",
         'vm_id "*" is not allowed (must be 8 to 32 lowercase hex digits)'),
        ("priv.nat_remove", {}, "bad_request", 'priv.nat_remove needs param "vm_id"'),
        ("priv.nat_list", {"family": "inet"}, "bad_request",
         'priv.nat_list does not take param "family" (allowed: none)'),
    ]


def test_bad_arguments_are_refused_and_add_nothing(net: Net) -> None:
    host = net.host
    # Devices that look right by name but are not a banger VM's tap.
    sh("ip", "-n", host, "link", "add", "tap-veth", "type", "veth", "peer", "name", "tap-vpeer")
    sh("ip", "-n", host, "link", "set", "tap-veth", "master", net.bridge)
    sh("ip", "-n", host, "tuntap", "add", "tap-loose", "mode", "tap")
    sh("ip", "-n", host, "link", "add", "lanbr", "type", "bridge")
    sh("ip", "-n", host, "tuntap", "add", "tap-lan", "mode", "tap")
    sh("ip", "-n", host, "link", "set", "tap-lan", "master", "lanbr")

    before = net.ruleset_text()
    for method, params, code, message in bad_nat_arguments(net):
        err = net.helper.error(method, params)
        assert (method, params, err.code, err.message) == (method, params, code, message)
        assert net.ruleset_text() == before, f"{method} {params} changed the ruleset"
    assert net.rules() == []
    assert net.ip_forward() == "0"  # a refused request leaves forwarding alone too

    err = net.helper.error("priv.nat_add", {"vm_id": VM_A, "guest_ip": GUEST_A, "tap": "tap-nosuch"})
    assert err.hint == "create it with priv.create_tap"


def test_uplink_from_the_default_route_is_checked_too(net: Net) -> None:
    params = {"vm_id": VM_A, "guest_ip": GUEST_A, "tap": net.tap}
    sh("ip", "-n", net.host, "route", "del", "default")
    err = net.helper.error("priv.nat_add", params)
    assert (err.code, err.message, err.hint) == (
        "not_found", "there is no default route to take the uplink from", "pass uplink")

    # A default route through banger's own bridge must not make the bridge the uplink.
    sh("ip", "-n", net.host, "route", "add", "default", "via", "172.30.0.254", "dev", net.bridge)
    err = net.helper.error("priv.nat_add", params)
    assert (err.code, err.message) == ("bad_request", f'default-route interface "{net.bridge}" {NOT_BANGER}')

    # An explicit uplink still works without relying on the default route.
    assert net.helper.call("priv.nat_add", {**params, "uplink": "wan0"})["uplink"] == "wan0"
    assert net.comments() == [f"banger-vm:{VM_A}"] * 3
