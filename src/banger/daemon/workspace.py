"""Workspaces in the daemon: `vm.workspace.prepare` ships a host repository into a guest, and
`vm.workspace.export` takes the guest's changes back out as a binary patch (reference §8.5).

Prepare, in order, all through the guest agent:
1. `git bundle create --all` in the host repository (the daemon runs as the owner and reads it);
2. the bundle is written to the guest's /tmp and cloned into a staging directory next to the guest
   path, with the host's HEAD checked out (on the host's branch name when there is one);
3. the working-tree files (tracked, plus untracked ones when asked; never ignored ones) are streamed
   as a tar into `tar -x` in the staging directory, so uncommitted edits carry over, and tracked files
   deleted on the host are deleted;
4. an optional guest-only branch (`git checkout -b B [FROM]`);
5. the staging directory replaces the guest path in one rename (a failed prepare leaves the guest
   path as it was), `mise trust` runs if mise exists, and the VM records `workspace`.

A prepare replaces the guest path only if it is missing, empty, or this VM's recorded workspace:
guest-only changes in a re-prepared workspace are lost (export them first).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import secrets
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from banger.daemon.guestops import (
    Cancel,
    Emit,
    agent_for,
    chunks,
    guest_command,
    guest_entry,
    guest_run,
    run_cancellable,
    running_vm,
    thread_emitter,
)
from banger.errors import BadRequest, BangerError
from banger.guest import workspace as ws
from banger.rpc.protocol import Params

if TYPE_CHECKING:
    from banger import model
    from banger.daemon.app import Daemon
    from banger.guest.agent_client import AgentClient
    from banger.rpc.server import CallContext

log = logging.getLogger("banger.workspace")

EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
BUNDLE_TIMEOUT = 1800.0
FILES_PER_EVENT = 500
PATCH_CHUNK = 512 * 1024

# $1 staging dir, $2 bundle ("" for a repository without commits), $3 head, $4 host branch, $5 origin URL.
CLONE_SCRIPT = r"""set -eu
staging=$1 bundle=$2 head=$3 branch=$4 origin=$5
rm -rf "$staging"
if [ -n "$bundle" ]; then
    git clone --quiet --no-checkout "$bundle" "$staging"
    cd "$staging"
    git remote remove origin
    if [ -n "$branch" ]; then
        git checkout --quiet -B "$branch" "$head"
    else
        git checkout --quiet --detach "$head"
    fi
else
    git init --quiet "$staging"
    cd "$staging"
    if [ -n "$branch" ]; then git symbolic-ref HEAD "refs/heads/$branch"; fi
fi
if [ -n "$origin" ]; then git remote add origin "$origin"; fi
"""

# $1 guest path, $2 staging dir, $3 "replace" when the guest path may be replaced.
SWAP_SCRIPT = r"""set -eu
target=$1 staging=$2
if [ -e "$target" ] || [ -L "$target" ]; then
    old="$target.banger-old-$$"
    mv "$target" "$old"
    mv "$staging" "$target"
    rm -rf "$old"
else
    mv "$staging" "$target"
fi
if command -v mise >/dev/null 2>&1; then mise trust --quiet --all "$target" || true; fi
git -C "$target" rev-parse --verify --quiet 'HEAD^{commit}' || true
"""

# Reference §8.5, verbatim in substance: a throwaway index next to .git (read-tree fails across
# filesystems), every change staged into it, and the diff against the base. $1 base, $2 patch|names.
EXPORT_SCRIPT = r"""set -eu
ref=$1
tmp_idx=$(mktemp -p "$(git rev-parse --git-dir)")
trap 'rm -f "$tmp_idx"' EXIT
git read-tree "$ref" --index-output="$tmp_idx"
GIT_INDEX_FILE="$tmp_idx" git add -A
if [ "$2" = patch ]; then
    GIT_INDEX_FILE="$tmp_idx" git diff --cached "$ref" --binary --no-color --no-ext-diff
