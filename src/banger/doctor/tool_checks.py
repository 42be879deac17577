"""doctor rows about the host's binaries: the tools each feature needs (the hint names their Debian
packages), the VMM versions (QEMU, Firecracker), and the guest agent's vsock transport. Read-only, like
every check: a lookup on PATH or of a configured path, and `--version`, never a change.

The pure `*_result` functions take what was observed, so the verdicts are tested without the host.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from banger.doctor.checks import CheckResult, DoctorContext
from banger.errors import BangerError
from banger.system.run import find_binary, run

VERSION_TIMEOUT = 5.0

# --- host tools per feature -----------------------------------------------------------------------------

QEMU_PACKAGE = "qemu-system-x86"

# Debian package that ships each tool, for the install hint.
APT_PACKAGES: dict[str, str] = {
    "qemu-system-x86_64": QEMU_PACKAGE,
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "truncate": "coreutils",
    "lz4": "lz4",
    "zstd": "zstd",
    "cpio": "cpio",
    "gpgv": "gpgv",
    "dpkg-deb": "dpkg",
    "mmdebstrap": "mmdebstrap",
    "ip": "iproute2",
    "nft": "nftables",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
}


def locate(tool: str) -> str | None:
    """A configured path (with a slash) must be an executable file; a bare name is looked up on PATH."""
    if "/" in tool:
        return tool if os.path.isfile(tool) and os.access(tool, os.X_OK) else None
    return find_binary(tool)


def apt_hint(tools: Sequence[str], packages: Mapping[str, str] | None = None) -> str:
    """`packages` names the package for tools APT_PACKAGES cannot know (a configured path like /opt/q)."""
    known = {**APT_PACKAGES, **(packages or {})}
    names = dict.fromkeys(known.get(t) or known.get(os.path.basename(t), os.path.basename(t)) for t in tools)
    return f"install them: apt-get install {' '.join(names)}"


def tools_result(
    feature: str, tools: Sequence[str], *, required: bool, packages: Mapping[str, str] | None = None
) -> CheckResult:
    found = {tool: locate(tool) for tool in tools}
    details = tuple(f"{tool}: {path or 'not found'}" for tool, path in found.items())
    missing = [tool for tool, path in found.items() if path is None]
    if not missing:
        return CheckResult(feature, "PASS", "all tools found", details)
    return CheckResult(
        feature,
        "FAIL" if required else "WARN",
        f"missing: {', '.join(missing)}" + ("" if required else " (needed only for this feature)"),
        details,
        hint=apt_hint(missing, packages),
    )


def check_tools_vm_boot(ctx: DoctorContext) -> CheckResult:
    return tools_result(
        "VM boot (QEMU)", (ctx.qemu_bin,), required=True, packages={ctx.qemu_bin: QEMU_PACKAGE}
    )


def check_tools_disks(ctx: DoctorContext) -> CheckResult:
    return tools_result("root filesystem and work disk", ("mkfs.ext4", "debugfs", "truncate"), required=True)


def check_tools_kernel_extraction(ctx: DoctorContext) -> CheckResult:
    return tools_result("kernel extraction", ("lz4", "zstd", "cpio", "gpgv", "dpkg-deb"), required=False)


def check_tools_golden_image(ctx: DoctorContext) -> CheckResult:
    return tools_result("golden image build", ("mmdebstrap",), required=False)


def check_tools_networking(ctx: DoctorContext) -> CheckResult:
    return tools_result("networking", ("ip", "nft"), required=True)


def check_tools_guest_access(ctx: DoctorContext) -> CheckResult:
    return tools_result("guest access", ("ssh", "ssh-keygen"), required=True)


# --- VMM binaries ---------------------------------------------------------------------------------------

Version = tuple[int, int, int]
_VERSION_RE = re.compile(r"\bv?(\d+)\.(\d+)(?:\.(\d+))?")

QEMU_MIN: Version = (7, 2, 0)
FIRECRACKER_MIN: Version = (1, 5, 0)
FIRECRACKER_ABOVE_TESTED: Version = (1, 15, 0)  # tested through 1.14.x
FIRECRACKER_HINT = (
    "firecracker has no distro package: download a release from "
    "https://github.com/firecracker-microvm/firecracker/releases and set firecracker_bin in config.toml"
)


def parse_version(text: str) -> Version | None:
    """The first `X.Y[.Z]` on the first non-empty line: `QEMU emulator version 7.2.22 (Debian …)` → (7, 2, 22)."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    match = _VERSION_RE.search(first)
    if match is None:
        return None
    return int(match[1]), int(match[2]), int(match[3] or 0)


def _fmt(v: Version) -> str:
    return ".".join(map(str, v))


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def qemu_result(version_text: str, path: str) -> CheckResult:
    version = parse_version(version_text)
    details = (path, _first_line(version_text))
    if version is None:
        return CheckResult("qemu", "WARN", f"cannot parse the version of {path}", details)
    if version >= QEMU_MIN:
        return CheckResult("qemu", "PASS", f"QEMU {_fmt(version)}", details)
    return CheckResult(
        "qemu",
        "WARN",
        f"QEMU {_fmt(version)} is older than {_fmt(QEMU_MIN)}; microvm features may be missing",
        details,
        hint="install QEMU 7.2 or newer (Debian 12: apt-get install qemu-system-x86)",
    )


