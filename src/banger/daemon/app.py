"""The owner daemon's composition root: layout, config, store, root-helper seam, services, RPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from banger import paths
from banger.daemon.ops import OperationRegistry
from banger.rpc.server import PeerCred, RpcServer

if TYPE_CHECKING:
    from banger.config import Config
    from banger.daemon.agents import AgentRegistry
    from banger.daemon.images import ImageService
    from banger.daemon.kernels import KernelService
    from banger.daemon.vms import VmService
    from banger.roothelper.client import PrivilegedOps
    from banger.store.db import Store
    from banger.vmm.base import Vmm

log = logging.getLogger("banger.daemon")

DNS_HOST = "127.0.0.1"
DNS_PORT = 42069


@dataclass
class Daemon:
    layout: paths.Layout
    config: Config
    store: Store
    helper: PrivilegedOps
    helper_socket: Path
    owner_uid: int
    dns_port: int = DNS_PORT
    ops: OperationRegistry = field(default_factory=OperationRegistry)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    dns: Any = None
    agents: AgentRegistry = field(default_factory=lambda: _agent_registry())
    _vms: VmService | None = None
    _kernels: KernelService | None = None
    _images: ImageService | None = None
    _vmm: Vmm | None = None

    def authorize(self, peer: PeerCred) -> str | None:
        # The socket is 0600 and owned by the owner; this is the second lock on the door.
        if peer.uid in (self.owner_uid, 0):
            return None
        return f"uid {peer.uid} is not allowed to use this daemon (owner uid is {self.owner_uid})"

    @property
    def vms(self) -> VmService:
        if self._vms is None:
            from banger.daemon.vms import VmService

            self._vms = VmService(self)
        return self._vms

    @property
    def kernels(self) -> KernelService:
        if self._kernels is None:
            from banger.daemon.kernels import KernelService

            self._kernels = KernelService(self)
        return self._kernels

    @property
    def images(self) -> ImageService:
        if self._images is None:
            from banger.daemon.images import ImageService

            self._images = ImageService(self)
        return self._images

    def vmm(self) -> Vmm:
        """The configured backend; `auto` is QEMU unless Firecracker is present and KVM runs guests."""
        if self._vmm is None:
            from banger.vmm.base import BACKENDS, Backend

            choice = self.config.vmm
            backend = Backend.FIRECRACKER if choice == "firecracker" else Backend.QEMU
            self._vmm = BACKENDS[backend]()
        return self._vmm

    def dns_set(self, name: str, ip: str) -> None:
        if self.dns is not None:
            self.dns.set_record(name, ip)

    def dns_remove(self, name: str) -> None:
        if self.dns is not None:
            self.dns.remove_record(name)


def _agent_registry() -> AgentRegistry:
    from banger.daemon.agents import AgentRegistry

    return AgentRegistry()


async def _start_dns(daemon: Daemon) -> None:
    try:
        from banger.network.dns import VmDnsServer
    except ImportError:
        return
    server = VmDnsServer()
    try:
        await server.start(DNS_HOST, daemon.dns_port)
    except Exception as exc:
        # VMs still work by IP; doctor reports the DNS problem.
        log.warning("DNS server not started", extra={"error": str(exc)})
        return
    daemon.dns = server


async def serve(daemon: Daemon, socket_path: Path) -> None:
    from banger.daemon.api import build_handlers

    server = RpcServer(
        "bangerd",
        build_handlers(daemon),
        authorize=daemon.authorize,
        trust_op_id=False,
        logger=log,
    )
    paths.ensure_private_dir(socket_path.parent)
    await _start_dns(daemon)
    await daemon.vms.reconcile()
    await server.start(socket_path)
    pidfile = daemon.layout.daemon_pidfile
    pidfile.write_text(f"{os.getpid()}\n")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stopping.set)
    log.info("bangerd listening", extra={"socket": str(socket_path), "mode": daemon.layout.mode,
                                          "uid": os.getuid()})
    try:
        await daemon.stopping.wait()
    finally:
        log.info("bangerd stopping")
        await server.close()
        await daemon.ops.cancel_all()
        daemon.agents.close_all()
        if daemon.dns is not None:
            with contextlib.suppress(Exception):
                await daemon.dns.close()
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()
