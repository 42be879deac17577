"""The wire format shared by the CLI, the owner daemon and the root helper.

One JSON object per line over a Unix stream socket. The client writes one request line:

    {"v": 1, "method": "vm.list", "params": {...}, "op_id": "op-1a2b3c"}   (op_id optional)

and reads zero or more event lines `{"event": {...}}` (progress of long calls) followed by one final
line, either `{"v": 1, "result": ..., "op_id": ...}` or
`{"v": 1, "error": {"code": ..., "message": ..., "hint": ..., "op_id": ...}}`.
Closing the connection before the final line cancels the request.
"""

from __future__ import annotations

import json
import re
from typing import Any

from banger.errors import (
    BAD_REQUEST,
    BAD_VERSION,
    ERROR_CODES,
    OPERATION_FAILED,
    BadRequest,
    BangerError,
)

PROTOCOL_VERSION = 1
MAX_LINE = 4 * 1024 * 1024
OP_ID_RE = re.compile(r"^op-[0-9a-f]{6}$")
METHOD_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")


class RpcError(BangerError):
    """An error response as the client sees it."""

    def __init__(self, code: str, message: str, *, hint: str | None = None, op_id: str | None = None) -> None:
        super().__init__(message, hint=hint, code=code)
        self.op_id = op_id

    def render(self) -> str:
        """One line for a person: the message, the hint, and the op_id to grep the logs for."""
        text = self.message
        label = self.code.replace("_", " ")
        if self.code not in (OPERATION_FAILED, BAD_REQUEST) and not text.startswith(label):
            text = f"{label}: {text}"
        if self.hint:
            text = f"{text}; {self.hint}"
        if self.op_id:
            text = f"{text} ({self.op_id})"
        return text


class Request:
    __slots__ = ("method", "op_id", "params")

    def __init__(self, method: str, params: dict[str, Any], op_id: str | None) -> None:
        self.method = method
        self.params = params
        self.op_id = op_id


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"


def encode_request(method: str, params: dict[str, Any] | None = None, op_id: str | None = None) -> bytes:
    msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "method": method, "params": params or {}}
    if op_id:
        msg["op_id"] = op_id
    return encode(msg)


def decode_request(line: bytes) -> Request:
    """Parse a request line; every malformed shape is a BadRequest (or bad_version) naming the field."""
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request is not valid JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise BadRequest("request must be a JSON object")
    version = msg.get("v")
    if version != PROTOCOL_VERSION:
        raise BangerError(
            f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION})",
            hint="the CLI and the daemon come from different banger versions; restart the daemon",
            code=BAD_VERSION,
        )
    method = msg.get("method")
    if not isinstance(method, str) or not METHOD_RE.fullmatch(method):
        raise BadRequest(f"request field 'method' must be a dotted lowercase name, got {method!r}")
    params = msg.get("params", {})
    if not isinstance(params, dict):
        raise BadRequest("request field 'params' must be a JSON object")
    op_id = msg.get("op_id")
    if op_id is not None and (not isinstance(op_id, str) or not OP_ID_RE.fullmatch(op_id)):
        raise BadRequest(f"request field 'op_id' must look like op-1a2b3c, got {op_id!r}")
    unknown = set(msg) - {"v", "method", "params", "op_id"}
    if unknown:
        raise BadRequest(f"request has unknown field(s): {', '.join(sorted(unknown))}")
    return Request(method, params, op_id)


def encode_result(result: Any, op_id: str | None) -> bytes:
    return encode({"v": PROTOCOL_VERSION, "result": result, "op_id": op_id})


def encode_error(code: str, message: str, hint: str | None, op_id: str | None) -> bytes:
    if code not in ERROR_CODES:
        code = OPERATION_FAILED
    err: dict[str, Any] = {"code": code, "message": message, "op_id": op_id}
    if hint:
        err["hint"] = hint
    return encode({"v": PROTOCOL_VERSION, "error": err})


def encode_event(event: dict[str, Any]) -> bytes:
    return encode({"event": event})


def error_from_response(err: Any) -> RpcError:
    if not isinstance(err, dict):
        return RpcError(OPERATION_FAILED, f"malformed error response: {err!r}")
    return RpcError(
        str(err.get("code", OPERATION_FAILED)),
        str(err.get("message", "unknown error")),
        hint=err.get("hint") or None,
        op_id=err.get("op_id") or None,
    )


class Params:
    """Typed access to request params; every bad value is a BadRequest naming the param."""

    def __init__(self, params: dict[str, Any], allowed: set[str] | frozenset[str] | None = None) -> None:
        self._p = params
        if allowed is not None:
            unknown = set(params) - set(allowed)
            if unknown:
                raise BadRequest(f"unknown param(s): {', '.join(sorted(unknown))}")

    def raw(self) -> dict[str, Any]:
        return dict(self._p)

    def get_str(self, key: str, *, required: bool = False, default: str = "") -> str:
        value = self._p.get(key)
        if value is None:
            if required:
                raise BadRequest(f"param {key!r} is required")
            return default
        if not isinstance(value, str):
            raise BadRequest(f"param {key!r} must be a string, got {type(value).__name__}")
        if required and not value:
            raise BadRequest(f"param {key!r} must not be empty")
        return value

    def get_int(self, key: str, *, required: bool = False, default: int | None = None,
            minimum: int | None = None, maximum: int | None = None) -> int | None:
        value = self._p.get(key)
        if value is None:
            if required:
                raise BadRequest(f"param {key!r} is required")
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f"param {key!r} must be an integer, got {type(value).__name__}")
        if minimum is not None and value < minimum:
            raise BadRequest(f"param {key!r} must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise BadRequest(f"param {key!r} must be <= {maximum}, got {value}")
        return value

    def get_bool(self, key: str, *, default: bool = False) -> bool:
        value = self._p.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise BadRequest(f"param {key!r} must be true or false, got {value!r}")
        return value

    def get_str_list(self, key: str, *, required: bool = False) -> list[str]:
        value = self._p.get(key)
        if value is None:
            if required:
                raise BadRequest(f"param {key!r} is required")
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BadRequest(f"param {key!r} must be a list of strings")
        if required and not value:
            raise BadRequest(f"param {key!r} must not be empty")
        return list(value)
