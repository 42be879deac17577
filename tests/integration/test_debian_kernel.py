"""The kernel pipeline with real tools: a gpg-signed file:// archive for the trust chain, cpio for the
newc writer, and (marker `network`) the real pull of debian-12-cloud from deb.debian.org.

BANGER_TEST_CACHE=<dir> keeps the downloaded .deb (named by its sha256) between runs; it is re-hashed
on use.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from banger.errors import BangerError, NotFound
from banger.kernels.catalog import DebianKernel, load_catalog, pull_debian_kernel
from banger.kernels.debian import fetch_deb, resolve_kernel_package
from banger.kernels.debian_index import DebPackage
from banger.kernels.initrd import CpioEntry, write_newc
from banger.kernels.vmlinux import pvh_entry

MIRROR = "http://deb.debian.org/debian"
SUITE = "banger-test"
KERNEL = "linux-image-6.1.0-99-cloud-amd64"
DEB_PATH = f"pool/main/l/linux-signed-amd64/{KERNEL}_6.1.999-1_amd64.deb"


# --- newc writer round trip through cpio -------------------------------------------------------------------


def test_newc_round_trip_through_cpio(tmp_path: Path) -> None:
    payload = os.urandom(70_001)  # not a multiple of 4: exercises the data padding
    entries = [
        CpioEntry("bin", stat.S_IFDIR | 0o755),
        CpioEntry("bin/busybox", stat.S_IFREG | 0o755, payload),
        CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        CpioEntry("etc", stat.S_IFDIR | 0o750),
        CpioEntry("etc/a-name-of-odd-length.txt", stat.S_IFREG | 0o640, b"hello\n"),
        CpioEntry("etc/empty", stat.S_IFREG | 0o600),
        CpioEntry("init", stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n"),
    ]
    is_root = os.geteuid() == 0
    if is_root:  # only root may create device nodes
        entries += [
            CpioEntry("dev", stat.S_IFDIR | 0o755),
            CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        ]
    archive = write_newc(entries, mtime=1_700_000_000)
    assert len(archive) % 4 == 0
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=archive, cwd=out, check=True)

    for entry in entries:
        path = out / entry.name
        st = path.lstat()
        assert stat.S_IFMT(st.st_mode) == stat.S_IFMT(entry.mode), entry.name
        if stat.S_ISLNK(entry.mode):
            assert os.readlink(path) == entry.data.decode()
            continue
        assert stat.S_IMODE(st.st_mode) == stat.S_IMODE(entry.mode), entry.name
        if stat.S_ISREG(entry.mode):
            assert path.read_bytes() == entry.data
            assert st.st_mtime == 1_700_000_000
        if stat.S_ISCHR(entry.mode):
            assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (5, 1)
    # cpio -t lists exactly our entries, in order, and stops at the trailer.
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=archive, capture_output=True, check=True).stdout
    assert listing.decode().split() == [e.name for e in entries]


def test_newc_rejects_unsafe_names() -> None:
    for name in ("/etc/passwd", "../x", "a//b", ""):
        with pytest.raises(BangerError, match="relative path"):
            write_newc([CpioEntry(name, stat.S_IFREG | 0o644)])


def read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data) of a newc archive (a test-side reader, independent of the writer)."""
    files: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        data_start = (name_start + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return files
        files[name] = (mode, data[data_start : data_start + filesize])
        pos = (data_start + filesize + 3) & ~3


# --- a signed archive on file:// --------------------------------------------------------------------------


@dataclass(frozen=True)
class Gpg:
    env: dict[str, str]
    trusted_uid: str
    other_uid: str
    keyring: Path

    def clearsign(self, text: str, out: Path, uid: str) -> None:
        subprocess.run(
            [
                "gpg",
                "--batch",
                "--yes",
                "--pinentry-mode",
                "loopback",
                "--passphrase",
                "",
                "--local-user",
                uid,
                "--digest-algo",
                "SHA256",
                "--clearsign",
                "--output",
                str(out),
            ],
            input=text.encode(),
            env=self.env,
            check=True,
            capture_output=True,
        )


@pytest.fixture(scope="module")
def gpg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gpg]:
    if shutil.which("gpg") is None:
        pytest.skip("gpg is not installed")
    home = tmp_path_factory.mktemp("gnupg")
    home.chmod(0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    trusted, other = "banger archive test <trusted@banger.invalid>", "someone else <other@banger.invalid>"
    for uid in (trusted, other):
        subprocess.run(
            [
                "gpg",
                "--batch",
                "--pinentry-mode",
                "loopback",
                "--passphrase",
                "",
                "--quick-gen-key",
                uid,
                "ed25519",
                "sign",
                "never",
            ],
            env=env,
            check=True,
            capture_output=True,
        )
    keyring = home / "archive-keyring.gpg"
    subprocess.run(
        ["gpg", "--batch", "--export", "--output", str(keyring), "trusted@banger.invalid"],
        env=env,
        check=True,
        capture_output=True,
    )
    try:
        yield Gpg(env, trusted, other, keyring)
    finally:
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, check=False, capture_output=True)


