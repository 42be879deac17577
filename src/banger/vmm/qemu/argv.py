"""The QEMU command line for a banger VM: `-M microvm`, virtio-mmio devices, QMP. Pure functions only.

Choices (measured on the project's machine kind, this-machine.md):
* `-M microvm` with ACPI on: Debian's cloud kernel lacks VIRTIO_MMIO_CMDLINE_DEVICES, so it only finds
  the virtio-mmio devices through the ACPI DSDT, not through `virtio_mmio.device=` on the cmdline.
* TCG: `thread=multi` (one host thread per vCPU), `tb-size=32` (the default 1 GiB translation cache grows
  an idle guest's RSS from 230 MB to 650 MB), `-cpu max`, and `tsc_early_khz` on the cmdline (microvm
  has no HPET/PM timer; without it the guest sometimes hangs calibrating the TSC).
* Disks use `cache=writeback`: QEMU's default, it honours the guest's flushes, so a host crash cannot
  corrupt a sandbox's ext4 image (`cache=unsafe` drops flushes; it is only faster for throwaway disks).
  `cache=none` would add O_DIRECT, which tmpfs and some overlay setups refuse and which needs aligned
  I/O; under TCG the guest is the bottleneck anyway. Writable disks get `discard=unmap` so the guest's
  trims keep sparse images sparse.
* Taps never get `vhost=on`: without /dev/vhost-net QEMU 7.2 aborts on an assertion.
* Every option value that QEMU parses as `key=value,...` has its commas doubled (QEMU's escape), so
  a path with a comma cannot inject options.
* argv[0] keeps the basename `qemu-system-x86_64`: the root helper recognises banger's VMMs by it. The
  thread name (`-name …,process=`) is `banger-<short id>` so `ps -L`/`top` show which VM is which.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from banger.errors import BadRequest
from banger.model import validate_vm_name
from banger.vmm.base import VmSpec

Accel = Literal["kvm", "tcg"]

QEMU_BASENAME = "qemu-system-x86_64"
VHOST_VSOCK_BIN = "vhost-device-vsock"
AGENT_PORT_NAME = "org.banger.agent"

VCPU_MIN, VCPU_MAX = 1, 32
MEMORY_MIN_MIB, MEMORY_MAX_MIB = 128, 65536
CMDLINE_MAX = 2048  # x86 COMMAND_LINE_SIZE
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the NUL
VSOCK_CID_MIN, VSOCK_CID_MAX = 3, 0xFFFFFFFE  # 0-2 are reserved, -1 is VMADDR_CID_ANY
SHORT_ID_LEN = 8

_VM_ID = re.compile(r"^[a-z0-9][a-z0-9-]{7,63}$")
_DEVICE_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
_TAP = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # IFNAMSIZ is 16 including the NUL
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True)
class RuntimePaths:
    """The files QEMU creates in a VM's run directory (one place derives them)."""

    qmp_socket: Path
    pidfile: Path
    stderr_log: Path
    vhost_vsock_socket: Path


def runtime_paths(run_dir: Path) -> RuntimePaths:
    return RuntimePaths(
        qmp_socket=run_dir / "qmp.sock",
        pidfile=run_dir / "qemu.pid",
        stderr_log=run_dir / "qemu.stderr.log",
        vhost_vsock_socket=run_dir / "vhost-vsock.sock",
    )


def _opt(value: str | Path) -> str:
    """A value inside a QEMU `key=value,...` option: commas are escaped by doubling them."""
    return str(value).replace(",", ",,")


# --- validation ---------------------------------------------------------------------------------------


def _absolute(what: str, path: Path) -> None:
    if not path.is_absolute():
        raise BadRequest(f"{what} path {str(path)!r} must be absolute")


def _socket_path(what: str, path: Path) -> None:
    _absolute(what, path)
    size = len(str(path).encode())
    if size > UNIX_PATH_MAX:
        raise BadRequest(
            f"{what} path {str(path)!r} is {size} bytes; unix sockets allow at most {UNIX_PATH_MAX}",
            hint="use a shorter runtime directory",
        )


