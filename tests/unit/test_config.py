from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from banger import paths
from banger.config import (
    FILE_SYNC_SETTINGS,
    SETTINGS,
    VM_DEFAULTS_SETTINGS,
    Config,
    FileSyncEntry,
    VmDefaultsConfig,
    host_memory_mib,
    load,
    parse_text,
    resolve_vm_defaults,
)
from banger.errors import ConfigError
from banger.paths import Layout

SOURCE = "/home/u/.config/banger/config.toml"
HOME = Path("/home/u")
GIB = 1 << 30
TOP_KEYS = (
    "log_level, vmm, firecracker_bin, jailer_bin, jailer_enabled, jailer_chroot_base, qemu_bin, vhost_vsock_bin, "
    "ssh_key_path, ssh_wait_timeout, default_image_name, auto_stop_stale_after, stats_poll_interval, metrics_poll_interval, "
    "bridge_name, bridge_ip, cidr, tap_pool_size, default_dns, max_download_bytes, kernel_mirror, vm_defaults, "
    "file_sync"
)


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(
        mode="user",
        config_dir=tmp_path / "config" / "banger",
        state_dir=tmp_path / "state" / "banger",
        cache_dir=tmp_path / "cache" / "banger",
        runtime_dir=tmp_path / "run",
        helper_runtime_dir=tmp_path / "run",
        owner_home=HOME,
    )


def parse(text: str, layout: Layout) -> Config:
    return parse_text(text, layout, SOURCE)


def error_of(text: str, layout: Layout) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse(text, layout)
    return caught.value


# --- The table and its dataclasses agree -----------------------------------------------------------


def test_settings_table_matches_dataclass_fields() -> None:
    assert [f.name for f in dataclasses.fields(Config)] == [s.key for s in SETTINGS]
    assert [f.name for f in dataclasses.fields(VmDefaultsConfig)] == [s.key for s in VM_DEFAULTS_SETTINGS]
    assert [f.name for f in dataclasses.fields(FileSyncEntry)] == [s.key for s in FILE_SYNC_SETTINGS]
    assert all(s.help for s in (*SETTINGS, *VM_DEFAULTS_SETTINGS, *FILE_SYNC_SETTINGS))


# --- Defaults --------------------------------------------------------------------------------------


def test_defaults_with_no_file(layout: Layout) -> None:
    config = load(layout)
    assert config == Config(
        log_level="info",
        vmm="auto",
        firecracker_bin=None,
        jailer_bin=Path("/usr/bin/jailer"),
        jailer_enabled=True,
        jailer_chroot_base=layout.state_dir / "jail",
        qemu_bin=None,
        vhost_vsock_bin=None,
        ssh_key_path=layout.ssh_key,
        ssh_wait_timeout=240.0,
        default_image_name="debian-bookworm",
        auto_stop_stale_after=0.0,
        stats_poll_interval=10.0,
        metrics_poll_interval=10.0,
        bridge_name="br-fc",
        bridge_ip="172.16.0.1",
        cidr=24,
        tap_pool_size=4,
        default_dns="1.1.1.1",
        max_download_bytes=8 * GIB,
        kernel_mirror="http://deb.debian.org/debian",
        vm_defaults=VmDefaultsConfig(None, None, None, None),
        file_sync=(),
    )
    assert str(config.subnet) == "172.16.0.0/24"
    assert parse("", layout) == config
    # A system install's owner owns its state directory, so the jail base sits beside it (root's alone).
    system = paths.resolve_system(Path("/home/owner"))
    assert parse("", system).jailer_chroot_base == system.state_dir.parent / "banger-jail"
    assert parse("# only a comment\n", layout) == config


def test_config_is_frozen(layout: Layout) -> None:
    config = load(layout)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.bridge_name = "br-fc-x"  # type: ignore[misc]


