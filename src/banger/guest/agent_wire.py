"""The wire side of the host's guest-agent client: what `agent_client.py` sends and receives, without
the sockets (wire format: agent_protocol.md; the guest's half is banger/guest/agent.py).

Here: the protocol constants, the frame codec (`encode_frame`, `pop_frame`), the reply to a hybrid
vsock `CONNECT`, the errors a client raises, the mapping of the agent's error frames onto them, and the
result types the requests return. `agent_client.py` holds the stream itself: `AgentClient`, its
channels, `ExecHandle` and `wait_ready`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from banger.errors import (
    ALREADY_EXISTS,
    BAD_REQUEST,
    BAD_VERSION,
    NOT_FOUND,
    UNKNOWN_METHOD,
    AlreadyExists,
    BadRequest,
    BangerError,
    NotFound,
)

PROTOCOL_VERSION: Final = 1
DEFAULT_VSOCK_PORT: Final = 1024
MAX_FRAME: Final = 4 * 1024 * 1024
CHUNK: Final = 128 * 1024

Header = dict[str, Any]


class AgentUnavailable(BangerError):
    """The agent could not be reached, or the stream to it broke (`wait_ready` retries these)."""


class AgentVersionMismatch(BangerError):
    code = BAD_VERSION


class AgentProtocolError(AgentUnavailable):
    """The agent sent bytes that are not frames; the connection is unusable."""


# --- frames (the same codec as agent.py; tests/unit/test_agent_protocol.py keeps them in step) --------


def encode_frame(header: Mapping[str, Any], payload: bytes = b"") -> bytes:
    import json

    head = json.dumps(header, separators=(",", ":")).encode("ascii")
    size = len(head) + 1 + len(payload)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes is over the {MAX_FRAME}-byte limit")
    return struct.pack(">I", size) + head + b"\n" + payload


def pop_frame(buf: bytearray) -> tuple[Header, bytes] | None:
    """Take one complete frame off the front of `buf`, or None if it holds no complete frame yet."""
    import json

    if len(buf) < 4:
        return None
    (size,) = struct.unpack_from(">I", buf)
    if not 2 <= size <= MAX_FRAME:
        raise AgentProtocolError(f"guest agent sent a frame length of {size} (allowed: 2..{MAX_FRAME})")
    if len(buf) < 4 + size:
        return None
    body = bytes(buf[4 : 4 + size])
    del buf[: 4 + size]
    end = body.find(b"\n")
    try:
        header = json.loads(body[:end]) if end >= 0 else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or not isinstance(header.get("t"), str) or type(header.get("ch")) is not int:
        raise AgentProtocolError(f"guest agent sent a malformed frame header: {body[:80]!r}")
    return header, body[end + 1 :]


def parse_connect_reply(line: bytes, port: int) -> None:
    """Accept `OK <anything>` (Firecracker puts the host-side port there, vhost-device-vsock the guest's)."""
    parts = line.decode("ascii", "replace").split()
    if not parts or parts[0].upper() != "OK":
        raise AgentUnavailable(f"unexpected reply {line!r} to CONNECT {port}",
                               hint="is this a Firecracker-style hybrid vsock socket?")


# --- results ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentInfo:
    protocol: int
    agent_version: str
    features: tuple[str, ...]


@dataclass(frozen=True)
class Health:
    ok: bool
    uptime: float
    hostname: str
    boot_id: str
    agent_version: str


@dataclass(frozen=True)
class ListeningSocket:
    proto: str  # "tcp" or "udp"
    family: int  # 4 or 6
    address: str
    port: int
    pids: tuple[int, ...]
    processes: tuple[str, ...]


@dataclass(frozen=True)
class ExitStatus:
    code: int | None
    signal: int | None = None
    timed_out: bool = False

    @property
    def returncode(self) -> int:
        """A shell's view: the exit code, or 128 + the signal number."""
        if self.code is not None:
            return self.code
        return 128 + (self.signal or 0)


@dataclass(frozen=True)
class ExecResult:
    status: ExitStatus
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True)
class FileMeta:
    mode: int
    uid: int
    gid: int
    size: int
    mtime: float


@dataclass(frozen=True)
class DirEntry:
    name: str
    type: str  # file, dir, symlink, fifo, socket, char, block, other
    mode: int
    size: int
    uid: int
    gid: int
    mtime: float
    target: str | None = None  # for symlinks


def _agent_error(header: Header, op: str) -> BangerError:
    message = f"guest agent: {header.get('message') or f'{op} failed'}"
    code = header.get("code")
    if code == NOT_FOUND:
        return NotFound(message)
    if code == ALREADY_EXISTS:
        return AlreadyExists(message)
    if code in (BAD_REQUEST, UNKNOWN_METHOD):
        return BadRequest(message)
    if code == BAD_VERSION:
        return AgentVersionMismatch(message)
    return BangerError(message)