def validate_spec(spec: VmSpec) -> None:
    """Refuse a spec QEMU would reject late or obscurely; each message names the value and the rule."""
    if not _VM_ID.match(spec.vm_id):
        raise BadRequest(f"vm id {spec.vm_id!r} is invalid (allowed: 8-64 characters of a-z, 0-9, '-')")
    validate_vm_name(spec.name)
    if not VCPU_MIN <= spec.vcpu <= VCPU_MAX:
        raise BadRequest(f"vcpu count {spec.vcpu} is out of range (allowed: {VCPU_MIN}..{VCPU_MAX})")
    if not MEMORY_MIN_MIB <= spec.memory_mib <= MEMORY_MAX_MIB:
        raise BadRequest(
            f"memory {spec.memory_mib} MiB is out of range (allowed: {MEMORY_MIN_MIB}..{MEMORY_MAX_MIB} MiB)"
        )
    _absolute("kernel", spec.kernel)
    if spec.initrd is not None:
        _absolute("initrd", spec.initrd)
    _absolute("console log", spec.console_log)
    _absolute("run dir", spec.run_dir)
    paths = runtime_paths(spec.run_dir)
    _socket_path("QMP socket", paths.qmp_socket)

    drive_ids: dict[str, str] = {}
    disk_paths: dict[Path, str] = {}
    root: str | None = None
    for drive in spec.drives:
        if not _DEVICE_ID.match(drive.id):
            raise BadRequest(
                f"drive id {drive.id!r} is invalid (allowed: a letter, then up to 31 letters, digits, '-', '_')"
            )
        if drive.id in drive_ids:
            raise BadRequest(f"drive id {drive.id!r} is used twice")
        drive_ids[drive.id] = drive.id
        _absolute(f"drive {drive.id!r}", drive.path)
        if drive.path in disk_paths:
            raise BadRequest(f"disk {str(drive.path)!r} is attached twice (drives {disk_paths[drive.path]!r} "
                             f"and {drive.id!r})")
        disk_paths[drive.path] = drive.id
        if drive.root:
            if root is not None:
                raise BadRequest(f"drives {root!r} and {drive.id!r} are both marked root; at most one may be")
            root = drive.id

    nic_ids: set[str] = set()
    taps: set[str] = set()
    for nic in spec.nics:
        if not _DEVICE_ID.match(nic.id):
            raise BadRequest(
                f"nic id {nic.id!r} is invalid (allowed: a letter, then up to 31 letters, digits, '-', '_')"
            )
        if nic.id in nic_ids:
            raise BadRequest(f"nic id {nic.id!r} is used twice")
        nic_ids.add(nic.id)
        if not _TAP.match(nic.tap):
            raise BadRequest(f"tap name {nic.tap!r} is invalid (allowed: 1-15 characters of letters, digits, "
                             "'-', '_', '.')")
        if nic.tap in taps:
            raise BadRequest(f"tap {nic.tap!r} is used by two nics")
        taps.add(nic.tap)
        if not _MAC.match(nic.mac) or int(nic.mac[:2], 16) & 1:
            raise BadRequest(f"mac {nic.mac!r} of nic {nic.id!r} is invalid (expected a unicast address in "
                             "lowercase hex, like 02:00:00:00:00:01)")

    if spec.agent_socket is not None:
        _socket_path("agent socket", spec.agent_socket)
    if spec.vsock is not None:
        if not VSOCK_CID_MIN <= spec.vsock.cid <= VSOCK_CID_MAX:
            raise BadRequest(
                f"vsock cid {spec.vsock.cid} is out of range (allowed: {VSOCK_CID_MIN}..{VSOCK_CID_MAX})"
            )
        _socket_path("vsock", spec.vsock.uds_path)
        _socket_path("vhost-user socket", paths.vhost_vsock_socket)


# --- the kernel command line --------------------------------------------------------------------------


def kernel_cmdline(cmdline: str, *, accel: Accel, tsc_khz: int | None) -> str:
    """`cmdline` plus what a microvm guest needs, unless the caller already set it.

    `console=ttyS0` (the serial port is the console log), `panic=-1` (reboot at once on panic, which
    `-no-reboot` turns into a QEMU exit instead of a hung VM), and `tsc_early_khz` under TCG. Additions go
    before a `--`, since everything after it is passed to init.
    """
    for position, char in enumerate(cmdline):
        if ord(char) < 0x20 or ord(char) == 0x7F:
            raise BadRequest(f"kernel cmdline has a control character {char!r} at position {position}")
    tokens = cmdline.split()
    kernel_part, init_part = tokens, []
    if "--" in tokens:
        split = tokens.index("--")
        kernel_part, init_part = tokens[:split], tokens[split:]
    keys = {token.split("=", 1)[0] for token in kernel_part}
    extra: list[str] = []
    if "console" not in keys:
        extra.append("console=ttyS0")
    if "panic" not in keys:
        extra.append("panic=-1")
    if accel == "tcg" and tsc_khz and "tsc_early_khz" not in keys:
        extra.append(f"tsc_early_khz={tsc_khz}")
    result = " ".join([*kernel_part, *extra, *init_part])
    if len(result.encode()) > CMDLINE_MAX - 1:
        raise BadRequest(f"kernel cmdline is {len(result.encode())} bytes; the limit is {CMDLINE_MAX - 1}")
    return result


