"""Making the host's resolver send `.vm` names to banger's DNS server (reference §7.5).

On systemd-resolved hosts this is automatic: the root helper marks the banger bridge link as the route
for the `~vm` domain, served by 127.0.0.1:42069 (`priv.resolver_wire` / `priv.resolver_unwire`, whose
handlers live at the end of this module). Everywhere else `banger doctor` prints a manual recipe.

The planning functions are pure (argv lists, text lines) so they can be tested without systemd; the
wire/unwire operations run the plan through `banger.system.run`. tests/integration/test_resolved.py
runs them against a real systemd-resolved in private namespaces.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from banger.errors import BadRequest, BangerError, NotFound
from banger.roothelper import validate

log = logging.getLogger("banger.network.resolver")

# resolved's varlink socket (systemd >= 246). It is how banger tells whether resolved runs: connecting
# to it has no side effect, while any D-Bus call could start resolved through bus activation.
RESOLVED_SOCKET: Final = Path("/run/systemd/resolve/io.systemd.Resolve")
DEFAULT_DNS_ADDR: Final = "127.0.0.1:42069"
ROUTING_DOMAIN: Final = "~vm"
NOT_RUNNING: Final = "not wired: systemd-resolved is not running"
_STATUS_TIMEOUT: Final = 5.0
_CONNECT_TIMEOUT: Final = 1.0


def resolved_active(socket_path: Path = RESOLVED_SOCKET) -> bool:
    """Whether systemd-resolved is running: something accepts connections on its varlink socket.

    The socket file outlives a stopped resolved (its runtime directory is preserved), so the file
    alone proves nothing; a refused connection means nobody is listening.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(_CONNECT_TIMEOUT)
        try:
            sock.connect(str(socket_path))
        except OSError:  # absent, refused, not a socket, no permission, timed out
            return False
    return True


def dns_address(value: object) -> str:
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


def loopback_dns_address(value: object) -> str:
    """A `dns_address` on 127.0.0.0/8, where banger's DNS server listens.

    The root helper takes this from the daemon: an address outside loopback would let a compromised
    daemon send the host's `.vm` lookups to any server it likes.
    """
    addr = dns_address(value)
    if not ipaddress.IPv4Address(addr.rpartition(":")[0]).is_loopback:
        raise BadRequest(
            f"dns address {validate.quote(value)} is not allowed (must be on loopback, 127.0.0.0/8, "
            "where banger's DNS server listens)"
        )
    return addr


def resolvectl_argv(bridge: str, dns_addr: str = DEFAULT_DNS_ADDR) -> list[list[str]]:
    """The commands that route `~vm` on `bridge` to banger's DNS server.

    Order matters: a link with a DNS server and no routing-only domain is a default route for every
    name, so until `~vm` is set the host's lookups would go to banger. Turning default-route off first
    and setting the domain before the server leaves no such moment, even if a later step fails.
    """
    bridge = validate.bridge_name(bridge)
    addr = loopback_dns_address(dns_addr)
    return [
        ["resolvectl", "default-route", bridge, "false"],
        ["resolvectl", "domain", bridge, ROUTING_DOMAIN],
        ["resolvectl", "dns", bridge, addr],
    ]


def resolvectl_revert_argv(bridge: str) -> list[list[str]]:
    """The command that drops every per-link resolved setting banger made on `bridge`."""
    return [["resolvectl", "revert", validate.bridge_name(bridge)]]


# --- priv.resolver_wire / priv.resolver_unwire ----------------------------------------------------------


@dataclass(frozen=True)
class WireRequest:
    bridge: str
    dns_addr: str


def wire_request(params: Mapping[str, Any]) -> WireRequest:
    validate.check_params("priv.resolver_wire", params, required=("bridge",), optional=("dns_addr",))
    dns_addr = params.get("dns_addr")
    return WireRequest(
        validate.bridge_name(params["bridge"]),
        DEFAULT_DNS_ADDR if dns_addr is None else loopback_dns_address(dns_addr),
    )


def unwire_request(params: Mapping[str, Any]) -> str:
    validate.check_params("priv.resolver_unwire", params, required=("bridge",))
    return validate.bridge_name(params["bridge"])


def _link_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _cannot_run(socket_path: Path) -> str | None:
    """Why the wiring cannot be done on this host, or None when it can."""
    from banger.system.run import find_binary

    if not resolved_active(socket_path):
        return NOT_RUNNING
    if find_binary("resolvectl") is None:
        return "not wired: resolvectl not found (it ships with systemd-resolved)"
    return None


