"""`QemuVmm`: the `Vmm` Protocol for QEMU `-M microvm`.

QEMU's argv is its whole configuration, so `configure()` does nothing and `launch()` ends with the VM
running: it spawns QEMU in its own session (so the VM outlives a daemon restart), then waits on a
concrete signal, QMP `query-status` saying "running", with a deadline. If QEMU exits first, the error
carries the tail of its stderr log, and nothing is left behind.

Processes are identified by pid *and* by their command line (`/proc/<pid>/cmdline`: argv[0] basename
`qemu-system-x86_64`, this VM's pidfile path among the arguments and its QMP socket in the chardev) before
any signal is sent, so a recycled pid is never killed. `adopt()` rebuilds the process from the run
directory alone (pidfile, sockets, the vhost-device-vsock sidecar found by its `--socket` argument). Children we started are reaped through their Popen objects; a VM adopted
after a daemon restart is watched through /proc instead.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from banger.errors import AlreadyExists, BangerError, NotFound
from banger.system.run import find_binary, spawn
from banger.vmm import procs
from banger.vmm.base import (
    Backend,
    Capability,
    ChildHandle,
    LaunchPlan,
    Sidecar,
    StopOutcome,
    VmProcess,
    VmSpec,
    host_tsc_khz,
)
from banger.vmm.qemu import qmp
from banger.vmm.qemu.argv import (
    QEMU_BASENAME,
    VHOST_VSOCK_BIN,
    Accel,
    qemu_argv,
    runtime_paths,
    vhost_vsock_argv,
)

log = logging.getLogger("banger.vmm.qemu")



# --- /proc helpers ------------------------------------------------------------------------------------

_QEMU = frozenset({QEMU_BASENAME})
_VHOST = frozenset({VHOST_VSOCK_BIN})


def _is_qemu(pidfile: Path, qmp_socket: Path) -> procs.Identify:
    """QEMU of this VM: its argv names the VM's pidfile (`-pidfile`) and QMP socket (the chardev's path=)."""
    qmp_arg = f"path={str(qmp_socket).replace(',', ',,')},"

    def identify(pid: int) -> bool:
        return procs.runs(pid, _QEMU, str(pidfile)) and any(qmp_arg in a for a in procs.cmdline(pid))

    return identify


def _is_sidecar(socket: Path, names: frozenset[str] = _VHOST) -> procs.Identify:
    return lambda pid: procs.runs(pid, names, str(socket))


# --- the backend --------------------------------------------------------------------------------------


class QemuVmm:
    """QEMU microvm. `accel` defaults to what `kvm_probe.choose_accel()` finds usable on this host;
    `tsc_khz` defaults to the host's (0 disables `tsc_early_khz`)."""

    def __init__(self, *, qemu_bin: str | None = None, accel: Accel | None = None,
                 tsc_khz: int | None = None, vhost_vsock_bin: str = VHOST_VSOCK_BIN) -> None:
        if qemu_bin is None:
            qemu_bin = find_binary(QEMU_BASENAME)
            if qemu_bin is None:
                raise NotFound(f"{QEMU_BASENAME} not found", hint="install qemu-system-x86; run `banger doctor`")
        self.qemu_bin = qemu_bin
        if accel is None:
            from banger.system.kvm_probe import choose_accel

            accel, self.accel_reason = choose_accel()
        else:
            self.accel_reason = "set explicitly"
        self.accel: Accel = accel
        self.tsc_khz = host_tsc_khz() if tsc_khz is None else (tsc_khz or None)
        self.vhost_vsock_bin = vhost_vsock_bin
        # A configured binary may have another name (a versioned file): recognise it by that too.
        self._vhost_names = _VHOST | {os.path.basename(vhost_vsock_bin)}

    @property
    def backend(self) -> Backend:
        return Backend.QEMU

    @property
    def capabilities(self) -> frozenset[Capability]:
        # "snapshot" needs the restore side (-incoming) and disk copies; qmp.migrate_to_file is the start.
        return frozenset({"pause"})

    # --- plan ---------------------------------------------------------------------------------------

    def plan(self, spec: VmSpec) -> LaunchPlan:
        argv = qemu_argv(spec, qemu_bin=self.qemu_bin, accel=self.accel, tsc_khz=self.tsc_khz)
        paths = runtime_paths(spec.run_dir)
        sockets = [paths.qmp_socket]
        if spec.agent_socket is not None:
            sockets.append(spec.agent_socket)
        sidecars: list[Sidecar] = []
        sidecar_argv = vhost_vsock_argv(spec, self.vhost_vsock_bin)
        if sidecar_argv is not None and spec.vsock is not None:
            sidecars.append(Sidecar(VHOST_VSOCK_BIN, tuple(sidecar_argv), paths.vhost_vsock_socket))
            sockets += [paths.vhost_vsock_socket, spec.vsock.uds_path]
        files = [spec.kernel, *([spec.initrd] if spec.initrd is not None else []), *(d.path for d in spec.drives),
                 spec.console_log]
        return LaunchPlan(
            vm_id=spec.vm_id,
            argv=tuple(argv),
            run_dir=spec.run_dir,
            control_socket=paths.qmp_socket,
            pidfile=paths.pidfile,
            stderr_log=paths.stderr_log,
            sockets_expected=tuple(sockets),
            files=tuple(files),
            sidecars=tuple(sidecars),
        )

    # --- launch -------------------------------------------------------------------------------------

    def launch(self, plan: LaunchPlan, *, timeout: float = 30.0) -> VmProcess:
        plan.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        running = procs.read_pid(plan.pidfile)
        if running is not None and _is_qemu(plan.pidfile, plan.control_socket)(running):
            raise AlreadyExists(f"QEMU is already running for VM {plan.vm_id} (pid {running})",
                                hint="stop the VM first")
        procs.remove(*plan.sockets_expected, plan.pidfile)

        deadline = time.monotonic() + timeout
        children: list[ChildHandle] = []
        try:
            for sidecar in plan.sidecars:
                children.append(self._start_sidecar(sidecar, plan.run_dir, deadline))
            with plan.stderr_log.open("wb") as out:
                child = spawn(plan.argv, new_session=True, stdout=out.fileno(), stderr=out.fileno(),
                              env=dict(plan.env))
        except BaseException:
            for started in children:
                procs.kill_child(started)
            procs.remove(*plan.sockets_expected, plan.pidfile)
            raise
        proc = VmProcess(
            vm_id=plan.vm_id,
            pid=child.pid,
            run_dir=plan.run_dir,
            control_socket=plan.control_socket,
            pidfile=plan.pidfile,
            stderr_log=plan.stderr_log,
            sockets=plan.sockets_expected,
            sidecar_pids=tuple(c.pid for c in children),
            started_at=time.time(),
            children=(child, *children),
        )
        log.info("started QEMU for VM %s: pid %d (%s)", plan.vm_id, child.pid, self.accel)
        try:
            self.wait_running(proc, max(deadline - time.monotonic(), 0.1))
        except BaseException:
            self.kill(proc)
            raise
        return proc

    def _start_sidecar(self, sidecar: Sidecar, run_dir: Path, deadline: float) -> ChildHandle:
        log_path = run_dir / f"{sidecar.name}.log"
        with log_path.open("wb") as out:
            child = spawn(sidecar.argv, new_session=True, stdout=out.fileno(), stderr=out.fileno())
        try:
            while not sidecar.socket.exists():
                returncode = child.poll()
                if returncode is not None:
                    raise BangerError(f"{sidecar.name} {procs.describe(returncode)} before creating {sidecar.socket}: "
                                      f"{procs.tail(log_path) or 'no output'}")
                if time.monotonic() >= deadline:
                    raise BangerError(f"{sidecar.name} did not create {sidecar.socket} in time",
                                      hint=f"see {log_path}")
                time.sleep(procs.POLL)
        except BaseException:
            procs.kill_child(child)
            raise
        return child

    def configure(self, proc: VmProcess, spec: VmSpec) -> None:
        """Nothing to do: QEMU's argv is its configuration."""

    def wait_running(self, proc: VmProcess, timeout: float) -> None:
        def probe(limit: float) -> str | None:
            status = qmp.query_status(proc.control_socket, timeout=limit)
            return None if status == "running" else f"status is {status!r}"

        procs.wait_running(proc, "QEMU", _is_qemu(proc.pidfile, proc.control_socket), probe, timeout,
                           hint=f"full log: {proc.stderr_log}")

    # --- pause / resume -----------------------------------------------------------------------------

    def pause(self, proc: VmProcess) -> None:
        qmp.stop(proc.control_socket)

    def resume(self, proc: VmProcess) -> None:
        qmp.cont(proc.control_socket)

    # --- stop / kill / adopt ------------------------------------------------------------------------

    def stop(self, proc: VmProcess, timeout: float) -> StopOutcome:
        return procs.stop(proc, _is_qemu(proc.pidfile, proc.control_socket), what="QEMU", request="ACPI powerdown",
                          ask=lambda: qmp.system_powerdown(proc.control_socket, timeout=min(timeout, 5.0)),
                          finish=lambda: self._finish(proc), kill_vmm=lambda: self.kill(proc), timeout=timeout)

    def kill(self, proc: VmProcess) -> None:
        procs.kill(proc, proc.pid, _is_qemu(proc.pidfile, proc.control_socket), "QEMU")
        self._finish(proc)

    def alive(self, pid: int) -> bool:
        return procs.runs(pid, _QEMU)

    def adopt(self, vm_id: str, run_dir: Path) -> VmProcess | None:
        paths = runtime_paths(run_dir)
        pid = procs.read_pid(paths.pidfile)
        if pid is None or not _is_qemu(paths.pidfile, paths.qmp_socket)(pid):
            return None
        return VmProcess(
            vm_id=vm_id,
            pid=pid,
            run_dir=run_dir,
            control_socket=paths.qmp_socket,
            pidfile=paths.pidfile,
            stderr_log=paths.stderr_log,
            sockets=procs.sockets_in(run_dir),
            sidecar_pids=tuple(procs.find(self._vhost_names, str(paths.vhost_vsock_socket))),
            started_at=procs.start_time(pid),
        )

    # --- teardown helpers ---------------------------------------------------------------------------

    def _finish(self, proc: VmProcess) -> None:
        """After QEMU is gone: stop its sidecars (they do not exit with it), remove sockets and pidfile."""
        for pid in proc.sidecar_pids:
            # Adopted after a daemon restart: only a vhost-device-vsock serving this VM's socket is ours.
            socket = runtime_paths(proc.run_dir).vhost_vsock_socket
            procs.kill(proc, pid, _is_sidecar(socket, self._vhost_names), VHOST_VSOCK_BIN)
        procs.remove(*proc.sockets, proc.pidfile)
