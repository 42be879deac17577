"""`FirecrackerVmm`: the `Vmm` Protocol for Firecracker, launched directly (the jailer is planned only).

Firecracker starts empty and is configured over its API socket, so the work is split the way the Protocol
expects: `launch()` spawns `firecracker --api-sock <run_dir>/fc.sock --id <short id>` in its own session
(so the VM outlives a daemon restart), writes the pidfile, and waits until the API answers GET /;
`configure()` sends the configuration (`config.apply`, which ends with InstanceStart). Any failure on the
way kills the process and removes what it created, so nothing is left behind.

Firecracker writes the guest's serial console (ttyS0) to its stdout, so stdout *and* stderr go to the VM's
console log, opened for append (a restarted VM keeps its earlier boots). Firecracker's own log and metrics
go to files in the run directory once PUT /logger and PUT /metrics are applied; until then its few start-up
lines land in the console log too, which is where an early failure is worth seeing anyway.

Processes are identified by pid *and* by their command line (`/proc/<pid>/cmdline`: argv[0] named like the
firecracker binary and this VM's API socket among the arguments) before any signal is sent, so a recycled
pid is never killed. Children we started are reaped through their Popen objects; a VM adopted after a
daemon restart is watched through /proc instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from banger.errors import AlreadyExists, BadRequest, BangerError, NotFound
from banger.system.run import find_binary, spawn
from banger.vmm import procs
from banger.vmm.base import (
    Backend,
    Capability,
    LaunchPlan,
    StopOutcome,
    VmProcess,
    VmSpec,
)
from banger.vmm.firecracker.api import FirecrackerApi, wait_for_socket
from banger.vmm.firecracker.config import Drive, FirecrackerVmConfig, NetIface, Vsock, apply
from banger.vmm.firecracker.jailer import API_SOCK_IN_JAIL, JailPlan, jailer_argv, validate_jail_id

log = logging.getLogger("banger.vmm.firecracker")

FC_BASENAME: Final = "firecracker"
SHORT_ID_LEN: Final = 8  # model.SHORT_ID_LEN: the id banger shows, and the name of the VM's run directory
UNIX_PATH_MAX: Final = 107  # sun_path is 108 bytes including the NUL
API_SOCKET_NAME: Final = "fc.sock"
# Firecracker's getting-started arguments. Firecracker adds the virtio-mmio device descriptions itself.
# reboot=k: a guest reboot goes through the i8042 keyboard controller, which makes Firecracker exit;
# panic=1: a panicking guest reboots (so exits) after 1 s instead of hanging; pci=off: there is no PCI bus.
DEFAULT_BOOT_ARGS: Final = ("console=ttyS0", "reboot=k", "panic=1", "pci=off")

_ELF_MAGIC = b"\x7fELF"
_BZIMAGE_MAGIC_OFFSET = 0x202  # "HdrS", the x86 boot protocol header of a bzImage
_BZIMAGE_MAGIC = b"HdrS"


@dataclass(frozen=True)
class RuntimePaths:
    api_socket: Path
    pidfile: Path
    log: Path  # Firecracker's own log (PUT /logger)
    metrics: Path  # PUT /metrics


def runtime_paths(run_dir: Path) -> RuntimePaths:
    return RuntimePaths(
        api_socket=run_dir / API_SOCKET_NAME,
        pidfile=run_dir / "firecracker.pid",
        log=run_dir / "firecracker.log",
        metrics=run_dir / "firecracker.metrics",
    )


# --- translation (pure) --------------------------------------------------------------------------------


def boot_args(cmdline: str) -> str:
    """`DEFAULT_BOOT_ARGS` the spec's cmdline does not set itself, then the spec's cmdline.

    A default is left out when the cmdline already has that key (e.g. the daemon's `panic=-1`), so the
    spec always wins and no parameter appears twice.
    """
    if "\n" in cmdline or "\0" in cmdline:
        raise BadRequest(f"kernel cmdline {cmdline!r} contains a newline or NUL")
    tokens = cmdline.split()
    keys = {token.split("=", 1)[0] for token in tokens}
    defaults = [arg for arg in DEFAULT_BOOT_ARGS if arg.split("=", 1)[0] not in keys]
    return " ".join([*defaults, *tokens])


def fc_id(vm_id: str) -> str:
    """Firecracker's `--id` (and the jail id): the VM's short id, which the jailer's rule accepts."""
    return validate_jail_id(vm_id[:SHORT_ID_LEN])


def vm_config(spec: VmSpec) -> FirecrackerVmConfig:
    """The Firecracker configuration of `spec`, with host paths (a direct launch). Raises BadRequest.

    `spec.agent_socket` is not used: Firecracker has no virtio-serial, so its guest agent talks over vsock.
    """
    paths = runtime_paths(spec.run_dir)
    check_kernel(spec.kernel)
    drives = tuple(
        Drive(d.id, _abs("drive", d.path), is_root_device=d.root, is_read_only=d.read_only)
        for d in spec.drives
    )
    nics = tuple(NetIface(n.id, n.tap, n.mac) for n in spec.nics)
    vsock = None
    if spec.vsock is not None:
        _check_socket_path("vsock", spec.vsock.uds_path)
        vsock = Vsock(spec.vsock.cid, str(spec.vsock.uds_path))
    return FirecrackerVmConfig(
        kernel_path=_abs("kernel", spec.kernel),
        initrd_path=None if spec.initrd is None else _abs("initrd", spec.initrd),
        boot_args=boot_args(spec.cmdline),
        vcpu=spec.vcpu,
        memory_mib=spec.memory_mib,
        drives=drives,
        net=nics,
        vsock=vsock,
        log_path=str(paths.log),
        metrics_path=str(paths.metrics),
        entropy=True,
    )


def check_kernel(kernel: Path) -> None:
    """Firecracker on x86_64 loads only an uncompressed ELF vmlinux. A kernel that is there but is not one
    (typically a bzImage / vmlinuz) is refused here with a hint; a missing one is left to Firecracker,
    whose PUT /boot-source error names it."""
    try:
        with kernel.open("rb") as handle:
            head = handle.read(_BZIMAGE_MAGIC_OFFSET + len(_BZIMAGE_MAGIC))
    except OSError:
        return
    if head.startswith(_ELF_MAGIC):
        return
    if head[_BZIMAGE_MAGIC_OFFSET:] == _BZIMAGE_MAGIC:
        raise BadRequest(
            f"kernel {str(kernel)!r} is a compressed bzImage; Firecracker boots only an uncompressed ELF vmlinux",
            hint="use the kernel's vmlinux (linux/scripts/extract-vmlinux can unpack a bzImage)",
        )
    raise BadRequest(f"kernel {str(kernel)!r} is not an ELF vmlinux; Firecracker boots only an uncompressed one")


def _abs(what: str, path: Path) -> str:
    if not path.is_absolute():
        raise BadRequest(f"{what} path {str(path)!r} must be absolute")
    return str(path)


def _check_socket_path(what: str, path: Path) -> None:
    _abs(f"{what} socket", path)
    size = len(os.fsencode(path))
    if size > UNIX_PATH_MAX:
        raise BadRequest(
            f"{what} socket path {str(path)!r} is {size} bytes; unix sockets allow at most {UNIX_PATH_MAX}",
            hint="use a shorter runtime directory",
        )


# --- /proc helpers -------------------------------------------------------------------------------------


def _api_sock_arg(argv: list[str]) -> str | None:
    for index, arg in enumerate(argv):
        if arg == "--api-sock" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--api-sock="):
            return arg.split("=", 1)[1]
    return None


def _write_pid(pidfile: Path, pid: int) -> None:
    tmp = pidfile.with_name(pidfile.name + ".tmp")
    tmp.write_text(f"{pid}\n", encoding="ascii")
    os.replace(tmp, pidfile)


# --- the backend ---------------------------------------------------------------------------------------


class FirecrackerVmm:
    """Firecracker, started directly by the daemon. `firecracker_bin` defaults to `firecracker` on PATH.

    `plan(spec, jail=...)` also describes a jailed start (jailer argv, in-jail socket), but executing it
    needs the root helper (staging the chroot, running the jailer as root), so `launch()` refuses it.
    """

    def __init__(self, *, firecracker_bin: str | None = None, jailer_bin: str = "jailer") -> None:
        if firecracker_bin is None:
            firecracker_bin = find_binary(FC_BASENAME)
            if firecracker_bin is None:
                raise NotFound(
                    f"{FC_BASENAME} not found on PATH",
                    hint='install Firecracker and set firecracker_bin in config.toml, or set vmm = "qemu"',
                )
        self.firecracker_bin = firecracker_bin
        self.jailer_bin = jailer_bin
        # A release binary is often kept under its release name (firecracker-v1.14.2-x86_64).
        self._names = frozenset({FC_BASENAME, os.path.basename(firecracker_bin)})

    @property
    def backend(self) -> Backend:
        return Backend.FIRECRACKER

    @property
    def capabilities(self) -> frozenset[Capability]:
        # "snapshot": api.create_snapshot/load_snapshot exist, but restore (fresh process, disk copies)
        # is not wired into the Protocol yet.
        return frozenset({"pause"})

    # --- plan ---------------------------------------------------------------------------------------

    def plan(self, spec: VmSpec, jail: JailPlan | None = None) -> LaunchPlan:
        """Pure apart from reading the kernel's first bytes (`check_kernel`). Raises BadRequest."""
        paths = runtime_paths(spec.run_dir)
        ident = fc_id(spec.vm_id)
        cfg = vm_config(spec)
        sockets: list[Path] = []
        if jail is None:
            _check_socket_path("API", paths.api_socket)
            control = paths.api_socket
            argv = [self.firecracker_bin, "--api-sock", str(control), "--id", ident]
        else:
            if jail.id != ident:
                raise BadRequest(f"jail id {jail.id!r} does not match VM {spec.vm_id}'s id {ident!r}")
            control = Path(jail.api_socket_path)
            _check_socket_path("API", control)
            argv = jailer_argv(jail, (), jailer=self.jailer_bin)
        sockets.append(control)
        if cfg.vsock is not None:
            sockets.append(Path(cfg.vsock.uds_path) if jail is None
                           else Path(jail.host_path(jail.jailed_path(cfg.vsock.uds_path))))
        files = [spec.kernel, *([spec.initrd] if spec.initrd is not None else []), *(d.path for d in spec.drives),
                 spec.console_log, paths.log, paths.metrics]
        return LaunchPlan(
            vm_id=spec.vm_id,
            argv=tuple(argv),
            run_dir=spec.run_dir,
            control_socket=control,
            pidfile=paths.pidfile,
            stderr_log=spec.console_log,  # stdout is the guest console; stderr goes with it
            sockets_expected=tuple(sockets),
            files=tuple(files),
        )

    # --- launch / configure -------------------------------------------------------------------------

    def launch(self, plan: LaunchPlan, *, timeout: float = 30.0) -> VmProcess:
        if "--exec-file" in plan.argv:
            raise BangerError(
                f"VM {plan.vm_id}: a jailed Firecracker is started by the root helper, which is not wired yet",
                hint="set jailer_enabled = false in config.toml to launch Firecracker directly",
            )
        plan.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        running = procs.read_pid(plan.pidfile)
        if running is not None and self._runs(running, plan.control_socket):
            raise AlreadyExists(f"Firecracker is already running for VM {plan.vm_id} (pid {running})",
                                hint="stop the VM first")
        procs.remove(*plan.sockets_expected, plan.pidfile)

        deadline = time.monotonic() + timeout
        try:
            with plan.stderr_log.open("ab") as out:
                child = spawn(plan.argv, new_session=True, stdout=out.fileno(), stderr=out.fileno(),
                              env=dict(plan.env))
        except BaseException:
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
            started_at=time.time(),
            children=(child,),
        )
        try:
            _write_pid(plan.pidfile, child.pid)
            wait_for_socket(plan.control_socket, max(deadline - time.monotonic(), 0.1),
                            alive=lambda: child.poll() is None)
        except BangerError as exc:
            self.kill(proc)
            raise BangerError(f"Firecracker for VM {plan.vm_id} did not start: {exc.message} "
                              f"({procs.tail(plan.stderr_log) or 'no output'})",
                              hint=f"see {plan.stderr_log}") from exc
        except BaseException:
            self.kill(proc)
            raise
        log.info("started Firecracker for VM %s: pid %d", plan.vm_id, child.pid)
        return proc

    def configure(self, proc: VmProcess, spec: VmSpec) -> None:
        """Send the configuration and InstanceStart. On any error Firecracker is killed and the error (one
        line, with Firecracker's fault_message for an API error) is raised as is."""
        try:
            cfg = vm_config(spec)
            with FirecrackerApi(proc.control_socket) as api:
                apply(api, cfg)
        except BaseException:
            log.warning("configuring Firecracker for VM %s failed; killing it", proc.vm_id)
            self.kill(proc)
            raise
        log.info("VM %s: InstanceStart accepted", proc.vm_id)

    def wait_running(self, proc: VmProcess, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "API socket not there yet"
        with FirecrackerApi(proc.control_socket, timeout=1.0) as api:
            while True:
                ended = self._poll(proc)
                if ended is not None:
                    raise BangerError(
                        f"Firecracker for VM {proc.vm_id} {ended} before the VM was running: "
                        f"{procs.tail(proc.stderr_log) or 'no output'}",
                        hint=f"see {proc.stderr_log} and {runtime_paths(proc.run_dir).log}",
                    )
                if proc.control_socket.exists():
                    try:
                        state = api.get_instance_info().get("state")
                    except BangerError as exc:
                        last = exc.message
                    else:
                        if state == "Running":
                            return
                        last = f"state is {state!r}"
                if time.monotonic() >= deadline:
                    raise BangerError(f"VM {proc.vm_id} was not running within {timeout:g}s ({last})",
                                      hint=f"see {proc.stderr_log}")
                time.sleep(procs.POLL)

    # --- pause / resume -----------------------------------------------------------------------------

    def pause(self, proc: VmProcess) -> None:
        with FirecrackerApi(proc.control_socket) as api:
            api.pause()

    def resume(self, proc: VmProcess) -> None:
        with FirecrackerApi(proc.control_socket) as api:
            api.resume()

    # --- stop / kill / alive ------------------------------------------------------------------------

    def stop(self, proc: VmProcess, timeout: float) -> StopOutcome:
        if self._poll(proc) is not None:
            procs.remove(*proc.sockets, proc.pidfile)
            return "gone"
        try:
            with FirecrackerApi(proc.control_socket, timeout=min(max(timeout, 0.1), 5.0)) as api:
                api.send_ctrl_alt_del()
        except BangerError as exc:
            log.warning("VM %s: Ctrl+Alt+Del failed (%s); killing Firecracker", proc.vm_id, exc.message)
            self.kill(proc)
            return "killed"
        ended = self._wait_gone(proc, timeout)
        if ended is not None:
            log.info("VM %s shut down (Firecracker %s)", proc.vm_id, ended)
            procs.remove(*proc.sockets, proc.pidfile)
            return "powerdown"
        log.info("VM %s ignored Ctrl+Alt+Del for %gs; killing Firecracker", proc.vm_id, timeout)
        self.kill(proc)
        return "killed"

    def kill(self, proc: VmProcess) -> None:
        child = next((c for c in proc.children if c.pid == proc.pid), None)
        if child is not None:
            procs.kill_child(child)
        else:
            if self._runs(proc.pid, proc.control_socket):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            if self._wait_gone(proc, procs.KILL_WAIT) is None:
                raise BangerError(
                    f"Firecracker for VM {proc.vm_id} (pid {proc.pid}) survived SIGKILL for {procs.KILL_WAIT:g}s"
                )
        procs.remove(*proc.sockets, proc.pidfile)

    def alive(self, pid: int) -> bool:
        """`pid` is a live Firecracker started by banger: named like the binary, with an API socket named
        the way banger names them (direct or in a jail). A recycled pid fails one or the other."""
        argv = procs.cmdline(pid)
        if not argv or os.path.basename(argv[0]) not in self._names:
            return False
        sock = _api_sock_arg(argv)
        return sock is not None and (os.path.basename(sock) == API_SOCKET_NAME or sock == API_SOCK_IN_JAIL)

    # --- helpers ------------------------------------------------------------------------------------

    def _runs(self, pid: int, api_socket: Path) -> bool:
        """`pid` is a live Firecracker serving exactly `api_socket` (as its argv names it)."""
        argv = procs.cmdline(pid)
        return bool(argv) and os.path.basename(argv[0]) in self._names and _api_sock_arg(argv) == str(api_socket)

    def _poll(self, proc: VmProcess) -> str | None:
        """None while Firecracker runs; once it is gone (and reaped, if it is our child), how it ended."""
        child = next((c for c in proc.children if c.pid == proc.pid), None)
        if child is not None:
            returncode = child.poll()
            return None if returncode is None else procs.describe(returncode)
        with contextlib.suppress(ChildProcessError):
            reaped, status = os.waitpid(proc.pid, os.WNOHANG)
            if reaped == proc.pid:
                return procs.describe(os.waitstatus_to_exitcode(status))
        return None if self._runs(proc.pid, proc.control_socket) else procs.describe(None)

    def _wait_gone(self, proc: VmProcess, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while True:
            ended = self._poll(proc)
            if ended is not None or time.monotonic() >= deadline:
                return ended
            time.sleep(procs.POLL)
