"""Pure parts of the kernel pipeline on fixture text: InRelease/Release/Packages parsing, Depends
resolution, dpkg version order, gpgv verdicts, modules.dep ordering, the ELF/PVH check, the catalog."""

from __future__ import annotations

import gzip
import json
import lzma
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from banger.errors import BangerError, NotFound
from banger.kernels import catalog as cat
from banger.kernels.debian import check_gpgv_output
from banger.kernels.debian_index import (
    DebPackage,
    Relation,
    check_release,
    compare_versions,
    packages_index,
    parse_clearsigned,
    parse_deb822,
    parse_relations,
    parse_release,
    select_kernel_package,
)
from banger.kernels.initrd import module_name, parse_modules_dep, resolve_load_order
from banger.kernels.vmlinux import extract_vmlinux, pvh_entry

SHA_A = "a" * 64
SHA_B = "b" * 64

RELEASE = f"""Origin: Debian
Suite: oldstable
Codename: bookworm
Date: Sat, 11 Jul 2026 10:16:37 UTC
Acquire-By-Hash: yes
Architectures: all amd64
Components: main
Description: Debian 12.15 Released 11 July 2026
MD5Sum:
 0ed6d4c8891eb86358b94bb35d9e4da4  1484322 main/binary-amd64/Packages
SHA256:
 {SHA_A} 50060337 main/binary-amd64/Packages
 {SHA_B}  8790396 main/binary-amd64/Packages.xz
 {"c" * 64}   12084798 main/binary-amd64/Packages.gz
"""

SIGNATURE = """-----BEGIN PGP SIGNATURE-----

iQIzBAEBCAAdFiEETLUBkCB7R1ij9zp5btDnuCZD4TEFAmpSGCcACgkQbtDnuCZD
=AfjX
-----END PGP SIGNATURE-----
"""


def clearsigned(body: str) -> str:
    return "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n" + body + SIGNATURE


def stanza(name: str, version: str, depends: str = "", arch: str = "amd64", **extra: str) -> str:
    lines = [f"Package: {name}", f"Version: {version}", f"Architecture: {arch}"]
    if depends:
        lines.append(f"Depends: {depends}")
    lines += [
        "Description: something",
        " long description",
        " .",
        " more",
        f"Filename: {extra.get('filename', f'pool/main/l/linux-signed-amd64/{name}_{version}_{arch}.deb')}",
        f"Size: {extra.get('size', '26484304')}",
        f"SHA256: {extra.get('sha256', SHA_A)}",
    ]
    return "\n".join(lines) + "\n"


def packages(*stanzas: str) -> str:
    return "\n".join(stanzas)


META_50 = stanza("linux-image-cloud-amd64", "6.1.176-1", "linux-image-6.1.0-50-cloud-amd64 (= 6.1.176-1)")
KERNEL_47 = stanza(
    "linux-image-6.1.0-47-cloud-amd64", "6.1.164-1", "kmod, linux-base (>= 4.3~)", sha256=SHA_B
)
KERNEL_50 = stanza(
    "linux-image-6.1.0-50-cloud-amd64",
    "6.1.176-1",
    "kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool",
)
NOISE = packages(
    stanza("linux-image-6.1.0-50-cloud-amd64-unsigned", "6.1.176-1"),
    stanza("linux-image-6.1.0-50-cloud-amd64-dbg", "6.1.176-1"),
    stanza("linux-image-cloud-amd64-dbg", "6.1.176-1", "linux-image-6.1.0-50-cloud-amd64-dbg (= 6.1.176-1)"),
    stanza("zsh", "5.9-4"),
)


# --- clear-signed messages ------------------------------------------------------------------------------