def firecracker_result(version_text: str, path: str) -> CheckResult:
    version = parse_version(version_text)
    details = (path, _first_line(version_text))
    if version is None:
        return CheckResult("firecracker", "WARN", f"cannot parse the version of {path}", details)
    if version < FIRECRACKER_MIN:
        return CheckResult(
            "firecracker",
            "FAIL",
            f"Firecracker {_fmt(version)} is too old; banger needs {_fmt(FIRECRACKER_MIN)} or newer",
            details,
            hint=FIRECRACKER_HINT,
        )
    if version >= FIRECRACKER_ABOVE_TESTED:
        return CheckResult(
            "firecracker",
            "WARN",
            f"Firecracker {_fmt(version)} is newer than the tested range (1.5.0 to 1.14.x)",
            details,
        )
    return CheckResult("firecracker", "PASS", f"Firecracker {_fmt(version)}", details)


def _version_output(path: str) -> str:
    proc = run([path, "--version"], timeout=VERSION_TIMEOUT)
    return (proc.stdout or b"").decode("utf-8", "replace") or (proc.stderr or b"").decode("utf-8", "replace")


def check_qemu(ctx: DoctorContext) -> CheckResult:
    path = locate(ctx.qemu_bin)
    if path is None:
        return CheckResult(
            "qemu",
            "FAIL",
            f"{ctx.qemu_bin} not found; it boots every VM",
            hint=apt_hint([ctx.qemu_bin], {ctx.qemu_bin: QEMU_PACKAGE}),
        )
    try:
        return qemu_result(_version_output(path), path)
    except (BangerError, OSError) as exc:
        return CheckResult("qemu", "WARN", f"cannot run `{path} --version`: {exc}", (path,))


def check_firecracker(ctx: DoctorContext) -> CheckResult:
    name = "firecracker"
    if ctx.firecracker_bin is not None:
        path = locate(ctx.firecracker_bin)
        if path is None:
            return CheckResult(
                name,
                "WARN",
                f"firecracker_bin {ctx.firecracker_bin} is not an executable file (optional backend)",
                hint=FIRECRACKER_HINT,
            )
    else:
        path = find_binary("firecracker")
        if path is None:
            return CheckResult(
                name, "WARN", "firecracker not found (optional backend; QEMU is used)", hint=FIRECRACKER_HINT
            )
    try:
        return firecracker_result(_version_output(path), path)
    except (BangerError, OSError) as exc:
        return CheckResult(name, "WARN", f"cannot run `{path} --version`: {exc}", (path,))


# --- guest agent transport (QEMU) -----------------------------------------------------------------------

VHOST_VSOCK = "vhost-device-vsock"
INSTALL_VHOST_VSOCK = "sudo banger internal install-vhost-vsock"


def agent_transport_result(path: str | None, *, configured: str | None = None, recorded: str | None = None,
                           version_text: str | None = None, error: str | None = None) -> CheckResult:
    """`recorded`: the Debian version install-vhost-vsock wrote next to the binary; `version_text`: its
    `--version` output; `error`: why running it failed (a binary that cannot run serves no VM)."""
    name = "guest agent transport (QEMU)"
    hint = f"for the vsock transport, install it: {INSTALL_VHOST_VSOCK}"
    if path is None:
        why = f"vhost_vsock_bin {configured} is not an executable file" if configured else f"{VHOST_VSOCK} not found"
        if configured:
            hint += ", or fix vhost_vsock_bin in config.toml"
        return CheckResult(name, "WARN", f"virtio-serial fallback ({why})", hint=hint)
    if error is not None or version_text is None:
        return CheckResult(name, "WARN", f"virtio-serial fallback ({path} does not run: {error or 'no output'})",
                           (path,), hint=hint)
    parsed = parse_version(version_text)
    version = recorded or (_fmt(parsed) if parsed else "(unknown version)")
    details = (path, _first_line(version_text)) + (("installed by banger internal install-vhost-vsock",)
                                                    if recorded else ())
    return CheckResult(name, "PASS", f"vsock via {VHOST_VSOCK} {version} ({path})", details)


def check_agent_transport(ctx: DoctorContext) -> CheckResult:
    configured = ctx.vhost_vsock_bin
    path = locate(configured) if configured is not None else find_binary(VHOST_VSOCK)
    if path is None:
        return agent_transport_result(None, configured=configured)
    from banger.system.hosttools import installed_version

    try:
        text = _version_output(path)
    except (BangerError, OSError) as exc:
        return agent_transport_result(path, error=str(exc))
    return agent_transport_result(path, recorded=installed_version(Path(path)), version_text=text)


# In report order; checks.CHECKS places them after the hardware virtualization row.
CHECKS: tuple[Callable[[DoctorContext], CheckResult], ...] = (
    check_tools_vm_boot,
    check_tools_disks,
    check_tools_kernel_extraction,
    check_tools_golden_image,
    check_tools_networking,
    check_tools_guest_access,
    check_qemu,
    check_firecracker,
    check_agent_transport,
)
