"""The contract against a real Firecracker binary: banger's API calls are accepted, and a kernel boots.

Runs only when a `firecracker` binary is on PATH or named by BANGER_FIRECRACKER_BIN (otherwise the tests
skip and say so). The boot test boots BANGER_TEST_VMLINUX, or by default Debian's cloud kernel as banger
extracts it.

On the project's hosts /dev/kvm is PVM: a stock guest kernel prints its banner on the serial console and
then stops. So the boot test asserts InstanceStart succeeding and the guest's "Linux version" line, no more.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from banger.system.run import find_binary, run, spawn
from banger.vmm.firecracker.api import FirecrackerApi, FirecrackerApiError, wait_for_socket
from banger.vmm.firecracker.config import Drive, FirecrackerVmConfig, NetIface, Vsock, apply, request_bodies

NO_BINARY = "no firecracker binary found on PATH or in BANGER_FIRECRACKER_BIN; the real-binary contract test did not run"
# earlyprintk: the banner reaches the console at once, before the (slow, under PVM) serial driver loads.
BOOT_ARGS = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1 pci=off"
BOOT_DEADLINE_S = 30.0


def firecracker_binary() -> str:
    named = os.environ.get("BANGER_FIRECRACKER_BIN")
    if named:
        if not (os.path.isfile(named) and os.access(named, os.X_OK)):
            pytest.fail(f"BANGER_FIRECRACKER_BIN={named!r} is not an executable file")
        return named
    found = find_binary("firecracker")
    if found is None:
        pytest.skip(NO_BINARY)
    return found


def vmlinux_for_test(work: Path) -> str:
    """BANGER_TEST_VMLINUX, or else Debian's cloud kernel as banger extracts it (the package is cached)."""
    path = os.environ.get("BANGER_TEST_VMLINUX")
    if not path:
        from tests.e2e.banger_env import debian_kernel_files

        debian_kernel_files("debian-12-cloud", work / "kernel")
        return str(work / "kernel" / "vmlinux")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        pytest.fail(f"BANGER_TEST_VMLINUX={path!r} cannot be read: {exc}")
    if magic != b"\x7fELF":
        pytest.fail(f"BANGER_TEST_VMLINUX={path!r} is not an ELF vmlinux (a bzImage/vmlinuz will not do)")
    return path