@dataclass(frozen=True)
class Archive:
    root: Path
    mirror: str
    deb: DebPackage
    deb_bytes: bytes

    @property
    def dists(self) -> Path:
        return self.root / "dists" / SUITE


def make_archive(
    root: Path,
    gpg: Gpg,
    *,
    deb_bytes: bytes = b"!<arch>\nnot really a deb\n",
    by_hash: bool = True,
    valid_until: datetime | None = None,
    signer: str | None = None,
) -> Archive:
    deb_file = root / DEB_PATH
    deb_file.parent.mkdir(parents=True)
    deb_file.write_bytes(deb_bytes)
    deb_sha = hashlib.sha256(deb_bytes).hexdigest()
    index = (
        "Package: linux-image-cloud-amd64\nVersion: 6.1.999-1\nArchitecture: amd64\n"
        f"Depends: {KERNEL} (= 6.1.999-1)\n"
        "Filename: pool/main/l/linux-signed-amd64/linux-image-cloud-amd64_6.1.999-1_amd64.deb\n"
        f"Size: 1500\nSHA256: {'e' * 64}\n\n"
        f"Package: {KERNEL}\nVersion: 6.1.999-1\nArchitecture: amd64\nDepends: kmod\n"
        f"Filename: {DEB_PATH}\nSize: {len(deb_bytes)}\nSHA256: {deb_sha}\n"
    )
    packages_xz = lzma.compress(index.encode(), format=lzma.FORMAT_XZ)
    packages_sha = hashlib.sha256(packages_xz).hexdigest()
    binary = root / "dists" / SUITE / "main" / "binary-amd64"
    (binary / "by-hash" / "SHA256").mkdir(parents=True)
    (binary / "Packages.xz").write_bytes(packages_xz)
    if by_hash:
        (binary / "by-hash" / "SHA256" / packages_sha).write_bytes(packages_xz)
    now = datetime.now(UTC)
    release = (
        f"Origin: Banger\nSuite: {SUITE}\nCodename: {SUITE}\n"
        f"Date: {now.strftime('%a, %d %b %Y %H:%M:%S UTC')}\n"
        + (f"Valid-Until: {valid_until.strftime('%a, %d %b %Y %H:%M:%S UTC')}\n" if valid_until else "")
        + ("Acquire-By-Hash: yes\n" if by_hash else "")
        + "Architectures: amd64\nComponents: main\n"
        f"SHA256:\n {packages_sha} {len(packages_xz)} main/binary-amd64/Packages.xz\n"
    )
    (root / "dists" / SUITE / "Release").write_text(release)
    gpg.clearsign(release, root / "dists" / SUITE / "InRelease", signer or gpg.trusted_uid)
    deb = DebPackage(KERNEL, "6.1.999-1", DEB_PATH, deb_sha, len(deb_bytes))
    return Archive(root, root.as_uri(), deb, deb_bytes)


def _resolve(archive: Archive, gpg: Gpg, work: Path, suite: str = SUITE) -> DebPackage:
    work.mkdir(exist_ok=True)
    return resolve_kernel_package(archive.mirror, suite, keyring=gpg.keyring, work_dir=work)


@pytest.mark.parametrize("by_hash", [True, False])
def test_resolve_and_fetch_from_signed_mirror(tmp_path: Path, gpg: Gpg, by_hash: bool) -> None:
    archive = make_archive(
        tmp_path / "mirror", gpg, by_hash=by_hash, valid_until=datetime.now(UTC) + timedelta(days=7)
    )
    if not by_hash:  # the plain path must be the one used: break by-hash to prove it is not needed
        shutil.rmtree(archive.dists / "main" / "binary-amd64" / "by-hash")
    else:  # ...and with by-hash announced, the by-hash file is what gets used
        (archive.dists / "main" / "binary-amd64" / "Packages.xz").unlink()
    assert _resolve(archive, gpg, tmp_path / "work") == archive.deb
    dest = tmp_path / "dest"
    dest.mkdir()
    path = fetch_deb(archive.mirror, archive.deb, dest, max_bytes=1 << 20)
    assert path.read_bytes() == archive.deb_bytes
    assert list(dest.iterdir()) == [path]


