"""`banger vm ...`"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from types import FrameType
from typing import Any

from banger.cli import output
from banger.cli.lifecycle import call


def _row(vm: dict[str, Any]) -> list[Any]:
    spec = vm.get("spec", {})
    workspace = vm.get("workspace") or {}
    return [
        vm["short_id"], vm["name"], vm["state"], vm.get("image_name", ""), vm.get("guest_ip", ""),
        spec.get("vcpu", ""), f"{spec.get('memory_mib', '')} MiB",
        output.size_short(int(spec.get("disk_size_bytes", 0))),
        workspace.get("guest_path", "-") if workspace else "-",
        str(vm.get("created_at", ""))[:19].replace("T", " "),
    ]


def cmd_list(args: argparse.Namespace) -> int:
    vms = call("vm.list")["vms"]
    if args.json:
        output.print_json(vms)
    elif args.ids:
        for vm in vms:
            print(vm["short_id"])
    else:
        output.print_table(["ID", "NAME", "STATE", "IMAGE", "IP", "VCPU", "MEM", "DISK", "WORKSPACE", "CREATED"],
                           [_row(vm) for vm in vms])
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    vm = call("vm.show", {"ref": args.vm})
    if args.json:
        output.print_json(vm)
        return 0
    spec = vm.get("spec", {})
    pairs: list[tuple[str, Any]] = [
        ("id", vm["id"]), ("name", vm["name"]), ("state", vm["state"]), ("image", vm.get("image_name")),
        ("ip", vm.get("guest_ip")), ("dns", f"{vm['name']}.vm"), ("vcpu", spec.get("vcpu")),
        ("memory", f"{spec.get('memory_mib')} MiB"),
        ("disk", output.size_short(int(spec.get("disk_size_bytes", 0)))),
        ("nat", "on" if spec.get("nat") else "off"), ("created", vm.get("created_at")),
        ("updated", vm.get("updated_at")),
    ]
    runtime = vm.get("runtime", {})
    if runtime.get("vmm"):
        pairs.append(("vmm", runtime["vmm"]))
    if runtime.get("pid"):
        pairs.append(("agent", runtime.get("agent_transport", "serial")))
    if vm.get("last_error"):
        pairs.append(("last error", vm["last_error"]))
    if vm.get("workspace"):
        pairs.append(("workspace", vm["workspace"].get("guest_path")))
    print(output.kv_block(pairs))
    return 0


# --- lifecycle -------------------------------------------------------------------------------------

def _create_params(args: argparse.Namespace) -> dict[str, Any]:
    from banger import model, units
    from banger.errors import BadRequest

    params: dict[str, Any] = {"nat": bool(args.nat)}
    if args.name:
        model.validate_vm_name(args.name)
        params["name"] = args.name
    if args.image:
        params["image"] = args.image
    for key in ("init", "vmm"):
        if getattr(args, key, None):
            params[key] = getattr(args, key)
    for flag, key in (("vcpu", "vcpu"), ("memory", "memory_mib")):
        value = getattr(args, flag)
        if value is not None:
            if value <= 0:
                raise BadRequest(f"--{flag} must be a positive number, got {value}")
            params[key] = value
    if args.disk_size is not None:
        try:
            params["disk_size_bytes"] = units.parse_size(args.disk_size)
        except ValueError as exc:
            raise BadRequest(f"--disk-size {args.disk_size!r} is not a size (e.g. 8G, 512M): {exc}") from None
    return params


def _spec_line(vm: dict[str, Any]) -> str:
    spec = vm["spec"]
    return (f"spec: {spec['vcpu']} vcpu | {spec['memory_mib']} MiB | "
            f"{output.size_short(int(spec['disk_size_bytes']))} disk | {vm['image_name']}")


def _begin_create(args: argparse.Namespace, *, start: bool = True) -> str:
    params = _create_params(args)
    if not start:
        params["no_start"] = True
    op_id: str = call("vm.create.begin", params)["op_id"]
    return op_id


def _follow_create(op_id: str) -> dict[str, Any]:
    import sys

    from banger.cli.progress import follow

    vm: dict[str, Any] = follow(op_id, "vm create")
    sys.stderr.write(_spec_line(vm) + "\n")
    return vm


def _create(args: argparse.Namespace, *, start: bool = True) -> dict[str, Any]:
    return _follow_create(_begin_create(args, start=start))


def _results(method: str, refs: list[str], verb: str) -> int:
    import sys

    results = call(method, {"refs": refs})["results"]
    failed = 0
    for r in results:
        if r["ok"]:
            print(f"{verb} {r['vm']['name'] if 'name' in r['vm'] else r['ref']}")
        else:
            failed += 1
            err = r["error"]
            hint = f"; {err['hint']}" if err.get("hint") else ""
            sys.stderr.write(f"banger: {r['ref']}: {err['message']}{hint}\n")
    return 1 if failed else 0


def cmd_create(args: argparse.Namespace) -> int:
    vm = _create(args, start=not args.no_start)
    if args.json:
        output.print_json(vm)
    else:
        print(f"{vm['name']} {vm['state']} {vm.get('guest_ip', '')}")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    return _results("vm.start", args.vms, "started")


def cmd_stop(args: argparse.Namespace) -> int:
    return _results("vm.stop", args.vms, "stopped")


def cmd_restart(args: argparse.Namespace) -> int:
    return _results("vm.restart", args.vms, "restarted")


def cmd_kill(args: argparse.Namespace) -> int:
    return _results("vm.kill", args.vms, "killed")


def cmd_delete(args: argparse.Namespace) -> int:
    return _results("vm.delete", args.vms, "deleted")


def cmd_logs(args: argparse.Namespace) -> int:
    import sys
    import time
    from pathlib import Path

    info = call("vm.logs", {"ref": args.vm})
    path = Path(info["path"])
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        sys.stdout.buffer.write(f.read())
        sys.stdout.flush()
        while args.follow:
            chunk = f.read()
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            else:
                time.sleep(0.2)
    return 0


def _ssh_info(ref: str) -> dict[str, Any]:
    info: dict[str, Any] = call("vm.ssh_info", {"ref": ref})
    return info


def _ssh_argv(info: dict[str, Any], command: list[str] | None, tty: bool) -> list[str]:
    from pathlib import Path

    from banger.guest.ssh import ssh_argv

    if info.get("control_dir"):
        Path(info["control_dir"]).mkdir(mode=0o700, parents=True, exist_ok=True)
    return ssh_argv(info["ip"], key=Path(info["key"]), known_hosts=Path(info["known_hosts"]),
                    host_alias=info["alias"], command=command or None, tty=tty,
                    control_dir=Path(info["control_dir"]) if info.get("control_dir") else None,
                    batch=command is not None and not tty)


def _wait_ssh(info: dict[str, Any]) -> None:
    import time
    from pathlib import Path

    from banger.guest.ssh import wait_for_ssh

    if info.get("control_dir"):
        Path(info["control_dir"]).mkdir(mode=0o700, parents=True, exist_ok=True)
    wait_for_ssh(info["ip"], deadline=time.monotonic() + float(info["wait_timeout"]), key=Path(info["key"]),
                 known_hosts=Path(info["known_hosts"]), alias=info["alias"], vm_name=info["name"],
                 control_dir=Path(info["control_dir"]) if info.get("control_dir") else None,
                 scan=not info.get("host_key_pinned"))


def _run_ssh(argv: list[str]) -> int:
    from banger.system import run

    proc = run.spawn(argv, stdin=None, stdout=None, stderr=None, inherit_env=True)
    try:
        return proc.wait()
    except BaseException:  # ^C, or SystemExit from _exit_on_signals: ssh must not outlive us
        proc.terminate()
        proc.wait()
        raise


def _say(text: str) -> None:
    """A line on stderr that may go nowhere: after a hangup the terminal is gone (EIO)."""
    import sys

    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


def _ignore_exit_signals() -> None:
    """From here on SIGHUP and SIGTERM cannot cut a clean-up short (_exit_on_signals restores them)."""
    import signal

    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def _exit_on_signals() -> Iterator[None]:
    """SIGHUP (the terminal was closed) and SIGTERM become SystemExit(128 + signal) while this is active,
    so `finally` blocks run: `vm run --rm` deletes its VM instead of dying on the spot. After the first
    one, both are ignored so that the clean-up can finish. A SIGHUP already ignored (nohup) stays so."""
    import signal

    def handler(signum: int, _frame: FrameType | None) -> None:
        _ignore_exit_signals()
        raise SystemExit(128 + signum)

    previous: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGHUP, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _reminder(name: str) -> None:
    import sys

    try:
        vm = call("vm.show", {"ref": name}, autostart=False)
    except Exception:
        return
    if vm.get("state") == "running":
        sys.stderr.write(f"vm {name} is still running (stop with `banger vm stop {name}`, "
                         f"remove with `banger vm delete {name}`)\n")


def cmd_ssh(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from banger.guest import knownhosts

    info = _ssh_info(args.vm)
    if not knownhosts.lookup(Path(info["known_hosts"]), info["alias"]):
        _wait_ssh(info)  # first contact: pin the host key (trust on first use)
    command = list(args.command_argv or [])
    tty = not command or (sys.stdin.isatty() and sys.stdout.isatty())
    rc = _run_ssh(_ssh_argv(info, command, tty))
    if not command:
        _reminder(info["name"])
    return rc


def _delete_when_created(op_id: str, name: str | None) -> None:
    """`vm run --rm` was interrupted while its VM was being created. The daemon carries on (a create
    cannot be cancelled), so wait for the end of the create and delete the VM, as --rm promises."""
    from banger.cli.progress import follow
    from banger.errors import BangerError

    _ignore_exit_signals()
    _say("\nbanger: interrupted; deleting the VM as soon as it is created (Ctrl-C again to leave it)")
    try:
        vm = follow(op_id, "vm create", quiet=True)
    except BangerError:
        return  # the create failed, and a failed create leaves nothing behind
    except KeyboardInterrupt:
        _say(f"banger: left the VM {name + ' ' if name else ''}being created; `banger vm list` shows it")
        return
    try:
        call("vm.delete", {"refs": [vm["name"]]}, timeout=60)
    except KeyboardInterrupt:
        _say(f"banger: interrupted while deleting {vm['name']}; run `banger vm delete {vm['name']}`")


def cmd_run(args: argparse.Namespace) -> int:
    with _exit_on_signals():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    import sys

    from banger.errors import BadRequest, BangerError

    command = list(args.command_argv or [])
    if args.detach and args.rm:
        raise BadRequest("-d/--detach and --rm cannot be combined (a detached VM is meant to stay)")
    if args.detach and command:
        raise BadRequest("-d/--detach cannot run a command; drop `-- <cmd>` or drop -d")
    from banger.cli.workspace import in_workspace, run_preflight, run_prepare, shell_in

    workspace = run_preflight(args)  # `vm run ./repo`: every host check before any VM exists
    if workspace is not None and args.dry_run:
        return 0
    op_id = _begin_create(args)
    try:
        vm = _follow_create(op_id)
    except (KeyboardInterrupt, SystemExit):  # SystemExit: SIGHUP or SIGTERM, see _exit_on_signals
        if args.rm:
            _delete_when_created(op_id, args.name)
        raise
    name = vm["name"]
    try:
        if workspace is not None:
            run_prepare(workspace, name, args, background=not command and not args.detach)
        tty = not command or (sys.stdin.isatty() and sys.stdout.isatty())
        if command and not tty:
            from banger.cli.agentrun import run_via_agent

            rc = run_via_agent(vm, command, workspace.guest_path if workspace is not None else "/root")
            if rc is not None:
                return rc
        info = _ssh_info(name)
        try:
            _wait_ssh(info)
        except BangerError as exc:
            args.rm = False  # keep the VM for a post-mortem
            raise BangerError(
                f"vm {name} booted but SSH did not come up: {exc.message}",
                hint=f"sshd is the likely suspect: see `banger vm logs {name}`; the VM is still running "
                     f"for inspection (`banger vm delete {name}` to clean up)") from None
        if args.detach:
            print(f"{name} is running at {vm['guest_ip']} ({name}.vm); connect with `banger vm ssh {name}`")
            return 0
        remote = command
        if workspace is not None:
            remote = in_workspace(command, workspace.guest_path) if command else \
                shell_in(workspace.guest_path)
        rc = _run_ssh(_ssh_argv(info, remote, tty))
        if not args.rm and not command:
            _reminder(name)
        return rc
    finally:
        if args.rm:
            _ignore_exit_signals()  # a terminal closed right after the session must not stop the delete
            try:
                call("vm.delete", {"refs": [name]}, timeout=60)
            except KeyboardInterrupt:
                _say(f"banger: interrupted while deleting {name}; run `banger vm delete {name}`")


def cmd_set(args: argparse.Namespace) -> int:
    from banger import units
    from banger.errors import BadRequest

    params: dict[str, Any] = {"ref": args.vm}
    if args.vcpu is not None:
        params["vcpu"] = args.vcpu
    if args.memory is not None:
        params["memory_mib"] = args.memory
    if args.disk_size is not None:
        try:
            params["disk_size_bytes"] = units.parse_size(args.disk_size)
        except ValueError as exc:
            raise BadRequest(f"--disk-size {args.disk_size!r} is not a size (e.g. 8G, 512M): {exc}") from None
    if args.nat is not None:
        params["nat"] = args.nat
    if len(params) == 1:
        raise BadRequest("nothing to set; give --vcpu, --memory, --disk-size, --nat or --no-nat")
    vm = call("vm.set", params)
    print(_spec_line(vm) + (" | nat" if vm["spec"].get("nat") else ""))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    import sys

    from banger.errors import BadRequest

    victims = call("vm.prune", {"dry_run": True})["vms"]
    if not victims:
        print("nothing to prune (no stopped, created or failed VMs)")
        return 0
    if not args.force:
        output.print_table(["ID", "NAME", "STATE", "IMAGE"],
                           [[v["short_id"], v["name"], v["state"], v["image_name"]] for v in victims])
        if not sys.stdin.isatty():
            raise BadRequest("refusing to delete without confirmation on a non-interactive stdin; use -f")
        answer = input(f"delete these {len(victims)} VM(s)? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            print("nothing deleted")
            return 1
    deleted = call("vm.prune", {})["vms"]
    for v in deleted:
        print(f"deleted {v['name']}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    import sys

    results = call("vm.stats", {"refs": args.vms})["results"]
    rows = [r["vm"] for r in results if r["ok"]]
    for r in results:
        if not r["ok"]:
            sys.stderr.write(f"banger: {r['ref']}: {r['error']['message']}\n")
    if args.json:
        output.print_json(rows)
    else:
        def size(v: Any) -> str:
            return output.human_bytes(int(v)) if v is not None else "-"

        output.print_table(
            ["NAME", "STATE", "VCPU", "CPU TIME", "RSS", "UPTIME", "OVERLAY", "WORK DISK"],
            [[s["name"], s["state"], s["vcpu"],
              f"{s['cpu_seconds']:.1f}s" if s.get("cpu_seconds") is not None else "-",
              size(s.get("rss_bytes")),
              f"{s['uptime_seconds']:.0f}s" if s.get("uptime_seconds") is not None else "-",
              size(s.get("overlay_bytes")), size(s.get("work_disk_bytes"))] for s in rows])
    return 1 if len(rows) != len(results) else 0
