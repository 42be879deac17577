"""`banger system install`, `uninstall` and the facts `system status` shows.

A system install puts each version of banger in its own directory, `/opt/banger/versions/<v>-<sha12>/`
(a virtual environment made from a release archive, see banger.update.stage), points the symlink
`/opt/banger/current` at one of them, and links `/usr/local/bin/{banger,bangerd,bangerd-root}` to
`/opt/banger/current/bin/...`. Changing version is one rename of `current` (banger.system.atomic);
processes already running keep the files of their own version. Every path honours BANGER_SYSTEM_PREFIX.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from banger import paths
from banger.errors import BadRequest, BangerError, NotFound
from banger.system import installmeta, supervise, units
from banger.system.atomic import atomic_replace, remove_backup
from banger.system.download import sha256_file
from banger.system.installmeta import InstallMeta

PROGRAMS: Final = ("banger", "bangerd", "bangerd-root")
SUFFIX: Final = ".previous"

Say = Callable[[str], None]


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise BangerError(f"{what} needs root", hint=f"run `sudo banger {what.removeprefix('banger ')}`")


def write_file_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _dir(path: Path, mode: int, uid: int = 0, gid: int = 0) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise BangerError(f"{path} is not a real directory; refusing to use it", hint="move it away and retry")
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def _owner_dirs(meta: InstallMeta) -> None:
    """The owner's banger directories in their home, which the daemon's unit makes writable."""
    home = meta.owner_home
    if not home.is_dir():
        return
    for rel in (".config/banger", ".local/state/banger"):
        current = home
        for part in rel.split("/"):
            current = current / part
            if not current.exists():
                current.mkdir(mode=0o700)
                os.chown(current, meta.owner_uid, meta.owner_gid)


@contextlib.contextmanager
def exclusive(ip: paths.InstallPaths, what: str) -> Iterator[None]:
    """One install, uninstall or update at a time (a lock file in /opt/banger, root's alone)."""
    import fcntl

    _dir(ip.opt_dir, 0o755)
    fd = os.open(ip.opt_dir / ".lock", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BangerError(f"another banger install, uninstall or update is running; {what} refused",
                              hint="wait for it to finish") from None
        yield
    finally:
        os.close(fd)


# --- versions -------------------------------------------------------------------------------------------


def current_version_dir(ip: paths.InstallPaths) -> Path | None:
    try:
        target = os.readlink(ip.current)
    except (FileNotFoundError, OSError):
        return None
    resolved = (ip.current.parent / target).resolve()
    return resolved if resolved.is_dir() else None


def version_info(version_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((version_dir / "release.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def swap_current(ip: paths.InstallPaths, version_dir: Path) -> bool:
    """Point `current` at `version_dir` (relative link) in one rename; the old link stays as current.previous."""
    new = ip.current.with_name(f".current.{os.getpid()}.new")
    with contextlib.suppress(FileNotFoundError):
        new.unlink()
    new.symlink_to(os.path.relpath(version_dir, ip.current.parent))
    return atomic_replace(new, ip.current, SUFFIX)


def prune_versions(ip: paths.InstallPaths, keep: set[Path]) -> list[Path]:
    """Remove version directories other than `keep` (current and the one it replaced)."""
    removed: list[Path] = []
    if not ip.versions_dir.is_dir():
        return removed
    keep_resolved = {k.resolve() for k in keep}
    for entry in sorted(ip.versions_dir.iterdir()):
        if entry.resolve() not in keep_resolved and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def link_entry_points(ip: paths.InstallPaths) -> list[Path]:
    _dir(ip.bin_dir, 0o755)
    linked = []
    for program in PROGRAMS:
        dst = ip.entry_point(program)
        new = dst.with_name(f".{program}.{os.getpid()}.new")
        with contextlib.suppress(FileNotFoundError):
            new.unlink()
        new.symlink_to(ip.current / "bin" / program)
        atomic_replace(new, dst, SUFFIX)
        remove_backup(dst, SUFFIX)
        linked.append(dst)
    return linked


# --- install --------------------------------------------------------------------------------------------


def resolve_owner(user: str, owner_home: Path | None) -> InstallMeta:
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise NotFound(f"no user {user!r} on this host", hint="create the user first, or pass --owner $USER") from None
    if pw.pw_uid == 0:
        raise BadRequest("the owner must be an unprivileged user, not root (bangerd never runs as root)",
                         hint="pass --owner <your user name>")
    home = owner_home if owner_home is not None else Path(pw.pw_dir)
    if not home.is_absolute():
        raise BadRequest(f"owner home {str(home)!r} must be an absolute path")
    return InstallMeta(owner_user=pw.pw_name, owner_uid=pw.pw_uid, owner_gid=pw.pw_gid, owner_home=home)


@dataclass(frozen=True)
class InstallResult:
    meta: InstallMeta
    version_dir: Path
    manager: supervise.Manager
    unit_files: tuple[Path, ...]
    entry_points: tuple[Path, ...]
    daemon: dict[str, Any]
    migrations: str


def _unit_context(meta: InstallMeta) -> units.UnitContext:
    try:
        group = grp.getgrgid(meta.owner_gid).gr_name
    except KeyError:
        group = str(meta.owner_gid)
    return units.UnitContext(meta.owner_user, group, meta.owner_home, paths.system_install_paths(),
                             paths.resolve_system(meta.owner_home))


def write_units(meta: InstallMeta) -> list[Path]:
    ip = paths.system_install_paths()
    _dir(ip.unit_dir, 0o755)
    written = []
    for name, text in units.render_all(_unit_context(meta)).items():
        path = ip.unit_file(name)
        write_file_atomic(path, text, 0o644)
        written.append(path)
    return written


def stage_tarball(tarball: Path, ip: paths.InstallPaths, env: dict[str, str], owner: InstallMeta,
                  expect_version: str | None = None) -> tuple[Path, str, str]:
    """Stage a release archive as a version directory; returns (dir, version, check-migrations line)."""
    from banger.update import stage

    digest = sha256_file(tarball)
    info, _ = stage.read_archive(tarball)
    if expect_version is not None and info.version != expect_version:
        raise BangerError(f"{tarball.name} contains version {info.version!r}, not {expect_version!r}")
    target = ip.version_dir(stage.version_dir_name(info.version, digest))
    current = current_version_dir(ip)
    if target.exists() and (current is None or target.resolve() != current):
        shutil.rmtree(target)  # a leftover of an interrupted run; never the running version
    if target.exists():
        staged = stage.StagedVersion(target, info)
    else:
        staged = stage.stage(tarball, digest, ip.versions_dir, expect_version=info.version)
    try:
        line = stage.sanity_check(staged, env, run_as=(owner.owner_uid, owner.owner_gid))
    except BangerError:
        if staged.directory != current:
            shutil.rmtree(staged.directory, ignore_errors=True)
        raise
    return staged.directory, info.version, line


def service_env() -> dict[str, str]:
    prefix = paths.system_prefix()
    return {"BANGER_SYSTEM_PREFIX": str(prefix)} if prefix != Path("/") else {}


def install(owner: str, *, owner_home: Path | None = None, tarball: Path | None = None,
            say: Say = lambda _: None) -> InstallResult:
    """Install (or reinstall) banger as a system install owned by `owner`, and start it."""
    require_root("banger system install")
    meta = resolve_owner(owner, owner_home)
    ip = paths.system_install_paths()
    with exclusive(ip, "install"):
        return _install(meta, ip, tarball, say)


def _install(meta: InstallMeta, ip: paths.InstallPaths, tarball: Path | None, say: Say) -> InstallResult:
    from banger import __version__
    from banger.update import release

    layout = paths.resolve_system(meta.owner_home)
    previous = current_version_dir(ip)
    checkout = release.detect_checkout() if tarball is None else None
    if tarball is None and checkout is None:
        # Run from an installed version (e.g. to refresh the units after `banger update`): keep it.
        if previous is None or not version_info(previous).get("version"):
            raise BangerError("nothing to install from: this banger does not run from a source checkout",
                              hint="pass --from banger-<version>-linux-amd64.tar.gz")
        say(f"reinstalling the current version from {previous}")
        version_dir, version, migrations = previous, str(version_info(previous)["version"]), ""
    else:
        with tempfile.TemporaryDirectory(prefix="banger-install-") as tmp:
            if tarball is None and checkout is not None:
                say(f"building banger v{__version__} from {checkout}")
                tarball = release.build_tarball(checkout, __version__, Path(tmp)).tarball
            if tarball is None:  # unreachable: one of the two branches above set it
                raise BangerError("no release archive to install")
            say(f"staging {tarball.name} in {ip.versions_dir}")
            for d in (ip.opt_dir, ip.versions_dir):
                _dir(d, 0o755)
            version_dir, version, migrations = stage_tarball(tarball, ip, service_env(), meta)
    info = version_info(version_dir)
    meta = replace(meta, installed_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), version=version,
                   commit=str(info.get("commit", "")), built_at=str(info.get("built_at", "")))
    _dir(layout.config_dir, 0o755)
    for d in (layout.state_dir, layout.cache_dir):
        _dir(d, 0o700, meta.owner_uid, meta.owner_gid)
    _dir(ip.log_dir, 0o755)
    _owner_dirs(meta)
    old = installmeta.read()
    svc = supervise.services(meta)
    if old is not None:
        say("stopping the running services")
        supervise.stop_all(supervise.services(old))
    swap_current(ip, version_dir)
    remove_backup(ip.current, SUFFIX)
    entry_points = link_entry_points(ip)
    write_file_atomic(layout.install_meta, installmeta.render(meta), 0o644)
    unit_files = write_units(meta)
    if svc.manager == "systemd":
        units.systemctl("daemon-reload")
        units.systemctl("enable", units.HELPER_UNIT, units.DAEMON_UNIT)
        say("starting bangerd-root.service and bangerd.service")
    else:
        say("systemd is not running here: banger supervises bangerd-root and bangerd itself "
            "(`banger system start|stop`)")
    supervise.restart_all(svc)
    ping = supervise.daemon_ping(svc) or {}
    prune_versions(ip, {version_dir} | ({previous} if previous else set()))
    return InstallResult(meta, version_dir, svc.manager, tuple(unit_files), tuple(entry_points), ping, migrations)


# --- uninstall ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UninstallResult:
    removed: tuple[Path, ...]
    kept: tuple[Path, ...]
    stopped: tuple[str, ...]


def _running_vms(layout: paths.Layout) -> list[str]:
    from banger.rpc import client

    try:
        result = client.call(layout.daemon_socket, "vm.list", {}, timeout=10, connect_timeout=1)
    except BangerError:
        return []
    vms = result.get("vms", []) if isinstance(result, dict) else []
    return [str(vm.get("name")) for vm in vms if isinstance(vm, dict) and vm.get("state") == "running"]


def _remove(path: Path, removed: list[Path]) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
        removed.append(path)
    elif path.is_dir():
        shutil.rmtree(path)
        removed.append(path)


def uninstall(*, purge: bool, say: Say = lambda _: None) -> UninstallResult:
    """Stop the services and remove the install; `purge` also removes state, cache, config and logs.

    Never touches the owner's home (their ssh_config and known_hosts pins stay).
    """
    require_root("banger system uninstall")
    ip = paths.system_install_paths()
    if not ip.opt_dir.exists():
        return _uninstall(ip, purge, say)
    with exclusive(ip, "uninstall"):
        return _uninstall(ip, purge, say)


def _uninstall(ip: paths.InstallPaths, purge: bool, say: Say) -> UninstallResult:
    meta = installmeta.read()
    layout = paths.resolve_system(meta.owner_home if meta else Path("/nonexistent"))
    if purge and meta is not None:
        running = _running_vms(layout)
        if running:
            raise BangerError(f"VMs are still running: {', '.join(running)}; --purge would delete their disks",
                              hint="stop them first (`banger vm stop <name>`), then uninstall")
    stopped: list[str] = []
    if meta is not None:
        svc = supervise.services(meta)
        if svc.manager == "systemd":
            units.systemctl("disable", "--now", units.HELPER_UNIT, units.DAEMON_UNIT, check=False)
            stopped = list(supervise.START_ORDER)
        else:
            stopped = supervise.stop_all(svc)
    removed: list[Path] = []
    for unit in (units.DAEMON_UNIT, units.HELPER_UNIT):
        _remove(ip.unit_file(unit), removed)
    if units.systemd_running():
        units.systemctl("daemon-reload", check=False)
    for program in PROGRAMS:
        link = ip.entry_point(program)
        with contextlib.suppress(OSError):
            if link.is_symlink() and os.readlink(link).startswith(str(ip.opt_dir) + "/"):
                _remove(link, removed)
    for p in (layout.install_meta, layout.install_meta.with_name(layout.install_meta.name + SUFFIX)):
        _remove(p, removed)
    kept: list[Path] = []
    data_dirs = (layout.state_dir, layout.cache_dir, ip.log_dir, layout.runtime_dir, layout.helper_runtime_dir,
                 layout.config_dir)
    for d in data_dirs:
        if purge:
            _remove(d, removed)
        elif d.exists() and d not in (layout.runtime_dir, layout.helper_runtime_dir):
            kept.append(d)
    # Last: this very command may be running from a version directory under opt_dir.
    _remove(ip.opt_dir, removed)
    return UninstallResult(tuple(removed), tuple(kept), tuple(stopped))


# --- status ---------------------------------------------------------------------------------------------


def _socket_facts(path: Path) -> dict[str, Any]:
    facts: dict[str, Any] = {"path": str(path)}
    try:
        st = path.lstat()
    except FileNotFoundError:
        return {**facts, "exists": False}
    except PermissionError:
        return {**facts, "exists": None}
    dst = path.parent.stat()
    return {**facts, "exists": True, "is_socket": stat.S_ISSOCK(st.st_mode), "mode": f"{stat.S_IMODE(st.st_mode):04o}",
            "uid": st.st_uid, "dir_mode": f"{stat.S_IMODE(dst.st_mode):04o}", "dir_uid": dst.st_uid}


def status_facts(meta: InstallMeta) -> dict[str, Any]:
    """What is installed and running, from the files and processes (works with the daemon down)."""
    ip = paths.system_install_paths()
    svc = supervise.services(meta)
    current = current_version_dir(ip)
    versions = sorted(p.name for p in ip.versions_dir.iterdir() if p.is_dir()) if ip.versions_dir.is_dir() else []
    services = {}
    for name in supervise.START_ORDER:
        st = supervise.state(svc, name)
        services[name] = {"running": st.running, "pid": st.pid, "detail": st.detail}
    return {
        "install": {"owner_user": meta.owner_user, "owner_uid": meta.owner_uid, "owner_home": str(meta.owner_home),
                    "installed_at": meta.installed_at, "version": meta.version, "commit": meta.commit,
                    "built_at": meta.built_at, "metadata": str(svc.layout.install_meta)},
        "supervisor": "systemd" if svc.manager == "systemd" else "banger (systemd is not running)",
        "current": str(current) if current else None,
        "versions": versions,
        "services": services,
        "sockets": {"bangerd": _socket_facts(svc.layout.daemon_socket),
                    "bangerd-root": _socket_facts(svc.layout.helper_socket)},
        "logs": ({"bangerd": "journalctl -u bangerd.service", "bangerd-root": "journalctl -u bangerd-root.service"}
                 if svc.manager == "systemd"
                 else {name: str(ip.service_log(name)) for name in supervise.START_ORDER}),
    }
