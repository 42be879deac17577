"""Parsing the `priv.jail_*` requests: the jail methods' part of `validate`, same rules, same primitives.

The caller's jail description is checked against the helper's own `JailPolicy` (config and install):
the chroot base must be the configured one, Firecracker runs as the owner, every host file is a path
under banger's directories. Pure apart from `os.path.realpath`, like `validate`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from banger.errors import BadRequest
from banger.roothelper.validate import check_params, managed_path, quote, type_name, vm_id
from banger.vmm.firecracker.config import Drive, FirecrackerVmConfig, Vsock
from banger.vmm.firecracker.jailer import JailPlan, validate_jail_id
from banger.vmm.firecracker.launcher import JailRequest

JAIL_ID_LEN: Final = 8  # the jail id is the VM's short id, as Firecracker's backend names it
DRIVES_MAX: Final = 16



@dataclass(frozen=True)
class JailPolicy:
    """What a jail may be, from the helper's own config and install: never from the caller."""

    chroot_base: str  # config jailer_chroot_base, canonical
    owner_uid: int
    owner_gid: int | None  # None: the owner uid has no passwd entry, so no group to run as
    roots: tuple[Path, ...]


@dataclass(frozen=True)
class JailStage:
    request: JailRequest  # in-jail names come from the paths as given
    sources: Mapping[str, Path]  # given host path -> resolved path, what is really opened
    run_dir: Path  # resolved


def _int(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{what} must be an integer, got {type_name(value)}")
    return value


def _str(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string, got {type_name(value)}")
    return value


def _jail_ids(uid: int, gid: int, policy: JailPolicy) -> None:
    """Firecracker runs as the owner; in embedded mode (owner root) the caller is root, who may pick any
    unprivileged user (JailPlan refuses root itself)."""
    if policy.owner_uid == 0:
        return
    if uid != policy.owner_uid:
        raise BadRequest(f"jail uid {uid} is not allowed (Firecracker runs as the owner uid {policy.owner_uid})")
    if policy.owner_gid is None:
        raise BadRequest(f"owner uid {policy.owner_uid} has no passwd entry, so the jail has no group to run as")
    if gid != policy.owner_gid:
        raise BadRequest(f"jail gid {gid} is not allowed (Firecracker runs as the owner's group {policy.owner_gid})")


def jail_stage_request(params: Mapping[str, Any], policy: JailPolicy) -> JailStage:
    keys = ("vm_id", "run_dir", "chroot_base", "exec_file", "uid", "gid", "kernel")
    check_params("priv.jail_stage", params, required=keys, optional=("initrd", "drives", "log", "metrics", "vsock"))
    vid = vm_id(params["vm_id"])
    if params["chroot_base"] != policy.chroot_base:
        raise BadRequest(f"chroot_base {quote(params['chroot_base'])} is not the helper's jailer_chroot_base "
                         f"{quote(policy.chroot_base)}", hint="restart bangerd-root after changing config.toml")
    uid, gid = _int("uid", params["uid"]), _int("gid", params["gid"])
    _jail_ids(uid, gid, policy)
    plan = JailPlan(chroot_base=policy.chroot_base, id=validate_jail_id(vid[:JAIL_ID_LEN]),
                    exec_file=_str("exec_file", params["exec_file"]), uid=uid, gid=gid)
    run_dir = _str("run_dir", params["run_dir"])
    resolved_run_dir = managed_path(run_dir, policy.roots)
    sources: dict[str, Path] = {}

    def source(value: object) -> str:
        sources[str(value)] = managed_path(value, policy.roots)
        return str(value)

    raw_drives = params.get("drives") or []
    if not isinstance(raw_drives, list) or len(raw_drives) > DRIVES_MAX:
        raise BadRequest(f"drives must be a list of at most {DRIVES_MAX} drives, got {type_name(raw_drives)}")
    drives = []
    for raw in raw_drives:
        if not isinstance(raw, dict):
            raise BadRequest(f"each drive must be an object, got {type_name(raw)}")
        check_params("a drive of priv.jail_stage", raw, required=("id", "path", "read_only"), optional=("root",))
        read_only, root = raw["read_only"], raw.get("root", False)
        if not isinstance(read_only, bool) or not isinstance(root, bool):
            raise BadRequest(f"drive {quote(raw['id'])}: read_only and root must be true or false")
        drives.append(Drive(_str("drive id", raw["id"]), source(raw["path"]), is_root_device=root,
                            is_read_only=read_only))
    initrd, log_path, metrics, vsock = (None if params.get(k) is None else _str(k, params[k])
                                        for k in ("initrd", "log", "metrics", "vsock"))
    # Only the file paths matter for staging; vcpu, memory and boot args are the daemon's business.
    cfg = FirecrackerVmConfig(
        kernel_path=source(params["kernel"]), initrd_path=None if initrd is None else source(initrd),
        boot_args="", vcpu=1, memory_mib=1, drives=tuple(drives),
        vsock=None if vsock is None else Vsock(3, vsock), log_path=log_path, metrics_path=metrics,
    )
    request = JailRequest(vid, run_dir, plan, cfg)
    request.links()  # log, metrics and vsock must be files of the run directory, which the helper links
    return JailStage(request, sources, resolved_run_dir)


def jail_launch_request(params: Mapping[str, Any], roots: Iterable[Path]) -> tuple[str, Path]:
    check_params("priv.jail_launch", params, required=("vm_id", "console_log"))
    return vm_id(params["vm_id"]), managed_path(params["console_log"], roots)


def jail_cleanup_request(params: Mapping[str, Any]) -> str:
    check_params("priv.jail_cleanup", params, required=("vm_id",))
    return vm_id(params["vm_id"])
