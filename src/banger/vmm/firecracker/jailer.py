"""Planning a jailed Firecracker: the jail's paths, the jailer's argv, and the files to stage. Pure.

The jailer (see Firecracker's `docs/jailer.md`) builds `<chroot_base>/<exec_file_name>/<id>/root`, copies
`--exec-file` into it, pivots into it, creates `/dev/kvm`, `/dev/net/tun`, `/dev/urandom` (and
`/dev/userfaultfd`) itself, drops to `--uid`/`--gid` and execs Firecracker. Everything else Firecracker
opens must be placed in the chroot beforehand, by the root helper, and named to Firecracker by its in-jail
path. This module says *what* to place and *where*; the root helper executes the `StageOp`s.

Every path is derived here (`JailPlan`), and `JailPlan.jailed_path()` is the only way a host file gets an
in-jail name. A host path computed from an in-jail path (`JailPlan.host_path()`) is refused when it would
leave the chroot.
"""

from __future__ import annotations

import enum
import os
import posixpath
import re
import stat as st
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Final, Literal

from banger.errors import BadRequest
from banger.vmm.firecracker.config import Drive, FirecrackerVmConfig, Vsock

JAIL_ID_MAX: Final = 64
DEFAULT_CHROOT_BASE: Final = "/srv/jailer"
# banger-go's choice (not the jailer's default /run/firecracker.socket): the socket sits at the top of the
# chroot so its host path is as short as possible (AF_UNIX paths are limited to 107 bytes).
API_SOCK_IN_JAIL: Final = "/firecracker.socket"

_JAIL_ID = re.compile(r"[A-Za-z0-9-]{1,64}")
_CGROUP_ARG = re.compile(r"[A-Za-z0-9_.-]+=[^=\n\0]+")  # the jailer splits on the one "="
_RESOURCE_LIMIT = re.compile(r"(fsize|no-file)=[0-9]+")
# Names at the top of the chroot that the jailer itself creates or uses.
_JAILER_OWNED: Final = frozenset({"dev", "run", "sys", "old_root"})
# Firecracker options the plan sets itself; passing them again would contradict the plan.
_PLANNED_FC_OPTIONS: Final = frozenset({"--api-sock", "--id"})

StatFn = Callable[[str], os.stat_result]


