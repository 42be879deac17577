"""`QemuVmm`: the `Vmm` Protocol for QEMU `-M microvm`.

QEMU's argv is its whole configuration, so `configure()` does nothing and `launch()` ends with the VM
running: it spawns QEMU in its own session (so the VM outlives a daemon restart), then waits on a
concrete signal, QMP `query-status` saying "running", with a deadline. If QEMU exits first, the error
carries the tail of its stderr log, and nothing is left behind.

Processes are identified by pid *and* by their command line (`/proc/<pid>/cmdline`: argv[0] basename
`qemu-system-x86_64` and this VM's pidfile path among the arguments) before any signal is sent, so a
recycled pid is never killed. Children we started are reaped through their Popen objects; a VM adopted
after a daemon restart is watched through /proc instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
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


def _runs(pid: int, basename: str, marker: Path | None = None) -> bool:
    """`pid` is a live process whose argv[0] is named `basename` (and has `marker` among its args)."""
    argv = procs.cmdline(pid)
    if not argv or os.path.basename(argv[0]) != basename:
        return False
    return marker is None or str(marker) in argv[1:]


def _child(proc: VmProcess, pid: int) -> ChildHandle | None:
    return next((c for c in proc.children if c.pid == pid), None)


def _poll(proc: VmProcess, pid: int, basename: str, marker: Path) -> str | None:
    """None while `pid` runs; once it is gone (and reaped, if it is our child), how it ended."""
    child = _child(proc, pid)
    if child is not None:
        returncode = child.poll()
        return None if returncode is None else procs.describe(returncode)
    with contextlib.suppress(ChildProcessError):
        reaped, status = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return procs.describe(os.waitstatus_to_exitcode(status))
    return None if _runs(pid, basename, marker) else procs.describe(None)


def _wait_gone(proc: VmProcess, pid: int, basename: str, marker: Path, timeout: float) -> str | None:
    """How `pid` ended, or None if it still runs after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        ended = _poll(proc, pid, basename, marker)
        if ended is not None or time.monotonic() >= deadline:
            return ended
        time.sleep(procs.POLL)


def _sigkill(pid: int, basename: str, marker: Path) -> None:
    if _runs(pid, basename, marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# --- the backend --------------------------------------------------------------------------------------


class QemuVmm:
    """QEMU microvm. `accel` defaults to what `kvm_probe.choose_accel()` finds usable on this host;
    `tsc_khz` defaults to the host's (0 disables `tsc_early_khz`)."""

    def __init__(self, *, qemu_bin: str | None = None, accel: Accel | None = None,
                 tsc_khz: int | None = None) -> None:
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
        sidecar_argv = vhost_vsock_argv(spec)
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
        if running is not None and _runs(running, QEMU_BASENAME, plan.pidfile):
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
        deadline = time.monotonic() + timeout
        last = "QMP socket not there yet"
        while True:
            ended = _poll(proc, proc.pid, QEMU_BASENAME, proc.pidfile)
            if ended is not None:
                raise BangerError(
                    f"QEMU for VM {proc.vm_id} {ended} before the VM was running: "
                    f"{procs.tail(proc.stderr_log) or 'no output'}",
                    hint=f"full log: {proc.stderr_log}",
                )
            remaining = deadline - time.monotonic()
            if proc.control_socket.exists():
                try:
                    status = qmp.query_status(proc.control_socket, timeout=min(max(remaining, 0.1), 1.0))
                except BangerError as exc:
                    last = exc.message
                else:
                    if status == "running":
                        return
                    last = f"status is {status!r}"
            if time.monotonic() >= deadline:
                raise BangerError(f"VM {proc.vm_id} was not running within {timeout:g}s ({last})",
                                  hint=f"see {proc.stderr_log}")
            time.sleep(procs.POLL)

    # --- pause / resume -----------------------------------------------------------------------------

    def pause(self, proc: VmProcess) -> None:
        qmp.stop(proc.control_socket)

    def resume(self, proc: VmProcess) -> None:
        qmp.cont(proc.control_socket)

    # --- stop / kill --------------------------------------------------------------------------------

    def stop(self, proc: VmProcess, timeout: float) -> StopOutcome:
        if _poll(proc, proc.pid, QEMU_BASENAME, proc.pidfile) is not None:
            self._finish(proc)
            return "gone"
        try:
            qmp.system_powerdown(proc.control_socket, timeout=min(timeout, 5.0))
        except BangerError as exc:
            log.warning("VM %s: ACPI powerdown failed (%s); killing QEMU", proc.vm_id, exc.message)
            self.kill(proc)
            return "killed"
        ended = _wait_gone(proc, proc.pid, QEMU_BASENAME, proc.pidfile, timeout)
        if ended is not None:
            log.info("VM %s powered off (QEMU %s)", proc.vm_id, ended)
            self._finish(proc)
            return "powerdown"
        log.info("VM %s ignored the ACPI power button for %gs; killing QEMU", proc.vm_id, timeout)
        self.kill(proc)
        return "killed"

    def kill(self, proc: VmProcess) -> None:
        _sigkill(proc.pid, QEMU_BASENAME, proc.pidfile)
        if _wait_gone(proc, proc.pid, QEMU_BASENAME, proc.pidfile, procs.KILL_WAIT) is None:
            raise BangerError(f"QEMU for VM {proc.vm_id} (pid {proc.pid}) survived SIGKILL for {procs.KILL_WAIT:g}s")
        self._finish(proc)

    def alive(self, pid: int) -> bool:
        return _runs(pid, QEMU_BASENAME)

    # --- teardown helpers ---------------------------------------------------------------------------

    def _finish(self, proc: VmProcess) -> None:
        """After QEMU is gone: stop its sidecars (they do not exit with it), remove sockets and pidfile."""
        self._kill_sidecars(proc)
        procs.remove(*proc.sockets, proc.pidfile)

    def _kill_sidecars(self, proc: VmProcess) -> None:
        for pid in proc.sidecar_pids:
            child = _child(proc, pid)
            if child is not None:
                procs.kill_child(child)
                continue
            # Adopted after a daemon restart: only a vhost-device-vsock serving one of our sockets.
            marker = next((s for s in proc.sockets if _runs(pid, VHOST_VSOCK_BIN, s)), None)
            if marker is not None:
                _sigkill(pid, VHOST_VSOCK_BIN, marker)
                _wait_gone(proc, pid, VHOST_VSOCK_BIN, marker, procs.KILL_WAIT)


