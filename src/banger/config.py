"""config.toml: every setting described once, in `SETTINGS`, and read strictly.

Each `Setting` names its key, the function that checks and converts a TOML value, its default and a
line of help. `load` turns the file into a frozen `Config`; a missing file means all defaults, and
nothing is ever written (reference §4: no first-run writes). Unknown keys are errors, not warnings:
a typo such as `brige_name` would otherwise silently leave the default in place.

Every error is a `ConfigError` whose message is one line, `<file>: <key> <value> <what is wrong>
(<what is allowed>)`, so the CLI and the daemon log can show it as is.

`[vm_defaults]` is resolved into a `VmDefaults` by `resolve_vm_defaults`: config value, else a host
heuristic, else a builtin floor, recording which one won for each field (reference §4.2).

tomllib and difflib are imported where used: the CLI imports this module at start-up.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, Generic, Literal, TypeVar, cast
from urllib.parse import urlsplit

from banger.errors import BadRequest, ConfigError
from banger.model import validate_artifact_name
from banger.paths import Layout
from banger.units import UnitError, format_duration, format_size, parse_duration, parse_size

T = TypeVar("T")

LogLevel = Literal["debug", "info", "warn", "error"]
VmmKind = Literal["auto", "firecracker", "qemu"]
Provenance = Literal["config", "host heuristic", "builtin"]

# Looked up on PATH when firecracker_bin / qemu_bin / vhost_vsock_bin are not set.
FIRECRACKER_BIN_NAME = "firecracker"
QEMU_BIN_NAME = "qemu-system-x86_64"
VHOST_VSOCK_BIN_NAME = "vhost-device-vsock"

IFNAMSIZ_MAX = 15  # Linux IFNAMSIZ is 16 bytes including the terminating NUL.

# [vm_defaults] floors (reference §4.2); the host heuristic never goes below them.
BUILTIN_VCPU = 1
BUILTIN_MEMORY_MIB = 1024
BUILTIN_DISK_SIZE = 8 << 30
BUILTIN_SYSTEM_OVERLAY_SIZE = 8 << 30
HEURISTIC_VCPU_CAP = 4
HEURISTIC_MEMORY_CAP_MIB = 8192

MAX_VCPU = 64
MIN_MEMORY_MIB = 128
MIN_DISK_SIZE = 64 << 20  # below this an ext4 work disk or overlay has no room for anything
MIN_DOWNLOAD_BYTES = 1 << 20

# Keys the Go tool once had (reference §4.1); an old config gets a "delete it" hint, not a guess.
REMOVED_KEYS = frozenset(
    {
        "web_listen_addr", "runtime_dir", "namegen_path", "customize_script", "vsock_ping_helper_path",
        "default_rootfs", "default_work_seed", "default_base_rootfs", "default_kernel", "default_initrd",
        "default_modules_dir", "default_packages_file", "mapdns_bin", "mapdns_data_file",
    }
)  # fmt: skip


class _Missing(enum.Enum):
    MISSING = enum.auto()


MISSING = _Missing.MISSING


class _Invalid(ConfigError):
    """A problem in the file; `message` is the one line that follows "<file>: " (`parse_text` adds it)."""


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One key: `parse(full_key, toml_value, layout)` checks and converts, raising `_Invalid`.

    A setting with neither `default` nor `default_factory` is required (used for [[file_sync]]).
    """

    key: str
    parse: Callable[[str, object, Layout], T]
    default: T | Literal[_Missing.MISSING] = MISSING
    default_factory: Callable[[Layout], T] | None = None
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is MISSING and self.default_factory is None

    def default_for(self, layout: Layout) -> T:
        if self.default_factory is not None:
            return self.default_factory(layout)
        if self.default is MISSING:
            raise ValueError(f"setting {self.key} has no default")
        return self.default


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_RENDER_MAX = 120


