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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from banger import model, namegen
from banger.errors import BadRequest, BangerError, NotFound
from banger.network import ipam

if TYPE_CHECKING:
    from banger.daemon.app import Daemon
    from banger.vmm.base import VmProcess, VmSpec

log = logging.getLogger("banger.vms")

Stage = Callable[[str], None]
INIT_PATH = "/usr/local/libexec/banger-init"
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

    def _save(self, vm: model.VmRecord) -> model.VmRecord:
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
                                 "init"})
        init = p.get_str("init")
        if init not in ("", "fast", "systemd"):
            raise BadRequest(f"init {init!r} is not one of fast, systemd")
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
        if raw.get("init"):
            vm = self._save(replace(vm, runtime={**vm.runtime, "init": str(raw["init"])}))
        try:
            async with self.lock(vm.id):
                if not raw.get("no_start"):
                    vm = await self._start_locked(vm, stage)
                runtime = dict(vm.runtime)
                runtime.pop("creating", None)
                vm = self._save(replace(vm, runtime=runtime))
        except BaseException:
            # A create that fails leaves nothing behind: no row, no disk, no tap, no process.
            with contextlib.suppress(Exception):
                await self._delete_locked(self._reload(vm.id))
            raise
        return vm.to_json()

    def _reload(self, vm_id: str) -> model.VmRecord:
        from banger.store import vms as rows

        return rows.get_vm(self.d.store, vm_id)

    # --- start ---------------------------------------------------------------------------------------
    async def start(self, vm: model.VmRecord, stage: Stage) -> model.VmRecord:
        async with self.lock(vm.id):
            vm = self._reload(vm.id)
            if vm.state == model.VmState.RUNNING and self._alive(vm):
                return vm
            return await self._start_locked(vm, stage)

    async def _ensure_bridge(self) -> None:
        if not self._bridge_ready:
            cfg = self.d.config
            await self.d.helper.ensure_bridge(cfg.bridge_name, cfg.bridge_ip, cfg.cidr)
            self._bridge_ready = True

    async def _start_locked(self, vm: model.VmRecord, stage: Stage) -> model.VmRecord:
        from banger.store import images as image_rows

        image = image_rows.get_image(self.d.store, vm.image_id)
        vm_dir = self.d.layout.vm_dir(vm.id)
        runtime: dict[str, Any] = dict(vm.runtime)
        try:
            await _enter(stage, "preparing disks")
            await asyncio.to_thread(self._prepare_disks, vm, image, vm_dir, runtime)
            await _enter(stage, "network")
            await self._ensure_bridge()
            if not runtime.get("tap"):
                runtime["tap"] = await self.taps.acquire()
                vm = self._save(replace(vm, runtime=runtime))
            if vm.spec.nat:
                await self._nat_add(vm, runtime)
            await _enter(stage, "booting")
            proc = await asyncio.to_thread(self._launch, vm, image, vm_dir, runtime)
            runtime.update(_proc_to_runtime(proc))
            vm = self._save(replace(vm, state=model.VmState.RUNNING, runtime=runtime, last_error=""))
            self.d.dns_set(vm.name, vm.guest_ip)
            await _enter(stage, "waiting for guest agent")
            await self._wait_agent(vm, proc.pid, Path(runtime["console_log"]))
            await _enter(stage, "waiting for guest")
            await self._wait_guest(vm, proc.pid, Path(runtime["console_log"]))
            if await asyncio.to_thread(self._pin_via_agent, vm):
                runtime["host_key_pinned"] = True
                vm = self._save(replace(vm, runtime=runtime))
            stage("running")
            return vm
        except BaseException as exc:
            await self._teardown(vm, runtime)
            message = exc.message if isinstance(exc, BangerError) else str(exc) or type(exc).__name__
            with contextlib.suppress(Exception):
                self._save(replace(vm, state=model.VmState.ERROR, runtime=runtime, last_error=message))
            raise

    def _prepare_disks(self, vm: model.VmRecord, image: model.ImageRecord, vm_dir: Path,
                       runtime: dict[str, Any]) -> None:
        from banger.guest import identity
        from banger.guest.ssh import ensure_key, public_key
        from banger.images import ext4
        from banger.vmm.base import mac_for

        vm_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cfg = self.d.config
        overlay = vm_dir / "overlay.ext4"
        work = vm_dir / "work.ext4"
        net = identity.NetworkIdentity(name=vm.name, ip=vm.guest_ip, prefix=cfg.cidr, gateway=cfg.bridge_ip,
                                       dns=cfg.default_dns, mac=mac_for(vm.id))
        if not overlay.exists():
            ext4.make_empty_ext4(overlay, vm.spec.system_overlay_size_bytes, label="overlay")
            ext4.write_files(overlay, identity.overlay_files(net))
        if not work.exists():
            ensure_key(cfg.ssh_key_path)
            seed = Path(image.work_seed_path) if image.work_seed_path else None
            ext4.make_empty_ext4(work, vm.spec.disk_size_bytes, label="work")
            if seed is not None and seed.exists():
                _copy_seed(seed, work, vm_dir)
            sync = [identity.SyncEntry(e.host, e.guest, e.mode) for e in cfg.file_sync]
            files = identity.work_files(public_key(cfg.ssh_key_path), identity.host_git_identity(), sync)
            ext4.write_files(work, files)
        runtime.update({"vm_dir": str(vm_dir), "overlay": str(overlay), "work_disk": str(work),
                        "mac": net.mac, "console_log": str(vm_dir / "console.log")})

    def agent_socket(self, vm: model.VmRecord) -> Path:
        return self.d.layout.runtime_dir / "vms" / vm.short_id / "agent.sock"

    async def _wait_agent(self, vm: model.VmRecord, pid: int, console: Path) -> None:
        """Until the guest agent answers health, watching the VMM. An image without the agent (registered
        by hand, older builds) is not an error: the SSH wait that follows is the readiness check then."""
        import time

        from banger.guest.agent_client import AgentVersionMismatch

        deadline = time.monotonic() + self.d.config.ssh_wait_timeout
        vmm = self.d.vmm()
        sock = self.agent_socket(vm)
        while time.monotonic() < deadline:
            if not vmm.alive(pid):
                raise BangerError(f"vm {vm.name!r} stopped while booting: {_tail_lines(console, 6)}",
                                  hint=f"the full console is in {console}")
            try:
                await asyncio.to_thread(self.d.agents.connect, vm.id, sock, time.monotonic() + 3.0)
                return
            except AgentVersionMismatch:
                raise
            except BangerError:
                if "banger: guest ready" in _tail_lines(console, 3):
                    log.info("guest is up without an agent", extra={"vm": vm.name})
                    return

    def _pin_via_agent(self, vm: model.VmRecord) -> bool:
        """Pin the guest's SSH host key as read through the agent: a local channel no one on the network
        can stand in, so this is stronger than trust-on-first-use, and the client skips its key scan."""
        from banger.guest import knownhosts

        try:
            data, _ = self.d.agents.get(vm.id, self.agent_socket(vm), timeout=3.0).read_file(
                "/etc/ssh/ssh_host_ed25519_key.pub")
            fields = data.decode("ascii", "replace").split()
            if len(fields) < 2:
                return False
            knownhosts.pin(self.d.layout.known_hosts, f"{vm.name}.vm", [f"{fields[0]} {fields[1]}"],
                           vm_name=vm.name)
            return True
        except BangerError as exc:
            log.info("host key not pinned through the agent", extra={"vm": vm.name, "error": exc.message})
            return False

    async def _wait_guest(self, vm: model.VmRecord, pid: int, console: Path) -> None:
        """Until the guest's sshd accepts TCP, watching the VMM: a guest that dies during boot is
        reported at once with the end of its console, instead of after the SSH deadline. Past the
        deadline the VM is left running for the caller's own SSH wait to report on."""
        import time

        deadline = time.monotonic() + self.d.config.ssh_wait_timeout
        vmm = self.d.vmm()
        while time.monotonic() < deadline:
            if not vmm.alive(pid):
                tail = _tail_lines(console, 6)
                raise BangerError(f"vm {vm.name!r} stopped while booting: {tail}",
                                  hint=f"the full console is in {console}")
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(vm.guest_ip, 22), 1.0)
            except (OSError, TimeoutError):
                await asyncio.sleep(0.2)
                continue
            writer.close()
            return
        log.warning("guest did not open port 22 before the deadline", extra={"vm": vm.name})

    def _vm_spec(self, vm: model.VmRecord, image: model.ImageRecord, vm_dir: Path,
                 runtime: dict[str, Any]) -> VmSpec:
        from banger.vmm.base import DriveSpec, NicSpec, VmSpec

        kernel, initrd = self._boot_files(image)
        # Per VM (`--init`), else the image's default; banger's fast init unless the image says otherwise.
        init_mode = str(vm.runtime.get("init") or image.extra.get("init", "fast"))
        cmdline = (f"console=ttyS0 root=/dev/vda ro rootfstype=ext4 init={INIT_PATH} banger.overlay=/dev/vdb "
                   f"banger.work=/dev/vdc banger.init={init_mode} panic=-1")
        run_dir = self.d.layout.runtime_dir / "vms" / vm.short_id
        return VmSpec(
            vm_id=vm.id, name=vm.name, vcpu=vm.spec.vcpu, memory_mib=vm.spec.memory_mib,
            kernel=kernel, initrd=initrd, cmdline=cmdline, console_log=vm_dir / "console.log", run_dir=run_dir,
            agent_socket=run_dir / "agent.sock",
            drives=(DriveSpec("rootfs", Path(image.rootfs_path), read_only=True, root=True),
                    DriveSpec("overlay", Path(runtime["overlay"])),
                    DriveSpec("work", Path(runtime["work_disk"]))),
            nics=(NicSpec("net0", runtime["tap"], runtime["mac"]),),
        )

    def _boot_files(self, image: model.ImageRecord) -> tuple[Path, Path | None]:
        from banger.store import kernels as kernel_rows

        if image.kernel_ref:
            k = kernel_rows.get_kernel(self.d.store, image.kernel_ref)
            kernel = Path(k.vmlinux_path or k.kernel_path)
            return kernel, Path(k.initrd_path) if k.initrd_path else None
        return Path(image.kernel_path), Path(image.initrd_path) if image.initrd_path else None

    def _launch(self, vm: model.VmRecord, image: model.ImageRecord, vm_dir: Path,
                runtime: dict[str, Any]) -> VmProcess:
        spec = self._vm_spec(vm, image, vm_dir, runtime)
        vmm = self.d.vmm()
        spec.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        proc = vmm.launch(vmm.plan(spec))
        vmm.configure(proc, spec)
        return proc

    async def _nat_add(self, vm: model.VmRecord, runtime: dict[str, Any]) -> None:
        await self.d.helper.nat_add(vm.id, vm.guest_ip, runtime["tap"])
        runtime["nat"] = True

    # --- stop / kill / delete ----------------------------------------------------------------------
    def _alive(self, vm: model.VmRecord) -> bool:
        pid = vm.runtime.get("pid")
        if not pid:
            return False
        return self.d.vmm().alive(int(pid))

    async def stop(self, vm: model.VmRecord, *, force: bool = False) -> model.VmRecord:
        async with self.lock(vm.id):
            vm = self._reload(vm.id)
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

    def _guest_poweroff(self, vm: model.VmRecord) -> bool:
        """Ask the guest to power off, through its agent or else over SSH; True if it accepted."""
        try:
            self.d.agents.get(vm.id, self.agent_socket(vm), timeout=3.0).poweroff(timeout=5.0)
            return True
        except BangerError as exc:
            log.info("guest poweroff through the agent failed", extra={"vm": vm.name, "error": exc.message})
        return self._ssh_poweroff(vm)

    def _ssh_poweroff(self, vm: model.VmRecord) -> bool:
        """Ask the guest to power off over SSH (systemd or banger's fast init); True if it accepted.

        ACPI power-button events need a listener in the guest, which a small init does not have, so
        the guest is asked directly, like the original banger does.
        """
        from banger.guest import knownhosts, ssh
        from banger.system.run import run

        cfg = self.d.config
        alias = f"{vm.name}.vm"
        try:
            if not knownhosts.lookup(self.d.layout.known_hosts, alias):
                knownhosts.pin(self.d.layout.known_hosts, alias, knownhosts.scan_host_key(vm.guest_ip, timeout=3),
                               vm_name=vm.name)
            script = ("sync; if [ -d /run/systemd/system ]; then systemctl --no-block poweroff; "
                      "else kill -TERM 1; fi")
            argv = ssh.ssh_argv(vm.guest_ip, key=cfg.ssh_key_path, known_hosts=self.d.layout.known_hosts,
                                host_alias=alias, command=["sh", "-c", script], tty=False, control_dir=None,
                                connect_timeout=3)
            return run(argv, check=False, timeout=10).returncode == 0
        except BangerError as exc:
            log.info("guest poweroff over ssh failed", extra={"vm": vm.name, "error": exc.message})
            return False

    async def _stop_locked(self, vm: model.VmRecord, *, force: bool = False) -> model.VmRecord:
        runtime = dict(vm.runtime)
        proc = _proc_from_runtime(vm.id, runtime)
        if proc is not None:
            vmm = self.d.vmm()
            if force or not vmm.alive(proc.pid):
                await asyncio.to_thread(vmm.kill, proc)
            else:
                asked = await asyncio.to_thread(self._guest_poweroff, vm)
                await asyncio.to_thread(vmm.stop, proc, STOP_GRACE if asked else 3.0)
        await self._teardown(vm, runtime)
        for key in ("pid", "control_socket", "pidfile", "stderr_log", "sockets", "started_at", "run_dir"):
            runtime.pop(key, None)
        state = model.VmState.STOPPED if vm.state != model.VmState.CREATED or proc else vm.state
        return self._save(replace(vm, state=state, runtime=runtime))

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
        proc = _proc_from_runtime(vm.id, runtime)
        if proc is not None and not self.d.vmm().alive(proc.pid):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.d.vmm().kill, proc)

    async def delete(self, vm: model.VmRecord) -> None:
        async with self.lock(vm.id):
            await self._delete_locked(self._reload(vm.id))
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
        """A VMM launched just before the daemon died has a pidfile but no pid in the record."""
        from banger.vmm.base import VmProcess

        if vm.runtime.get("pid"):
            return
        run_dir = self.d.layout.runtime_dir / "vms" / vm.short_id
        pidfile = run_dir / "qemu.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        vmm = self.d.vmm()
        if vmm.alive(pid):
            proc = VmProcess(vm_id=vm.id, pid=pid, run_dir=run_dir, control_socket=run_dir / "qmp.sock",
                             pidfile=pidfile, stderr_log=run_dir / "qemu.stderr.log", sockets=())
            vmm.kill(proc)

    # --- daemon start ------------------------------------------------------------------------------
    async def reconcile(self) -> None:
        """Re-adopt VMs whose VMM survived a daemon restart; clean up the ones that died."""
        for vm in self.all():
            if vm.runtime.get("creating"):
                log.info("removing a vm whose create was interrupted", extra={"vm": vm.name})
                async with self.lock(vm.id):
                    self._kill_unrecorded_vmm(vm)
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
            return self._save(replace(self._reload(vm.id), workspace=workspace))


