"""The mini initramfs for distribution kernels: busybox, the virtio modules, and a tiny /init.

Debian's kernels build virtio (blk, net, console, vsock, mmio) as modules, so they cannot mount a root
disk without an initramfs. Debian's own initramfs loads drivers on demand through udev, which misses
virtio_console when the root filesystem has no /lib/modules, and it is 10x bigger and slower. This one
preloads the modules in dependency order and switch_roots (this-machine.md §3).

The newc cpio archive is written here rather than with `cpio`: the format is a fixed ASCII header per
file, and writing it ourselves makes the archive reproducible (uid/gid 0, fixed mtimes, sorted order).
"""

from __future__ import annotations

import gzip
import lzma
import os
import stat
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from banger.errors import BangerError, NotFound
from banger.system.run import run

DEFAULT_MODULES = (
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "vmw_vsock_virtio_transport",
    "virtio-rng",
    # banger-init joins the read-only image and the VM's writable layer with overlayfs after
    # switch_root, where the image has no modules for this kernel: load it here.
    "overlay",
)
BUSYBOX_APPLETS = ("sh", "mount", "umount", "insmod", "switch_root", "sleep", "cat", "findfs", "ls", "dmesg")
_GZIP_LEVEL = 6
_MODULE_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")

INIT_SCRIPT = r"""#!/bin/sh
# banger mini initramfs: load the virtio drivers, mount the root filesystem, switch_root.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
read -r cmdline </proc/cmdline
# insmod, unlike modprobe, does not look for `<module>.<param>=` on the kernel command line itself;
# Firecracker describes its virtio-mmio devices that way (virtio_mmio.device=4K@0xd0000000:5).
for m in $(cat /lib/modules/load-order); do
    name=${m##*/}; name=${name%%.ko*}; params=
    for x in $cmdline; do
        case $x in "$name".*=*) params="$params ${x#"$name".}" ;; esac
    done
    insmod /lib/modules/$m $params || echo "initrd: insmod $m failed"
done
root=/dev/vda; init=/sbin/init; fstype=ext4; mode=rw; flags=; rdshell=
for x in $cmdline; do
    case $x in
        root=*) root=${x#root=} ;;
        init=*) init=${x#init=} ;;
        rootfstype=*) fstype=${x#rootfstype=} ;;
        rootflags=*) flags=${x#rootflags=} ;;
        ro) mode=ro ;;
        rw) mode=rw ;;
        rdshell) rdshell=1 ;;
    esac
done
[ -n "$rdshell" ] && exec sh
resolve() {
    case $1 in
        UUID=*|LABEL=*) findfs "$1" 2>/dev/null ;;
        *) echo "$1" ;;
    esac
}
i=0
while :; do
    dev=$(resolve "$root")
    [ -n "$dev" ] && [ -b "$dev" ] && break
    if [ $i -ge 200 ]; then
        echo "initrd: root device $root did not appear within 10 s"
        exec sh
    fi
    sleep 0.05
    i=$((i + 1))
done
opts=$mode
[ -n "$flags" ] && opts=$opts,$flags
mount -t "$fstype" -o "$opts" "$dev" /newroot || { echo "initrd: cannot mount $dev ($fstype, $opts)"; exec sh; }
umount /proc /sys
mount --move /dev /newroot/dev || umount /dev
exec switch_root /newroot "$init"
"""


# --- newc cpio -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpioEntry:
    name: str  # relative, no leading '/', e.g. "bin/busybox"
    mode: int  # full st_mode: file type bits | permissions
    data: bytes = b""  # file contents, or the target of a symlink
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of a device node


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _header(
    ino: int, mode: int, nlink: int, mtime: int, size: int, rdev: tuple[int, int], namesize: int
) -> bytes:
    fields = (ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdev[0], rdev[1], namesize, 0)
    return b"070701" + b"".join(b"%08x" % value for value in fields)


def write_newc(entries: Iterable[CpioEntry], mtime: int = 0) -> bytes:
    """A newc ("070701") cpio archive of `entries`, in the given order, owned by root, with a trailer."""
    out = bytearray()
    for ino, entry in enumerate(entries, start=1):
        parts = entry.name.split("/")
        if not entry.name or entry.name.startswith("/") or ".." in parts or "" in parts:
            raise BangerError(f"cpio entry name {entry.name!r} must be a relative path without '..'")
        if stat.S_ISDIR(entry.mode) and entry.data:
            raise BangerError(f"cpio directory {entry.name!r} cannot have data")
        name = entry.name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        out += _header(ino, entry.mode, nlink, mtime, len(entry.data), entry.rdev, len(name))
        out += name + _pad4(110 + len(name))
        out += entry.data + _pad4(len(entry.data))
    trailer = b"TRAILER!!!\0"
    out += _header(0, 0, 1, 0, 0, (0, 0), len(trailer)) + trailer + _pad4(110 + len(trailer))
    return bytes(out)


