"""The embedded image catalog: the names `banger image pull <name>` knows without a registry.

`catalog.json` ships inside the package. Every entry is validated strictly when loaded: an unknown
kind or field, a malformed digest or a non-https URL is a one-line error naming the entry's index, so
a bad catalog fails in CI rather than on a user's `image pull`. A `kernel_ref` must name an entry of
the kernel catalog, because pulling an image pulls its kernel too.

Kinds:
* `golden`: built on this host from Debian's archive with mmdebstrap (banger.images.golden); `variant`
  picks the package set.
* `bundle`: a prebuilt `rootfs.ext4` + `manifest.json` archive at `url`, trusted through its embedded
  `sha256` and `size` (none are published yet; the kind is validated so the first one cannot be wrong).

Tests and maintainers can add entries with `BANGER_IMAGE_CATALOG=<path to a catalog JSON file>`, read
by the process that pulls (the daemon). Those entries may also use `http://` URLs on a loopback host
(a local test server); their names must not clash with the embedded ones.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from banger.errors import BadRequest, BangerError, NotFound
from banger.images.golden import VARIANTS
from banger.model import validate_artifact_name

CATALOG_VERSION = 1
ARCHES = ("amd64",)
DISTROS = ("debian",)
_SUITE = re.compile(r"^[a-z][a-z0-9-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class GoldenImage:
    name: str
    suite: str
    variant: str
    kernel_ref: str
    arch: str = "amd64"
    description: str = ""
    kind: ClassVar[str] = "golden"

    def to_json(self) -> dict[str, Any]:
        return entry_to_json(self)


@dataclass(frozen=True)
class BundleImage:
    name: str
    url: str
    sha256: str
    size: int
    kernel_ref: str
    distro: str = "debian"
    arch: str = "amd64"
    description: str = ""
    kind: ClassVar[str] = "bundle"

    def to_json(self) -> dict[str, Any]:
        return entry_to_json(self)


CatalogEntry = GoldenImage | BundleImage


def entry_to_json(entry: CatalogEntry) -> dict[str, Any]:
    """The entry as it appears in catalog.json (kind first)."""
    return {"kind": entry.kind, **dataclasses.asdict(entry)}


# kind -> (class, required fields, optional fields); "kind" and "name" are required for every kind.
_KINDS: dict[str, tuple[type[CatalogEntry], frozenset[str], frozenset[str]]] = {
    "golden": (
        GoldenImage,
        frozenset({"suite", "variant", "kernel_ref"}),
        frozenset({"arch", "description"}),
    ),
    "bundle": (
        BundleImage,
        frozenset({"url", "sha256", "size", "kernel_ref"}),
        frozenset({"distro", "arch", "description"}),
    ),
}


@dataclass(frozen=True)
class Catalog:
    entries: tuple[CatalogEntry, ...]

    def __iter__(self) -> Iterator[CatalogEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def get(self, name: str) -> CatalogEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        names = ", ".join(self.names()) or "none"
        raise NotFound(f"no image named {name!r} in the catalog (available: {names})")

    def to_json(self) -> dict[str, Any]:
        return {"version": CATALOG_VERSION, "entries": [e.to_json() for e in self.entries]}


EXTRA_CATALOG_ENV = "BANGER_IMAGE_CATALOG"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _check_value(field: str, value: Any, kernel_names: Collection[str] | None,
                 allow_loopback_http: bool = False) -> str | None:
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
        loopback = allow_loopback_http and parts.scheme == "http" and parts.hostname in _LOOPBACK
        if (parts.scheme != "https" and not loopback) or not parts.hostname:
            scheme = parts.scheme or "none"
            return f"url {value!r} must be an https:// URL with a host (got scheme {scheme!r})"
        if parts.username or parts.password or parts.query or parts.fragment:
            return f"url {value!r} must not carry credentials, a query or a fragment"
    if field == "suite" and not _SUITE.fullmatch(value):
        return f"suite {value!r} is invalid (lowercase letters, digits and '-')"
    if field == "variant" and value not in VARIANTS:
        return f"variant {value!r} is not known (allowed: {', '.join(VARIANTS)})"
    if field == "arch" and value not in ARCHES:
        return f"arch {value!r} is not supported (allowed: {', '.join(ARCHES)})"
    if field == "distro" and value not in DISTROS:
        return f"distro {value!r} is not supported (allowed: {', '.join(DISTROS)})"
    if field == "kernel_ref":
        try:
            validate_artifact_name("kernel", value)
        except BadRequest as exc:
            return f"kernel_ref: {exc.message}"
        if kernel_names is not None and value not in kernel_names:
            known = ", ".join(sorted(kernel_names))
            return f"kernel_ref {value!r} is not in the kernel catalog (known: {known})"
    return None


def _parse_entry(index: int, raw: Any, kernel_names: Collection[str] | None,
                 allow_loopback_http: bool = False) -> CatalogEntry:
    where = f"image catalog entry {index}"
    if not isinstance(raw, dict):
        raise BangerError(f"{where} must be an object, not {type(raw).__name__}")
    name = raw.get("name")
    if not isinstance(name, str):
        raise BangerError(f"{where}: name must be a string")
    where = f"{where} ({name!r})"
    try:
        validate_artifact_name("image", name)
    except BadRequest as exc:
        raise BangerError(f"{where}: {exc.message}") from exc
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
            problem = _check_value(field, raw[field], kernel_names, allow_loopback_http)
            if problem:
                raise BangerError(f"{where}: {problem}")
    return cls(**{k: v for k, v in raw.items() if k != "kind"})


def parse_catalog(data: Any, kernel_names: Collection[str] | None = None, *,
                  allow_loopback_http: bool = False) -> Catalog:
    """Validate a decoded catalog document; any problem is a one-line BangerError.

    With `kernel_names`, every `kernel_ref` must be one of them.
    """
    if not isinstance(data, dict) or set(data) != {"version", "entries"}:
        raise BangerError("image catalog must be an object with exactly 'version' and 'entries'")
    if data["version"] != CATALOG_VERSION or isinstance(data["version"], bool):
        raise BangerError(
            f"image catalog version {data['version']!r} is not supported (expected {CATALOG_VERSION})"
        )
    if not isinstance(data["entries"], list):
        raise BangerError("image catalog 'entries' must be a list")
    entries: list[CatalogEntry] = []
    for index, raw in enumerate(data["entries"]):
        entry = _parse_entry(index, raw, kernel_names, allow_loopback_http)
        if any(e.name == entry.name for e in entries):
            raise BangerError(f"image catalog entry {index}: duplicate name {entry.name!r}")
        entries.append(entry)
    return Catalog(tuple(entries))


@functools.cache
def load_catalog() -> Catalog:
    """The catalog embedded in the package, checked against the embedded kernel catalog."""
    from banger.kernels import catalog as kernel_catalog

    text = resources.files("banger.images").joinpath("catalog.json").read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BangerError(f"embedded image catalog is not valid JSON: {exc}") from exc
    kernel_names = {e.name for e in kernel_catalog.load_catalog()}
    embedded = parse_catalog(data, kernel_names)
    extra_path = os.environ.get(EXTRA_CATALOG_ENV)
    if not extra_path:
        return embedded
    try:
        extra = parse_catalog(json.loads(Path(extra_path).read_text(encoding="utf-8")), kernel_names,
                              allow_loopback_http=True)
    except (OSError, json.JSONDecodeError) as exc:
        raise BangerError(f"{EXTRA_CATALOG_ENV}={extra_path}: cannot load it: {exc}") from exc
    except BangerError as exc:
        raise BangerError(f"{EXTRA_CATALOG_ENV}={extra_path}: {exc.message}") from exc
    for entry in extra:
        if entry.name in embedded.names():
            raise BangerError(f"{EXTRA_CATALOG_ENV}={extra_path}: entry {entry.name!r} clashes with the embedded catalog")
    return Catalog(embedded.entries + extra.entries)