def _copy_seed(seed: Path, work: Path, vm_dir: Path) -> None:
    """Copy the image's /root seed into a fresh work disk (rdump out, write in; no mounts)."""
    import tempfile

    from banger.images import ext4
    from banger.images.inject import GuestFile

    with tempfile.TemporaryDirectory(dir=vm_dir) as tmp:
        root = Path(tmp)
        ext4.rdump_root(seed, root)
        files: list[GuestFile] = []
        for path in sorted(root.rglob("*")):
            rel = "/" + str(path.relative_to(root))
            if path.is_symlink() or rel == "/lost+found" or rel.startswith("/lost+found/"):
                continue
            if path.is_dir():
                files.append(GuestFile(rel, None, path.stat().st_mode & 0o7777, kind="dir"))
            elif path.is_file():
                files.append(GuestFile(rel, path.read_bytes(), path.stat().st_mode & 0o7777))
        if files:
            ext4.write_files(work, files)


async def _enter(stage: Stage, name: str) -> None:
    """Report a stage. BANGER_TEST_STAGE_DELAY="<stage>=<seconds>" holds the create there: fault
    injection for the tests that kill the daemon in the middle of a given stage."""
    import os

    stage(name)
    wanted, _, seconds = os.environ.get("BANGER_TEST_STAGE_DELAY", "").partition("=")
    if wanted == name and seconds:
        await asyncio.sleep(float(seconds))


