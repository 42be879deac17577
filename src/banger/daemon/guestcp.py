"""`vm.cp.push` and `vm.cp.pull`: copying files and trees between the host and a guest through its agent.

Like the other guest operations (daemon/guestops.py), each copy runs in a thread of its own, streams its
events with backpressure and is stopped through a `Cancel` when the caller goes away.
"""

from __future__ import annotations

import asyncio
import base64
import os
import stat
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from banger.daemon.guestops import (
    Cancel,
    Emit,
    agent_for,
    chunks,
    guest_entry,
    run_cancellable,
    running_vm,
    thread_emitter,
)
from banger.errors import BadRequest, BangerError, NotFound
from banger.rpc.protocol import Params

if TYPE_CHECKING:
    from banger.daemon.app import Daemon
    from banger.guest.agent_client import AgentClient
    from banger.rpc.server import CallContext


def _abs_param(p: Params, key: str, side: str) -> str:
    value = p.get_str(key, required=True)
    if not value.startswith("/") or "\0" in value:
        raise BadRequest(f"{side} path {value!r} must be absolute")
    return value


async def vm_cp_push(d: Daemon, ctx: CallContext, raw: dict[str, Any]) -> Any:
    """Host → guest: the daemon reads `src` (a file or a tree) and writes it through the agent."""
    p = Params(raw, allowed={"ref", "src", "dst"})
    vm = running_vm(d, p.get_str("ref", required=True))
    src = _abs_param(p, "src", "host")
    dst = _abs_param(p, "dst", "guest")
    agent = await agent_for(d, vm)
    emit = thread_emitter(ctx, asyncio.get_running_loop())
    return await run_cancellable(lambda cancel: _push(agent, vm.name, src, dst, emit, cancel), f"cp {vm.name}")


def _push(agent: AgentClient, vm_name: str, src: str, dst: str, emit: Emit, cancel: Cancel) -> dict[str, Any]:
    try:
        st = os.stat(src)
    except FileNotFoundError:
        raise NotFound(f"cannot copy {src!r}: no such file or directory on the host") from None
    except OSError as exc:
        raise BangerError(f"cannot read {src!r}: {exc.strerror}") from None
    is_dir = stat.S_ISDIR(st.st_mode)
    if not is_dir and not stat.S_ISREG(st.st_mode):
        raise BadRequest(f"cannot copy {src!r}: not a regular file or directory")
    at_dst = guest_entry(agent, dst)
    if at_dst is not None and at_dst.type == "dir":
        name = os.path.basename(src.rstrip("/"))
        if not name:
            raise BadRequest("cannot copy the host's root directory")
        target = str(PurePosixPath(dst) / name)
        existing = guest_entry(agent, target)
    else:
        if at_dst is None:
            parent = str(PurePosixPath(dst).parent)
            if dst.endswith("/") or (parent_entry := guest_entry(agent, parent)) is None \
                    or parent_entry.type != "dir":
                missing = dst if dst.endswith("/") else parent
                raise NotFound(f"guest directory {vm_name}:{missing.rstrip('/') or '/'} does not exist")
        target, existing = str(PurePosixPath(dst)), at_dst
    stats = {"files": 0, "dirs": 0, "bytes": 0, "skipped": 0, "target": target}
    if not is_dir:
        if existing is not None and existing.type == "dir":
            raise BadRequest(f"cannot overwrite directory {vm_name}:{target} with non-directory {src}")
        _push_file(agent, src, target, st.st_mode, stats, cancel)
        return stats
    if existing is not None and existing.type != "dir":
        raise BadRequest(f"cannot overwrite non-directory {vm_name}:{target} with directory {src}")
    _push_dir(agent, vm_name, Path(src), target, st.st_mode, existing is not None, emit, stats, cancel)
    return stats


def _push_file(agent: AgentClient, src: str, target: str, mode: int, stats: dict[str, Any],
               cancel: Cancel) -> None:
    cancel.check()
    try:
        with open(src, "rb") as f:
            size = agent.write_file(target, chunks(f, cancel), mode=stat.S_IMODE(mode))
    except OSError as exc:
        raise BangerError(f"cannot read {src!r}: {exc.strerror}") from None
    stats["files"] += 1
    stats["bytes"] += size


