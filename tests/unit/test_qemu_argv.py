from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from banger.errors import BadRequest
from banger.vmm.base import (
    BACKENDS,
    Backend,
    DriveSpec,
    NicSpec,
    VmSpec,
    VsockSpec,
    host_tsc_khz,
    mac_for,
)
from banger.vmm.qemu.argv import kernel_cmdline, qemu_argv, vhost_vsock_argv
from banger.vmm.qemu.backend import QemuVmm

QEMU = "/usr/bin/qemu-system-x86_64"
VM_ID = "0123456789abcdef0123456789abcdef"
RUN = Path("/run/banger/vms/0123")


def spec(**changes: object) -> VmSpec:
    base = VmSpec(
        vm_id=VM_ID,
        name="dev-box",
        vcpu=2,
        memory_mib=512,
        kernel=Path("/k/vmlinux"),
        initrd=Path("/k/initrd.img"),
        cmdline="root=/dev/vda rw",
        console_log=Path("/var/lib/banger/vms/0123/console.log"),
        run_dir=RUN,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


FULL = spec(
    drives=(
        DriveSpec("work", Path("/var/lib/banger/vms/0123/work.ext4")),
        DriveSpec("root", Path("/var/lib/banger/images/abc/rootfs.ext4"), read_only=True, root=True),
    ),
    nics=(NicSpec("n0", "tap-bg0123", "02:aa:bb:cc:dd:ee"),),
    agent_socket=RUN / "agent.sock",
)


def test_tcg_full_spec_golden() -> None:
    assert qemu_argv(FULL, qemu_bin=QEMU, accel="tcg", tsc_khz=2596134) == [
        QEMU,
        "-name", "dev-box,process=banger-01234567",
        "-M", "microvm,acpi=on",
        "-accel", "tcg,thread=multi,tb-size=32",
        "-cpu", "max",
        "-m", "512M",
        "-smp", "2",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-reboot",
        "-chardev", "file,id=console,path=/var/lib/banger/vms/0123/console.log,append=on",
        "-serial", "chardev:console",
        "-kernel", "/k/vmlinux",
        "-initrd", "/k/initrd.img",
        "-append", "root=/dev/vda rw console=ttyS0 panic=-1 tsc_early_khz=2596134",
        "-drive", "id=root,file=/var/lib/banger/images/abc/rootfs.ext4,format=raw,if=none,cache=writeback,readonly=on",
        "-device", "virtio-blk-device,drive=root",
        "-drive", "id=work,file=/var/lib/banger/vms/0123/work.ext4,format=raw,if=none,cache=writeback,discard=unmap",
        "-device", "virtio-blk-device,drive=work",
        "-netdev", "tap,id=n0,ifname=tap-bg0123,script=no,downscript=no",
        "-device", "virtio-net-device,netdev=n0,mac=02:aa:bb:cc:dd:ee",
        "-device", "virtio-serial-device",
        "-chardev", "socket,id=agent,path=/run/banger/vms/0123/agent.sock,server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=org.banger.agent",
        "-chardev", "socket,id=qmp,path=/run/banger/vms/0123/qmp.sock,server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-pidfile", "/run/banger/vms/0123/qemu.pid",
    ]  # fmt: skip


def test_kvm_minimal_spec_golden() -> None:
    minimal = spec(initrd=None, vcpu=1, memory_mib=128, cmdline="console=hvc0 panic=5")
    assert qemu_argv(minimal, qemu_bin=QEMU, accel="kvm", tsc_khz=2596134) == [
        QEMU,
        "-name", "dev-box,process=banger-01234567",
        "-M", "microvm,acpi=on",
        "-accel", "kvm",
        "-cpu", "host",
        "-m", "128M",
        "-smp", "1",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-reboot",
        "-chardev", "file,id=console,path=/var/lib/banger/vms/0123/console.log,append=on",
        "-serial", "chardev:console",
        "-kernel", "/k/vmlinux",
        "-append", "console=hvc0 panic=5",
        "-chardev", "socket,id=qmp,path=/run/banger/vms/0123/qmp.sock,server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-pidfile", "/run/banger/vms/0123/qemu.pid",
    ]  # fmt: skip


def test_vsock_uses_a_shared_memfd_and_a_vhost_user_device() -> None:
    with_vsock = spec(vsock=VsockSpec(cid=42, uds_path=RUN / "vsock.sock"))
    argv = qemu_argv(with_vsock, qemu_bin=QEMU, accel="tcg", tsc_khz=None)
    assert argv[1:7] == [
        "-name", "dev-box,process=banger-01234567",
        "-M", "microvm,acpi=on,memory-backend=mem",
        "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
    ]  # fmt: skip
    assert argv[-10:-6] == [
        "-chardev", "socket,id=vsc,path=/run/banger/vms/0123/vhost-vsock.sock",
        "-device", "vhost-user-vsock-device,chardev=vsc",
    ]  # fmt: skip
    assert "root=/dev/vda rw console=ttyS0 panic=-1" in argv  # no tsc_early_khz when unknown
    assert vhost_vsock_argv(with_vsock) == [
        "vhost-device-vsock",
        "--guest-cid", "42",
        "--socket", "/run/banger/vms/0123/vhost-vsock.sock",
        "--uds-path", "/run/banger/vms/0123/vsock.sock",
    ]  # fmt: skip
    assert vhost_vsock_argv(spec()) is None


def test_no_vhost_net_and_commas_in_paths_are_escaped() -> None:
    odd = spec(
        drives=(DriveSpec("root", Path("/img/a,b.ext4"), root=True),),
        console_log=Path("/logs/x,format=qcow2/console.log"),
        nics=(NicSpec("n0", "tap0", "02:00:00:00:00:01"),),
    )
    argv = qemu_argv(odd, qemu_bin=QEMU, accel="tcg")
    assert "id=root,file=/img/a,,b.ext4,format=raw,if=none,cache=writeback,discard=unmap" in argv
    assert "file,id=console,path=/logs/x,,format=qcow2/console.log,append=on" in argv
    assert not any("vhost=on" in arg for arg in argv)


@pytest.mark.parametrize(
    ("cmdline", "accel", "expected"),
    [
        ("root=/dev/vda", "tcg", "root=/dev/vda console=ttyS0 panic=-1 tsc_early_khz=1000"),
        ("console=ttyS0,115200 panic=10 tsc_early_khz=7", "tcg", "console=ttyS0,115200 panic=10 tsc_early_khz=7"),
        ("root=/dev/vda", "kvm", "root=/dev/vda console=ttyS0 panic=-1"),
        ("ro -- --init-arg panic=3", "tcg", "ro console=ttyS0 panic=-1 tsc_early_khz=1000 -- --init-arg panic=3"),
        ("", "tcg", "console=ttyS0 panic=-1 tsc_early_khz=1000"),
    ],
)
def test_kernel_cmdline_additions(cmdline: str, accel: str, expected: str) -> None:
    assert kernel_cmdline(cmdline, accel=accel, tsc_khz=1000) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"vcpu": 0}, "vcpu count 0 is out of range (allowed: 1..32)"),
        ({"vcpu": 33}, "vcpu count 33 is out of range (allowed: 1..32)"),
        ({"memory_mib": 127}, "memory 127 MiB is out of range (allowed: 128..65536 MiB)"),
        ({"memory_mib": 65537}, "memory 65537 MiB is out of range (allowed: 128..65536 MiB)"),
        ({"kernel": Path("vmlinux")}, "kernel path 'vmlinux' must be absolute"),
        ({"initrd": Path("k/initrd")}, "initrd path 'k/initrd' must be absolute"),
        ({"console_log": Path("c.log")}, "console log path 'c.log' must be absolute"),
        ({"vm_id": "ABC"}, "vm id 'ABC' is invalid (allowed: 8-64 characters of a-z, 0-9, '-')"),
        ({"name": "Dev"}, "vm name 'Dev' has invalid character 'D' at position 0 (allowed: lowercase a-z, 0-9, '-')"),
        (
            {"nics": (NicSpec("n0", "tap-much-too-long", "02:00:00:00:00:01"),)},
            "tap name 'tap-much-too-long' is invalid (allowed: 1-15 characters of letters, digits, '-', '_', '.')",
        ),
        (
            {"nics": (NicSpec("n0", "tap0", "03:00:00:00:00:01"),)},
            "mac '03:00:00:00:00:01' of nic 'n0' is invalid (expected a unicast address in lowercase hex, "
            "like 02:00:00:00:00:01)",
        ),
        (
            {"nics": (NicSpec("n0", "tap0", "02:00:00:00:00:01"), NicSpec("n1", "tap0", "02:00:00:00:00:02"))},
            "tap 'tap0' is used by two nics",
        ),
        (
            {"drives": (DriveSpec("1root", Path("/r.ext4")),)},
            "drive id '1root' is invalid (allowed: a letter, then up to 31 letters, digits, '-', '_')",
        ),
        (
            {"drives": (DriveSpec("a", Path("/r.ext4"), root=True), DriveSpec("b", Path("/s.ext4"), root=True))},
            "drives 'a' and 'b' are both marked root; at most one may be",
        ),
        (
            {"drives": (DriveSpec("a", Path("/r.ext4")), DriveSpec("b", Path("/r.ext4")))},
            "disk '/r.ext4' is attached twice (drives 'a' and 'b')",
        ),
        ({"drives": (DriveSpec("a", Path("rel.ext4")),)}, "drive 'a' path 'rel.ext4' must be absolute"),
        (
            {"vsock": VsockSpec(cid=2, uds_path=RUN / "v.sock")},
            "vsock cid 2 is out of range (allowed: 3..4294967294)",
        ),
        (
            {"agent_socket": Path("/" + "a" * 110)},
            f"agent socket path '/{'a' * 110}' is 111 bytes; unix sockets allow at most 107",
        ),
        (
            {"run_dir": Path("/" + "r" * 100)},
            f"QMP socket path '/{'r' * 100}/qmp.sock' is 110 bytes; unix sockets allow at most 107",
        ),
        ({"cmdline": "root=/dev/vda\nrw"}, "kernel cmdline has a control character '\\n' at position 13"),
        ({"cmdline": "x" * 2100}, "kernel cmdline is 2142 bytes; the limit is 2047"),
    ],
)
def test_validation_errors(changes: dict[str, object], message: str) -> None:
    with pytest.raises(BadRequest) as caught:
        qemu_argv(spec(**changes), qemu_bin=QEMU, accel="tcg", tsc_khz=1000)
    assert caught.value.message == message


