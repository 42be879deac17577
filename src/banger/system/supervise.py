"""Starting, stopping and checking the two services of a system install.

With systemd as PID 1 this is `systemctl` on the installed units. Without it (containers, this kind of
CI machine, and every install relocated with BANGER_SYSTEM_PREFIX) banger supervises them itself, the
way the units would: `bangerd-root --system` as root and `bangerd --system` as the owner (through
`setpriv`, with the owner's groups), each in its own session so it outlives the command that started
it, output appended to `/var/log/banger/<name>.log`, the runtime directories created with the modes
systemd would give them. Each service writes its own pidfile under /run/banger*; stopping checks that
the pid still runs that service (pids get reused) before signalling it, and signals only that process,
never its group: VMs launched by the helper keep running, as with `KillMode=process`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, Protocol

from banger import paths
from banger.errors import BangerError
from banger.system import units
from banger.system.installmeta import InstallMeta

START_ORDER: Final = ("bangerd-root", "bangerd")
READY_TIMEOUT: Final = 15.0
STOP_TIMEOUT: Final = 10.0

Manager = Literal["systemd", "banger"]


@dataclass(frozen=True)
class Services:
    """What supervising a system install needs to know."""

    meta: InstallMeta
    layout: paths.Layout
    install: paths.InstallPaths
    manager: Manager

    def pidfile(self, name: str) -> Path:
        return self.layout.helper_pidfile if name == "bangerd-root" else self.layout.daemon_pidfile

    def socket(self, name: str) -> Path:
        return self.layout.helper_socket if name == "bangerd-root" else self.layout.daemon_socket


class _Child(Protocol):
    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...


@dataclass(frozen=True)
class ServiceState:
    name: str
    running: bool
    pid: int | None
    detail: str


def services(meta: InstallMeta) -> Services:
    return Services(meta, paths.resolve_system(meta.owner_home), paths.system_install_paths(),
                    "systemd" if units.systemd_running() else "banger")


def _check_name(name: str) -> None:
    if name not in START_ORDER:
        raise BangerError(f"unknown service {name!r} (allowed: {', '.join(START_ORDER)})")


def _proc_args(pid: int) -> list[str] | None:
    """The argv of a live (non-zombie) process, or None."""
    try:
        stat_text = Path(f"/proc/{pid}/stat").read_text()
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    if stat_text.rpartition(")")[2].split()[:1] == ["Z"]:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_service_process(pid: int, name: str) -> bool:
    """Whether `pid` runs `<name> --system` (the launcher shows up as an argument of python)."""
    args = _proc_args(pid)
    return args is not None and "--system" in args and any(os.path.basename(a) == name for a in args[:3])


def _read_pid(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid > 0 else None


def state(svc: Services, name: str) -> ServiceState:
    _check_name(name)
    if svc.manager == "systemd":
        unit = units.UNITS[name]
        active, text = units.is_active(unit)
        return ServiceState(name, active, units.main_pid(unit) if active else None, f"{unit} {text}")
    pid = _read_pid(svc.pidfile(name))
    if pid is None:
        return ServiceState(name, False, None, "not running")
    if not is_service_process(pid, name):
        return ServiceState(name, False, None, f"not running (stale pidfile names pid {pid})")
    return ServiceState(name, True, pid, f"running, pid {pid}")


def _answers(sock: Path, method: str) -> bool:
    from banger.rpc import client

    try:
        client.call(sock, method, {}, timeout=5, connect_timeout=1)
        return True
    except BangerError:
        return False


def _log_tail(path: Path, prefix: str) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].removeprefix(prefix + ": ") if lines else ""


def _prepare_runtime(svc: Services, name: str) -> None:
    """What systemd's RuntimeDirectory= would do: /run/banger-root root 0711, /run/banger owner 0700."""
    if name == "bangerd-root":
        d = svc.layout.helper_runtime_dir
        d.mkdir(parents=True, exist_ok=True, mode=0o711)
        os.chown(d, 0, 0, follow_symlinks=False)
        os.chmod(d, 0o711)
        return
    d = svc.layout.runtime_dir
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    if d.is_symlink():
        raise BangerError(f"{d} is a symlink; refusing to use it", hint="remove it and retry")
    os.chown(d, svc.meta.owner_uid, svc.meta.owner_gid)
    os.chmod(d, 0o700)


