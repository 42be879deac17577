"""Following a long daemon operation (`*.begin` + `daemon.operations.status`) with live stages."""

from __future__ import annotations

import sys
import time
from typing import Any

from banger.cli.lifecycle import call
from banger.rpc.protocol import RpcError


def follow(op_id: str, label: str, *, quiet: bool = False) -> Any:
    """Print each stage as it starts (one line each; on a TTY, one live line with the detail);
    return the operation's result or raise its error."""
    tty = sys.stderr.isatty() and not quiet
    started = time.monotonic()
    last_stage = ""
    while True:
        op = call("daemon.operations.status", {"id": op_id, "wait": 10}, timeout=30, autostart=False)
        stage, detail = op.get("stage", ""), op.get("detail", "")
        if not op["done"] and not quiet:
            if tty:
                sys.stderr.write(f"\r\033[K{label}: {stage}" + (f" {detail}" if detail else ""))
            elif stage != last_stage:
                # Whole lines right away: a script reading our stderr sees each stage as it starts.
                sys.stderr.write(f"{label}: {stage}\n")
            sys.stderr.flush()
            last_stage = stage
        if op["done"]:
            if tty:
                sys.stderr.write("\r\033[K")
            if op.get("error"):
                err = op["error"]
                raise RpcError(err.get("code", "operation_failed"), err.get("message", "failed"),
                               hint=err.get("hint"), op_id=op_id)
            if not quiet:
                sys.stderr.write(f"{label}: done in {time.monotonic() - started:.1f}s\n")
            return op.get("result")
