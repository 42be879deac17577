"""Find and fetch Debian packages (kernels; host tools, see system/hosttools.py), verified from the
archive signature down.

The chain of trust is apt's: `dists/<suite>/InRelease` is checked with `gpgv` against the Debian archive
keyring; the `Packages` index is accepted only with the sha256 and size that the *signed* Release lists;
the `.deb` only with the sha256 and size that the verified index lists. The parsers are pure functions
over text in banger.kernels.debian_index (unit-tested on fixtures); this module does the I/O.
"""

from __future__ import annotations

import lzma
import re
import zlib
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from banger.errors import BadRequest, BangerError, NotFound
from banger.kernels.debian_index import (
    DebPackage,
    IndexEntry,
    Release,
    check_release,
    packages_index,
    parse_clearsigned,
    parse_release,
    select_kernel_package,
)
from banger.system.download import Progress, fetch_to
from banger.system.run import run

DEFAULT_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")

INRELEASE_MAX_BYTES = 16 << 20
# A decompressed Packages index is ~50 MB today; the cap only stops a decompression bomb.
PACKAGES_MAX_BYTES = 1 << 30

_SUITE = re.compile(r"^[a-z][a-z0-9-]{0,63}$")
_PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9.+-]+$")


# Status words that may accompany a non-zero gpgv exit when one good signature is present.
_GPGV_BENIGN = frozenset({
    "NEWSIG", "KEY_CONSIDERED", "SIG_ID", "GOODSIG", "VALIDSIG", "ERRSIG", "NO_PUBKEY",
    "PLAINTEXT", "PLAINTEXT_LENGTH", "TRUST_UNDEFINED", "KEYEXPIRED",
})  # fmt: skip


def check_gpgv_output(returncode: int, status: str, stderr: str) -> None:
    """Accept gpgv's verdict only with at least one good, valid signature and no bad one.

    A signature by a key missing from the keyring (ERRSIG/NO_PUBKEY) makes gpgv exit non-zero but is
    not an attack: Debian signs with several keys and an older keyring may lack the newest.
    """
    tokens = [
        line.split()[1]
        for line in status.splitlines()
        if line.startswith("[GNUPG:] ") and len(line.split()) > 1
    ]
    if "BADSIG" in tokens:
        raise BangerError("InRelease has a BAD signature; refused")
    good = "GOODSIG" in tokens and "VALIDSIG" in tokens and "Good signature" in stderr
    if not good:
        detail = " ".join(stderr.split())[-300:]
        raise BangerError(f"InRelease has no good signature from the keyring: {detail}")
    if returncode != 0 and not set(tokens) <= _GPGV_BENIGN:
        raise BangerError(f"gpgv failed with exit status {returncode}: {' '.join(stderr.split())[-300:]}")


# --- I/O ---------------------------------------------------------------------------------------------


def _check_mirror(mirror: str) -> str:
    parts = urlsplit(mirror)
    if parts.scheme not in ("http", "https", "file") or (parts.scheme != "file" and not parts.netloc):
        raise BadRequest(f"mirror {mirror!r} must be an http://, https:// or file:// URL")
    return mirror.rstrip("/")


