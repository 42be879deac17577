from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path

import pytest

from banger.errors import BadRequest, BangerError, NotFound
from banger.vmm.base import BACKENDS, Backend, DriveSpec, NicSpec, VmSpec, VsockSpec
from banger.vmm.firecracker.backend import (
    DEFAULT_BOOT_ARGS,
    FirecrackerVmm,
    boot_args,
    check_kernel,
    fc_id,
    runtime_paths,
    vm_config,
)
from banger.vmm.firecracker.config import Drive, NetIface, Vsock, request_bodies
from banger.vmm.firecracker.launcher import JailRequest, JailSetup

FC = "/opt/fc/firecracker"
VM_ID = "0123456789abcdef0123456789abcdef"
RUN = Path("/run/banger/vms/01234567")
VM_DIR = Path("/var/lib/banger/vms/0123")


def spec(**changes: object) -> VmSpec:
    base = VmSpec(
        vm_id=VM_ID,
        name="dev-box",
        vcpu=2,
        memory_mib=512,
        kernel=Path("/k/vmlinux"),  # does not exist: check_kernel leaves a missing kernel to Firecracker
        initrd=None,
        cmdline="root=/dev/vda ro init=/sbin/init panic=-1",
        console_log=VM_DIR / "console.log",
        run_dir=RUN,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


FULL = spec(
    initrd=Path("/k/initrd.img"),
    drives=(
        DriveSpec("overlay", VM_DIR / "overlay.ext4"),
        DriveSpec("rootfs", Path("/var/lib/banger/images/abc/rootfs.ext4"), read_only=True, root=True),
        DriveSpec("work", VM_DIR / "work.ext4"),
    ),
    nics=(NicSpec("net0", "tap-bg0123", "02:aa:bb:cc:dd:ee"),),
    vsock=VsockSpec(7, RUN / "v.sock"),
    agent_socket=RUN / "agent.sock",
)


def vmm() -> FirecrackerVmm:
    return FirecrackerVmm(firecracker_bin=FC, jailer_bin="/usr/bin/jailer")


def test_plan_golden() -> None:
    plan = vmm().plan(FULL)
    assert plan.argv == (FC, "--api-sock", "/run/banger/vms/01234567/fc.sock", "--id", "01234567")
    assert plan.control_socket == RUN / "fc.sock"
    assert plan.pidfile == RUN / "firecracker.pid"
    assert plan.stderr_log == VM_DIR / "console.log"  # stdout is the guest console
    assert plan.sockets_expected == (RUN / "fc.sock", RUN / "v.sock")
    assert plan.files == (
        Path("/k/vmlinux"),
        Path("/k/initrd.img"),
        VM_DIR / "overlay.ext4",
        Path("/var/lib/banger/images/abc/rootfs.ext4"),
        VM_DIR / "work.ext4",
        VM_DIR / "console.log",
        RUN / "firecracker.log",
        RUN / "firecracker.metrics",
    )
    assert plan.env == () and plan.sidecars == ()
    assert plan.vm_id == VM_ID and plan.run_dir == RUN


def test_config_translation() -> None:
    cfg = vm_config(FULL)
    assert cfg.kernel_path == "/k/vmlinux" and cfg.initrd_path == "/k/initrd.img"
    assert (cfg.vcpu, cfg.memory_mib) == (2, 512)
    assert cfg.boot_args == "console=ttyS0 reboot=k pci=off root=/dev/vda ro init=/sbin/init panic=-1"
    assert cfg.drives == (
        Drive("overlay", str(VM_DIR / "overlay.ext4"), is_root_device=False, is_read_only=False),
        Drive("rootfs", "/var/lib/banger/images/abc/rootfs.ext4", is_root_device=True, is_read_only=True),
        Drive("work", str(VM_DIR / "work.ext4"), is_root_device=False, is_read_only=False),
    )
    assert cfg.net == (NetIface("net0", "tap-bg0123", "02:aa:bb:cc:dd:ee"),)
    assert cfg.vsock == Vsock(7, str(RUN / "v.sock"))
    assert cfg.log_path == str(RUN / "firecracker.log")
    assert cfg.metrics_path == str(RUN / "firecracker.metrics")
    assert cfg.entropy
    # The root drive is attached first (the guest's /dev/vda), the others keep their order.
    drive_calls = [path for _, path, _ in request_bodies(cfg) if path.startswith("/drives/")]
    assert drive_calls == ["/drives/rootfs", "/drives/overlay", "/drives/work"]


def test_boot_args_defaults_and_overrides() -> None:
    assert boot_args("") == " ".join(DEFAULT_BOOT_ARGS) == "console=ttyS0 reboot=k panic=1 pci=off"
    assert boot_args("console=hvc0 quiet") == "reboot=k panic=1 pci=off console=hvc0 quiet"
    assert boot_args("  root=/dev/vda   rw ") == "console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda rw"
    # Firecracker describes its virtio-mmio devices itself; banger never adds them.
    assert "virtio_mmio" not in vm_config(FULL).boot_args


def test_minimal_spec_has_no_optional_devices() -> None:
    plan = vmm().plan(spec())
    assert plan.sockets_expected == (RUN / "fc.sock",)
    cfg = vm_config(spec())
    assert cfg.initrd_path is None and cfg.drives == () and cfg.net == () and cfg.vsock is None


def test_fc_id_is_the_short_id() -> None:
    assert fc_id(VM_ID) == "01234567"
    with pytest.raises(BadRequest, match="jail id"):
        fc_id("bad/id!")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"vcpu": 0}, "vcpu 0 is out of range"),
        ({"vcpu": 33}, "vcpu 33 is out of range"),
        ({"memory_mib": 0}, "memory_mib 0 is out of range"),
        ({"kernel": Path("vmlinux")}, "kernel path 'vmlinux' must be absolute"),
        ({"initrd": Path("initrd")}, "initrd path 'initrd' must be absolute"),
        ({"drives": (DriveSpec("root", Path("disk.img")),)}, "drive path 'disk.img' must be absolute"),
        ({"drives": (DriveSpec("bad-id", Path("/d.img")),)}, "drive_id 'bad-id' is invalid"),
        ({"drives": (DriveSpec("a", Path("/a"), root=True), DriveSpec("b", Path("/b"), root=True))},
         "at most one drive can be the root device"),
        ({"drives": (DriveSpec("a", Path("/a")), DriveSpec("a", Path("/b")))}, "drive_id 'a' is used twice"),
        ({"nics": (NicSpec("net0", "a-very-long-tap-name", "02:00:00:00:00:01"),)}, "is not a valid interface"),
        ({"nics": (NicSpec("net0", "tap0", "not-a-mac"),)}, "guest MAC 'not-a-mac'"),
        ({"vsock": VsockSpec(2, RUN / "v.sock")}, "vsock guest CID 2 is out of range"),
        ({"vsock": VsockSpec(3, Path("/" + "v" * 120))}, "vsock socket path .* unix sockets allow at most 107"),
        ({"run_dir": Path("/" + "r" * 110)}, "API socket path .* unix sockets allow at most 107"),
        ({"cmdline": "root=/dev/vda\ninit=/x"}, "contains a newline or NUL"),
        ({"vm_id": "not*valid"}, "jail id 'not\\*vali' is invalid"),
    ],
)
def test_plan_validation_errors(changes: dict[str, object], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        vmm().plan(spec(**changes))


def test_kernel_must_be_an_elf_vmlinux(tmp_path: Path) -> None:
    elf = tmp_path / "vmlinux"
    elf.write_bytes(b"\x7fELF" + b"\0" * 100)
    check_kernel(elf)
    check_kernel(tmp_path / "missing")  # Firecracker's PUT /boot-source names a missing file itself

    bzimage = tmp_path / "vmlinuz"
    bzimage.write_bytes(b"\0" * 0x202 + b"HdrS" + b"\0" * 64)
    with pytest.raises(BadRequest, match="is a compressed bzImage") as info:
        vmm().plan(spec(kernel=bzimage))
    assert info.value.hint is not None and "extract-vmlinux" in info.value.hint

    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a kernel at all\n")
    with pytest.raises(BadRequest, match="is not an ELF vmlinux"):
        vmm().plan(spec(kernel=text))


class Launcher:
    """A `JailLauncher` for fault injection: records calls, fails where told, "launches" a real process."""

    def __init__(self, *, fail: str | None = None) -> None:
        self.fail = fail
        self.calls: list[tuple[str, object]] = []
        self.children: list[subprocess.Popen[bytes]] = []

    def stage(self, request: JailRequest) -> None:
        self.calls.append(("stage", request))
        if self.fail == "stage":
            raise BangerError("injected: staging failed")

    def launch(self, vm_id: str, console_log: Path) -> int:
        self.calls.append(("launch", vm_id))
        if self.fail == "launch":
            raise BangerError("injected: the jailer did not start")
        child = subprocess.Popen(["true"])  # a "jailer" that exits at once
        self.children.append(child)
        return child.pid

    def cleanup(self, vm_id: str) -> None:
        self.calls.append(("cleanup", vm_id))


def jailed(launcher: Launcher) -> FirecrackerVmm:
    return FirecrackerVmm(firecracker_bin=FC, jailer_bin="/usr/bin/jailer",
                          jail=JailSetup(launcher, "/srv/jailer", 1234, 1234))


def test_jailed_plan() -> None:
    plan = jailed(Launcher()).plan(FULL)
    assert plan.argv == (
        "/usr/bin/jailer",
        "--id", "01234567",
        "--exec-file", FC,
        "--uid", "1234",
        "--gid", "1234",
        "--chroot-base-dir", "/srv/jailer",
        "--", "--api-sock", "/firecracker.socket",
    )  # fmt: skip
    # The run directory looks as it does for a direct launch: the sockets are links into the chroot.
    assert plan.control_socket == RUN / "fc.sock"
    assert plan.sockets_expected == (RUN / "fc.sock", RUN / "v.sock")
    request = plan.staging
    assert isinstance(request, JailRequest)
    chroot = "/srv/jailer/firecracker/01234567/root"
    assert request.links() == (
        (str(RUN / "fc.sock"), f"{chroot}/firecracker.socket"),
        (str(RUN / "v.sock"), f"{chroot}/v.sock"),
        (str(RUN / "firecracker.log"), f"{chroot}/firecracker.log"),
        (str(RUN / "firecracker.metrics"), f"{chroot}/firecracker.metrics"),
    )
    assert request.params() == {
        "vm_id": VM_ID, "run_dir": str(RUN), "chroot_base": "/srv/jailer", "exec_file": FC, "uid": 1234,
        "gid": 1234, "kernel": "/k/vmlinux", "initrd": "/k/initrd.img",
        "drives": [
            {"id": "overlay", "path": str(VM_DIR / "overlay.ext4"), "read_only": False, "root": False},
            {"id": "rootfs", "path": "/var/lib/banger/images/abc/rootfs.ext4", "read_only": True, "root": True},
            {"id": "work", "path": str(VM_DIR / "work.ext4"), "read_only": False, "root": False},
        ],
        "log": str(RUN / "firecracker.log"), "metrics": str(RUN / "firecracker.metrics"), "vsock": str(RUN / "v.sock"),
    }  # fmt: skip
    jail = jailed(Launcher()).jail_plan(VM_ID)
    assert jail is not None
    with pytest.raises(BadRequest, match="does not match"):
        vmm().plan(FULL, dataclasses.replace(jail, id="other"))
    # Firecracker makes its vsock socket in the chroot; the run directory links to it, so it must be there.
    with pytest.raises(BadRequest, match=re.escape("vsock socket '/elsewhere/v.sock' must be a file of the run")):
        jailed(Launcher()).plan(dataclasses.replace(FULL, vsock=VsockSpec(7, Path("/elsewhere/v.sock"))))


def test_a_jailed_plan_needs_a_launcher(tmp_path: Path) -> None:
    plan = dataclasses.replace(jailed(Launcher()).plan(FULL), run_dir=tmp_path / "run")
    with pytest.raises(BangerError, match="has no jail launcher"):
        vmm().launch(plan)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fail", ["stage", "launch", None])
def test_jailed_launch_failures_leave_nothing(tmp_path: Path, fail: str | None) -> None:
    run = tmp_path / "run"
    launcher = Launcher(fail=fail)
    fc = jailed(launcher)
    spec = dataclasses.replace(FULL, run_dir=run, vsock=VsockSpec(7, run / "v.sock"),
                               console_log=tmp_path / "console.log")
    with pytest.raises(BangerError) as info:
        fc.launch(fc.plan(spec), timeout=5)
    for child in launcher.children:
        child.wait(5)
    steps = [name for name, _ in launcher.calls]
    if fail == "stage":
        assert str(info.value) == "injected: staging failed" and steps == ["stage"]
    elif fail == "launch":
        assert str(info.value) == "injected: the jailer did not start"
        assert steps == ["stage", "launch", "cleanup"]  # the staged jail is removed again
    else:
        # The "jailer" exits at once: Firecracker never answers, the process and the jail are cleaned up.
        assert str(info.value).startswith(f"Firecracker for VM {VM_ID} did not start: Firecracker exited before")
        assert steps == ["stage", "launch", "cleanup"]
    assert sorted(p.name for p in run.iterdir()) == []


def test_runtime_paths() -> None:
    paths = runtime_paths(RUN)
    assert (paths.api_socket, paths.pidfile, paths.log, paths.metrics) == (
        RUN / "fc.sock", RUN / "firecracker.pid", RUN / "firecracker.log", RUN / "firecracker.metrics",
    )  # fmt: skip


def test_backend_identity() -> None:
    fc = vmm()
    assert fc.backend is Backend.FIRECRACKER
    assert fc.capabilities == frozenset({"pause"})


def test_alive_is_false_for_other_processes() -> None:
    fc = vmm()
    assert not fc.alive(os.getpid())  # python, not firecracker
    assert not fc.alive(2**22 + 12345)  # above pid_max: no such process


def test_registry_builds_firecracker_or_says_it_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    if not any(os.path.exists(f"{d}/firecracker") for d in ("/usr/sbin", "/sbin", "/usr/local/sbin")):
        with pytest.raises(NotFound, match="firecracker not found"):
            BACKENDS[Backend.FIRECRACKER]()
    binary = tmp_path / "firecracker"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    built = BACKENDS[Backend.FIRECRACKER]()
    assert isinstance(built, FirecrackerVmm) and built.firecracker_bin == str(binary)
