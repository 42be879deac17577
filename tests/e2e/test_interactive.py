"""The interactive forms, `banger vm run [./repo]` and `banger vm ssh <vm>`, driven through a real pty.

banger runs as a user at a terminal would run it: a session leader whose controlling terminal is the
slave side of a pty (so the kernel delivers SIGWINCH on resize and turns ^C into SIGINT when the
terminal is in cooked mode), with the test typing into and reading from the master side. Two VMs are
booted one after the other: one `vm run --rm ./repo` session (workspace, window size, ^C, `exit 3`,
deletion) and one `vm run` without --rm (the still-running reminder, then `vm ssh` on the same VM);
then two at once, for --rm runs that end badly (^C during the create, the terminal closed mid-session).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.banger_env import REPO, BangerNetns
from tests.e2e.test_guest_ops import make_repo
from tests.e2e.test_vm_lifecycle import _no_vm_leftovers

pytestmark = [pytest.mark.vm, pytest.mark.network,
              pytest.mark.skipif(os.getuid() != 0, reason="VM tests need root (embedded mode, namespaces)")]

# Generous: a TCG boot takes 8-20 s alone, much longer with other developers' VMs on the same 2 cores.
BOOT_S = 400.0
STEP_S = 90.0
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[=>()][0-9A-Za-z]?")


def _take_controlling_tty() -> None:
    # Runs in the child after setsid (start_new_session): fd 0 is the pty slave; make it our terminal.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _winsize(rows: int, cols: int) -> bytes:
    return struct.pack("HHHH", rows, cols, 0, 0)


class Terminal:
    """One `banger` process on a pty, with a transcript and a read cursor into it."""

    def __init__(self, env: BangerNetns, *args: str, rows: int = 40, cols: int = 120) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, _winsize(rows, cols))
        self.args = args
        self.master = master
        self.raw = bytearray()
        self.pos = 0
        self.eof = False
        self.markers = 1000
        try:
            self.proc = subprocess.Popen(
                env.exec_argv([sys.executable, "-m", "banger", *args]), stdin=slave, stdout=slave, stderr=slave,
                env=dict(env.env, TERM="xterm"), cwd=REPO, start_new_session=True,
                preexec_fn=_take_controlling_tty)
        finally:
            os.close(slave)

    # --- reading ---------------------------------------------------------------------------------
    def text(self) -> str:
        """The transcript without terminal escapes, with \\r\\n as \\n."""
        clean = _ANSI.sub(b"", bytes(self.raw)).decode("utf-8", "replace")
        return clean.replace("\r\n", "\n").replace("\r", "")

    def _pump(self, wait: float) -> None:
        if self.eof:
            time.sleep(min(wait, 0.1))
            return
        ready, _, _ = select.select([self.master], [], [], wait)
        if not ready:
            return
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: every slave fd is closed
            chunk = b""
        if chunk:
            self.raw += chunk
        else:
            self.eof = True

    def fail(self, what: str) -> AssertionError:
        return AssertionError(f"{what}\n--- transcript of banger {' '.join(self.args)} ---\n{self.text()}\n"
                              f"--- end (rc={self.proc.poll()}) ---")

    def expect(self, pattern: str, timeout: float = STEP_S) -> re.Match[str]:
        """The first match of `pattern` after the cursor, within `timeout` seconds; moves the cursor past it."""
        regex = re.compile(pattern, re.S)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.text(), self.pos)
            if found:
                self.pos = found.end()
                return found
            if self.eof or time.monotonic() > deadline:
                raise self.fail(f"did not see {pattern!r} within {timeout:.0f}s"
                                + (" (banger's terminal closed)" if self.eof else ""))
            self._pump(min(0.5, max(0.0, deadline - time.monotonic())))

    # --- writing ---------------------------------------------------------------------------------
    def send(self, data: str) -> None:
        os.write(self.master, data.encode())

    def _marker(self) -> int:
        self.markers += 1
        return self.markers

    def wait_shell(self, timeout: float = BOOT_S) -> None:
        """Until the guest shell answers. The probe is retyped now and then: input typed before ssh has
        put the terminal in raw mode is buffered and runs later, which is harmless for an echo."""
        n = self._marker()
        deadline = time.monotonic() + timeout
        while True:
            # The terminal echoes the typed `$((n+0))`, never the number: only the shell's output matches.
            self.send(f'echo "ready-$(({n}+0))"\r')
            try:
                self.expect(rf"ready-{n}\n", timeout=min(15.0, max(1.0, deadline - time.monotonic())))
                return
            except AssertionError:
                if self.eof or time.monotonic() > deadline:
                    raise

    def run(self, command: str, timeout: float = STEP_S) -> str:
        """`command` in the guest shell; its output (the lines between two markers only the shell can print)."""
        n = self._marker()
        self.send(f'echo "<$(({n}+0))<"; {command}; echo ">$(({n}+0))>"\r')
        return self.expect(rf"<{n}<\n(.*?)>{n}>", timeout).group(1)

    def resize(self, rows: int, cols: int) -> None:
        # On the master: the kernel sends SIGWINCH to the terminal's foreground process group (banger and ssh).
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, _winsize(rows, cols))

    def wait_exit(self, timeout: float = STEP_S) -> int:
        """banger's exit status, draining the terminal meanwhile (a full pty would block its writes)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise self.fail(f"banger did not exit within {timeout:.0f}s")
            self._pump(0.2)
        for _ in range(20):  # what is left in the pty after the exit
            if self.eof:
                break
            self._pump(0.05)
        return self.proc.returncode

    def hangup(self) -> None:
        """Close the terminal, as closing its window does: the kernel sends SIGHUP to banger's session."""
        os.close(self.master)
        self.master = -1
        self.eof = True

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)
        if self.master >= 0:
            os.close(self.master)


