"""`FirecrackerVmm`: the `Vmm` Protocol for Firecracker, started directly or through the jailer.

Firecracker starts empty and is configured over its API socket, so the work is split the way the Protocol
expects: `launch()` spawns `firecracker --api-sock <run_dir>/fc.sock --id <short id>` in its own session
(so the VM outlives a daemon restart), writes the pidfile, and waits until the API answers GET /;
`configure()` sends the configuration (`config.apply`, which ends with InstanceStart). Any failure on the
way kills the process and removes what it created, so nothing is left behind.

With a `JailSetup` (config `jailer_enabled`), the jailer must start as root, so the root helper stages the
chroot and runs it (`launcher.JailLauncher`); `<run_dir>/fc.sock` is then a link to the socket inside the
chroot, Firecracker is configured with in-jail paths, and kill/stop also remove the chroot.

Firecracker writes the guest's serial console (ttyS0) to its stdout, so stdout *and* stderr go to the VM's
console log, opened for append (a restarted VM keeps its earlier boots). Firecracker's own log and metrics
go to files in the run directory once PUT /logger and PUT /metrics are applied; until then its few start-up
lines land in the console log too, which is where an early failure is worth seeing anyway.

Processes are identified by pid *and* by their command line (`/proc/<pid>/cmdline`: argv[0] named like the
firecracker binary and this VM's API socket among the arguments; jailed, the VM's `--id` and a root
directory that is the VM's chroot) before any signal is sent, so a recycled pid is never killed. Children we started are reaped through their Popen objects; a VM adopted after a
daemon restart is watched through /proc instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, replace
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
from banger.vmm.firecracker.jailer import (
    API_SOCK_IN_JAIL,
    JailPlan,
    jailed_config,
    jailer_argv,
    validate_jail_id,
)
from banger.vmm.firecracker.launcher import API_SOCKET_NAME, JailLauncher, JailRequest, JailSetup

log = logging.getLogger("banger.vmm.firecracker")

FC_BASENAME: Final = "firecracker"
SHORT_ID_LEN: Final = 8  # model.SHORT_ID_LEN: the id banger shows, and the name of the VM's run directory
UNIX_PATH_MAX: Final = 107  # sun_path is 108 bytes including the NUL
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


# --- the backend ---------------------------------------------------------------------------------------


class FirecrackerVmm:
    """Firecracker. `firecracker_bin` (config `firecracker_bin`) defaults to `firecracker` on PATH.

    Without `jail` Firecracker runs directly as the daemon's user (config `jailer_enabled = false`, or no
    root helper); with it, every VM runs jailed through `jail.launcher`.
    """

    def __init__(self, *, firecracker_bin: str | None = None, jailer_bin: str = "jailer",
                 jail: JailSetup | None = None) -> None:
        if firecracker_bin is None:
            firecracker_bin = find_binary(FC_BASENAME)
            if firecracker_bin is None:
                raise NotFound(
                    f"{FC_BASENAME} not found on PATH",
                    hint='install Firecracker and set firecracker_bin in config.toml, or set vmm = "qemu"',
                )
        self.firecracker_bin = firecracker_bin
        self.jailer_bin = jailer_bin
        self.jail = jail
        # A release binary is often kept under its release name (firecracker-v1.14.2-x86_64), and the jailer
        # names its copy after the resolved file.
        self._names = frozenset({FC_BASENAME, os.path.basename(firecracker_bin),
                                 os.path.basename(os.path.realpath(firecracker_bin))})
        self._jailer_names = frozenset({"jailer", os.path.basename(jailer_bin)})

    @property
    def backend(self) -> Backend:
        return Backend.FIRECRACKER

    @property
    def capabilities(self) -> frozenset[Capability]:
        # "snapshot": api.create_snapshot/load_snapshot exist, but restore (fresh process, disk copies)
        # is not wired into the Protocol yet.
        return frozenset({"pause"})

    def jail_plan(self, vm_id: str) -> JailPlan | None:
        """The VM's jail when this backend jails; the jailer wants canonical paths, hence realpath."""
        if self.jail is None:
            return None
        return JailPlan(chroot_base=os.path.realpath(self.jail.chroot_base), id=fc_id(vm_id),
                        exec_file=os.path.realpath(self.firecracker_bin), uid=self.jail.uid, gid=self.jail.gid)

    # --- plan ---------------------------------------------------------------------------------------

    def plan(self, spec: VmSpec, jail: JailPlan | None = None) -> LaunchPlan:
        """Pure apart from reading the kernel's first bytes (`check_kernel`). Raises BadRequest.

        `jail` defaults to this backend's (`jail_plan`); a jailed plan's argv is the jailer's, for the record:
        the root helper builds and runs its own from what it staged."""
        paths = runtime_paths(spec.run_dir)
        ident = fc_id(spec.vm_id)
        cfg = vm_config(spec)
        jail = jail or self.jail_plan(spec.vm_id)
        _check_socket_path("API", paths.api_socket)
        sockets = [paths.api_socket]
        if cfg.vsock is not None:
            sockets.append(Path(cfg.vsock.uds_path))
        staging: JailRequest | None = None
        if jail is None:
            argv = [self.firecracker_bin, "--api-sock", str(paths.api_socket), "--id", ident]
        else:
            if jail.id != ident:
                raise BadRequest(f"jail id {jail.id!r} does not match VM {spec.vm_id}'s id {ident!r}")
            staging = JailRequest(spec.vm_id, str(spec.run_dir), jail, cfg)
            staging.links()  # refuses files the run directory cannot link to
            argv = jailer_argv(jail, (), jailer=self.jailer_bin)
        files = [spec.kernel, *([spec.initrd] if spec.initrd is not None else []), *(d.path for d in spec.drives),
                 spec.console_log, paths.log, paths.metrics]
        return LaunchPlan(
            vm_id=spec.vm_id,
            argv=tuple(argv),
            run_dir=spec.run_dir,
            control_socket=paths.api_socket,
            pidfile=paths.pidfile,
            stderr_log=spec.console_log,  # stdout is the guest console; stderr goes with it
            sockets_expected=tuple(sockets),
            files=tuple(files),
            staging=staging,
        )

    # --- launch / configure -------------------------------------------------------------------------

    def launch(self, plan: LaunchPlan, *, timeout: float = 30.0) -> VmProcess:
        request = plan.staging if isinstance(plan.staging, JailRequest) else None
        if request is not None and self.jail is None:
            raise BangerError(f"VM {plan.vm_id}: a jailed Firecracker is started by the root helper, and this "
                              "backend has no jail launcher",
                              hint="set jailer_enabled = false in config.toml to launch Firecracker directly")
        plan.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        running = procs.read_pid(plan.pidfile)
        if running is not None and self._identify(plan.vm_id, plan.control_socket)(running):
            raise AlreadyExists(f"Firecracker is already running for VM {plan.vm_id} (pid {running})",
                                hint="stop the VM first")
        procs.remove(*plan.sockets_expected, plan.pidfile)
        deadline = time.monotonic() + timeout
        proc = VmProcess(vm_id=plan.vm_id, pid=0, run_dir=plan.run_dir, control_socket=plan.control_socket,
                         pidfile=plan.pidfile, stderr_log=plan.stderr_log, sockets=plan.sockets_expected,
                         started_at=time.time())
        if request is not None and self.jail is not None:
            proc = replace(proc, pid=_launch_jailed(self.jail.launcher, request, plan))
        else:
            try:
                with plan.stderr_log.open("ab") as out:
                    child = spawn(plan.argv, new_session=True, stdout=out.fileno(), stderr=out.fileno(),
                                  env=dict(plan.env))
            except BaseException:
                procs.remove(*plan.sockets_expected, plan.pidfile)
                raise
            proc = replace(proc, pid=child.pid, children=(child,))
        try:
            procs.write_pid(plan.pidfile, proc.pid)
            # Not `identify`: until the jailer has exec'd Firecracker its command line is the jailer's.
            wait_for_socket(plan.control_socket, max(deadline - time.monotonic(), 0.1),
                            alive=lambda: procs.poll(proc, proc.pid, procs.exists) is None)
        except BangerError as exc:
            self.kill(proc)
            raise BangerError(f"Firecracker for VM {plan.vm_id} did not start: {exc.message} "
                              f"({procs.tail(plan.stderr_log) or 'no output'})",
                              hint=f"see {plan.stderr_log}") from exc
        except BaseException:
            self.kill(proc)
            raise
        log.info("started Firecracker for VM %s: pid %d%s", plan.vm_id, proc.pid, " (jailed)" if request else "")
        return proc

    def configure(self, proc: VmProcess, spec: VmSpec) -> None:
        """Send the configuration and InstanceStart. On any error Firecracker is killed and the error (one
        line, with Firecracker's fault_message for an API error) is raised as is."""
        try:
            cfg = vm_config(spec)
            jail = self.jail_plan(spec.vm_id)
            if jail is not None:
                cfg = jailed_config(jail, cfg)
            with FirecrackerApi(proc.control_socket) as api:
                apply(api, cfg)
        except BaseException:
            log.warning("configuring Firecracker for VM %s failed; killing it", proc.vm_id)
            self.kill(proc)
            raise
        log.info("VM %s: InstanceStart accepted", proc.vm_id)

    def wait_running(self, proc: VmProcess, timeout: float) -> None:
        with FirecrackerApi(proc.control_socket, timeout=1.0) as api:
            def probe(limit: float) -> str | None:
                state = api.get_instance_info().get("state")
                return None if state == "Running" else f"state is {state!r}"

            procs.wait_running(proc, "Firecracker", self._identify(proc.vm_id, proc.control_socket), probe,
                               timeout, hint=f"see {proc.stderr_log} and {runtime_paths(proc.run_dir).log}")

    # --- pause / resume -----------------------------------------------------------------------------

    def pause(self, proc: VmProcess) -> None:
        with FirecrackerApi(proc.control_socket) as api:
            api.pause()

    def resume(self, proc: VmProcess) -> None:
        with FirecrackerApi(proc.control_socket) as api:
            api.resume()

    # --- stop / kill / alive / adopt ----------------------------------------------------------------

    def stop(self, proc: VmProcess, timeout: float) -> StopOutcome:
        def ctrl_alt_del() -> None:
            with FirecrackerApi(proc.control_socket, timeout=min(max(timeout, 0.1), 5.0)) as api:
                api.send_ctrl_alt_del()

        return procs.stop(proc, self._identify(proc.vm_id, proc.control_socket), what="Firecracker",
                          request="Ctrl+Alt+Del", ask=ctrl_alt_del, finish=lambda: self._finish(proc),
                          kill_vmm=lambda: self.kill(proc), timeout=timeout)

    def kill(self, proc: VmProcess) -> None:
        if proc.pid:
            procs.kill(proc, proc.pid, self._identify(proc.vm_id, proc.control_socket), "Firecracker")
        self._finish(proc)

    def alive(self, pid: int) -> bool:
        """`pid` is a live Firecracker started by banger: named like the binary, with an API socket named
        the way banger names them (direct or in a jail). A recycled pid fails one or the other."""
        argv = procs.cmdline(pid)
        if not argv or os.path.basename(argv[0]) not in self._names:
            return False
        sock = procs.option(argv, "--api-sock")
        return sock is not None and (os.path.basename(sock) == API_SOCKET_NAME or sock == API_SOCK_IN_JAIL)

    def adopt(self, vm_id: str, run_dir: Path) -> VmProcess | None:
        paths = runtime_paths(run_dir)
        pid = procs.read_pid(paths.pidfile)
        if pid is None or not self._identify(vm_id, paths.api_socket)(pid):
            return None
        return VmProcess(vm_id=vm_id, pid=pid, run_dir=run_dir, control_socket=paths.api_socket,
                         pidfile=paths.pidfile, stderr_log=_stdout_of(pid) or paths.log,
                         sockets=procs.sockets_in(run_dir), started_at=procs.start_time(pid))

    # --- helpers ------------------------------------------------------------------------------------

    def _finish(self, proc: VmProcess) -> None:
        """After Firecracker is gone: its sockets (or links) and pidfile, and its jail if it had one."""
        procs.remove(*proc.sockets, proc.pidfile)
        if self.jail is not None:
            self.jail.launcher.cleanup(proc.vm_id)

    def _identify(self, vm_id: str, api_socket: Path) -> procs.Identify:
        """This VM's Firecracker: direct, argv names `api_socket`; jailed, argv has the VM's `--id` and the
        in-jail socket, and the process's root is the chroot that `api_socket` links into. Also the jailer
        itself for the moment before it execs Firecracker (same pid, same `--id`)."""
        ident = fc_id(vm_id)

        def identify(pid: int) -> bool:
            argv = procs.cmdline(pid)
            name = os.path.basename(argv[0]) if argv else ""
            if name in self._jailer_names:
                return procs.option(argv, "--id") == ident
            if name not in self._names:
                return False
            sock = procs.option(argv, "--api-sock")
            if sock == str(api_socket):
                return True
            return sock == API_SOCK_IN_JAIL and procs.option(argv, "--id") == ident and _rooted_at(pid, api_socket)

        return identify