def test_qemu_binary_must_keep_its_name() -> None:
    with pytest.raises(BadRequest, match="must be an absolute path ending in qemu-system-x86_64"):
        qemu_argv(spec(), qemu_bin="/opt/qemu-wrapper", accel="tcg")


def test_plan_lists_sockets_files_and_the_vsock_sidecar() -> None:
    vmm = QemuVmm(qemu_bin=QEMU, accel="tcg", tsc_khz=0)
    full = dataclasses.replace(FULL, vsock=VsockSpec(cid=7, uds_path=RUN / "vsock.sock"))
    plan = vmm.plan(full)
    assert plan.argv[0] == QEMU and "tsc_early_khz" not in " ".join(plan.argv)
    assert plan.control_socket == RUN / "qmp.sock"
    assert plan.pidfile == RUN / "qemu.pid"
    assert plan.stderr_log == RUN / "qemu.stderr.log"
    assert plan.sockets_expected == (
        RUN / "qmp.sock", RUN / "agent.sock", RUN / "vhost-vsock.sock", RUN / "vsock.sock"
    )  # fmt: skip
    assert plan.files == (
        Path("/k/vmlinux"),
        Path("/k/initrd.img"),
        Path("/var/lib/banger/vms/0123/work.ext4"),
        Path("/var/lib/banger/images/abc/rootfs.ext4"),
        Path("/var/lib/banger/vms/0123/console.log"),
    )
    [sidecar] = plan.sidecars
    assert sidecar.socket == RUN / "vhost-vsock.sock"
    assert sidecar.argv[0] == "vhost-device-vsock"
    assert vmm.plan(spec()).sidecars == ()
    assert vmm.capabilities == frozenset({"pause"})
    assert vmm.backend is Backend.QEMU


