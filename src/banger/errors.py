"""Typed errors that library code raises on purpose.

Each error carries an RPC error code so the daemon can serialise it and the CLI can render it as one
line. Only `cli` prints them and only `rpc.server` serialises them.
"""

from __future__ import annotations

from typing import Final

BAD_REQUEST: Final = "bad_request"
NOT_FOUND: Final = "not_found"
ALREADY_EXISTS: Final = "already_exists"
BAD_VERSION: Final = "bad_version"
UNKNOWN_METHOD: Final = "unknown_method"
UNAUTHORIZED: Final = "unauthorized"
OPERATION_FAILED: Final = "operation_failed"

ERROR_CODES: Final = frozenset(
    {BAD_REQUEST, NOT_FOUND, ALREADY_EXISTS, BAD_VERSION, UNKNOWN_METHOD, UNAUTHORIZED, OPERATION_FAILED}
)


class BangerError(Exception):
    """An error meant for a person: `message` says what is wrong, `hint` what to do about it."""

    code: str = OPERATION_FAILED

    def __init__(self, message: str, *, hint: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class BadRequest(BangerError):
    code = BAD_REQUEST


class NotFound(BangerError):
    code = NOT_FOUND


class AlreadyExists(BangerError):
    code = ALREADY_EXISTS


class Unauthorized(BangerError):
    code = UNAUTHORIZED


class ConfigError(BangerError):
    """A bad config.toml value; the message names the key and what is allowed."""

    code = BAD_REQUEST


class CommandFailed(BangerError):
    """A subprocess exited non-zero (raised by `banger.system.run`)."""

    def __init__(self, argv: list[str], returncode: int, stderr_tail: str) -> None:
        import shlex

        cmd = shlex.join(argv)
        detail = f": {stderr_tail}" if stderr_tail else ""
        super().__init__(f"`{cmd}` failed with exit status {returncode}{detail}")
        self.argv = argv
        self.returncode = returncode
        self.stderr_tail = stderr_tail