else
    GIT_INDEX_FILE="$tmp_idx" git diff --cached "$ref" --name-only -z --no-ext-diff
fi
"""


def _sh(script: str, *args: str) -> list[str]:
    return ["/bin/sh", "-c", script, "sh", *args]


# --- prepare ---------------------------------------------------------------------------------------


async def prepare(d: Daemon, ctx: CallContext, raw: dict[str, Any]) -> Any:
    p = Params(raw, allowed={"ref", "repo_root", "files", "include_untracked", "branch", "from", "guest_path"})
    vm = running_vm(d, p.get_str("ref", required=True))
    repo_root = p.get_str("repo_root", required=True)
    if not repo_root.startswith("/"):
        raise BadRequest(f"repo_root {repo_root!r} must be an absolute host path")
    include_untracked = p.get_bool("include_untracked")
    files = [ws.validate_relative(f) for f in p.get_str_list("files")] if raw.get("files") is not None else None
    branch = p.get_str("branch")
    from_ref = p.get_str("from")
    if from_ref and not branch:
        raise BadRequest("--from needs --branch (it names where the guest-only branch starts)")
    if branch:
        ws.validate_branch(branch)
    if from_ref:
        ws.validate_revision(from_ref, "--from")
    guest_path = ws.validate_guest_path(p.get_str("guest_path") or ws.DEFAULT_GUEST_PATH)
    agent = await agent_for(d, vm)
    emit = thread_emitter(ctx, asyncio.get_running_loop())
    work_dir = d.layout.cache_dir / "tmp"
    work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def work(cancel: Cancel) -> dict[str, Any]:
        return _prepare(agent, vm, Path(repo_root), files, include_untracked, branch, from_ref, guest_path,
                        work_dir, emit, cancel)

    result = await run_cancellable(work, f"workspace {vm.name}")
    record = {"guest_path": guest_path, "host_path": result["repo_root"], "head_commit": result["head_commit"],
              "host_head": result["host_head"], "branch": result["branch"], "include_untracked": include_untracked}
    await d.vms.set_workspace(vm, record)
    log.info("workspace prepared", extra={"vm": vm.name, "guest_path": guest_path, "files": result["files"]})
    return result


def _prepare(agent: AgentClient, vm: model.VmRecord, root: Path, files: list[str] | None,
             include_untracked: bool, branch: str, from_ref: str, guest_path: str, work_dir: Path,
             emit: Emit, cancel: Cancel) -> dict[str, Any]:
    def stage(name: str) -> None:
        cancel.check()
        emit({"stage": name})

    stage("inspecting the repository")
    repo, listing = ws.inspect(root, include_untracked=include_untracked)
    shipped = list(listing.shipped) if files is None else sorted(set(files))
    _check_target(agent, vm, guest_path)
    origin = _origin_url(repo.root)
    tag = secrets.token_hex(4)
    parent = str(PurePosixPath(guest_path).parent)
    staging = f"{parent}/.{PurePosixPath(guest_path).name}.banger-{tag}"
    guest_bundle = f"/tmp/banger-workspace-{tag}.bundle"
    try:
        agent.mkdir(parent, parents=True)
        with tempfile.TemporaryDirectory(dir=work_dir, prefix="workspace-") as tmp:
            bundle = ""
            if repo.head:
                stage("bundling git history")
                host_bundle = Path(tmp) / "repo.bundle"
                _bundle(repo.root, host_bundle)
                stage("copying git history")
                with open(host_bundle, "rb") as f:
                    agent.write_file(guest_bundle, chunks(f, cancel), mode=0o600)
                bundle = guest_bundle
        stage("cloning in the guest")
        guest_run(agent, _sh(CLONE_SCRIPT, staging, bundle, repo.head, repo.branch, origin), cancel,
                  what="git clone", cwd="/")
        stage(f"copying {len(shipped)} files")
        size = _ship_tree(agent, repo.root, shipped, staging, emit, cancel)
        if listing.deleted:
            guest_run(agent, ["xargs", "-0", "-r", "rm", "-f", "--"], cancel, what="removing deleted files",
                      cwd=staging, stdin=b"\0".join(os.fsencode(f) for f in listing.deleted))
        guest_branch = repo.branch
        if branch:
            stage(f"creating branch {branch}")
            guest_run(agent, ["git", "checkout", "--quiet", "-b", branch, *([from_ref] if from_ref else [])],
                      cancel, what=f"git checkout -b {branch}", cwd=staging)
            guest_branch = branch
        stage("moving into place")
        out = guest_run(agent, _sh(SWAP_SCRIPT, guest_path, staging), cancel, what="moving the workspace", cwd="/")
    except BaseException:
        with contextlib.suppress(BaseException):
            guest_run(agent, ["rm", "-rf", "--", staging, guest_bundle], Cancel(), what="cleanup", cwd="/",
                      timeout=120)
        raise
    with contextlib.suppress(BangerError):
        guest_run(agent, ["rm", "-f", "--", guest_bundle], Cancel(), what="cleanup", cwd="/", timeout=60)
    head = out.decode(errors="replace").strip().splitlines()[-1] if out.strip() else ""
    return {"repo_root": str(repo.root), "repo_name": repo.name, "guest_path": guest_path, "head_commit": head,
            "host_head": repo.head, "branch": guest_branch, "files": len(shipped), "bytes": size,
            "untracked": len(listing.untracked) if include_untracked else 0,
            "untracked_skipped": 0 if include_untracked else len(listing.untracked),
            "deleted": len(listing.deleted)}


def _check_target(agent: AgentClient, vm: model.VmRecord, guest_path: str) -> None:
    """The guest path must be missing, an empty directory, or this VM's recorded workspace."""
    entry = guest_entry(agent, guest_path)
    if entry is None:
        return
    recorded = (vm.workspace or {}).get("guest_path")
    if entry.type == "dir" and (recorded == guest_path or not agent.list_dir(guest_path)):
        return
    raise BangerError(f"guest path {vm.name}:{guest_path} already exists and is not this VM's workspace",
                      code="already_exists",
                      hint="pick another --guest-path, or remove it in the guest first")


