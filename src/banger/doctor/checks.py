"""The checks `banger doctor` runs.

Each check is a plain function `check_xxx(ctx) -> CheckResult`, listed in `CHECKS` in report order.
This module holds the shared types and the basic rows; the rows about host binaries, a system install
and the host's runtime state live in tool_checks, install_checks and host_checks.
Checks are strictly read-only: they look at files, run `--version`-style commands and the KVM probe,
and never create, open for writing, or fix anything. Classification that is worth testing on its own
(version ranges, the KVM verdict) lives in small pure functions next to the check that uses it.
"""

from __future__ import annotations

import os
import platform
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

from banger import buildinfo, paths
from banger.buildinfo import BuildInfo
from banger.paths import Layout
from banger.system import kvm_probe
from banger.system.kvm_probe import KvmProbe

Status = Literal["PASS", "WARN", "FAIL"]


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    summary: str
    details: tuple[str, ...] = ()
    hint: str | None = None


# (field, value, provenance), e.g. ("vcpu", 4, "host heuristic"); resolved by the caller from config.
VmDefaultsRow = tuple[str, object, str]


@dataclass(frozen=True)
class DoctorContext:
    layout: Layout
    vm_defaults_rows: Sequence[VmDefaultsRow] = ()
    # Returns a one-line schema status for a readable, compatible store; raises when it is unreadable or
    # incompatible. Provided by banger.store (opened read-only). None: only the file header is checked.
    store_inspector: Callable[[Path], str] | None = None
    firecracker_bin: str | None = None  # configured path; None: look it up on PATH
    qemu_bin: str = "qemu-system-x86_64"
    vhost_vsock_bin: str | None = None  # configured path; None: look it up on PATH
    bridge_name: str = "br-fc"
    tap_pool_size: int = 4
    now: Callable[[], float] = time.time  # wall clock, for ages shown in details
    build: BuildInfo = field(default_factory=buildinfo.current)
    kvm_probe_timeout: float = 2.0


# --- architecture ---------------------------------------------------------------------------------------


def architecture_result(machine: str) -> CheckResult:
    if machine == "x86_64":
        return CheckResult("architecture", "PASS", "x86_64")
    return CheckResult(
        "architecture",
        "FAIL",
        f"unsupported architecture {machine!r}; banger runs only on x86_64",
        hint="use an x86_64 host",
    )


def check_architecture(ctx: DoctorContext) -> CheckResult:
    return architecture_result(platform.machine())


# --- banger version -------------------------------------------------------------------------------------


def _age(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n != 1 else ''} ago"
    return "just now"


def version_result(build: BuildInfo, meta_path: Path, now: float) -> CheckResult:
    """Compare this CLI's build with the system install's metadata (install.toml), if there is one."""
    import tomllib

    name = "banger version"
    mine = f"v{build.version} (commit {build.commit[:8]})"
    if not meta_path.exists():
        return CheckResult(name, "PASS", mine, ("no system install",))
    try:
        meta = tomllib.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return CheckResult(
            name,
            "WARN",
            f"{mine}; cannot read install metadata {meta_path}: {exc}",
            hint="re-run `sudo banger system install`",
        )
    installed = meta.get("version")
    details = [f"install metadata: {meta_path}"]
    if isinstance(installed, str):
        details.append(f"installed version: v{installed}")
    installed_at = meta.get("installed_at")
    if isinstance(installed_at, datetime) and installed_at.tzinfo is not None:
        details.append(f"installed at {installed_at.isoformat()} ({_age(now - installed_at.timestamp())})")
    elif installed_at is not None:
        details.append(f"installed at {installed_at}")
    if not isinstance(installed, str):
        return CheckResult(
            name,
            "WARN",
            f"{mine}; install metadata has no version",
            tuple(details),
            hint="re-run `sudo banger system install`",
        )
    if installed == build.version:
        return CheckResult(name, "PASS", f"{mine}, same as the system install", tuple(details))
    if build.commit == "unknown":
        # A source checkout always differs from a release; warning about that would be noise.
        details.append("development build: drift check skipped")
        return CheckResult(name, "PASS", mine, tuple(details))
    return CheckResult(
        name,
        "WARN",
        f"this CLI is v{build.version} but the system install is v{installed}",
        tuple(details),
        hint="run `sudo banger system install` (or `banger update`) so the CLI and the services match",
    )


def check_banger_version(ctx: DoctorContext) -> CheckResult:
    return version_result(ctx.build, paths.system_install_meta(), ctx.now())


# --- state store ----------------------------------------------------------------------------------------

SQLITE_MAGIC = b"SQLite format 3\x00"


def check_state_store(ctx: DoctorContext) -> CheckResult:
    name = "state store"
    db = ctx.layout.db_path
    try:
        st = db.stat()
    except FileNotFoundError:
        return CheckResult(name, "PASS", "fresh install (no database yet)", (str(db),))
    except OSError as exc:
        return CheckResult(name, "FAIL", f"cannot stat {db}: {exc.strerror or exc}")
    if not stat.S_ISREG(st.st_mode):
        return CheckResult(name, "FAIL", f"{db} is not a regular file", hint="move it away and retry")
    if ctx.store_inspector is not None:
        try:
            status = ctx.store_inspector(db)
        except Exception as exc:  # the inspector is another package's code; any failure is the verdict
            return CheckResult(name, "FAIL", f"cannot use {db}: {exc}", (str(db),))
        return CheckResult(name, "PASS", status, (str(db),))
    try:
        with db.open("rb") as f:
            header = f.read(len(SQLITE_MAGIC))
    except OSError as exc:
        return CheckResult(name, "FAIL", f"cannot read {db}: {exc.strerror or exc}", (str(db),))
    if header != SQLITE_MAGIC and st.st_size > 0:
        return CheckResult(name, "FAIL", f"{db} is not an SQLite database", (str(db),))
    return CheckResult(name, "PASS", "database present (schema not checked)", (str(db),))


