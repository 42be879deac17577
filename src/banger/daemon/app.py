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
    from banger.daemon.vmplan import BackendChoice
    from banger.daemon.vms import VmService
    from banger.roothelper.client import PrivilegedOps
    from banger.store.db import Store
    from banger.vmm.base import Backend, Vmm
    from banger.vmm.firecracker.launcher import JailSetup

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
    _vmms: dict[Backend, Vmm] = field(default_factory=dict)
    _backend: BackendChoice | None = None
    _kvm: tuple[bool, str] | None = None
    loop: asyncio.AbstractEventLoop | None = None  # set by serve(); worker threads reach the helper through it

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

    def default_backend(self) -> BackendChoice:
        """The configured backend; `auto` is QEMU unless Firecracker is present and KVM runs guests."""
        if self._backend is None:
            from banger.daemon.vmplan import choose_backend

            cfg = self.config
            self._backend = choose_backend(cfg.vmm, self._firecracker_bin(), self._kvm_runs_guests)
            log.info("vmm chosen", extra={"vmm": str(self._backend.backend), "reason": self._backend.reason})
        return self._backend

    def vmm_for(self, backend: Backend) -> Vmm:
        """One backend object per kind, made on first use (QEMU's probes KVM once)."""
        vmm = self._vmms.get(backend)
        if vmm is None:
            from banger.vmm.base import Backend

            if backend == Backend.FIRECRACKER:
                from banger.vmm.firecracker.backend import FirecrackerVmm

                vmm = FirecrackerVmm(firecracker_bin=self._firecracker_bin(), jailer_bin=str(self.config.jailer_bin),
                                     jail=self._jail_setup())
            else:
                from banger.vmm.qemu.backend import QemuVmm

                qemu_bin = str(self.config.qemu_bin) if self.config.qemu_bin else None
                from banger.daemon.vmplan import VHOST_VSOCK_BASENAME, find_vhost_vsock

                vmm = QemuVmm(qemu_bin=qemu_bin, accel="kvm" if self._kvm_runs_guests()[0] else "tcg",
                              vhost_vsock_bin=find_vhost_vsock(self.config) or VHOST_VSOCK_BASENAME)
            self._vmms[backend] = vmm
        return vmm

    def _jail_setup(self) -> JailSetup | None:
        """The jailer runs Firecracker as the owner in a chroot, through the root helper. Only a system install
        has a non-root owner to drop to (and taps owned by it); embedded mode, root's own, starts Firecracker
        directly and says so."""
        if not self.config.jailer_enabled:
            return None
        if self.layout.mode != "system" or self.owner_uid == 0:
            log.info("firecracker starts without the jailer: embedded mode has no unprivileged owner to drop to")
            return None
        from banger.roothelper.client import HelperJailLauncher
        from banger.vmm.firecracker.launcher import JailSetup

        if self.loop is None:
            from banger.errors import BangerError

            raise BangerError("the daemon's event loop is not running; cannot reach the root helper")
        return JailSetup(HelperJailLauncher(self.helper, self.loop), str(self.config.jailer_chroot_base),
                         self.owner_uid, os.getgid())

    def _firecracker_bin(self) -> str | None:
        from banger.system.run import find_binary

        configured = self.config.firecracker_bin
        if configured is not None:
            return str(configured) if configured.is_file() else None
        return find_binary("firecracker")

    def _kvm_runs_guests(self) -> tuple[bool, str]:
        """Whether a tiny probe guest really runs under KVM here (a PVM host's /dev/kvm does not run stock
        kernels); asked once per daemon."""
        if self._kvm is None:
            from banger.system.kvm_probe import probe_kvm

            probe = probe_kvm()
            self._kvm = (probe.usable, probe.reason)
        return self._kvm

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
    daemon.loop = asyncio.get_running_loop()
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
