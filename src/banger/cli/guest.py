"""`banger vm exec`, `vm cp`, `vm ports`, `vm workspace prepare|export`, and the workspace part of `vm run`.

`vm exec` runs argv as given (no shell: use `-- sh -c '...'` for shell syntax) through the guest agent,
streaming output as it comes and exiting with the command's status (128 + N for signal N). A stdin that
is not a terminal is read (at most 64 MiB) and sent. Without an agent it falls back to SSH; `-t` asks
for SSH with a terminal directly.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from banger.cli import output
from banger.cli.lifecycle import call
from banger.errors import BadRequest, BangerError, NotFound

MAX_STDIN = 64 << 20
INLINE_STDIN = 2 << 20  # base64 of this fits one request line (4 MiB) with room to spare
INLINE_FILES = 3 << 20
_VM_REF = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _err(text: str) -> None:
    sys.stderr.write(f"banger: {text}\n")
    sys.stderr.flush()


# --- vm exec ---------------------------------------------------------------------------------------

def _parse_env(pairs: list[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs or ():
        name, sep, value = pair.partition("=")
        if not sep or not _ENV_NAME.match(name):
            raise BadRequest(f"--env {pair!r} must be NAME=value (NAME: letters, digits, '_')")
        env[name] = value
    return env


def _read_stdin() -> bytes | None:
    if sys.stdin is None or sys.stdin.closed or sys.stdin.isatty():
        return None
    data = sys.stdin.buffer.read(MAX_STDIN + 1)
    if len(data) > MAX_STDIN:
        raise BadRequest(f"stdin is larger than {MAX_STDIN >> 20} MiB; `banger vm exec` takes at most that",
                         hint="copy large inputs with `banger vm cp` and read the file in the guest")
    return data or None


def _spool(data: bytes) -> Path:
    """Stdin too large for one request line goes through a file in the daemon's runtime directory."""
    import tempfile

    from banger import paths
    from banger.cli.lifecycle import target

    runtime = target().layout.runtime_dir
    paths.ensure_private_dir(runtime)
    spool = runtime / "spool"
    spool.mkdir(mode=0o700, exist_ok=True)
    owner = runtime.stat().st_uid
    fd, name = tempfile.mkstemp(prefix="stdin-", dir=spool)
    with os.fdopen(fd, "wb") as f:
        if os.getuid() == 0 and owner != 0:  # root calling a system daemon that runs as its owner
            os.chown(spool, owner, -1)
            os.fchown(f.fileno(), owner, -1)
        f.write(data)
    return Path(name)


def _vm_record(ref: str) -> dict[str, Any]:
    vm: dict[str, Any] = call("vm.show", {"ref": ref})
    return vm


def _check_workspace(vm: dict[str, Any], auto_prepare: bool) -> None:
    """Host HEAD against the HEAD the workspace was prepared from: warn, or re-sync with --auto-prepare."""
    from banger.guest import workspace as ws

    record = vm.get("workspace") or {}
    host_path = record.get("host_path")
    if not host_path:
        if auto_prepare:
            raise BadRequest(f"vm {vm['name']!r} has no workspace to re-sync",
                             hint=f"prepare one: banger vm workspace prepare {vm['name']} <path>")
        return
    prepared = record.get("host_head", record.get("head_commit", ""))
    now = ws.host_head(host_path)
    if not now or now == prepared:
        return
    if not auto_prepare:
        _err(f"warning: vm {vm['name']}'s workspace was prepared from {prepared[:12] or '(no commit)'}, "
             f"but {host_path} is now at {now[:12]}; --auto-prepare re-syncs it")
        return
    sys.stderr.write(f"workspace: {host_path} moved to {now[:12]}; re-syncing\n")
    repo, files = ws.inspect(host_path, include_untracked=bool(record.get("include_untracked")))
    prepare_rpc(vm["name"], repo, files, guest_path=record.get("guest_path") or ws.DEFAULT_GUEST_PATH)