def tree(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_loading_never_writes(layout: Layout, tmp_path: Path) -> None:
    load(layout)
    assert not layout.config_dir.exists()
    assert list(tmp_path.iterdir()) == []

    layout.config_dir.mkdir(parents=True)
    layout.config_file.write_text('bridge_name = "br-fc-x"\n[[file_sync]]\nhost = "~/.aws"\nguest = "~/.aws"\n')
    before = tree(tmp_path)
    assert load(layout).bridge_name == "br-fc-x"
    assert tree(tmp_path) == before
    assert not layout.state_dir.exists()


def test_load_explicit_path(layout: Layout, tmp_path: Path) -> None:
    path = tmp_path / "other.toml"
    path.write_text("tap_pool_size = 9\n")
    assert load(layout, path).tap_pool_size == 9
    assert load(layout, tmp_path / "missing.toml") == load(layout)


def test_load_errors_name_the_file(layout: Layout, tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('bridge_name = "eth0"\n')
    with pytest.raises(ConfigError) as caught:
        load(layout, path)
    assert caught.value.message == (
        f'{path}: bridge_name "eth0" is not allowed (must be "br-fc" or start with "br-fc-")'
    )

    path.write_bytes(b'bridge_name = "br-fc-\xff"\n')
    with pytest.raises(ConfigError) as caught:
        load(layout, path)
    assert caught.value.message == f"{path}: invalid TOML: not UTF-8 (bad byte at offset 21)"

    with pytest.raises(ConfigError) as caught:
        load(layout, tmp_path)  # a directory
    assert caught.value.message == f"{tmp_path}: cannot read: Is a directory"


# --- Good values -----------------------------------------------------------------------------------

GOOD = [
    ('log_level = "debug"', "log_level", "debug"),
    ('log_level = "warn"', "log_level", "warn"),
    ('log_level = "error"', "log_level", "error"),
    ('vmm = "firecracker"', "vmm", "firecracker"),
    ('vmm = "qemu"', "vmm", "qemu"),
    ('firecracker_bin = "/usr/local/bin/firecracker"', "firecracker_bin", Path("/usr/local/bin/firecracker")),
    ('firecracker_bin = "~/bin/firecracker"', "firecracker_bin", HOME / "bin/firecracker"),
    ('jailer_bin = "/opt/fc/jailer"', "jailer_bin", Path("/opt/fc/jailer")),
    ("jailer_enabled = false", "jailer_enabled", False),
    ('jailer_chroot_base = "/srv/jail/"', "jailer_chroot_base", Path("/srv/jail")),
    ('qemu_bin = "/usr/bin/qemu-system-x86_64"', "qemu_bin", Path("/usr/bin/qemu-system-x86_64")),
    ('vhost_vsock_bin = "/usr/local/bin/vhost-device-vsock"', "vhost_vsock_bin",
     Path("/usr/local/bin/vhost-device-vsock")),
    ('vhost_vsock_bin = "~/bin/vhost-device-vsock"', "vhost_vsock_bin", HOME / "bin/vhost-device-vsock"),
    ('ssh_key_path = "~/.ssh/banger"', "ssh_key_path", HOME / ".ssh/banger"),
    ('ssh_key_path = "/etc//banger/./key"', "ssh_key_path", Path("/etc/banger/key")),
    ('ssh_wait_timeout = "10m"', "ssh_wait_timeout", 600.0),
    ('ssh_wait_timeout = "1s"', "ssh_wait_timeout", 1.0),
    ('default_image_name = "alpine-3.19"', "default_image_name", "alpine-3.19"),
    ('auto_stop_stale_after = "0"', "auto_stop_stale_after", 0.0),
    ('auto_stop_stale_after = "24h"', "auto_stop_stale_after", 86400.0),
    ('auto_stop_stale_after = "2h30m"', "auto_stop_stale_after", 9000.0),
    ('stats_poll_interval = "500ms"', "stats_poll_interval", 0.5),
    ('stats_poll_interval = "90s"', "stats_poll_interval", 90.0),
    ('metrics_poll_interval = "1m"', "metrics_poll_interval", 60.0),
    ('bridge_name = "br-fc"', "bridge_name", "br-fc"),
    ('bridge_name = "br-fc-test"', "bridge_name", "br-fc-test"),
    ('bridge_name = "br-fc-123456789"', "bridge_name", "br-fc-123456789"),  # exactly 15
    ('bridge_ip = "10.0.0.1"', "bridge_ip", "10.0.0.1"),
    ('bridge_ip = "172.16.0.254"', "bridge_ip", "172.16.0.254"),
    ("cidr = 16", "cidr", 16),
    ('cidr = "16"', "cidr", 16),
    ("cidr = 8", "cidr", 8),
    ("cidr = 30", "cidr", 30),
    ("tap_pool_size = 0", "tap_pool_size", 0),
    ("tap_pool_size = 64", "tap_pool_size", 64),
    ('default_dns = "9.9.9.9"', "default_dns", "9.9.9.9"),
    ('max_download_bytes = "1G"', "max_download_bytes", GIB),
    ('max_download_bytes = "2T"', "max_download_bytes", 2 << 40),
    ("max_download_bytes = 1048576", "max_download_bytes", 1 << 20),
    ('kernel_mirror = "https://mirror.example.org/debian/"', "kernel_mirror", "https://mirror.example.org/debian"),
    ('kernel_mirror = "http://10.0.0.2:8080/debian"', "kernel_mirror", "http://10.0.0.2:8080/debian"),
    ("file_sync = []", "file_sync", ()),
    ("[vm_defaults]", "vm_defaults", VmDefaultsConfig()),
    ("[vm_defaults]\nvcpu = 64", "vm_defaults", VmDefaultsConfig(vcpu=64)),
    ("[vm_defaults]\nmemory_mib = 128", "vm_defaults", VmDefaultsConfig(memory_mib=128)),
    ('[vm_defaults]\ndisk_size = "512M"', "vm_defaults", VmDefaultsConfig(disk_size=512 << 20)),
    ('[vm_defaults]\ndisk_size = "1073741824"', "vm_defaults", VmDefaultsConfig(disk_size=GIB)),
    ("[vm_defaults]\ndisk_size = 1073741824", "vm_defaults", VmDefaultsConfig(disk_size=GIB)),
    ('[vm_defaults]\nsystem_overlay_size = "2G"', "vm_defaults", VmDefaultsConfig(system_overlay_size=2 * GIB)),
    (
        '[vm_defaults]\nvcpu = 2\nmemory_mib = 1024\ndisk_size = "2G"\nsystem_overlay_size = "2G"',
        "vm_defaults",
        VmDefaultsConfig(2, 1024, 2 * GIB, 2 * GIB),
    ),
]


@pytest.mark.parametrize(("text", "field", "expected"), GOOD)
def test_good_values(layout: Layout, text: str, field: str, expected: object) -> None:
    config = parse(text, layout)
    assert getattr(config, field) == expected
    # Nothing else moved off its default.
    defaults = load(layout)
    others = {f.name for f in dataclasses.fields(Config)} - {field}
    assert {k: getattr(config, k) for k in others} == {k: getattr(defaults, k) for k in others}


def test_cidr_and_bridge_ip_together(layout: Layout) -> None:
    config = parse('bridge_ip = "10.20.0.1"\ncidr = 16', layout)
    assert str(config.subnet) == "10.20.0.0/16"
    assert parse('bridge_ip = "172.16.0.255"\ncidr = 16', layout).bridge_ip == "172.16.0.255"


# --- Bad values: every key, exact one-line message ---------------------------------------------------

URL_REASON = "is not an http:// or https:// URL with a host (and no query or fragment)"
NOT_ABSOLUTE = "is not an absolute path (must be absolute or start with ~/)"
IMAGE_REASON = (
    "is not a valid image name (letters, digits, '.', '-', '_'; must start with a letter or digit; "
    "at most 128 characters)"
)
UNUSABLE_IP = "is not a usable address (loopback, link-local, multicast and reserved are not allowed)"

BAD = [
    ("log_level", 'log_level = "verbose"',
     'log_level "verbose" is not allowed (must be one of "debug", "info", "warn", "error")'),
    ("log_level", 'log_level = "INFO"', 'log_level "INFO" is not allowed (must be one of "debug", "info", "warn", "error")'),
    ("log_level", "log_level = 1", "log_level 1 is an integer; expected a string"),
    ("vmm", 'vmm = "kvm"', 'vmm "kvm" is not allowed (must be one of "auto", "firecracker", "qemu")'),
    ("firecracker_bin", 'firecracker_bin = "firecracker"', f'firecracker_bin "firecracker" {NOT_ABSOLUTE}'),
    ("firecracker_bin", 'firecracker_bin = ""', 'firecracker_bin "" is empty (must be absolute or start with ~/)'),
    ("firecracker_bin", 'firecracker_bin = "~bob/fc"',
     "firecracker_bin \"~bob/fc\" uses ~user (only ~/, the owner's home, is allowed)"),
    ("firecracker_bin", 'firecracker_bin = "/opt/../fc"', 'firecracker_bin "/opt/../fc" has a ".." component (not allowed)'),
    ("firecracker_bin", 'firecracker_bin = "/a\\u0000b"', 'firecracker_bin "/a\\u0000b" contains a NUL character'),
    ("firecracker_bin", 'firecracker_bin = ["/x"]', 'firecracker_bin ["/x"] is an array; expected a path string'),
    ("jailer_bin", 'jailer_bin = "./jailer"', f'jailer_bin "./jailer" {NOT_ABSOLUTE}'),
    ("jailer_enabled", 'jailer_enabled = "yes"', 'jailer_enabled "yes" is a string; expected a boolean (true or false)'),
    ("jailer_enabled", "jailer_enabled = 1", "jailer_enabled 1 is an integer; expected a boolean (true or false)"),
    ("jailer_chroot_base", 'jailer_chroot_base = "jail"', f'jailer_chroot_base "jail" {NOT_ABSOLUTE}'),
    ("qemu_bin", 'qemu_bin = "qemu-system-x86_64"', f'qemu_bin "qemu-system-x86_64" {NOT_ABSOLUTE}'),
    ("vhost_vsock_bin", 'vhost_vsock_bin = "vhost-device-vsock"', f'vhost_vsock_bin "vhost-device-vsock" {NOT_ABSOLUTE}'),
    ("vhost_vsock_bin", 'vhost_vsock_bin = ""', 'vhost_vsock_bin "" is empty (must be absolute or start with ~/)'),
    ("vhost_vsock_bin", 'vhost_vsock_bin = "/usr/../bin/v"', 'vhost_vsock_bin "/usr/../bin/v" has a ".." component (not allowed)'),
    ("vhost_vsock_bin", "vhost_vsock_bin = true", "vhost_vsock_bin true is a boolean; expected a path string"),
    ("ssh_key_path", 'ssh_key_path = "keys/id"', f'ssh_key_path "keys/id" {NOT_ABSOLUTE}'),
    ("ssh_key_path", 'ssh_key_path = "~"', f'ssh_key_path "~" {NOT_ABSOLUTE}'),
    ("ssh_wait_timeout", 'ssh_wait_timeout = "0"', 'ssh_wait_timeout "0" is too short (must be at least 1s)'),
    ("ssh_wait_timeout", "ssh_wait_timeout = 240",
     'ssh_wait_timeout 240 is an integer; expected a duration string such as "10s"'),
    ("ssh_wait_timeout", 'ssh_wait_timeout = "4 minutes"',
     'ssh_wait_timeout "4 minutes" is not a duration (unknown unit " minutes"; use ns, us, ms, s, m or h)'),
    ("default_image_name", 'default_image_name = "../etc"', f'default_image_name "../etc" {IMAGE_REASON}'),
    ("default_image_name", 'default_image_name = ""', f'default_image_name "" {IMAGE_REASON}'),
    ("auto_stop_stale_after", 'auto_stop_stale_after = "-1h"',
     'auto_stop_stale_after "-1h" is negative (use "0" to turn it off)'),
    ("auto_stop_stale_after", 'auto_stop_stale_after = "1d"',
     'auto_stop_stale_after "1d" is not a duration (unknown unit "d"; use ns, us, ms, s, m or h)'),
    ("auto_stop_stale_after", 'auto_stop_stale_after = "10"',
     'auto_stop_stale_after "10" is not a duration (a number is missing its unit, e.g. "10s")'),
    ("auto_stop_stale_after", "auto_stop_stale_after = 0",
     'auto_stop_stale_after 0 is an integer; expected a duration string such as "10s"'),
    ("stats_poll_interval", 'stats_poll_interval = "50ms"',
     'stats_poll_interval "50ms" is too short (must be at least 100ms)'),
    ("stats_poll_interval", 'stats_poll_interval = "2h30"',
     'stats_poll_interval "2h30" is not a duration (a number is missing its unit, e.g. "10s")'),
    ("metrics_poll_interval", 'metrics_poll_interval = "0"',
     'metrics_poll_interval "0" is too short (must be at least 100ms)'),
    ("bridge_name", 'bridge_name = "eth0"', 'bridge_name "eth0" is not allowed (must be "br-fc" or start with "br-fc-")'),
    ("bridge_name", 'bridge_name = "br-fcx"', 'bridge_name "br-fcx" is not allowed (must be "br-fc" or start with "br-fc-")'),
    ("bridge_name", 'bridge_name = "br-fc-abcdefghij"',
     'bridge_name "br-fc-abcdefghij" is 16 characters (max is 15, the Linux interface name limit)'),
    ("bridge_name", 'bridge_name = "br-fc-"',
     'bridge_name "br-fc-" is not allowed (after "br-fc-" come letters, digits, "-" or "_")'),
    ("bridge_name", 'bridge_name = "br-fc-a/b"',
     'bridge_name "br-fc-a/b" is not allowed (after "br-fc-" come letters, digits, "-" or "_")'),
    ("bridge_name", 'bridge_name = "br-fc-\\n"',
     'bridge_name "br-fc-\\n" is not allowed (after "br-fc-" come letters, digits, "-" or "_")'),
    ("bridge_ip", 'bridge_ip = "172.16.0"', 'bridge_ip "172.16.0" is not an IPv4 address'),
    ("bridge_ip", 'bridge_ip = "172.016.0.1"', 'bridge_ip "172.016.0.1" is not an IPv4 address'),
    ("bridge_ip", 'bridge_ip = "fd00::1"', 'bridge_ip "fd00::1" is not an IPv4 address'),
    ("bridge_ip", 'bridge_ip = "127.0.0.1"', f'bridge_ip "127.0.0.1" {UNUSABLE_IP}'),
    ("bridge_ip", 'bridge_ip = "172.16.0.0"',
     'bridge_ip "172.16.0.0" is the network address of 172.16.0.0/24 (must be a host address such as 172.16.0.1)'),
    ("bridge_ip", 'bridge_ip = "172.16.0.255"',
     'bridge_ip "172.16.0.255" is the broadcast address of 172.16.0.0/24 (must be a host address such as 172.16.0.1)'),
    ("bridge_ip", 'bridge_ip = "10.1.255.255"\ncidr = "16"',
     'bridge_ip "10.1.255.255" is the broadcast address of 10.1.0.0/16 (must be a host address such as 10.1.0.1)'),
    ("bridge_ip", "bridge_ip = 10", 'bridge_ip 10 is an integer; expected an IPv4 address string such as "172.16.0.1"'),
    ("cidr", 'cidr = "abc"', 'cidr "abc" is not a prefix length (expected a number from 8 to 30)'),
    ("cidr", 'cidr = "/24"', 'cidr "/24" is not a prefix length (expected a number from 8 to 30)'),
    ("cidr", "cidr = 31", "cidr 31 is out of range (must be 8 to 30)"),
    ("cidr", 'cidr = "7"', 'cidr "7" is out of range (must be 8 to 30)'),
    ("cidr", "cidr = true", 'cidr true is a boolean; expected an integer or numeric string such as 24 or "24"'),
    ("tap_pool_size", "tap_pool_size = 65", "tap_pool_size 65 is out of range (must be 0 to 64)"),
    ("tap_pool_size", "tap_pool_size = -1", "tap_pool_size -1 is out of range (must be 0 to 64)"),
    ("tap_pool_size", 'tap_pool_size = "4"', 'tap_pool_size "4" is a string; expected an integer'),
    ("tap_pool_size", "tap_pool_size = 4.0", "tap_pool_size 4.0 is a float; expected an integer"),
    ("default_dns", 'default_dns = "8.8.8"', 'default_dns "8.8.8" is not an IPv4 address'),
    ("default_dns", 'default_dns = "224.0.0.1"', f'default_dns "224.0.0.1" {UNUSABLE_IP}'),
    ("default_dns", 'default_dns = "0.0.0.0"', f'default_dns "0.0.0.0" {UNUSABLE_IP}'),
    ("max_download_bytes", 'max_download_bytes = "8GB"',
     'max_download_bytes "8GB" is not a size (write "8G"; K, M, G and T already mean KiB, MiB, GiB and TiB)'),
    ("max_download_bytes", 'max_download_bytes = "100K"', 'max_download_bytes "100K" is too small (must be at least 1M)'),
    ("max_download_bytes", "max_download_bytes = -5", "max_download_bytes -5 is too small (must be at least 1M)"),
    ("max_download_bytes", "max_download_bytes = 1.5", 'max_download_bytes 1.5 is a float; expected a size string such as "8G"'),
    ("kernel_mirror", 'kernel_mirror = "ftp://deb.debian.org/debian"', f'kernel_mirror "ftp://deb.debian.org/debian" {URL_REASON}'),
    ("kernel_mirror", 'kernel_mirror = "deb.debian.org/debian"', f'kernel_mirror "deb.debian.org/debian" {URL_REASON}'),
    ("kernel_mirror", 'kernel_mirror = "http:///debian"', f'kernel_mirror "http:///debian" {URL_REASON}'),
    ("kernel_mirror", 'kernel_mirror = "http://h:port/"', f'kernel_mirror "http://h:port/" {URL_REASON}'),
    ("kernel_mirror", 'kernel_mirror = "http://h/d?x=1"', f'kernel_mirror "http://h/d?x=1" {URL_REASON}'),
    ("vm_defaults", "vm_defaults = 1", "vm_defaults 1 is an integer; expected a table ([vm_defaults])"),
    ("vm_defaults.vcpu", "[vm_defaults]\nvcpu = 0", "vm_defaults.vcpu 0 is out of range (must be 1 to 64)"),
    ("vm_defaults.vcpu", "[vm_defaults]\nvcpu = 65", "vm_defaults.vcpu 65 is out of range (must be 1 to 64)"),
    ("vm_defaults.vcpu", '[vm_defaults]\nvcpu = "2"', 'vm_defaults.vcpu "2" is a string; expected an integer'),
    ("vm_defaults.memory_mib", "[vm_defaults]\nmemory_mib = 64",
     "vm_defaults.memory_mib 64 is too small (must be at least 128)"),
    ("vm_defaults.memory_mib", "[vm_defaults]\nmemory_mib = 1024.5",
     "vm_defaults.memory_mib 1024.5 is a float; expected an integer"),
    ("vm_defaults.disk_size", '[vm_defaults]\ndisk_size = "4GiB"',
     'vm_defaults.disk_size "4GiB" is not a size (write "4G"; K, M, G and T already mean KiB, MiB, GiB and TiB)'),
    ("vm_defaults.disk_size", '[vm_defaults]\ndisk_size = "1.5G"',
     'vm_defaults.disk_size "1.5G" is not a size (expected a whole number of bytes, or one with a K, M, G or T '
     'suffix such as "4G")'),
    ("vm_defaults.disk_size", '[vm_defaults]\ndisk_size = "1M"', 'vm_defaults.disk_size "1M" is too small (must be at least 64M)'),
    ("vm_defaults.disk_size", "[vm_defaults]\ndisk_size = true",
     'vm_defaults.disk_size true is a boolean; expected a size string such as "8G"'),
    ("vm_defaults.system_overlay_size", '[vm_defaults]\nsystem_overlay_size = "8 G"',
     'vm_defaults.system_overlay_size "8 G" is not a size (expected a whole number of bytes, or one with a K, M, G '
     'or T suffix such as "4G")'),
    ("vm_defaults.system_overlay_size", '[vm_defaults]\nsystem_overlay_size = "32M"',
     'vm_defaults.system_overlay_size "32M" is too small (must be at least 64M)'),
    ("file_sync", 'file_sync = {host = "/x", guest = "~/x"}',
     'file_sync {host = "/x", guest = "~/x"} is a table; expected an array of tables ([[file_sync]])'),
    ("file_sync", 'file_sync = ["a"]', 'file_sync[0] "a" is a string; expected a table'),
    ("file_sync.host", '[[file_sync]]\nhost = "rel/x"\nguest = "~/x"', f'file_sync[0].host "rel/x" {NOT_ABSOLUTE}'),
    ("file_sync.guest", '[[file_sync]]\nhost = "/x"\nguest = "/etc/x"', 'file_sync[0].guest "/etc/x" must be under ~/ or /root/'),
    ("file_sync.mode", '[[file_sync]]\nhost = "/x"\nguest = "~/x"\nmode = "75"',
     'file_sync[0].mode "75" is not an octal mode (expected 3 or 4 octal digits, e.g. "0644")'),
]  # fmt: skip


@pytest.mark.parametrize(("key", "text", "message"), BAD, ids=[f"{i}-{case[0]}" for i, case in enumerate(BAD)])
def test_bad_values(layout: Layout, key: str, text: str, message: str) -> None:
    error = error_of(text, layout)
    assert error.message == f"{SOURCE}: {message}"
    assert "\n" not in str(error)
    assert error.code == "bad_request"


def test_every_key_has_a_bad_case() -> None:
    covered = {key for key, _, _ in BAD}
    every = {s.key for s in SETTINGS}
    every |= {f"vm_defaults.{s.key}" for s in VM_DEFAULTS_SETTINGS}
    every |= {f"file_sync.{s.key}" for s in FILE_SYNC_SETTINGS}
    assert every - covered == set()


def test_long_values_are_shortened_in_messages(layout: Layout) -> None:
    error = error_of(f'bridge_name = "{"x" * 500}"', layout)
    assert error.message.startswith(f'{SOURCE}: bridge_name "xxx')
    assert "…" in error.message
    assert len(error.message) < 300


# --- Unknown keys and TOML syntax ------------------------------------------------------------------


def test_unknown_top_level_key(layout: Layout) -> None:
    error = error_of('brige_name = "br-fc"', layout)
    assert error.message == f'{SOURCE}: unknown key "brige_name" (allowed: {TOP_KEYS})'
    assert error.hint == 'did you mean "bridge_name"?'


def test_unknown_key_without_near_match_has_no_hint(layout: Layout) -> None:
    error = error_of("zzz = 1", layout)
    assert error.message == f'{SOURCE}: unknown key "zzz" (allowed: {TOP_KEYS})'
    assert error.hint is None


def test_removed_key_says_to_delete_it(layout: Layout) -> None:
    error = error_of('default_kernel = "/boot/vmlinuz"', layout)
    assert error.message == f'{SOURCE}: unknown key "default_kernel" (allowed: {TOP_KEYS})'
    assert error.hint == "default_kernel was removed from banger; delete it"


def test_unknown_key_in_tables(layout: Layout) -> None:
    error = error_of("[vm_defaults]\ncpus = 2", layout)
    assert error.message == (
        f'{SOURCE}: unknown key "vm_defaults.cpus" (allowed: vcpu, memory_mib, disk_size, system_overlay_size)'
    )
    assert error.hint == 'did you mean "vcpu"?'
    text = '[[file_sync]]\nhost = "/a"\nguest = "~/a"\n[[file_sync]]\nhost = "/b"\nguest = "~/b"\nmod = "0644"'
    error = error_of(text, layout)
    assert error.message == f'{SOURCE}: unknown key "file_sync[1].mod" (allowed: host, guest, mode)'
    assert error.hint == 'did you mean "mode"?'


def test_unknown_key_is_reported_even_with_other_errors_after_it(layout: Layout) -> None:
    error = error_of('tap_pool_size = 4\nlog_levle = "debug"\nbridge_name = "eth0"', layout)
    assert error.message.startswith(f'{SOURCE}: unknown key "log_levle"')


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bridge_name = ", "end of file: invalid TOML: Invalid value"),
        ("[vm_defaults\nvcpu = 1", "line 1, column 13: invalid TOML: Expected ']' at the end of a table declaration"),
        ('tap_pool_size = 1 2\nbridge_name = "x"',
         "line 1, column 19: invalid TOML: Expected newline or end of document after a statement"),
        ("tap_pool_size = 1\ntap_pool_size = 2", "end of file: invalid TOML: Cannot overwrite a value"),
        ('bridge_name = "br-fc\n"', "line 1, column 21: invalid TOML: Illegal character '\\n'"),
    ],
)  # fmt: skip
def test_toml_syntax_errors_are_one_line(layout: Layout, text: str, message: str) -> None:
    error = error_of(text, layout)
    assert error.message == f"{SOURCE}: {message}"
    assert "\n" not in error.message