def test_clearsigned_body_and_dash_escapes() -> None:
    body = "Origin: Debian\n- -----not armor\nCodename: bookworm\n"
    assert parse_clearsigned(clearsigned(body)) == "Origin: Debian\n-----not armor\nCodename: bookworm\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Origin: Evil\n" + clearsigned("Origin: Debian\n"), "not a clear-signed message"),
        (clearsigned("Origin: Debian\n") + "Origin: Evil\n", "data after its signature"),
        (clearsigned("Origin: Debian\n") + clearsigned("Origin: Evil\n"), "data after its signature"),
        ("-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nOrigin: Debian\n", "no signature block"),
        (clearsigned("Origin: Debian\n-----BEGIN PGP SIGNED MESSAGE-----\n"), "unexpected armor line"),
        ("-----BEGIN PGP SIGNED MESSAGE-----\nComment: x\n\nA: b\n" + SIGNATURE, "unexpected armor header"),
        (clearsigned("Origin: Debian\n").replace("-----END PGP SIGNATURE-----\n", ""), "not terminated"),
    ],
)
def test_clearsigned_strictness(text: str, message: str) -> None:
    with pytest.raises(BangerError, match=message):
        parse_clearsigned(text)


# --- Release ---------------------------------------------------------------------------------------------


def test_parse_release_table_and_dates() -> None:
    release = parse_release(RELEASE)
    assert release.fields["Codename"] == "bookworm"
    assert release.acquire_by_hash
    assert release.date == datetime(2026, 7, 11, 10, 16, 37, tzinfo=UTC)
    assert release.valid_until is None
    assert release.sha256["main/binary-amd64/Packages.xz"].sha256 == SHA_B
    assert release.sha256["main/binary-amd64/Packages.xz"].size == 8790396
    assert packages_index(release, "main", "amd64").path == "main/binary-amd64/Packages.xz"


def test_packages_index_falls_back_to_gz_and_plain() -> None:
    text = RELEASE.replace(f" {SHA_B}  8790396 main/binary-amd64/Packages.xz\n", "")
    assert packages_index(parse_release(text), "main", "amd64").path == "main/binary-amd64/Packages.gz"
    with pytest.raises(NotFound, match="contrib/binary-arm64"):
        packages_index(parse_release(text), "contrib", "arm64")


def test_check_release_suite_and_expiry() -> None:
    now = datetime(2026, 7, 12, tzinfo=UTC)
    release = parse_release(RELEASE)
    check_release(release, "bookworm", now)
    check_release(release, "oldstable", now)
    with pytest.raises(BangerError, match="not 'trixie'"):
        check_release(release, "trixie", now)
    expiring = parse_release(
        RELEASE.replace("Acquire-By-Hash", "Valid-Until: Sat, 11 Jul 2026 12:00:00 UTC\nAcquire-By-Hash")
    )
    check_release(expiring, "bookworm", datetime(2026, 7, 11, 11, tzinfo=UTC))
    with pytest.raises(BangerError, match="expired at 2026-07-11T12:00:00"):
        check_release(expiring, "bookworm", now)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (RELEASE.replace(f" {SHA_B}  8790396", f" {SHA_B[:-1]}  8790396"), "SHA256 line is malformed"),
        (RELEASE.replace("8790396", "87x0396"), "SHA256 line is malformed"),
        (RELEASE.replace("Date: Sat, 11 Jul 2026 10:16:37 UTC", "Date: yesterday"), "Date 'yesterday'"),
        (RELEASE + "\nOrigin: Evil\n", "2 stanzas"),
        ("Origin: Debian\n", "no SHA256 entries"),
    ],
)
def test_parse_release_rejects(text: str, message: str) -> None:
    with pytest.raises(BangerError, match=message):
        parse_release(text)


# --- deb822 --------------------------------------------------------------------------------------------


def test_deb822_stanzas_and_continuations() -> None:
    parsed = parse_deb822("# comment\nA: 1\nB:\n x\n .\n y\n\n\n\nA: 2\n")
    assert parsed == [{"A": "1", "B": "\nx\n\ny"}, {"A": "2"}]  # the empty first line is kept


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (" orphan\n", "continuation line without a field"),
        ("A: 1\nnot a field\n", "expected 'Field: value'"),
        ("A: 1\nA: 2\n", "appears twice"),
    ],
)
def test_deb822_rejects(text: str, message: str) -> None:
    with pytest.raises(BangerError, match=message):
        parse_deb822(text)


# --- relations and versions -----------------------------------------------------------------------------


