"""Boot real VMs with the QEMU backend (TCG on hosts without usable hardware KVM).

Kernel: the Debian cloud kernel + busybox mini initrd from banger's kernel catalog (conftest.py).
Root: a read-only 32 MiB busybox ext4 whose /sbin/init prints BANGER-E2E-READY; a writable scratch
disk; the agent channel over virtio-serial.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from banger.errors import AlreadyExists, BangerError
from banger.model import new_id
from banger.vmm.base import DriveSpec, Sidecar, VmProcess, VmSpec
from banger.vmm.qemu import qmp
from banger.vmm.qemu.backend import QemuVmm
from tests.e2e.conftest import BootKernel

pytestmark = pytest.mark.vm

READY = "BANGER-E2E-READY"
MARKER_TIMEOUT = 60.0


@pytest.fixture(scope="session")
def vmm() -> QemuVmm:
    backend = QemuVmm()
    print(f"\n[qemu e2e] accelerator {backend.accel}: {backend.accel_reason}; tsc_khz={backend.tsc_khz}")
    return backend


def _spec(tmp_path: Path, kernel: BootKernel, rootfs: Path, *, power: bool, kernel_path: Path | None = None,
          scratch: Path | None = None) -> VmSpec:
    cmdline = "root=/dev/vda ro" + (" e2e.power=1" if power else "")
    drives = [DriveSpec("root", rootfs, read_only=True, root=True)]
    if scratch is not None:
        drives.append(DriveSpec("scratch", scratch))
    return VmSpec(
        vm_id=new_id(),
        name="e2e-vm",
        vcpu=1,
        memory_mib=256,
        kernel=kernel_path or kernel.vmlinux,
        initrd=kernel.initrd,
        cmdline=cmdline,
        console_log=tmp_path / "console.log",
        run_dir=tmp_path / "run",
        drives=tuple(drives),
        agent_socket=tmp_path / "run" / "agent.sock",
    )


def _wait_for(path: Path, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.05)
    tail = path.read_text(errors="replace")[-3000:] if path.exists() else "(no console log)"
    raise AssertionError(f"{text!r} not in {path} after {timeout:g}s; console tail:\n{tail}")


def _processes_mentioning(needle: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline:
            pids.append(int(entry.name))
    return pids


def _zombie_children() -> list[int]:
    zombies = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            zombies.append(int(entry.name))
    return zombies


def _assert_nothing_left(vmm: QemuVmm, proc: VmProcess) -> None:
    assert not vmm.alive(proc.pid)
    assert not Path(f"/proc/{proc.pid}").exists(), "QEMU was not reaped"
    assert _processes_mentioning(str(proc.run_dir)) == []
    assert _zombie_children() == []
    assert not proc.pidfile.exists()
    for sock in proc.sockets:
        assert not sock.exists(), f"{sock} left behind"


def _agent_ping(path: Path, token: str, timeout: float = 20.0) -> str:
    """Round trip on the virtio-serial agent channel (the guest answers `pong <token>`)."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(path))
        conn.settimeout(0.5)
        conn.sendall(f"ping {token}\n".encode())
        data = b""
        while b"\n" not in data:
            if time.monotonic() > deadline:
                raise AssertionError(f"no agent reply within {timeout:g}s (got {data!r})")
            try:
                chunk = conn.recv(256)
            except TimeoutError:
                continue
            if not chunk:
                raise AssertionError(f"agent socket closed (got {data!r})")
            data += chunk
    return data.decode().strip()


def _boot(vmm: QemuVmm, spec: VmSpec) -> tuple[VmProcess, float, str]:
    plan = vmm.plan(spec)
    started = time.monotonic()
    proc = vmm.launch(plan, timeout=30)
    running_at = time.monotonic() - started
    console = _wait_for(spec.console_log, READY, MARKER_TIMEOUT)
    ready_at = time.monotonic() - started
    line = next(li for li in console.splitlines() if READY in li)
    print(f"\n[qemu e2e] {spec.name}: QMP running after {running_at:.2f}s, "
          f"'{line.strip()}' after {ready_at:.2f}s (host wall clock from launch)")
    return proc, ready_at, console


