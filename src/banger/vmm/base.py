"""What every VMM backend shares: the VM description, the launch plan, the `Vmm` Protocol, the registry.

A backend turns a frozen `VmSpec` into a `LaunchPlan` with a pure `plan()` (argv, sockets it will
create, host files it opens), so the plan can be tested and checked by the root helper without a VM.
`launch()` executes the plan; `configure()` is where an API-driven VMM (Firecracker) sends its
configuration, while QEMU's argv already is the configuration. Only `BACKENDS` names every backend,
and one backend never imports another; shared helpers live here.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

Capability = Literal["pause", "snapshot"]
StopOutcome = Literal["powerdown", "killed", "gone"]
"""How `stop()` ended: the guest powered off, the VMM had to be killed, or it was already gone."""

CPUINFO = Path("/proc/cpuinfo")


class Backend(enum.StrEnum):
    FIRECRACKER = "firecracker"
    QEMU = "qemu"


@dataclass(frozen=True)
class DriveSpec:
    id: str
    path: Path
    read_only: bool = False
    root: bool = False


@dataclass(frozen=True)
class NicSpec:
    id: str
    tap: str
    mac: str


@dataclass(frozen=True)
class VsockSpec:
    """Firecracker-style hybrid vsock: the host end is the unix socket `uds_path` (`CONNECT <port>\\n`)."""

    cid: int
    uds_path: Path


@dataclass(frozen=True)
class VmSpec:
    vm_id: str
    name: str
    vcpu: int
    memory_mib: int
    kernel: Path
    initrd: Path | None
    cmdline: str
    console_log: Path
    run_dir: Path  # per-VM runtime directory: control socket, pidfile, VMM stderr log
    drives: tuple[DriveSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    vsock: VsockSpec | None = None
    agent_socket: Path | None = None  # virtio-serial agent channel, for hosts without a vsock transport


@dataclass(frozen=True)
class Sidecar:
    """A helper process the VMM needs running first (e.g. a vhost-user backend); it serves `socket`."""

    name: str
    argv: tuple[str, ...]
    socket: Path


@dataclass(frozen=True)
class LaunchPlan:
    vm_id: str
    argv: tuple[str, ...]
    run_dir: Path
    control_socket: Path  # QMP socket (QEMU) or API socket (Firecracker)
    pidfile: Path
    stderr_log: Path  # the VMM's stdout+stderr
    sockets_expected: tuple[Path, ...]  # sockets the VMM creates; stale ones are removed before launch
    files: tuple[Path, ...]  # host files the VMM opens (kernel, initrd, disks, logs): the root helper checks them
    env: tuple[tuple[str, str], ...] = ()
    sidecars: tuple[Sidecar, ...] = ()
    # Backend-private data `launch()` needs beyond argv (Firecracker: what the root helper stages in a jail).
    staging: object | None = None


class ChildHandle(Protocol):
    """The part of `subprocess.Popen` needed to reap a child we started (no subprocess import here)."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...


@dataclass(frozen=True)
class VmProcess:
    """A launched VMM. `children` holds the Popen objects when this process started it, for reaping;
    after a daemon restart a VmProcess rebuilt from pids works too (signals + /proc polling)."""

    vm_id: str
    pid: int
    run_dir: Path
    control_socket: Path
    pidfile: Path
    stderr_log: Path
    sockets: tuple[Path, ...]
    sidecar_pids: tuple[int, ...] = ()
    started_at: float = 0.0  # time.time() of the spawn
    children: tuple[ChildHandle, ...] = field(default=(), compare=False, repr=False)


class Vmm(Protocol):
    @property
    def backend(self) -> Backend: ...

    @property
    def capabilities(self) -> frozenset[Capability]: ...

    def plan(self, spec: VmSpec) -> LaunchPlan:
        """Pure: validate `spec` and describe the process to start. Raises BadRequest."""
        ...

    def launch(self, plan: LaunchPlan, *, timeout: float = 30.0) -> VmProcess:
        """Start the VMM in its own session (it outlives a daemon restart); nothing is left on failure."""
        ...

    def configure(self, proc: VmProcess, spec: VmSpec) -> None: ...

    def wait_running(self, proc: VmProcess, timeout: float) -> None: ...

    def stop(self, proc: VmProcess, timeout: float) -> StopOutcome:
        """Graceful: ask the guest to power off, wait up to `timeout`, else kill. Idempotent."""
        ...

    def kill(self, proc: VmProcess) -> None:
        """SIGKILL, reap, remove sockets and pidfile. Idempotent; a dead process is fine."""
        ...

    def alive(self, pid: int) -> bool: ...

    def adopt(self, vm_id: str, run_dir: Path) -> VmProcess | None:
        """The VMM still running for `vm_id` from what `run_dir` holds (pidfile, sockets), e.g. after a daemon
        restart; None when none runs. The pid is checked against /proc (its command line must name this VM's
        run directory), so a stale pidfile naming a recycled pid yields None, never someone else's process."""
        ...


class Pausable(Protocol):
    """Backends whose `capabilities` include "pause"."""

    def pause(self, proc: VmProcess) -> None: ...

    def resume(self, proc: VmProcess) -> None: ...


# --- registry -----------------------------------------------------------------------------------------


def _firecracker() -> Vmm:
    from banger.vmm.firecracker.backend import FirecrackerVmm

    return FirecrackerVmm()


def _qemu() -> Vmm:
    from banger.vmm.qemu.backend import QemuVmm

    return QemuVmm()


BACKENDS: dict[Backend, Callable[[], Vmm]] = {
    Backend.FIRECRACKER: _firecracker,
    Backend.QEMU: _qemu,
}


# --- shared helpers -----------------------------------------------------------------------------------


def mac_for(vm_id: str, index: int = 0) -> str:
    """A deterministic, locally administered unicast MAC for NIC `index` of a VM.

    Deterministic so a restarted (or restored) VM keeps its MAC and the guest's network config stays
    valid; locally administered (bit 1 of the first octet) so it cannot collide with a vendor's MAC.
    """
    digest = hashlib.sha256(f"banger-mac:{vm_id}:{index}".encode()).digest()
    first = (digest[0] & 0xFC) | 0x02  # clear multicast bit, set locally-administered bit
    return ":".join(f"{b:02x}" for b in (first, *digest[1:6]))


def host_tsc_khz(cpuinfo: Path = CPUINFO) -> int | None:
    """The host's TSC frequency in kHz from the first "cpu MHz" line, or None if unknown.

    Passed to TCG guests as `tsc_early_khz`: QEMU's microvm has no HPET or PM timer, so the guest
    cannot calibrate the TSC and sometimes hangs at boot without it (this-machine.md §5).
    """
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "cpu MHz":
            try:
                khz = round(float(value.strip()) * 1000)
            except ValueError:
                return None
            return khz if khz > 0 else None
    return None