@dataclass
class Firecracker:
    proc: subprocess.Popen[bytes]
    api: FirecrackerApi
    workdir: Path
    console: Path  # Firecracker's stdout: the guest's serial console (and its own log until PUT /logger)
    stderr: Path

    def diagnostics(self) -> str:
        parts = [f"exit status: {self.proc.poll()}"]
        for path in (self.console, self.stderr, self.workdir / "firecracker.log"):
            if path.exists():
                parts.append(f"--- {path.name} (tail) ---\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


@pytest.fixture
def firecracker() -> Iterator[Firecracker]:
    binary = firecracker_binary()
    # A short directory: the API and vsock sockets must fit AF_UNIX's 107-byte limit.
    with tempfile.TemporaryDirectory(prefix="bgfc-") as tmp:
        workdir = Path(tmp)
        sock = workdir / "fc.sock"
        console, stderr = workdir / "console.log", workdir / "stderr.log"
        with console.open("wb") as out, stderr.open("wb") as err:
            proc = spawn(
                [binary, "--api-sock", str(sock), "--level", "Info"],
                stdout=out.fileno(),
                stderr=err.fileno(),
                new_session=True,
            )
        api = FirecrackerApi(sock)
        fc = Firecracker(proc, api, workdir, console, stderr)
        try:
            info = wait_for_socket(sock, 10, alive=lambda: proc.poll() is None)
            assert info["state"] == "Not started"
            yield fc
        finally:
            api.close()
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        assert proc.returncode is not None
        assert not Path(f"/proc/{proc.pid}").exists(), "firecracker survived the kill"


def make_disks(workdir: Path) -> tuple[Path, Path]:
    mkfs = find_binary("mkfs.ext4")
    if mkfs is None:
        pytest.skip("mkfs.ext4 not found (e2fsprogs); the real-binary test did not run")
    empty = workdir / "empty"
    empty.mkdir()
    rootfs, work = workdir / "rootfs.ext4", workdir / "work.img"
    for path, size in ((rootfs, 32 << 20), (work, 8 << 20)):
        with path.open("wb") as f:
            f.truncate(size)
    run([mkfs, "-q", "-F", "-d", str(empty), str(rootfs)])
    return rootfs, work


def vm_config(fc: Firecracker, kernel: str) -> FirecrackerVmConfig:
    rootfs, work = make_disks(fc.workdir)
    net: tuple[NetIface, ...] = ()
    if os.geteuid() == 0 and os.path.exists("/dev/net/tun"):
        # As root Firecracker creates the tap itself (TUNSETIFF); it vanishes when the process exits.
        net = (NetIface("eth0", f"bgt{os.getpid() % 0xFFFFFF:x}", "06:00:ac:10:00:02"),)
    return FirecrackerVmConfig(
        kernel_path=kernel,
        initrd_path=None,
        boot_args=BOOT_ARGS,
        vcpu=1,
        memory_mib=256,
        drives=(
            Drive("rootfs", str(rootfs), is_root_device=True, is_read_only=True),
            Drive("work", str(work), is_root_device=False, is_read_only=False),
        ),
        net=net,
        vsock=Vsock(3, str(fc.workdir / "v.sock")),
        log_path=str(fc.workdir / "firecracker.log"),
        metrics_path=str(fc.workdir / "metrics.json"),
        entropy=True,
    )


def test_real_firecracker_accepts_every_configuration_call(firecracker: Firecracker) -> None:
    """No kernel needed: all pre-boot calls must answer 204, and Firecracker must report back what was sent."""
    fc = firecracker
    kernel = fc.workdir / "not-a-kernel"
    kernel.write_bytes(b"this is not an ELF file")
    cfg = vm_config(fc, str(kernel))
    for method, path, body in request_bodies(cfg):
        assert fc.api.request(method, path, body) is None, f"{method} {path}: expected 204"

    exported = fc.api.get_vm_config()
    assert exported["machine-config"]["vcpu_count"] == cfg.vcpu
    assert exported["machine-config"]["mem_size_mib"] == cfg.memory_mib
    assert exported["boot-source"]["kernel_image_path"] == cfg.kernel_path
    assert exported["boot-source"]["boot_args"] == BOOT_ARGS
    drives = {d["drive_id"]: d for d in exported["drives"]}
    assert set(drives) == {"rootfs", "work"}
    for drive in cfg.drives:
        got = drives[drive.drive_id]
        assert (got["path_on_host"], got["is_root_device"], got["is_read_only"]) == (
            drive.path_on_host,
            drive.is_root_device,
            drive.is_read_only,
        )
    assert cfg.vsock is not None
    assert (exported["vsock"]["guest_cid"], exported["vsock"]["uds_path"]) == (
        cfg.vsock.guest_cid,
        cfg.vsock.uds_path,
    )
    assert [(n["iface_id"], n["host_dev_name"]) for n in exported["network-interfaces"]] == [
        (n.iface_id, n.host_dev_name) for n in cfg.net
    ]
    assert Path(cfg.log_path or "").exists()

    # A real 400 from Firecracker comes back as one typed, one-line error with its fault_message.
    with pytest.raises(FirecrackerApiError) as info:
        fc.api.instance_start()
    err = info.value
    assert (err.status, err.method, err.path) == (400, "PUT", "/actions")
    assert "kernel" in err.fault_message.lower(), fc.diagnostics()
    assert str(err).startswith("Firecracker API PUT /actions failed with HTTP 400: ")
    assert "\n" not in str(err)


@pytest.mark.vm
def test_real_firecracker_boots_a_kernel_to_its_banner(firecracker: Firecracker, tmp_path: Path) -> None:
    fc = firecracker
    kernel = vmlinux_for_test(tmp_path)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is not accessible to this user; the real-binary boot test did not run")
    cfg = vm_config(fc, kernel)
    apply(fc.api, cfg)  # ends with InstanceStart; any non-2xx answer raises
    assert fc.api.get_instance_info()["state"] == "Running"

    deadline = time.monotonic() + BOOT_DEADLINE_S
    while b"Linux version" not in fc.console.read_bytes():
        assert fc.proc.poll() is None, f"firecracker exited during boot\n{fc.diagnostics()}"
        assert time.monotonic() < deadline, (
            f"no 'Linux version' on the console in {BOOT_DEADLINE_S:g}s\n{fc.diagnostics()}"
        )
        time.sleep(0.1)
