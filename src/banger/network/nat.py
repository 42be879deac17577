"""Opt-in outbound NAT for VMs: rules in one nftables table that banger owns outright.

Everything lives in `table ip banger`; banger never edits another table. Why the `ip` family and not
`inet`: the feature is IPv4-only (guest addresses, `ip saddr` masquerade, the `ipv4.ip_forward`
sysctl), a table of family `ip` never sees IPv6 so nothing in it can be read as letting guests' IPv6
out, and `ip` NAT works on every nftables kernel whereas NAT in `inet` tables needs Linux 5.2.

Per VM there are three rules, each tagged `comment "banger-vm:<vm_id>"` so they can be found and deleted
from the kernel's own listing even after the daemon lost its in-memory state:

    postrouting:  ip saddr <guest_ip> oifname <uplink> masquerade      (the one that does the work)
    forward:      iifname <tap> oifname <uplink> accept
    forward:      iifname <uplink> oifname <tap> ct state established,related accept

The `forward` chain has policy accept: banger must not change the host's forwarding policy. That also
means its accept rules cannot change a packet's fate — in nftables an accept in one base chain does not
override a drop in another (a host whose own forward chain drops, as Docker sets up, still blocks guest
traffic; that is the host admin's call). Nor do they match anything: routed guest traffic enters the
IP stack through the bridge, so its input interface is the bridge, never the tap (checked: a packet
routed in from a bridge port counts for `iifname <bridge>`, not `iifname <port>`). They mirror the
original's tap-keyed FORWARD rules and are the record of which tap and uplink belong to the VM
(`nat_list` reads them back).

This module is pure planning (listing in, `nft -f -` script out) plus the few small effects the root
helper needs: reading the table, applying a script, finding the default-route interface and turning
on IPv4 forwarding.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from banger.errors import BangerError, CommandFailed

FAMILY: Final = "ip"
TABLE: Final = "banger"
POSTROUTING: Final = "postrouting"
FORWARD: Final = "forward"
COMMENT_PREFIX: Final = "banger-vm:"
IP_FORWARD: Final = Path("/proc/sys/net/ipv4/ip_forward")

_TABLE_REF: Final = f"{FAMILY} {TABLE}"
# `add` is idempotent for an existing table/chain with the same definition, so every script starts so.
_PREAMBLE: Final = (
    f"add table {_TABLE_REF}",
    f"add chain {_TABLE_REF} {POSTROUTING} {{ type nat hook postrouting priority srcnat; policy accept; }}",
    f"add chain {_TABLE_REF} {FORWARD} {{ type filter hook forward priority filter; policy accept; }}",
)

# Defence in depth: the helper validated these already, but nothing unchecked is pasted into a script.
_IFNAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_VM_ID: Final = re.compile(r"[0-9a-f]{8,32}")


@dataclass(frozen=True)
class Rule:
    """One rule of the banger table as the kernel lists it, reduced to what NAT rules use."""

    chain: str
    handle: int
    comment: str | None
    saddr: str | None = None
    iifname: str | None = None
    oifname: str | None = None
    ct_state: tuple[str, ...] = ()
    verdict: str | None = None  # "masquerade", "accept", ...

    @property
    def vm_id(self) -> str | None:
        if self.comment is None or not self.comment.startswith(COMMENT_PREFIX):
            return None
        return self.comment.removeprefix(COMMENT_PREFIX)


@dataclass(frozen=True)
class Table:
    """The banger table as listed: whether it exists, and its rules in listing order."""

    exists: bool
    rules: tuple[Rule, ...] = ()


ABSENT: Final = Table(exists=False)


@dataclass(frozen=True)
class VmNat:
    """One VM's NAT as recovered from its rules (a field is None if its rule is missing)."""

    vm_id: str
    guest_ip: str | None
    tap: str | None
    uplink: str | None

    def as_dict(self) -> dict[str, str | None]:
        return {"vm_id": self.vm_id, "guest_ip": self.guest_ip, "tap": self.tap, "uplink": self.uplink}


# --- rendering ----------------------------------------------------------------------------------------


def _checked_ifname(what: str, value: str) -> str:
    if not _IFNAME.fullmatch(value):
        raise BangerError(f"refusing to put {what} {json.dumps(value)} into an nft rule (not an interface name)")
    return value


def _checked_vm_id(value: str) -> str:
    if not _VM_ID.fullmatch(value):
        raise BangerError(f"refusing to put vm id {json.dumps(value)} into an nft rule (not 8 to 32 hex digits)")
    return value


