"""The daemon's side of the privilege seam.

The daemon depends on `PrivilegedOps`, never on sockets: tests can inject a fake for fault injection,
production uses `HelperClient`, which forwards the daemon's current op_id with every call so one
`journalctl --grep op-…` finds both the daemon's and the helper's lines.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from banger import log as blog
from banger.errors import BangerError
from banger.rpc import client as rpc_client

if TYPE_CHECKING:
    from banger.vmm.firecracker.launcher import JailRequest

log = logging.getLogger("banger.roothelper.client")

DEFAULT_TIMEOUT = 60.0


class PrivilegedOps(Protocol):
    """Everything the daemon may ask root for. Mirrors the helper's method allowlist."""

    async def ping(self) -> dict[str, Any]: ...

    async def ensure_bridge(self, name: str, ip: str, prefix: int) -> dict[str, Any]: ...

    async def create_tap(self, name: str, bridge: str) -> dict[str, Any]: ...

    async def delete_tap(self, name: str) -> dict[str, Any]: ...

    async def delete_bridge(self, name: str) -> dict[str, Any]: ...

    async def list_taps(self, bridge: str) -> dict[str, Any]: ...

    async def signal_process(self, pid: int, signal: str) -> dict[str, Any]: ...

    async def kill_process(self, pid: int) -> dict[str, Any]: ...

    async def nat_add(self, vm_id: str, guest_ip: str, tap: str, uplink: str | None = None) -> dict[str, Any]: ...

    async def nat_remove(self, vm_id: str) -> dict[str, Any]: ...

    async def nat_list(self) -> list[dict[str, Any]]: ...

    async def resolver_wire(self, bridge: str, dns_addr: str) -> dict[str, Any]: ...

    async def resolver_unwire(self, bridge: str) -> dict[str, Any]: ...

    async def jail_stage(self, request: JailRequest) -> dict[str, Any]: ...

    async def jail_launch(self, vm_id: str, console_log: Path) -> dict[str, Any]: ...

    async def jail_cleanup(self, vm_id: str) -> dict[str, Any]: ...


class HelperUnreachable(rpc_client.Unreachable):
    """Nothing answers on the helper socket."""


