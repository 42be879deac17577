"""Logging: JSON lines for the services, the op_id of the current call on every record.

The op_id lives in a ContextVar, so concurrent requests handled by one asyncio loop (or by threads
started with `contextvars.copy_context`) never see each other's id.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

current_op_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("banger_op_id", default=None)

_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}


def new_op_id() -> str:
    return "op-" + secrets.token_hex(3)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        op_id = getattr(record, "op_id", None) or current_op_id.get()
        if op_id:
            entry["op_id"] = op_id
        for key, value in vars(record).items():
            if key not in _RESERVED and key != "op_id" and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def level_from(name: str | None) -> int:
    value = (os.environ.get("BANGER_LOG_LEVEL") or name or "info").upper()
    return {"DEBUG": 10, "INFO": 20, "WARN": 30, "WARNING": 30, "ERROR": 40}.get(value, logging.INFO)


def setup_service_logging(level: str | None, log_file: Path | None) -> None:
    """JSON lines to `log_file` (embedded mode) or stderr (under systemd, where journald collects)."""
    handler: logging.Handler
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_from(level))
