"""Making the host's resolver send `.vm` names to banger's DNS server (reference §7.5).

On systemd-resolved hosts this is automatic: the root helper marks the banger bridge link as the route
for the `~vm` domain, served by 127.0.0.1:42069. Everywhere else `banger doctor` prints a manual recipe.

The planning functions are pure (argv lists, text lines) so they can be tested without systemd; the
two `apply`/`clear` functions run the plan through `banger.system.run`.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Final

from banger.errors import BadRequest, BangerError
from banger.roothelper import validate

RESOLVED_SOCKET: Final = Path("/run/systemd/resolve/io.systemd.Resolve")
DEFAULT_DNS_ADDR: Final = "127.0.0.1:42069"
ROUTING_DOMAIN: Final = "~vm"
_STATUS_TIMEOUT: Final = 5.0


def resolved_active(socket_path: Path = RESOLVED_SOCKET) -> bool:
    """Whether systemd-resolved is running: its varlink socket exists, or `resolvectl status` works."""
    if socket_path.is_socket():
        return True
    from banger.system.run import find_binary, run

    if find_binary("resolvectl") is None:
        return False
    try:
        proc = run(["resolvectl", "status"], check=False, timeout=_STATUS_TIMEOUT)
    except BangerError:  # timed out: a wedged resolved is as good as none
        return False
    return proc.returncode == 0


def dns_address(value: str) -> str:
    """`<ipv4>:<port>` (the form resolvectl accepts for a per-link server), canonicalised.

    The original helper rejected exactly this form and auto-wiring silently failed for eight releases
    (reference §7.5, v0.1.8); keep the test that proves it is accepted.
    """
    if not isinstance(value, str):
        raise BadRequest(f"dns address must be a string, got {type(value).__name__}")
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise BadRequest(
            f"dns address {validate.quote(value)} must be <ipv4>:<port>, like {DEFAULT_DNS_ADDR}"
        )
    try:
        addr = ipaddress.IPv4Address(host)
    except ValueError:
        raise BadRequest(
            f"dns address {validate.quote(value)} has no valid IPv4 address before the ':'"
        ) from None
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise BadRequest(f"dns address {validate.quote(value)} has an invalid port (allowed: 1-65535)")
    return f"{addr}:{int(port_text)}"


def resolvectl_argv(bridge: str, dns_addr: str = DEFAULT_DNS_ADDR) -> list[list[str]]:
    """The commands that route `~vm` on `bridge` to banger's DNS server."""
    bridge = validate.bridge_name(bridge)
    addr = dns_address(dns_addr)
    return [
        ["resolvectl", "dns", bridge, addr],
        ["resolvectl", "domain", bridge, ROUTING_DOMAIN],
    ]


def resolvectl_revert_argv(bridge: str) -> list[list[str]]:
    """The command that drops every per-link resolved setting banger made on `bridge`."""
    return [["resolvectl", "revert", validate.bridge_name(bridge)]]


def apply_routing(bridge: str, dns_addr: str = DEFAULT_DNS_ADDR) -> None:
    """Run `resolvectl_argv` (root only; the root helper calls this)."""
    from banger.system.run import run

    for argv in resolvectl_argv(bridge, dns_addr):
        run(argv, timeout=_STATUS_TIMEOUT)


def clear_routing(bridge: str) -> None:
    """Run `resolvectl_revert_argv` (root only; the root helper calls this)."""
    from banger.system.run import run

    for argv in resolvectl_revert_argv(bridge):
        run(argv, timeout=_STATUS_TIMEOUT)


def manual_instructions(port: int = 42069, host: str = "127.0.0.1") -> list[str]:
    """What `banger doctor` prints when resolved is not there to wire `.vm` automatically."""
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise BadRequest(f"dns port {validate.quote(port)} is invalid (allowed: 1-65535)")
    addr = dns_address(f"{host}:{port}")
    host = addr.rpartition(":")[0]
    return [
        f"banger answers `.vm` names on {host} port {port} (UDP and TCP); route the `vm` domain there:",
        f"  dnsmasq: add `server=/vm/{host}#{port}` to /etc/dnsmasq.d/banger.conf, then "
        "`systemctl restart dnsmasq`",
        "  NetworkManager with dns=dnsmasq: put the same line in "
        f"/etc/NetworkManager/dnsmasq.d/banger.conf (`server=/vm/{host}#{port}`), then "
        "`systemctl reload NetworkManager`",
        "  plain /etc/resolv.conf is not enough: it cannot name a port or route a single domain, so point "
        "it at a local dnsmasq that forwards `vm` as above",
        f"  verify the server: `dig @{host} -p {port} <name>.vm`; verify the host resolver: "
        "`getent hosts <name>.vm`",
    ]
