"""The KVM probe against this machine's real /dev/kvm (on the project's hosts: PVM, guests emulated)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from banger.system import kvm_probe
from banger.system.kvm_probe import KvmProbe, choose_accel, guest_code, probe_kvm


def _kvm_openable() -> bool:
    try:
        os.close(os.open(kvm_probe.KVM_DEVICE, os.O_RDWR))
    except OSError:
        return False
    return True


def _assert_consistent(probe: KvmProbe) -> None:
    assert probe.usable == (probe.kind == "hardware")
    assert probe.reason
    assert probe.pvm_module == kvm_probe.PVM_MODULE.exists()
    if not kvm_probe.KVM_DEVICE.exists():
        assert probe.kind == "absent"
    elif probe.kind == "hardware":
        assert probe.exit_name == "HLT"
        assert probe.elapsed_ms is not None and probe.elapsed_ms <= kvm_probe.EMULATED_AFTER_MS


def test_ioctl_numbers_match_linux_kvm_h() -> None:
    # Values as the kernel headers define them on x86_64.
    assert kvm_probe.KVM_GET_API_VERSION == 0xAE00
    assert kvm_probe.KVM_CREATE_VM == 0xAE01
    assert kvm_probe.KVM_GET_VCPU_MMAP_SIZE == 0xAE04
    assert kvm_probe.KVM_CREATE_VCPU == 0xAE41
    assert kvm_probe.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert kvm_probe.KVM_SET_TSS_ADDR == 0xAE47
    assert kvm_probe.KVM_RUN == 0xAE80
    assert kvm_probe.KVM_GET_REGS == 0x8090AE81
    assert kvm_probe.KVM_SET_REGS == 0x4090AE82
    assert kvm_probe.KVM_GET_SREGS == 0x8138AE83
    assert kvm_probe.KVM_SET_SREGS == 0x4138AE84


def test_guest_code_layout() -> None:
    code = guest_code(20_000_000)
    assert code == bytes.fromhex("66b9002d3101664975fcf4")
    # jnz's rel8 is taken from the end of jnz, and must land on `dec ecx` (offset 6).
    assert 10 + int.from_bytes(code[9:10], "little", signed=True) == 6


def test_real_probe_on_this_machine() -> None:
    probe = probe_kvm()
    print(f"\nkvm probe: {probe}")
    _assert_consistent(probe)
    if kvm_probe.PVM_MODULE.exists():
        # PVM runs only PVM guest kernels at speed; our real-mode guest must not pass for hardware.
        assert probe.kind != "hardware"
        assert not probe.usable


def test_choose_accel_follows_the_probe() -> None:
    accel, reason = choose_accel()
    print(f"\naccel: {accel} ({reason})")
    assert accel in ("kvm", "tcg")
    assert reason
    if kvm_probe.PVM_MODULE.exists() or not kvm_probe.KVM_DEVICE.exists():
        assert accel == "tcg"
        assert reason.endswith("banger will use QEMU with TCG")


def test_timeout_kills_the_probe_child() -> None:
    probe = probe_kvm(timeout=0.5)
    print(f"\nkvm probe (0.5 s): {probe}")
    _assert_consistent(probe)
    if probe.kind in ("absent", "no-access"):
        pytest.skip(f"no probe child started: {probe.reason}")
    if probe.kind == "hardware":
        pytest.skip("the guest halted before the timeout; nothing to kill")
    assert probe.child_pid is not None, probe
    if probe.kind == "emulated":
        # It timed out: the wait ended near the deadline, not when the 20M-iteration guest finished.
        assert probe.elapsed_ms is not None and probe.elapsed_ms < 3000
    assert not Path(f"/proc/{probe.child_pid}").exists(), "probe child still running (or a zombie)"


@pytest.mark.skipif(not _kvm_openable(), reason="/dev/kvm cannot be opened")
def test_short_guest_halts_and_releases_everything() -> None:
    # A few iterations halt quickly even under an emulator: this checks the guest program and the ioctl
    # sequence themselves, in this process, and that nothing KVM-related stays open afterwards.
    result = kvm_probe._run_guest(iterations=1000)
    print(f"\nshort guest: {result}")
    assert result["exit_name"] == "HLT"
    assert result["exit_reason"] == kvm_probe.KVM_EXIT_HLT
    fd_dir = Path("/proc/self/fd")
    targets = []
    for fd in fd_dir.iterdir():
        try:
            targets.append(os.readlink(fd))
        except OSError:
            continue
    assert not [t for t in targets if "kvm" in t], targets