def _origin_url(root: Path) -> str:
    from banger.system.run import run

    proc = run(["git", "remote", "get-url", "origin"], cwd=root, check=False, timeout=30)
    url = proc.stdout.decode(errors="replace").strip()
    return url if proc.returncode == 0 and "\n" not in url else ""


def _bundle(root: Path, out: Path) -> None:
    from banger.system.run import run

    run(["git", "bundle", "create", "--quiet", str(out), "--all"], cwd=root, timeout=BUNDLE_TIMEOUT)


def _ship_tree(agent: AgentClient, root: Path, files: list[str], staging: str, emit: Emit,
               cancel: Cancel) -> int:
    """Stream the files as a tar into `tar -x` in the guest; returns the bytes of file content sent."""
    if not files:
        return 0
    read_fd, write_fd = os.pipe()
    reader = os.fdopen(read_fd, "rb")
    sent = {"bytes": 0}
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            with os.fdopen(write_fd, "wb") as sink, tarfile.open(fileobj=sink, mode="w|",
                                                                 format=tarfile.PAX_FORMAT) as tar:
                for rel in files:
                    if cancel.fired:
                        return
                    _add(tar, root, rel, sent, emit)
        except BrokenPipeError:
            pass  # the guest's tar stopped reading; its exit status tells why
        except BaseException as exc:
            failure.append(exc)

    writer = threading.Thread(target=produce, daemon=True, name="workspace-tar")
    writer.start()
    try:
        out, err = bytearray(), bytearray()
        status = guest_command(agent, ["tar", "-x", "--no-same-owner", "-f", "-", "-C", staging], cancel,
                               cwd="/", stdin=reader, on_stdout=out.extend, on_stderr=err.extend)
    finally:
        reader.close()
        writer.join(30)
    if failure:
        raise failure[0]
    if status.returncode != 0:
        cancel.check()
        raise BangerError(f"unpacking the workspace failed in the guest: {err.decode(errors='replace').strip()}")
    return sent["bytes"]


