"""What banger tells Firecracker before InstanceStart: a frozen description and the exact API calls.

`request_bodies(cfg)` is pure: it turns a `FirecrackerVmConfig` into the ordered list of
`(method, path, body)` banger sends, which is what the contract test validates against the official
API spec. `apply(api, cfg)` sends that list and then InstanceStart.

Paths in a config are the paths *Firecracker* opens: host paths for a direct launch, in-jail paths
(from `jailer.jailed_config`) when Firecracker runs in the jailer's chroot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from banger.errors import BadRequest
from banger.vmm.firecracker.api import FirecrackerApi, json_body

VCPU_MAX: Final = 32  # the spec's MachineConfiguration.vcpu_count maximum
VSOCK_CID_MIN: Final = 3  # 0-2 are reserved (hypervisor, local, host)
LOG_LEVELS: Final = ("Error", "Warning", "Info", "Debug", "Trace", "Off")
IFNAME_MAX: Final = 15  # IFNAMSIZ - 1; Firecracker opens the tap by this name

# banger's rule for drive and interface ids: each is one URL path segment of an API call, used as is.
_DEVICE_ID = re.compile(r"[A-Za-z0-9_]{1,64}")
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")


@dataclass(frozen=True)
class Drive:
    drive_id: str
    path_on_host: str
    is_root_device: bool
    is_read_only: bool

    def __post_init__(self) -> None:
        _check_device_id("drive_id", self.drive_id)
        _check_path("drive path_on_host", self.path_on_host)


@dataclass(frozen=True)
class NetIface:
    iface_id: str
    host_dev_name: str
    guest_mac: str | None = None

    def __post_init__(self) -> None:
        _check_device_id("iface_id", self.iface_id)
        if not self.host_dev_name or len(self.host_dev_name) > IFNAME_MAX or "/" in self.host_dev_name:
            raise BadRequest(
                f"tap device name {self.host_dev_name!r} is not a valid interface name "
                f"(1-{IFNAME_MAX} characters, no '/')"
            )
        if self.guest_mac is not None and not _MAC.fullmatch(self.guest_mac):
            raise BadRequest(f"guest MAC {self.guest_mac!r} is not of the form 06:00:ac:10:00:02")


@dataclass(frozen=True)
class Vsock:
    guest_cid: int
    uds_path: str

    def __post_init__(self) -> None:
        if isinstance(self.guest_cid, bool) or not isinstance(self.guest_cid, int):
            raise BadRequest(f"vsock guest CID {self.guest_cid!r} is not an integer")
        if not VSOCK_CID_MIN <= self.guest_cid <= 0xFFFFFFFF - 1:
            raise BadRequest(f"vsock guest CID {self.guest_cid} is out of range ({VSOCK_CID_MIN}..2^32-2)")
        _check_path("vsock uds_path", self.uds_path)


@dataclass(frozen=True)
class FirecrackerVmConfig:
    kernel_path: str
    initrd_path: str | None
    boot_args: str
    vcpu: int
    memory_mib: int
    drives: tuple[Drive, ...] = ()
    net: tuple[NetIface, ...] = ()
    vsock: Vsock | None = None
    log_path: str | None = None
    metrics_path: str | None = None
    log_level: str = "Info"
    # A virtio-rng device: the guest's CRNG initialises at once instead of sshd waiting for entropy.
    entropy: bool = False

    def __post_init__(self) -> None:
        _check_path("kernel path", self.kernel_path)
        if self.initrd_path is not None:
            _check_path("initrd path", self.initrd_path)
        for name, value, low, high in (
            ("vcpu", self.vcpu, 1, VCPU_MAX),
            ("memory_mib", self.memory_mib, 1, None),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise BadRequest(f"{name} {value!r} is not an integer")
            if value < low or (high is not None and value > high):
                allowed = f"{low}..{high}" if high is not None else f">= {low}"
                raise BadRequest(f"{name} {value} is out of range (allowed: {allowed})")
        if "\n" in self.boot_args:
            raise BadRequest(f"kernel boot_args {self.boot_args!r} contain a newline")
        _check_unique("drive_id", [d.drive_id for d in self.drives])
        _check_unique("iface_id", [n.iface_id for n in self.net])
        _check_unique("tap device", [n.host_dev_name for n in self.net])
        roots = [d.drive_id for d in self.drives if d.is_root_device]
        if len(roots) > 1:
            raise BadRequest(f"drives {roots} are all marked root; at most one drive can be the root device")
        if self.log_level not in LOG_LEVELS:
            raise BadRequest(
                f"Firecracker log level {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}"
            )
        if self.log_path is not None:
            _check_path("log_path", self.log_path)
        if self.metrics_path is not None:
            _check_path("metrics_path", self.metrics_path)


def request_bodies(cfg: FirecrackerVmConfig) -> list[tuple[str, str, dict[str, Any]]]:
    """The pre-boot API calls for `cfg`, in the order banger sends them (InstanceStart not included).

    Logger and metrics go first so that Firecracker's complaints about the calls after them are logged.
    The root drive goes before the other drives so it is the guest's first block device (/dev/vda).
    """
    calls: list[tuple[str, str, dict[str, Any]]] = []
    if cfg.log_path is not None:
        calls.append(
            ("PUT", "/logger", json_body(log_path=cfg.log_path, level=cfg.log_level, show_level=True))
        )
    if cfg.metrics_path is not None:
        calls.append(("PUT", "/metrics", json_body(metrics_path=cfg.metrics_path)))
    calls.append(("PUT", "/machine-config", json_body(vcpu_count=cfg.vcpu, mem_size_mib=cfg.memory_mib)))
    calls.append(
        (
            "PUT",
            "/boot-source",
            json_body(
                kernel_image_path=cfg.kernel_path, boot_args=cfg.boot_args, initrd_path=cfg.initrd_path
            ),
        )
    )
    for drive in sorted(cfg.drives, key=lambda d: not d.is_root_device):
        calls.append(
            (
                "PUT",
                f"/drives/{drive.drive_id}",
                json_body(
                    drive_id=drive.drive_id,
                    path_on_host=drive.path_on_host,
                    is_root_device=drive.is_root_device,
                    is_read_only=drive.is_read_only,
                ),
            )
        )
    for iface in cfg.net:
        calls.append(
            (
                "PUT",
                f"/network-interfaces/{iface.iface_id}",
                json_body(
                    iface_id=iface.iface_id, host_dev_name=iface.host_dev_name, guest_mac=iface.guest_mac
                ),
            )
        )
    if cfg.vsock is not None:
        calls.append(("PUT", "/vsock", json_body(guest_cid=cfg.vsock.guest_cid, uds_path=cfg.vsock.uds_path)))
    if cfg.entropy:
        calls.append(("PUT", "/entropy", {}))
    return calls


def apply(api: FirecrackerApi, cfg: FirecrackerVmConfig) -> None:
    """Configure a fresh Firecracker process and boot it. The first failing call raises and stops."""
    for method, path, body in request_bodies(cfg):
        api.request(method, path, body)
    api.instance_start()


def _check_device_id(what: str, value: str) -> None:
    if not isinstance(value, str) or not _DEVICE_ID.fullmatch(value):
        raise BadRequest(f"{what} {value!r} is invalid (1-64 characters: letters, digits, '_')")


def _check_path(what: str, value: str) -> None:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise BadRequest(f"{what} {value!r} is not an absolute path")


def _check_unique(what: str, values: list[str]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise BadRequest(f"{what} {value!r} is used twice; each must be unique")
        seen.add(value)
