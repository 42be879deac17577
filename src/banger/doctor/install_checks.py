"""Doctor checks of a system install and of each capability (reference §3.5).

Services and socket posture of a system install, the firecracker binary's ownership and mode, the
ssh_config include, images and kernels present, and how `<name>.vm` reaches banger's DNS server. Like
every check they are read-only; the DNS check sends one query to banger's own DNS port.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from banger import paths
from banger.buildinfo import BuildInfo
from banger.doctor.checks import _RANK, CheckResult, DoctorContext, Status
from banger.errors import BangerError
from banger.system.run import find_binary

# --- release build --------------------------------------------------------------------------------------


def build_result(build: BuildInfo, test_fault: str | None) -> CheckResult:
    name = "release build"
    if test_fault == "doctor":
        # Only `make-release --test-fault doctor` writes this: a deliberately broken release with which
        # the update tests prove that a failing doctor rolls an update back.
        return CheckResult(name, "FAIL", "this build was made with `make-release --test-fault doctor`: a "
                           "deliberately broken release for tests", hint="install a real release")
    if build.commit == "unknown":
        return CheckResult(name, "PASS", f"v{build.version} from a source checkout")
    return CheckResult(name, "PASS", f"v{build.version}, commit {build.commit[:8]}, built {build.built_at}")


def check_release_build(ctx: DoctorContext) -> CheckResult:
    import importlib

    try:
        fault = getattr(importlib.import_module("banger._build"), "TEST_FAULT", None)
    except ImportError:
        fault = None
    return build_result(ctx.build, fault if isinstance(fault, str) else None)


# --- system install: services and sockets ---------------------------------------------------------------

NOT_SYSTEM_HINT = ("`sudo banger system install --owner $USER` runs the daemon as you and only a small "
                   "helper as root")


def _install_meta() -> tuple[object | None, str | None]:
    from banger.system import installmeta

    try:
        return installmeta.read(), None
    except BangerError as exc:
        return None, str(exc)


def check_system_services(ctx: DoctorContext) -> CheckResult:
    from banger.system import supervise, units
    from banger.system.installmeta import InstallMeta

    name = "system services"
    meta, error = _install_meta()
    if error is not None:
        return CheckResult(name, "FAIL", error)
    if not isinstance(meta, InstallMeta):
        return CheckResult(name, "WARN", "not a system install: root runs the daemon and the helper "
                           "(embedded mode)", hint=NOT_SYSTEM_HINT)
    svc = supervise.services(meta)
    details: list[str] = []
    problems: list[tuple[Status, str]] = []
    for service in supervise.START_ORDER:
        st = supervise.state(svc, service)
        details.append(f"{service}: {st.detail}")
        if not st.running:
            problems.append(("FAIL", f"{service} is not running"))
    install = paths.system_install_paths()
    for unit in (units.HELPER_UNIT, units.DAEMON_UNIT):
        path = install.unit_file(unit)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            status: Status = "FAIL" if svc.manager == "systemd" else "WARN"
            problems.append((status, f"{path} is missing"))
            continue
        missing = units.missing_directives(unit, text)
        if missing:
            status = "FAIL" if svc.manager == "systemd" else "WARN"
            problems.append((status, f"{unit} lacks {', '.join(missing)}"))
        else:
            details.append(f"{unit}: hardening directives present")
    manager = "systemd" if svc.manager == "systemd" else "banger (systemd is not running)"
    details.append(f"supervised by {manager}")
    if not problems:
        return CheckResult(name, "PASS", "bangerd-root and bangerd are running", tuple(details))
    worst: Status = max((s for s, _ in problems), key=_RANK.__getitem__)
    return CheckResult(name, worst, "; ".join(text for _, text in problems), tuple(details),
                       hint="`sudo banger system restart`; re-run `sudo banger system install` to refresh units")


def socket_problems(path: Path, owner_uid: int, *, dir_uid: int | None = None,
                    dir_mode: int | None = None) -> tuple[str, list[str]]:
    """(facts line, problems) for a service socket: a socket, mode 0600, owned by the owner uid."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return f"{path}: absent", [f"{path} does not exist"]
    except OSError as exc:
        return f"{path}: cannot stat", [f"cannot stat {path}: {exc.strerror or exc}"]
    mode = stat.S_IMODE(st.st_mode)
    facts = f"{path}: mode {mode:04o}, uid {st.st_uid}"
    problems = []
    if not stat.S_ISSOCK(st.st_mode):
        problems.append(f"{path} is not a socket")
    if mode != 0o600:
        problems.append(f"{path} has mode {mode:04o}, not 0600")
    if st.st_uid != owner_uid:
        problems.append(f"{path} is owned by uid {st.st_uid}, not the owner uid {owner_uid}")
    if dir_uid is not None or dir_mode is not None:
        dst = path.parent.lstat()
        dmode = stat.S_IMODE(dst.st_mode)
        facts += f"; directory mode {dmode:04o}, uid {dst.st_uid}"
        if dir_uid is not None and dst.st_uid != dir_uid:
            problems.append(f"{path.parent} is owned by uid {dst.st_uid}, not {dir_uid}")
        if dir_mode is not None and dmode != dir_mode:
            problems.append(f"{path.parent} has mode {dmode:04o}, not {dir_mode:04o}")
    return facts, problems


