"""`banger.system.hosttools`: vhost-device-vsock fetched from Debian sid through the verified archive chain.

The positive case installs from the real mirror. The negative cases point at a local copy of the same
real, Debian-signed metadata and package (file://) with one part tampered with, so the only reason for
a refusal is the tampering. The Debian archive keyring and gpgv are the real ones throughout.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from banger.errors import BadRequest, BangerError
from banger.kernels import debian, debian_index
from banger.system import hosttools
from banger.system.download import fetch_to
from banger.system.hosttools import VHOST_VSOCK

pytestmark = pytest.mark.network

MIRROR = os.environ.get("BANGER_TEST_DEBIAN_MIRROR") or "http://deb.debian.org/debian"
SUITE = "sid"
REPO = Path(__file__).resolve().parents[2]


def _expired(release: debian_index.Release) -> bool:
    return release.valid_until is not None and datetime.now(UTC) > release.valid_until


def _listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_install_from_the_real_mirror(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest, work = tmp_path / "bin", tmp_path / "work"
    dest.mkdir()
    work.mkdir()
    started = time.monotonic()
    allow = False
    try:
        result = hosttools.install(VHOST_VSOCK, dest, mirror=MIRROR, suite=SUITE, work_root=work)
    except debian_index.ExpiredRelease as exc:
        # A frozen mirror (this machine's serves sid metadata past its Valid-Until): refused by default,
        # saying how to accept it; then accepted explicitly, with signature and checksums still checked.
        assert "expired at" in exc.message and exc.hint is not None and "--allow-expired" in exc.hint
        assert _listing(dest) == [] and _listing(work) == []
        allow = True
        result = hosttools.install(VHOST_VSOCK, dest, mirror=MIRROR, suite=SUITE, work_root=work,
                                   allow_expired=True)
        assert result.expired_at is not None
    first_s = time.monotonic() - started
    binary = dest / "vhost-device-vsock"
    assert result.changed and result.path == binary and result.package == "vhost-device-vsock"
    assert _listing(dest) == ["vhost-device-vsock", "vhost-device-vsock.version"]
    assert _listing(work) == []  # the .deb, the index and the unpacked tree are gone
    assert stat.S_IMODE(binary.stat().st_mode) == 0o755
    upstream = result.version.split(":")[-1].rsplit("-", 1)[0]
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True).stdout
    assert version.strip() == f"vhost-device-vsock {upstream}"
    usage = subprocess.run([str(binary), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--uds-path" in usage and "--guest-cid" in usage
    record = json.loads((dest / "vhost-device-vsock.version").read_text())
    assert record["package"] == "vhost-device-vsock" and record["version"] == result.version
    assert record["suite"] == SUITE and len(record["sha256"]) == 64
    assert hosttools.installed_version(binary) == result.version

    # The same version again: nothing downloaded, the file untouched.
    before = binary.stat()
    started = time.monotonic()
    again = hosttools.install(VHOST_VSOCK, dest, mirror=MIRROR, suite=SUITE, work_root=work, allow_expired=allow)
    again_s = time.monotonic() - started
    assert not again.changed and again.deb_size == 0 and again.version == result.version
    after = binary.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    # A binary changed behind banger's back no longer matches the record: it is replaced.
    binary.write_bytes(b"#!/bin/sh\necho not it\n")
    assert hosttools.installed_version(binary) is None
    fixed = hosttools.install(VHOST_VSOCK, dest, mirror=MIRROR, suite=SUITE, work_root=work, allow_expired=allow)
    assert fixed.changed and hosttools.installed_version(binary) == result.version
    assert _listing(dest) == ["vhost-device-vsock", "vhost-device-vsock.version"]
    with capsys.disabled():
        print(f"\n[hosttools] {result.package} {result.version} from {SUITE} ({result.deb_size} bytes"
              f"{', expired metadata accepted' if allow else ''}): install {first_s:.2f}s, "
              f"no-op re-run {again_s:.2f}s")


# --- a local copy of the real, signed archive, with one part tampered with ------------------------------


@dataclass(frozen=True)
class LocalCopy:
    root: Path
    pkg: debian_index.DebPackage
    index_files: tuple[Path, ...]
    allow_expired: bool

    @property
    def mirror(self) -> str:
        return self.root.as_uri()

    @property
    def deb(self) -> Path:
        return self.root / self.pkg.filename

    @property
    def inrelease(self) -> Path:
        return self.root / "dists" / SUITE / "InRelease"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> LocalCopy:
    """sid's InRelease, amd64 Packages index (by-hash and plain) and the vhost-device-vsock .deb, as served."""
    root = tmp_path_factory.mktemp("sid-copy")
    work = tmp_path_factory.mktemp("sid-work")
    dists = root / "dists" / SUITE
    dists.mkdir(parents=True)
    release = debian.fetch_release(MIRROR, SUITE, debian.DEFAULT_KEYRING, work_dir=work)
    shutil.copy2(work / "InRelease", dists / "InRelease")
    index = debian_index.packages_index(release, "main", "amd64")
    directory = dists / index.path.rsplit("/", 1)[0]
    (directory / "by-hash" / "SHA256").mkdir(parents=True)
    fetched = fetch_to(f"{MIRROR}/dists/{SUITE}/{index.path}", work, max_bytes=index.size, sha256=index.sha256,
                       size=index.size)
    plain, by_hash = directory / fetched.name, directory / "by-hash" / "SHA256" / index.sha256
    shutil.copy2(fetched, plain)
    shutil.copy2(fetched, by_hash)
    text = debian.fetch_packages_text(root.as_uri(), SUITE, release, "amd64", work_dir=work)
    pkg = debian_index.select_package(text, VHOST_VSOCK.package)
    deb = root / pkg.filename
    deb.parent.mkdir(parents=True)
    shutil.copy2(debian.fetch_deb(MIRROR, pkg, work, hosttools.MAX_DEB_BYTES), deb)
    return LocalCopy(root, pkg, (plain, by_hash), _expired(release))