def test_parse_relations() -> None:
    groups = parse_relations(
        "kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool,\n"
        " foo:any (<< 2) [amd64] <!nocheck>, bar (> 1)"
    )
    assert groups == [
        [Relation("kmod")],
        [Relation("linux-base", ">=", "4.3~")],
        [Relation("initramfs-tools", ">=", "0.120+deb8u2"), Relation("linux-initramfs-tool")],
        [Relation("foo", "<<", "2")],
        [Relation("bar", ">=", "1")],
    ]
    with pytest.raises(BangerError, match="cannot parse"):
        parse_relations("Bad Name")


@pytest.mark.parametrize(
    ("a", "b", "sign"),
    [
        ("1.0", "1.0", 0),
        ("1.0~rc1", "1.0", -1),
        ("1:0.1", "2.0", 1),
        ("6.1.176-1", "6.1.164-1", 1),
        ("6.1.176-1", "6.1.176-1~bpo12+1", 1),
        ("1.0a", "1.0", 1),
        ("1.0+b1", "1.0", 1),
        ("2.0", "10.0", -1),
        ("1.01", "1.1", 0),
        ("6.12.117-1", "6.1.176-1", 1),
        ("1.0-1", "1.0", 1),
        ("a", "~", 1),
        ("1.0.", "1.0~", 1),
    ],
)
def test_compare_versions(a: str, b: str, sign: int) -> None:
    cmp = compare_versions(a, b)
    assert (cmp > 0) - (cmp < 0) == sign
    back = compare_versions(b, a)
    assert (back > 0) - (back < 0) == -sign


# --- following the meta package ---------------------------------------------------------------------------


def test_select_follows_meta_depends() -> None:
    pkg = select_kernel_package(packages(NOISE, KERNEL_47, META_50, KERNEL_50), "linux-image-cloud-amd64")
    assert pkg == DebPackage(
        name="linux-image-6.1.0-50-cloud-amd64",
        version="6.1.176-1",
        filename="pool/main/l/linux-signed-amd64/linux-image-6.1.0-50-cloud-amd64_6.1.176-1_amd64.deb",
        sha256=SHA_A,
        size=26484304,
    )


def test_select_trixie_style_names() -> None:
    meta = stanza(
        "linux-image-cloud-amd64", "6.12.117-1", "linux-image-6.12.117+deb13-cloud-amd64 (= 6.12.117-1)"
    )
    kernel = stanza("linux-image-6.12.117+deb13-cloud-amd64", "6.12.117-1", "kmod")
    assert (
        select_kernel_package(packages(meta, kernel), "linux-image-cloud-amd64").name
        == kernel.split("\n")[0][9:]
    )


def test_select_highest_of_several_candidates() -> None:
    meta = stanza(
        "linux-image-cloud-amd64",
        "6.1.176-1",
        "linux-image-6.1.0-47-cloud-amd64 | linux-image-6.1.0-50-cloud-amd64, kmod",
    )
    pkg = select_kernel_package(packages(KERNEL_50, KERNEL_47, meta), "linux-image-cloud-amd64")
    assert pkg.name == "linux-image-6.1.0-50-cloud-amd64"


def test_select_respects_exact_version_and_picks_highest_meta() -> None:
    old_meta = stanza(
        "linux-image-cloud-amd64", "6.1.170-1", "linux-image-6.1.0-50-cloud-amd64 (= 6.1.170-1)"
    )
    newer_build = stanza("linux-image-6.1.0-50-cloud-amd64", "6.1.180-1", "kmod", sha256=SHA_B)
    text = packages(old_meta, META_50, newer_build, KERNEL_50)
    pkg = select_kernel_package(text, "linux-image-cloud-amd64")
    assert (pkg.version, pkg.sha256) == ("6.1.176-1", SHA_A)  # (= 6.1.176-1) excludes 6.1.180-1
    unconstrained = stanza("linux-image-cloud-amd64", "6.1.176-1", "linux-image-6.1.0-50-cloud-amd64")
    assert (
        select_kernel_package(
            packages(unconstrained, newer_build, KERNEL_50), "linux-image-cloud-amd64"
        ).version
        == "6.1.180-1"
    )