def render(value: object) -> str:
    """A TOML value as the user wrote it, on one line: "eth0", 24, true, [1, 2], {a = 1}."""
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)  # escapes newlines: the message stays one line
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, dict):
        items = (f"{k if _BARE_KEY.fullmatch(k) else json.dumps(k)} = {render(v)}" for k, v in value.items())
        text = "{" + ", ".join(items) + "}"
    elif isinstance(value, list):
        text = "[" + ", ".join(render(v) for v in value) + "]"
    else:  # numbers; TOML dates and times render as ISO 8601, as written
        text = value.isoformat() if hasattr(value, "isoformat") else repr(value)
    return text if len(text) <= _RENDER_MAX else text[: _RENDER_MAX - 1] + "…"


_TYPE_NAMES = {
    "bool": "a boolean", "int": "an integer", "float": "a float", "str": "a string", "list": "an array",
    "dict": "a table", "datetime": "a date-time", "date": "a date", "time": "a time",
}  # fmt: skip


def _bad(key: str, value: object, reason: str) -> _Invalid:
    return _Invalid(f"{key} {render(value)} {reason}")


def _wrong_type(key: str, value: object, expected: str) -> _Invalid:
    kind = _TYPE_NAMES.get(type(value).__name__, type(value).__name__)
    return _bad(key, value, f"is {kind}; expected {expected}")


def _string(key: str, value: object, expected: str = "a string") -> str:
    if not isinstance(value, str):
        raise _wrong_type(key, value, expected)
    return value


def _parse_bool(key: str, value: object, layout: Layout) -> bool:
    if not isinstance(value, bool):
        raise _wrong_type(key, value, "a boolean (true or false)")
    return value


def _int_range(low: int, high: int | None) -> Callable[[str, object, Layout], int]:
    def parse(key: str, value: object, layout: Layout) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong_type(key, value, "an integer")
        if high is None and value < low:
            raise _bad(key, value, f"is too small (must be at least {low})")
        if high is not None and not low <= value <= high:
            raise _bad(key, value, f"is out of range (must be {low} to {high})")
        return value

    return parse


def _choice(*allowed: str) -> Callable[[str, object, Layout], str]:
    listing = ", ".join(json.dumps(a) for a in allowed)

    def parse(key: str, value: object, layout: Layout) -> str:
        if _string(key, value) not in allowed:
            raise _bad(key, value, f"is not allowed (must be one of {listing})")
        return cast(str, value)

    return parse


def _duration(minimum: float) -> Callable[[str, object, Layout], float]:
    def parse(key: str, value: object, layout: Layout) -> float:
        text = _string(key, value, 'a duration string such as "10s"')
        try:
            seconds = parse_duration(text)
        except UnitError as exc:
            raise _bad(key, value, exc.reason) from None
        if seconds < minimum:
            if minimum == 0:
                raise _bad(key, value, 'is negative (use "0" to turn it off)')
            raise _bad(key, value, f"is too short (must be at least {format_duration(minimum)})")
        return seconds

    return parse


def _size(minimum: int) -> Callable[[str, object, Layout], int]:
    def parse(key: str, value: object, layout: Layout) -> int:
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise _wrong_type(key, value, 'a size string such as "8G"')
        if isinstance(value, int):
            size = value  # a TOML integer is bytes, like a plain number in a string
        else:
            try:
                size = parse_size(value)
            except UnitError as exc:
                raise _bad(key, value, exc.reason) from None
        if size < minimum:
            raise _bad(key, value, f"is too small (must be at least {format_size(minimum)})")
        return size

    return parse


def _path_checks(key: str, value: object) -> str:
    """The rules host paths and guest paths share: non-empty, no NUL, no ~user, no '..'."""
    text = _string(key, value, "a path string")
    if "\0" in text:
        raise _bad(key, value, "contains a NUL character")
    if text.startswith("~") and text != "~" and not text.startswith("~/"):
        raise _bad(key, value, "uses ~user (only ~/, the owner's home, is allowed)")
    if ".." in PurePosixPath(text).parts:
        raise _bad(key, value, 'has a ".." component (not allowed)')
    return text