def cmd_exec(args: argparse.Namespace) -> int:
    command = list(args.command_argv or [])
    if not command:
        raise BadRequest("give the command after `--`, e.g. banger vm exec dev -- uname -a")
    env = _parse_env(args.env)
    if args.guest_path is not None and not args.guest_path.startswith("/"):
        raise BadRequest(f"--guest-path {args.guest_path!r} must be an absolute guest path")
    vm = _vm_record(args.vm)
    _check_workspace(vm, args.auto_prepare)
    cwd = args.guest_path or (vm.get("workspace") or {}).get("guest_path") or "/root"
    if args.tty:
        return _exec_ssh(vm["name"], command, cwd, env, tty=True, stdin=None)
    stdin = None if args.no_stdin else _read_stdin()
    params: dict[str, Any] = {"ref": vm["name"], "argv": command, "env": env, "cwd": cwd}
    if args.timeout is not None:
        if args.timeout <= 0:
            raise BadRequest(f"--timeout must be a positive number of seconds, got {args.timeout}")
        params["timeout"] = args.timeout
    spool: Path | None = None
    if stdin is not None and len(stdin) > INLINE_STDIN:
        spool = _spool(stdin)
        params["stdin_path"] = str(spool)
    elif stdin is not None:
        params["stdin_b64"] = base64.b64encode(stdin).decode()
    try:
        result = call("vm.exec", params, on_event=_write_output)
    except BangerError as exc:
        if exc.code == "not_found" and "command not found" in exc.message:
            _err(exc.message)
            return 127
        raise
    finally:
        if spool is not None:
            spool.unlink(missing_ok=True)
    if result.get("agent_unavailable"):
        _err(f"warning: the guest agent is not available ({result.get('reason')}); using ssh")
        # Like the agent path: the command gets what was read from stdin, or an empty stdin.
        return _exec_ssh(vm["name"], command, str(result.get("cwd") or cwd), env, tty=False, stdin=stdin or b"")
    if result.get("timed_out"):
        _err(f"the command timed out after {args.timeout}s and was killed")
    if result.get("exit_code") is not None:
        return int(result["exit_code"])
    return 128 + int(result.get("signal") or 0)


def _write_output(event: dict[str, Any]) -> None:
    for key, stream in (("stdout", sys.stdout), ("stderr", sys.stderr)):
        data = event.get(key)
        if isinstance(data, str):
            stream.flush()
            stream.buffer.write(base64.b64decode(data))
            stream.buffer.flush()


def _exec_ssh(ref: str, command: list[str], cwd: str, env: dict[str, str], *, tty: bool,
              stdin: bytes | None) -> int:
    import subprocess

    from banger.cli.vm import _run_ssh, _ssh_argv, _ssh_info, _wait_ssh
    from banger.guest import knownhosts
    from banger.system import run

    info = _ssh_info(ref)
    if not knownhosts.lookup(Path(info["known_hosts"]), info["alias"]):
        _wait_ssh(info)  # first contact: pin the host key
    assignments = [f"{k}={v}" for k, v in env.items()]
    remote = ["sh", "-c", 'cd "$1" || exit 1; shift; exec "$@"', "sh", cwd,
              *(["env", *assignments] if assignments else []), *command]
    argv = _ssh_argv(info, remote, tty)
    if stdin is None:
        return _run_ssh(argv)
    proc = run.spawn(argv, stdin=subprocess.PIPE, stdout=None, stderr=None, inherit_env=True)
    try:
        proc.communicate(stdin)
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    return proc.returncode


# --- vm cp -----------------------------------------------------------------------------------------

def split_remote(arg: str) -> tuple[str | None, str]:
    """`<vm>:<path>` → (vm, path); anything else is a host path (write ./a:b for a host path with a colon)."""
    if arg.startswith(("/", ".", "~")):
        return None, arg
    head, sep, rest = arg.partition(":")
    if sep and _VM_REF.match(head):
        return head, rest
    return None, arg


def _guest_abs(path: str) -> str:
    if not path:
        return "/root"
    return path if path.startswith("/") else f"/root/{path}"


def _host_abs(path: str) -> str:
    absolute = os.path.abspath(os.path.expanduser(path))
    return absolute + "/" if path.endswith("/") and absolute != "/" else absolute


def _print_skip(event: dict[str, Any]) -> None:
    if event.get("kind") == "skip" or "warning" in event:
        _err(f"warning: {event.get('message') or event.get('warning')}")


