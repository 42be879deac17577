"""`banger system install|uninstall|start|stop|restart|status` for a system install.

`stop` and `status` also serve the embedded mode (no system install): they hand over to
banger.cli.system, which manages the daemon that root's banger starts on first use.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from banger.cli import output
from banger.errors import BangerError


def _say(text: str) -> None:
    print(f"banger: {text}", file=sys.stderr, flush=True)


def _meta_or_fail() -> Any:
    from banger import paths
    from banger.system import installmeta

    meta = installmeta.read()
    if meta is None:
        raise BangerError(f"there is no system install ({paths.system_install_meta()} is missing)",
                          hint="run `sudo banger system install --owner <user>`")
    return meta


def cmd_install(args: argparse.Namespace) -> int:
    from banger.system import install

    home = Path(args.owner_home) if args.owner_home else None
    tarball = Path(args.from_tarball).resolve() if args.from_tarball else None
    result = install.install(args.owner, owner_home=home, tarball=tarball, say=_say)
    m = result.meta
    supervisor = ("systemd (bangerd-root.service, bangerd.service)" if result.manager == "systemd"
                  else "banger itself: systemd is not running here; use `banger system start|stop`")
    print(output.kv_block([
        ("owner", f"{m.owner_user} (uid {m.owner_uid}, home {m.owner_home})"),
        ("version", f"v{m.version} (commit {m.commit[:8]}, built {m.built_at})"),
        ("installed in", result.version_dir),
        ("commands", ", ".join(str(p) for p in result.entry_points)),
        ("units", ", ".join(str(p) for p in result.unit_files)),
        ("supervised by", supervisor),
        ("daemon", f"answering, pid {result.daemon.get('pid')}, uid {result.daemon.get('uid')}"),
        ("database", result.migrations or "unchanged"),
        ("next", f"as {m.owner_user}: `banger doctor`, then `banger ssh-config --install`"),
    ]))
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    from banger.system import install

    result = install.uninstall(purge=args.purge, say=_say)
    pairs: list[tuple[str, Any]] = [("stopped", ", ".join(result.stopped) or "nothing was running"),
                                    ("removed", len(result.removed))]
    pairs += [("", str(p)) for p in result.removed]
    if result.kept:
        pairs.append(("kept", "(remove with --purge)"))
        pairs += [("", str(p)) for p in result.kept]
    pairs.append(("untouched", "the owner's home (ssh_config, known_hosts pins)"))
    print(output.kv_block(pairs))
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    from banger.system import install, supervise

    install.require_root("banger system start")
    svc = supervise.services(_meta_or_fail())
    states = supervise.start_all(svc)
    print(output.kv_block([(s.name, s.detail) for s in states]))
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    from banger.system import install, supervise

    install.require_root("banger system restart")
    svc = supervise.services(_meta_or_fail())
    states = supervise.restart_all(svc)
    print(output.kv_block([(s.name, s.detail) for s in states]))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from banger import paths

    if not paths.system_install_meta().exists():
        from banger.cli import system as embedded

        return embedded.cmd_stop(args)
    from banger.system import install, supervise

    install.require_root("banger system stop")
    stopped = supervise.stop_all(supervise.services(_meta_or_fail()))
    print("stopped " + (", ".join(stopped) if stopped else "nothing (not running)"))
    return 0


def _socket_line(facts: dict[str, Any]) -> str:
    if not facts.get("exists"):
        return f"{facts['path']} (absent)" if facts.get("exists") is False else f"{facts['path']} (cannot see)"
    kind = "" if facts.get("is_socket") else ", NOT A SOCKET"
    return (f"{facts['path']} (mode {facts['mode']}, uid {facts['uid']}{kind}; "
            f"directory mode {facts['dir_mode']}, uid {facts['dir_uid']})")


def cmd_status(args: argparse.Namespace) -> int:
    from banger import paths

    if not paths.system_install_meta().exists():
        from banger.cli import system as embedded

        return embedded.cmd_status(args)
    from banger.cli.lifecycle import call, target
    from banger.rpc import client
    from banger.system import install

    target()  # refuses anyone but the owner and root, with the usual one-line reason
    meta = _meta_or_fail()
    facts = install.status_facts(meta)
    daemon: Any = None
    try:
        daemon = call("system.status", autostart=False)
    except client.Unreachable as exc:
        facts["daemon_error"] = exc.message
    if daemon is not None:
        facts.update(daemon)
    if args.json:
        output.print_json(facts)
        return 0 if daemon is not None else 1
    inst = facts["install"]
    pairs: list[tuple[str, Any]] = [
        ("mode", "system"),
        ("owner", f"{inst['owner_user']} (uid {inst['owner_uid']})"),
        ("installed version", f"v{inst['version']} (commit {inst['commit'][:8]}, built {inst['built_at']})"),
        ("installed at", inst["installed_at"]),
        ("install metadata", inst["metadata"]),
        ("current", facts["current"] or "(missing)"),
        ("versions on disk", ", ".join(facts["versions"]) or "none"),
        ("supervised by", facts["supervisor"]),
    ]
    for name, st in facts["services"].items():
        pairs.append((name, st["detail"]))
    pairs.append(("daemon socket", _socket_line(facts["sockets"]["bangerd"])))
    pairs.append(("helper socket", _socket_line(facts["sockets"]["bangerd-root"])))
    if daemon is not None:
        d, h = daemon["daemon"], daemon["helper"]
        pairs.append(("daemon answers", f"v{d['version']}, pid {d['pid']}, uid {d['uid']}"))
        pairs.append(("helper answers", f"v{h['version']}, pid {h['pid']}, owner uid {h['owner_uid']}"))
        pairs.append(("operations in flight", daemon["operations_in_flight"]))
    else:
        pairs.append(("daemon answers", f"no: {facts.get('daemon_error')}"))
    for name, where in facts["logs"].items():
        pairs.append((f"{name} log", where))
    print(output.kv_block(pairs))
    return 0 if daemon is not None else 1
