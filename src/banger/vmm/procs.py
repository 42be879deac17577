"""Process helpers shared by the VMM backends (one backend never imports another).

A backend names "its" process with an `Identify` callback, `pid -> bool`, that checks /proc/<pid>/cmdline
against what it launched (binary name and a path of this VM). Every signal and every "is it still there"
goes through that check, so a recycled pid is never killed and never mistaken for a live VMM.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path

from banger.errors import BangerError
from banger.vmm.base import ChildHandle, StopOutcome, VmProcess

log = logging.getLogger("banger.vmm")

POLL = 0.05
KILL_WAIT = 10.0  # SIGKILL'd processes normally vanish in milliseconds; longer means stuck in the kernel
_TAIL_BYTES = 4096
_TAIL_CHARS = 600

Identify = Callable[[int], bool]
"""`pid` is (still) the process we mean: live, and its command line is the one we launched."""


def cmdline(pid: int) -> list[str]:
    """argv of `pid`, or [] if it is gone or a zombie (whose cmdline reads empty)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0")[:-1]] if raw else []


def runs(pid: int, names: frozenset[str], *markers: str) -> bool:
    """`pid` is live, its argv[0] is named one of `names` and every marker is one of its arguments."""
    argv = cmdline(pid)
    return bool(argv) and os.path.basename(argv[0]) in names and all(m in argv[1:] for m in markers)


def option(argv: list[str], name: str) -> str | None:
    """The value of `--name value` or `--name=value` in `argv`."""
    for index, arg in enumerate(argv):
        if arg == name and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def find(names: frozenset[str], *markers: str) -> list[int]:
    """Every live process that `runs(pid, names, *markers)` accepts (e.g. a sidecar after a restart)."""
    return sorted(int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and runs(int(e.name), names, *markers))


def exists(pid: int) -> bool:
    """`pid` is a live process (not a zombie), whatever it runs."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] not in ("Z", "X")


def start_time(pid: int) -> float:
    """When `pid` started (epoch seconds), from /proc; 0.0 if that cannot be read."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
    except (OSError, IndexError, ValueError, StopIteration):
        return 0.0
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def sockets_in(run_dir: Path) -> tuple[Path, ...]:
    """The sockets (and the links to jailed sockets) in a VM's run directory, which only its VMM uses."""
    found = []
    with contextlib.suppress(OSError):
        for entry in sorted(run_dir.iterdir()):
            with contextlib.suppress(OSError):
                mode = entry.lstat().st_mode
                if stat.S_ISSOCK(mode) or stat.S_ISLNK(mode):
                    found.append(entry)
    return tuple(found)


def tail(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - _TAIL_BYTES))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines)[-_TAIL_CHARS:]


def describe(returncode: int | None) -> str:
    if returncode is None:
        return "exited"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
        return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def kill_child(child: ChildHandle) -> None:
    """SIGKILL and reap a child we started. Until it is reaped its pid cannot be reused, so no check."""
    if child.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT
    while child.poll() is None:
        if time.monotonic() >= deadline:
            raise BangerError(f"process {child.pid} survived SIGKILL for {KILL_WAIT:g}s")
        time.sleep(POLL)


def child_of(proc: VmProcess, pid: int) -> ChildHandle | None:
    return next((c for c in proc.children if c.pid == pid), None)


def poll(proc: VmProcess, pid: int, identify: Identify) -> str | None:
    """None while `pid` runs; once it is gone (and reaped, if it is our child), how it ended."""
    child = child_of(proc, pid)
    if child is not None:
        returncode = child.poll()
        return None if returncode is None else describe(returncode)
    with contextlib.suppress(ChildProcessError):
        reaped, status = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return describe(os.waitstatus_to_exitcode(status))
    return None if identify(pid) else describe(None)


def wait_gone(proc: VmProcess, pid: int, identify: Identify, timeout: float) -> str | None:
    """How `pid` ended, or None if it still runs after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        ended = poll(proc, pid, identify)
        if ended is not None or time.monotonic() >= deadline:
            return ended
        time.sleep(POLL)


def kill(proc: VmProcess, pid: int, identify: Identify, what: str) -> None:
    """SIGKILL `pid` if it still is our process, and wait until it is gone. A dead process is fine."""
    child = child_of(proc, pid)
    if child is not None:
        kill_child(child)
        return
    if identify(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if wait_gone(proc, pid, identify, KILL_WAIT) is None:
        raise BangerError(f"{what} for VM {proc.vm_id} (pid {pid}) survived SIGKILL for {KILL_WAIT:g}s")


def stop(proc: VmProcess, identify: Identify, *, what: str, request: str, ask: Callable[[], None],
         finish: Callable[[], None], kill_vmm: Callable[[], None], timeout: float) -> StopOutcome:
    """The graceful stop both backends share: `ask` the guest to power off (`request` names how, for the
    log), wait up to `timeout` for the VMM (`what`) to end, else `kill_vmm`. `finish` cleans up after a
    VMM that ended by itself."""
    if poll(proc, proc.pid, identify) is not None:
        finish()
        return "gone"
    try:
        ask()
    except BangerError as exc:
        log.warning("VM %s: %s failed (%s); killing %s", proc.vm_id, request, exc.message, what)
        kill_vmm()
        return "killed"
    ended = wait_gone(proc, proc.pid, identify, timeout)
    if ended is not None:
        log.info("VM %s powered off after %s (%s %s)", proc.vm_id, request, what, ended)
        finish()
        return "powerdown"
    log.info("VM %s ignored %s for %gs; killing %s", proc.vm_id, request, timeout, what)
    kill_vmm()
    return "killed"


def wait_running(proc: VmProcess, what: str, identify: Identify, probe: Callable[[float], str | None],
                 timeout: float, *, hint: str) -> None:
    """Until `probe(remaining)` says the guest runs (None; otherwise it returns why not yet), with a deadline.

    If the VMM ends first the error carries the tail of its log, so the cause is in the one line.
    """
    deadline = time.monotonic() + timeout
    last = "control socket not there yet"
    while True:
        ended = poll(proc, proc.pid, identify)
        if ended is not None:
            raise BangerError(f"{what} for VM {proc.vm_id} {ended} before the VM was running: "
                              f"{tail(proc.stderr_log) or 'no output'}", hint=hint)
        remaining = deadline - time.monotonic()
        if proc.control_socket.exists():
            try:
                reason = probe(min(max(remaining, 0.1), 1.0))
            except BangerError as exc:
                reason = exc.message
            if reason is None:
                return
            last = reason
        if time.monotonic() >= deadline:
            raise BangerError(f"VM {proc.vm_id} was not running within {timeout:g}s ({last})",
                              hint=f"see {proc.stderr_log}")
        time.sleep(POLL)


def remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def read_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def write_pid(pidfile: Path, pid: int) -> None:
    tmp = pidfile.with_name(pidfile.name + ".tmp")
    tmp.write_text(f"{pid}\n", encoding="ascii")
    os.replace(tmp, pidfile)
