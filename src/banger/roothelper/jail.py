"""priv.jail_stage / jail_launch / jail_cleanup: a Firecracker jail, built, started and removed as root.

Layout (Firecracker's jailer decides it): `<jailer_chroot_base>/<firecracker binary name>/<jail id>/root`
is the chroot; the helper adds `banger-jail.json` beside `root/`, the record of what it staged, so launch
and cleanup need nothing but the VM id and trust nothing the daemon says twice.

The jailer runs as root and resolves the chroot *by path*, then chowns the chroot's `/` and `/dev` to the
jail user. If a user could swap a directory on that path for a symlink (say to `/`), root would hand them
the host. So the chroot base and every parent must be directories only root can change, and everything
below the base is created here, root-owned, through directory fds opened without following symlinks.
Host files enter through fds too (opened `O_PATH|O_NOFOLLOW`, checked against banger's directories by
/proc/self/fd), so a path swapped after validation is never what gets linked, copied or device-noded.

What stage and launch make is removed again when they fail; cleanup is idempotent, never follows a
symlink (the chroot belongs to the jail user once the jailer ran) and unmounts whatever is mounted inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import logging
import os
import posixpath
import re
import shutil
import stat as st
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from banger.errors import AlreadyExists, BadRequest, BangerError, NotFound
from banger.roothelper import validate
from banger.roothelper.validate_jail import JAIL_ID_LEN, JailStage
from banger.system.run import spawn
from banger.vmm.firecracker.jailer import (
    JailPlan,
    StageKind,
    StageOp,
    files_to_stage,
    jailer_argv,
    validate_exec_file,
    validate_root_executable,
)

log = logging.getLogger("banger.roothelper.jail")

RECORD: Final = "banger-jail.json"
JAIL_DIR_MODE: Final = 0o711  # the owner daemon reaches the sockets inside; nobody lists or changes it
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MNT_DETACH, _UMOUNT_NOFOLLOW = 2, 8

# One jail change at a time: stage, launch and cleanup share the base and its per-binary directories.
lock = asyncio.Lock()


@dataclass(frozen=True)
class JailSettings:
    """The helper's own jail configuration (config.toml and the install), never the caller's."""

    chroot_base: str  # canonical
    jailer_bin: str
    owner_uid: int
    owner_gid: int | None
    roots: tuple[Path, ...]


# --- directories only root can change -----------------------------------------------------------------


def _fixed(parent: os.stat_result, child_uid: int) -> bool:
    """Only root can rename or replace an entry owned by `child_uid` in `parent` (a sticky root directory
    protects root's entries)."""
    return parent.st_uid == 0 and (not parent.st_mode & 0o022 or bool(parent.st_mode & st.S_ISVTX and child_uid == 0))


def check_base(base: str) -> bool:
    """`base` and every directory above it can be changed by root alone. Returns whether `base` exists (if
    not, it is to be made root's, so its parent is checked as if it were)."""
    path, parent = "/", os.lstat("/")
    for part in filter(None, base.split("/")):
        child_path = posixpath.join(path, part)
        try:
            child: os.stat_result | None = os.lstat(child_path)
        except FileNotFoundError:
            if child_path != base:
                raise NotFound(f"jailer_chroot_base {base}: {child_path} does not exist") from None
            child = None
        if child is not None and (st.S_ISLNK(child.st_mode) or not st.S_ISDIR(child.st_mode)):
            raise BadRequest(f"jailer_chroot_base {base}: {child_path} is not a directory (symlinks are refused)")
        if not _fixed(parent, 0 if child is None else child.st_uid):
            raise BadRequest(
                f"jailer_chroot_base {base} is not safe for the jailer: {path} can be changed by uid "
                f"{parent.st_uid} or others (mode {st.S_IMODE(parent.st_mode):04o})",
                hint="use a directory whose parents only root can write, on the filesystem of banger's state "
                     "directory (hard links), e.g. /var/lib/banger-jail",
            )
        if child is None:
            return False
        path, parent = child_path, child
    if parent.st_uid != 0 or parent.st_mode & 0o022:
        raise BadRequest(f"jailer_chroot_base {base} must be owned by root and not group/world-writable "
                         f"(owner uid {parent.st_uid}, mode {st.S_IMODE(parent.st_mode):04o})")
    return True


def open_dir(path: str, what: str) -> int:
    """The directory at canonical `path`, reached from / without following any symlink."""
    fd = os.open("/", _DIR)
    try:
        for part in filter(None, path.split("/")):
            new = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = new
    except OSError as exc:
        os.close(fd)
        error = NotFound if exc.errno == errno.ENOENT else BangerError
        raise error(f"{what} {path} cannot be opened without following symlinks: {exc.strerror}") from None
    return fd


def _subdir(parent_fd: int, name: str, *, create: bool, path: str) -> int:
    """Open (creating if asked) a root-owned directory that nobody else can write."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, JAIL_DIR_MODE, dir_fd=parent_fd)
            os.chmod(name, JAIL_DIR_MODE, dir_fd=parent_fd)  # parent is root's alone: no race
    fd = os.open(name, _DIR, dir_fd=parent_fd)
    info = os.fstat(fd)
    if info.st_uid != 0 or info.st_mode & 0o022:
        os.close(fd)
        raise BadRequest(f"{path} must be owned by root and not group/world-writable "
                         f"(owner uid {info.st_uid}, mode {st.S_IMODE(info.st_mode):04o})")
    return fd


@contextlib.contextmanager
def _fds() -> Iterator[list[int]]:
    opened: list[int] = []
    try:
        yield opened
    finally:
        for fd in opened:
            os.close(fd)


# --- stage --------------------------------------------------------------------------------------------


def _open_sources(stage: JailStage, fds: list[int]) -> dict[str, int | OSError]:
    """Every host file by an O_PATH fd that really is the resolved path (an OSError stands for a missing one)."""
    opened: dict[str, int | OSError] = {}
    for given, resolved in stage.sources.items():
        try:
            fd = os.open(resolved, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            opened[given] = exc
            continue
        fds.append(fd)
        if os.readlink(f"/proc/self/fd/{fd}") != str(resolved):
            raise BadRequest(f"{given!r} changed while it was being staged; try again")
        opened[given] = fd
    return opened


def stage(settings: JailSettings, req: JailStage) -> dict[str, Any]:
    plan, cfg = req.request.plan, req.request.cfg
    base = settings.chroot_base
    base_exists = check_base(base)
    with _fds() as fds:
        opened = _open_sources(req, fds)
        try:
            fds.append(exec_fd := os.open(plan.exec_file, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC))
        except OSError as exc:
            raise BadRequest(f"firecracker binary {plan.exec_file!r} cannot be read: {exc.strerror}") from None
        validate_exec_file(plan.exec_file, lstat=lambda _: os.fstat(exec_fd))
        opened[plan.exec_file] = exec_fd

        def stat(path: str) -> os.stat_result:
            found = opened.get(path)
            if isinstance(found, OSError):
                raise found
            return os.fstat(found) if found is not None else os.stat(path)

        ops = files_to_stage(plan, cfg, stat=stat)
        # Everything is checked: only now is anything created.
        if not base_exists:
            fds.append(parent := open_dir(posixpath.dirname(base), "the parent of jailer_chroot_base"))
            fds.append(_subdir(parent, posixpath.basename(base), create=True, path=base))
        fds.append(base_fd := open_dir(base, "jailer_chroot_base"))
        fds.append(bin_fd := _subdir(base_fd, plan.exec_file_name, create=True, path=posixpath.dirname(plan.jail_dir)))
        try:
            os.mkdir(plan.id, JAIL_DIR_MODE, dir_fd=bin_fd)
        except FileExistsError:
            raise AlreadyExists(f"a jail for VM {req.request.vm_id} already exists ({plan.jail_dir})",
                                hint="remove it with priv.jail_cleanup first") from None
        try:
            os.chmod(plan.id, JAIL_DIR_MODE, dir_fd=bin_fd)
            fds.append(jail_fd := os.open(plan.id, _DIR, dir_fd=bin_fd))
            os.mkdir("root", 0o700, dir_fd=jail_fd)
            fds.append(root_fd := os.open("root", _DIR, dir_fd=jail_fd))
            writable = {d.path_on_host for d in cfg.drives if not d.is_read_only}
            for op in ops[1:]:  # ops[0] is the chroot directory, made above
                _execute(plan, op, root_fd, opened, writable)
            _write_record(jail_fd, req)
        except BaseException:
            shutil.rmtree(plan.id, dir_fd=bin_fd, ignore_errors=True)
            with contextlib.suppress(OSError):  # the per-binary directory, if this was its only jail
                os.rmdir(plan.exec_file_name, dir_fd=base_fd)
            raise
    log.info("jail staged", extra={"vm_id": req.request.vm_id, "jail": plan.jail_dir, "files": len(ops) - 1})
    return {"vm_id": req.request.vm_id, "jail_dir": plan.jail_dir, "chroot": plan.chroot_dir,
            "staged": [op.describe() for op in ops[1:]]}


def _execute(plan: JailPlan, op: StageOp, root_fd: int, opened: Mapping[str, int | OSError],
             writable: set[str]) -> None:
    name = posixpath.basename(op.target)
    if posixpath.dirname(op.target) != plan.chroot_dir:
        raise BangerError(f"staging {op.describe()}: target is not at the top of the chroot")
    source = opened.get(op.source or "")
    if op.kind is StageKind.LINK and isinstance(source, int):
        try:
            os.link(f"/proc/self/fd/{source}", name, dst_dir_fd=root_fd, follow_symlinks=True)
            return
        except OSError as exc:
            # Another mount of the same filesystem is EXDEV too: read-only content is copied instead.
            if exc.errno != errno.EXDEV or op.source in writable:
                raise BadRequest(f"cannot link {op.source!r} into the jail: {exc.strerror}") from None
            op = replace(op, kind=StageKind.COPY, mode=0o400, uid=plan.uid, gid=plan.gid)
    if op.kind is StageKind.MKNOD:
        kind = st.S_IFBLK if op.node == "block" else st.S_IFCHR
        os.mknod(name, kind | 0o600, os.makedev(op.major, op.minor), dir_fd=root_fd)
        os.chown(name, _id(op.uid), _id(op.gid), dir_fd=root_fd, follow_symlinks=False)
        os.chmod(name, op.mode or 0o600, dir_fd=root_fd)  # the chroot is root's alone until launch
        return
    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=root_fd)
    with os.fdopen(out, "wb") as dst:
        if op.kind is StageKind.COPY:
            if not isinstance(source, int):
                raise BangerError(f"staging {op.describe()}: the source was not opened")
            with open(f"/proc/self/fd/{source}", "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)
        os.fchown(out, _id(op.uid), _id(op.gid))
        os.fchmod(out, op.mode or 0o600)


def _id(value: int | None) -> int:
    return -1 if value is None else value


def _write_record(jail_fd: int, req: JailStage) -> None:
    plan = req.request.plan
    record = {"vm_id": req.request.vm_id, "run_dir": req.request.run_dir, "links": req.request.links(),
              "plan": {"chroot_base": plan.chroot_base, "id": plan.id, "exec_file": plan.exec_file,
                       "uid": plan.uid, "gid": plan.gid}}
    fd = os.open(RECORD, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=jail_fd)
    with os.fdopen(fd, "w") as out:
        json.dump(record, out)


@dataclass(frozen=True)
class _Record:
    vm_id: str
    run_dir: str
    links: tuple[tuple[str, str], ...]
    plan: JailPlan


def _read_record(jail_fd: int) -> _Record:
    fd = os.open(RECORD, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=jail_fd)
    with os.fdopen(fd) as src:
        data = json.load(src)
    return _Record(data["vm_id"], data["run_dir"], tuple((a, b) for a, b in data["links"]), JailPlan(**data["plan"]))


def _find_jails(settings: JailSettings, vm_id: str, fds: list[int]) -> tuple[int, list[tuple[int, str]]]:
    """The base's fd (-1 if there is no base) and, for each `<base>/<binary name>` directory holding the VM's
    jail, its fd and name. Every fd goes into `fds`, to be closed by the caller."""
    try:
        fds.append(base_fd := open_dir(settings.chroot_base, "jailer_chroot_base"))
    except NotFound:
        return -1, []
    found = []
    for entry in sorted(os.listdir(base_fd)):
        try:
            fds.append(bin_fd := os.open(entry, _DIR, dir_fd=base_fd))
        except OSError:
            continue  # not a directory, or a symlink: not the jailer's
        with contextlib.suppress(OSError):
            if st.S_ISDIR(os.stat(vm_id[:JAIL_ID_LEN], dir_fd=bin_fd, follow_symlinks=False).st_mode):
                found.append((bin_fd, entry))
    return base_fd, found


# --- launch -------------------------------------------------------------------------------------------


def launch(settings: JailSettings, vm_id: str, console_log: Path) -> tuple[dict[str, Any], subprocess.Popen[bytes]]:
    with _fds() as fds:
        _, found = _find_jails(settings, vm_id, fds)
        if not found:
            raise NotFound(f"VM {vm_id} has no staged jail", hint="call priv.jail_stage first")
        fds.append(jail_fd := os.open(vm_id[:JAIL_ID_LEN], _DIR, dir_fd=found[0][0]))
        record = _read_record(jail_fd)
        plan = record.plan
        if os.stat("root", dir_fd=jail_fd, follow_symlinks=False).st_uid != 0:
            raise AlreadyExists(f"the jail of VM {vm_id} was already launched ({plan.jail_dir})",
                                hint="remove it with priv.jail_cleanup and stage it again")
        if not os.path.lexists(settings.jailer_bin):
            raise NotFound(f"jailer binary {settings.jailer_bin} does not exist",
                           hint="install Firecracker's jailer and set jailer_bin in config.toml, "
                                "or set jailer_enabled = false")
        validate_root_executable(settings.jailer_bin, "jailer binary")
        validate_exec_file(plan.exec_file)
        fds.append(out := _open_console(settings, console_log))
        run_dir = validate.managed_path(record.run_dir, settings.roots)
        fds.append(run_fd := open_dir(str(run_dir), "run directory"))
        _make_links(settings, run_fd, record.links)
        try:
            child = spawn(jailer_argv(plan, jailer=settings.jailer_bin), new_session=True, stdout=out, stderr=out,
                          cwd="/")
        except BaseException:
            _remove_links(run_fd, record.links)
            raise
    log.info("jailer started", extra={"vm_id": vm_id, "pid": child.pid, "jail": plan.jail_dir})
    return {"vm_id": vm_id, "pid": child.pid, "api_socket": record.links[0][0], "jail_dir": plan.jail_dir}, child


def _open_console(settings: JailSettings, path: Path) -> int:
    """The console log, for appending: a regular file of the owner's under banger's directories (root must
    not write for the daemon into a file the owner could not write)."""
    parent = open_dir(str(path.parent), "console log directory")
    try:
        fd = os.open(path.name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=parent)
    except OSError as exc:
        raise BadRequest(f"console log {str(path)!r} cannot be opened: {exc.strerror}") from None
    finally:
        os.close(parent)
    try:
        info = os.fstat(fd)
        if not st.S_ISREG(info.st_mode) or os.readlink(f"/proc/self/fd/{fd}") != str(path):
            raise BadRequest(f"console log {str(path)!r} is not a regular file at that path")
        if info.st_uid != settings.owner_uid:
            if info.st_uid != 0 or info.st_size:
                raise BadRequest(f"console log {str(path)!r} belongs to uid {info.st_uid}, not the owner "
                                 f"{settings.owner_uid}")
            os.fchown(fd, settings.owner_uid, _id(settings.owner_gid))  # just made by root, for the owner
    except BaseException:
        os.close(fd)
        raise
    return fd


def _make_links(settings: JailSettings, run_fd: int, links: tuple[tuple[str, str], ...]) -> None:
    """Each link replaces whatever non-directory stands there (a stale socket, an old link)."""
    try:
        for link, target in links:
            name = posixpath.basename(link)
            tmp = f".{name}.{os.getpid()}.tmp"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=run_fd)
            os.symlink(target, tmp, dir_fd=run_fd)
            os.chown(tmp, settings.owner_uid, _id(settings.owner_gid), dir_fd=run_fd, follow_symlinks=False)
            os.replace(tmp, name, src_dir_fd=run_fd, dst_dir_fd=run_fd)
    except OSError as exc:
        _remove_links(run_fd, links)
        raise BangerError(f"cannot link {link} to the jail: {exc.strerror}") from None


def _remove_links(run_fd: int, links: tuple[tuple[str, str], ...]) -> None:
    """Only the links that still point where the jail put them."""
    for link, target in links:
        name = posixpath.basename(link)
        with contextlib.suppress(OSError):
            if os.readlink(name, dir_fd=run_fd) == target:
                os.unlink(name, dir_fd=run_fd)


def reap_when_done(child: subprocess.Popen[bytes]) -> None:
    """The jailer is our child: reap it as soon as it (that is, Firecracker) exits, so no zombie lingers."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(child.pid)
    except OSError:
        return  # already gone: reaped by the next Popen's cleanup

    def reap() -> None:
        if child.poll() is not None:
            loop.remove_reader(fd)
            os.close(fd)

    loop.add_reader(fd, reap)


# --- cleanup ------------------------------------------------------------------------------------------


def cleanup(settings: JailSettings, vm_id: str) -> dict[str, Any]:
    removed = []
    jail_id = vm_id[:JAIL_ID_LEN]
    with _fds() as fds:
        base_fd, found = _find_jails(settings, vm_id, fds)
        for bin_fd, name in found:
            jail_dir = posixpath.join(settings.chroot_base, name, jail_id)
            fds.append(jail_fd := os.open(jail_id, _DIR, dir_fd=bin_fd))
            _refuse_if_running(jail_fd, vm_id)
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                _unlink_record_links(settings, _read_record(jail_fd))
            for mount in sorted(_mounts_under(jail_dir), key=len, reverse=True):
                _umount(mount)
            shutil.rmtree(jail_id, dir_fd=bin_fd)
            with contextlib.suppress(OSError):
                os.rmdir(name, dir_fd=base_fd)  # the per-binary directory, once empty
            removed.append(jail_dir)
    if removed:
        log.info("jail removed", extra={"vm_id": vm_id, "jails": removed})
    return {"vm_id": vm_id, "removed": removed}


def _refuse_if_running(jail_fd: int, vm_id: str) -> None:
    """A process whose root directory is this chroot is the jailed Firecracker: it must be stopped first."""
    with contextlib.suppress(FileNotFoundError):
        root = os.stat("root", dir_fd=jail_fd, follow_symlinks=False)
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    proc_root = os.stat(f"/proc/{entry}/root")
                    if (proc_root.st_dev, proc_root.st_ino) == (root.st_dev, root.st_ino):
                        raise BangerError(f"Firecracker (pid {entry}) still runs in the jail of VM {vm_id}; "
                                          "stop it first")


def _unlink_record_links(settings: JailSettings, record: _Record) -> None:
    run_dir = validate.managed_path(record.run_dir, settings.roots)
    run_fd = open_dir(str(run_dir), "run directory")
    try:
        _remove_links(run_fd, record.links)
    finally:
        os.close(run_fd)


def _mounts_under(path: str) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as src:
        points = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4]) for line in src]
    return [p for p in points if p == path or p.startswith(path + "/")]


def _umount(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(path), _MNT_DETACH | _UMOUNT_NOFOLLOW) != 0:
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOENT):  # not (or no longer) a mount point
            raise BangerError(f"cannot unmount {path} in a jail: {os.strerror(code)}")
