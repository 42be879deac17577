"""The single chokepoint for every argument the root helper accepts.

The helper trusts nothing the daemon sends: a compromised owner daemon must not be able to attach taps
to eth0, signal sshd or touch a path outside banger's directories. Every `priv.*` handler parses its
params through one of the request functions at the bottom of this module before doing anything.

All functions are pure (no system access beyond `os.path.realpath`) and raise `BadRequest` with one
line that quotes the bad value and says what is allowed. The jail methods' requests, which are larger,
are parsed in `validate_jail` with the same primitives.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from banger.errors import BadRequest

IFNAME_MAX: Final = 15  # IFNAMSIZ - 1
BRIDGE_PREFIX: Final = "br-fc"
TAP_PREFIX: Final = "tap-"
PREFIX_MIN: Final = 8
PREFIX_MAX: Final = 30
PID_MAX: Final = 4194304  # kernel PID_MAX_LIMIT on 64-bit
VM_ID_MIN: Final = 8
VM_ID_MAX: Final = 32  # banger's ids are 32 hex digits; shorter prefixes are accepted for tests and tools
# Guests NAT'ed by the helper must have an RFC 1918 address: masquerading any other source would let a
# compromised daemon rewrite traffic that is not a guest's.
PRIVATE_V4: Final = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))

# Programs banger launches; only these may be signalled through the helper.
VMM_PROGRAMS: Final = frozenset({"firecracker", "jailer", "qemu-system-x86_64", "vhost-device-vsock"})

# Order matters: it is the order shown in error messages.
SIGNALS: Final[Mapping[str, signal.Signals]] = {
    "TERM": signal.SIGTERM,
    "KILL": signal.SIGKILL,
    "INT": signal.SIGINT,
    "HUP": signal.SIGHUP,
    "QUIT": signal.SIGQUIT,
    "USR1": signal.SIGUSR1,
    "USR2": signal.SIGUSR2,
    "ABRT": signal.SIGABRT,
}

_IFNAME_CHAR = re.compile(r"[a-z0-9-]")
_UPLINK_CHAR = re.compile(r"[A-Za-z0-9_.-]")
_VM_ID = re.compile(r"[0-9a-f]+")
_PREFIX_STR = re.compile(r"^[0-9]{1,3}$")
# Separators inside one argv element: `--api-sock=/x`, `file=/x,format=raw`, `unix:/x`.
_ARG_SPLIT = re.compile(r"[=,:]")


def quote(value: object) -> str:
    """A value as it appears in messages: strings double-quoted and escaped, the rest as JSON."""
    return json.dumps(value, default=str)


def type_name(value: object) -> str:
    return quote(value) if isinstance(value, (str, int, float, bool)) or value is None else type(value).__name__


# --- params -----------------------------------------------------------------------------------------


def check_params(
    method: str, params: Mapping[str, Any], *, required: Iterable[str] = (), optional: Iterable[str] = ()
) -> None:
    """Reject unknown params and missing required ones (a null value counts as missing)."""
    required = tuple(required)
    allowed = sorted(set(required) | set(optional))
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        names = ", ".join(quote(k) for k in unknown)
        noun = "param" if len(unknown) == 1 else "params"
        raise BadRequest(f"{method} does not take {noun} {names} (allowed: {', '.join(allowed) or 'none'})")
    for key in required:
        if params.get(key) is None:
            raise BadRequest(f"{method} needs param {quote(key)}")


# --- interface names ----------------------------------------------------------------------------------


def _ifname(what: str, value: object, prefix: str, rule: str, *, bare_ok: bool) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string, got {type_name(value)}")
    if not (value.startswith(prefix) or (bare_ok and value == prefix.rstrip("-"))):
        raise BadRequest(f"{what} {quote(value)} is not allowed ({rule})")
    if len(value) > IFNAME_MAX:
        raise BadRequest(f"{what} {quote(value)} is {len(value)} characters; max is {IFNAME_MAX}")
    for ch in value:
        if not _IFNAME_CHAR.fullmatch(ch):
            raise BadRequest(f"{what} {quote(value)} has invalid character {quote(ch)} (allowed: a-z, 0-9, '-')")
    if value == prefix:
        raise BadRequest(f"{what} {quote(value)} is not allowed (needs a suffix after {quote(prefix)})")
    return value


def bridge_name(value: object) -> str:
    """`br-fc` or `br-fc-<suffix>`: keeps a compromised daemon away from eth0, docker0, ..."""
    rule = f'must be "{BRIDGE_PREFIX}" or start with "{BRIDGE_PREFIX}-"'
    return _ifname("bridge name", value, BRIDGE_PREFIX + "-", rule, bare_ok=True)


def tap_name(value: object) -> str:
    """`tap-<suffix>`, at most 15 characters of a-z, 0-9 and '-'."""
    return _ifname("tap name", value, TAP_PREFIX, f'must start with "{TAP_PREFIX}"', bare_ok=False)


def is_banger_ifname(name: str) -> bool:
    """A name banger gives its own bridges and taps."""
    return name == BRIDGE_PREFIX or name.startswith((BRIDGE_PREFIX + "-", TAP_PREFIX))


def uplink_name(value: object, what: str = "uplink") -> str:
    """The host's interface to the outside (eth0, enp3s0, wlan0, br0, eth0.100, ...).

    Any real interface name except loopback and banger's own bridges and taps, whose traffic is
    exactly what is being NAT'ed. Characters are limited to what nft can quote without escaping.
    """
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string, got {type_name(value)}")
    if value in ("", ".", ".."):
        raise BadRequest(f"{what} {quote(value)} is not a valid interface name")
    if len(value) > IFNAME_MAX:
        raise BadRequest(f"{what} {quote(value)} is {len(value)} characters; max is {IFNAME_MAX}")
    for ch in value:
        if not _UPLINK_CHAR.fullmatch(ch):
            raise BadRequest(
                f"{what} {quote(value)} has invalid character {quote(ch)} (allowed: a-z, A-Z, 0-9, '_', '.', '-')"
            )
    if value == "lo":
        raise BadRequest(f"{what} {quote(value)} is not allowed (loopback cannot be an uplink)")
    if is_banger_ifname(value):
        raise BadRequest(
            f"{what} {quote(value)} is not allowed (it is a banger bridge or tap name; "
            "the uplink is the host's interface to the outside)"
        )
    return value


def vm_id(value: object) -> str:
    """A banger VM id: lowercase hex, 8 to 32 digits (it goes into the rules' comments verbatim)."""
    if not isinstance(value, str):
        raise BadRequest(f"vm_id must be a string, got {type_name(value)}")
    if not (VM_ID_MIN <= len(value) <= VM_ID_MAX and _VM_ID.fullmatch(value)):
        raise BadRequest(
            f"vm_id {quote(value)} is not allowed (must be {VM_ID_MIN} to {VM_ID_MAX} lowercase hex digits)"
        )
    return value


# --- addresses ----------------------------------------------------------------------------------------


def ipv4_address(value: object, what: str = "bridge ip") -> str:
    """A unicast IPv4 address usable on an interface, in canonical dotted form."""
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string, got {type_name(value)}")
    try:
        addr = ipaddress.IPv4Address(value)
    except ValueError:
        raise BadRequest(f"{what} {quote(value)} is not a valid IPv4 address") from None
    if addr.is_loopback or addr.is_multicast or addr.is_unspecified or addr.is_reserved:
        raise BadRequest(
            f"{what} {quote(value)} is not allowed "
            "(must be a unicast address: not loopback, multicast, reserved or 0.0.0.0)"
        )
    return str(addr)


def prefix_len(value: object) -> int:
    """A CIDR prefix length 8..30, as an int or a numeric string."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _PREFIX_STR.fullmatch(value):
        number = int(value)
    if number is None:
        raise BadRequest(f"prefix {quote(value)} is not a number (must be {PREFIX_MIN}..{PREFIX_MAX})")
    if not PREFIX_MIN <= number <= PREFIX_MAX:
        raise BadRequest(f"prefix {quote(value)} is out of range (must be {PREFIX_MIN}..{PREFIX_MAX})")
    return number


def bridge_cidr(ip: str, prefix: int) -> None:
    """The bridge address must be a host address of its own subnet."""
    net = ipaddress.IPv4Network(f"{ip}/{prefix}", strict=False)
    addr = ipaddress.IPv4Address(ip)
    if addr == net.network_address:
        raise BadRequest(f"bridge ip {quote(ip)} is the network address of {net}; use a host address")
    if addr == net.broadcast_address:
        raise BadRequest(f"bridge ip {quote(ip)} is the broadcast address of {net}; use a host address")


def guest_ip(value: object) -> str:
    """A unicast RFC 1918 address (the helper checks it against the tap's bridge separately)."""
    ip = ipv4_address(value, "guest ip")
    if not any(ipaddress.IPv4Address(ip) in net for net in PRIVATE_V4):
        nets = ", ".join(str(n) for n in PRIVATE_V4[:-1]) + f" or {PRIVATE_V4[-1]}"
        raise BadRequest(f"guest ip {quote(ip)} is not allowed (must be a private address in {nets})")
    return ip


def guest_on_bridge(ip: str, bridge: str, addresses: Sequence[ipaddress.IPv4Interface]) -> None:
    """`ip` must be a host address in a subnet the bridge has, other than the bridge's own address.

    So the helper only ever masquerades addresses that can really be behind that bridge.
    """
    addr = ipaddress.IPv4Address(ip)
    if not addresses:
        raise BadRequest(f"bridge {quote(bridge)} has no IPv4 address, so guest ip {quote(ip)} cannot be on it")
    for iface in addresses:
        if addr == iface.ip:
            raise BadRequest(f"guest ip {quote(ip)} is the address of bridge {quote(bridge)} itself")
    for iface in addresses:
        net = iface.network
        if addr in net:
            if net.prefixlen < 31 and addr in (net.network_address, net.broadcast_address):
                raise BadRequest(f"guest ip {quote(ip)} is not a host address of {net} (bridge {quote(bridge)})")
            return
    nets = ", ".join(str(iface.network) for iface in addresses)
    raise BadRequest(f"guest ip {quote(ip)} is not in the subnet of bridge {quote(bridge)} ({nets})")


# --- processes ----------------------------------------------------------------------------------------


def pid(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"pid must be an integer, got {type_name(value)}")
    if not 2 <= value <= PID_MAX:
        raise BadRequest(f"pid {value} is not allowed (must be 2..{PID_MAX})")
    return value


def signal_name(value: object) -> signal.Signals:
    """One of SIGNALS by name, case-insensitive, with or without the SIG prefix; never a number."""
    allowed = ", ".join(SIGNALS)
    if isinstance(value, str):
        name = value.upper()
        name = name.removeprefix("SIG")
        if name in SIGNALS:
            return SIGNALS[name]
    raise BadRequest(f"signal {quote(value)} is not allowed (allowed: {allowed})")


def uid_for_tap(value: object, owner_uid: int) -> int:
    """Taps are owned by the install's owner uid and nobody else."""
    if value is None:
        return owner_uid
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"owner_uid must be an integer, got {type_name(value)}")
    if value != owner_uid:
        raise BadRequest(f"owner_uid {value} is not allowed (taps belong to the owner uid {owner_uid})")
    return value


def _real_roots(roots: Iterable[Path | str]) -> list[Path]:
    out: list[Path] = []
    for root in roots:
        for form in (Path(os.path.normpath(root)), Path(os.path.realpath(root))):
            if form not in out:
                out.append(form)
    return out


def _strictly_under(path: Path, roots: Sequence[Path]) -> bool:
    return any(path != root and path.is_relative_to(root) for root in roots)


def vmm_process(pid_value: int, cmdline: bytes, roots: Iterable[Path | str]) -> str:
    """Accept only a process banger launched: a VMM program with an argument under banger's directories.

    `cmdline` is the raw /proc/<pid>/cmdline. Returns the program name.
    """
    args = [a.decode("utf-8", "replace") for a in cmdline.split(b"\0")]
    while args and not args[-1]:
        args.pop()
    if not args:
        raise BadRequest(
            f"pid {pid_value} is not a banger-launched process (no command line: exited or a kernel thread)"
        )
    program = os.path.basename(args[0])
    if program not in VMM_PROGRAMS:
        allowed = ", ".join(sorted(VMM_PROGRAMS))
        raise BadRequest(
            f"pid {pid_value} ({quote(program)}) is not a banger-launched process "
            f"(program must be one of: {allowed})"
        )
    real_roots = _real_roots(roots)
    for arg in args:
        for token in _ARG_SPLIT.split(arg):
            if not token.startswith("/") or ".." in Path(token).parts:
                continue
            if _strictly_under(Path(os.path.normpath(token)), real_roots):
                return program
    raise BadRequest(
        f"pid {pid_value} ({quote(program)}) is not a banger-launched process "
        "(no argument under banger's directories)"
    )


# --- paths --------------------------------------------------------------------------------------------


def managed_path(path: object, roots: Iterable[Path | str]) -> Path:
    """An absolute path below one of `roots` after resolving symlinks; `..` components are refused outright.

    Returns the resolved path, which is what the caller must use (not the original string), so a
    symlink swapped in later cannot redirect the operation outside banger's directories.
    """
    if isinstance(path, Path):
        path = str(path)
    if not isinstance(path, str):
        raise BadRequest(f"path must be a string, got {type_name(path)}")
    if "\0" in path:
        raise BadRequest(f"path {quote(path)} contains a NUL byte")
    if not os.path.isabs(path):
        raise BadRequest(f"path {quote(path)} must be absolute")
    if ".." in Path(path).parts:
        raise BadRequest(f'path {quote(path)} must not contain ".." components')
    real = Path(os.path.realpath(path))
    real_roots = _real_roots(roots)
    if real in real_roots:
        raise BadRequest(f"path {quote(path)} is a banger root directory; only paths below it are allowed")
    if not _strictly_under(real, real_roots):
        if str(real) != os.path.normpath(path):
            raise BadRequest(f"path {quote(path)} resolves to {quote(str(real))}, outside banger's directories")
        raise BadRequest(f"path {quote(path)} is outside banger's directories")
    return real


# --- requests: one parser per priv.* method -----------------------------------------------------------


@dataclass(frozen=True)
class BridgeRequest:
    name: str
    ip: str
    prefix: int


@dataclass(frozen=True)
class TapRequest:
    name: str
    bridge: str
    owner_uid: int


@dataclass(frozen=True)
class SignalRequest:
    pid: int
    signal: signal.Signals


@dataclass(frozen=True)
class NatAddRequest:
    vm_id: str
    guest_ip: str
    tap: str
    uplink: str | None  # None: the interface of the default route


def ping_request(params: Mapping[str, Any]) -> None:
    check_params("priv.ping", params)


def ensure_bridge_request(params: Mapping[str, Any]) -> BridgeRequest:
    check_params("priv.ensure_bridge", params, required=("name", "ip", "prefix"))
    name = bridge_name(params["name"])
    ip = ipv4_address(params["ip"])
    prefix = prefix_len(params["prefix"])
    bridge_cidr(ip, prefix)
    return BridgeRequest(name, ip, prefix)


def create_tap_request(params: Mapping[str, Any], owner_uid: int) -> TapRequest:
    check_params("priv.create_tap", params, required=("name", "bridge"), optional=("owner_uid",))
    return TapRequest(
        tap_name(params["name"]), bridge_name(params["bridge"]), uid_for_tap(params.get("owner_uid"), owner_uid)
    )


def delete_tap_request(params: Mapping[str, Any]) -> str:
    check_params("priv.delete_tap", params, required=("name",))
    return tap_name(params["name"])


def list_taps_request(params: Mapping[str, Any]) -> str:
    check_params("priv.list_taps", params, required=("bridge",))
    return bridge_name(params["bridge"])


def delete_bridge_request(params: Mapping[str, Any]) -> str:
    check_params("priv.delete_bridge", params, required=("name",))
    return bridge_name(params["name"])


def signal_process_request(params: Mapping[str, Any]) -> SignalRequest:
    check_params("priv.signal_process", params, required=("pid", "signal"))
    return SignalRequest(pid(params["pid"]), signal_name(params["signal"]))


def kill_process_request(params: Mapping[str, Any]) -> SignalRequest:
    check_params("priv.kill_process", params, required=("pid",))
    return SignalRequest(pid(params["pid"]), signal.SIGKILL)


def nat_add_request(params: Mapping[str, Any]) -> NatAddRequest:
    check_params("priv.nat_add", params, required=("vm_id", "guest_ip", "tap"), optional=("uplink",))
    uplink = params.get("uplink")
    return NatAddRequest(
        vm_id(params["vm_id"]),
        guest_ip(params["guest_ip"]),
        tap_name(params["tap"]),
        None if uplink is None else uplink_name(uplink),
    )


def nat_remove_request(params: Mapping[str, Any]) -> str:
    check_params("priv.nat_remove", params, required=("vm_id",))
    return vm_id(params["vm_id"])


def nat_list_request(params: Mapping[str, Any]) -> None:
    check_params("priv.nat_list", params)