# --- [[file_sync]] ---------------------------------------------------------------------------------


def test_file_sync_entries(layout: Layout) -> None:
    text = """
[[file_sync]]
host = "~/.local/share/opencode/auth.json"
guest = "~/.local/share/opencode/auth.json"
[[file_sync]]
host = "~/.aws/"
guest = "/root/.aws"
[[file_sync]]
host = "/home/u/bin/my-script"
guest = "~/bin//./my-script"
mode = "0755"
[[file_sync]]
host = "/etc/gitconfig"
guest = "~/.gitconfig"
mode = "644"
[[file_sync]]
host = "/usr/local/bin/tool"
guest = "/root/bin/tool"
mode = "4755"
"""
    assert parse(text, layout).file_sync == (
        FileSyncEntry(HOME / ".local/share/opencode/auth.json", "/root/.local/share/opencode/auth.json", None),
        FileSyncEntry(HOME / ".aws", "/root/.aws", None),
        FileSyncEntry(Path("/home/u/bin/my-script"), "/root/bin/my-script", 0o755),
        FileSyncEntry(Path("/etc/gitconfig"), "/root/.gitconfig", 0o644),
        FileSyncEntry(Path("/usr/local/bin/tool"), "/root/bin/tool", 0o4755),
    )


def test_file_sync_host_expands_against_owner_home_not_process_home(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", "/root")
    entry = parse('[[file_sync]]\nhost = "~/x"\nguest = "~/x"', layout).file_sync[0]
    assert entry.host == Path("/home/u/x")


FILE_SYNC_BAD = [
    ('host = ""', 'guest = "~/x"', 'host "" is empty (must be absolute or start with ~/)'),
    ('host = "rel/x"', 'guest = "~/x"', f'host "rel/x" {NOT_ABSOLUTE}'),
    ('host = "~"', 'guest = "~/x"', f'host "~" {NOT_ABSOLUTE}'),
    ('host = "~bob/x"', 'guest = "~/x"', "host \"~bob/x\" uses ~user (only ~/, the owner's home, is allowed)"),
    ('host = "~/a/../b"', 'guest = "~/x"', 'host "~/a/../b" has a ".." component (not allowed)'),
    ('host = "/a/.."', 'guest = "~/x"', 'host "/a/.." has a ".." component (not allowed)'),
    ("host = 5", 'guest = "~/x"', "host 5 is an integer; expected a path string"),
    ('host = "/x"', 'guest = ""', 'guest "" is empty (must be under ~/ or /root/)'),
    ('host = "/x"', 'guest = "x"', 'guest "x" must be under ~/ or /root/'),
    ('host = "/x"', 'guest = "/etc/x"', 'guest "/etc/x" must be under ~/ or /root/'),
    ('host = "/x"', 'guest = "/rootx/y"', 'guest "/rootx/y" must be under ~/ or /root/'),
    ('host = "/x"', 'guest = "/root"', 'guest "/root" must be under ~/ or /root/'),
    ('host = "/x"', 'guest = "/root/"', 'guest "/root/" must be under ~/ or /root/'),
    ('host = "/x"', 'guest = "~/"', 'guest "~/" must be under ~/ or /root/'),
    ('host = "/x"', 'guest = "~"', 'guest "~" must be under ~/ or /root/'),
    ('host = "/x"', 'guest = "~bob/x"', "guest \"~bob/x\" uses ~user (only ~/, the owner's home, is allowed)"),
    ('host = "/x"', 'guest = "/root/../etc/x"', 'guest "/root/../etc/x" has a ".." component (not allowed)'),
    ('host = "/x"', 'guest = "~/x\\u0000"', 'guest "~/x\\u0000" contains a NUL character'),
    ('host = "/x"\nmode = "755x"', 'guest = "~/x"',
     'mode "755x" is not an octal mode (expected 3 or 4 octal digits, e.g. "0644")'),
    ('host = "/x"\nmode = "07555"', 'guest = "~/x"',
     'mode "07555" is not an octal mode (expected 3 or 4 octal digits, e.g. "0644")'),
    ('host = "/x"\nmode = "0855"', 'guest = "~/x"',
     'mode "0855" is not an octal mode (expected 3 or 4 octal digits, e.g. "0644")'),
    ('host = "/x"\nmode = ""', 'guest = "~/x"',
     'mode "" is not an octal mode (expected 3 or 4 octal digits, e.g. "0644")'),
    ('host = "/x"\nmode = 493', 'guest = "~/x"', 'mode 493 is an integer; expected an octal string such as "0755"'),
]  # fmt: skip


@pytest.mark.parametrize(("host", "guest", "message"), FILE_SYNC_BAD)
def test_file_sync_rejections_name_the_entry_index(layout: Layout, host: str, guest: str, message: str) -> None:
    good = '[[file_sync]]\nhost = "~/ok"\nguest = "~/ok"\n'
    text = good * 2 + f"[[file_sync]]\n{host}\n{guest}\n" + good
    assert error_of(text, layout).message == f"{SOURCE}: file_sync[2].{message}"


def test_file_sync_missing_keys(layout: Layout) -> None:
    assert error_of('[[file_sync]]\nhost = "/x"', layout).message == (
        f'{SOURCE}: file_sync[0] is missing required key "guest"'
    )
    assert error_of('[[file_sync]]\nhost = "/a"\nguest = "~/a"\n[[file_sync]]\nguest = "~/x"', layout).message == (
        f'{SOURCE}: file_sync[1] is missing required key "host"'
    )


# --- [vm_defaults] resolution ----------------------------------------------------------------------


def test_vm_defaults_from_host_heuristic(layout: Layout) -> None:
    resolved = resolve_vm_defaults(load(layout), host_cpus=16, host_mem_mib=32768)
    assert (resolved.vcpu, resolved.memory_mib) == (4, 4096)
    assert (resolved.disk_size_bytes, resolved.system_overlay_size_bytes) == (8 * GIB, 8 * GIB)
    assert dict(resolved.provenance) == {
        "vcpu": "host heuristic",
        "memory_mib": "host heuristic",
        "disk_size_bytes": "builtin",
        "system_overlay_size_bytes": "builtin",
    }


def test_vm_defaults_heuristic_is_capped(layout: Layout) -> None:
    resolved = resolve_vm_defaults(load(layout), host_cpus=128, host_mem_mib=512 * 1024)
    assert (resolved.vcpu, resolved.memory_mib) == (4, 8192)
    assert resolved.provenance["vcpu"] == resolved.provenance["memory_mib"] == "host heuristic"


@pytest.mark.parametrize(
    ("cpus", "mem", "vcpu", "memory", "vcpu_from", "memory_from"),
    [
        (2, 4096, 1, 1024, "builtin", "builtin"),  # 2/4 = 0 and 4096/8 = 512: below the floors
        (1, 1000, 1, 1024, "builtin", "builtin"),
        (4, 8192, 1, 1024, "host heuristic", "host heuristic"),  # exactly the floor
        (8, 12000, 2, 1500, "host heuristic", "host heuristic"),
        (3, 16384, 1, 2048, "builtin", "host heuristic"),
    ],
)
def test_vm_defaults_never_below_the_floor(
    layout: Layout, cpus: int, mem: int, vcpu: int, memory: int, vcpu_from: str, memory_from: str
) -> None:
    resolved = resolve_vm_defaults(load(layout), host_cpus=cpus, host_mem_mib=mem)
    assert (resolved.vcpu, resolved.memory_mib) == (vcpu, memory)
    assert (resolved.provenance["vcpu"], resolved.provenance["memory_mib"]) == (vcpu_from, memory_from)


def test_vm_defaults_from_config_win(layout: Layout) -> None:
    config = parse('[vm_defaults]\nvcpu = 2\nmemory_mib = 1024\ndisk_size = "2G"\nsystem_overlay_size = "2G"', layout)
    resolved = resolve_vm_defaults(config, host_cpus=64, host_mem_mib=262144)
    assert (resolved.vcpu, resolved.memory_mib) == (2, 1024)
    assert (resolved.disk_size_bytes, resolved.system_overlay_size_bytes) == (2 * GIB, 2 * GIB)
    assert set(resolved.provenance.values()) == {"config"}


def test_vm_defaults_mixed_provenance(layout: Layout) -> None:
    config = parse('[vm_defaults]\nmemory_mib = 200\ndisk_size = "100G"', layout)
    resolved = resolve_vm_defaults(config, host_cpus=2, host_mem_mib=65536)
    assert (resolved.vcpu, resolved.memory_mib, resolved.disk_size_bytes) == (1, 200, 100 * GIB)
    assert dict(resolved.provenance) == {
        "vcpu": "builtin",
        "memory_mib": "config",
        "disk_size_bytes": "config",
        "system_overlay_size_bytes": "builtin",
    }


def test_vm_defaults_provenance_is_read_only(layout: Layout) -> None:
    resolved = resolve_vm_defaults(load(layout), host_cpus=8, host_mem_mib=8192)
    with pytest.raises(TypeError):
        resolved.provenance["vcpu"] = "config"  # type: ignore[index]


def test_vm_defaults_detects_this_host(layout: Layout) -> None:
    resolved = resolve_vm_defaults(load(layout))
    cpus = os.cpu_count() or 1
    assert resolved.vcpu == max(1, min(cpus // 4, 4))
    assert 1024 <= resolved.memory_mib <= 8192
    assert set(resolved.provenance) == {"vcpu", "memory_mib", "disk_size_bytes", "system_overlay_size_bytes"}


def test_host_memory_mib(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16318412 kB\nMemFree:         1000000 kB\n")
    assert host_memory_mib(meminfo) == 16318412 // 1024
    meminfo.write_text("MemFree:         1000000 kB\n")
    assert host_memory_mib(meminfo) is None
    assert host_memory_mib(tmp_path / "absent") is None
    real = host_memory_mib()
    assert real is not None and real > 0