def test_boot_agent_and_graceful_powerdown(
    vmm: QemuVmm, boot_kernel: BootKernel, e2e_rootfs: Path, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch.img"
    scratch.write_bytes(b"\0" * (4 << 20))
    spec = _spec(tmp_path, boot_kernel, e2e_rootfs, power=True, scratch=scratch)
    proc, _, _ = _boot(vmm, spec)
    try:
        assert vmm.alive(proc.pid)
        assert os.getsid(proc.pid) == proc.pid  # its own session: survives a daemon restart
        assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == f"banger-{spec.vm_id[:8]}"
        assert qmp.query_status(proc.control_socket) == "running"
        with pytest.raises(AlreadyExists, match=f"QEMU is already running for VM {spec.vm_id}"):
            vmm.launch(vmm.plan(spec))
        assert proc.control_socket.exists()  # the refused launch left the running VM alone
        assert spec.agent_socket is not None
        assert _agent_ping(spec.agent_socket, "42") == "pong 42"

        started = time.monotonic()
        outcome = vmm.stop(proc, timeout=30)
        print(f"[qemu e2e] stop(): {outcome} in {time.monotonic() - started:.2f}s")
        assert outcome == "powerdown"
    finally:
        vmm.kill(proc)
    _assert_nothing_left(vmm, proc)
    console = spec.console_log.read_text(errors="replace")
    assert "Linux version" in console
    assert "BANGER-E2E-POWEROFF" in console
    assert scratch.read_bytes().startswith(b"BANGER-E2E-DISK\n")
    assert vmm.stop(proc, timeout=1) == "gone"


def test_stop_kills_a_guest_that_ignores_the_power_button(
    vmm: QemuVmm, boot_kernel: BootKernel, e2e_rootfs: Path, tmp_path: Path
) -> None:
    spec = _spec(tmp_path, boot_kernel, e2e_rootfs, power=False)
    proc, _, _ = _boot(vmm, spec)
    try:
        # Pause/snapshot plumbing: the state file is written and the VM resumes afterwards.
        snapshot = tmp_path / "state.mig"
        qmp.migrate_to_file(proc.control_socket, snapshot, timeout=60)
        assert qmp.query_status(proc.control_socket) == "postmigrate"
        assert snapshot.stat().st_size > 1 << 20
        vmm.resume(proc)
        assert qmp.query_status(proc.control_socket) == "running"

        # As after a daemon restart: no Popen, only the pid and paths (signals + waitpid//proc polling).
        adopted = dataclasses.replace(proc, children=())
        started = time.monotonic()
        outcome = vmm.stop(adopted, timeout=3)
        print(f"\n[qemu e2e] stop() of a guest ignoring powerdown: {outcome} in {time.monotonic() - started:.2f}s")
        assert outcome == "killed"
    finally:
        vmm.kill(proc)
    _assert_nothing_left(vmm, proc)
    assert "Linux version" in spec.console_log.read_text(errors="replace")
    vmm.kill(proc)  # idempotent
    assert vmm.stop(proc, timeout=1) == "gone"


def test_launch_with_missing_kernel_fails_with_qemus_reason(
    vmm: QemuVmm, boot_kernel: BootKernel, e2e_rootfs: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-vmlinux"
    spec = _spec(tmp_path, boot_kernel, e2e_rootfs, power=False, kernel_path=missing)
    plan = vmm.plan(spec)
    with pytest.raises(BangerError) as caught:
        vmm.launch(plan, timeout=30)
    message = str(caught.value)
    print(f"\n[qemu e2e] missing kernel: {message}")
    assert "\n" not in message
    assert "before the VM was running" in message
    assert f"could not open kernel file '{missing}': No such file or directory" in message
    assert _processes_mentioning(str(spec.run_dir)) == []
    assert _zombie_children() == []
    assert not plan.pidfile.exists()
    for sock in plan.sockets_expected:
        assert not sock.exists()


# A stand-in for vhost-device-vsock (not packaged for bookworm): it creates its socket and waits.
FAKE_SIDECAR = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen()
time.sleep(600)
"""


def test_sidecar_is_killed_when_qemu_fails(
    vmm: QemuVmm, boot_kernel: BootKernel, e2e_rootfs: Path, tmp_path: Path
) -> None:
    spec = _spec(tmp_path, boot_kernel, e2e_rootfs, power=False, kernel_path=tmp_path / "missing")
    plan = vmm.plan(spec)
    sidecar_sock = spec.run_dir / "sidecar.sock"
    plan = dataclasses.replace(
        plan,
        sidecars=(Sidecar("fake-sidecar", (sys.executable, "-c", FAKE_SIDECAR, str(sidecar_sock)), sidecar_sock),),
        sockets_expected=(*plan.sockets_expected, sidecar_sock),
    )
    with pytest.raises(BangerError, match="could not open kernel file"):
        vmm.launch(plan, timeout=30)
    assert _processes_mentioning(str(spec.run_dir)) == []
    assert _zombie_children() == []
    assert not sidecar_sock.exists()


def test_sidecar_that_dies_early_reports_its_output(vmm: QemuVmm, tmp_path: Path) -> None:
    spec = VmSpec(
        vm_id="sidecar-test", name="sidecar", vcpu=1, memory_mib=128, kernel=tmp_path / "k", initrd=None,
        cmdline="", console_log=tmp_path / "console.log", run_dir=tmp_path / "run",
    )  # fmt: skip
    sock = spec.run_dir / "never.sock"
    plan = dataclasses.replace(
        vmm.plan(spec),
        sidecars=(Sidecar("fake-sidecar", ("/bin/sh", "-c", "echo cannot bind >&2; exit 3"), sock),),
    )
    with pytest.raises(BangerError) as caught:
        vmm.launch(plan, timeout=10)
    assert caught.value.message == f"fake-sidecar exited with status 3 before creating {sock}: cannot bind"
    assert not (spec.run_dir / "qemu.stderr.log").exists()  # QEMU was never started
    assert _zombie_children() == []