def comment(vm_id: str) -> str:
    return COMMENT_PREFIX + _checked_vm_id(vm_id)


def _checked_ipv4(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise BangerError(f"refusing to put guest ip {json.dumps(value)} into an nft rule (not IPv4)") from None


def vm_rules(vm_id: str, guest_ip: str, tap: str, uplink: str) -> list[str]:
    """The `add rule` lines for one VM."""
    tag = f'comment "{comment(vm_id)}"'
    ip = _checked_ipv4(guest_ip)
    tap = _checked_ifname("tap", tap)
    uplink = _checked_ifname("uplink", uplink)
    return [
        f'add rule {_TABLE_REF} {POSTROUTING} ip saddr {ip} oifname "{uplink}" counter masquerade {tag}',
        f'add rule {_TABLE_REF} {FORWARD} iifname "{tap}" oifname "{uplink}" counter accept {tag}',
        f'add rule {_TABLE_REF} {FORWARD} iifname "{uplink}" oifname "{tap}" '
        f"ct state established,related counter accept {tag}",
    ]


def _deletes(rules: Iterable[Rule]) -> list[str]:
    return [f"delete rule {_TABLE_REF} {r.chain} handle {r.handle}" for r in rules]


def rules_of(vm_id: str, table: Table) -> list[Rule]:
    return [r for r in table.rules if r.vm_id == vm_id]


def _script(lines: Sequence[str]) -> str:
    return "".join(line + "\n" for line in lines)


def plan_add(vm_id: str, guest_ip: str, tap: str, uplink: str, current: Table = ABSENT) -> str:
    """One nft transaction that replaces whatever rules `vm_id` has in `current` with a fresh set.

    Idempotent: adding twice leaves one set. `current` must be a listing taken under the same lock
    the script is applied under (handles are only valid until the next change); if it is stale, nft
    refuses the whole transaction and nothing changes.
    """
    rules = vm_rules(vm_id, guest_ip, tap, uplink)
    return _script([*_PREAMBLE, *_deletes(rules_of(vm_id, current)), *rules])


def plan_remove(vm_id: str, current: Table) -> str:
    """One nft transaction deleting `vm_id`'s rules; "" when there is nothing to delete.

    When they are the last rules in the table, the table goes too, so a host without NAT'ed VMs
    carries no banger ruleset at all.
    """
    mine = rules_of(_checked_vm_id(vm_id), current)
    if not mine:
        return ""
    if len(mine) == len(current.rules):
        return _script([f"delete table {_TABLE_REF}"])
    return _script(_deletes(mine))


def list_vms(table: Table) -> list[VmNat]:
    """Every VM with at least one rule in the table, sorted by id."""
    found: dict[str, dict[str, str | None]] = {}
    for rule in table.rules:
        vm_id = rule.vm_id
        if vm_id is None:
            continue
        entry = found.setdefault(vm_id, {"guest_ip": None, "tap": None, "uplink": None})
        if rule.chain == POSTROUTING and rule.verdict == "masquerade":
            entry["guest_ip"] = entry["guest_ip"] or rule.saddr
            entry["uplink"] = entry["uplink"] or rule.oifname
        elif rule.chain == FORWARD and rule.verdict == "accept" and not rule.ct_state:
            entry["tap"] = entry["tap"] or rule.iifname
            entry["uplink"] = entry["uplink"] or rule.oifname
    return [VmNat(vm_id, e["guest_ip"], e["tap"], e["uplink"]) for vm_id, e in sorted(found.items())]


# --- parsing `nft -j list table ip banger` ------------------------------------------------------------


def _read_match(fields: dict[str, Any], expr: Mapping[str, Any]) -> None:
    """Fill `fields` from one `match` expression, if it is one of the shapes NAT rules use."""
    left = expr.get("left")
    right = expr.get("right")
    if not isinstance(left, Mapping):
        return
    payload = left.get("payload")
    meta = left.get("meta")
    ct = left.get("ct")
    if isinstance(payload, Mapping) and payload.get("protocol") == "ip" and payload.get("field") == "saddr":
        if isinstance(right, str):
            fields["saddr"] = right
    elif isinstance(meta, Mapping) and meta.get("key") in ("iifname", "oifname"):
        if isinstance(right, str):
            fields[str(meta["key"])] = right
    elif isinstance(ct, Mapping) and ct.get("key") == "state":
        states = right if isinstance(right, list) else [right]
        fields["ct_state"] = tuple(sorted(str(s) for s in states))


def _rule(raw: Mapping[str, Any]) -> Rule | None:
    if raw.get("family") != FAMILY or raw.get("table") != TABLE:
        return None
    chain, handle = raw.get("chain"), raw.get("handle")
    if not isinstance(chain, str) or not isinstance(handle, int):
        return None
    fields: dict[str, Any] = {}
    for expr in raw.get("expr") or ():
        if not isinstance(expr, Mapping):
            continue
        if isinstance(expr.get("match"), Mapping):
            _read_match(fields, expr["match"])
        for verdict in ("masquerade", "accept", "drop", "snat", "reject"):
            if verdict in expr:
                fields["verdict"] = verdict
    text = raw.get("comment")
    return Rule(chain, handle, text if isinstance(text, str) else None, **fields)


def parse_table(doc: Mapping[str, Any]) -> Table:
    """The JSON document `nft -j list table ip banger` prints."""
    items = doc.get("nftables")
    if not isinstance(items, list):
        raise BangerError("nft printed JSON without an \"nftables\" list")
    rules = []
    for item in items:
        if isinstance(item, Mapping) and isinstance(item.get("rule"), Mapping):
            rule = _rule(item["rule"])
            if rule is not None:
                rules.append(rule)
    return Table(exists=True, rules=tuple(rules))


# --- default route ------------------------------------------------------------------------------------


def uplink_from_routes(routes: Sequence[Mapping[str, Any]]) -> str | None:
    """The interface of the default route the kernel prefers, from `ip -j -4 route show default`.

    Lowest metric wins, ties go to the first listed (the kernel's order), as in the kernel. If that route
    is unreachable, blackhole or prohibit, there is no uplink. A multipath route counts with its first
    next hop's device.
    """
    best: tuple[int, int, Mapping[str, Any]] | None = None
    for position, route in enumerate(routes):
        if route.get("dst") != "default":
            continue
        metric = route.get("metric", 0)
        candidate = (metric if isinstance(metric, int) else 0, position, route)
        if best is None or candidate[:2] < best[:2]:
            best = candidate
    if best is None or best[2].get("type", "unicast") != "unicast":
        return None
    route = best[2]
    dev = route.get("dev")
    hops = route.get("nexthops")
    if dev is None and isinstance(hops, list) and hops and isinstance(hops[0], Mapping):
        dev = hops[0].get("dev")
    return dev if isinstance(dev, str) else None


def default_uplink() -> str | None:
    """The interface of this network namespace's default IPv4 route, or None without one."""
    from banger.system.run import run

    out = run(["ip", "-j", "-4", "route", "show", "default"], timeout=10).stdout
    routes = json.loads(out) if out.strip() else []
    return uplink_from_routes(routes if isinstance(routes, list) else [])


# --- effects (root helper only) -----------------------------------------------------------------------


async def read_table() -> Table:
    """The banger table as the kernel has it now; ABSENT if it does not exist."""
    from banger.system.run import arun

    try:
        out = (await arun(["nft", "-j", "list", "table", FAMILY, TABLE], timeout=30)).stdout
    except CommandFailed as exc:
        if "No such file or directory" in exc.stderr_tail:
            return ABSENT
        raise
    try:
        doc = json.loads(out)
    except ValueError:
        raise BangerError("nft printed output that is not JSON") from None
    if not isinstance(doc, Mapping):
        raise BangerError("nft printed JSON that is not an object")
    return parse_table(doc)


async def apply(script: str) -> None:
    """Run one nft script as a single atomic transaction."""
    from banger.system.run import arun

    if script:
        await arun(["nft", "-f", "-"], input=script.encode(), timeout=30)


def enable_ip_forward(path: Path = IP_FORWARD) -> bool:
    """Turn IPv4 forwarding on; True if it was off.

    This is host-wide (well, per network namespace): the host then routes IPv4 between all of its
    interfaces, subject to its own firewall. That is acceptable because routing guest traffic out of the
    uplink is exactly what the user opted into with NAT, it is what every VM and container manager
    (libvirt, Docker, LXD) does, and the original did the same. The previous value is deliberately not
    recorded or restored: once forwarding is on, other software may come to depend on it, and banger
    cannot tell whether it is still the only user, so switching it back could cut someone else off.
    """
    if path.read_text().strip() == "1":
        return False
    path.write_text("1\n")
    return True