def _tail_lines(path: Path, count: int) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no console output)"
    return " | ".join(lines[-count:]) or "(no console output)"


def _proc_to_runtime(proc: VmProcess) -> dict[str, Any]:
    return {"pid": proc.pid, "run_dir": str(proc.run_dir), "control_socket": str(proc.control_socket),
            "pidfile": str(proc.pidfile), "stderr_log": str(proc.stderr_log),
            "sockets": [str(s) for s in proc.sockets], "sidecar_pids": list(proc.sidecar_pids),
            "started_at": proc.started_at}


def _proc_from_runtime(vm_id: str, runtime: dict[str, Any]) -> VmProcess | None:
    from banger.vmm.base import VmProcess

    if not runtime.get("pid"):
        return None
    return VmProcess(vm_id=vm_id, pid=int(runtime["pid"]), run_dir=Path(runtime["run_dir"]),
                     control_socket=Path(runtime["control_socket"]), pidfile=Path(runtime["pidfile"]),
                     stderr_log=Path(runtime["stderr_log"]), sockets=tuple(Path(s) for s in runtime["sockets"]),
                     sidecar_pids=tuple(int(p) for p in runtime.get("sidecar_pids", ())),
                     started_at=float(runtime.get("started_at", 0.0)))



async def set_spec(svc: VmService, vm: model.VmRecord, raw: dict[str, Any]) -> model.VmRecord:
    """`vm set`: CPU and memory apply at the next start (refused while running); the work disk only
    grows, with the VM stopped; NAT switches on or off at once."""
    from banger.rpc.protocol import Params

    p = Params(raw, allowed={"ref", "vcpu", "memory_mib", "disk_size_bytes", "nat"})
    vcpu = p.get_int("vcpu", minimum=1, maximum=32)
    memory = p.get_int("memory_mib", minimum=128, maximum=65536)
    disk = p.get_int("disk_size_bytes", minimum=64 << 20)
    nat = raw.get("nat")
    if nat is not None and not isinstance(nat, bool):
        raise BadRequest(f"param 'nat' must be true or false, got {nat!r}")
    async with svc.lock(vm.id):
        vm = svc._reload(vm.id)
        running = vm.state == model.VmState.RUNNING
        if running and (vcpu is not None or memory is not None or disk is not None):
            raise BadRequest(f"vm {vm.name!r} is running; vcpu, memory and disk size change only while stopped",
                             hint=f"banger vm stop {vm.name}, then set, then start")
        spec = vm.spec
        if disk is not None and disk != spec.disk_size_bytes:
            if disk < spec.disk_size_bytes:
                raise BadRequest(f"the work disk can only grow (now {spec.disk_size_bytes} bytes, asked {disk})")
            work = svc.d.layout.vm_dir(vm.id) / "work.ext4"
            if work.exists():
                await asyncio.to_thread(_grow_ext4, work, disk)
        runtime = dict(vm.runtime)
        if nat is not None and nat != spec.nat and running:
            if nat:
                await svc._nat_add(vm, runtime)
            else:
                await svc.d.helper.nat_remove(vm.id)
                runtime.pop("nat", None)
        spec = replace(spec, vcpu=vcpu or spec.vcpu, memory_mib=memory or spec.memory_mib,
                       disk_size_bytes=disk or spec.disk_size_bytes, nat=spec.nat if nat is None else nat)
        return svc._save(replace(vm, spec=spec, runtime=runtime))


def _grow_ext4(image: Path, size: int) -> None:
    import os

    from banger.system.run import run

    run(["e2fsck", "-f", "-p", str(image)], check=False)
    os.truncate(image, size)
    run(["resize2fs", str(image)])
