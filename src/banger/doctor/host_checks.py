"""doctor rows about the host's runtime state: device access for the VMM's user, the bridge and its tap
pool, banger's nftables table, and the images' work seeds. Read-only, like every check: /sys, /dev and
`nft list` (which only reads), never a change.

The pure `*_result` functions take what was observed, so the verdicts are tested without the host.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from banger.doctor.checks import CheckResult, DoctorContext

TUN = Path("/dev/net/tun")
KVM = Path("/dev/kvm")
SYS_NET = Path("/sys/class/net")


@dataclass(frozen=True)
class DeviceAccess:
    path: str
    exists: bool
    mode: int = 0
    uid: int = 0
    gid: int = 0


def _observe(path: Path) -> DeviceAccess:
    try:
        st = path.stat()
    except OSError:
        return DeviceAccess(str(path), False)
    return DeviceAccess(str(path), True, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)


def can_open(dev: DeviceAccess, uid: int, groups: Sequence[int]) -> bool:
    """Read-write access by mode bits alone (root always can)."""
    if uid == 0:
        return True
    if dev.uid == uid:
        return dev.mode & 0o600 == 0o600
    if dev.gid in groups:
        return dev.mode & 0o060 == 0o060
    return dev.mode & 0o006 == 0o006


def devices_result(tun: DeviceAccess, kvm: DeviceAccess, who: str, uid: int, groups: Sequence[int],
                   kvm_usable: bool | None = None) -> CheckResult:
    name = "devices"
    details = [f"{d.path}: " + (f"mode {d.mode:04o}, uid {d.uid}, gid {d.gid}" if d.exists else "missing")
               for d in (tun, kvm)]
    if not tun.exists:
        return CheckResult(name, "FAIL", f"{tun.path} is missing: no VM can get a network interface", tuple(details),
                           hint="load the tun module: `modprobe tun`")
    if not can_open(tun, uid, groups):
        return CheckResult(name, "WARN", f"{who} cannot open {tun.path}: VMs cannot attach their taps",
                           tuple(details), hint="bangerd-root gives it udev's default mode (0666) when it starts "
                                                "on a host without udev; elsewhere check your udev rules")
    if kvm.exists and not can_open(kvm, uid, groups):
        return CheckResult(name, "WARN", f"{who} cannot open {kvm.path}: KVM is out of reach, QEMU uses TCG",
                           tuple(details), hint=f"add {who} to the group owning {kvm.path} (usually `kvm`)")
    return CheckResult(name, "PASS", f"{who} can open {tun.path}" + (f" and {kvm.path}" if kvm.exists else ""),
                       tuple(details))


def _vmm_user(ctx: DoctorContext) -> tuple[str, int, list[int]]:
    """Who runs the VMMs: the install's owner in a system install, else whoever runs doctor."""
    from banger.errors import BangerError

    if ctx.layout.mode == "system":
        try:
            from banger.system import installmeta

            meta = installmeta.read()
        except (BangerError, OSError):
            meta = None
        if meta is not None:
            return f"the owner {meta.owner_user}", meta.owner_uid, [meta.owner_gid, *_groups_of(meta.owner_user)]
    return "this user", os.getuid(), [os.getgid(), *os.getgroups()]


def _groups_of(user: str) -> list[int]:
    import grp

    return [g.gr_gid for g in grp.getgrall() if user in g.gr_mem]


def check_devices(ctx: DoctorContext) -> CheckResult:
    who, uid, groups = _vmm_user(ctx)
    return devices_result(_observe(TUN), _observe(KVM), who, uid, groups)


def bridge_result(bridge: str, exists: bool, up: bool, taps: Sequence[str], pool_size: int) -> CheckResult:
    name = "bridge and tap pool"
    if not exists:
        return CheckResult(name, "PASS", f"bridge {bridge} not created yet (it comes up with the first VM)",
                           (f"tap pool size: {pool_size}",))
    details = (f"taps on {bridge}: {', '.join(sorted(taps)) or 'none'}", f"tap pool size: {pool_size}")
    if not up:
        return CheckResult(name, "WARN", f"bridge {bridge} exists but is down: VMs on it have no network",
                           details, hint=f"`ip link set {bridge} up`, or restart bangerd")
    return CheckResult(name, "PASS", f"bridge {bridge} up with {len(taps)} tap(s)", details)


def check_bridge(ctx: DoctorContext) -> CheckResult:
    bridge = ctx.bridge_name
    base = SYS_NET / bridge
    exists = (base / "bridge").is_dir()
    up = False
    taps: list[str] = []
    if exists:
        try:
            up = (base / "operstate").read_text().strip() in ("up", "unknown")
            taps = [p.name for p in (base / "brif").iterdir()]
        except OSError:
            pass
    return bridge_result(bridge, exists, up, taps, ctx.tap_pool_size)


def nat_result(readable: bool, rules: int | None, table_present: bool) -> CheckResult:
    name = "nftables"
    if not readable:
        return CheckResult(name, "PASS", "banger's NAT table is only readable by root (run doctor as root to see it)")
    if not table_present:
        return CheckResult(name, "PASS", "no `ip banger` table: no VM has --nat right now")
    return CheckResult(name, "PASS", f"`ip banger` table with {rules} rule(s) for VMs with --nat")


def check_nftables(ctx: DoctorContext) -> CheckResult:
    from banger.errors import BangerError
    from banger.system.run import find_binary, run

    if find_binary("nft") is None:
        return CheckResult("nftables", "WARN", "nft not found: --nat cannot work", hint="apt install nftables")
    if os.geteuid() != 0:
        return nat_result(False, None, False)
    try:
        proc = run(["nft", "list", "table", "ip", "banger"], check=False, timeout=10)
    except BangerError as exc:
        return CheckResult("nftables", "WARN", f"`nft list` did not answer: {exc.message}")
    if proc.returncode != 0:
        return nat_result(True, None, False)
    text = proc.stdout.decode("utf-8", "replace")
    return nat_result(True, sum(1 for line in text.splitlines() if "comment" in line), True)


def seeds_result(images: Sequence[str], without_seed: Sequence[str]) -> CheckResult:
    name = "work seeds"
    if not images:
        return CheckResult(name, "PASS", "no images yet")
    if without_seed:
        return CheckResult(name, "WARN", f"{len(without_seed)} image(s) without a work seed: their VMs start with "
                           "an empty /root", tuple(sorted(without_seed)),
                           hint="pull the image again (`banger image pull <name>`) to capture its /root")
    return CheckResult(name, "PASS", f"all {len(images)} image(s) have a work seed")


def check_work_seeds(ctx: DoctorContext) -> CheckResult:
    images_dir = ctx.layout.images_dir
    try:
        dirs = [p for p in images_dir.iterdir() if p.is_dir() and (p / "rootfs.ext4").exists()]
    except OSError:
        dirs = []
    return seeds_result([d.name for d in dirs], [d.name for d in dirs if not (d / "work-seed.ext4").exists()])


CHECKS: tuple[Callable[[DoctorContext], CheckResult], ...] = (check_devices, check_bridge, check_nftables,
                                                              check_work_seeds)