@dataclass(frozen=True)
class JailPlan:
    """One VM's jail. `exec_file` and `chroot_base` must be canonical (no symlinks): the jailer
    canonicalises them and derives the chroot directory from the *resolved* name of the binary."""

    chroot_base: str
    id: str
    exec_file: str
    uid: int
    gid: int
    netns: str | None = None
    api_sock: str = API_SOCK_IN_JAIL
    cgroup_version: Literal[1, 2] | None = None
    cgroups: tuple[str, ...] = ()
    parent_cgroup: str | None = None
    resource_limits: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate_jail_id(self.id)
        for what, value in (("chroot base", self.chroot_base), ("firecracker binary", self.exec_file)):
            _check_abs_normal(what, value)
        if self.chroot_base == "/":
            raise BadRequest(
                "jailer chroot base '/' is not allowed; use a dedicated directory such as /srv/jailer"
            )
        if posixpath.basename(self.exec_file) in ("", ".", ".."):
            raise BadRequest(f"firecracker binary path {self.exec_file!r} does not name a file")
        for what, ident in (("uid", self.uid), ("gid", self.gid)):
            if isinstance(ident, bool) or not isinstance(ident, int) or not 0 < ident < 2**32 - 1:
                raise BadRequest(
                    f"jail {what} {ident!r} is not allowed (1..4294967294); Firecracker must not run as root"
                )
        if self.netns is not None:
            _check_abs_normal("network namespace path", self.netns)
        _check_jail_path("API socket", self.api_sock)
        if self.api_sock.count("/") != 1 or self._reserved(self.api_sock.lstrip("/"), sock=False):
            raise BadRequest(f"API socket {self.api_sock!r} must be a free name at the top of the jail")
        if self.cgroup_version not in (None, 1, 2):
            raise BadRequest(f"cgroup version {self.cgroup_version!r} is not 1 or 2")
        for arg in self.cgroups:
            if not _CGROUP_ARG.fullmatch(arg):
                raise BadRequest(
                    f"jailer cgroup {arg!r} is not of the form <file>=<value> (e.g. cpu.weight=50)"
                )
        if self.parent_cgroup is not None:
            parts = self.parent_cgroup.split("/")
            if self.parent_cgroup.startswith("/") or any(p in ("", ".", "..") for p in parts):
                raise BadRequest(
                    f"parent cgroup {self.parent_cgroup!r} must be a relative path without '.' or '..'"
                )
        for arg in self.resource_limits:
            if not _RESOURCE_LIMIT.fullmatch(arg):
                raise BadRequest(f"jailer resource limit {arg!r} is not fsize=<n> or no-file=<n>")

    # -- derived paths: the only place they are computed ---------------------------------------------------

    @property
    def exec_file_name(self) -> str:
        return posixpath.basename(self.exec_file)

    @property
    def jail_dir(self) -> str:
        """`<chroot_base>/<exec_file_name>/<id>`: remove this whole directory to clean the jail up."""
        return posixpath.join(self.chroot_base, self.exec_file_name, self.id)

    @property
    def chroot_dir(self) -> str:
        return posixpath.join(self.jail_dir, "root")

    @property
    def api_socket_path(self) -> str:
        """The API socket as the host sees it."""
        return self.host_path(self.api_sock)

    @property
    def jailed_exec_file(self) -> str:
        """The jailer's own copy of the binary; Firecracker's /proc/<pid>/exe points here."""
        return self.host_path("/" + self.exec_file_name)

    @property
    def pid_file(self) -> str:
        """Written by the jailer when it forks (`--new-pid-ns`, `--daemonize`). banger uses neither, so the
        pid of the jailer process it spawns *is* Firecracker's pid; the file is the fallback after a
        restart of the helper, when the spawned child is no longer ours."""
        return self.host_path(f"/{self.exec_file_name}.pid")

    def host_path(self, jail_path: str) -> str:
        """The host path of a path inside the jail. Refuses anything that would leave the chroot."""
        _check_jail_path("in-jail path", jail_path)
        host = posixpath.join(self.chroot_dir, jail_path.lstrip("/"))
        if posixpath.commonpath([self.chroot_dir, host]) != self.chroot_dir:
            raise BadRequest(f"in-jail path {jail_path!r} is outside the chroot {self.chroot_dir}")
        return host

    def jailed_path(self, host_path: str) -> str:
        """The in-jail name of a host file: `/<basename>`. The only way a host file enters the jail."""
        _check_abs_normal("host path", host_path)
        name = posixpath.basename(host_path)
        if name in ("", ".", "..") or self._reserved(name, sock=True):
            raise BadRequest(
                f"{host_path!r} cannot enter the jail: its name {name!r} is reserved for the jailer or Firecracker",
                hint="rename the file",
            )
        return "/" + name

    def _reserved(self, name: str, *, sock: bool) -> bool:
        taken = {self.exec_file_name, f"{self.exec_file_name}.pid", *_JAILER_OWNED}
        if sock:
            taken.add(self.api_sock.lstrip("/"))
        return name in taken


def validate_jail_id(value: str) -> str:
    """The jailer's rule: 1-64 characters, letters, digits and '-'."""
    if not isinstance(value, str) or not _JAIL_ID.fullmatch(value):
        raise BadRequest(f"jail id {value!r} is invalid (1-{JAIL_ID_MAX} characters: letters, digits, '-')")
    return value