@pytest.fixture
def copy(pristine: LocalCopy, tmp_path: Path) -> LocalCopy:
    """A private copy of the pristine archive that a test may tamper with."""
    root = tmp_path / "mirror"
    shutil.copytree(pristine.root, root)
    return replace(pristine, root=root,
                   index_files=tuple(root / p.relative_to(pristine.root) for p in pristine.index_files))


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    """A destination that already holds an older binary (not installed by banger)."""
    directory = tmp_path / "bin"
    directory.mkdir()
    (directory / "vhost-device-vsock").write_bytes(b"#!/bin/sh\necho previous\n")
    (directory / "vhost-device-vsock").chmod(0o755)
    return directory


def _install_refused(copy: LocalCopy, dest: Path, work: Path, match: str,
                     tool: hosttools.HostTool = VHOST_VSOCK) -> BangerError:
    work.mkdir(exist_ok=True)
    with pytest.raises(BangerError, match=match) as caught:
        hosttools.install(tool, dest, mirror=copy.mirror, suite=SUITE, allow_expired=copy.allow_expired,
                          work_root=work)
    assert "\n" not in caught.value.message
    # Nothing changed: the previous binary is intact, no record, no staged file, no work directory.
    assert _listing(dest) == ["vhost-device-vsock"]
    assert (dest / "vhost-device-vsock").read_bytes() == b"#!/bin/sh\necho previous\n"
    assert _listing(work) == []
    return caught.value


def test_untampered_copy_installs(copy: LocalCopy, dest: Path, tmp_path: Path) -> None:
    # The control: the local copy as served is accepted, so each refusal below is due to its tampering.
    result = hosttools.install(VHOST_VSOCK, dest, mirror=copy.mirror, suite=SUITE,
                               allow_expired=copy.allow_expired, work_root=tmp_path)
    assert result.changed and result.version == copy.pkg.version
    assert hosttools.installed_version(dest / "vhost-device-vsock") == copy.pkg.version


