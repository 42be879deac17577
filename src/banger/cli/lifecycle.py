"""Finding (and in embedded mode, starting) the owner daemon.

System install present → talk to the system daemon as its owner. No system install → the embedded
default: as root, start `bangerd-root` and `bangerd` in the background on first use; as anyone else,
say exactly what to run instead.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from banger import paths
from banger.errors import BangerError
from banger.rpc import client

START_TIMEOUT = 15.0


@dataclass(frozen=True)
class Target:
    layout: paths.Layout
    system: bool

    @property
    def socket(self) -> Path:
        return self.layout.daemon_socket


def target() -> Target:
    from banger.system import installmeta

    meta = installmeta.read() if paths.system_install_meta().exists() else None
    if meta is not None:
        if os.getuid() not in (meta.owner_uid, 0):
            raise BangerError(
                f"this banger install belongs to {meta.owner_user!r} (uid {meta.owner_uid}); "
                f"you are uid {os.getuid()}",
                hint=f"run banger as {meta.owner_user}, or reinstall with `sudo banger system install --owner $USER`",
            )
        return Target(paths.resolve_system(meta.owner_home), system=True)
    return Target(paths.resolve_user(), system=False)


def call(method: str, params: dict[str, Any] | None = None, *, autostart: bool = True,
         timeout: float | None = None, on_event: client.EventHandler | None = None) -> Any:
    t = target()
    try:
        return client.call(t.socket, method, params, timeout=timeout, on_event=on_event)
    except client.Unreachable:
        if not autostart:
            raise
    ensure_daemon(t)
    return client.call(t.socket, method, params, timeout=timeout, on_event=on_event)


def ensure_daemon(t: Target) -> None:
    if t.system:
        raise BangerError("the banger service is not reachable",
                          hint="run `sudo banger system restart` (or `banger system status` to see why)")
    if os.getuid() != 0:
        raise BangerError(
            "banger has no system install and the embedded daemon needs root",
            hint="run `sudo banger system install --owner $USER` once (then banger works as you), "
                 "or run banger as root",
        )
    import fcntl

    paths.ensure_private_dir(t.layout.runtime_dir)
    lock_path = t.layout.runtime_dir / "autostart.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _answers(t.socket, "daemon.ping"):
            return
        if not _answers(t.layout.helper_socket, "priv.ping"):
            _start("banger.roothelper.main", "bangerd-root", t.layout.helper_socket, "priv.ping", t.layout)
        _start("banger.daemon.main", "bangerd", t.socket, "daemon.ping", t.layout)


def _answers(sock: Path, method: str) -> bool:
    try:
        client.call(sock, method, {}, timeout=5, connect_timeout=1)
        return True
    except (client.Unreachable, BangerError):
        return False


def _start(module: str, name: str, sock: Path, method: str, layout: paths.Layout) -> None:
    """Start a service in its own session (it must outlive this CLI) and wait until it answers.

    A service that exits during start-up (a bad config.toml, say) is reported with its own last line
    instead of waiting out the timeout.
    """
    import subprocess

    from banger.system import run

    err_path = layout.runtime_dir / f"{name}.start.log"
    with open(err_path, "wb") as err:
        proc = run.spawn([sys.executable, "-m", module], new_session=True, inherit_env=True,
                         stderr=err.fileno(), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if _answers(sock, method):
            return
        if proc.poll() is not None:
            lines = err_path.read_text(errors="replace").strip().splitlines()
            reason = lines[-1] if lines else f"exit status {proc.returncode}"
            raise BangerError(f"{name} failed to start: {reason.removeprefix(name + ': ')}")
        time.sleep(0.05)
    raise BangerError(f"{name} did not start within {START_TIMEOUT:g}s", hint=f"see {err_path}")
