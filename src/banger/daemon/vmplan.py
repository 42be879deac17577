"""What a VM runs on and boots with: its backend, its guest-agent channel and its VMM-neutral `VmSpec`.

The backend and the agent channel are chosen once, when the VM is created or started, and recorded in
its runtime record, so a VM keeps being managed the way it was launched even if the configuration or
the host's tools change while it runs (or while the daemon is down).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from banger.errors import BadRequest, NotFound

if TYPE_CHECKING:
    from banger import model
    from banger.config import Config
    from banger.vmm.base import Backend, VmProcess, VmSpec

INIT_PATH = "/usr/local/libexec/banger-init"
GUEST_CID = 3
"""Every VM's vsock device is private to its VMM (Firecracker's, or a per-VM vhost-device-vsock): no host
kernel vsock is involved, so the guest CIDs cannot collide and every VM uses the first free one."""

Transport = Literal["vsock", "serial"]
VHOST_VSOCK_BASENAME = "vhost-device-vsock"


@dataclass(frozen=True)
class BackendChoice:
    backend: Backend
    reason: str


def choose_backend(setting: str, firecracker_bin: str | None,
                   kvm_runs_guests: Callable[[], tuple[bool, str]]) -> BackendChoice:
    """`vmm = auto|qemu|firecracker` → a backend and why. `kvm_runs_guests` is only asked for `auto`
    with a Firecracker binary present (the probe boots a tiny guest, about 2 s on a PVM host)."""
    from banger.vmm.base import Backend

    if setting == "qemu":
        return BackendChoice(Backend.QEMU, "vmm = qemu")
    if setting == "firecracker":
        if firecracker_bin is None:
            raise NotFound("vmm = firecracker, but no firecracker binary was found",
                           hint='install it and set firecracker_bin in config.toml, or set vmm = "qemu"')
        return BackendChoice(Backend.FIRECRACKER, "vmm = firecracker")
    if firecracker_bin is None:
        return BackendChoice(Backend.QEMU, "auto: no firecracker binary")
    usable, reason = kvm_runs_guests()
    if usable:
        return BackendChoice(Backend.FIRECRACKER, f"auto: firecracker at {firecracker_bin}, KVM runs guests")
    return BackendChoice(Backend.QEMU, f"auto: KVM cannot run guests here ({reason}), so QEMU with TCG")


def parse_backend(value: str) -> Backend:
    from banger.vmm.base import Backend

    try:
        return Backend(value)
    except ValueError:
        raise BadRequest(f"vmm {value!r} is not one of firecracker, qemu") from None


@dataclass(frozen=True)
class AgentEndpoint:
    """The host end of a VM's agent channel: a hybrid-vsock unix socket (`CONNECT <port>`), served by
    Firecracker or by vhost-device-vsock under QEMU, or QEMU's virtio-serial chardev socket."""

    transport: Transport
    path: Path

    def to_runtime(self) -> dict[str, str]:
        return {"agent_transport": self.transport, "agent_path": str(self.path)}

    @staticmethod
    def from_runtime(runtime: dict[str, Any], run_dir: Path) -> AgentEndpoint:
        # Records written before the transport was recorded used the serial socket.
        transport = runtime.get("agent_transport", "serial")
        path = runtime.get("agent_path")
        if transport == "vsock":
            return AgentEndpoint("vsock", Path(path) if path else run_dir / "vsock.sock")
        return AgentEndpoint("serial", Path(path) if path else run_dir / "agent.sock")


def agent_endpoint_for(backend: Backend, run_dir: Path, vhost_vsock_bin: str | None) -> AgentEndpoint:
    """vsock wherever the VMM can offer it (always on Firecracker; on QEMU through vhost-device-vsock,
    since hosts like this one lack /dev/vhost-vsock), else QEMU's virtio-serial port."""
    from banger.vmm.base import Backend

    if backend == Backend.FIRECRACKER or vhost_vsock_bin is not None:
        return AgentEndpoint("vsock", run_dir / "vsock.sock")
    return AgentEndpoint("serial", run_dir / "agent.sock")