def _default_chroot_base(layout: Layout) -> Path:
    """Beside the state directory, not inside it: in a system install the owner owns the state directory,
    and a jail base the owner could rename or relink would let the root-run jailer be pointed anywhere."""
    if layout.mode == "system":
        return layout.state_dir.parent / f"{layout.state_dir.name}-jail"
    return layout.state_dir / "jail"


def _parse_path(key: str, value: object, layout: Layout) -> Path:
    """An absolute path, or one under "~/" expanded against the owner's home (not root's)."""
    text = _path_checks(key, value)
    if not text:
        raise _bad(key, value, "is empty (must be absolute or start with ~/)")
    if text.startswith("~/"):
        return layout.owner_home / text[2:]
    if not text.startswith("/"):
        raise _bad(key, value, "is not an absolute path (must be absolute or start with ~/)")
    return Path(text)


def _parse_guest_path(key: str, value: object, layout: Layout) -> str:
    """A guest path under ~/ or /root/ (the work disk is /root), stored as /root/..., normalised."""
    text = _path_checks(key, value)
    if not text:
        raise _bad(key, value, "is empty (must be under ~/ or /root/)")
    absolute = "/root/" + text[2:] if text.startswith("~/") else text
    parts = [p for p in absolute.split("/") if p not in ("", ".")]
    if not absolute.startswith("/") or len(parts) < 2 or parts[0] != "root":
        raise _bad(key, value, "must be under ~/ or /root/")
    return "/" + "/".join(parts)


def _parse_mode(key: str, value: object, layout: Layout) -> int:
    # Integers are refused: `mode = 755` would be decimal 755, not 0o755.
    text = _string(key, value, 'an octal string such as "0755"')
    if not re.fullmatch(r"[0-7]{3,4}", text):
        raise _bad(key, value, 'is not an octal mode (expected 3 or 4 octal digits, e.g. "0644")')
    return int(text, 8)


def _parse_image_name(key: str, value: object, layout: Layout) -> str:
    text = _string(key, value)
    try:
        return validate_artifact_name("image", text)
    except BadRequest:
        raise _bad(
            key, value,
            "is not a valid image name (letters, digits, '.', '-', '_'; must start with a letter or digit; "
            "at most 128 characters)",
        ) from None  # fmt: skip


_BRIDGE_SUFFIX = re.compile(r"[A-Za-z0-9_-]+")


def _parse_bridge_name(key: str, value: object, layout: Layout) -> str:
    # The root helper only touches bridges named like this, so any other name could never work.
    text = _string(key, value)
    if text != "br-fc" and not text.startswith("br-fc-"):
        raise _bad(key, value, 'is not allowed (must be "br-fc" or start with "br-fc-")')
    if len(text) > IFNAMSIZ_MAX:
        raise _bad(key, value, f"is {len(text)} characters (max is {IFNAMSIZ_MAX}, the Linux interface name limit)")
    if text != "br-fc" and not _BRIDGE_SUFFIX.fullmatch(text[len("br-fc-") :]):
        raise _bad(key, value, 'is not allowed (after "br-fc-" come letters, digits, "-" or "_")')
    return text


def _parse_ipv4(key: str, value: object, layout: Layout) -> str:
    text = _string(key, value, 'an IPv4 address string such as "172.16.0.1"')
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        raise _bad(key, value, "is not an IPv4 address") from None
    if (address.is_unspecified or address.is_loopback or address.is_multicast or address.is_reserved
            or address.is_link_local):  # fmt: skip
        raise _bad(key, value, "is not a usable address (loopback, link-local, multicast and reserved are not allowed)")
    return str(address)


def _parse_prefix_length(key: str, value: object, layout: Layout) -> int:
    if isinstance(value, str):
        if not re.fullmatch(r"[0-9]{1,2}", value):
            raise _bad(key, value, "is not a prefix length (expected a number from 8 to 30)")
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise _wrong_type(key, value, 'an integer or numeric string such as 24 or "24"')
    if not 8 <= number <= 30:
        raise _bad(key, value, "is out of range (must be 8 to 30)")
    return number