class HelperClient:
    """`PrivilegedOps` over the helper's Unix socket; one connection per call."""

    def __init__(self, socket_path: Path, *, system: bool, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.system = system
        self.timeout = timeout

    def _unreachable(self, detail: str) -> HelperUnreachable:
        log.warning("root helper not reachable", extra={"socket": str(self.socket_path), "error": detail})
        hint = (
            "run: sudo banger system restart"
            if self.system
            else "run banger as root once so it can start the helper, or see banger doctor"
        )
        return HelperUnreachable(f"root helper not reachable at {self.socket_path}", hint=hint)

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        try:
            return await rpc_client.acall(
                self.socket_path, method, params, op_id=blog.current_op_id.get(), timeout=self.timeout
            )
        except rpc_client.Unreachable as exc:
            raise self._unreachable(exc.message) from None
        except ConnectionError as exc:
            # The helper died or restarted mid-call.
            raise self._unreachable(f"{method}: {exc}") from None

    async def _call_dict(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        result = await self.call(method, params)
        return result if isinstance(result, dict) else {"result": result}

    async def ping(self) -> dict[str, Any]:
        return await self._call_dict("priv.ping")

    async def ensure_bridge(self, name: str, ip: str, prefix: int) -> dict[str, Any]:
        return await self._call_dict("priv.ensure_bridge", {"name": name, "ip": ip, "prefix": prefix})

    async def create_tap(self, name: str, bridge: str) -> dict[str, Any]:
        return await self._call_dict("priv.create_tap", {"name": name, "bridge": bridge})

    async def delete_tap(self, name: str) -> dict[str, Any]:
        return await self._call_dict("priv.delete_tap", {"name": name})

    async def list_taps(self, bridge: str) -> dict[str, Any]:
        return await self._call_dict("priv.list_taps", {"bridge": bridge})

    async def delete_bridge(self, name: str) -> dict[str, Any]:
        return await self._call_dict("priv.delete_bridge", {"name": name})

    async def resolver_wire(self, bridge: str, dns_addr: str) -> dict[str, Any]:
        """Route `~vm` on the bridge link to banger's DNS server, where systemd-resolved runs."""
        return await self._call_dict("priv.resolver_wire", {"bridge": bridge, "dns_addr": dns_addr})

    async def resolver_unwire(self, bridge: str) -> dict[str, Any]:
        return await self._call_dict("priv.resolver_unwire", {"bridge": bridge})

    async def signal_process(self, pid: int, signal: str) -> dict[str, Any]:
        return await self._call_dict("priv.signal_process", {"pid": pid, "signal": signal})

    async def kill_process(self, pid: int) -> dict[str, Any]:
        return await self._call_dict("priv.kill_process", {"pid": pid})

    async def nat_add(self, vm_id: str, guest_ip: str, tap: str, uplink: str | None = None) -> dict[str, Any]:
        """Outbound NAT for one VM; without `uplink` the helper uses its default-route interface."""
        params: dict[str, Any] = {"vm_id": vm_id, "guest_ip": guest_ip, "tap": tap}
        if uplink is not None:
            params["uplink"] = uplink
        return await self._call_dict("priv.nat_add", params)

    async def nat_remove(self, vm_id: str) -> dict[str, Any]:
        return await self._call_dict("priv.nat_remove", {"vm_id": vm_id})

    async def nat_list(self) -> list[dict[str, Any]]:
        result = await self.call("priv.nat_list")
        return [entry for entry in result if isinstance(entry, dict)] if isinstance(result, list) else []

    async def jail_stage(self, request: JailRequest) -> dict[str, Any]:
        """Build the VM's chroot under the helper's jailer_chroot_base; answers what was staged."""
        return await self._call_dict("priv.jail_stage", request.params())

    async def jail_launch(self, vm_id: str, console_log: Path) -> dict[str, Any]:
        """Run the jailer on the staged chroot: {"pid": Firecracker's pid, "api_socket": the link to it, ...}."""
        return await self._call_dict("priv.jail_launch", {"vm_id": vm_id, "console_log": str(console_log)})

    async def jail_cleanup(self, vm_id: str) -> dict[str, Any]:
        """Remove the VM's chroot and its links (idempotent): {"removed": [jail directories]}."""
        return await self._call_dict("priv.jail_cleanup", {"vm_id": vm_id})


class HelperJailLauncher:
    """`vmm.firecracker.launcher.JailLauncher` over `PrivilegedOps`, for the daemon.

    `Vmm` methods run in worker threads while the helper client lives on the daemon's event loop, so each
    call is handed to `loop` and waited for; the op_id travels along (the context is copied into the task).
    """

    def __init__(self, helper: PrivilegedOps, loop: asyncio.AbstractEventLoop) -> None:
        self.helper = helper
        self.loop = loop

    def _wait(self, call: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_loop = False
        if on_loop:  # waiting here for the loop to run the call would hang it for good
            call.close()
            raise BangerError("a jail launcher call was made on the daemon's event loop; run the Vmm method in "
                              "a worker thread (asyncio.to_thread)")
        return asyncio.run_coroutine_threadsafe(call, self.loop).result()

    def stage(self, request: JailRequest) -> None:
        self._wait(self.helper.jail_stage(request))

    def launch(self, vm_id: str, console_log: Path) -> int:
        pid = self._wait(self.helper.jail_launch(vm_id, console_log)).get("pid")
        if isinstance(pid, bool) or not isinstance(pid, int) or pid < 2:
            raise BangerError(f"priv.jail_launch answered no usable pid ({pid!r}) for VM {vm_id}")
        return pid

    def cleanup(self, vm_id: str) -> None:
        self._wait(self.helper.jail_cleanup(vm_id))
