"""Talking to a VM's guest while it boots and when it stops: waiting for its agent and its sshd,
pinning its SSH host key through the agent, and asking it to power off.

Each wait watches the VMM too, so a guest that dies during boot is reported at once with the end of
its console instead of after the deadline.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from banger import model
from banger.errors import BangerError

if TYPE_CHECKING:
    from banger.daemon.vms import VmService
    from banger.vmm.base import Vmm

log = logging.getLogger("banger.vms")


async def wait_agent(svc: VmService, vm: model.VmRecord, pid: int, console: Path) -> None:
    """Until the guest agent answers health, watching the VMM. An image without the agent (registered
    by hand, older builds) is not an error: the SSH wait that follows is the readiness check then."""
    import time

    from banger.guest.agent_wire import AgentVersionMismatch

    deadline = time.monotonic() + svc.d.config.ssh_wait_timeout
    vmm = svc.vmm(vm.runtime)
    endpoint = svc.agent_endpoint(vm)
    while time.monotonic() < deadline:
        _still_booting(vmm, pid, vm, console)
        try:
            await asyncio.to_thread(svc.d.agents.connect, vm.id, endpoint, time.monotonic() + 3.0)
            return
        except AgentVersionMismatch:
            raise
        except BangerError:
            if "banger: guest ready" in _tail_lines(console, 3):
                log.info("guest is up without an agent", extra={"vm": vm.name})
                return


def pin_via_agent(svc: VmService, vm: model.VmRecord) -> bool:
    """Pin the guest's SSH host key as read through the agent: a local channel no one on the network
    can stand in, so this is stronger than trust-on-first-use, and the client skips its key scan."""
    from banger.guest import knownhosts

    try:
        data, _ = svc.d.agents.get(vm.id, svc.agent_endpoint(vm), timeout=3.0).read_file(
            "/etc/ssh/ssh_host_ed25519_key.pub")
        fields = data.decode("ascii", "replace").split()
        if len(fields) < 2:
            return False
        knownhosts.pin(svc.d.layout.known_hosts, f"{vm.name}.vm", [f"{fields[0]} {fields[1]}"],
                       vm_name=vm.name)
        return True
    except BangerError as exc:
        log.info("host key not pinned through the agent", extra={"vm": vm.name, "error": exc.message})
        return False


async def wait_guest(svc: VmService, vm: model.VmRecord, pid: int, console: Path) -> None:
    """Until the guest's sshd accepts TCP, watching the VMM: a guest that dies during boot is
    reported at once with the end of its console, instead of after the SSH deadline. Past the
    deadline the VM is left running for the caller's own SSH wait to report on."""
    import time

    deadline = time.monotonic() + svc.d.config.ssh_wait_timeout
    vmm = svc.vmm(vm.runtime)
    ask_agent = True
    while time.monotonic() < deadline:
        _still_booting(vmm, pid, vm, console)
        if ask_agent:
            listening = await asyncio.to_thread(sshd_listening, svc, vm)
            if listening:
                return
            if listening is False:
                await asyncio.sleep(0.1)
                continue
            ask_agent = False  # no agent to ask: probe the port from outside
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(vm.guest_ip, 22), 1.0)
        except (OSError, TimeoutError):
            await asyncio.sleep(0.2)
            continue
        writer.close()
        return
    log.warning("guest did not open port 22 before the deadline", extra={"vm": vm.name})


def sshd_listening(svc: VmService, vm: model.VmRecord) -> bool | None:
    """Whether the guest listens on TCP port 22, asked through the agent; None without an agent.

    Asking from inside instead of connecting from outside matters under emulation: every TCP
    connection makes sshd fork and re-exec a child that costs the guest about half a second of CPU,
    right when the first real SSH session wants it."""
    try:
        sockets = svc.d.agents.get(vm.id, svc.agent_endpoint(vm), timeout=2.0).ports(timeout=5.0)
    except BangerError:
        return None
    return any(s.proto == "tcp" and s.port == 22 for s in sockets)


def guest_poweroff(svc: VmService, vm: model.VmRecord) -> bool:
    """Ask the guest to power off, through its agent or else over SSH; True if it accepted."""
    try:
        svc.d.agents.get(vm.id, svc.agent_endpoint(vm), timeout=3.0).poweroff(timeout=5.0)
        return True
    except BangerError as exc:
        log.info("guest poweroff through the agent failed", extra={"vm": vm.name, "error": exc.message})
    return ssh_poweroff(svc, vm)


def ssh_poweroff(svc: VmService, vm: model.VmRecord) -> bool:
    """Ask the guest to power off over SSH (systemd or banger's fast init); True if it accepted.

    ACPI power-button events need a listener in the guest, which a small init does not have, so
    the guest is asked directly, like the original banger does.
    """
    from banger.guest import knownhosts, ssh
    from banger.system.run import run

    cfg = svc.d.config
    alias = f"{vm.name}.vm"
    try:
        if not knownhosts.lookup(svc.d.layout.known_hosts, alias):
            knownhosts.pin(svc.d.layout.known_hosts, alias, knownhosts.scan_host_key(vm.guest_ip, timeout=3),
                           vm_name=vm.name)
        script = ("sync; if [ -d /run/systemd/system ]; then systemctl --no-block poweroff; "
                  "else kill -TERM 1; fi")
        argv = ssh.ssh_argv(vm.guest_ip, key=cfg.ssh_key_path, known_hosts=svc.d.layout.known_hosts,
                            host_alias=alias, command=["sh", "-c", script], tty=False, control_dir=None,
                            connect_timeout=3)
        return run(argv, check=False, timeout=10).returncode == 0
    except BangerError as exc:
        log.info("guest poweroff over ssh failed", extra={"vm": vm.name, "error": exc.message})
        return False


def _still_booting(vmm: Vmm, pid: int, vm: model.VmRecord, console: Path) -> None:
    """Raise, with the end of the console, when the VMM died while the guest was booting."""
    if not vmm.alive(pid):
        raise BangerError(f"vm {vm.name!r} stopped while booting: {_tail_lines(console, 6)}",
                          hint=f"the full console is in {console}")


def _tail_lines(path: Path, count: int) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no console output)"
    return " | ".join(lines[-count:]) or "(no console output)"