async def _run_all(argvs: list[list[str]], what: str) -> None:
    from banger.system.run import arun

    for argv in argvs:
        try:
            await arun(argv, timeout=_STATUS_TIMEOUT)
        except BangerError as exc:
            raise BangerError(f"{what}: {exc.message}") from None


async def resolver_wire(req: WireRequest, *, socket_path: Path = RESOLVED_SOCKET) -> dict[str, Any]:
    """Route `~vm` on the bridge to banger's DNS server. Idempotent: every step sets a value."""
    result: dict[str, Any] = {"bridge": req.bridge, "dns_addr": req.dns_addr, "domain": ROUTING_DOMAIN}
    reason = _cannot_run(socket_path)
    if reason is not None:
        return {**result, "wired": False, "status": reason}
    if not _link_exists(req.bridge):
        raise NotFound(
            f"bridge {validate.quote(req.bridge)} does not exist", hint="call priv.ensure_bridge first"
        )
    what = f"cannot route `.vm` on {req.bridge} through systemd-resolved"
    try:
        await _run_all(resolvectl_argv(req.bridge, req.dns_addr), what)
    except BangerError:
        # Leave no half-made routing behind (a server without its domain, say).
        try:
            await _run_all(resolvectl_revert_argv(req.bridge), what)
        except BangerError as exc:
            log.warning("resolver revert after a failed wire failed", extra={"bridge": req.bridge,
                                                                            "error": exc.message})
        raise
    log.info("resolver wired", extra={"bridge": req.bridge, "dns_addr": req.dns_addr})
    return {**result, "wired": True, "status": "wired"}


async def resolver_unwire(bridge: str, *, socket_path: Path = RESOLVED_SOCKET) -> dict[str, Any]:
    """Drop banger's settings on the bridge. Idempotent; a missing bridge has none left to drop."""
    bridge = validate.bridge_name(bridge)
    reason = _cannot_run(socket_path)
    if reason is not None:
        return {"bridge": bridge, "wired": False, "status": reason}
    if not _link_exists(bridge):
        # resolved forgets a link's settings when the link goes away.
        return {"bridge": bridge, "wired": False, "status": "not wired: the bridge does not exist"}
    await _run_all(resolvectl_revert_argv(bridge), f"cannot unroute `.vm` on {bridge} in systemd-resolved")
    log.info("resolver unwired", extra={"bridge": bridge})
    return {"bridge": bridge, "wired": False, "status": "unwired"}


async def handle_resolver_wire(cfg: object, ctx: object, params: dict[str, Any]) -> dict[str, Any]:
    """The root helper's `priv.resolver_wire` handler (params: bridge, optional dns_addr)."""
    return await resolver_wire(wire_request(params))


async def handle_resolver_unwire(cfg: object, ctx: object, params: dict[str, Any]) -> dict[str, Any]:
    """The root helper's `priv.resolver_unwire` handler (params: bridge)."""
    return await resolver_unwire(unwire_request(params))


# --- reading back, for doctor and tests ---------------------------------------------------------------------


@dataclass(frozen=True)
class LinkRouting:
    servers: tuple[str, ...]
    domains: tuple[str, ...]

    def routes_vm(self, dns_addr: str = DEFAULT_DNS_ADDR) -> bool:
        addr = dns_address(dns_addr)
        host, _, port = addr.rpartition(":")
        # resolvectl prints a server on the standard port without ":53".
        forms = {addr, host} if port == "53" else {addr}
        return ROUTING_DOMAIN in self.domains and not forms.isdisjoint(self.servers)


def parse_link_line(output: str, bridge: str) -> tuple[str, ...]:
    """The values resolvectl prints for one link: `Link 7 (br-fc): 127.0.0.1:42069` -> its words."""
    marker = f" ({bridge}):"
    for line in output.splitlines():
        if line.startswith("Link ") and marker in line:
            return tuple(line.split(marker, 1)[1].split())
    raise BangerError(f"resolvectl printed no line for link {bridge}: {output.strip()[:200]!r}")


def link_routing(bridge: str) -> LinkRouting:
    """What resolved holds for the bridge now (`resolvectl dns|domain <bridge>`; needs no privileges)."""
    from banger.system.run import run

    bridge = validate.bridge_name(bridge)
    servers = run(["resolvectl", "dns", bridge], timeout=_STATUS_TIMEOUT).stdout.decode("utf-8", "replace")
    domains = run(["resolvectl", "domain", bridge], timeout=_STATUS_TIMEOUT).stdout.decode("utf-8", "replace")
    return LinkRouting(parse_link_line(servers, bridge), parse_link_line(domains, bridge))


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
