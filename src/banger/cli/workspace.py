"""`banger vm workspace prepare|export`, and the workspace part of `vm run ./repo`.

A workspace is a git repository shipped into a VM (`vm.workspace.prepare`); `export` brings the guest's
changes back as a patch. `vm run <path>` does every host check here before a VM is created, then ships
the workspace and starts the tooling bootstrap once it is up.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from banger.cli import output
from banger.cli.lifecycle import call
from banger.errors import BadRequest, BangerError

INLINE_FILES = 3 << 20


def _err(text: str) -> None:
    sys.stderr.write(f"banger: {text}\n")
    sys.stderr.flush()


# --- vm workspace ----------------------------------------------------------------------------------

def _stage_printer(event: dict[str, Any]) -> None:
    if "stage" in event:
        sys.stderr.write(f"workspace: {event['stage']}\n")
        sys.stderr.flush()
    elif "warning" in event:
        _err(f"warning: {event['warning']}")


def prepare_rpc(ref: str, repo: Any, files: Any, *, guest_path: str, branch: str = "", from_ref: str = "") -> Any:
    import json

    shipped = list(files.shipped)
    params: dict[str, Any] = {"ref": ref, "repo_root": str(repo.root), "include_untracked": files.include_untracked,
                              "guest_path": guest_path}
    if len(json.dumps(shipped)) < INLINE_FILES:  # else the daemon lists the same files itself
        params["files"] = shipped
    if branch:
        params["branch"] = branch
    if from_ref:
        params["from"] = from_ref
    return call("vm.workspace.prepare", params, on_event=_stage_printer)


@dataclass(frozen=True)
class RunWorkspace:
    """What `vm run <path>` checked before creating the VM."""

    repo: Any
    files: Any
    plan: Any
    guest_path: str
    branch: str
    from_ref: str


def _check_flags(args: argparse.Namespace) -> None:
    if args.from_ref and not args.branch:
        raise BadRequest("--from needs --branch (it names where the guest-only branch starts)")
    from banger.guest import workspace as ws

    if args.branch:
        ws.validate_branch(args.branch)
    if args.from_ref:
        ws.validate_revision(args.from_ref, "--from")


def cmd_workspace_prepare(args: argparse.Namespace) -> int:
    from banger.guest import workspace as ws

    _check_flags(args)
    guest_path = ws.validate_guest_path(args.guest_path or ws.DEFAULT_GUEST_PATH)
    repo, files = ws.inspect(args.path, include_untracked=args.include_untracked)
    if args.dry_run:  # no VM, no RPC
        print("\n".join(ws.dry_run_lines(repo, files, guest_path, args.vm)))
        return 0
    notice = files.skipped_notice()
    if notice:
        sys.stderr.write(notice + "\n")
    result = prepare_rpc(args.vm, repo, files, guest_path=guest_path, branch=args.branch or "",
                         from_ref=args.from_ref or "")
    if args.json:
        output.print_json(result)
    else:
        head = result["head_commit"][:12] or "(no commits)"
        print(f"{args.vm}:{result['guest_path']} ← {result['repo_root']} ({result['files']} files, "
              f"branch {result['branch'] or '(detached)'}, HEAD {head})")
    return 0


def cmd_workspace_export(args: argparse.Namespace) -> int:
    patch = bytearray()
    files: list[str] = []

    def collect(event: dict[str, Any]) -> None:
        if "patch_b64" in event:
            patch.extend(base64.b64decode(event["patch_b64"]))
        elif "files" in event:
            files.extend(event["files"])

    params: dict[str, Any] = {"ref": args.vm}
    if args.base_commit:
        params["base_commit"] = args.base_commit
    if args.guest_path:
        params["guest_path"] = args.guest_path
    result = call("vm.workspace.export", params, on_event=collect)
    if args.output:
        _write_file(Path(args.output), bytes(patch))
    else:
        sys.stdout.buffer.write(patch)
        sys.stdout.buffer.flush()
    noun = "file" if len(files) == 1 else "files"
    sys.stderr.write(f"workspace export: {len(files)} changed {noun} against {result['base'][:12]} "
                     f"({len(patch)} bytes of patch){' -> ' + args.output if args.output else ''}\n")
    return 0


def _write_file(path: Path, data: bytes) -> None:
    """Whole or not at all: a temp file next to `path`, then a rename."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- vm run <path> ---------------------------------------------------------------------------------