@contextlib.contextmanager
def terminal(env: BangerNetns, *args: str, rows: int = 40, cols: int = 120) -> Iterator[Terminal]:
    term = Terminal(env, *args, rows=rows, cols=cols)
    try:
        yield term
    finally:
        term.close()


def _ssh_processes(env: BangerNetns) -> list[str]:
    """ssh clients and masters started for this banger (their control path is under its runtime dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if argv and os.path.basename(argv[0]) == b"ssh" and str(env.root).encode() in b" ".join(argv):
                    found.append(f"{proc.name}: {b' '.join(argv).decode(errors='replace')}")
    return found


def _reminder(name: str) -> str:
    return f"vm {name} is still running (stop with `banger vm stop {name}`, remove with `banger vm delete {name}`)"


def test_run_repo_interactive_rm(env: BangerNetns, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "proj")
    name = "tty-rm"
    started = time.monotonic()
    with terminal(env, "vm", "run", "--rm", "--name", name, str(repo), rows=40, cols=120) as term:
        term.wait_shell()
        print(f"vm run --rm ./repo, to a shell: {time.monotonic() - started:.1f}s")
        assert [(vm["name"], vm["state"]) for vm in env.vms()] == [(name, "running")]

        # In the workspace, with the tracked files as they are in the working tree.
        assert term.run("pwd") == "/root/repo\n", term.text()
        out = term.run("cat tracked.txt; ./bin/tool.sh; ls -A | grep -v '^.git$'")
        assert out == "tracked v2 (uncommitted)\ntool\n.gitignore\nbin\ntracked.txt\n", term.text()
        out = term.run("git status --short --untracked-files=no; git --no-pager log --format=%s")
        assert out == " M tracked.txt\nfirst\n", term.text()

        # The guest's terminal has the pty's size, and follows a resize.
        assert term.run("stty size") == "40 120\n", term.text()
        term.resize(50, 132)
        deadline = time.monotonic() + 30
        while (size := term.run("stty size")) != "50 132\n":
            if time.monotonic() > deadline:
                raise term.fail(f"the guest did not see the resize to 50x132 (last: {size!r})")
            time.sleep(0.5)

        # ^C goes to the guest's foreground command, not to banger: the sleep dies, the session stays.
        n = term._marker()
        term.send(f'echo "sleeping-$(({n}+0))"; sleep 600; echo "after-$(({n}+0))"\r')
        term.expect(rf"sleeping-{n}\n")
        time.sleep(1.0)
        interrupted_at = time.monotonic()
        term.send("\x03")
        term.send(f'echo "status-$(({n}+0))=$?"\r')  # $? first: run()'s marker would reset it
        status = term.expect(rf"status-{n}=(\d+)\n").group(1)
        assert status == "130", term.fail(f"after ^C the shell's $? is {status}, not 130 (SIGINT)")
        assert time.monotonic() - interrupted_at < 60
        assert f"after-{n}" not in term.text()
        assert term.proc.poll() is None, term.fail("banger exited on ^C")

        term.send("exit 3\r")
        rc = term.wait_exit()
        assert rc == 3, term.fail(f"banger exited {rc}, the shell exited 3")
        transcript = term.text()
    print(f"vm run --rm ./repo, whole session: {time.monotonic() - started:.1f}s")
    assert "still running" not in transcript, transcript  # --rm: deleted, so no reminder
    _no_vm_leftovers(env)
    assert _ssh_processes(env) == []


def test_run_without_rm_reminds_then_vm_ssh(env: BangerNetns) -> None:
    name = "tty-keep"
    try:
        with terminal(env, "vm", "run", "--name", name, rows=30, cols=100) as term:
            term.wait_shell()
            assert term.run("pwd; stty size") == "/root\n30 100\n", term.text()  # no workspace: home
            term.send("exit\r")
            rc = term.wait_exit()
            assert rc == 0, term.fail(f"banger exited {rc} after a plain `exit`")
            tail = term.text()[term.pos:]
        assert _reminder(name) in tail, tail
        assert [(vm["name"], vm["state"]) for vm in env.vms()] == [(name, "running")]

        # `vm ssh` into the same VM: its exit status, and the same reminder.
        with terminal(env, "vm", "ssh", name, rows=24, cols=80) as term:
            term.wait_shell(timeout=STEP_S)
            assert term.run("hostname; stty size") == f"{name}\n24 80\n", term.text()
            term.send("exit 7\r")
            rc = term.wait_exit()
            assert rc == 7, term.fail(f"banger vm ssh exited {rc}, the shell exited 7")
            assert _reminder(name) in term.text()[term.pos:], term.text()
    finally:
        env.banger("vm", "delete", name, timeout=120)
    _no_vm_leftovers(env)
    assert _ssh_processes(env) == []


def test_interrupted_rm_runs_leave_nothing(env: BangerNetns) -> None:
    """--rm holds however the run ends: ^C while the VM is being created, or the terminal closed in the
    session. Both VMs boot at the same time, so this costs about one boot."""
    started = time.monotonic()
    with terminal(env, "vm", "run", "--rm", "--name", "tty-intr") as early, \
            terminal(env, "vm", "run", "--rm", "--name", "tty-hup") as late:
        early.expect(r"vm create: ", BOOT_S)  # the live progress line: the create operation has begun
        early.send("\x03")
        early.expect(r"banger: interrupted; deleting the VM as soon as it is created \(Ctrl-C again to leave it\)")

        late.wait_shell()
        assert late.run("hostname") == "tty-hup\n", late.text()
        late.hangup()
        rc = late.wait_exit()
        assert rc == 128 + signal.SIGHUP, late.fail(f"after a hangup banger exited {rc}")

        rc = early.wait_exit(BOOT_S)
        assert rc == 130, early.fail(f"after ^C banger exited {rc}")
    print(f"two interrupted --rm runs: {time.monotonic() - started:.1f}s")
    _no_vm_leftovers(env)
    assert _ssh_processes(env) == []
