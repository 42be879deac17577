"""How `banger vm run` ends on SIGHUP (its terminal closed) and SIGTERM: its clean-up still runs.

The child below runs banger's own code (`_exit_on_signals`, `_run_ssh`, `_ignore_exit_signals`) the way
`vm run --rm` does: a session child holding the terminal (a real `sleep` standing in for ssh), then a
clean-up in `finally` (the VM deletion there) that takes a moment. It is a session leader on a real
pty, so closing the master is a real hangup. tests/e2e/test_interactive.py checks the same end to end
with VMs.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

from tests.e2e.banger_env import REPO

CHILD = r"""
import os, signal, sys, time
from pathlib import Path
from banger.cli import vm

done = Path(sys.argv[1])
if sys.argv[2] == "nohup":
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
with vm._exit_on_signals():
    try:
        print("session", flush=True)
        vm._run_ssh(["sh", "-c", "echo child=$$; exec sleep 600"])
    finally:
        vm._ignore_exit_signals()
        vm._say("cleaning")  # after a hangup this goes nowhere, and must not raise
        time.sleep(1.5)  # long enough for a second signal to arrive
        done.write_text("cleaned up")
"""


def _take_controlling_tty() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Child:
    def __init__(self, done: Path, mode: str = "") -> None:
        self.master, slave = os.openpty()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(done), mode], stdin=slave, stdout=slave, stderr=slave,
                cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO / "src")), start_new_session=True,
                preexec_fn=_take_controlling_tty)
        finally:
            os.close(slave)
        self.out = b""

    def read_until(self, marker: bytes, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.out:
            assert time.monotonic() < deadline, f"no {marker!r} in {self.out!r}"
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    self.out += os.read(self.master, 4096)
                except OSError:
                    raise AssertionError(f"terminal closed before {marker!r}: {self.out!r}") from None

    def session_child(self) -> int:
        self.read_until(b"\n", timeout=30)
        self.read_until(b"child=")
        self.read_until(b"\n")
        return int(self.out.split(b"child=")[1].split()[0])

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if self.master >= 0:
            os.close(self.master)


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie is gone for our purpose: it no longer runs (its parent may not have reaped it yet).
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return True
        time.sleep(0.05)
    return False


def test_hangup_runs_the_cleanup_and_exits_129(tmp_path: Path) -> None:
    done = tmp_path / "done"
    child = Child(done)
    try:
        sleeper = child.session_child()
        os.close(child.master)  # the terminal window is closed
        child.master = -1
        assert child.proc.wait(30) == 128 + signal.SIGHUP
        assert done.read_text() == "cleaned up"
        assert _gone(sleeper)
    finally:
        child.close()


def test_sigterm_stops_the_session_child_and_a_second_one_is_ignored(tmp_path: Path) -> None:
    done = tmp_path / "done"
    child = Child(done)
    try:
        sleeper = child.session_child()
        child.proc.send_signal(signal.SIGTERM)  # to banger alone: it must stop its session child itself
        child.read_until(b"cleaning")
        assert _gone(sleeper)
        child.proc.send_signal(signal.SIGTERM)  # during the clean-up: ignored
        assert child.proc.wait(30) == 128 + signal.SIGTERM
        assert done.read_text() == "cleaned up"
    finally:
        child.close()


def test_an_ignored_sighup_stays_ignored(tmp_path: Path) -> None:
    done = tmp_path / "done"
    child = Child(done, "nohup")
    try:
        sleeper = child.session_child()
        child.proc.send_signal(signal.SIGHUP)  # `nohup banger vm run ...`: the run goes on
        time.sleep(0.5)
        assert child.proc.poll() is None and not _gone(sleeper, timeout=0.1)
        child.proc.send_signal(signal.SIGTERM)
        assert child.proc.wait(30) == 128 + signal.SIGTERM
        assert done.read_text() == "cleaned up"
    finally:
        child.close()