def test_select_ignores_other_architectures() -> None:
    arm = stanza("linux-image-6.1.0-50-cloud-amd64", "6.1.190-1", "kmod", arch="arm64")
    pkg = select_kernel_package(packages(META_50, arm, KERNEL_50), "linux-image-cloud-amd64")
    assert pkg.version == "6.1.176-1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (packages(KERNEL_50), "'linux-image-cloud-amd64' not found"),
        (
            packages(stanza("linux-image-cloud-amd64", "1", "kmod, linux-base"), KERNEL_50),
            "depends on no linux-image",
        ),
        (packages(META_50, KERNEL_47), "which the amd64 index does not have"),
        (
            packages(
                META_50, stanza("linux-image-6.1.0-50-cloud-amd64", "6.1.176-1", filename="../../etc/x.deb")
            ),
            "unsafe Filename",
        ),
        (
            packages(META_50, stanza("linux-image-6.1.0-50-cloud-amd64", "6.1.176-1", sha256="abc")),
            "malformed SHA256",
        ),
        (
            packages(META_50, stanza("linux-image-6.1.0-50-cloud-amd64", "6.1.176-1", size="-1")),
            "malformed Size",
        ),
    ],
)
def test_select_errors(text: str, message: str) -> None:
    with pytest.raises(BangerError, match=message):
        select_kernel_package(text, "linux-image-cloud-amd64")


# --- gpgv verdicts -------------------------------------------------------------------------------------------

GOOD = "[GNUPG:] NEWSIG\n[GNUPG:] GOODSIG 6ED0 Debian\n[GNUPG:] VALIDSIG 4CB5 2026-07-11\n"
GOOD_ERR = 'gpgv: Good signature from "Debian Archive Automatic Signing Key (12/bookworm)"\n'
MISSING = "[GNUPG:] NEWSIG\n[GNUPG:] ERRSIG F8D2 22 8 01 1783765141 9 4D64\n[GNUPG:] NO_PUBKEY F8D2\n"


def test_gpgv_good_and_good_plus_missing_key() -> None:
    check_gpgv_output(0, GOOD, GOOD_ERR)
    check_gpgv_output(2, GOOD + MISSING, GOOD_ERR + "gpgv: Can't check signature: No public key\n")


@pytest.mark.parametrize(
    ("rc", "status", "stderr", "message"),
    [
        (1, GOOD + "[GNUPG:] BADSIG 78DB Debian\n", GOOD_ERR, "BAD signature"),
        (2, MISSING, "gpgv: Can't check signature: No public key", "no good signature"),
        (
            0,
            "[GNUPG:] EXPKEYSIG 6ED0 Debian\n[GNUPG:] VALIDSIG 4CB5\n",
            'gpgv: Good signature from "x"',
            "no good",
        ),
        (0, GOOD, "", "no good signature"),
        (2, GOOD + "[GNUPG:] NODATA 1\n", GOOD_ERR, "exit status 2"),
    ],
)
def test_gpgv_refusals(rc: int, status: str, stderr: str, message: str) -> None:
    with pytest.raises(BangerError, match=message):
        check_gpgv_output(rc, status, stderr)


# --- modules.dep -----------------------------------------------------------------------------------------

MODULES_DEP = """kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz
kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz
kernel/net/core/failover.ko.xz:
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
"""


def test_load_order_dependencies_first() -> None:
    order = resolve_load_order(
        parse_modules_dep(MODULES_DEP),
        ["kernel/drivers/virtio/virtio_pci.ko"],
        ["virtio_mmio", "virtio_pci", "virtio_blk", "virtio_net", "virtio_rng"],
    )
    assert [module_name(p) for p in order] == [
        "virtio_ring",
        "virtio",
        "virtio_mmio",
        "virtio_blk",
        "failover",
        "net_failover",
        "virtio_net",
        "virtio-rng",
    ]


def test_load_order_unknown_module_and_cycle() -> None:
    deps = parse_modules_dep(MODULES_DEP)
    with pytest.raises(NotFound, match="'virtio_console' is neither"):
        resolve_load_order(deps, [], ["virtio_console"])
    cyclic = parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n")
    with pytest.raises(BangerError, match="cycle"):
        resolve_load_order(cyclic, [], ["a"])