def check_socket_posture(ctx: DoctorContext) -> CheckResult:
    from banger.system.installmeta import InstallMeta

    name = "socket posture"
    meta, error = _install_meta()
    if error is not None:
        return CheckResult(name, "FAIL", error)
    if not isinstance(meta, InstallMeta):
        return CheckResult(name, "PASS", "not a system install (sockets are root's, in a 0700 directory)")
    layout = paths.resolve_system(meta.owner_home)
    daemon_facts, daemon_problems = socket_problems(layout.daemon_socket, meta.owner_uid,
                                                    dir_uid=meta.owner_uid, dir_mode=0o700)
    helper_facts, helper_problems = socket_problems(layout.helper_socket, meta.owner_uid, dir_uid=0,
                                                    dir_mode=0o711)
    problems = daemon_problems + helper_problems
    details = (daemon_facts, helper_facts)
    if problems:
        return CheckResult(name, "FAIL", problems[0], details + tuple(problems[1:]),
                           hint="`sudo banger system restart` recreates the sockets")
    return CheckResult(name, "PASS", "both sockets 0600, owned by the owner; helper directory root 0711",
                       details)


# --- firecracker binary ownership -----------------------------------------------------------------------


def executable_posture(path: str) -> list[str]:
    """Why `path` is not fit to be run by root (the helper launches it): empty when it is."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return [f"cannot stat {path}: {exc.strerror or exc}"]
    if stat.S_ISLNK(st.st_mode):
        return [f"{path} is a symlink (to {os.readlink(path)}); point firecracker_bin at the file itself"]
    problems = []
    if not stat.S_ISREG(st.st_mode):
        problems.append(f"{path} is not a regular file")
    if st.st_uid != 0:
        problems.append(f"{path} is owned by uid {st.st_uid}, not root")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problems.append(f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})")
    if not st.st_mode & stat.S_IXUSR:
        problems.append(f"{path} is not executable")
    return problems


def check_firecracker_binary(ctx: DoctorContext) -> CheckResult:
    name = "firecracker binary"
    path = ctx.firecracker_bin or find_binary("firecracker")
    if path is None:
        return CheckResult(name, "PASS", "no firecracker binary to check (optional backend)")
    if not os.path.lexists(path):
        # The "firecracker" row already explains a missing optional backend; nothing to vet here.
        return CheckResult(name, "WARN", f"{path} does not exist (optional backend)")
    problems = executable_posture(path)
    if problems:
        return CheckResult(name, "FAIL", problems[0], tuple(problems[1:]),
                           hint=f"sudo chown root:root {path} && sudo chmod 0755 {path}")
    return CheckResult(name, "PASS", f"{path}: root-owned regular file, not writable by others")


# --- ssh config include ---------------------------------------------------------------------------------


def check_ssh_config_include(ctx: DoctorContext) -> CheckResult:
    from banger.guest import sshconfig

    name = "ssh config include"
    target = sshconfig.user_ssh_config(ctx.layout)
    try:
        installed = sshconfig.is_installed(ctx.layout)
    except (OSError, UnicodeDecodeError) as exc:
        return CheckResult(name, "WARN", f"cannot read {target}: {exc}")
    if installed:
        return CheckResult(name, "PASS", f"{target} includes {ctx.layout.ssh_config}")
    return CheckResult(name, "WARN", f"`ssh <name>.vm` is not wired: {target} does not include banger's ssh config",
                       hint="run `banger ssh-config --install` (or use `banger vm ssh <name>`)")


# --- images and kernels ---------------------------------------------------------------------------------


def _entries(directory: Path) -> tuple[int | None, str | None]:
    try:
        return sum(1 for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")), None
    except FileNotFoundError:
        return 0, None
    except OSError as exc:
        return None, f"cannot list {directory}: {exc.strerror or exc}"


def check_images_and_kernels(ctx: DoctorContext) -> CheckResult:
    name = "images and kernels"
    images, image_err = _entries(ctx.layout.images_dir)
    kernels, kernel_err = _entries(ctx.layout.kernels_dir)
    details = (f"images: {images if images is not None else image_err} in {ctx.layout.images_dir}",
               f"kernels: {kernels if kernels is not None else kernel_err} in {ctx.layout.kernels_dir}")
    if image_err or kernel_err:
        return CheckResult(name, "WARN", image_err or kernel_err or "", details)
    if not kernels:
        return CheckResult(name, "WARN", "no kernel yet: VMs cannot boot until one is pulled", details,
                           hint="`banger kernel list --available`, then `banger kernel pull <name>`")
    if not images:
        return CheckResult(name, "WARN", f"{kernels} kernel(s), no image yet", details,
                           hint="`banger image list` shows what is available")
    return CheckResult(name, "PASS", f"{images} image(s), {kernels} kernel(s)", details)


# --- DNS wiring -----------------------------------------------------------------------------------------

VM_DNS = ("127.0.0.1", 42069)


def _dns_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something answers a DNS query for `doctor.vm` on host:port (UDP); sends one packet."""
    import socket

    query = (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
             b"\x06doctor\x02vm\x00\x00\x01\x00\x01")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(query, (host, port))
            data = sock.recv(512)
        except OSError:
            return False
    return len(data) >= 12 and data[:2] == b"\x12\x34"


