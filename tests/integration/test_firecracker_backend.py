"""`FirecrackerVmm` against a real Firecracker binary: launch, configure, boot to the kernel banner, stop, kill.

Runs only when a firecracker binary is found (BANGER_FIRECRACKER_BIN, else `firecracker` on PATH, else
`firecracker_bin` in the user's config.toml); the boot test also needs an ELF vmlinux (BANGER_TEST_VMLINUX,
else the Debian cloud vmlinux in the test cache). Otherwise the tests skip and say why.

On the project's hosts /dev/kvm is PVM: the guest kernel prints its banner on the serial console and then
stops making progress, so the boot test asserts InstanceStart, state "Running" and "Linux version" on the
console, no more; stop() then has to kill Firecracker ("killed"), which is exactly the path worth testing.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger.errors import BangerError
from banger.system.run import find_binary, run
from banger.vmm.base import DriveSpec, VmProcess, VmSpec, VsockSpec
from banger.vmm.firecracker.api import FirecrackerApi, FirecrackerApiError
from banger.vmm.firecracker.backend import FirecrackerVmm, runtime_paths

NO_BINARY = (
    "no firecracker binary: set BANGER_FIRECRACKER_BIN, put `firecracker` on PATH or set firecracker_bin in "
    "config.toml; the Firecracker backend integration tests did NOT run"
)
CACHED_VMLINUX = Path("/var/tmp/banger-test-cache/kernels/debian-12-cloud/vmlinux")
# earlyprintk: the banner reaches the console at once, before the (slow, under PVM) serial driver loads.
EXTRA_CMDLINE = "earlyprintk=serial,ttyS0,115200 root=/dev/vda ro"
BOOT_DEADLINE_S = 30.0
VM_ID = "f1c2a3b4c5d6e7f8a9b0c1d2e3f4a5b6"


def firecracker_binary() -> str:
    named = os.environ.get("BANGER_FIRECRACKER_BIN")
    if named:
        if not (os.path.isfile(named) and os.access(named, os.X_OK)):
            pytest.fail(f"BANGER_FIRECRACKER_BIN={named!r} is not an executable file")
        return named
    found = find_binary("firecracker")
    if found is not None:
        return found
    try:
        from banger import config
        from banger.paths import resolve_user

        configured = config.load(resolve_user()).firecracker_bin
    except BangerError:
        configured = None
    if configured is not None and os.access(configured, os.X_OK):
        return str(configured)
    pytest.skip(NO_BINARY)


def vmlinux_or_skip() -> Path:
    named = os.environ.get("BANGER_TEST_VMLINUX")
    path = Path(named) if named else CACHED_VMLINUX
    if not named and not path.exists():
        pytest.skip(f"BANGER_TEST_VMLINUX is not set and {CACHED_VMLINUX} does not exist; the boot test did NOT run")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        pytest.fail(f"vmlinux {str(path)!r} cannot be read: {exc}")
    if magic != b"\x7fELF":
        pytest.fail(f"{str(path)!r} is not an ELF vmlinux (a bzImage/vmlinuz will not do)")
    return path


def kvm_or_skip() -> None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is not accessible to this user; the Firecracker boot test did NOT run")


@pytest.fixture
def workdir() -> Iterator[Path]:
    # A short directory: the API and vsock sockets must fit AF_UNIX's 107-byte limit.
    with tempfile.TemporaryDirectory(prefix="bgfcb-") as tmp:
        yield Path(tmp)


@pytest.fixture
def fc() -> FirecrackerVmm:
    return FirecrackerVmm(firecracker_bin=firecracker_binary())


def make_rootfs(workdir: Path) -> Path:
    mkfs = find_binary("mkfs.ext4")
    if mkfs is None:
        pytest.skip("mkfs.ext4 not found (e2fsprogs); the Firecracker boot test did NOT run")
    rootfs = workdir / "rootfs.ext4"
    with rootfs.open("wb") as f:
        f.truncate(16 << 20)
    run([mkfs, "-q", "-F", str(rootfs)])
    return rootfs


def vm_spec(workdir: Path, kernel: Path, drives: tuple[DriveSpec, ...] = ()) -> VmSpec:
    return VmSpec(
        vm_id=VM_ID,
        name="fc-test",
        vcpu=1,
        memory_mib=128,
        kernel=kernel,
        initrd=None,
        cmdline=EXTRA_CMDLINE,
        console_log=workdir / "console.log",
        run_dir=workdir / "run",
        drives=drives,
        vsock=VsockSpec(3, workdir / "run" / "v.sock"),
    )


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def processes_with(arg: str) -> list[int]:
    """Live (not zombie) processes that have `arg` in their argv."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if arg.encode() in argv:
                found.append(int(entry.name))
    return found


def assert_cleaned_up(fc: FirecrackerVmm, proc: VmProcess) -> None:
    assert gone(proc.pid), f"firecracker pid {proc.pid} is still there"
    assert not proc.control_socket.exists(), "the API socket was left behind"
    assert not proc.pidfile.exists(), "the pidfile was left behind"
    assert not fc.alive(proc.pid)