def _parse_http_url(key: str, value: object, layout: Layout) -> str:
    text = _string(key, value)
    reason = "is not an http:// or https:// URL with a host (and no query or fragment)"
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 -- raises ValueError for a malformed port
    except ValueError:
        raise _bad(key, value, reason) from None
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment
            or any(c.isspace() for c in text)):  # fmt: skip
        raise _bad(key, value, reason)
    return text.rstrip("/")


@dataclass(frozen=True)
class VmDefaultsConfig:
    """[vm_defaults] as written (sizes in bytes); None leaves a field to the heuristic or builtin."""

    vcpu: int | None = None
    memory_mib: int | None = None
    disk_size: int | None = None
    system_overlay_size: int | None = None


@dataclass(frozen=True)
class FileSyncEntry:
    """Copied into the work disk before boot; `guest` is under /root; mode None = default (0600 for files)."""

    host: Path
    guest: str
    mode: int | None = None


VM_DEFAULTS_SETTINGS: tuple[Setting[Any], ...] = (
    Setting("vcpu", _int_range(1, MAX_VCPU), None, help="vCPUs of a new VM"),
    Setting("memory_mib", _int_range(MIN_MEMORY_MIB, None), None, help="memory of a new VM in MiB"),
    Setting("disk_size", _size(MIN_DISK_SIZE), None, help='work disk size, e.g. "8G"'),
    Setting("system_overlay_size", _size(MIN_DISK_SIZE), None, help='rootfs copy-on-write overlay size, e.g. "8G"'),
)

FILE_SYNC_SETTINGS: tuple[Setting[Any], ...] = (
    Setting("host", _parse_path, help="absolute or ~/ path on the host (~ is the owner's home)"),
    Setting("guest", _parse_guest_path, help="path under ~/ or /root/ in the guest"),
    Setting("mode", _parse_mode, None, help='octal permissions for a file, e.g. "0755" (default 0600)'),
)


def _parse_vm_defaults(key: str, value: object, layout: Layout) -> VmDefaultsConfig:
    if not isinstance(value, dict):
        raise _wrong_type(key, value, "a table ([vm_defaults])")
    return VmDefaultsConfig(**_parse_table(f"{key}.", value, VM_DEFAULTS_SETTINGS, layout))


def _parse_file_sync(key: str, value: object, layout: Layout) -> tuple[FileSyncEntry, ...]:
    if not isinstance(value, list):
        raise _wrong_type(key, value, "an array of tables ([[file_sync]])")
    entries = []
    for index, item in enumerate(value):
        name = f"{key}[{index}]"
        if not isinstance(item, dict):
            raise _wrong_type(name, item, "a table")
        entries.append(FileSyncEntry(**_parse_table(f"{name}.", item, FILE_SYNC_SETTINGS, layout)))
    return tuple(entries)


@dataclass(frozen=True)
class Config:
    """The parsed config.toml; one field per entry of `SETTINGS`, in the same order."""

    log_level: LogLevel
    vmm: VmmKind
    firecracker_bin: Path | None
    jailer_bin: Path
    jailer_enabled: bool
    jailer_chroot_base: Path
    qemu_bin: Path | None
    vhost_vsock_bin: Path | None
    ssh_key_path: Path
    ssh_wait_timeout: float
    default_image_name: str
    auto_stop_stale_after: float
    stats_poll_interval: float
    metrics_poll_interval: float
    bridge_name: str
    bridge_ip: str
    cidr: int
    tap_pool_size: int
    default_dns: str
    max_download_bytes: int
    kernel_mirror: str
    vm_defaults: VmDefaultsConfig
    file_sync: tuple[FileSyncEntry, ...]

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        """The bridge's network, e.g. 172.16.0.0/24."""
        return ipaddress.IPv4Interface(f"{self.bridge_ip}/{self.cidr}").network


