"""Does hardware virtualization actually run guests here?

`/dev/kvm` existing, opening, and even `KVM_CREATE_VM` succeeding prove nothing: on a PVM host (the
project's own machine kind) the same API is served by a backend that only runs specially built guest
kernels at speed and falls back to an instruction emulator for anything else. So the probe runs a real,
tiny guest: 16-bit real-mode code that spins ~20 million times and halts. Hardware KVM finishes that in
milliseconds; an emulator needs seconds to minutes or gives up with an internal error.

The guest runs in a child process (`python -m banger.system.kvm_probe --child`) started through
`banger.system.run` with a timeout, so a guest stuck in an emulator is killed with its process. The
child prints JSON lines: a `started` line with its pid, a `run` line right before `KVM_RUN`, and a final
`done` (exit reason, elapsed ms) or `error` (failed step) line. Nothing is cached on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Kind = Literal["absent", "no-access", "pvm", "emulated", "error", "hardware"]

KVM_DEVICE = Path("/dev/kvm")
PVM_MODULE = Path("/sys/module/kvm_pvm")
CPUINFO = Path("/proc/cpuinfo")

# --- ioctl numbers (linux/kvm.h), computed the way the kernel's _IOC macros do ------------------------

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2
KVMIO = 0xAE


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (type_ << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, KVMIO, nr, 0)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, KVMIO, nr, size)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, KVMIO, nr, size)


SIZEOF_KVM_REGS = 144  # 18 x u64: rax..r15, rip, rflags
SIZEOF_KVM_SREGS = 312  # 8 segments x 24 + 2 dtables x 16 + 7 x u64 + interrupt bitmap 4 x u64
SIZEOF_KVM_USERSPACE_MEMORY_REGION = 32  # slot u32, flags u32, guest_phys_addr, memory_size, userspace_addr

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, SIZEOF_KVM_USERSPACE_MEMORY_REGION)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, SIZEOF_KVM_REGS)
KVM_SET_REGS = _iow(0x82, SIZEOF_KVM_REGS)
KVM_GET_SREGS = _ior(0x83, SIZEOF_KVM_SREGS)
KVM_SET_SREGS = _iow(0x84, SIZEOF_KVM_SREGS)

KVM_API_VERSION = 12

KVM_EXIT_HLT = 5
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
EXIT_NAMES = {
    0: "UNKNOWN",
    1: "EXCEPTION",
    2: "IO",
    3: "HYPERCALL",
    4: "DEBUG",
    5: "HLT",
    6: "MMIO",
    7: "IRQ_WINDOW_OPEN",
    8: "SHUTDOWN",
    9: "FAIL_ENTRY",
    10: "INTR",
    17: "INTERNAL_ERROR",
}

# --- the guest ------------------------------------------------------------------------------------------

# Hardware KVM runs the loop in ~10-30 ms; this host kind's emulated real mode needs ~17 s. Anything
# slower than this (30x headroom for a loaded host) is an emulator, even if it did reach the HLT.
EMULATED_AFTER_MS = 1000.0

GUEST_MEM_SIZE = 64 * 1024
GUEST_CODE_ADDR = 0x1000
TSS_ADDR = 0x0FFF_D000
LOOP_ITERATIONS = 20_000_000


def guest_code(iterations: int = LOOP_ITERATIONS) -> bytes:
    """16-bit real-mode code: `mov ecx, iterations; L: dec ecx; jnz L; hlt`."""
    return (
        b"\x66\xb9"
        + iterations.to_bytes(4, "little")  # mov ecx, imm32 (0x66: 32-bit operand in 16-bit mode)
        + b"\x66\x49"  # dec ecx
        + b"\x75\xfc"  # jnz -4 (back to dec)
        + b"\xf4"  # hlt
    )


# --- child side -----------------------------------------------------------------------------------------


def _emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


class _StepFailed(Exception):
    def __init__(self, step: str, error: str) -> None:
        super().__init__(f"{step}: {error}")
        self.step = step
        self.error = error


def _ioctl(step: str, fd: int, request: int, arg: int | bytearray = 0) -> int:
    import fcntl

    try:
        if isinstance(arg, bytearray):
            # With mutate_flag the buffer is updated in place and the return value is the ioctl's int.
            return int(fcntl.ioctl(fd, request, arg, True))
        return fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        raise _StepFailed(step, f"{exc.strerror or exc} (errno {exc.errno})") from exc


def _run_guest(
    iterations: int = LOOP_ITERATIONS, announce: Callable[[], None] = lambda: None
) -> dict[str, Any]:
    """Create a VM with one vCPU, run the guest code, return the `done` line's fields.

    `announce` is called right before KVM_RUN (the child reports it, so a timeout can be told apart
    from a child that never got that far). Everything opened is closed again, for in-process tests.
    """
    with contextlib.ExitStack() as stack:
        return _run_guest_in(stack, iterations, announce)


def _open_fd(stack: contextlib.ExitStack, fd: int) -> int:
    stack.callback(os.close, fd)
    return fd


def _run_guest_in(
    stack: contextlib.ExitStack, iterations: int, announce: Callable[[], None]
) -> dict[str, Any]:
    import ctypes
    import mmap
    import struct

    try:
        kvm = _open_fd(stack, os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        raise _StepFailed("open /dev/kvm", f"{exc.strerror or exc} (errno {exc.errno})") from exc
    version = _ioctl("KVM_GET_API_VERSION", kvm, KVM_GET_API_VERSION)
    if version != KVM_API_VERSION:
        raise _StepFailed("KVM_GET_API_VERSION", f"API version {version}, expected {KVM_API_VERSION}")
    vm = _open_fd(stack, _ioctl("KVM_CREATE_VM", kvm, KVM_CREATE_VM))
    # Intel without "unrestricted guest" needs three pages of TSS for real mode; harmless elsewhere, and
    # some backends reject it, so a failure here is not a verdict. (fcntl.ioctl takes a C int, hence an
    # address below 2 GiB, far above the guest's 64 KiB.)
    with contextlib.suppress(_StepFailed):
        _ioctl("KVM_SET_TSS_ADDR", vm, KVM_SET_TSS_ADDR, TSS_ADDR)

    # Closed last (the stack unwinds in reverse), after the VM that maps it is gone.
    mem = stack.enter_context(mmap.mmap(-1, GUEST_MEM_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
    code = guest_code(iterations)
    mem[GUEST_CODE_ADDR : GUEST_CODE_ADDR + len(code)] = code
    view = ctypes.c_char.from_buffer(mem)
    host_addr = ctypes.addressof(view)
    del view  # release the buffer export, or the mmap could not be closed
    region = bytearray(struct.pack("=IIQQQ", 0, 0, 0, GUEST_MEM_SIZE, host_addr))
    _ioctl("KVM_SET_USER_MEMORY_REGION", vm, KVM_SET_USER_MEMORY_REGION, region)

    vcpu = _open_fd(stack, _ioctl("KVM_CREATE_VCPU", vm, KVM_CREATE_VCPU, 0))
    run_size = _ioctl("KVM_GET_VCPU_MMAP_SIZE", kvm, KVM_GET_VCPU_MMAP_SIZE)
    try:
        run = stack.enter_context(
            mmap.mmap(vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        )
    except OSError as exc:
        raise _StepFailed("mmap kvm_run", str(exc)) from exc

    # Real mode with CS at 0: kvm_segment cs sits at offset 0 (base u64 @0, limit u32 @8, selector u16 @12).
    sregs = bytearray(SIZEOF_KVM_SREGS)
    _ioctl("KVM_GET_SREGS", vcpu, KVM_GET_SREGS, sregs)
    struct.pack_into("=Q", sregs, 0, 0)
    struct.pack_into("=H", sregs, 12, 0)
    _ioctl("KVM_SET_SREGS", vcpu, KVM_SET_SREGS, sregs)

    regs = [0] * 18
    regs[16] = GUEST_CODE_ADDR  # rip
    regs[17] = 0x2  # rflags: bit 1 is reserved and must be set
    _ioctl("KVM_SET_REGS", vcpu, KVM_SET_REGS, bytearray(struct.pack("=18Q", *regs)))

    announce()
    start = time.perf_counter()
    exit_reason = KVM_EXIT_INTR
    # A signal can interrupt KVM_RUN before the guest is done; anything else is the guest's answer.
    for _ in range(100):
        _ioctl("KVM_RUN", vcpu, KVM_RUN)
        exit_reason = struct.unpack_from("=I", run, 8)[0]
        if exit_reason != KVM_EXIT_INTR:
            break
    elapsed_ms = (time.perf_counter() - start) * 1000.0
    result: dict[str, Any] = {
        "exit_reason": exit_reason,
        "exit_name": EXIT_NAMES.get(exit_reason, f"exit {exit_reason}"),
        "elapsed_ms": round(elapsed_ms, 3),
    }
    if exit_reason == KVM_EXIT_INTERNAL_ERROR:
        result["suberror"] = struct.unpack_from("=I", run, 32)[0]  # kvm_run.internal.suberror
    return result


def child_main() -> int:
    _emit(stage="started", pid=os.getpid())
    try:
        fields = _run_guest(announce=lambda: _emit(stage="run"))
    except _StepFailed as exc:
        _emit(stage="error", step=exc.step, error=exc.error)
        return 0
    _emit(stage="done", **fields)
    return 0


# --- parent side ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KvmProbe:
    usable: bool
    reason: str
    kind: Kind
    elapsed_ms: float | None = None  # guest run time (HLT), or time waited before the timeout
    exit_name: str | None = None  # the probe guest's KVM exit reason, when it exited
    failed_step: str | None = None  # the ioctl (or other step) that failed
    pvm_module: bool = False  # /sys/module/kvm_pvm exists
    cpu_virt_flags: tuple[str, ...] = ()  # "vmx"/"svm" found in /proc/cpuinfo
    child_pid: int | None = None  # pid of the probe child, if it got far enough to report it

    def details(self) -> tuple[str, ...]:
        lines = [f"kind: {self.kind}"]
        if self.elapsed_ms is not None:
            lines.append(f"elapsed: {self.elapsed_ms:.0f} ms")
        if self.exit_name is not None:
            lines.append(f"probe guest exit: {self.exit_name}")
        if self.failed_step is not None:
            lines.append(f"failed step: {self.failed_step}")
        lines.append("kvm_pvm module loaded" if self.pvm_module else "no kvm_pvm module")
        flags = ", ".join(self.cpu_virt_flags) if self.cpu_virt_flags else "none"
        lines.append(f"cpu virtualization flags: {flags}")
        return tuple(lines)


# The probe's finding; consumers add the consequence (choose_accel: TCG; doctor: slower VMs).
EMULATED_REASON = "KVM is present but guests run emulated (PVM or nested without VMX)"


def _cpu_virt_flags() -> tuple[str, ...]:
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:
        return ()
    found: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            found.update({"vmx", "svm"} & set(line.split(":", 1)[-1].split()))
    return tuple(sorted(found))


def _parse_lines(output: bytes | str | None) -> list[dict[str, Any]]:
    if not output:
        return []
    text = output.decode("utf-8", "replace") if isinstance(output, bytes) else output
    lines: list[dict[str, Any]] = []
    for raw in text.splitlines():
        try:
            value = json.loads(raw)
        except ValueError:
            continue
        if isinstance(value, dict):
            lines.append(value)
    return lines


def _child_env() -> dict[str, str]:
    # The child must import this very copy of banger, also from a source checkout that is not installed.
    import banger

    return {"PYTHONPATH": str(Path(banger.__file__).resolve().parent.parent)}


def probe_kvm(timeout: float = 2.0) -> KvmProbe:
    """Find out whether `/dev/kvm` runs guests at hardware speed. Never raises for host conditions."""
    from banger.errors import BangerError, CommandFailed
    from banger.system.run import run

    pvm = PVM_MODULE.exists()
    flags = _cpu_virt_flags()
    common: dict[str, Any] = {"pvm_module": pvm, "cpu_virt_flags": flags}

    if not KVM_DEVICE.exists():
        return KvmProbe(
            False, "/dev/kvm does not exist (no KVM in this kernel, or not loaded)", "absent", **common
        )
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return KvmProbe(
            False,
            f"cannot open /dev/kvm: {exc.strerror or exc}",
            "no-access",
            **common,
        )
    os.close(fd)

    argv = [sys.executable, "-m", "banger.system.kvm_probe", "--child"]
    start = time.monotonic()
    timed_out = False
    output: bytes | str | None
    try:
        # cwd "/": `-m` puts the working directory first on sys.path, where a stray `banger/` could shadow us.
        proc = run(argv, env=_child_env(), cwd="/", timeout=timeout, check=True)
        output = proc.stdout
    except CommandFailed as exc:
        # The child itself crashed (a Python error, or killed by a signal); the guest gave no verdict.
        waited = (time.monotonic() - start) * 1000.0
        return KvmProbe(False, f"probe child failed: {exc.message}", "error", elapsed_ms=waited, **common)
    except OSError as exc:
        waited = (time.monotonic() - start) * 1000.0
        return KvmProbe(False, f"cannot start the probe child: {exc}", "error", elapsed_ms=waited, **common)
    except BangerError as exc:
        # With an absolute argv[0], `run` raises a plain BangerError only for a timeout. It has already
        # killed and reaped the child; the partial output rides on the original TimeoutExpired.
        timed_out = True
        output = getattr(exc.__cause__, "stdout", None)
    waited = (time.monotonic() - start) * 1000.0
    return classify(
        output, timed_out=timed_out, timeout=timeout, waited_ms=waited, pvm_module=pvm, cpu_virt_flags=flags
    )


def classify(
    output: bytes | str | None,
    *,
    timed_out: bool,
    timeout: float,
    waited_ms: float,
    pvm_module: bool,
    cpu_virt_flags: tuple[str, ...] = (),
) -> KvmProbe:
    """The verdict from the child's JSON lines (complete, or cut short by the timeout)."""
    stages = {str(line.get("stage")): line for line in _parse_lines(output)}
    pid_value = stages.get("started", {}).get("pid")
    common: dict[str, Any] = {
        "pvm_module": pvm_module,
        "cpu_virt_flags": cpu_virt_flags,
        "child_pid": pid_value if isinstance(pid_value, int) else None,
    }
    pvm_note = " (KVM here is PVM: kvm_pvm is loaded)" if pvm_module else ""
    failure_kind: Kind = "pvm" if pvm_module else "error"

    if timed_out:
        if "run" in stages:
            return KvmProbe(False, EMULATED_REASON, "emulated", elapsed_ms=waited_ms, **common)
        return KvmProbe(
            False,
            f"probe child did not reach KVM_RUN within {timeout:g}s (host overloaded?)",
            "error",
            elapsed_ms=waited_ms,
            **common,
        )

    if "error" in stages:
        line = stages["error"]
        step, error = str(line.get("step")), str(line.get("error"))
        return KvmProbe(False, f"{step} failed: {error}{pvm_note}", failure_kind, failed_step=step, **common)

    if "done" in stages:
        line = stages["done"]
        exit_name = str(line.get("exit_name"))
        elapsed = line.get("elapsed_ms")
        guest_ms = float(elapsed) if isinstance(elapsed, int | float) else waited_ms
        halted = line.get("exit_reason") == KVM_EXIT_HLT
        if halted and guest_ms > EMULATED_AFTER_MS:
            # Halted, but only because the caller waited long enough for an emulator to get there.
            return KvmProbe(
                False, EMULATED_REASON, "emulated", elapsed_ms=guest_ms, exit_name=exit_name, **common
            )
        if halted:
            return KvmProbe(
                True,
                f"KVM runs guests (probe guest halted in {guest_ms:.0f} ms)",
                "hardware",
                elapsed_ms=guest_ms,
                exit_name=exit_name,
                **common,
            )
        detail = f" (suberror {line['suberror']})" if "suberror" in line else ""
        return KvmProbe(
            False,
            f"probe guest stopped with KVM exit {exit_name}{detail} instead of HLT{pvm_note}",
            failure_kind,
            elapsed_ms=guest_ms,
            exit_name=exit_name,
            **common,
        )

    return KvmProbe(False, "probe child exited without a result", "error", elapsed_ms=waited_ms, **common)


def choose_accel(timeout: float = 2.0) -> tuple[Literal["kvm", "tcg"], str]:
    """The QEMU accelerator to use here, and why."""
    probe = probe_kvm(timeout)
    if probe.usable:
        return "kvm", probe.reason
    return "tcg", f"{probe.reason}; banger will use QEMU with TCG"


def main(argv: list[str] | None = None) -> int:
    """`--child`: run the probe guest (internal). No arguments: print the verdict as JSON, for people."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["--child"]:
        return child_main()
    import dataclasses

    sys.stdout.write(json.dumps(dataclasses.asdict(probe_kvm())) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
