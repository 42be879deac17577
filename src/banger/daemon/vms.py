"""The VM service: create, start, stop, delete, and re-adopting VMs after a daemon restart.

Lock order: a VM's own lock, then the create lock (name + IP reservation), then leaf locks (tap
pool). Blocking work (mkfs, debugfs, launching the VMM) runs in threads so the daemon keeps serving.
Every start records what it acquired in the VM's runtime record as it goes, so a failure, a crash or
a restart can always find and release it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from banger import model, namegen
from banger.daemon import vmguest, vmplan
from banger.errors import BadRequest, BangerError, NotFound
from banger.network import ipam

if TYPE_CHECKING:
    from banger.daemon.app import Daemon
    from banger.daemon.vmplan import AgentEndpoint
    from banger.vmm.base import Vmm, VmProcess

log = logging.getLogger("banger.vms")

Stage = Callable[[str], None]
STOP_GRACE = 15.0


def _now() -> str:
    from banger.store.db import utc_now

    return utc_now()


class VmService:
    def __init__(self, daemon: Daemon) -> None:
        from banger.network.taps import TapPool

        self.d = daemon
        self.create_lock = asyncio.Lock()
        self._locks: dict[str, asyncio.Lock] = {}
        cfg = daemon.config
        self.taps = TapPool(daemon.helper, cfg.bridge_name, cfg.tap_pool_size)
        self._bridge_ready = False

    def lock(self, vm_id: str) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    # --- lookups -------------------------------------------------------------------------------
    def all(self) -> list[model.VmRecord]:
        from banger.store import vms as rows

        return rows.list_vms(self.d.store)

    def resolve(self, ref: str) -> model.VmRecord:
        return model.resolve_ref(ref, self.all(), kind="vm")

    def save(self, vm: model.VmRecord) -> model.VmRecord:
        from banger.store import vms as rows

        vm = replace(vm, updated_at=_now())
        rows.update_vm(self.d.store, vm)
        return vm

    # --- create ------------------------------------------------------------------------------------
    def validate_spec(self, raw: dict[str, Any]) -> tuple[str, model.VmSpec, model.ImageRecord]:
        from banger import config as config_mod
        from banger.rpc.protocol import Params
        from banger.store import images as image_rows

        p = Params(raw, allowed={"name", "image", "vcpu", "memory_mib", "disk_size_bytes", "nat", "no_start",
                                 "init", "vmm"})
        init = p.get_str("init")
        if init not in ("", "fast", "systemd"):
            raise BadRequest(f"init {init!r} is not one of fast, systemd")
        if p.get_str("vmm"):
            vmplan.parse_backend(p.get_str("vmm"))
        name = p.get_str("name")
        if name:
            model.validate_vm_name(name)
        defaults = config_mod.resolve_vm_defaults(self.d.config)
        vcpu = p.get_int("vcpu")
        memory = p.get_int("memory_mib")
        disk = p.get_int("disk_size_bytes")
        if vcpu is not None and not 1 <= vcpu <= 32:
            raise BadRequest(f"vcpu must be between 1 and 32, got {vcpu}")
        if memory is not None and not 128 <= memory <= 65536:
            raise BadRequest(f"memory must be between 128 and 65536 MiB, got {memory}")
        if disk is not None and disk < 64 << 20:
            raise BadRequest(f"disk size must be at least 64M, got {disk} bytes")
        image_name = p.get_str("image") or self.d.config.default_image_name
        try:
            image = image_rows.get_image_by_name(self.d.store, image_name)
        except NotFound:
            raise NotFound(f"no image named {image_name!r}",
                           hint=f"pull it first: banger image pull {image_name}") from None
        spec = model.VmSpec(
            vcpu=vcpu or defaults.vcpu,
            memory_mib=memory or defaults.memory_mib,
            disk_size_bytes=disk or defaults.disk_size_bytes,
            system_overlay_size_bytes=defaults.system_overlay_size_bytes,
            nat=p.get_bool("nat"),
        )
        return name, spec, image

    async def reserve(self, name: str, spec: model.VmSpec, image: model.ImageRecord) -> model.VmRecord:
        """Name check, IP allocation and the row insert, atomically with respect to other creates."""
        from banger.store import vms as rows

        async with self.create_lock:
            existing = self.all()
            taken = {vm.name for vm in existing}
            if not name:
                name = namegen.generate(taken)
            elif name in taken:
                raise BangerError(f"vm name {name!r} is already taken", code="already_exists",
                                  hint="pick another --name or delete the old VM")
            cfg = self.d.config
            ip = ipam.allocate(cfg.bridge_ip, cfg.cidr, (vm.guest_ip for vm in existing))
            now = _now()
            # "creating" marks a create in flight: a daemon killed mid-create finds and removes it.
            vm = model.VmRecord(id=model.new_id(), name=name, image_id=image.id, image_name=image.name,
                                state=model.VmState.CREATED, spec=spec, guest_ip=ip, created_at=now,
                                updated_at=now, runtime={"creating": True})
            rows.insert_vm(self.d.store, vm)
            log.info("vm reserved", extra={"vm": name, "vm_id": vm.id, "ip": ip})
            return vm

    async def create(self, raw: dict[str, Any], stage: Stage) -> dict[str, Any]:
        stage("validating")
        name, spec, image = self.validate_spec(raw)
        stage("reserving")
        vm = await self.reserve(name, spec, image)
        chosen = {key: str(raw[value]) for key, value in (("init", "init"), ("vmm_requested", "vmm"))
                  if raw.get(value)}
        if chosen:
            vm = self.save(replace(vm, runtime={**vm.runtime, **chosen}))
        try:
            async with self.lock(vm.id):
                if not raw.get("no_start"):
                    vm = await self._start_locked(vm, stage)
                runtime = dict(vm.runtime)
                runtime.pop("creating", None)
                vm = self.save(replace(vm, runtime=runtime))
        except BaseException:
            # A create that fails leaves nothing behind: no row, no disk, no tap, no process.
            with contextlib.suppress(Exception):
                await self._delete_locked(self.reload(vm.id))
            raise
        return vm.to_json()

    def reload(self, vm_id: str) -> model.VmRecord:
        from banger.store import vms as rows

        return rows.get_vm(self.d.store, vm_id)

    # --- start ---------------------------------------------------------------------------------------
    async def start(self, vm: model.VmRecord, stage: Stage) -> model.VmRecord:
        async with self.lock(vm.id):
            vm = self.reload(vm.id)
            if vm.state == model.VmState.RUNNING and self._alive(vm):
                return vm
            return await self._start_locked(vm, stage)

    async def _ensure_bridge(self) -> None:
        if not self._bridge_ready:
            cfg = self.d.config
            await self.d.helper.ensure_bridge(cfg.bridge_name, cfg.bridge_ip, cfg.cidr)
            self._bridge_ready = True
            await self._wire_resolver()

    async def _wire_resolver(self) -> None:
        """Where systemd-resolved runs, send `.vm` lookups on the bridge's link to banger's DNS server.
        Never fatal: VMs work by IP, and doctor explains the wiring when it is missing."""
        cfg = self.d.config
        try:
            result = await self.d.helper.resolver_wire(cfg.bridge_name, f"127.0.0.1:{self.d.dns_port}")
        except BangerError as exc:
            log.warning("`.vm` names not wired into systemd-resolved", extra={"error": exc.message})
            return
        log.info("resolver wiring", extra={"bridge": cfg.bridge_name, "status": result.get("status")})

    async def _start_locked(self, vm: model.VmRecord, stage: Stage) -> model.VmRecord:
        from banger.daemon import vmdisks
        from banger.store import images as image_rows

        image = image_rows.get_image(self.d.store, vm.image_id)
        vm_dir = self.d.layout.vm_dir(vm.id)
        runtime: dict[str, Any] = dict(vm.runtime)
        try:
            await _enter(stage, "preparing disks")
            await asyncio.to_thread(vmdisks.prepare_disks, self.d.config, vm, image, vm_dir, runtime)
            # `--vmm` sticks to the VM; otherwise each start takes the host's current choice.
            requested = runtime.get("vmm_requested")
            runtime["vmm"] = str(requested or (await asyncio.to_thread(self.d.default_backend)).backend)
            await _enter(stage, "network")
            await self._ensure_bridge()
            if not runtime.get("tap"):
                runtime["tap"] = await self.taps.acquire()
                vm = self.save(replace(vm, runtime=runtime))
            if vm.spec.nat:
                await self.nat_add(vm, runtime)
            await _enter(stage, "booting")
            proc = await asyncio.to_thread(self._launch, vm, image, runtime)
            runtime.update(vmplan.proc_to_runtime(proc))
            vm = self.save(replace(vm, state=model.VmState.RUNNING, runtime=runtime, last_error=""))
            self.d.dns_set(vm.name, vm.guest_ip)
            await _enter(stage, "waiting for guest agent")
            await vmguest.wait_agent(self, vm, proc.pid, Path(runtime["console_log"]))
            await _enter(stage, "waiting for guest")
            await vmguest.wait_guest(self, vm, proc.pid, Path(runtime["console_log"]))
            if await asyncio.to_thread(vmguest.pin_via_agent, self, vm):
                runtime["host_key_pinned"] = True
                vm = self.save(replace(vm, runtime=runtime))
            stage("running")
            return vm
        except BaseException as exc:
            await self._teardown(vm, runtime)
            message = exc.message if isinstance(exc, BangerError) else str(exc) or type(exc).__name__
            with contextlib.suppress(Exception):
                self.save(replace(vm, state=model.VmState.ERROR, runtime=runtime, last_error=message))
            raise

    def run_dir(self, vm: model.VmRecord) -> Path:
        return self.d.layout.runtime_dir / "vms" / vm.short_id

    def agent_endpoint(self, vm: model.VmRecord) -> AgentEndpoint:
        from banger.daemon.vmplan import AgentEndpoint

        return AgentEndpoint.from_runtime(vm.runtime, self.run_dir(vm))

    def vmm(self, runtime: Mapping[str, Any]) -> Vmm:
        """The backend a VM was launched with, from its runtime record (QEMU for records older than
        that choice)."""
        return self.d.vmm_for(vmplan.parse_backend(str(runtime.get("vmm") or "qemu")))

    def _launch(self, vm: model.VmRecord, image: model.ImageRecord, runtime: dict[str, Any]) -> VmProcess:
        backend = vmplan.parse_backend(str(runtime["vmm"]))
        run_dir = self.run_dir(vm)
        agent = vmplan.agent_endpoint_for(backend, run_dir, vmplan.find_vhost_vsock(self.d.config))
        kernel, initrd = vmplan.boot_files(self.d.store, image, backend)
        spec = vmplan.vm_spec(vm, image, kernel=kernel, initrd=initrd, run_dir=run_dir, runtime=runtime,
                              agent=agent)
        runtime.update(agent.to_runtime())
        vmm = self.d.vmm_for(backend)
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        proc = vmm.launch(vmm.plan(spec))
        try:
            vmm.configure(proc, spec)
        except BaseException:
            vmm.kill(proc)
            raise
        return proc

    async def nat_add(self, vm: model.VmRecord, runtime: dict[str, Any]) -> None:
        await self.d.helper.nat_add(vm.id, vm.guest_ip, runtime["tap"])
        runtime["nat"] = True

    # --- stop / kill / delete ----------------------------------------------------------------------
    def _alive(self, vm: model.VmRecord) -> bool:
        pid = vm.runtime.get("pid")
        if not pid:
            return False
        return self.vmm(vm.runtime).alive(int(pid))

    async def stop(self, vm: model.VmRecord, *, force: bool = False) -> model.VmRecord:
        async with self.lock(vm.id):
            vm = self.reload(vm.id)
            return await self._stop_locked(vm, force=force)

    def ssh_info(self, vm: model.VmRecord) -> dict[str, Any]:
        """What a client needs to reach the guest over SSH with banger's key and pins."""
        cfg = self.d.config
        return {"name": vm.name, "ip": vm.guest_ip, "alias": f"{vm.name}.vm", "key": str(cfg.ssh_key_path),
                "known_hosts": str(self.d.layout.known_hosts), "wait_timeout": cfg.ssh_wait_timeout,
                "control_dir": str(self.control_dir), "state": str(vm.state),
                "host_key_pinned": bool(vm.runtime.get("host_key_pinned"))}

    @property
    def control_dir(self) -> Path:
        return self.d.layout.runtime_dir / "ssh"

    async def _stop_locked(self, vm: model.VmRecord, *, force: bool = False) -> model.VmRecord:
        runtime = dict(vm.runtime)
        proc = vmplan.proc_from_runtime(vm.id, runtime)
        if proc is not None:
            vmm = self.vmm(runtime)
            if force or not vmm.alive(proc.pid):
                await asyncio.to_thread(vmm.kill, proc)
            else:
                asked = await asyncio.to_thread(vmguest.guest_poweroff, self, vm)
                await asyncio.to_thread(vmm.stop, proc, STOP_GRACE if asked else 3.0)
        await self._teardown(vm, runtime)
        for key in vmplan.PROC_KEYS:
            runtime.pop(key, None)
        state = model.VmState.STOPPED if vm.state != model.VmState.CREATED or proc else vm.state
        return self.save(replace(vm, state=state, runtime=runtime))

    async def _teardown(self, vm: model.VmRecord, runtime: dict[str, Any]) -> None:
        """Release host resources of a VM that is not running (any subset may already be gone)."""
        from banger.guest import ssh

        self.d.dns_remove(vm.name)
        self.d.agents.drop(vm.id)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(ssh.stop_master, vm.guest_ip, host_alias=f"{vm.name}.vm",
                                    control_dir=self.control_dir)
        if runtime.pop("nat", None):
            with contextlib.suppress(Exception):
                await self.d.helper.nat_remove(vm.id)
        tap = runtime.pop("tap", None)
        if tap:
            await self.taps.release(str(tap))
        proc = vmplan.proc_from_runtime(vm.id, runtime)
        vmm = self.vmm(runtime)
        if proc is not None and not vmm.alive(proc.pid):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(vmm.kill, proc)

    async def delete(self, vm: model.VmRecord) -> None:
        async with self.lock(vm.id):
            await self._delete_locked(self.reload(vm.id))
        self._locks.pop(vm.id, None)

    async def _delete_locked(self, vm: model.VmRecord) -> None:
        from banger.store import vms as rows

        if vm.runtime.get("pid") or vm.runtime.get("tap"):
            vm = await self._stop_locked(vm, force=True)
        shutil.rmtree(self.d.layout.vm_dir(vm.id), ignore_errors=True)
        shutil.rmtree(self.d.layout.runtime_dir / "vms" / vm.short_id, ignore_errors=True)
        with contextlib.suppress(Exception):
            from banger.guest import knownhosts

            knownhosts.remove(self.d.layout.known_hosts, [f"{vm.name}.vm", vm.guest_ip])
        rows.delete_vm(self.d.store, vm.id)
        log.info("vm deleted", extra={"vm": vm.name, "vm_id": vm.id})

    def _kill_unrecorded_vmm(self, vm: model.VmRecord) -> None:
        """A VMM launched just before the daemon died is running, but its pid never reached the record:
        find it from the VM's run directory (each backend checks /proc, so a recycled pid is left alone)."""
        from banger.vmm.base import Backend

        if vm.runtime.get("pid"):
            return
        recorded = vmplan.parse_backend(str(vm.runtime.get("vmm") or "qemu"))
        for backend in (recorded, *(b for b in Backend if b != recorded)):
            try:
                vmm = self.d.vmm_for(backend)
            except BangerError:  # that backend is not installed: it cannot have launched anything
                continue
            proc = vmm.adopt(vm.id, self.run_dir(vm))
            if proc is not None:
                log.info("killing the VMM of an interrupted create", extra={"vm": vm.name, "pid": proc.pid})
                vmm.kill(proc)
                return

    # --- daemon start ------------------------------------------------------------------------------
    async def reconcile(self) -> None:
        """Re-adopt VMs whose VMM survived a daemon restart; clean up the ones that died."""
        for vm in self.all():
            if vm.runtime.get("creating"):
                log.info("removing a vm whose create was interrupted", extra={"vm": vm.name})
                async with self.lock(vm.id):
                    await asyncio.to_thread(self._kill_unrecorded_vmm, vm)
                    await self._delete_locked(vm)
                continue
            if vm.state != model.VmState.RUNNING and not vm.runtime.get("tap"):
                continue
            if vm.state == model.VmState.RUNNING and self._alive(vm):
                if vm.runtime.get("tap"):
                    self.taps.mark_in_use(str(vm.runtime["tap"]))
                self.d.dns_set(vm.name, vm.guest_ip)
                log.info("re-adopted running vm", extra={"vm": vm.name, "pid": vm.runtime.get("pid")})
                continue
            log.info("cleaning up a vm whose VMM is gone", extra={"vm": vm.name})
            async with self.lock(vm.id):
                await self._stop_locked(vm, force=True)
        await self.taps.adopt_leftovers()

    async def set_workspace(self, vm: model.VmRecord, workspace: dict[str, Any] | None) -> model.VmRecord:
        """Record (or clear) the VM's workspace: guest path, host path, HEAD commit, branch."""
        async with self.lock(vm.id):
            return self.save(replace(self.reload(vm.id), workspace=workspace))


async def _enter(stage: Stage, name: str) -> None:
    """Report a stage. BANGER_TEST_STAGE_DELAY="<stage>=<seconds>" holds the create there: fault
    injection for the tests that kill the daemon in the middle of a given stage."""
    import os

    stage(name)
    wanted, _, seconds = os.environ.get("BANGER_TEST_STAGE_DELAY", "").partition("=")
    if wanted == name and seconds:
        await asyncio.sleep(float(seconds))