SETTINGS: tuple[Setting[Any], ...] = (
    Setting("log_level", _choice("debug", "info", "warn", "error"), "info",
            help="daemon log level; BANGER_LOG_LEVEL overrides it"),
    Setting("vmm", _choice("auto", "firecracker", "qemu"), "auto",
            help="VM monitor: auto picks firecracker when KVM is usable, else qemu"),
    Setting("firecracker_bin", _parse_path, None, help=f"firecracker binary (default: {FIRECRACKER_BIN_NAME} on PATH)"),
    Setting("jailer_bin", _parse_path, Path("/usr/bin/jailer"), help="firecracker jailer binary"),
    Setting("jailer_enabled", _parse_bool, True,
            help="run firecracker under the jailer; false removes the sandbox (debugging only)"),
    Setting("jailer_chroot_base", _parse_path, default_factory=lambda layout: _default_chroot_base(layout),
            help="jailer chroots; must be on the image store's file system (hard links), and in a system "
                 "install not writable by the owner"),
    Setting("qemu_bin", _parse_path, None, help=f"qemu binary (default: {QEMU_BIN_NAME} on PATH)"),
    Setting("vhost_vsock_bin", _parse_path, None,
            help=f"vhost-user vsock backend for QEMU's vsock agent transport (default: {VHOST_VSOCK_BIN_NAME} on PATH)"),
    Setting("ssh_key_path", _parse_path, default_factory=lambda layout: layout.ssh_key,
            help="banger's SSH private key (generated if missing)"),
    Setting("ssh_wait_timeout", _duration(1.0), parse_duration("240s"),
            help="how long to wait for a new VM's SSH; long enough for software emulation"),
    Setting("default_image_name", _parse_image_name, "debian-bookworm", help="image used when --image is omitted"),
    Setting("auto_stop_stale_after", _duration(0.0), 0.0, help='stop VMs untouched this long; "0" turns it off'),
    Setting("stats_poll_interval", _duration(0.1), parse_duration("10s"), help="VM stats poll interval"),
    Setting("metrics_poll_interval", _duration(0.1), parse_duration("10s"), help="VMM metrics poll interval"),
    Setting("bridge_name", _parse_bridge_name, "br-fc", help='host bridge: "br-fc" or "br-fc-<suffix>"'),
    Setting("bridge_ip", _parse_ipv4, "172.16.0.1", help="host address on the bridge"),
    Setting("cidr", _parse_prefix_length, 24, help="bridge subnet prefix length, 8 to 30"),
    Setting("tap_pool_size", _int_range(0, 64), 4, help="idle tap devices kept ready"),
    Setting("default_dns", _parse_ipv4, "1.1.1.1", help="DNS server given to guests"),
    Setting("max_download_bytes", _size(MIN_DOWNLOAD_BYTES), 8 << 30, help="largest image/kernel download"),
    Setting("kernel_mirror", _parse_http_url, "http://deb.debian.org/debian", help="Debian mirror for kernels"),
    Setting("vm_defaults", _parse_vm_defaults, VmDefaultsConfig(), help="[vm_defaults] table"),
    Setting("file_sync", _parse_file_sync, (), help="[[file_sync]] entries"),
)  # fmt: skip


def _parse_table(
    prefix: str, table: Mapping[str, object], settings: Sequence[Setting[Any]], layout: Layout
) -> dict[str, Any]:
    by_key = {setting.key: setting for setting in settings}
    for key in table:
        if key not in by_key:
            raise _unknown_key(prefix, key, list(by_key))
    values: dict[str, Any] = {}
    for setting in settings:
        if setting.key in table:
            values[setting.key] = setting.parse(prefix + setting.key, table[setting.key], layout)
        elif setting.required:
            raise _Invalid(f'{prefix.rstrip(".")} is missing required key "{setting.key}"')
        else:
            values[setting.key] = setting.default_for(layout)
    return values


def _unknown_key(prefix: str, key: str, allowed: list[str]) -> _Invalid:
    import difflib

    hint = None
    close = difflib.get_close_matches(key, allowed, n=1)
    if not prefix and key in REMOVED_KEYS:
        hint = f"{key} was removed from banger; delete it"
    elif close:
        hint = f'did you mean "{close[0]}"?'
    return _Invalid(f"unknown key {json.dumps(prefix + key)} (allowed: {', '.join(allowed)})", hint=hint)