def verify_inrelease(inrelease: Path, keyring: Path, work_dir: Path) -> str:
    """Check `inrelease` with gpgv and return the signed text (what gpgv and our parser agree on)."""
    if not keyring.is_file():
        raise NotFound(f"keyring {keyring} not found", hint="install debian-archive-keyring")
    verified = work_dir / (inrelease.name + ".verified")
    verified.unlink(missing_ok=True)
    proc = run(
        ["gpgv", "--status-fd", "1", "--output", verified, "--keyring", keyring, inrelease],
        check=False,
    )
    stdout = proc.stdout.decode("utf-8", "replace")
    stderr = proc.stderr.decode("utf-8", "replace")
    check_gpgv_output(proc.returncode, stdout, stderr)
    try:
        signed_by_gpgv = verified.read_bytes().decode("utf-8")
        ours = parse_clearsigned(inrelease.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BangerError(f"{inrelease} is not UTF-8 text") from exc
    finally:
        verified.unlink(missing_ok=True)
    if ours != signed_by_gpgv:
        raise BangerError("InRelease: the signed text gpgv verified differs from the parsed text; refused")
    return ours


def _decompress_index(path: Path, index_path: str) -> str:
    data = path.read_bytes()
    try:
        if index_path.endswith(".xz"):
            raw = lzma.LZMADecompressor().decompress(data, max_length=PACKAGES_MAX_BYTES + 1)
        elif index_path.endswith(".gz"):
            raw = zlib.decompressobj(wbits=31).decompress(data, PACKAGES_MAX_BYTES + 1)
        else:
            raw = data
    except (lzma.LZMAError, zlib.error) as exc:
        raise BangerError(f"cannot decompress {index_path}: {exc}") from exc
    if len(raw) > PACKAGES_MAX_BYTES:
        raise BangerError(f"{index_path} decompresses to more than {PACKAGES_MAX_BYTES} bytes; refused")
    return raw.decode("utf-8", "replace")


def _fetch_first(urls: list[str], work_dir: Path, index: IndexEntry) -> Path:
    for url in urls[:-1]:
        try:
            return fetch_to(url, work_dir, max_bytes=index.size, sha256=index.sha256, size=index.size)
        except BangerError:
            continue  # e.g. a mirror without by-hash files; the plain path is checked the same way
    return fetch_to(urls[-1], work_dir, max_bytes=index.size, sha256=index.sha256, size=index.size)


def check_suite(suite: str) -> None:
    if not _SUITE.fullmatch(suite):
        raise BadRequest(f"suite {suite!r} is invalid (lowercase letters, digits and '-')")


def fetch_release(mirror: str, suite: str, keyring: Path, *, work_dir: Path) -> Release:
    """`suite`'s InRelease, verified by gpgv against `keyring` and parsed; `check_release` comes next."""
    check_suite(suite)
    inrelease = fetch_to(f"{_check_mirror(mirror)}/dists/{suite}/InRelease", work_dir, max_bytes=INRELEASE_MAX_BYTES)
    return parse_release(verify_inrelease(inrelease, keyring, work_dir))


def fetch_packages_text(
    mirror: str, suite: str, release: Release, arch: str, *, work_dir: Path, component: str = "main"
) -> str:
    """The Packages index for component/arch that the verified `release` lists, decompressed."""
    dists = f"{_check_mirror(mirror)}/dists/{suite}"
    index = packages_index(release, component, arch)
    # by-hash names the exact file the Release signed, so a mirror sync between our two requests
    # cannot hand us a newer index than the Release we verified.
    directory = index.path.rsplit("/", 1)[0]
    urls = [f"{dists}/{directory}/by-hash/SHA256/{index.sha256}"] if release.acquire_by_hash else []
    urls.append(f"{dists}/{index.path}")
    return _decompress_index(_fetch_first(urls, work_dir, index), index.path)


def resolve_kernel_package(
    mirror: str,
    suite: str,
    arch: str = "amd64",
    meta_package: str = "linux-image-cloud-amd64",
    keyring: Path = DEFAULT_KEYRING,
    *,
    work_dir: Path,
    component: str = "main",
) -> DebPackage:
    """The kernel image package `meta_package` currently points at in `suite`, from verified metadata."""
    _check_mirror(mirror)
    if not _PACKAGE_NAME.fullmatch(meta_package):
        raise BadRequest(f"package name {meta_package!r} is invalid")
    release = fetch_release(mirror, suite, keyring, work_dir=work_dir)
    check_release(release, suite, datetime.now(UTC))
    text = fetch_packages_text(mirror, suite, release, arch, work_dir=work_dir, component=component)
    return select_kernel_package(text, meta_package, arch)


def fetch_deb(
    mirror: str, pkg: DebPackage, dest_dir: Path, max_bytes: int, *, progress: Progress | None = None
) -> Path:
    """Download `pkg` into `dest_dir`, accepted only with the index's sha256 and size."""
    if pkg.size > max_bytes:
        raise BangerError(f"{pkg.name} {pkg.version} is {pkg.size} bytes, over the cap of {max_bytes} bytes")
    url = f"{_check_mirror(mirror)}/{pkg.filename}"
    return fetch_to(
        url, dest_dir, max_bytes=max_bytes, sha256=pkg.sha256, size=pkg.size, timeout=120, progress=progress
    )


def extract_deb(deb: Path, dest: Path) -> None:
    """Unpack the data part of `deb` into `dest` (not installed: no maintainer scripts run)."""
    dest.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "-x", deb, dest])