# --- argv ---------------------------------------------------------------------------------------------


def qemu_argv(spec: VmSpec, *, qemu_bin: str, accel: Accel, tsc_khz: int | None = None) -> list[str]:
    """The full QEMU argv for `spec`. Raises BadRequest for an invalid spec."""
    if not qemu_bin.startswith("/") or Path(qemu_bin).name != QEMU_BASENAME:
        raise BadRequest(f"qemu binary {qemu_bin!r} must be an absolute path ending in {QEMU_BASENAME}")
    if accel not in ("kvm", "tcg"):
        raise BadRequest(f"accelerator {accel!r} is not supported (allowed: kvm, tcg)")
    validate_spec(spec)
    paths = runtime_paths(spec.run_dir)
    cmdline = kernel_cmdline(spec.cmdline, accel=accel, tsc_khz=tsc_khz)

    # vhost-user devices need guest RAM the backend process can map: a shared memfd.
    machine = "microvm,acpi=on"
    if spec.vsock is not None:
        machine += ",memory-backend=mem"
    argv = [
        qemu_bin,
        "-name", f"{spec.name},process=banger-{spec.vm_id[:SHORT_ID_LEN]}",
        "-M", machine,
    ]  # fmt: skip
    if spec.vsock is not None:
        argv += ["-object", f"memory-backend-memfd,id=mem,size={spec.memory_mib}M,share=on"]
    if accel == "kvm":
        argv += [
            "-accel", "kvm",
            "-cpu", "host",
        ]  # fmt: skip
    else:
        argv += [
            "-accel", "tcg,thread=multi,tb-size=32",
            "-cpu", "max",
        ]  # fmt: skip
    argv += [
        "-m", f"{spec.memory_mib}M",
        "-smp", str(spec.vcpu),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-reboot",
        # A file chardev with append=on, so a restarted VM adds to its console log instead of wiping it.
        "-chardev", f"file,id=console,path={_opt(spec.console_log)},append=on",
        "-serial", "chardev:console",
        "-kernel", str(spec.kernel),
    ]  # fmt: skip
    if spec.initrd is not None:
        argv += ["-initrd", str(spec.initrd)]
    argv += ["-append", cmdline]

    # The root drive goes first so the guest sees it as /dev/vda; the others keep their order.
    for drive in sorted(spec.drives, key=lambda d: not d.root):
        mode = "readonly=on" if drive.read_only else "discard=unmap"
        argv += [
            "-drive", f"id={drive.id},file={_opt(drive.path)},format=raw,if=none,cache=writeback,{mode}",
            "-device", f"virtio-blk-device,drive={drive.id}",
        ]  # fmt: skip
    for nic in spec.nics:
        argv += [
            "-netdev", f"tap,id={nic.id},ifname={nic.tap},script=no,downscript=no",
            "-device", f"virtio-net-device,netdev={nic.id},mac={nic.mac}",
        ]  # fmt: skip
    if spec.agent_socket is not None:
        argv += [
            "-device", "virtio-serial-device",
            "-chardev", f"socket,id=agent,path={_opt(spec.agent_socket)},server=on,wait=off",
            "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        ]  # fmt: skip
    if spec.vsock is not None:
        argv += [
            "-chardev", f"socket,id=vsc,path={_opt(paths.vhost_vsock_socket)}",
            "-device", "vhost-user-vsock-device,chardev=vsc",
        ]  # fmt: skip
    argv += [
        "-chardev", f"socket,id=qmp,path={_opt(paths.qmp_socket)},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-pidfile", str(paths.pidfile),
    ]  # fmt: skip
    return argv


def vhost_vsock_argv(spec: VmSpec, binary: str = VHOST_VSOCK_BIN) -> list[str] | None:
    """The vhost-device-vsock backend serving `spec.vsock` (Firecracker's hybrid-vsock protocol), if any.

    It must be listening before QEMU starts (QEMU connects to it), and it does not exit with QEMU.
    """
    if spec.vsock is None:
        return None
    return [
        binary,
        "--guest-cid", str(spec.vsock.cid),
        "--socket", str(runtime_paths(spec.run_dir).vhost_vsock_socket),
        "--uds-path", str(spec.vsock.uds_path),
    ]  # fmt: skip