def check_dns_wiring(ctx: DoctorContext) -> CheckResult:
    from banger.network import resolver

    name = "vm DNS"
    host, port = VM_DNS
    serving = _dns_answers(host, port)
    details = [f"banger's DNS server on {host}:{port}: " + ("answers" if serving else "no answer (daemon stopped?)")]
    if resolver.resolved_active():
        bridge = ctx.bridge_name
        try:
            routed = resolver.link_routing(bridge).routes_vm(f"{host}:{port}")
        except BangerError:  # no such link yet: the bridge appears with the first VM
            routed = False
        details.append(f"systemd-resolved: link {bridge} " + ("routes `~vm` to banger" if routed else
                       "does not route `~vm` to banger (wired when the daemon brings the bridge up)"))
        ok = serving and routed
        return CheckResult(name, "PASS" if ok else "WARN",
                           "`<name>.vm` resolves through systemd-resolved" if ok
                           else "`<name>.vm` is not wired into systemd-resolved yet" if serving
                           else "banger's DNS server does not answer", tuple(details),
                           hint=None if ok else "start a VM (the bridge comes up with it), or restart bangerd")
    details.extend(resolver.manual_instructions(port, host))
    return CheckResult(name, "WARN", "systemd-resolved is not running: `<name>.vm` needs the manual wiring below",
                       tuple(details))