def _check_bridge_subnet(config: Config) -> None:
    network = config.subnet
    address = ipaddress.IPv4Address(config.bridge_ip)
    for what, special in (("network", network.network_address), ("broadcast", network.broadcast_address)):
        if address == special:
            raise _Invalid(
                f"bridge_ip {render(config.bridge_ip)} is the {what} address of {network} "
                f"(must be a host address such as {network.network_address + 1})"
            )


def parse_text(text: str, layout: Layout, source: str) -> Config:
    """Parse config.toml text; `source` (the file name) starts every error message."""
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {_toml_error(str(exc))}") from None
    try:
        config = Config(**_parse_table("", data, SETTINGS, layout))
        _check_bridge_subnet(config)
    except _Invalid as exc:
        raise ConfigError(f"{source}: {exc.message}", hint=exc.hint) from None
    return config


def _toml_error(message: str) -> str:
    # tomllib says e.g. "Invalid value (at line 3, column 9)"; lead with the place, keep one line.
    one_line = " ".join(message.split())
    match = re.fullmatch(r"(.*) \(at (?:line (\d+), column (\d+)|end of document)\)", one_line)
    if match is None:
        return f"invalid TOML: {one_line}"
    where = f"line {match[2]}, column {match[3]}" if match[2] else "end of file"
    return f"{where}: invalid TOML: {match[1]}"


def load(layout: Layout, path: Path | None = None) -> Config:
    """Read `path` (default `layout.config_file`); a missing file means all defaults. Never writes."""
    path = layout.config_file if path is None else path
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return parse_text("", layout, str(path))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 (bad byte at offset {exc.start})") from None
    return parse_text(text, layout, str(path))


@dataclass(frozen=True)
class VmDefaults:
    """What a new VM gets when the CLI gives no value; `provenance[field]` says where it came from."""

    vcpu: int
    memory_mib: int
    disk_size_bytes: int
    system_overlay_size_bytes: int
    provenance: Mapping[str, Provenance]


def host_memory_mib(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemTotal in MiB, or None when it cannot be read."""
    try:
        text = meminfo.read_text()
    except OSError:
        return None
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB\s*$", text, re.MULTILINE)
    return int(match.group(1)) // 1024 if match else None


def _pick(configured: int | None, heuristic: int | None, floor: int) -> tuple[int, Provenance]:
    if configured is not None:
        return configured, "config"
    if heuristic is not None and heuristic >= floor:
        return heuristic, "host heuristic"
    return floor, "builtin"


def resolve_vm_defaults(
    config: Config, host_cpus: int | None = None, host_mem_mib: int | None = None
) -> VmDefaults:
    """Per field: the config value, else the host heuristic (vcpu = CPUs/4 capped at 4, memory = RAM/8
    capped at 8192 MiB) unless it falls below the builtin floor, else the floor (reference §4.2)."""
    cpus = host_cpus if host_cpus is not None else os.cpu_count()
    mem = host_mem_mib if host_mem_mib is not None else host_memory_mib()
    wanted = config.vm_defaults
    picked = {
        "vcpu": _pick(wanted.vcpu, None if cpus is None else min(cpus // 4, HEURISTIC_VCPU_CAP), BUILTIN_VCPU),
        "memory_mib": _pick(
            wanted.memory_mib, None if mem is None else min(mem // 8, HEURISTIC_MEMORY_CAP_MIB), BUILTIN_MEMORY_MIB
        ),
        "disk_size_bytes": _pick(wanted.disk_size, None, BUILTIN_DISK_SIZE),
        "system_overlay_size_bytes": _pick(wanted.system_overlay_size, None, BUILTIN_SYSTEM_OVERLAY_SIZE),
    }
    return VmDefaults(
        **{name: value for name, (value, _) in picked.items()},
        provenance=MappingProxyType({name: source for name, (_, source) in picked.items()}),
    )
