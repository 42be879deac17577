"""The embedded kernel catalog, and pulling a Debian kernel into a kernel directory.

`catalog.json` ships inside the package. Every entry is validated strictly when loaded: an unknown
kind or field, a malformed digest or a non-https URL is a one-line error naming the entry's index, so
a bad catalog fails in CI rather than on a user's `kernel pull`.

Kinds:
* `debian`: a Debian kernel package, found through `meta_package` in `suite` (banger.kernels.debian).
* `source-build`: a kernel built locally from a Debian source package with a named config
  (banger.kernels.build).
* `tarball`: a prebuilt archive at `url`, trusted through its embedded `sha256` and `size`
  (banger.kernels.tarball).

Tests and maintainers can add entries with `BANGER_KERNEL_CATALOG=<path to a catalog JSON file>`,
read by the process that pulls (the daemon). Those entries may also use `http://` URLs on a loopback
host (a local test server); their names must not clash with the embedded ones.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from banger.errors import BadRequest, BangerError, NotFound
from banger.kernels.debian import DEFAULT_KEYRING, extract_deb, fetch_deb, resolve_kernel_package
from banger.kernels.debian_index import DebPackage
from banger.kernels.initrd import build_mini_initrd
from banger.kernels.vmlinux import extract_vmlinux
from banger.model import validate_artifact_name
from banger.system.download import Progress, sha256_file

log = logging.getLogger("banger.kernels")

CATALOG_VERSION = 1
ARCHES = ("amd64",)
_SUITE = re.compile(r"^[a-z][a-z0-9-]{0,63}$")
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9.+-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class DebianKernel:
    name: str
    suite: str
    meta_package: str
    arch: str = "amd64"
    description: str = ""
    kind: ClassVar[str] = "debian"

    def to_json(self) -> dict[str, Any]:
        return entry_to_json(self)


@dataclass(frozen=True)
class SourceBuildKernel:
    name: str
    package: str
    config: str
    arch: str = "amd64"
    description: str = ""
    kind: ClassVar[str] = "source-build"

    def to_json(self) -> dict[str, Any]:
        return entry_to_json(self)


@dataclass(frozen=True)
class TarballKernel:
    name: str
    url: str
    sha256: str
    size: int
    arch: str = "amd64"
    kernel_version: str = ""
    distro: str = "generic"
    description: str = ""
    kind: ClassVar[str] = "tarball"

    def to_json(self) -> dict[str, Any]:
        return entry_to_json(self)


CatalogEntry = DebianKernel | SourceBuildKernel | TarballKernel


def entry_to_json(entry: CatalogEntry) -> dict[str, Any]:
    """The entry as it appears in catalog.json (kind first)."""
    return {"kind": entry.kind, **dataclasses.asdict(entry)}


# kind -> (class, required fields, optional fields); "kind" and "name" are required for every kind.
_KINDS: dict[str, tuple[type[CatalogEntry], frozenset[str], frozenset[str]]] = {
    "debian": (DebianKernel, frozenset({"suite", "meta_package"}), frozenset({"arch", "description"})),
    "source-build": (SourceBuildKernel, frozenset({"package", "config"}), frozenset({"arch", "description"})),
    "tarball": (
        TarballKernel,
        frozenset({"url", "sha256", "size"}),
        frozenset({"arch", "description", "kernel_version", "distro"}),
    ),
}


@dataclass(frozen=True)
class Catalog:
    entries: tuple[CatalogEntry, ...]

    def __iter__(self) -> Iterator[CatalogEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, name: str) -> CatalogEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        names = ", ".join(e.name for e in self.entries) or "none"
        raise NotFound(f"no kernel named {name!r} in the catalog (available: {names})")


EXTRA_CATALOG_ENV = "BANGER_KERNEL_CATALOG"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _check_value(field: str, value: Any, allow_loopback_http: bool = False) -> str | None:
    """What is wrong with `value` for `field`, or None."""
    if field == "size":
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            return f"size must be a positive integer, not {value!r}"
        return None
    if not isinstance(value, str):
        return f"{field} must be a string, not {type(value).__name__}"
    if field == "sha256" and not _SHA256.fullmatch(value):
        if len(value) != 64:
            return f"sha256 must be 64 hex digits, got {len(value)} characters"
        return f"sha256 {value!r} must be lowercase hex"
    if field == "url":
        parts = urlsplit(value)
        if allow_loopback_http and parts.scheme == "http" and parts.hostname in _LOOPBACK:
            return None
        if parts.scheme != "https" or not parts.netloc:
            return f"url {value!r} must be an https:// URL (got scheme {parts.scheme or 'none'!r})"
    if field == "suite" and not _SUITE.fullmatch(value):
        return f"suite {value!r} is invalid (lowercase letters, digits and '-')"
    if field in ("meta_package", "package") and not _PACKAGE.fullmatch(value):
        return f"{field} {value!r} is not a valid Debian package name"
    if field == "arch" and value not in ARCHES:
        return f"arch {value!r} is not supported (allowed: {', '.join(ARCHES)})"
    if field in ("config", "kernel_version", "distro") and not value.strip():
        return f"{field} must not be empty"
    return None


def _parse_entry(index: int, raw: Any, allow_loopback_http: bool = False) -> CatalogEntry:
    where = f"kernel catalog entry {index}"
    if not isinstance(raw, dict):
        raise BangerError(f"{where} must be an object, not {type(raw).__name__}")
    name = raw.get("name")
    if isinstance(name, str):
        where = f"{where} ({name!r})"
        try:
            validate_artifact_name("kernel", name)
        except BadRequest as exc:
            raise BangerError(f"{where}: {exc.message}") from exc
    else:
        raise BangerError(f"{where}: name must be a string")
    kind = raw.get("kind")
    if kind not in _KINDS:
        raise BangerError(f"{where}: unknown kind {kind!r} (allowed: {', '.join(_KINDS)})")
    cls, required, optional = _KINDS[kind]
    allowed = required | optional | {"kind", "name"}
    for field in sorted(raw):
        if field not in allowed:
            raise BangerError(
                f"{where}: unknown field {field!r} for kind {kind!r} (allowed: {', '.join(sorted(allowed))})"
            )
    for field in sorted(required):
        if field not in raw:
            raise BangerError(f"{where}: missing field {field!r}")
    for field in sorted(raw):
        if field not in ("kind", "name"):
            problem = _check_value(field, raw[field], allow_loopback_http)
            if problem:
                raise BangerError(f"{where}: {problem}")
    return cls(**{k: v for k, v in raw.items() if k != "kind"})


def parse_catalog(data: Any, *, allow_loopback_http: bool = False) -> Catalog:
    """Validate a decoded catalog document; any problem is a one-line BangerError."""
    if not isinstance(data, dict) or set(data) != {"version", "entries"}:
        raise BangerError("kernel catalog must be an object with exactly 'version' and 'entries'")
    if data["version"] != CATALOG_VERSION or isinstance(data["version"], bool):
        raise BangerError(
            f"kernel catalog version {data['version']!r} is not supported (expected {CATALOG_VERSION})"
        )
    if not isinstance(data["entries"], list):
        raise BangerError("kernel catalog 'entries' must be a list")
    entries: list[CatalogEntry] = []
    for index, raw in enumerate(data["entries"]):
        entry = _parse_entry(index, raw, allow_loopback_http)
        if any(e.name == entry.name for e in entries):
            raise BangerError(f"kernel catalog entry {index}: duplicate name {entry.name!r}")
        entries.append(entry)
    return Catalog(tuple(entries))


@functools.cache
def load_catalog() -> Catalog:
    """The catalog embedded in the package, plus the entries of `$BANGER_KERNEL_CATALOG` if set."""
    text = resources.files("banger.kernels").joinpath("catalog.json").read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BangerError(f"embedded kernel catalog is not valid JSON: {exc}") from exc
    embedded = parse_catalog(data)
    extra_path = os.environ.get(EXTRA_CATALOG_ENV)
    if not extra_path:
        return embedded
    try:
        extra = parse_catalog(json.loads(Path(extra_path).read_text(encoding="utf-8")), allow_loopback_http=True)
    except (OSError, json.JSONDecodeError) as exc:
        raise BangerError(f"{EXTRA_CATALOG_ENV}={extra_path}: cannot load it: {exc}") from exc
    except BangerError as exc:
        raise BangerError(f"{EXTRA_CATALOG_ENV}={extra_path}: {exc.message}") from exc
    for entry in extra:
        if any(e.name == entry.name for e in embedded):
            raise BangerError(f"{EXTRA_CATALOG_ENV}={extra_path}: entry {entry.name!r} clashes with the embedded catalog")
    return Catalog(embedded.entries + extra.entries)


# --- pulling a Debian kernel -------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelArtifacts:
    directory: Path
    vmlinuz: Path  # bzImage, for QEMU -kernel
    vmlinux: Path  # ELF with PVH entry, for Firecracker / QEMU microvm
    initrd: Path  # gzip'd newc busybox initramfs
    manifest_path: Path
    manifest: dict[str, Any]


def _obtain_deb(
    mirror: str,
    pkg: DebPackage,
    work: Path,
    max_bytes: int,
    cache_dir: Path | None,
    progress: Progress | None,
) -> Path:
    """The verified .deb: from `cache_dir` (keyed by sha256, re-hashed) or freshly downloaded."""
    if cache_dir is None:
        return fetch_deb(mirror, pkg, work, max_bytes, progress=progress)
    cached = cache_dir / f"{pkg.sha256}.deb"
    if cached.is_file():
        if cached.stat().st_size == pkg.size and sha256_file(cached) == pkg.sha256:
            log.info("using cached %s", cached)
            return cached
        log.warning("cached %s does not match its sha256; downloading again", cached)
        cached.unlink()
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.replace(fetch_deb(mirror, pkg, cache_dir, max_bytes, progress=progress), cached)
    return cached


def _kernel_version(pkg: DebPackage, root: Path) -> str:
    """`linux-image-6.1.0-50-cloud-amd64` ships boot/vmlinuz-6.1.0-50-cloud-amd64."""
    kver = pkg.name.removeprefix("linux-image-")
    if (root / "boot" / f"vmlinuz-{kver}").is_file():
        return kver
    found = sorted(p.name.removeprefix("vmlinuz-") for p in (root / "boot").glob("vmlinuz-*"))
    if len(found) != 1:
        raise BangerError(f"{pkg.name} {pkg.version} has no single boot/vmlinuz-* (found: {found or 'none'})")
    return found[0]


def _install(staging: Path, dest_dir: Path) -> None:
    """Move `staging` to `dest_dir`, replacing an existing directory without ever mixing the two."""
    old: Path | None = None
    if dest_dir.exists():
        old = dest_dir.with_name(f".{dest_dir.name}.old-{secrets.token_hex(4)}")
        os.rename(dest_dir, old)
    try:
        os.rename(staging, dest_dir)
    except BaseException:
        if old is not None:
            os.rename(old, dest_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def pull_debian_kernel(
    entry: CatalogEntry,
    mirror: str,
    dest_dir: Path,
    max_bytes: int,
    *,
    keyring: Path = DEFAULT_KEYRING,
    cache_dir: Path | None = None,
    busybox: Path = Path("/bin/busybox"),
    progress: Progress | None = None,
) -> KernelArtifacts:
    """Fetch `entry`'s kernel package from `mirror` and install its boot artifacts as `dest_dir`.

    `dest_dir` ends up holding vmlinuz, vmlinux, initrd.img and manifest.json, or is left as it was:
    everything is built in a staging directory next to it and renamed into place at the end.
    """
    if not isinstance(entry, DebianKernel):
        raise BadRequest(f"kernel {entry.name!r} is of kind {entry.kind!r}, not 'debian'")
    parent = dest_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.work-", dir=parent))
    staging = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.staging-", dir=parent))
    timings: dict[str, float] = {}
    try:
        started = time.monotonic()
        pkg = resolve_kernel_package(
            mirror, entry.suite, entry.arch, entry.meta_package, keyring, work_dir=work
        )
        timings["resolve"] = time.monotonic() - started

        started = time.monotonic()
        deb = _obtain_deb(mirror, pkg, work, max_bytes, cache_dir, progress)
        timings["fetch"] = time.monotonic() - started

        started = time.monotonic()
        root = work / "root"
        extract_deb(deb, root)
        kver = _kernel_version(pkg, root)
        shutil.copyfile(root / "boot" / f"vmlinuz-{kver}", staging / "vmlinuz")
        timings["unpack"] = time.monotonic() - started

        started = time.monotonic()
        extract_vmlinux(staging / "vmlinuz", staging / "vmlinux")
        timings["vmlinux"] = time.monotonic() - started

        started = time.monotonic()
        modules = build_mini_initrd(root, kver, staging / "initrd.img", busybox)
        timings["initrd"] = time.monotonic() - started

        manifest: dict[str, Any] = {
            "name": entry.name,
            "distro": "debian",
            "arch": entry.arch,
            "kernel_version": kver,
            "source": f"{mirror.rstrip('/')}/{pkg.filename}",
            "sha256": pkg.sha256,
            "package": pkg.name,
            "package_version": pkg.version,
            "suite": entry.suite,
            "imported_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "initrd_modules": modules,
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        os.chmod(staging, 0o755)  # mkdtemp made it 0700; a kernel directory is not secret
        _install(staging, dest_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info(
        "pulled kernel %s (%s %s): %s",
        entry.name,
        pkg.name,
        pkg.version,
        ", ".join(f"{step} {secs:.2f}s" for step, secs in timings.items()),
    )
    return KernelArtifacts(
        directory=dest_dir,
        vmlinuz=dest_dir / "vmlinuz",
        vmlinux=dest_dir / "vmlinux",
        initrd=dest_dir / "initrd.img",
        manifest_path=dest_dir / "manifest.json",
        manifest=manifest,
    )