def find_vhost_vsock(cfg: Config) -> str | None:
    from banger.system.run import find_binary

    configured = cfg.vhost_vsock_bin
    if configured is not None:
        return str(configured) if configured.is_file() else None
    return find_binary(VHOST_VSOCK_BASENAME)


def boot_files(store: Any, image: model.ImageRecord, backend: Backend) -> tuple[Path, Path | None]:
    """Kernel and initrd: the image's kernel reference, or its own triple. Firecracker needs the ELF
    vmlinux; QEMU's microvm boots the same PVH vmlinux."""
    from banger.store import kernels as kernel_rows

    if image.kernel_ref:
        k = kernel_rows.get_kernel(store, image.kernel_ref)
        kernel = Path(k.vmlinux_path or k.kernel_path)
        return kernel, Path(k.initrd_path) if k.initrd_path else None
    return Path(image.kernel_path), Path(image.initrd_path) if image.initrd_path else None


def vm_spec(vm: model.VmRecord, image: model.ImageRecord, *, kernel: Path, initrd: Path | None,
            run_dir: Path, runtime: dict[str, Any], agent: AgentEndpoint) -> VmSpec:
    from banger.vmm.base import DriveSpec, NicSpec, VmSpec, VsockSpec

    # Per VM (`--init`), else the image's default; banger's fast init unless the image says otherwise.
    init_mode = str(runtime.get("init") or image.extra.get("init", "fast"))
    cmdline = (f"console=ttyS0 root=/dev/vda ro rootfstype=ext4 init={INIT_PATH} banger.overlay=/dev/vdb "
               f"banger.work=/dev/vdc banger.init={init_mode} panic=-1")
    vm_dir = Path(runtime["vm_dir"])
    return VmSpec(
        vm_id=vm.id, name=vm.name, vcpu=vm.spec.vcpu, memory_mib=vm.spec.memory_mib,
        kernel=kernel, initrd=initrd, cmdline=cmdline, console_log=vm_dir / "console.log", run_dir=run_dir,
        agent_socket=agent.path if agent.transport == "serial" else None,
        vsock=VsockSpec(GUEST_CID, agent.path) if agent.transport == "vsock" else None,
        drives=(DriveSpec("rootfs", Path(image.rootfs_path), read_only=True, root=True),
                DriveSpec("overlay", Path(runtime["overlay"])),
                DriveSpec("work", Path(runtime["work_disk"]))),
        nics=(NicSpec("net0", runtime["tap"], runtime["mac"]),),
    )


# --- the launched process, as recorded in the VM's runtime record --------------------------------------

PROC_KEYS = ("pid", "control_socket", "pidfile", "stderr_log", "sockets", "sidecar_pids", "started_at", "run_dir")


def proc_to_runtime(proc: VmProcess) -> dict[str, Any]:
    return {"pid": proc.pid, "run_dir": str(proc.run_dir), "control_socket": str(proc.control_socket),
            "pidfile": str(proc.pidfile), "stderr_log": str(proc.stderr_log),
            "sockets": [str(s) for s in proc.sockets], "sidecar_pids": list(proc.sidecar_pids),
            "started_at": proc.started_at}


def proc_from_runtime(vm_id: str, runtime: dict[str, Any]) -> VmProcess | None:
    from banger.vmm.base import VmProcess

    if not runtime.get("pid"):
        return None
    return VmProcess(vm_id=vm_id, pid=int(runtime["pid"]), run_dir=Path(runtime["run_dir"]),
                     control_socket=Path(runtime["control_socket"]), pidfile=Path(runtime["pidfile"]),
                     stderr_log=Path(runtime["stderr_log"]), sockets=tuple(Path(s) for s in runtime["sockets"]),
                     sidecar_pids=tuple(int(p) for p in runtime.get("sidecar_pids", ())),
                     started_at=float(runtime.get("started_at", 0.0)))