def _push_dir(agent: AgentClient, vm_name: str, src: Path, target: str, mode: int, exists: bool, emit: Emit,
              stats: dict[str, Any], cancel: Cancel) -> None:
    cancel.check()
    children: dict[str, str] = {}
    if exists:
        children = {e.name: e.type for e in agent.list_dir(target)}
    else:
        agent.mkdir(target, mode=stat.S_IMODE(mode))
    stats["dirs"] += 1
    try:
        entries = sorted(os.scandir(src), key=lambda e: e.name)
    except OSError as exc:
        raise BangerError(f"cannot read directory {str(src)!r}: {exc.strerror}") from None
    for entry in entries:
        child = f"{target.rstrip('/')}/{entry.name}"
        st = entry.stat(follow_symlinks=False)
        there = children.get(entry.name)
        if stat.S_ISDIR(st.st_mode):
            if there is not None and there != "dir":
                raise BadRequest(f"cannot overwrite non-directory {vm_name}:{child} with directory {entry.path}")
            _push_dir(agent, vm_name, Path(entry.path), child, st.st_mode, there == "dir", emit, stats, cancel)
        elif stat.S_ISREG(st.st_mode):
            if there == "dir":
                raise BadRequest(f"cannot overwrite directory {vm_name}:{child} with non-directory {entry.path}")
            _push_file(agent, entry.path, child, st.st_mode, stats, cancel)
        else:
            stats["skipped"] += 1
            emit({"kind": "skip", "path": entry.path, "message": f"skipped {_kind(st.st_mode)} {entry.path}"})


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "symlink"), (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


async def vm_cp_pull(d: Daemon, ctx: CallContext, raw: dict[str, Any]) -> Any:
    """Guest → host: the daemon reads through the agent and streams events that the CLI writes out:
    `{kind: dir, path, mode}`, `{kind: file, path, mode, data_b64, eof}` (paths relative to `src`,
    "" for `src` itself) and `{kind: skip, path, message}` for symlinks and special files."""
    p = Params(raw, allowed={"ref", "src"})
    vm = running_vm(d, p.get_str("ref", required=True))
    src = _abs_param(p, "src", "guest")
    agent = await agent_for(d, vm)
    emit = thread_emitter(ctx, asyncio.get_running_loop())
    return await run_cancellable(lambda cancel: _pull(agent, vm.name, src, emit, cancel), f"cp {vm.name}")


def _pull(agent: AgentClient, vm_name: str, src: str, emit: Emit, cancel: Cancel) -> dict[str, Any]:
    entry = guest_entry(agent, src)
    if entry is None:
        raise NotFound(f"cannot copy {vm_name}:{src}: no such file or directory in the guest")
    stats = {"files": 0, "dirs": 0, "bytes": 0, "skipped": 0, "type": entry.type}
    if entry.type == "file":
        _pull_file(agent, src, "", emit, stats, cancel)
    elif entry.type == "dir":
        _pull_dir(agent, src, "", entry.mode, emit, stats, cancel)
    else:
        raise BadRequest(f"cannot copy {vm_name}:{src}: it is a {entry.type}, not a file or directory")
    return stats


def _pull_file(agent: AgentClient, path: str, rel: str, emit: Emit, stats: dict[str, Any], cancel: Cancel) -> None:
    cancel.check()
    sent = 0

    def chunk(data: bytes) -> None:
        nonlocal sent
        cancel.check()
        sent += len(data)
        emit({"kind": "file", "path": rel, "data_b64": base64.b64encode(data).decode(), "eof": False})

    meta = agent.read_file_into(path, chunk)
    emit({"kind": "file", "path": rel, "mode": meta.mode, "data_b64": "", "eof": True})
    stats["files"] += 1
    stats["bytes"] += sent


def _pull_dir(agent: AgentClient, path: str, rel: str, mode: int, emit: Emit, stats: dict[str, Any],
              cancel: Cancel) -> None:
    cancel.check()
    emit({"kind": "dir", "path": rel, "mode": mode})
    stats["dirs"] += 1
    for entry in agent.list_dir(path):
        child, child_rel = f"{path.rstrip('/')}/{entry.name}", f"{rel}/{entry.name}" if rel else entry.name
        if entry.type == "dir":
            _pull_dir(agent, child, child_rel, entry.mode, emit, stats, cancel)
        elif entry.type == "file":
            _pull_file(agent, child, child_rel, emit, stats, cancel)
        else:
            stats["skipped"] += 1
            emit({"kind": "skip", "path": child_rel, "message": f"skipped {entry.type} {child}"})
