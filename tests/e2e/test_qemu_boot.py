"""Boot real VMs with the QEMU backend (TCG on hosts without usable hardware KVM).

Kernel: the Debian cloud kernel + busybox mini initrd from banger's kernel catalog (conftest.py).
Root: a read-only 32 MiB busybox ext4 whose /sbin/init prints BANGER-E2E-READY; a writable scratch
disk; the agent channel over virtio-serial. The vsock test boots a second root with the host's python3
and banger's real guest agent, reached through the real vhost-device-vsock (skipped, with the install
command, when it is not on PATH).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from banger.errors import AlreadyExists, BangerError
from banger.guest import agent as agent_module
from banger.guest.agent_client import AgentClient, wait_ready
from banger.guest.agent_wire import AgentUnavailable
from banger.model import new_id
from banger.vmm.base import DriveSpec, Sidecar, VmProcess, VmSpec, VsockSpec
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


# --- the vsock agent transport: the real vhost-device-vsock and the real guest agent ---------------------

INSTALL_VHOST_VSOCK = "sudo banger internal install-vhost-vsock"
GUEST_CID = 3
VSOCK_READY_TIMEOUT = 120.0
# PID 1 of the agent rootfs: the kernel's vsock transport came from the initramfs (DEFAULT_MODULES); the
# marker line shows whether it is there, then the real banger-agent serves AF_VSOCK port 1024 only.
AGENT_INIT = r"""#!/bin/sh
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
vsock=$(cat /sys/module/vmw_vsock_virtio_transport/initstate 2>/dev/null || echo absent)
echo "BANGER-E2E-READY uptime=$(cut -d' ' -f1 /proc/uptime) vsock_transport=$vsock"
exec /usr/bin/python3 -I -S /usr/local/bin/banger-agent --no-serial
"""
AGENT_APPLETS = ("sh", "mount", "cat", "cut", "echo", "ls", "uname", "sleep")
# Parts of the host's standard library the agent never imports; the rest keeps the guest honest.
_STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
                "site-packages", "dist-packages"}


@pytest.fixture(scope="session")
def vhost_vsock_bin() -> str:
    from banger.system.run import find_binary

    path = find_binary("vhost-device-vsock")
    if path is None:
        pytest.skip(f"vhost-device-vsock is not on PATH, so the vsock agent transport cannot be tested: "
                    f"install it with `{INSTALL_VHOST_VSOCK}`")
    return path


def _copy_with_libs(binary: Path, tree: Path) -> None:
    """`binary` and the shared libraries `ldd` names, at the same paths inside `tree`."""
    listing = subprocess.run(["ldd", str(binary)], check=True, capture_output=True, text=True).stdout
    for path in {binary, *(Path(m) for m in re.findall(r"(/\S+) \(0x", listing))}:
        target = tree / str(path).lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)  # follows symlinks: the guest gets the files themselves


@pytest.fixture(scope="session")
def agent_rootfs(boot_kernel: BootKernel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only ext4 with busybox, the host's Debian python3 (binary, libraries, standard library) and
    banger's real guest agent, which PID 1 execs."""
    python = Path(os.path.realpath("/usr/bin/python3"))
    busybox = Path("/bin/busybox")
    if not python.is_file() or not busybox.is_file():
        pytest.skip("the vsock agent test needs Debian's python3 and busybox-static on the host")
    stdlib = Path("/usr/lib") / python.name
    work = tmp_path_factory.mktemp("agent-rootfs")
    tree = work / "tree"
    for directory in ("bin", "sbin", "dev", "proc", "sys", "tmp", "run", "root", "usr/local/bin"):
        (tree / directory).mkdir(parents=True)
    shutil.copy2(busybox, tree / "bin/busybox")
    for applet in AGENT_APPLETS:
        (tree / "bin" / applet).symlink_to("busybox")
    _copy_with_libs(python, tree)
    (tree / "usr/bin/python3").symlink_to(python.name)
    shutil.copytree(stdlib, tree / str(stdlib).lstrip("/"), ignore_dangling_symlinks=True,
                    ignore=lambda d, names: [n for n in names if n in _STDLIB_SKIP or n.startswith("config-")
                                             or ".opt-" in n])
    shutil.copy2(Path(agent_module.__file__), tree / "usr/local/bin/banger-agent")
    (tree / "usr/local/bin/banger-agent").chmod(0o755)
    init = tree / "sbin/init"
    init.write_text(AGENT_INIT)
    init.chmod(0o755)
    image = work / "rootfs.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "e2e-agent", "-d", str(tree), str(image), "160M"],
                   check=True, capture_output=True)
    shutil.rmtree(tree)
    return image