def jailer_argv(plan: JailPlan, firecracker_args: Sequence[str] = (), *, jailer: str = "jailer") -> list[str]:
    """The jailer command line, options in the order of the jailer's usage text.

    Not used on purpose: `--daemonize` (the helper spawns and supervises the process itself and wants its
    stdout, the guest console) and `--new-pid-ns` (with it the spawned jailer exits after the clone, which
    looked like Firecracker dying to banger-go's supervisor). Firecracker's `--id` is passed by the jailer.
    """
    for arg in firecracker_args:
        if arg.split("=", 1)[0] in _PLANNED_FC_OPTIONS:
            raise BadRequest(f"firecracker argument {arg!r} is set by the jail plan; leave it out")
    argv = [
        jailer,
        "--id", plan.id,
        "--exec-file", plan.exec_file,
        "--uid", str(plan.uid),
        "--gid", str(plan.gid),
    ]  # fmt: skip
    if plan.cgroup_version is not None:
        argv += ["--cgroup-version", str(plan.cgroup_version)]
    for cgroup in plan.cgroups:
        argv += ["--cgroup", cgroup]
    if plan.parent_cgroup is not None:
        argv += ["--parent-cgroup", plan.parent_cgroup]
    argv += ["--chroot-base-dir", plan.chroot_base]
    if plan.netns is not None:
        argv += ["--netns", plan.netns]
    for limit in plan.resource_limits:
        argv += ["--resource-limit", limit]
    return [*argv, "--", "--api-sock", plan.api_sock, *firecracker_args]


class StageKind(enum.StrEnum):
    MKDIR = "mkdir"  # the chroot directory (and its parents), root-owned; the jailer chowns it later
    LINK = "link"  # hard link `source` at `target`; ownership and mode are the host file's, left alone
    COPY = "copy"  # copy `source` to `target`, then chown/chmod
    MKNOD = "mknod"  # a device node with `major`/`minor`, then chown/chmod
    TOUCH = "touch"  # an empty file Firecracker writes (log, metrics), then chown/chmod


@dataclass(frozen=True)
class StageOp:
    """One step of staging. `target` is a host path, always inside the plan's chroot directory.

    The executor must refuse an existing `target` (never write through something already there) and
    must treat EXDEV from a LINK of read-only content as a reason to COPY with mode 0400 instead.
    """

    kind: StageKind
    target: str
    source: str | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    node: Literal["block", "char"] | None = None
    major: int = 0
    minor: int = 0

    def describe(self) -> str:
        owner = f" {self.uid}:{self.gid}" if self.uid is not None else ""
        mode = f" {self.mode:04o}" if self.mode is not None else ""
        if self.kind is StageKind.MKNOD:
            return f"mknod {self.target} {self.node} {self.major}:{self.minor}{mode}{owner}"
        src = f"{self.source} -> " if self.source else ""
        return f"{self.kind} {src}{self.target}{mode}{owner}"


def files_to_stage(plan: JailPlan, cfg: FirecrackerVmConfig, *, stat: StatFn = os.stat) -> list[StageOp]:
    """What must be in the chroot before the jailer runs, for `cfg` given with *host* paths.

    `stat` (default `os.stat`, read-only) tells devices from files and whether a hard link is possible.
    Kernel and initrd are hard-linked when they share the jail's filesystem, else copied. Drives that are
    block devices (device-mapper snapshots, loop devices) become device nodes; drives that are regular
    files are hard-linked, and a *writable* one on another filesystem is refused, since a copy would
    silently throw the guest's writes away. Whatever is linked or copied must already be readable (and,
    for a writable drive, writable) by the jail user: the jail grants nothing the user could not do.
    Log and metrics files are created empty, owned by the jail user. The vsock socket is created by
    Firecracker. The firecracker binary is copied in: the jailer copies it again over that copy (it opens
    the target for writing, without truncating, and refuses a hard link), so a read-only bind mount or a
    link of the host's binary would fail. /dev/kvm, /dev/net/tun and /dev/urandom are the jailer's own
    work; a node staged there would make its mknod fail.
    """
    jail_dev = stat(_nearest_existing(plan.chroot_dir, stat)).st_dev
    ops: list[StageOp] = [StageOp(StageKind.MKDIR, plan.chroot_dir, mode=0o700)]
    ops.append(StageOp(StageKind.COPY, plan.jailed_exec_file, source=plan.exec_file, mode=0o500,
                       uid=plan.uid, gid=plan.gid))
    ops.append(_stage_readonly_file(plan, cfg.kernel_path, "kernel", jail_dev, stat))
    if cfg.initrd_path is not None:
        ops.append(_stage_readonly_file(plan, cfg.initrd_path, "initrd", jail_dev, stat))
    for drive in cfg.drives:
        ops.append(_stage_drive(plan, drive, jail_dev, stat))
    for path in (cfg.log_path, cfg.metrics_path):
        if path is not None:
            target = plan.host_path(plan.jailed_path(path))
            ops.append(StageOp(StageKind.TOUCH, target, mode=0o600, uid=plan.uid, gid=plan.gid))
    taken = [op.target for op in ops[1:]]
    if cfg.vsock is not None:
        taken.append(plan.host_path(plan.jailed_path(cfg.vsock.uds_path)))
    _check_no_collision(taken)
    return ops