def cmd_cp(args: argparse.Namespace) -> int:
    src_vm, src = split_remote(args.src)
    dst_vm, dst = split_remote(args.dst)
    if (src_vm is None) == (dst_vm is None):
        raise BadRequest("exactly one of the two paths must be in a VM, written <vm>:<path>",
                         hint="e.g. banger vm cp ./dir dev:/root/dir, or banger vm cp dev:/etc/hostname .")
    if src_vm is None:
        host = _host_abs(src)
        if not os.path.lexists(host):
            raise NotFound(f"cannot copy {src!r}: no such file or directory")
        call("vm.cp.push", {"ref": dst_vm, "src": host.rstrip("/") or "/", "dst": _guest_abs(dst)},
             on_event=_print_skip)
        return 0
    guest = _guest_abs(src).rstrip("/") or "/"
    receiver = _Receiver(os.path.basename(guest) or "root", dst, src_vm)
    try:
        call("vm.cp.pull", {"ref": src_vm, "src": guest}, on_event=receiver.on_event)
    except BaseException:
        receiver.abort()
        raise
    receiver.finish()
    return 0


class _Receiver:
    """Writes the events of `vm.cp.pull` under the host destination (the CLI writes, not the daemon:
    the daemon may not be able to write the owner's directories)."""

    def __init__(self, name: str, dst: str, vm: str) -> None:
        self.name = name
        self.dst_raw = dst
        self.dst = Path(_host_abs(dst))
        self.vm = vm
        self.root: Path | None = None
        self.created: list[tuple[Path, int]] = []
        self.current: tuple[str, Path, Any] | None = None

    def _root(self) -> Path:
        if self.root is None:
            if self.dst.is_dir():
                self.root = self.dst / self.name
            elif self.dst_raw.endswith("/"):
                raise NotFound(f"host directory {self.dst} does not exist")
            elif not self.dst.parent.is_dir():
                raise NotFound(f"host directory {self.dst.parent} does not exist")
            else:
                self.root = self.dst
        return self.root

    def _path(self, rel: str) -> Path:
        parts = rel.split("/") if rel else []
        if any(p in ("", ".", "..") for p in parts):
            raise BangerError(f"the daemon sent an unsafe path {rel!r}; nothing written for it")
        return self._root().joinpath(*parts)

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind == "skip" or "warning" in event:
            _print_skip(event)
        elif kind == "dir":
            path = self._path(str(event.get("path", "")))
            if path.is_symlink() or (path.exists() and not path.is_dir()):
                raise BangerError(f"cannot overwrite non-directory {path} with a directory from {self.vm}")
            if not path.exists():
                path.mkdir(mode=0o700)
                self.created.append((path, int(event.get("mode", 0o755))))
        elif kind == "file":
            self._file(event)

    def _file(self, event: dict[str, Any]) -> None:
        rel = str(event.get("path", ""))
        if self.current is None or self.current[0] != rel:
            self._close()
            path = self._path(rel)
            if path.is_dir() and not path.is_symlink():
                raise BangerError(f"cannot overwrite directory {path} with a file from {self.vm}")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            self.current = (rel, path, os.fdopen(fd, "wb"))
        handle = self.current[2]
        handle.write(base64.b64decode(str(event.get("data_b64", ""))))
        if event.get("eof"):
            # Set-id bits are dropped: a guest must not hand the host a set-id file (the CLI may be root).
            os.fchmod(handle.fileno(), int(event.get("mode", 0o644)) & 0o1777)
            self._close()

    def _close(self) -> None:
        if self.current is not None:
            self.current[2].close()
            self.current = None

    def abort(self) -> None:
        """A half-written file is removed; whole files and directories stay."""
        if self.current is not None:
            _, path, handle = self.current
            handle.close()
            path.unlink(missing_ok=True)
            self.current = None

    def finish(self) -> None:
        self._close()
        for path, mode in reversed(self.created):  # deepest first: a read-only parent set last
            os.chmod(path, mode & 0o1777)


# --- vm ports --------------------------------------------------------------------------------------

def cmd_ports(args: argparse.Namespace) -> int:
    vms = call("vm.ports", {"refs": list(args.vms or [])})["vms"]
    if args.json:
        output.print_json(vms)
    else:
        rows = []
        for vm in vms:
            for port in vm.get("ports", []) if vm["ok"] else []:
                rows.append([vm["name"], port["proto"], port["port"], ",".join(port["processes"]) or "-",
                             port["endpoint"], port.get("url") or "-"])
        if rows:
            output.print_table(["VM", "PROTO", "PORT", "PROCESS", "ENDPOINT", "URL"], rows)
        elif not vms:
            print("no running VMs")
    failed = [vm for vm in vms if not vm["ok"]]
    for vm in failed:
        err = vm["error"]
        _err(f"{vm['ref']}: {err['message']}" + (f"; {err['hint']}" if err.get("hint") else ""))
    return 1 if failed else 0


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