def test_tampered_release_refused(tmp_path: Path, gpg: Gpg) -> None:
    archive = make_archive(tmp_path / "mirror", gpg)
    inrelease = archive.dists / "InRelease"
    inrelease.write_text(inrelease.read_text().replace("Origin: Banger", "Origin: Bang3r"))
    with pytest.raises(BangerError, match="BAD signature"):
        _resolve(archive, gpg, tmp_path / "work")


def test_unsigned_prefix_refused(tmp_path: Path, gpg: Gpg) -> None:
    archive = make_archive(tmp_path / "mirror", gpg)
    inrelease = archive.dists / "InRelease"
    inrelease.write_text(f"SHA256:\n {'0' * 64} 1 main/binary-amd64/Packages.xz\n\n" + inrelease.read_text())
    with pytest.raises(BangerError, match="not a clear-signed message"):
        _resolve(archive, gpg, tmp_path / "work")


def test_unknown_signer_refused(tmp_path: Path, gpg: Gpg) -> None:
    archive = make_archive(tmp_path / "mirror", gpg, signer=gpg.other_uid)
    with pytest.raises(BangerError, match="no good signature"):
        _resolve(archive, gpg, tmp_path / "work")


def test_swapped_packages_index_refused(tmp_path: Path, gpg: Gpg) -> None:
    archive = make_archive(tmp_path / "mirror", gpg, by_hash=False)
    packages = archive.dists / "main" / "binary-amd64" / "Packages.xz"
    packages.write_bytes(lzma.compress(b"Package: evil\n", format=lzma.FORMAT_XZ))
    with pytest.raises(BangerError, match=r"Packages\.xz"):
        _resolve(archive, gpg, tmp_path / "work")
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["InRelease"]  # no partial index


def test_replayed_release_for_another_suite_refused(tmp_path: Path, gpg: Gpg) -> None:
    archive = make_archive(tmp_path / "mirror", gpg)
    shutil.copytree(archive.dists, archive.root / "dists" / "other")
    with pytest.raises(BangerError, match="not 'other'"):
        _resolve(archive, gpg, tmp_path / "work", suite="other")


def test_expired_release_refused(tmp_path: Path, gpg: Gpg) -> None:
    archive = make_archive(tmp_path / "mirror", gpg, valid_until=datetime.now(UTC) - timedelta(hours=1))
    with pytest.raises(BangerError, match="expired"):
        _resolve(archive, gpg, tmp_path / "work")


def test_missing_keyring(tmp_path: Path, gpg: Gpg) -> None:
    archive = make_archive(tmp_path / "mirror", gpg)
    (tmp_path / "work").mkdir()
    with pytest.raises(NotFound, match="debian-archive-keyring"):
        resolve_kernel_package(
            archive.mirror, SUITE, keyring=tmp_path / "none.gpg", work_dir=tmp_path / "work"
        )


def test_swapped_deb_refused(tmp_path: Path, gpg: Gpg) -> None:
    archive = make_archive(tmp_path / "mirror", gpg)
    (archive.root / DEB_PATH).write_bytes(b"!<arch>\nnot really a dek\n")  # same size, other bytes
    pkg = _resolve(archive, gpg, tmp_path / "work")
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(BangerError, match=f"expected {pkg.sha256}"):
        fetch_deb(archive.mirror, pkg, dest, max_bytes=1 << 20)
    with pytest.raises(BangerError, match="over the cap"):
        fetch_deb(archive.mirror, pkg, dest, max_bytes=10)
    assert list(dest.iterdir()) == []


def _fake_kernel_deb(tmp_path: Path) -> bytes:
    """A well-formed .deb whose 'vmlinuz' is not a kernel: the pull must fail after the download."""
    tree = tmp_path / "debtree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {KERNEL}\nVersion: 6.1.999-1\nArchitecture: amd64\nMaintainer: t <t@banger.invalid>\n"
        "Description: fake\n"
    )
    (tree / "boot").mkdir()
    (tree / "boot" / "vmlinuz-6.1.0-99-cloud-amd64").write_bytes(b"MZ" + b"\0" * 4096)
    out = tmp_path / "fake.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(tree), str(out)],
        check=True,
        capture_output=True,
    )
    return out.read_bytes()