def jailed_config(plan: JailPlan, cfg: FirecrackerVmConfig) -> FirecrackerVmConfig:
    """`cfg` as the jailed Firecracker must see it: every host path replaced by its in-jail path."""

    def jp(path: str | None) -> str | None:
        return None if path is None else plan.jailed_path(path)

    return replace(
        cfg,
        kernel_path=plan.jailed_path(cfg.kernel_path),
        initrd_path=jp(cfg.initrd_path),
        drives=tuple(replace(d, path_on_host=plan.jailed_path(d.path_on_host)) for d in cfg.drives),
        vsock=None if cfg.vsock is None else Vsock(cfg.vsock.guest_cid, plan.jailed_path(cfg.vsock.uds_path)),
        log_path=jp(cfg.log_path),
        metrics_path=jp(cfg.metrics_path),
    )


def validate_exec_file(path: str, *, lstat: StatFn = os.lstat) -> None:
    """The binary the jailer copies must be a root-owned regular file that only root can change."""
    validate_root_executable(path, "firecracker binary", lstat=lstat)


def validate_root_executable(path: str, what: str, *, lstat: StatFn = os.lstat) -> None:
    """A program that root runs (the jailer) or copies for the jail user (Firecracker): a regular file owned by
    root, not group/world-writable, and readable and executable by everyone, since its copy in the jail
    belongs to the jail user (so a root-only file is refused rather than handed out).

    A symlink is refused too: the jailer names the chroot after the resolved file name.
    """
    try:
        info = lstat(path)
    except OSError as exc:
        raise BadRequest(f"{what} {path!r} cannot be read: {exc.strerror}") from exc
    if not st.S_ISREG(info.st_mode):
        raise BadRequest(f"{what} {path!r} is not a regular file (symlinks are not followed)")
    mode = st.S_IMODE(info.st_mode)
    if info.st_uid != 0 or info.st_mode & (st.S_IWGRP | st.S_IWOTH):
        raise BadRequest(
            f"{what} {path!r} must be owned by root and not group/world-writable "
            f"(owner uid {info.st_uid}, mode {mode:04o})",
            hint=f"chown root:root {path} && chmod 0755 {path}",
        )
    if mode & (st.S_IROTH | st.S_IXOTH) != st.S_IROTH | st.S_IXOTH:
        raise BadRequest(f"{what} {path!r} must be readable and executable by everyone (mode {mode:04o})",
                         hint=f"chmod 0755 {path}")


def _stage_readonly_file(plan: JailPlan, host: str, what: str, jail_dev: int, stat: StatFn) -> StageOp:
    info = _stat(host, what, stat)
    if not st.S_ISREG(info.st_mode):
        raise BadRequest(f"{what} {host!r} is not a regular file")
    target = plan.host_path(plan.jailed_path(host))
    _check_access(info, plan, host, what, write=False)
    if info.st_dev == jail_dev:
        return StageOp(StageKind.LINK, target, source=host)
    return StageOp(StageKind.COPY, target, source=host, mode=0o400, uid=plan.uid, gid=plan.gid)


