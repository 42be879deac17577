"""`banger system ...` and `banger version`"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

from banger import buildinfo
from banger.cli import output
from banger.cli.lifecycle import call, target
from banger.errors import BangerError
from banger.rpc import client


def cmd_status(args: argparse.Namespace) -> int:
    status = call("system.status", autostart=False)
    if args.json:
        output.print_json(status)
        return 0
    d, h = status["daemon"], status["helper"]
    print(output.kv_block([
        ("mode", d["mode"]),
        ("daemon", f"running, pid {d['pid']}, uid {d['uid']}, v{d['version']}"),
        ("daemon socket", d["socket"]),
        ("root helper", f"running, pid {h['pid']}, owner uid {h['owner_uid']}, v{h['version']}"),
        ("helper socket", h["socket"]),
        ("operations in flight", status["operations_in_flight"]),
    ]))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    t = target()
    if t.system:
        raise BangerError("this is a system install; the services are managed by systemd",
                          hint="run `sudo banger system restart` or `systemctl stop bangerd`")
    stopped = []
    try:
        client.call(t.socket, "daemon.shutdown", {}, timeout=10)
        stopped.append("bangerd")
    except client.Unreachable:
        pass
    if _terminate(t.layout.helper_pidfile, "banger.roothelper"):
        stopped.append("bangerd-root")
    print("stopped " + (", ".join(stopped) if stopped else "nothing (not running)"))
    return 0


def _terminate(pidfile: Path, marker: str) -> bool:
    """SIGTERM the process in `pidfile` if it really is ours (pids get reused), and wait for it."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False
    if marker.encode() not in cmdline:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    return True


def cmd_version(args: argparse.Namespace) -> int:
    info = buildinfo.current()
    if args.json:
        output.print_json({"version": info.version, "commit": info.commit, "built_at": info.built_at})
    else:
        print(output.kv_block([("version", info.version), ("commit", info.commit), ("built at", info.built_at)]))
    return 0