# --- hardware virtualization ----------------------------------------------------------------------------

_KVM_HINTS: dict[str, str] = {
    "absent": "enable virtualization in the firmware and load kvm_intel or kvm_amd",
    "no-access": "add your user to the kvm group and log in again",
    "pvm": "this host's KVM is PVM: it runs only PVM-enabled guest kernels at speed",
}


def kvm_result(probe: KvmProbe) -> CheckResult:
    name = "hardware virtualization"
    if probe.usable:
        return CheckResult(name, "PASS", probe.reason, probe.details())
    # TCG still boots VMs, so an unusable KVM is a warning, not a failure.
    return CheckResult(
        name,
        "WARN",
        f"KVM unusable here: {probe.reason}; VMs will use QEMU with software emulation (TCG), slower",
        probe.details(),
        hint=_KVM_HINTS.get(probe.kind),
    )


def check_hardware_virtualization(ctx: DoctorContext) -> CheckResult:
    return kvm_result(kvm_probe.probe_kvm(ctx.kvm_probe_timeout))


# --- vm defaults ----------------------------------------------------------------------------------------


def check_vm_defaults(ctx: DoctorContext) -> CheckResult:
    name = "vm defaults"
    config = ctx.layout.config_file
    config_line = f"config file: {config}" + ("" if config.exists() else " (absent)")
    if not ctx.vm_defaults_rows:
        return CheckResult(name, "WARN", "vm defaults were not resolved", (config_line,))
    lines = tuple(f"{fld} {value} ({provenance})" for fld, value, provenance in ctx.vm_defaults_rows)
    sources = ", ".join(dict.fromkeys(provenance for _, _, provenance in ctx.vm_defaults_rows))
    return CheckResult(name, "PASS", f"{len(lines)} settings from {sources}", (*lines, config_line))


# --- runtime directory posture --------------------------------------------------------------------------

_RANK: dict[Status, int] = {"PASS": 0, "WARN": 1, "FAIL": 2}


def _runtime_dir_status(path: Path, *, mode: paths.Mode, root_only: bool) -> tuple[Status, str]:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return "PASS", f"{path}: absent, will be created (0700)"
    except OSError as exc:
        return "FAIL", f"{path}: cannot stat: {exc.strerror or exc}"
    if stat.S_ISLNK(st.st_mode):
        return "FAIL", f"{path}: is a symlink; banger refuses to use it"
    if not stat.S_ISDIR(st.st_mode):
        return "FAIL", f"{path}: is not a directory"
    perms = stat.S_IMODE(st.st_mode)
    facts = f"{path}: owner uid {st.st_uid}, mode {perms:04o}"
    if mode == "user" and st.st_uid != os.getuid():
        return "FAIL", f"{facts}; not owned by you (uid {os.getuid()}), banger refuses to use it"
    if root_only and st.st_uid != 0:
        return "FAIL", f"{facts}; the root helper's directory must be owned by root"
    if perms & (stat.S_IWGRP | stat.S_IWOTH):
        return "FAIL" if mode == "system" else "WARN", f"{facts}; writable by others"
    if mode == "user" and perms != 0o700:
        return "WARN", f"{facts}; banger will tighten it to 0700"
    return "PASS", facts


def check_runtime_dir(ctx: DoctorContext) -> CheckResult:
    layout = ctx.layout
    dirs = [(layout.runtime_dir, False)]
    if layout.helper_runtime_dir != layout.runtime_dir:
        dirs.append((layout.helper_runtime_dir, layout.mode == "system"))
    rows = [_runtime_dir_status(p, mode=layout.mode, root_only=root_only) for p, root_only in dirs]
    worst: Status = max((status for status, _ in rows), key=_RANK.__getitem__)
    details = tuple(line for _, line in rows)
    if worst == "PASS":
        absent = all(not p.exists() for p, _ in dirs)
        return CheckResult("runtime directory", "PASS", "will be created" if absent else "ok", details)
    hint = "remove the offending directory (banger recreates it) or set XDG_RUNTIME_DIR"
    if layout.mode == "system":
        hint = "re-run `sudo banger system install`; systemd recreates the runtime directories"
    problems = [line for status, line in rows if status != "PASS"]
    return CheckResult("runtime directory", worst, problems[0], details, hint=hint)


# The checks of host binaries, of a system install and of the host's runtime state live in tool_checks,
# install_checks and host_checks (they use the types above).
from banger.doctor import host_checks as _host  # noqa: E402
from banger.doctor import install_checks as _install  # noqa: E402
from banger.doctor import tool_checks as _tools  # noqa: E402

CHECKS: tuple[Callable[[DoctorContext], CheckResult], ...] = (
    check_architecture,
    check_banger_version,
    check_state_store,
    check_hardware_virtualization,
    *_tools.CHECKS,
    check_vm_defaults,
    check_runtime_dir,
    _install.check_release_build,
    _install.check_system_services,
    _install.check_socket_posture,
    _install.check_firecracker_binary,
    _install.check_ssh_config_include,
    _install.check_images_and_kernels,
    _install.check_dns_wiring,
    *_host.CHECKS,
)