def _spawn(svc: Services, name: str) -> tuple[Path, _Child]:
    from banger.system import run

    _prepare_runtime(svc, name)
    svc.install.log_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    log_path = svc.install.service_log(name)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        prefix = paths.system_prefix()
        if prefix != Path("/"):
            env["BANGER_SYSTEM_PREFIX"] = str(prefix)
        program = str(svc.install.entry_point(name))
        if name == "bangerd-root":
            argv = [program, "--system"]
            env.update(HOME="/root", USER="root", LOGNAME="root")
        else:
            os.fchown(fd, svc.meta.owner_uid, svc.meta.owner_gid)  # the owner may read its daemon's log
            argv = ["setpriv", f"--reuid={svc.meta.owner_uid}", f"--regid={svc.meta.owner_gid}",
                    "--init-groups", program, "--system"]
            env.update(HOME=str(svc.meta.owner_home), USER=svc.meta.owner_user, LOGNAME=svc.meta.owner_user)
        with open(log_path, "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')} banger system: starting {name}\n".encode())
        proc = run.spawn(argv, env=env, stdout=fd, stderr=fd, new_session=True, cwd="/")
    finally:
        os.close(fd)
    return log_path, proc


def _wait_started(svc: Services, name: str, proc: _Child, log_path: Path, timeout: float) -> None:
    method = "priv.ping" if name == "bangerd-root" else "daemon.ping"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _answers(svc.socket(name), method):
            return
        if proc.poll() is not None:
            reason = _log_tail(log_path, name) or f"exit status {proc.returncode}"
            raise BangerError(f"{name} failed to start: {reason}", hint=f"see {log_path}")
        time.sleep(0.05)
    raise BangerError(f"{name} did not answer within {timeout:g}s", hint=f"see {log_path}")


def start(svc: Services, name: str, timeout: float = READY_TIMEOUT) -> ServiceState:
    _check_name(name)
    if svc.manager == "systemd":
        units.systemctl("start", units.UNITS[name])
    else:
        current = state(svc, name)
        if current.running:
            return current
        log_path, proc = _spawn(svc, name)
        _wait_started(svc, name, proc, log_path, timeout)
    wait_ready(svc, name, timeout)
    return state(svc, name)


def _gone(pid: int, name: str) -> bool:
    return not is_service_process(pid, name)


def stop(svc: Services, name: str, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop one service; True if it was running."""
    _check_name(name)
    if svc.manager == "systemd":
        was = units.is_active(units.UNITS[name])[0]
        units.systemctl("stop", units.UNITS[name])
        return was
    current = state(svc, name)
    pidfile = svc.pidfile(name)
    if not current.running or current.pid is None:
        with contextlib.suppress(FileNotFoundError):
            if _read_pid(pidfile) is not None:
                pidfile.unlink()  # stale: names a pid that is not this service
        return False
    pid = current.pid
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not _gone(pid, name):
        time.sleep(0.05)
    if not _gone(pid, name):
        if name == "bangerd-root":
            # Like SendSIGKILL=no: a helper that does not stop is reported, not killed mid-operation.
            raise BangerError(f"bangerd-root (pid {pid}) did not stop within {timeout:g}s",
                              hint=f"see {svc.install.service_log(name)}; `kill {pid}` once it is idle")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        end = time.monotonic() + 5
        while time.monotonic() < end and not _gone(pid, name):
            time.sleep(0.05)
    with contextlib.suppress(FileNotFoundError):
        if _read_pid(pidfile) == pid:
            pidfile.unlink()
    return True


def restart(svc: Services, name: str, timeout: float = READY_TIMEOUT) -> ServiceState:
    _check_name(name)
    if svc.manager == "systemd":
        units.systemctl("restart", units.UNITS[name])
        wait_ready(svc, name, timeout)
        return state(svc, name)
    stop(svc, name)
    return start(svc, name, timeout)


def start_all(svc: Services) -> list[ServiceState]:
    return [start(svc, name) for name in START_ORDER]


def stop_all(svc: Services) -> list[str]:
    return [name for name in reversed(START_ORDER) if stop(svc, name)]


def restart_all(svc: Services) -> list[ServiceState]:
    """The helper first, then the daemon (the daemon's first calls go to the helper)."""
    return [restart(svc, name) for name in START_ORDER]


def wait_ready(svc: Services, name: str = "bangerd", timeout: float = READY_TIMEOUT) -> None:
    method = "priv.ping" if name == "bangerd-root" else "daemon.ping"
    deadline = time.monotonic() + timeout
    while True:
        if _answers(svc.socket(name), method):
            return
        if time.monotonic() >= deadline:
            where = (f"journalctl -u {units.UNITS[name]}" if svc.manager == "systemd"
                     else str(svc.install.service_log(name)))
            raise BangerError(f"{name} did not answer on {svc.socket(name)} within {timeout:g}s",
                              hint=f"see {where}")
        time.sleep(0.1)


def daemon_ping(svc: Services) -> dict[str, object] | None:
    from banger.rpc import client

    try:
        result = client.call(svc.layout.daemon_socket, "daemon.ping", {}, timeout=5, connect_timeout=1)
    except BangerError:
        return None
    return result if isinstance(result, dict) else None