# --- modules -------------------------------------------------------------------------------------------


def module_name(path: str) -> str:
    """'kernel/drivers/char/hw_random/virtio-rng.ko.xz' -> 'virtio-rng'."""
    base = path.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def _key(name: str) -> str:
    # The kernel treats '-' and '_' in module names as the same character.
    return module_name(name).replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """modules.dep: module path -> the paths it depends on."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        path, sep, rest = line.partition(":")
        if sep and path.strip():
            deps[path.strip()] = rest.split()
    return deps


def resolve_load_order(
    deps: dict[str, list[str]], builtin: Iterable[str], wanted: Sequence[str]
) -> list[str]:
    """Module paths to insmod, dependencies first. Built-in modules are skipped; unknown ones are errors."""
    by_key = {_key(path): path for path in deps}
    builtin_keys = {_key(name) for name in builtin}
    order: list[str] = []
    visiting: set[str] = set()

    def visit(path: str) -> None:
        if path in order:
            return
        if path in visiting:
            raise BangerError(f"modules.dep has a dependency cycle through {path}")
        visiting.add(path)
        for dep in deps.get(path, []):
            visit(dep)
        visiting.discard(path)
        order.append(path)

    for name in wanted:
        key = _key(name)
        if key in by_key:
            visit(by_key[key])
        elif key not in builtin_keys:
            raise NotFound(f"kernel module {name!r} is neither in modules.dep nor built into the kernel")
    return order


def _module_bytes(path: Path) -> bytes:
    """The module file uncompressed: busybox insmod hands the bytes to init_module() as they are."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        import zstandard

        return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(data))
    return data


def find_modules_dir(modules_root: Path, kernel_version: str) -> tuple[Path, Path]:
    """(depmod base, modules dir): modules live in lib/modules or, on merged-/usr trees, usr/lib/modules."""
    for base in (modules_root, modules_root / "usr"):
        directory = base / "lib" / "modules" / kernel_version
        if directory.is_dir():
            return base, directory
    raise NotFound(
        f"no lib/modules/{kernel_version} or usr/lib/modules/{kernel_version} under {modules_root}"
    )


def _check_static(busybox: Path, data: bytes) -> None:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BangerError(f"{busybox} is not a 64-bit little-endian ELF executable")
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for index in range(phnum):
        (p_type,) = struct.unpack_from("<I", data, phoff + index * phentsize)
        if p_type == 3:  # PT_INTERP: needs a dynamic loader the initramfs does not have
            raise BangerError(f"{busybox} is dynamically linked", hint="install busybox-static")


# --- the archive ---------------------------------------------------------------------------------------


def build_mini_initrd(
    modules_root: Path, kernel_version: str, out: Path, busybox: Path = Path("/bin/busybox")
) -> list[str]:
    """Write a gzip'd newc initramfs for `kernel_version` to `out`; return the module load order."""
    base, moddir = find_modules_dir(modules_root, kernel_version)
    try:
        busybox_bytes = busybox.read_bytes()
    except OSError as exc:
        raise NotFound(
            f"cannot read busybox at {busybox}: {exc.strerror or exc}", hint="install busybox-static"
        ) from exc
    _check_static(busybox, busybox_bytes)

    # The .deb ships no modules.dep; depmod writes it into the unpacked tree.
    run(["depmod", "-b", base.resolve(), kernel_version])
    deps = parse_modules_dep((moddir / "modules.dep").read_text())
    builtin_file = moddir / "modules.builtin"
    builtin = builtin_file.read_text().split() if builtin_file.is_file() else []
    order = resolve_load_order(deps, builtin, DEFAULT_MODULES)

    directory = stat.S_IFDIR | 0o755
    entries = [
        CpioEntry(d, directory) for d in ("bin", "dev", "lib", "lib/modules", "newroot", "proc", "sys")
    ]
    entries.append(CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox_bytes))
    entries += [CpioEntry(f"bin/{applet}", stat.S_IFLNK | 0o777, b"busybox") for applet in BUSYBOX_APPLETS]
    names: list[str] = []
    for rel in order:
        name = module_name(rel)
        if name in names:
            raise BangerError(f"two modules named {name!r} in the load order of {kernel_version}")
        names.append(name)
        entries.append(CpioEntry(f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, _module_bytes(moddir / rel)))
    load_order = "".join(f"{name}.ko\n" for name in names).encode()
    entries.append(CpioEntry("lib/modules/load-order", stat.S_IFREG | 0o644, load_order))
    entries.append(CpioEntry("init", stat.S_IFREG | 0o755, INIT_SCRIPT.encode()))

    archive = gzip.compress(write_newc(entries), compresslevel=_GZIP_LEVEL, mtime=0)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_bytes(archive)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return names