def run_preflight(args: argparse.Namespace) -> RunWorkspace | None:
    """Everything `vm run` checks on the host before creating a VM; None without a path."""
    from banger.guest import tooling
    from banger.guest import workspace as ws

    if args.path is None:
        flags = [f for f, on in (("--include-untracked", args.include_untracked), ("--dry-run", args.dry_run),
                                 ("--branch", args.branch), ("--from", args.from_ref),
                                 ("--guest-path", args.guest_path), ("--no-bootstrap", args.no_bootstrap)) if on]
        if flags:
            raise BadRequest(f"{', '.join(flags)} only go with a workspace path: banger vm run ./repo ...")
        return None
    _check_flags(args)
    guest_path = ws.validate_guest_path(args.guest_path or ws.DEFAULT_GUEST_PATH)
    repo, files = ws.inspect(args.path, include_untracked=args.include_untracked)
    plan = tooling.build_plan(repo.root)
    if args.dry_run:
        print("\n".join(ws.dry_run_lines(repo, files, guest_path, args.name or "<new vm>")))
        for line in plan.summary():
            print(f"tooling: {line}")
        return RunWorkspace(repo, files, plan, guest_path, args.branch or "", args.from_ref or "")
    reason = tooling.refusal(plan, nat=bool(args.nat), no_bootstrap=bool(args.no_bootstrap))
    if reason:
        raise BadRequest(reason)
    notice = files.skipped_notice()
    if notice:
        sys.stderr.write(notice + "\n")
    return RunWorkspace(repo, files, plan, guest_path, args.branch or "", args.from_ref or "")


def run_prepare(w: RunWorkspace, name: str, args: argparse.Namespace, *, background: bool) -> None:
    """Ship the workspace into the new VM, then the tooling bootstrap (best effort)."""
    from banger.guest import tooling

    prepare_rpc(name, w.repo, w.files, guest_path=w.guest_path, branch=w.branch, from_ref=w.from_ref)
    plan = w.plan
    if plan.empty or args.no_bootstrap:
        return
    if not args.nat:
        steps = ", ".join(f"{s.tool}@{s.version}" for s in plan.steps)
        sys.stderr.write(f"tooling: not installing {steps}: the VM has no outbound network (add --nat)\n")
        return
    script = tooling.render_script(plan, w.guest_path, name)
    argv = ["sh", "-c", 'nohup bash -c "$1" >/dev/null 2>&1 &', "sh", script] if background \
        else ["bash", "-c", script]
    try:
        result = call("vm.exec", {"ref": name, "argv": argv, "cwd": w.guest_path})
    except BangerError as exc:
        _err(f"warning: tooling bootstrap did not run: {exc.message}")
        return
    if result.get("agent_unavailable"):
        _err("warning: tooling bootstrap did not run: the guest agent is not available")
        return
    sys.stderr.write(f"tooling: {'running in the background; ' if background else ''}"
                     f"log in {name}:{tooling.log_path(name)}\n")


def in_workspace(command: list[str], guest_path: str) -> list[str]:
    """`vm run ./repo -- cmd`: the command runs in the workspace."""
    return ["sh", "-c", 'cd "$1" || exit 1; shift; exec "$@"', "sh", guest_path, *command]


def shell_in(guest_path: str) -> list[str]:
    """`vm run ./repo`: an interactive login shell that starts in the workspace."""
    import shlex

    return ["bash", "-c", f"cd {shlex.quote(guest_path)} && exec bash -l"]
