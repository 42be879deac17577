"""`vm run -- cmd` without a terminal: the command straight through the VM's guest agent.

A first SSH connection costs the guest over a second of CPU under emulation (sshd forks and re-execs
a child, then the key exchange), more than the rest of `vm run` after boot; the agent answers in about
a tenth of that. Over vsock the agent takes any number of connections, so the CLI opens its own (the
socket is the owner's, like the daemon's) and streams stdin, stdout and stderr itself, the way ssh
would: stdin is forwarded as it arrives and the command's end ends the run, whether or not stdin ever
closes. Without a vsock channel (virtio-serial has room for one client, the daemon's), or when the agent
does not answer, the caller falls back to ssh.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from banger.guest.agent_client import ExecHandle

log = logging.getLogger("banger.cli.agentrun")

CONNECT_TIMEOUT = 5.0


def run_via_agent(vm: dict[str, Any], argv: list[str], cwd: str) -> int | None:
    """Run `argv` in the guest with this process's stdio; its exit status, or None to fall back to ssh."""
    from banger.errors import BangerError
    from banger.guest.agent_client import AgentClient

    runtime = vm.get("runtime") or {}
    if runtime.get("agent_transport") != "vsock" or not runtime.get("agent_path"):
        return None
    try:
        client = AgentClient.connect_vsock_uds(Path(runtime["agent_path"]), timeout=CONNECT_TIMEOUT)
    except BangerError as exc:
        log.debug("agent not reachable, using ssh: %s", exc.message)
        return None
    with client:
        try:
            handle = client.start_exec(argv, cwd=cwd, stdin=True, on_stdout=_writer(sys.stdout.buffer),
                                       on_stderr=_writer(sys.stderr.buffer))
        except BangerError as exc:
            if exc.code == "not_found":
                print(f"banger: {exc.message}", file=sys.stderr)
                return 127
            log.debug("agent exec failed, using ssh: %s", exc.message)
            return None
        feeder = threading.Thread(target=_feed_stdin, args=(handle,), daemon=True, name="stdin")
        feeder.start()
        status = handle.wait()  # KeyboardInterrupt/SystemExit cancel it: the agent kills the command
    if status.code is not None:
        return int(status.code)
    return 128 + int(status.signal or 0)


def _writer(stream: Any) -> Any:
    def write(data: bytes) -> None:
        with contextlib.suppress(BrokenPipeError, ValueError):
            stream.write(data)
            stream.flush()

    return write


def _feed_stdin(handle: ExecHandle) -> None:
    """Forward stdin as it arrives (unbuffered: one read, whatever is there) until EOF, then close the
    command's stdin; or until the command has ended. No stdin at all is an empty one."""
    source: Any
    try:
        source = os.fdopen(sys.stdin.fileno(), "rb", buffering=0, closefd=False)
    except (AttributeError, OSError, ValueError):
        source = b""
    handle.feed(source)