# --- ELF / PVH ------------------------------------------------------------------------------------------


def make_elf(note_type: int = 0x12, entry: int = 0x1000850) -> bytes:
    desc = struct.pack("<Q", entry)
    note = struct.pack("<III", 4, len(desc), note_type) + b"Xen\0" + desc
    note_off = 64 + 2 * 56
    total = note_off + len(note) + 4096
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, 0x1000000, 64, 0, 0, 64, 56, 2, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, total, total, 0x1000)
    notes = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    return ehdr + load + notes + note + b"\x90" * 4096


def fake_bzimage(payload: bytes, uncompressed_size: int) -> bytes:
    """A bzImage-shaped file: boot header (protocol 2.15) pointing at `payload` + appended size."""
    setup = bytearray(1024)
    setup[0x1F1] = 1  # one setup sector after the boot sector
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    body = b"\x00" * 300 + payload + struct.pack("<I", uncompressed_size)
    struct.pack_into("<II", setup, 0x248, 300, len(payload) + 4)
    return bytes(setup) + body + b"\xff" * 100


def test_pvh_entry_of_synthetic_elf() -> None:
    assert pvh_entry(make_elf()) == 0x1000850
    assert pvh_entry(make_elf(note_type=0x11)) is None
    with pytest.raises(BangerError, match="runs past the end"):
        pvh_entry(make_elf()[:-100])
    with pytest.raises(BangerError, match="not an ELF"):
        pvh_entry(b"MZ" + b"\0" * 100)


def test_extract_vmlinux_from_header_payload(tmp_path: Path) -> None:
    elf = make_elf()
    image = tmp_path / "vmlinuz"
    image.write_bytes(fake_bzimage(lzma.compress(elf, format=lzma.FORMAT_XZ), len(elf)))
    extract_vmlinux(image, tmp_path / "vmlinux")
    assert (tmp_path / "vmlinux").read_bytes() == elf


def test_extract_vmlinux_by_magic_scan(tmp_path: Path) -> None:
    elf = make_elf()
    image = tmp_path / "vmlinuz"
    # No boot header: the gzip magic in the middle is found by the scan, and the junk gzip-looking
    # bytes before it are tried and rejected.
    image.write_bytes(b"MZ" + b"\x1f\x8b\x08junk" + b"\0" * 5000 + gzip.compress(elf) + b"\0" * 64)
    extract_vmlinux(image, tmp_path / "vmlinux")
    assert (tmp_path / "vmlinux").read_bytes() == elf


def test_extract_vmlinux_refuses_a_non_kernel(tmp_path: Path) -> None:
    junk = tmp_path / "notakernel"
    junk.write_bytes(b"hello world\n" * 1000 + gzip.compress(b"not an elf" * 100))
    with pytest.raises(BangerError) as info:
        extract_vmlinux(junk, tmp_path / "vmlinux")
    assert "\n" not in str(info.value) and "PVH" in str(info.value) and str(junk) in str(info.value)
    assert not (tmp_path / "vmlinux").exists()
    no_pvh = tmp_path / "nopvh"
    no_pvh.write_bytes(b"MZ" + gzip.compress(make_elf(note_type=0x11)))
    with pytest.raises(BangerError, match="PVH entry point"):
        extract_vmlinux(no_pvh, tmp_path / "vmlinux")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nopvh", "notakernel"]  # no temp file left


# --- catalog ------------------------------------------------------------------------------------------------


def test_embedded_catalog() -> None:
    catalog = cat.load_catalog()
    deb12 = catalog.get("debian-12-cloud")
    assert isinstance(deb12, cat.DebianKernel)
    assert (deb12.suite, deb12.meta_package, deb12.arch) == ("bookworm", "linux-image-cloud-amd64", "amd64")
    deb13 = catalog.get("debian-13-cloud")
    assert isinstance(deb13, cat.DebianKernel) and deb13.suite == "trixie"
    generic = catalog.get("generic-6.1")
    assert isinstance(generic, cat.SourceBuildKernel)
    assert (generic.package, generic.config) == (
        "linux-source-6.1",
        "firecracker microvm-kernel-ci-x86_64-6.1",
    )
    with pytest.raises(NotFound, match="available: debian-12-cloud"):
        catalog.get("nope")


