"""NAT rule planning (`banger.network.nat`) and the root helper's NAT argument rules, without root.

The listings parsed here are verbatim `nft -j list table ip banger` output (nftables 1.0.6) of tables
that `plan_add` scripts built; the route listings are verbatim `ip -j -4 route show default` output.
The integration test (tests/integration/test_nat.py) applies the same scripts to a real kernel.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from banger.errors import BadRequest, BangerError
from banger.network import nat
from banger.roothelper import validate

PREAMBLE = (
    "add table ip banger\n"
    "add chain ip banger postrouting { type nat hook postrouting priority srcnat; policy accept; }\n"
    "add chain ip banger forward { type filter hook forward priority filter; policy accept; }\n"
)


def rules_for(vm_id: str, ip: str, tap: str, uplink: str) -> str:
    tag = f'comment "banger-vm:{vm_id}"'
    return (
        f'add rule ip banger postrouting ip saddr {ip} oifname "{uplink}" counter masquerade {tag}\n'
        f'add rule ip banger forward iifname "{tap}" oifname "{uplink}" counter accept {tag}\n'
        f'add rule ip banger forward iifname "{uplink}" oifname "{tap}" ct state established,related counter accept {tag}\n'
    )


# Two VMs: 0123abcd (172.16.0.2 on tap-a) and 4567cdef (172.16.0.3 on tap-b), both out of eth0.
TWO_VMS = json.loads(r"""
{"nftables": [
  {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
  {"table": {"family": "ip", "name": "banger", "handle": 1}},
  {"chain": {"family": "ip", "table": "banger", "name": "postrouting", "handle": 1, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}},
  {"chain": {"family": "ip", "table": "banger", "name": "forward", "handle": 2, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}},
  {"rule": {"family": "ip", "table": "banger", "chain": "postrouting", "handle": 3, "comment": "banger-vm:0123abcd", "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "172.16.0.2"}}, {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "eth0"}}, {"counter": {"packets": 0, "bytes": 0}}, {"masquerade": null}]}},
  {"rule": {"family": "ip", "table": "banger", "chain": "postrouting", "handle": 6, "comment": "banger-vm:4567cdef", "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "172.16.0.3"}}, {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "eth0"}}, {"counter": {"packets": 0, "bytes": 0}}, {"masquerade": null}]}},
  {"rule": {"family": "ip", "table": "banger", "chain": "forward", "handle": 4, "comment": "banger-vm:0123abcd", "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "tap-a"}}, {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "eth0"}}, {"counter": {"packets": 0, "bytes": 0}}, {"accept": null}]}},
  {"rule": {"family": "ip", "table": "banger", "chain": "forward", "handle": 5, "comment": "banger-vm:0123abcd", "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "eth0"}}, {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "tap-a"}}, {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"counter": {"packets": 0, "bytes": 0}}, {"accept": null}]}},
  {"rule": {"family": "ip", "table": "banger", "chain": "forward", "handle": 7, "comment": "banger-vm:4567cdef", "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "tap-b"}}, {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "eth0"}}, {"counter": {"packets": 0, "bytes": 0}}, {"accept": null}]}},
  {"rule": {"family": "ip", "table": "banger", "chain": "forward", "handle": 8, "comment": "banger-vm:4567cdef", "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "eth0"}}, {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "tap-b"}}, {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"counter": {"packets": 0, "bytes": 0}}, {"accept": null}]}}
]}
""")


def two_vms() -> nat.Table:
    return nat.parse_table(TWO_VMS)


def with_rules(table: nat.Table, *extra: nat.Rule) -> nat.Table:
    return nat.Table(exists=True, rules=(*table.rules, *extra))


# --- planning -----------------------------------------------------------------------------------------


def test_plan_add_on_a_fresh_host_creates_table_chains_and_three_rules() -> None:
    assert nat.plan_add("0123abcd", "172.16.0.2", "tap-a", "eth0") == PREAMBLE + rules_for(
        "0123abcd", "172.16.0.2", "tap-a", "eth0")


def test_plan_add_replaces_only_that_vms_rules_in_the_same_transaction() -> None:
    script = nat.plan_add("0123abcd", "172.16.0.9", "tap-a", "wlan0", two_vms())
    assert script == (
        PREAMBLE
        + "delete rule ip banger postrouting handle 3\n"
        + "delete rule ip banger forward handle 4\n"
        + "delete rule ip banger forward handle 5\n"
        + rules_for("0123abcd", "172.16.0.9", "tap-a", "wlan0")
    )


def test_plan_add_for_a_new_vm_deletes_nothing() -> None:
    script = nat.plan_add("89abcdef", "172.16.0.4", "tap-c", "eth0", two_vms())
    assert "delete" not in script
    assert script == PREAMBLE + rules_for("89abcdef", "172.16.0.4", "tap-c", "eth0")


def test_plan_remove_deletes_the_vms_handles() -> None:
    assert nat.plan_remove("4567cdef", two_vms()) == (
        "delete rule ip banger postrouting handle 6\n"
        "delete rule ip banger forward handle 7\n"
        "delete rule ip banger forward handle 8\n"
    )


def test_plan_remove_of_the_last_vm_deletes_the_table() -> None:
    table = two_vms()
    only_a = nat.Table(exists=True, rules=tuple(r for r in table.rules if r.vm_id == "0123abcd"))
    assert nat.plan_remove("0123abcd", only_a) == "delete table ip banger\n"


def test_plan_remove_keeps_the_table_while_other_rules_remain() -> None:
    table = two_vms()
    only_a = nat.Table(exists=True, rules=tuple(r for r in table.rules if r.vm_id == "0123abcd"))
    foreign = nat.Rule("forward", 42, None, iifname="eth9", verdict="accept")
    assert nat.plan_remove("0123abcd", with_rules(only_a, foreign)) == (
        "delete rule ip banger postrouting handle 3\n"
        "delete rule ip banger forward handle 4\n"
        "delete rule ip banger forward handle 5\n"
    )


@pytest.mark.parametrize("table", [nat.ABSENT, nat.Table(exists=True), None])
def test_plan_remove_with_nothing_to_remove_is_empty(table: nat.Table | None) -> None:
    assert nat.plan_remove("89abcdef", table if table is not None else two_vms()) == ""


def test_a_vm_id_that_is_a_prefix_of_another_does_not_match_it() -> None:
    longer = nat.Rule("postrouting", 50, "banger-vm:0123abcd99", saddr="172.16.0.5", oifname="eth0",
                      verdict="masquerade")
    table = with_rules(two_vms(), longer)
    assert [r.handle for r in nat.rules_of("0123abcd", table)] == [3, 4, 5]
    assert [r.handle for r in nat.rules_of("0123abcd99", table)] == [50]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("0123ABCD", "172.16.0.2", "tap-a", "eth0"),
         'refusing to put vm id "0123ABCD" into an nft rule (not 8 to 32 hex digits)'),
        (('0123abcd" drop', "172.16.0.2", "tap-a", "eth0"),
         'refusing to put vm id "0123abcd\\" drop" into an nft rule (not 8 to 32 hex digits)'),
        (("0123abcd", "172.16.0.2/24", "tap-a", "eth0"),
         'refusing to put guest ip "172.16.0.2/24" into an nft rule (not IPv4)'),
        (("0123abcd", "172.16.0.2", 'tap-a" accept; flush ruleset; #', "eth0"),
         'refusing to put tap "tap-a\\" accept; flush ruleset; #" into an nft rule (not an interface name)'),
        (("0123abcd", "172.16.0.2", "tap-a", "eth0\n"),
         'refusing to put uplink "eth0\\n" into an nft rule (not an interface name)'),
    ],
)
def test_rendering_refuses_what_could_escape_the_script(args: tuple[str, str, str, str], message: str) -> None:
    with pytest.raises(BangerError) as exc:
        nat.plan_add(*args)
    assert exc.value.message == message


def test_plan_remove_refuses_a_bad_vm_id() -> None:
    with pytest.raises(BangerError):
        nat.plan_remove("*", two_vms())


# --- reading the kernel's listing ---------------------------------------------------------------------


def test_parse_table_reads_every_rule_with_handle_and_matches() -> None:
    table = two_vms()
    assert table.exists
    assert table.rules[0] == nat.Rule("postrouting", 3, "banger-vm:0123abcd", saddr="172.16.0.2", oifname="eth0",
                                      verdict="masquerade")
    assert table.rules[3] == nat.Rule("forward", 5, "banger-vm:0123abcd", iifname="eth0", oifname="tap-a",
                                      ct_state=("established", "related"), verdict="accept")
    assert [(r.chain, r.handle, r.vm_id) for r in table.rules] == [
        ("postrouting", 3, "0123abcd"), ("postrouting", 6, "4567cdef"),
        ("forward", 4, "0123abcd"), ("forward", 5, "0123abcd"),
        ("forward", 7, "4567cdef"), ("forward", 8, "4567cdef"),
    ]


def test_list_vms_recovers_ip_tap_and_uplink() -> None:
    assert [vm.as_dict() for vm in nat.list_vms(two_vms())] == [
        {"vm_id": "0123abcd", "guest_ip": "172.16.0.2", "tap": "tap-a", "uplink": "eth0"},
        {"vm_id": "4567cdef", "guest_ip": "172.16.0.3", "tap": "tap-b", "uplink": "eth0"},
    ]


def test_list_vms_shows_a_partial_set_and_ignores_foreign_rules() -> None:
    table = nat.Table(exists=True, rules=(
        nat.Rule("forward", 9, "banger-vm:89abcdef", iifname="tap-c", oifname="eth1", verdict="accept"),
        nat.Rule("forward", 10, "someone else's", iifname="tap-x", oifname="eth0", verdict="accept"),
        nat.Rule("forward", 11, None, iifname="tap-y", oifname="eth0", verdict="accept"),
    ))
    assert nat.list_vms(table) == [nat.VmNat("89abcdef", None, "tap-c", "eth1")]
    assert nat.list_vms(nat.ABSENT) == []


def test_parse_table_skips_rules_of_other_tables_and_odd_entries() -> None:
    doc: dict[str, Any] = {"nftables": [
        {"rule": {"family": "inet", "table": "banger", "chain": "forward", "handle": 1, "expr": []}},
        {"rule": {"family": "ip", "table": "filter", "chain": "forward", "handle": 2, "expr": []}},
        {"rule": {"family": "ip", "table": "banger", "chain": "forward", "expr": []}},
        {"rule": {"family": "ip", "table": "banger", "chain": "forward", "handle": 3,
                  "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "tap-z"}},
                           {"drop": None}]}},
    ]}
    assert nat.parse_table(doc).rules == (nat.Rule("forward", 3, None, iifname="tap-z", verdict="drop"),)


def test_parse_table_refuses_a_document_without_a_list() -> None:
    with pytest.raises(BangerError) as exc:
        nat.parse_table({"error": "x"})
    assert exc.value.message == 'nft printed JSON without an "nftables" list'


# --- default route ------------------------------------------------------------------------------------

UNREACHABLE_50 = {"type": "unreachable", "dst": "default", "metric": 50, "flags": []}
VIA_D1_100 = {"dst": "default", "gateway": "10.2.0.1", "dev": "d1", "metric": 100, "flags": []}
VIA_D0_600 = {"dst": "default", "gateway": "10.1.0.1", "dev": "d0", "metric": 600, "flags": []}
MULTIPATH_80 = {"dst": "default", "metric": 80, "flags": [], "nexthops": [
    {"gateway": "10.1.0.1", "dev": "d0", "weight": 1, "flags": []},
    {"gateway": "10.2.0.1", "dev": "d1", "weight": 1, "flags": []}]}
PLAIN = {"dst": "default", "gateway": "192.0.2.1", "dev": "eth0", "flags": []}


@pytest.mark.parametrize(
    ("routes", "uplink"),
    [
        ([PLAIN], "eth0"),
        ([VIA_D1_100, VIA_D0_600], "d1"),
        ([VIA_D0_600, VIA_D1_100], "d1"),  # the metric decides, not the order
        ([MULTIPATH_80, VIA_D0_600], "d0"),  # a multipath route goes by its first hop
        ([{**PLAIN, "dev": "eth1"}, PLAIN], "eth1"),  # equal metrics: the kernel's first
        ([UNREACHABLE_50, VIA_D1_100], None),  # the kernel would use the unreachable route
        ([{**UNREACHABLE_50, "metric": 4278198272}, VIA_D1_100], "d1"),  # a kill-switch fallback
        ([], None),
        ([{"dst": "10.0.0.0/8", "dev": "eth0", "flags": []}], None),
    ],
)
def test_uplink_from_routes(routes: list[dict[str, Any]], uplink: str | None) -> None:
    assert nat.uplink_from_routes(routes) == uplink


# --- ip_forward ---------------------------------------------------------------------------------------


def test_enable_ip_forward_writes_only_when_off(tmp_path: Path) -> None:
    knob = tmp_path / "ip_forward"
    knob.write_text("0\n")
    assert nat.enable_ip_forward(knob) is True
    assert knob.read_text() == "1\n"
    knob.write_text("1")  # a write would leave "1\n"
    assert nat.enable_ip_forward(knob) is False
    assert knob.read_text() == "1"


# --- the helper's argument rules ----------------------------------------------------------------------


def refused(fn: Any, *args: Any) -> str:
    with pytest.raises(BadRequest) as exc:
        fn(*args)
    assert exc.value.code == "bad_request"
    return exc.value.message


@pytest.mark.parametrize("value", ["0123abcd", "0" * 32, "deadbeef" * 4, "abcdef012"])
def test_vm_id_accepted(value: str) -> None:
    assert validate.vm_id(value) == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0123abc", 'vm_id "0123abc" is not allowed (must be 8 to 32 lowercase hex digits)'),
        ("0" * 33, f'vm_id "{"0" * 33}" is not allowed (must be 8 to 32 lowercase hex digits)'),
        ("0123ABCD", 'vm_id "0123ABCD" is not allowed (must be 8 to 32 lowercase hex digits)'),
        ("0123abcg", 'vm_id "0123abcg" is not allowed (must be 8 to 32 lowercase hex digits)'),
        ("0123abcd\n", 'vm_id "0123abcd\\n" is not allowed (must be 8 to 32 lowercase hex digits)'),
        ("devbox-1", 'vm_id "devbox-1" is not allowed (must be 8 to 32 lowercase hex digits)'),
        (12345678, "vm_id must be a string, got 12345678"),
        (None, "vm_id must be a string, got null"),
    ],
)
def test_vm_id_refused(value: object, message: str) -> None:
    assert refused(validate.vm_id, value) == message


@pytest.mark.parametrize("value", ["172.16.0.2", "10.0.0.5", "192.168.1.10", "172.31.255.254"])
def test_guest_ip_accepted(value: str) -> None:
    assert validate.guest_ip(value) == value


PRIVATE_ONLY = "is not allowed (must be a private address in 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16)"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("8.8.8.8", f'guest ip "8.8.8.8" {PRIVATE_ONLY}'),
        ("172.32.0.2", f'guest ip "172.32.0.2" {PRIVATE_ONLY}'),
        ("169.254.1.1", f'guest ip "169.254.1.1" {PRIVATE_ONLY}'),
        ("100.64.0.1", f'guest ip "100.64.0.1" {PRIVATE_ONLY}'),
        ("127.0.0.1", 'guest ip "127.0.0.1" is not allowed '
                      "(must be a unicast address: not loopback, multicast, reserved or 0.0.0.0)"),
        ("10.0.0.0/8", 'guest ip "10.0.0.0/8" is not a valid IPv4 address'),
        ("fd00::2", 'guest ip "fd00::2" is not a valid IPv4 address'),
        (["10.0.0.2"], "guest ip must be a string, got list"),
    ],
)
def test_guest_ip_refused(value: object, message: str) -> None:
    assert refused(validate.guest_ip, value) == message


@pytest.mark.parametrize("value", ["eth0", "enp3s0", "wlan0", "br0", "eth0.100", "wg_home", "virbr0", "tun0"])
def test_uplink_accepted(value: str) -> None:
    assert validate.uplink_name(value) == value


NOT_BANGER = "is not allowed (it is a banger bridge or tap name; the uplink is the host's interface to the outside)"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("br-fc", f'uplink "br-fc" {NOT_BANGER}'),
        ("br-fc-dev", f'uplink "br-fc-dev" {NOT_BANGER}'),
        ("tap-0", f'uplink "tap-0" {NOT_BANGER}'),
        ("lo", 'uplink "lo" is not allowed (loopback cannot be an uplink)'),
        ("", 'uplink "" is not a valid interface name'),
        ("..", 'uplink ".." is not a valid interface name'),
        ("enp0s31f6abcdefg", 'uplink "enp0s31f6abcdefg" is 16 characters; max is 15'),
        ("eth0 ", 'uplink "eth0 " has invalid character " " (allowed: a-z, A-Z, 0-9, \'_\', \'.\', \'-\')'),
        ('eth0"', 'uplink "eth0\\"" has invalid character "\\"" (allowed: a-z, A-Z, 0-9, \'_\', \'.\', \'-\')'),
        ("eth/0", 'uplink "eth/0" has invalid character "/" (allowed: a-z, A-Z, 0-9, \'_\', \'.\', \'-\')'),
        (0, "uplink must be a string, got 0"),
    ],
)
def test_uplink_refused(value: object, message: str) -> None:
    assert refused(validate.uplink_name, value) == message


def test_default_route_interface_is_named_as_such() -> None:
    assert refused(validate.uplink_name, "br-fc", "default-route interface") == (
        f'default-route interface "br-fc" {NOT_BANGER}')


NETS = [ipaddress.IPv4Interface("172.16.0.1/24")]


@pytest.mark.parametrize("ip", ["172.16.0.2", "172.16.0.254"])
def test_guest_on_bridge_accepted(ip: str) -> None:
    validate.guest_on_bridge(ip, "br-fc", NETS)


@pytest.mark.parametrize(
    ("ip", "addresses", "message"),
    [
        ("172.16.0.1", NETS, 'guest ip "172.16.0.1" is the address of bridge "br-fc" itself'),
        ("172.16.0.0", NETS, 'guest ip "172.16.0.0" is not a host address of 172.16.0.0/24 (bridge "br-fc")'),
        ("172.16.0.255", NETS, 'guest ip "172.16.0.255" is not a host address of 172.16.0.0/24 (bridge "br-fc")'),
        ("172.16.1.2", NETS, 'guest ip "172.16.1.2" is not in the subnet of bridge "br-fc" (172.16.0.0/24)'),
        ("10.0.0.2", [*NETS, ipaddress.IPv4Interface("10.1.0.1/16")],
         'guest ip "10.0.0.2" is not in the subnet of bridge "br-fc" (172.16.0.0/24, 10.1.0.0/16)'),
        ("172.16.0.2", [], 'bridge "br-fc" has no IPv4 address, so guest ip "172.16.0.2" cannot be on it'),
    ],
)
def test_guest_on_bridge_refused(ip: str, addresses: list[ipaddress.IPv4Interface], message: str) -> None:
    assert refused(validate.guest_on_bridge, ip, "br-fc", addresses) == message


def test_nat_requests() -> None:
    params = {"vm_id": "0123abcd", "guest_ip": "172.16.0.2", "tap": "tap-a"}
    assert validate.nat_add_request(params) == validate.NatAddRequest("0123abcd", "172.16.0.2", "tap-a", None)
    assert validate.nat_add_request({**params, "uplink": "eth0"}).uplink == "eth0"
    assert validate.nat_add_request({**params, "uplink": None}).uplink is None
    assert validate.nat_remove_request({"vm_id": "0123abcd"}) == "0123abcd"
    validate.nat_list_request({})


@pytest.mark.parametrize(
    ("fn", "params", "message"),
    [
        (validate.nat_add_request, {"vm_id": "0123abcd", "guest_ip": "172.16.0.2"}, 'priv.nat_add needs param "tap"'),
        (validate.nat_add_request, {"vm_id": "0123abcd", "guest_ip": "172.16.0.2", "tap": "tap-a", "table": "x"},
         'priv.nat_add does not take param "table" (allowed: guest_ip, tap, uplink, vm_id)'),
        (validate.nat_add_request, {"vm_id": "0123abcd", "guest_ip": "172.16.0.2", "tap": "eth0"},
         'tap name "eth0" is not allowed (must start with "tap-")'),
        (validate.nat_remove_request, {}, 'priv.nat_remove needs param "vm_id"'),
        (validate.nat_remove_request, {"vm_id": "0123abcd", "force": True},
         'priv.nat_remove does not take param "force" (allowed: vm_id)'),
        (validate.nat_list_request, {"all": True}, 'priv.nat_list does not take param "all" (allowed: none)'),
    ],
)
def test_nat_requests_refused(fn: Any, params: dict[str, Any], message: str) -> None:
    assert refused(fn, params) == message
