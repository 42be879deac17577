"""The root helper's methods: a fixed allowlist, each parsing its params in `validate` first.

`METHODS` maps every accepted method name to its handler; the RPC server answers `unknown_method`
for anything else. New privileged operations are added by writing a request parser in `validate`
(`validate_jail` for the jail methods) and a handler here, and registering it in `METHODS`. The jail
methods' work lives in `jail`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from banger import __version__
from banger.errors import AlreadyExists, BadRequest, BangerError, NotFound
from banger.network import nat, resolver
from banger.roothelper import jail, validate, validate_jail
from banger.rpc.server import CallContext

log = logging.getLogger("banger.roothelper.ops")

TUN_TYPE_TAP = 2  # IFLA_TUN_TYPE of a tap (1 is tun)


@dataclass(frozen=True)
class HelperConfig:
    """What every handler may rely on: whose helper this is, which directories are banger's, and the jail
    settings of config.toml (read by the helper itself: the daemon's word is not taken for them)."""

    owner_uid: int
    roots: tuple[Path, ...]
    owner_gid: int | None = None
    chroot_base: str = ""  # jailer_chroot_base, canonical
    jailer_bin: str = "/usr/bin/jailer"

    def jail_settings(self) -> jail.JailSettings:
        return jail.JailSettings(self.chroot_base, self.jailer_bin, self.owner_uid, self.owner_gid, self.roots)


MethodHandler = Callable[[HelperConfig, CallContext, dict[str, Any]], Awaitable[Any]]


# --- netlink plumbing ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _netlink(action: str) -> AsyncIterator[Any]:
    """An AsyncIPRoute whose kernel errors become one-line BangerErrors naming what was attempted."""
    from pyroute2 import AsyncIPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        async with AsyncIPRoute() as ipr:
            yield ipr
    except BangerError:
        raise
    except NetlinkError as exc:
        raise BangerError(f"{action}: {os.strerror(exc.code) if exc.code else exc}") from None
    except OSError as exc:
        raise BangerError(f"{action}: {exc.strerror or exc}") from None


async def _get_link(ipr: Any, name: str) -> Any | None:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        links = await ipr.link("get", ifname=name)
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise
    return links[0] if links else None


def _kind(link: Any) -> str | None:
    kind = link.get(("linkinfo", "kind"))
    return str(kind) if kind is not None else None


def _tun_data(link: Any) -> Any | None:
    linkinfo = link.get("linkinfo")
    return linkinfo.get("data") if linkinfo is not None else None


def _is_tap(link: Any) -> bool:
    data = _tun_data(link)
    return _kind(link) == "tun" and data is not None and data.get("IFLA_TUN_TYPE") == TUN_TYPE_TAP


def _tap_owner(link: Any) -> int | None:
    data = _tun_data(link)
    owner = data.get("IFLA_TUN_OWNER") if data is not None else None
    return int(owner) if owner is not None else None


async def _ignore_errno(awaitable: Awaitable[Any], *codes: int) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        await awaitable
    except NetlinkError as exc:
        if exc.code not in codes:
            raise


# --- network operations -------------------------------------------------------------------------------


async def ensure_bridge(req: validate.BridgeRequest) -> dict[str, Any]:
    """Create the bridge if missing, give it ip/prefix if it lacks that address, set it up."""
    async with _netlink(f"cannot set up bridge {validate.quote(req.name)}") as ipr:
        created = False
        link = await _get_link(ipr, req.name)
        if link is None:
            # A concurrent ensure_bridge may win the race; EEXIST then means "done".
            await _ignore_errno(ipr.link("add", ifname=req.name, kind="bridge"), errno.EEXIST)
            link = await _get_link(ipr, req.name)
            created = True
        if link is None:
            raise BangerError(f"bridge {validate.quote(req.name)} vanished while it was being created")
        if _kind(link) != "bridge":
            raise AlreadyExists(f"device {validate.quote(req.name)} exists and is not a bridge")
        index = link["index"]
        present = {
            (msg.get("address"), msg["prefixlen"])
            async for msg in await ipr.addr("dump", index=index)
            if msg["family"] == 2  # AF_INET
        }
        address_added = (req.ip, req.prefix) not in present
        if address_added:
            await _ignore_errno(
                ipr.addr("add", index=index, address=req.ip, prefixlen=req.prefix), errno.EEXIST
            )
        await ipr.link("set", index=index, state="up")
    if created or address_added:
        log.info("bridge ready", extra={"bridge": req.name, "ip": f"{req.ip}/{req.prefix}", "new": created})
    return {"name": req.name, "ip": req.ip, "prefix": req.prefix, "created": created}


async def create_tap(req: validate.TapRequest) -> dict[str, Any]:
    """A persistent tap owned by the owner uid (so the unprivileged VMM can open it), on the bridge, up."""
    name = validate.quote(req.name)
    async with _netlink(f"cannot create tap {name}") as ipr:
        bridge = await _get_link(ipr, req.bridge)
        if bridge is None or _kind(bridge) != "bridge":
            raise NotFound(
                f"bridge {validate.quote(req.bridge)} does not exist", hint="call priv.ensure_bridge first"
            )
        tap = await _get_link(ipr, req.name)
        created = False
        if tap is None:
            await ipr.link(
                "add", ifname=req.name, kind="tuntap", mode="tap", uid=req.owner_uid,
                ifr={"no_pi": True, "vnet_hdr": True},
            )
            created = True
            tap = await _get_link(ipr, req.name)
            if tap is None:
                raise BangerError(f"tap {name} vanished while it was being created")
        else:
            _check_existing_tap(req, tap, bridge)
        try:
            await ipr.link("set", index=tap["index"], master=bridge["index"], state="up")
        except Exception:
            if created:  # leave nothing half-made behind
                with contextlib.suppress(Exception):
                    await ipr.link("del", index=tap["index"])
            raise
    if created:
        log.info("tap created", extra={"tap": req.name, "bridge": req.bridge, "owner_uid": req.owner_uid})
    return {"name": req.name, "bridge": req.bridge, "owner_uid": req.owner_uid, "created": created}


def _check_existing_tap(req: validate.TapRequest, tap: Any, bridge: Any) -> None:
    name = validate.quote(req.name)
    if not _is_tap(tap):
        raise AlreadyExists(f"device {name} exists and is not a tap")
    owner = _tap_owner(tap)
    if owner != req.owner_uid:
        raise AlreadyExists(
            f"tap {name} exists but is owned by uid {owner}, not {req.owner_uid}",
            hint="delete it with priv.delete_tap and create it again",
        )
    master = tap.get("master")
    if master and master != bridge["index"]:
        raise AlreadyExists(f"tap {name} exists but is attached to another bridge (ifindex {master})")


async def delete_tap(name: str) -> dict[str, Any]:
    async with _netlink(f"cannot delete tap {validate.quote(name)}") as ipr:
        link = await _get_link(ipr, name)
        if link is None:
            return {"name": name, "deleted": False}
        if not _is_tap(link):
            raise BadRequest(f"device {validate.quote(name)} is not a tap; refusing to delete it")
        await _ignore_errno(ipr.link("del", index=link["index"]), errno.ENODEV)
    log.info("tap deleted", extra={"tap": name})
    return {"name": name, "deleted": True}


async def delete_bridge(name: str) -> dict[str, Any]:
    async with _netlink(f"cannot delete bridge {validate.quote(name)}") as ipr:
        link = await _get_link(ipr, name)
        if link is None:
            return {"name": name, "deleted": False}
        if _kind(link) != "bridge":
            raise BadRequest(f"device {validate.quote(name)} is not a bridge; refusing to delete it")
        await _ignore_errno(ipr.link("del", index=link["index"]), errno.ENODEV)
    log.info("bridge deleted", extra={"bridge": name})
    return {"name": name, "deleted": True}


async def list_taps(bridge: str) -> dict[str, Any]:
    """banger's taps attached to `bridge` (a daemon restarted after a crash adopts or removes them)."""
    async with _netlink(f"cannot list taps of {validate.quote(bridge)}") as ipr:
        br = await _get_link(ipr, bridge)
        if br is None:
            return {"bridge": bridge, "taps": []}
        names = []
        async for link in await ipr.link("dump"):
            name = link.get("ifname")
            if link.get("master") == br["index"] and _is_tap(link) and isinstance(name, str) \
                    and name.startswith("tap-"):
                names.append(name)
    return {"bridge": bridge, "taps": sorted(names)}


# --- outbound NAT -------------------------------------------------------------------------------------

# Serialises list -> plan -> apply: the rule handles in a listing are only valid until the next change,
# and this helper is the only writer of the banger table.
_nat_lock = asyncio.Lock()
_BANGER_BRIDGES = f'must be on "{validate.BRIDGE_PREFIX}" or a "{validate.BRIDGE_PREFIX}-" bridge'


async def _banger_bridge_of(ipr: Any, tap_name: str) -> tuple[str, list[ipaddress.IPv4Interface]]:
    """The banger bridge the tap is attached to, and that bridge's IPv4 addresses."""
    name = validate.quote(tap_name)
    tap = await _get_link(ipr, tap_name)
    if tap is None:
        raise NotFound(f"tap {name} does not exist", hint="create it with priv.create_tap")
    if not _is_tap(tap):
        raise BadRequest(f"device {name} is not a tap")
    master = tap.get("master")
    bridges = await ipr.link("get", index=master) if master else []
    bridge = bridges[0] if bridges else None
    if bridge is None:
        raise BadRequest(f"tap {name} is not attached to a banger bridge ({_BANGER_BRIDGES})")
    bridge_name = str(bridge.get("ifname"))
    try:
        is_banger_bridge = _kind(bridge) == "bridge" and validate.bridge_name(bridge_name) == bridge_name
    except BadRequest:
        is_banger_bridge = False
    if not is_banger_bridge:
        raise BadRequest(
            f"tap {name} is attached to {validate.quote(bridge_name)}, not a banger bridge ({_BANGER_BRIDGES})"
        )
    addresses = [
        ipaddress.IPv4Interface(f"{msg.get('address')}/{msg['prefixlen']}")
        async for msg in await ipr.addr("dump", index=bridge["index"])
        if msg["family"] == 2  # AF_INET
    ]
    return bridge_name, addresses


async def nat_add(req: validate.NatAddRequest) -> dict[str, Any]:
    """Masquerade the guest's traffic out of the uplink: the VM's rules replaced in one transaction."""
    async with _netlink(f"cannot set up NAT for vm {validate.quote(req.vm_id)}") as ipr:
        bridge, addresses = await _banger_bridge_of(ipr, req.tap)
        validate.guest_on_bridge(req.guest_ip, bridge, addresses)
        uplink = req.uplink
        if uplink is None:
            uplink = await asyncio.to_thread(nat.default_uplink)
            if uplink is None:
                raise NotFound("there is no default route to take the uplink from", hint="pass uplink")
            validate.uplink_name(uplink, "default-route interface")
        if await _get_link(ipr, uplink) is None:
            raise NotFound(f"uplink {validate.quote(uplink)} does not exist")
    async with _nat_lock:
        current = await nat.read_table()
        replaced = len(nat.rules_of(req.vm_id, current))
        await nat.apply(nat.plan_add(req.vm_id, req.guest_ip, req.tap, uplink, current))
    # Only after the rules are in: a refused request leaves the host's forwarding setting alone.
    try:
        forwarding_enabled = nat.enable_ip_forward()
    except OSError as exc:
        raise BangerError(f"cannot enable IPv4 forwarding ({nat.IP_FORWARD}): {exc.strerror or exc}",
                          hint=f"the rules are in place; remove them with priv.nat_remove {req.vm_id}") from None
    log.info("nat enabled", extra={"vm_id": req.vm_id, "guest_ip": req.guest_ip, "tap": req.tap,
                                   "uplink": uplink, "replaced_rules": replaced,
                                   "ip_forward_enabled": forwarding_enabled})
    return {"vm_id": req.vm_id, "guest_ip": req.guest_ip, "tap": req.tap, "uplink": uplink,
            "ip_forward_enabled": forwarding_enabled}


async def nat_remove(vm_id: str) -> dict[str, Any]:
    """Delete the VM's rules, found by their comment in the kernel's listing; nothing to delete is fine."""
    async with _nat_lock:
        current = await nat.read_table()
        removed = len(nat.rules_of(vm_id, current))
        await nat.apply(nat.plan_remove(vm_id, current))
    if removed:
        log.info("nat removed", extra={"vm_id": vm_id, "rules": removed})
    return {"vm_id": vm_id, "removed": removed}


async def nat_list() -> list[dict[str, Any]]:
    return [vm.as_dict() for vm in nat.list_vms(await nat.read_table())]


# --- processes ----------------------------------------------------------------------------------------


def signal_vmm(req: validate.SignalRequest, roots: tuple[Path, ...]) -> dict[str, Any]:
    """Signal a banger-launched VMM process, through a pidfd so a recycled pid is never hit."""
    try:
        fd = os.pidfd_open(req.pid)
    except ProcessLookupError:
        raise NotFound(f"no process with pid {req.pid}") from None
    try:
        try:
            cmdline = Path(f"/proc/{req.pid}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            raise NotFound(f"no process with pid {req.pid}") from None
        program = validate.vmm_process(req.pid, cmdline, roots)
        try:
            # The pidfd still names a live process, so the cmdline we just read was its own.
            signal.pidfd_send_signal(fd, 0)
            signal.pidfd_send_signal(fd, req.signal)
        except ProcessLookupError:
            raise NotFound(f"process {req.pid} exited before it could be signalled") from None
    finally:
        os.close(fd)
    name = req.signal.name.removeprefix("SIG")
    log.info("process signalled", extra={"pid": req.pid, "program": program, "signal": name})
    return {"pid": req.pid, "signal": name}


# --- handlers -----------------------------------------------------------------------------------------


async def _ping(cfg: HelperConfig, ctx: CallContext, params: dict[str, Any]) -> Any:
    validate.ping_request(params)
    return {"version": __version__, "pid": os.getpid(), "owner_uid": cfg.owner_uid}


async def _ensure_bridge(cfg: HelperConfig, ctx: CallContext, params: dict[str, Any]) -> Any:
    return await ensure_bridge(validate.ensure_bridge_request(params))


async def _create_tap(cfg: HelperConfig, ctx: CallContext, params: dict[str, Any]) -> Any:
    return await create_tap(validate.create_tap_request(params, cfg.owner_uid))


async def _delete_tap(cfg: HelperConfig, ctx: CallContext, params: dict[str, Any]) -> Any:
    return await delete_tap(validate.delete_tap_request(params))


async def _list_taps(cfg: HelperConfig, ctx: CallContext, params: dict[str, Any]) -> Any:
    return await list_taps(validate.list_taps_request(params))


async def _delete_bridge(cfg: HelperConfig, ctx: CallContext, params: dict[str, Any]) -> Any:
    return await delete_bridge(validate.delete_bridge_request(params))


async def _signal_process(cfg: HelperConfig, ctx: CallContext, params: dict[str, Any]) -> Any:
    return signal_vmm(validate.signal_process_request(params), cfg.roots)


async def _kill_process(cfg: HelperConfig, ctx: CallContext, params: dict[str, Any]) -> Any:
    return signal_vmm(validate.kill_process_request(params), cfg.roots)


async def _nat_add(cfg: HelperConfig, ctx: CallContext, params: dict[str, Any]) -> Any:
    return await nat_add(validate.nat_add_request(params))


async def _nat_remove(cfg: HelperConfig, ctx: CallContext, params: dict[str, Any]) -> Any:
    return await nat_remove(validate.nat_remove_request(params))


async def _nat_list(cfg: HelperConfig, ctx: CallContext, params: dict[str, Any]) -> Any:
    validate.nat_list_request(params)
    return await nat_list()


async def _jail_stage(cfg: HelperConfig, ctx: CallContext, params: dict[str, Any]) -> Any:
    policy = validate_jail.JailPolicy(cfg.chroot_base, cfg.owner_uid, cfg.owner_gid, cfg.roots)
    req = validate_jail.jail_stage_request(params, policy)
    async with jail.lock:
        return await asyncio.to_thread(jail.stage, cfg.jail_settings(), req)


async def _jail_launch(cfg: HelperConfig, ctx: CallContext, params: dict[str, Any]) -> Any:
    vm_id, console_log = validate_jail.jail_launch_request(params, cfg.roots)
    async with jail.lock:
        result, child = await asyncio.to_thread(jail.launch, cfg.jail_settings(), vm_id, console_log)
    jail.reap_when_done(child)
    return result


async def _jail_cleanup(cfg: HelperConfig, ctx: CallContext, params: dict[str, Any]) -> Any:
    vm_id = validate_jail.jail_cleanup_request(params)
    async with jail.lock:
        return await asyncio.to_thread(jail.cleanup, cfg.jail_settings(), vm_id)


METHODS: Mapping[str, MethodHandler] = {
    "priv.ping": _ping,
    "priv.ensure_bridge": _ensure_bridge,
    "priv.create_tap": _create_tap,
    "priv.delete_tap": _delete_tap,
    "priv.list_taps": _list_taps,
    "priv.delete_bridge": _delete_bridge,
    "priv.signal_process": _signal_process,
    "priv.kill_process": _kill_process,
    "priv.nat_add": _nat_add,
    "priv.nat_remove": _nat_remove,
    "priv.nat_list": _nat_list,
    "priv.jail_stage": _jail_stage,
    "priv.jail_launch": _jail_launch,
    "priv.jail_cleanup": _jail_cleanup,
    "priv.resolver_wire": resolver.handle_resolver_wire,
    "priv.resolver_unwire": resolver.handle_resolver_unwire,
}
