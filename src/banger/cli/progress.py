"""Following a long daemon operation (`*.begin` + `daemon.operations.status`) with live stages."""

from __future__ import annotations

import sys
import time
from typing import Any

from banger.cli.lifecycle import call
from banger.rpc.protocol import RpcError


def follow(op_id: str, label: str, *, quiet: bool = False) -> Any:
    """Print each stage as it starts (live detail on a TTY); return the result or raise its error."""
    tty = sys.stderr.isatty() and not quiet
    started = time.monotonic()
    last_stage = ""
    last_line = ""
    while True:
        op = call("daemon.operations.status", {"id": op_id, "wait": 10}, timeout=30, autostart=False)
        stage, detail = op.get("stage", ""), op.get("detail", "")
        if not quiet and stage != last_stage and not op["done"]:
            if tty and last_line:
                sys.stderr.write("\r\033[K")
            elif last_line:
                sys.stderr.write("\n")
            last_stage = stage
            last_line = f"{label}: {stage}"
            sys.stderr.write(last_line)
            sys.stderr.flush()
        if tty and detail and not op["done"]:
            sys.stderr.write(f"\r\033[K{label}: {stage} {detail}")
            sys.stderr.flush()
        if op["done"]:
            if last_line:
                sys.stderr.write("\r\033[K" if tty else "\n")
                sys.stderr.flush()
            if op.get("error"):
                err = op["error"]
                raise RpcError(err.get("code", "operation_failed"), err.get("message", "failed"),
                               hint=err.get("hint"), op_id=op_id)
            if not quiet:
                sys.stderr.write(f"{label}: done in {time.monotonic() - started:.1f}s\n")
            return op.get("result")