def _launch_jailed(launcher: JailLauncher, request: JailRequest, plan: LaunchPlan) -> int:
    """Stage and launch through the root helper; a failed launch removes the staged jail again."""
    launcher.stage(request)
    try:
        return launcher.launch(plan.vm_id, plan.stderr_log)
    except BaseException:
        try:
            launcher.cleanup(plan.vm_id)
        except BangerError as exc:
            log.warning("VM %s: removing the jail after a failed launch failed too: %s", plan.vm_id, exc)
        raise


def _rooted_at(pid: int, api_link: Path) -> bool:
    """The process's root directory is the chroot `api_link` points into (once the link is gone, the id
    check alone has to do)."""
    try:
        target = os.readlink(api_link)
    except OSError:
        return True
    try:
        root, chroot = os.stat(f"/proc/{pid}/root"), os.stat(os.path.dirname(target))
    except OSError:
        return False
    return (root.st_dev, root.st_ino) == (chroot.st_dev, chroot.st_ino)


def _stdout_of(pid: int) -> Path | None:
    """Where a running process's stdout goes (Firecracker's: the VM's console log)."""
    with contextlib.suppress(OSError):
        target = os.readlink(f"/proc/{pid}/fd/1")
        if target.startswith("/") and os.path.isfile(target):
            return Path(target)
    return None