TARBALL: dict[str, Any] = {
    "kind": "tarball",
    "name": "generic-6.12",
    "url": "https://kernels.example.org/generic-6.12-amd64.tar.zst",
    "sha256": "d" * 64,
    "size": 123456,
    "kernel_version": "6.12.30",
}


def test_tarball_entry_is_accepted() -> None:
    entry = cat.parse_catalog({"version": 1, "entries": [TARBALL]}).get("generic-6.12")
    assert isinstance(entry, cat.TarballKernel) and entry.size == 123456 and entry.kind == "tarball"


def _with(**changes: Any) -> dict[str, Any]:
    entry = {k: v for k, v in TARBALL.items() if changes.get(k, "") is not None}
    entry.update({k: v for k, v in changes.items() if v is not None})
    return entry


DEBIAN_OK = {
    "kind": "debian",
    "name": "debian-12-cloud",
    "suite": "bookworm",
    "meta_package": "linux-image-cloud-amd64",
}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (_with(kind="rpm"), "unknown kind 'rpm'"),
        (_with(mirror="x"), "unknown field 'mirror'"),
        (dict(DEBIAN_OK, url="https://x/y"), "unknown field 'url' for kind 'debian'"),
        (_with(sha256="d" * 63), "64 hex digits, got 63 characters"),
        (_with(sha256="D" * 64), "lowercase hex"),
        (_with(url="http://kernels.example.org/x.tar.zst"), "https:// URL .*scheme 'http'"),
        (_with(url="file:///etc/passwd"), "scheme 'file'"),
        (_with(size=True), "positive integer"),
        (_with(size=0), "positive integer"),
        (_with(size="12"), "positive integer"),
        (_with(sha256=None), "missing field 'sha256'"),
        (_with(name="../evil"), "kernel name '../evil' is invalid"),
        (_with(name=7), "name must be a string"),
        (_with(arch="riscv64"), "arch 'riscv64' is not supported"),
        (dict(DEBIAN_OK, suite="Bookworm!"), "suite 'Bookworm!' is invalid"),
        (dict(DEBIAN_OK, meta_package="Linux Image"), "not a valid Debian package name"),
        (
            {"kind": "source-build", "name": "g", "package": "linux-source-6.1", "config": " "},
            "config must not be empty",
        ),
        ("just a string", "must be an object"),
    ],
)
def test_bad_entries_name_the_index(entry: Any, message: str) -> None:
    with pytest.raises(BangerError, match=message) as info:
        cat.parse_catalog({"version": 1, "entries": [DEBIAN_OK, entry]})
    assert str(info.value).startswith("kernel catalog entry 1")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"version": 2, "entries": []}, "version 2 is not supported"),
        ({"version": True, "entries": []}, "not supported"),
        ({"version": 1, "entries": {}}, "must be a list"),
        ({"version": 1}, "exactly 'version' and 'entries'"),
        ({"version": 1, "entries": [], "extra": 1}, "exactly"),
        ({"version": 1, "entries": [DEBIAN_OK, DEBIAN_OK]}, "entry 1: duplicate name 'debian-12-cloud'"),
    ],
)
def test_bad_catalog_documents(doc: Any, message: str) -> None:
    with pytest.raises(BangerError, match=message):
        cat.parse_catalog(doc)


def test_catalog_json_round_trips_through_the_validator() -> None:
    path = Path(cat.__file__).with_name("catalog.json")
    data = json.loads(path.read_text())
    catalog = cat.parse_catalog(data)
    assert len(catalog) == len(data["entries"])
    assert [entry.to_json() for entry in catalog] == data["entries"]


def test_pull_refuses_non_debian_entries(tmp_path: Path) -> None:
    entry = cat.load_catalog().get("generic-6.1")
    with pytest.raises(BangerError, match="kind 'source-build', not 'debian'"):
        cat.pull_debian_kernel(entry, "http://deb.debian.org/debian", tmp_path / "k" / "generic-6.1", 1 << 20)
    assert list(tmp_path.iterdir()) == []