def test_agent_over_vhost_vsock(vmm: QemuVmm, boot_kernel: BootKernel, agent_rootfs: Path, vhost_vsock_bin: str,
                                tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    uds = run_dir / "vsock.sock"
    spec = VmSpec(
        vm_id=new_id(), name="e2e-vsock", vcpu=1, memory_mib=256, kernel=boot_kernel.vmlinux,
        initrd=boot_kernel.initrd, cmdline="root=/dev/vda ro", console_log=tmp_path / "console.log",
        run_dir=run_dir, drives=(DriveSpec("root", agent_rootfs, read_only=True, root=True),),
        vsock=VsockSpec(GUEST_CID, uds),
    )  # fmt: skip
    plan = vmm.plan(spec)
    assert [s.name for s in plan.sidecars] == ["vhost-device-vsock"]
    started = time.monotonic()
    proc = vmm.launch(plan, timeout=30)
    try:
        [sidecar] = proc.sidecar_pids
        assert os.path.realpath(f"/proc/{sidecar}/exe") == os.path.realpath(vhost_vsock_bin)
        try:
            client = wait_ready(lambda: AgentClient.connect_vsock_uds(uds, timeout=5.0),
                                time.monotonic() + VSOCK_READY_TIMEOUT)
        except AgentUnavailable as exc:
            console = spec.console_log.read_text(errors="replace")[-3000:] if spec.console_log.exists() else ""
            sidecar_log = (run_dir / "vhost-device-vsock.log").read_text(errors="replace")[-1000:]
            raise AssertionError(f"{exc}\nconsole tail:\n{console}\nvhost-device-vsock log:\n{sidecar_log}") from exc
        ready_at = time.monotonic() - started
        with client:
            assert client.info is not None and client.info.protocol == 1
            begun = time.monotonic()
            result = client.run(["/bin/sh", "-c", "uname -r; cat /sys/module/vmw_vsock_virtio_transport/initstate;"
                                 " echo to-stderr >&2; exit 7"])
            exec_s = time.monotonic() - begun
            assert result.status.code == 7
            assert result.stdout.decode().split() == [boot_kernel.kernel_version, "live"]
            assert result.stderr == b"to-stderr\n"
            # Every CONNECT is a stream of its own: a second client works alongside the first.
            with AgentClient.connect_vsock_uds(uds, timeout=5.0) as second:
                assert second.health().ok
                assert second.run(["/bin/echo", "second"]).stdout == b"second\n"
        console = spec.console_log.read_text(errors="replace")
        assert "vsock_transport=live" in console
        print(f"\n[qemu e2e] vsock agent via {vhost_vsock_bin}: answered {ready_at:.2f}s after launch, "
              f"exec round trip {exec_s * 1000:.0f} ms")
    finally:
        vmm.kill(proc)
    assert not Path(f"/proc/{sidecar}").exists(), "vhost-device-vsock outlived the VM"
    _assert_nothing_left(vmm, proc)
    assert sorted(p.name for p in run_dir.iterdir() if p.is_socket()) == []
    assert not uds.exists() and not (run_dir / "vhost-vsock.sock").exists()