def test_tampered_deb_is_refused(copy: LocalCopy, dest: Path, tmp_path: Path) -> None:
    data = bytearray(copy.deb.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit different
    copy.deb.write_bytes(bytes(data))
    _install_refused(copy, dest, tmp_path / "work", f"sha256 mismatch: expected {copy.pkg.sha256}")


def test_truncated_deb_is_refused(copy: LocalCopy, dest: Path, tmp_path: Path) -> None:
    copy.deb.write_bytes(copy.deb.read_bytes()[:-1])
    _install_refused(copy, dest, tmp_path / "work", f"expected {copy.pkg.size}")


def test_tampered_packages_index_is_refused(copy: LocalCopy, dest: Path, tmp_path: Path) -> None:
    for path in copy.index_files:
        data = bytearray(path.read_bytes())
        data[-100] ^= 0x01
        path.write_bytes(bytes(data))
    _install_refused(copy, dest, tmp_path / "work", "sha256 mismatch")


def test_tampered_inrelease_is_refused(copy: LocalCopy, dest: Path, tmp_path: Path) -> None:
    text = copy.inrelease.read_text()
    assert "\nSuite: unstable\n" in text
    copy.inrelease.write_text(text.replace("\nSuite: unstable\n", "\nSuite: unstablf\n", 1))
    _install_refused(copy, dest, tmp_path / "work", "BAD signature|no good signature")


def test_a_binary_that_does_not_run_is_not_installed(copy: LocalCopy, dest: Path, tmp_path: Path) -> None:
    # Fault injection: the real binary, asked something it refuses (as a too-new glibc would make it fail).
    broken = replace(VHOST_VSOCK, smoke_args=("--no-such-flag",))
    error = _install_refused(copy, dest, tmp_path / "work", "does not run on this host", tool=broken)
    assert "--no-such-flag" in error.message and error.hint is not None and "nothing was installed" in error.hint


def test_missing_or_odd_member_is_refused(copy: LocalCopy, dest: Path, tmp_path: Path) -> None:
    _install_refused(copy, dest, tmp_path / "w1", "has no file /usr/bin/nope",
                     tool=replace(VHOST_VSOCK, member="usr/bin/nope"))
    _install_refused(copy, dest, tmp_path / "w2", "is not a regular file",
                     tool=replace(VHOST_VSOCK, member="usr/share/doc/vhost-device-vsock"))


def test_bad_destination(tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="is not a directory"):
        hosttools.install(VHOST_VSOCK, tmp_path / "missing", mirror=MIRROR)
    with pytest.raises(BadRequest, match="must be an absolute path"):
        hosttools.install(VHOST_VSOCK, Path("relative"), mirror=MIRROR)
    (tmp_path / "d" / "vhost-device-vsock").mkdir(parents=True)
    with pytest.raises(BadRequest, match="is a directory; refusing"):
        hosttools.install(VHOST_VSOCK, tmp_path / "d", mirror=MIRROR)


@pytest.mark.parametrize(("args", "message"), [
    (["--dest", "/nonexistent/bin"], "banger: destination /nonexistent/bin is not a directory\n"),
    (["--suite", "Sid!"], "banger: suite 'Sid!' is invalid (lowercase letters, digits and '-')\n"),
    (["--bogus"], "banger: unrecognized arguments: --bogus (see `banger --help`)\n"),
])  # fmt: skip
def test_cli_bad_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
           "XDG_STATE_HOME": str(tmp_path / "state"), "XDG_RUNTIME_DIR": str(tmp_path), "NO_COLOR": "1"}
    env.pop("BANGER_SYSTEM_PREFIX", None)
    proc = subprocess.run([sys.executable, "-m", "banger", "internal", "install-vhost-vsock",
                           "--dest", str(tmp_path), *args], capture_output=True, text=True, env=env, cwd=REPO)
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", message)
    assert _listing(tmp_path) == []
