"""Guest IP allocation: the lowest free address of the bridge subnet, decided inside the create
reservation (under the daemon's create lock, together with the name check and the row insert)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from banger.errors import BangerError


def subnet(bridge_ip: str, prefix: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"{bridge_ip}/{prefix}", strict=False)


def allocate(bridge_ip: str, prefix: int, taken: Iterable[str]) -> str:
    """The lowest host address that is neither the bridge's nor a VM's."""
    net = subnet(bridge_ip, prefix)
    used = {ipaddress.IPv4Address(ip) for ip in taken if ip}
    used.add(ipaddress.IPv4Address(bridge_ip))
    for host in net.hosts():
        if host not in used:
            return str(host)
    raise BangerError(
        f"no free guest address left in {net} ({len(used) - 1} VMs)",
        hint="delete unused VMs (`banger vm prune`) or widen `cidr` in config.toml",
    )


def guest_cidr(ip: str, prefix: int) -> str:
    return f"{ip}/{prefix}"
