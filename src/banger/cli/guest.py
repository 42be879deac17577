"""`banger vm exec`, `vm cp` and `vm ports` (`vm workspace` and `vm run ./repo` are in cli/workspace.py).

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
from pathlib import Path
from typing import Any

from banger.cli import output
from banger.cli.lifecycle import call
from banger.cli.workspace import prepare_rpc
from banger.errors import BadRequest, BangerError, NotFound

MAX_STDIN = 64 << 20
INLINE_STDIN = 2 << 20  # base64 of this fits one request line (4 MiB) with room to spare
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
