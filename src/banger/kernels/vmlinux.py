"""Turn a bzImage (`vmlinuz`) into the uncompressed ELF `vmlinux` that PVH boot needs.

Firecracker, and QEMU's `-M microvm -kernel vmlinux`, enter the kernel through its PVH entry point,
which only the ELF image carries (note XEN_ELFNOTE_PHYS32_ENTRY). A bzImage wraps that ELF in a
compressed payload. The boot header says where the payload is; the magic-number scan of the kernel's
`scripts/extract-vmlinux` is the fallback. Whatever is found is accepted only if it parses as a
complete ELF64 with the PVH note.
"""

from __future__ import annotations

import contextlib
import lzma
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from banger.errors import BangerError
from banger.system.run import run

# A vmlinux is ~50-60 MB; the cap only stops a decompression bomb.
MAX_VMLINUX_BYTES = 1 << 30

ELF_MAGIC = b"\x7fELF"
_PT_LOAD = 1
_PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 0x12


@dataclass(frozen=True)
class _Format:
    name: str
    magic: bytes
    decompress: Callable[[bytes, bool], bytes | None]


def _tool(name: str) -> Callable[[bytes, bool], bytes | None]:
    def decompress(data: bytes, exact: bool) -> bytes | None:
        # With trailing bytes after the stream (a scan hit, or the kernel's appended size) the tools
        # exit non-zero after writing everything; the ELF check decides, not the exit status.
        proc = run([name, "-dc"], input=data, check=exact)
        return proc.stdout or None

    return decompress


def _gzip(data: bytes, exact: bool) -> bytes | None:
    try:
        return zlib.decompressobj(wbits=31).decompress(data, MAX_VMLINUX_BYTES + 1)
    except zlib.error:
        return None


def _xz(data: bytes, exact: bool) -> bytes | None:
    try:
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data, max_length=MAX_VMLINUX_BYTES + 1)
    except lzma.LZMAError:
        return None


FORMATS = (
    _Format("lz4", b"\x02\x21\x4c\x18", _tool("lz4")),
    _Format("zstd", b"\x28\xb5\x2f\xfd", _tool("zstd")),
    _Format("gzip", b"\x1f\x8b\x08", _gzip),
    _Format("xz", b"\xfd\x37\x7a\x58\x5a\x00", _xz),
)


def pvh_entry(elf: bytes) -> int | None:
    """The PVH entry address of a complete little-endian ELF64 image, or None if it has none.

    Raises BangerError if `elf` is not such an image, or is truncated (a segment or note runs past
    the end): a decompressor that stopped early must not pass for a kernel.
    """
    if len(elf) < 64 or elf[:4] != ELF_MAGIC:
        raise BangerError("not an ELF file")
    if elf[4] != 2 or elf[5] != 1:
        raise BangerError("not a little-endian ELF64 file")
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    if phnum == 0 or phentsize < 56 or phoff + phnum * phentsize > len(elf):
        raise BangerError("ELF program headers are missing or truncated")
    entry: int | None = None
    for index in range(phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + index * phentsize
        )
        if p_offset + p_filesz > len(elf):
            raise BangerError(f"ELF segment {index} runs past the end of the file (truncated?)")
        if p_type == _PT_NOTE:
            found = _find_pvh_note(elf, p_offset, p_offset + p_filesz)
            entry = found if found is not None else entry
    return entry


def _find_pvh_note(elf: bytes, start: int, end: int) -> int | None:
    pos = start
    while pos + 12 <= end:
        namesz, descsz, note_type = struct.unpack_from("<III", elf, pos)
        name_at = pos + 12
        desc_at = name_at + ((namesz + 3) & ~3)
        nxt = desc_at + ((descsz + 3) & ~3)
        if nxt > end:
            raise BangerError("ELF note runs past its segment (truncated?)")
        name = elf[name_at : name_at + namesz].rstrip(b"\0")
        if name == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY and descsz in (4, 8):
            return int.from_bytes(elf[desc_at : desc_at + descsz], "little")
        pos = nxt
    return None


def _header_payload(image: bytes) -> tuple[bytes, int] | None:
    """The compressed payload and its uncompressed size, from the x86 boot header (protocol >= 2.08)."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        return None
    (version,) = struct.unpack_from("<H", image, 0x206)
    if version < 0x208:
        return None
    setup_sects = image[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    if payload_length <= 4 or start + payload_length > len(image):
        return None
    payload = image[start : start + payload_length]
    # The kernel build appends the uncompressed size as a little-endian u32 after the stream.
    return payload[:-4], int.from_bytes(payload[-4:], "little")


def _accepted(candidate: bytes | None) -> bytes | None:
    """`candidate` if it is a complete ELF64 kernel with a PVH entry point, else None."""
    if not candidate or len(candidate) > MAX_VMLINUX_BYTES or candidate[:4] != ELF_MAGIC:
        return None
    try:
        return candidate if pvh_entry(candidate) is not None else None
    except BangerError:
        return None


def _candidates(image: bytes) -> list[tuple[int, _Format]]:
    hits: list[tuple[int, _Format]] = []
    for fmt in FORMATS:
        pos = image.find(fmt.magic)
        while pos != -1:
            hits.append((pos, fmt))
            pos = image.find(fmt.magic, pos + 1)
    return sorted(hits, key=lambda hit: hit[0])


def _decompress(image: bytes) -> tuple[bytes, str]:
    header = _header_payload(image)
    if header is not None:
        payload, expected = header
        for fmt in FORMATS:
            if payload.startswith(fmt.magic):
                with contextlib.suppress(BangerError):
                    out = _accepted(fmt.decompress(payload, True))
                    if out is not None and len(out) == expected:
                        return out, f"{fmt.name} payload from the boot header"
    for offset, fmt in _candidates(image):
        out = _accepted(fmt.decompress(image[offset:], False))
        if out is not None:
            return out, f"{fmt.name} stream at offset {offset}"
    tried = ", ".join(f.name for f in FORMATS)
    raise BangerError(
        f"found no {tried} payload that decompresses to an ELF64 kernel with a PVH entry point",
        hint="is this a bzImage of a kernel built with CONFIG_PVH=y?",
    )


def extract_vmlinux(bzimage: Path, out: Path) -> None:
    """Write the ELF kernel inside `bzimage` to `out` (atomically); error if there is none."""
    try:
        image = bzimage.read_bytes()
    except OSError as exc:
        raise BangerError(f"cannot read {bzimage}: {exc.strerror or exc}") from exc
    already = _accepted(image)  # an uncompressed vmlinux passes through
    if already is not None:
        vmlinux = already
    else:
        try:
            vmlinux, _how = _decompress(image)
        except BangerError as exc:
            raise BangerError(f"{bzimage}: {exc.message}", hint=exc.hint) from exc
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_bytes(vmlinux)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