def diagnostics(workdir: Path) -> str:
    parts = []
    for path in (workdir / "console.log", runtime_paths(workdir / "run").log):
        if path.exists():
            parts.append(f"--- {path.name} (tail) ---\n{path.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)


def test_launch_gives_an_answering_api_and_a_pidfile(fc: FirecrackerVmm, workdir: Path) -> None:
    spec = vm_spec(workdir, workdir / "vmlinux-not-needed")
    proc = fc.launch(fc.plan(spec), timeout=10)
    try:
        assert proc.pidfile.read_text().strip() == str(proc.pid)
        assert proc.control_socket == workdir / "run" / "fc.sock" and proc.control_socket.is_socket()
        assert fc.alive(proc.pid)
        # The process runs in its own session, so it outlives the daemon's.
        assert os.getsid(proc.pid) == proc.pid
        with FirecrackerApi(proc.control_socket) as api:
            info = api.get_instance_info()
        assert info["state"] == "Not started" and info["id"] == "f1c2a3b4"
        with pytest.raises(BangerError, match="already running"):
            fc.launch(fc.plan(spec), timeout=10)
    finally:
        fc.kill(proc)
    assert_cleaned_up(fc, proc)
    fc.kill(proc)  # idempotent


@pytest.mark.vm
def test_boot_to_the_kernel_banner_then_stop(fc: FirecrackerVmm, workdir: Path) -> None:
    kernel = vmlinux_or_skip()
    kvm_or_skip()
    spec = vm_spec(workdir, kernel, (DriveSpec("rootfs", make_rootfs(workdir), read_only=True, root=True),))
    proc = fc.launch(fc.plan(spec), timeout=10)
    try:
        fc.configure(proc, spec)  # ends with InstanceStart; any API error raises
        fc.wait_running(proc, 10)
        with FirecrackerApi(proc.control_socket) as api:
            exported = api.get_vm_config()
        assert exported["boot-source"]["boot_args"].startswith("console=ttyS0 reboot=k panic=1 pci=off earlyprintk=")
        assert [d["drive_id"] for d in exported["drives"]] == ["rootfs"]
        assert (workdir / "run" / "v.sock").is_socket()

        deadline = time.monotonic() + BOOT_DEADLINE_S
        while b"Linux version" not in spec.console_log.read_bytes():
            assert not gone(proc.pid), f"firecracker exited during boot\n{diagnostics(workdir)}"
            assert time.monotonic() < deadline, (
                f"no 'Linux version' on the console in {BOOT_DEADLINE_S:g}s\n{diagnostics(workdir)}"
            )
            time.sleep(0.1)

        fc.pause(proc)
        with FirecrackerApi(proc.control_socket) as api:
            assert api.get_instance_info()["state"] == "Paused"
        fc.resume(proc)
        fc.wait_running(proc, 5)

        outcome = fc.stop(proc, 3.0)
        assert outcome in ("killed", "powerdown"), outcome
    finally:
        fc.kill(proc)
    assert_cleaned_up(fc, proc)
    assert not (workdir / "run" / "v.sock").exists(), "the vsock socket was left behind"
    assert fc.stop(proc, 1.0) == "gone"


def test_bad_kernel_path_is_a_one_line_api_error_and_leaves_no_process(fc: FirecrackerVmm, workdir: Path) -> None:
    spec = vm_spec(workdir, workdir / "no-such-vmlinux")
    proc = fc.launch(fc.plan(spec), timeout=10)
    with pytest.raises(FirecrackerApiError) as info:
        fc.configure(proc, spec)
    err = info.value
    assert (err.method, err.path, err.status) == ("PUT", "/boot-source", 400), str(err)
    assert str(err).startswith("Firecracker API PUT /boot-source failed with HTTP 400: ")
    assert "\n" not in str(err)
    assert "kernel" in err.fault_message.lower(), err.fault_message
    assert_cleaned_up(fc, proc)


def test_adopted_process_is_killed_from_pid_and_paths_only(fc: FirecrackerVmm, workdir: Path) -> None:
    """After a daemon restart the VmProcess is rebuilt from the database: pid and paths, no Popen."""
    spec = vm_spec(workdir, workdir / "vmlinux-not-needed")
    launched = fc.launch(fc.plan(spec), timeout=10)
    adopted = dataclasses.replace(launched, children=())
    assert adopted.children == ()
    try:
        assert fc.alive(adopted.pid)
        fc.kill(adopted)
    finally:
        fc.kill(launched)
    assert_cleaned_up(fc, adopted)


def test_a_recycled_pid_is_not_killed(fc: FirecrackerVmm, workdir: Path) -> None:
    """A VmProcess whose pid now belongs to another Firecracker (another API socket) is left alone."""
    spec = vm_spec(workdir, workdir / "vmlinux-not-needed")
    other = fc.launch(fc.plan(spec), timeout=10)
    try:
        stale = dataclasses.replace(other, children=(), control_socket=workdir / "elsewhere" / "fc.sock",
                                    pidfile=workdir / "stale.pid", sockets=())
        fc.kill(stale)  # the pid does not serve stale's socket: treated as already gone
        assert not gone(other.pid) and fc.alive(other.pid)
        assert fc.stop(stale, 1.0) == "gone"
        assert not gone(other.pid)
    finally:
        fc.kill(other)
    assert_cleaned_up(fc, other)


def test_a_firecracker_that_cannot_start_leaves_nothing(fc: FirecrackerVmm, workdir: Path) -> None:
    spec = vm_spec(workdir, workdir / "vmlinux-not-needed")
    plan = fc.plan(spec)
    # The API socket's directory does not exist: Firecracker exits at once.
    broken = dataclasses.replace(plan, argv=(*plan.argv[:2], str(workdir / "missing" / "fc.sock"), *plan.argv[3:]),
                                 control_socket=workdir / "missing" / "fc.sock")
    with pytest.raises(BangerError, match="did not start") as info:
        fc.launch(broken, timeout=10)
    assert "\n" not in str(info.value)
    assert not plan.pidfile.exists()
    assert processes_with(str(broken.control_socket)) == []