def _stage_drive(plan: JailPlan, drive: Drive, jail_dev: int, stat: StatFn) -> StageOp:
    host = drive.path_on_host
    what = f"drive {drive.drive_id!r}"
    info = _stat(host, what, stat)
    target = plan.host_path(plan.jailed_path(host))
    mode = 0o400 if drive.is_read_only else 0o600
    if st.S_ISBLK(info.st_mode):
        return StageOp(
            StageKind.MKNOD,
            target,
            mode=mode,
            uid=plan.uid,
            gid=plan.gid,
            node="block",
            major=os.major(info.st_rdev),
            minor=os.minor(info.st_rdev),
        )
    if not st.S_ISREG(info.st_mode):
        raise BadRequest(f"{what} {host!r} is neither a block device nor a regular file")
    _check_access(info, plan, host, what, write=not drive.is_read_only)
    if info.st_dev == jail_dev:
        return StageOp(StageKind.LINK, target, source=host)
    if not drive.is_read_only:
        raise BadRequest(
            f"{what} {host!r} is writable and on another filesystem than the jail ({plan.chroot_base}); "
            "a copy would lose the guest's writes",
            hint="keep VM disks on the same filesystem as jailer_chroot_base",
        )
    return StageOp(StageKind.COPY, target, source=host, mode=0o400, uid=plan.uid, gid=plan.gid)


def _check_access(info: os.stat_result, plan: JailPlan, host: str, what: str, *, write: bool) -> None:
    """A hard link keeps the host file's owner and mode, so the jail user must already have access; a copy
    is made by root for the jail user, who must not get what they could not read. The jailer drops
    supplementary groups, so only owner, group and other bits count."""
    if info.st_uid == plan.uid:
        bits = st.S_IRUSR | (st.S_IWUSR if write else 0)
    elif info.st_gid == plan.gid:
        bits = st.S_IRGRP | (st.S_IWGRP if write else 0)
    else:
        bits = st.S_IROTH | (st.S_IWOTH if write else 0)
    if info.st_mode & bits != bits:
        need = "read and write" if write else "read"
        raise BadRequest(
            f"{what} {host!r} is not {need}able by the jail user {plan.uid}:{plan.gid} "
            f"(owner {info.st_uid}:{info.st_gid}, mode {st.S_IMODE(info.st_mode):04o})",
            hint=f"chown {plan.uid}:{plan.gid} {host}",
        )


def _stat(path: str, what: str, stat: StatFn) -> os.stat_result:
    try:
        return stat(path)
    except OSError as exc:
        raise BadRequest(f"{what} {path!r} cannot be staged into the jail: {exc.strerror}") from exc


def _nearest_existing(path: str, stat: StatFn) -> str:
    """The chroot usually does not exist yet; its filesystem is that of its nearest existing ancestor."""
    while True:
        try:
            stat(path)
            return path
        except FileNotFoundError:
            parent = posixpath.dirname(path)
            if parent == path:
                return path
            path = parent


def _check_no_collision(targets: list[str]) -> None:
    seen: set[str] = set()
    for target in targets:
        if target in seen:
            raise BadRequest(
                f"two host files would both enter the jail as {posixpath.basename(target)!r}",
                hint="give the kernel, initrd, disks, log and sockets distinct file names",
            )
        seen.add(target)


def _check_abs_normal(what: str, value: str) -> None:
    if (
        not isinstance(value, str)
        or not value.startswith("/")
        or "\0" in value
        or posixpath.normpath(value) != value
        or value.startswith("//")
    ):
        raise BadRequest(f"{what} {value!r} is not an absolute, normalised path (no '.', '..', '//')")


def _check_jail_path(what: str, value: str) -> None:
    _check_abs_normal(what, value)
    if value == "/":
        raise BadRequest(f"{what} {value!r} names the jail root itself, not a file in it")
