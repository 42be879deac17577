"""`Vmm.adopt()` for real: a VMM launched by one backend object is found again by a fresh one (as after a
daemon restart) from its run directory alone, killed through the adopted VmProcess, and never confused
with another process that happens to hold the pid in a stale pidfile.

QEMU (TCG) needs a guest kernel (the Debian cloud vmlinux in the test cache); the VM need not finish
booting. Firecracker needs its binary (BANGER_FIRECRACKER_BIN, PATH or config.toml). Otherwise skipped,
saying why.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger.model import new_id
from banger.system.run import find_binary
from banger.vmm import procs
from banger.vmm.base import VmProcess, VmSpec
from banger.vmm.firecracker.backend import FirecrackerVmm
from banger.vmm.qemu.backend import QemuVmm
from tests.integration.test_firecracker_backend import firecracker_binary

CACHE = Path(os.environ.get("BANGER_TEST_CACHE", "/var/tmp/banger-test-cache"))
KERNEL = CACHE / "kernels" / "debian-12-cloud"


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short: the control sockets must fit AF_UNIX's 107 bytes.
    with tempfile.TemporaryDirectory(prefix="bgad-") as tmp:
        yield Path(tmp)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "120"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def qemu_or_skip() -> QemuVmm:
    if find_binary("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not found: the QEMU adopt tests did NOT run")
    if not (KERNEL / "vmlinux").exists():
        pytest.skip(f"no guest kernel at {KERNEL}/vmlinux (run the e2e tests once to fill the cache): "
                    "the QEMU adopt tests did NOT run")
    return QemuVmm(accel="tcg", tsc_khz=0)


def qemu_spec(workdir: Path, name: str) -> VmSpec:
    return VmSpec(vm_id=new_id(), name=name, vcpu=1, memory_mib=128, kernel=KERNEL / "vmlinux",
                  initrd=KERNEL / "initrd.img", cmdline="console=ttyS0", console_log=workdir / f"{name}.console",
                  run_dir=workdir / name)


def assert_gone(pid: int) -> None:
    """Dead: gone, or a zombie until the test (its parent here, unlike a restarted daemon) reaps it."""
    deadline = time.monotonic() + 10
    while procs.exists(pid):
        assert time.monotonic() < deadline, f"pid {pid} is still there"
        time.sleep(0.02)


def test_qemu_is_adopted_by_a_fresh_backend_and_killed_through_it(workdir: Path) -> None:
    first = qemu_or_skip()
    spec = qemu_spec(workdir, "vm1")
    launched = first.launch(first.plan(spec), timeout=60)
    try:
        fresh = QemuVmm(accel="tcg", tsc_khz=0)  # a restarted daemon: no Popen, no memory of the launch
        adopted = fresh.adopt(spec.vm_id, spec.run_dir)
        assert adopted is not None
        assert (adopted.pid, adopted.control_socket, adopted.pidfile, adopted.stderr_log) == (
            launched.pid, launched.control_socket, launched.pidfile, launched.stderr_log)
        assert adopted.children == () and adopted.sidecar_pids == ()
        assert spec.run_dir / "qmp.sock" in adopted.sockets
        assert abs(adopted.started_at - launched.started_at) < 5
        fresh.wait_running(adopted, 5)  # QMP answers through the adopted process too
        fresh.kill(adopted)
        assert_gone(launched.pid)
        assert not launched.pidfile.exists() and not launched.control_socket.exists()
        assert fresh.adopt(spec.vm_id, spec.run_dir) is None
    finally:
        first.kill(launched)


def test_qemu_adopt_refuses_other_processes_behind_a_stale_pidfile(
    workdir: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    backend = qemu_or_skip()
    other = qemu_spec(workdir, "vm2")
    mine = qemu_spec(workdir, "vm3")
    assert backend.adopt(mine.vm_id, mine.run_dir) is None  # no run directory at all
    mine.run_dir.mkdir()
    assert backend.adopt(mine.vm_id, mine.run_dir) is None  # no pidfile
    pidfile = mine.run_dir / "qemu.pid"
    for stale in ("", "garbage\n", "99999999\n", f"{sleeper.pid}\n"):
        pidfile.write_text(stale)
        assert backend.adopt(mine.vm_id, mine.run_dir) is None, stale
    proc = backend.launch(backend.plan(other), timeout=60)
    try:
        pidfile.write_text(f"{proc.pid}\n")  # another VM's QEMU: its argv names the other run directory
        assert backend.adopt(mine.vm_id, mine.run_dir) is None
        assert procs.exists(proc.pid) and sleeper.poll() is None
    finally:
        backend.kill(proc)


def test_qemu_adopt_finds_its_vsock_sidecar(workdir: Path) -> None:
    """The sidecar is found by its command line (`vhost-device-vsock --socket <run_dir>/vhost-vsock.sock`).
    vhost-device-vsock is not installed here, so a stand-in process with that name and argv plays it."""
    backend = qemu_or_skip()
    spec = qemu_spec(workdir, "vm4")
    proc = backend.launch(backend.plan(spec), timeout=60)
    stand_in = workdir / "bin" / "vhost-device-vsock"
    stand_in.parent.mkdir()
    stand_in.symlink_to(os.path.realpath(sys.executable))
    socket_arg = str(spec.run_dir / "vhost-vsock.sock")
    sidecar = subprocess.Popen([str(stand_in), "-c", "import time; time.sleep(120)", "--socket", socket_arg])
    elsewhere = subprocess.Popen([str(stand_in), "-c", "import time; time.sleep(120)", "--socket",
                                  str(workdir / "other" / "vhost-vsock.sock")])
    try:
        deadline = time.monotonic() + 10
        while socket_arg not in procs.cmdline(sidecar.pid):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        adopted = QemuVmm(accel="tcg", tsc_khz=0).adopt(spec.vm_id, spec.run_dir)
        assert adopted is not None and adopted.sidecar_pids == (sidecar.pid,)
        QemuVmm(accel="tcg", tsc_khz=0).kill(adopted)
        assert_gone(sidecar.pid)
        assert_gone(proc.pid)
        assert elsewhere.poll() is None  # another VM's sidecar is not touched
    finally:
        for child in (sidecar, elsewhere):
            child.kill()
            child.wait(10)
        backend.kill(proc)


def test_firecracker_is_adopted_by_a_fresh_backend(workdir: Path, sleeper: subprocess.Popen[bytes]) -> None:
    binary = firecracker_binary()
    first = FirecrackerVmm(firecracker_bin=binary)
    spec = VmSpec(vm_id=new_id(), name="fc", vcpu=1, memory_mib=128, kernel=workdir / "vmlinux-not-needed",
                  initrd=None, cmdline="", console_log=workdir / "console.log", run_dir=workdir / "run")
    launched = first.launch(first.plan(spec), timeout=10)
    try:
        fresh = FirecrackerVmm(firecracker_bin=binary)
        adopted = fresh.adopt(spec.vm_id, spec.run_dir)
        assert adopted is not None
        assert (adopted.pid, adopted.control_socket, adopted.pidfile) == (
            launched.pid, launched.control_socket, launched.pidfile)
        assert adopted.stderr_log == spec.console_log  # found through the process's stdout
        assert adopted.sockets == (spec.run_dir / "fc.sock",) and adopted.children == ()
        # Another VM's id with this run directory's pidfile is not this VM's Firecracker.
        assert fresh.adopt(new_id(), workdir / "elsewhere") is None
        fresh.kill(adopted)
        assert_gone(launched.pid)
        assert fresh.adopt(spec.vm_id, spec.run_dir) is None

        spec.run_dir.mkdir(exist_ok=True)
        (spec.run_dir / "firecracker.pid").write_text(f"{sleeper.pid}\n")
        assert fresh.adopt(spec.vm_id, spec.run_dir) is None
        assert sleeper.poll() is None
    finally:
        first.kill(launched)


def test_adopted_process_kill_is_idempotent(workdir: Path) -> None:
    backend = qemu_or_skip()
    ghost = VmProcess(vm_id="0" * 32, pid=2**22 + 7, run_dir=workdir / "gone", control_socket=workdir / "gone/q.sock",
                      pidfile=workdir / "gone/qemu.pid", stderr_log=workdir / "gone/log", sockets=())
    backend.kill(ghost)  # nothing there: fine
    assert backend.stop(ghost, 1.0) == "gone"


JAILED_STAND_IN = "import os, sys, time; os.chroot(sys.argv[1]) if sys.argv[1] != '-' else None; time.sleep(120)"


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root; the jailed adopt test did NOT run")
def test_a_jailed_firecracker_is_adopted_by_its_id_and_chroot(workdir: Path) -> None:
    """A jailed Firecracker's argv names no host path (`/firecracker --id <jail id> --api-sock
    /firecracker.socket`), so it is recognised by its id and by its root directory being the chroot that
    the run directory's fc.sock links into. No jailer here: stand-in processes named `firecracker` with
    that argv play it (chrooted, or not: a pid whose root is elsewhere is not this VM's)."""
    vm_id = new_id()
    jail_id = vm_id[:8]
    chroot = workdir / "jail" / "firecracker" / jail_id / "root"
    chroot.mkdir(parents=True)
    run_dir = workdir / "run"
    run_dir.mkdir()
    (run_dir / "fc.sock").symlink_to(chroot / "firecracker.socket")
    stand_in = workdir / "bin" / "firecracker"
    stand_in.parent.mkdir()
    stand_in.symlink_to(os.path.realpath(sys.executable))
    fc = FirecrackerVmm(firecracker_bin=str(stand_in))

    def start(root: str, ident: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([str(stand_in), "-c", JAILED_STAND_IN, root, "--id", ident,
                                 "--api-sock", "/firecracker.socket"])
        deadline = time.monotonic() + 10
        while os.stat(f"/proc/{proc.pid}/root").st_ino != (chroot if root != "-" else Path("/")).stat().st_ino:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        return proc

    jailed = start(str(chroot), jail_id)
    unjailed = start("-", jail_id)  # right id, wrong root: e.g. a recycled pid of another jail's Firecracker
    other = start(str(chroot), "ffffffff")
    try:
        for impostor in (unjailed, other):
            (run_dir / "firecracker.pid").write_text(f"{impostor.pid}\n")
            assert fc.adopt(vm_id, run_dir) is None
        (run_dir / "firecracker.pid").write_text(f"{jailed.pid}\n")
        adopted = fc.adopt(vm_id, run_dir)
        assert adopted is not None and adopted.pid == jailed.pid
        assert adopted.sockets == (run_dir / "fc.sock",)
        fc.kill(adopted)
        assert_gone(jailed.pid)
        assert unjailed.poll() is None and other.poll() is None
        assert not (run_dir / "fc.sock").is_symlink() and not (run_dir / "firecracker.pid").exists()
    finally:
        for proc in (jailed, unjailed, other):
            proc.kill()
            proc.wait(10)