def test_alive_recognises_only_qemu() -> None:
    vmm = QemuVmm(qemu_bin=QEMU, accel="tcg", tsc_khz=0)
    assert not vmm.alive(os.getpid())  # a python process
    assert not vmm.alive(2**22 + 12345)  # no such pid


def test_mac_for_is_deterministic_unicast_and_local() -> None:
    mac = mac_for(VM_ID)
    assert mac == mac_for(VM_ID)
    assert mac != mac_for(VM_ID, 1) != mac_for("another-vm-id")
    first = int(mac.split(":")[0], 16)
    assert first & 0b01 == 0  # unicast
    assert first & 0b10 == 0b10  # locally administered
    qemu_argv(spec(nics=(NicSpec("n0", "tap0", mac),)), qemu_bin=QEMU, accel="tcg")  # accepted


def test_host_tsc_khz(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: X\ncpu MHz\t\t: 2596.134\n\nprocessor\t: 1\ncpu MHz\t\t: 1.0\n")
    assert host_tsc_khz(cpuinfo) == 2596134
    cpuinfo.write_text("processor\t: 0\n")
    assert host_tsc_khz(cpuinfo) is None
    assert host_tsc_khz(tmp_path / "missing") is None


def test_registry_names_both_backends() -> None:
    assert set(BACKENDS) == set(Backend)
    assert BACKENDS[Backend.QEMU]().backend == Backend.QEMU