def test_failed_pull_leaves_existing_kernel_and_no_debris(tmp_path: Path, gpg: Gpg) -> None:
    archive = make_archive(tmp_path / "mirror", gpg, deb_bytes=_fake_kernel_deb(tmp_path))
    kernels = tmp_path / "kernels"
    dest = kernels / "test-kernel"
    dest.mkdir(parents=True)
    (dest / "marker").write_text("previous kernel")
    entry = DebianKernel(name="test-kernel", suite=SUITE, meta_package="linux-image-cloud-amd64")
    with pytest.raises(BangerError, match="PVH"):
        pull_debian_kernel(entry, archive.mirror, dest, 1 << 20, keyring=gpg.keyring)
    with pytest.raises(BangerError, match="InRelease"):
        pull_debian_kernel(entry, (tmp_path / "empty").as_uri(), dest, 1 << 20, keyring=gpg.keyring)
    assert [p.name for p in kernels.iterdir()] == ["test-kernel"]
    assert [p.name for p in dest.iterdir()] == ["marker"]


# --- the real thing ----------------------------------------------------------------------------------------

BOOKWORM_MODULES = [
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_console",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "virtio-rng",
    "overlay",
]


@pytest.mark.network
def test_pull_debian_12_cloud(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = load_catalog().get("debian-12-cloud")
    cache = (
        Path(os.environ["BANGER_TEST_CACHE"]) if os.environ.get("BANGER_TEST_CACHE") else tmp_path / "cache"
    )
    kernels = tmp_path / "kernels"
    dest = kernels / "debian-12-cloud"
    timings: list[str] = []
    caplog.set_level(logging.INFO, logger="banger.kernels")
    for attempt in ("first pull", "re-pull (replaces)"):
        started = time.monotonic()
        artifacts = pull_debian_kernel(entry, MIRROR, dest, 512 << 20, cache_dir=cache)
        steps = [
            r.getMessage().split(": ", 1)[-1] for r in caplog.records if r.getMessage().startswith("pulled")
        ]
        timings.append(f"{attempt}: {time.monotonic() - started:.2f}s ({steps[-1] if steps else '?'})")

    assert sorted(p.name for p in kernels.iterdir()) == ["debian-12-cloud"]  # no staging/work/old debris
    assert sorted(p.name for p in dest.iterdir()) == ["initrd.img", "manifest.json", "vmlinux", "vmlinuz"]

    manifest = json.loads(artifacts.manifest_path.read_text())
    assert manifest == artifacts.manifest
    assert (
        manifest["name"] == "debian-12-cloud"
        and manifest["distro"] == "debian"
        and manifest["arch"] == "amd64"
    )
    assert manifest["suite"] == "bookworm"
    assert re.fullmatch(r"6\.1\.0-\d+-cloud-amd64", manifest["kernel_version"])
    assert manifest["package"] == f"linux-image-{manifest['kernel_version']}"
    assert (
        manifest["source"] == f"{MIRROR}/pool/main/l/linux-signed-amd64/{manifest['package']}_"
        f"{manifest['package_version']}_amd64.deb"
    )
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["sha256"])
    cached = cache / f"{manifest['sha256']}.deb"
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == manifest["sha256"]
    assert datetime.strptime(manifest["imported_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert manifest["initrd_modules"] == BOOKWORM_MODULES

    assert artifacts.vmlinuz.read_bytes()[0x202:0x206] == b"HdrS"
    vmlinux = artifacts.vmlinux.read_bytes()
    assert vmlinux[:4] == b"\x7fELF" and vmlinux[4] == 2
    entry_point = pvh_entry(vmlinux)
    assert entry_point is not None

    initrd = artifacts.initrd.read_bytes()
    assert initrd[:2] == b"\x1f\x8b"
    files = read_newc(gzip.decompress(initrd))
    init_mode, init = files["init"]
    assert stat.S_ISREG(init_mode) and init_mode & 0o111 and init.startswith(b"#!/bin/sh\n")
    assert b"switch_root" in init
    assert stat.S_ISCHR(files["dev/console"][0])
    assert stat.S_ISLNK(files["bin/sh"][0]) and files["bin/sh"][1] == b"busybox"
    load_order = files["lib/modules/load-order"][1].decode().split()
    assert load_order == [f"{m}.ko" for m in BOOKWORM_MODULES]
    for module in load_order:
        assert files[f"lib/modules/{module}"][1][:4] == b"\x7fELF"

    with capsys.disabled():
        print(
            f"\n[debian-12-cloud {manifest['package']} {manifest['package_version']}, "
            f"vmlinux {len(vmlinux) >> 20} MiB PVH entry {entry_point:#x}, initrd {len(initrd) >> 10} KiB]"
        )
        for line in timings:
            print(f"  {line}")
