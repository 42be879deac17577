"""Process helpers shared by the VMM backends (one backend never imports another)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from banger.errors import BangerError
from banger.vmm.base import ChildHandle

POLL = 0.05
KILL_WAIT = 10.0  # SIGKILL'd processes normally vanish in milliseconds; longer means stuck in the kernel
_TAIL_BYTES = 4096
_TAIL_CHARS = 600


def cmdline(pid: int) -> list[str]:
    """argv of `pid`, or [] if it is gone or a zombie (whose cmdline reads empty)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0")[:-1]] if raw else []


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
