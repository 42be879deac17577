"""The systemd units of a system install, and the few systemctl calls banger makes.

Two services (reference §2.5): `bangerd-root.service` (root, the privileged helper) and
`bangerd.service` (the owner daemon, `User=<owner>`). Both use `KillMode=process` and
`RuntimeDirectoryPreserve=yes`, so restarting them (as `banger update` does) neither kills the VMs they
launched nor removes the sockets directory under them; the helper also has `SendSIGKILL=no`.

`banger update` swaps the code, never these files: a change here reaches a host when
`sudo banger system install` is run again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from banger import paths
from banger.errors import BangerError

DAEMON_UNIT: Final = "bangerd.service"
HELPER_UNIT: Final = "bangerd-root.service"
UNITS: Final = {"bangerd-root": HELPER_UNIT, "bangerd": DAEMON_UNIT}

HELPER_CAPABILITIES: Final = (
    "CAP_CHOWN CAP_DAC_OVERRIDE CAP_NET_ADMIN CAP_NET_RAW CAP_SYS_ADMIN CAP_FOWNER CAP_KILL CAP_MKNOD "
    "CAP_SETGID CAP_SETUID CAP_SYS_CHROOT"
)

# Directives doctor expects in the installed units (the security posture of §3.5).
REQUIRED_DIRECTIVES: Final = {
    DAEMON_UNIT: ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=read-only", "KillMode=process",
                  "RuntimeDirectoryPreserve=yes", "RestrictSUIDSGID=yes", "LockPersonality=yes"),
    HELPER_UNIT: ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "KillMode=process",
                  "SendSIGKILL=no", "RuntimeDirectoryPreserve=yes", "RestrictSUIDSGID=yes",
                  "LockPersonality=yes", f"CapabilityBoundingSet={HELPER_CAPABILITIES}"),
}


@dataclass(frozen=True)
class UnitContext:
    owner_user: str
    owner_group: str
    owner_home: Path
    install: paths.InstallPaths
    layout: paths.Layout


def _env_lines() -> list[str]:
    prefix = paths.system_prefix()
    # A relocated install (tests, packaging) must tell its services where it lives.
    return [f"Environment=BANGER_SYSTEM_PREFIX={prefix}"] if prefix != Path("/") else []


def _quote(path: Path) -> str:
    text = str(path)
    if any(c.isspace() or c in "\"'\\;" for c in text):
        raise BangerError(f"path {text!r} cannot be used in a unit file (no spaces, quotes or ';')")
    return text


def render_daemon_unit(ctx: UnitContext) -> str:
    home = ctx.owner_home
    rw = [ctx.layout.state_dir, ctx.layout.cache_dir]
    # The owner's banger files in their home (ssh_config, known_hosts pins); `-`: fine if absent.
    home_rw = [home / ".config" / "banger", home / ".local" / "state" / "banger"]
    lines = [
        "# Written by `banger system install`; re-run it to refresh (banger update does not touch units).",
        "[Unit]",
        f"Description=banger owner daemon ({ctx.owner_user})",
        "After=network-online.target bangerd-root.service",
        "Wants=network-online.target bangerd-root.service",
        "",
        "[Service]",
        "Type=simple",
        f"User={ctx.owner_user}",
        f"Group={ctx.owner_group}",
        f"ExecStart={_quote(ctx.install.entry_point('bangerd'))} --system",
        *_env_lines(),
        "Restart=on-failure",
        "RestartSec=2",
        "KillMode=process",
        "RuntimeDirectory=banger",
        "RuntimeDirectoryMode=0700",
        "RuntimeDirectoryPreserve=yes",
        "UMask=0077",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "ReadWritePaths=" + " ".join(_quote(p) for p in rw) + " " + " ".join("-" + _quote(p) for p in home_rw),
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def render_helper_unit(ctx: UnitContext) -> str:
    # All of /run, not just /run/banger: at boot the helper starts before the daemon's runtime
    # directory exists, and a missing ReadWritePaths entry would stay read-only for its lifetime.
    rw = [ctx.layout.state_dir, ctx.layout.cache_dir, ctx.layout.runtime_dir.parent]
    lines = [
        "# Written by `banger system install`; re-run it to refresh (banger update does not touch units).",
        "[Unit]",
        "Description=banger root helper (privileged operations for bangerd)",
        "After=network-online.target",
        "Wants=network-online.target",
        "Before=bangerd.service",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={_quote(ctx.install.entry_point('bangerd-root'))} --system",
        *_env_lines(),
        "Restart=on-failure",
        "RestartSec=2",
        # VMs are children of the helper: stopping or restarting it must not take them down.
        "KillMode=process",
        "SendSIGKILL=no",
        "RuntimeDirectory=banger-root",
        "RuntimeDirectoryMode=0711",
        "RuntimeDirectoryPreserve=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "ReadWritePaths=" + " ".join("-" + _quote(p) for p in rw),
        f"CapabilityBoundingSet={HELPER_CAPABILITIES}",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def render_all(ctx: UnitContext) -> dict[str, str]:
    return {HELPER_UNIT: render_helper_unit(ctx), DAEMON_UNIT: render_daemon_unit(ctx)}


def missing_directives(unit: str, text: str) -> list[str]:
    present = {line.strip() for line in text.splitlines()}
    return [d for d in REQUIRED_DIRECTIVES.get(unit, ()) if d not in present]


# --- systemctl ------------------------------------------------------------------------------------------


def systemd_running() -> bool:
    """PID 1 is systemd (sd_booted), and the install is not relocated (a prefix is never systemd's)."""
    return paths.system_prefix() == Path("/") and Path("/run/systemd/system").is_dir()


def systemctl(*args: str, check: bool = True, timeout: float = 90) -> tuple[int, str]:
    from banger.system.run import run

    proc = run(["systemctl", *args], check=check, timeout=timeout)
    return proc.returncode, (proc.stdout or b"").decode(errors="replace").strip()


def main_pid(unit: str) -> int | None:
    code, out = systemctl("show", "--property=MainPID", "--value", unit, check=False, timeout=15)
    try:
        pid = int(out)
    except ValueError:
        return None
    return pid if code == 0 and pid > 0 else None


def is_active(unit: str) -> tuple[bool, str]:
    code, out = systemctl("is-active", unit, check=False, timeout=15)
    return code == 0, out or "unknown"