def _add(tar: tarfile.TarFile, root: Path, rel: str, sent: dict[str, int], emit: Emit) -> None:
    path = root / rel
    try:
        info = tar.gettarinfo(str(path), arcname=rel)
    except FileNotFoundError:
        emit({"warning": f"{rel} vanished while copying; skipped"})
        return
    if not (info.isfile() or info.issym()):
        emit({"warning": f"{rel} is not a file or symlink; skipped"})
        return
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    if info.isfile():
        try:
            with open(path, "rb") as f:
                tar.addfile(info, f)
        except OSError as exc:
            raise BangerError(f"cannot read {str(path)!r}: {exc.strerror}") from None
        sent["bytes"] += info.size
    else:
        tar.addfile(info)


# --- export ----------------------------------------------------------------------------------------


async def export(d: Daemon, ctx: CallContext, raw: dict[str, Any]) -> Any:
    """Stream `{"patch_b64": chunk}` and `{"files": [...]}` events; return the base and the counts."""
    p = Params(raw, allowed={"ref", "base_commit", "guest_path"})
    vm = running_vm(d, p.get_str("ref", required=True))
    record = vm.workspace or {}
    guest_path = p.get_str("guest_path") or str(record.get("guest_path") or "")
    if not guest_path:
        raise BadRequest(f"vm {vm.name!r} has no workspace",
                         hint=f"prepare one (banger vm workspace prepare {vm.name} <path>) or give --guest-path")
    guest_path = ws.validate_guest_path(guest_path)
    base = p.get_str("base_commit")
    if base:
        ws.validate_revision(base, "--base-commit")
    elif record.get("guest_path") == guest_path:
        base = str(record.get("head_commit") or "") or EMPTY_TREE
    else:
        base = "HEAD"
    agent = await agent_for(d, vm)
    emit = thread_emitter(ctx, asyncio.get_running_loop())

    def work(cancel: Cancel) -> dict[str, Any]:
        return _export(agent, guest_path, base, emit, cancel)

    return await run_cancellable(work, f"export {vm.name}")


def _export(agent: AgentClient, guest_path: str, base: str, emit: Emit, cancel: Cancel) -> dict[str, Any]:
    entry = guest_entry(agent, f"{guest_path}/.git")
    if entry is None:
        raise BadRequest(f"{guest_path} in the guest is not a git working tree")
    size = {"bytes": 0}
    pending = bytearray()

    def flush(final: bool = False) -> None:
        while len(pending) >= PATCH_CHUNK or (final and pending):
            piece = bytes(pending[:PATCH_CHUNK])
            del pending[:PATCH_CHUNK]
            emit({"patch_b64": base64.b64encode(piece).decode()})

    def on_patch(data: bytes) -> None:
        size["bytes"] += len(data)
        pending.extend(data)
        flush()

    err = bytearray()
    status = guest_command(agent, _sh(EXPORT_SCRIPT, base, "patch"), cancel, cwd=guest_path,
                           on_stdout=on_patch, on_stderr=err.extend)
    if status.returncode != 0:
        cancel.check()
        detail = " | ".join(err.decode(errors="replace").strip().splitlines()[-3:])
        raise BangerError(f"git diff against {base} failed in the guest: {detail or status.returncode}")
    flush(final=True)
    names = guest_run(agent, _sh(EXPORT_SCRIPT, base, "names"), cancel, what="git diff --name-only",
                      cwd=guest_path)
    files = [os.fsdecode(n) for n in names.split(b"\0") if n]
    for batch in _batches(files, FILES_PER_EVENT):
        emit({"files": batch})
    return {"base": base, "guest_path": guest_path, "patch_bytes": size["bytes"], "file_count": len(files)}


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
