"""The release manifest (`manifest.json`) and release version strings.

The manifest is the index of releases: `{"schema_version": 1, "latest_stable": "0.2.0", "versions":
{"0.2.0": {"tarball": "0.2.0/banger-0.2.0-linux-amd64.tar.gz", "sha256": "...", "size": 123}}}`.
It is not signed: it only says where to look. What is installed is decided by `SHA256SUMS`, whose
signature is checked (verify.py), and by the contents of the archive (stage.py). A manifest with a
`schema_version` this banger does not know is refused rather than guessed at.

Versions are semantic versions without build metadata: `1.2.3` or `1.2.3-rc.1`; a leading `v` is
accepted on input and never stored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urljoin, urlsplit

from banger.errors import BangerError, NotFound

# No release host is published yet; `--manifest-url` (hidden) points `banger update` elsewhere.
DEFAULT_MANIFEST_URL: Final = "https://releases.banger.invalid/manifest.json"
SCHEMA_VERSION: Final = 1
MAX_MANIFEST_BYTES: Final = 1 << 20
MAX_TARBALL_BYTES: Final = 256 << 20
PLATFORM: Final = "linux-amd64"

_SEMVER = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(?:-([0-9A-Za-z]+(?:\.[0-9A-Za-z]+)*))?")
_HEX64 = re.compile(r"[0-9a-f]{64}")

Version = tuple[int, int, int, tuple[tuple[int, int | str], ...] | None]


def normalize_version(text: str) -> str:
    """`v1.2.3` → `1.2.3`; anything that is not a release version is refused."""
    value = text[1:] if text.startswith("v") else text
    if not _SEMVER.fullmatch(value):
        raise BangerError(f"version {text!r} is not a release version (allowed: X.Y.Z or X.Y.Z-label, e.g. v0.2.0)")
    return value


def parse_version(text: str) -> Version | None:
    """A sortable key, or None for a version that is not a release version (a development build)."""
    m = _SEMVER.fullmatch(text[1:] if text.startswith("v") else text)
    if m is None:
        return None
    pre: tuple[tuple[int, int | str], ...] | None = None
    if m[4] is not None:
        # Semver precedence: numeric identifiers sort numerically and before alphanumeric ones.
        pre = tuple((0, int(p)) if p.isdigit() else (1, p) for p in m[4].split("."))
    return int(m[1]), int(m[2]), int(m[3]), pre


def version_key(text: str) -> tuple[int, int, int, int, tuple[tuple[int, int | str], ...]]:
    v = parse_version(text)
    if v is None:
        return (-1, -1, -1, -1, ())
    major, minor, patch, pre = v
    # A release sorts after all of its pre-releases.
    return (major, minor, patch, 0 if pre is not None else 1, pre or ())


def is_stable(version: str) -> bool:
    v = parse_version(version)
    return v is not None and v[3] is None


def tarball_name(version: str) -> str:
    return f"banger-{version}-{PLATFORM}.tar.gz"


@dataclass(frozen=True)
class ReleaseEntry:
    version: str
    tarball: str  # relative to the manifest URL (or absolute http(s))
    sha256: str
    size: int

    def tarball_url(self, manifest_url: str) -> str:
        return urljoin(manifest_url, self.tarball)

    def sums_url(self, manifest_url: str) -> str:
        return urljoin(self.tarball_url(manifest_url), "SHA256SUMS")

    def sig_url(self, manifest_url: str) -> str:
        return urljoin(self.tarball_url(manifest_url), "SHA256SUMS.sig")


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    latest_stable: str
    versions: dict[str, ReleaseEntry]

    def entry(self, version: str) -> ReleaseEntry:
        try:
            return self.versions[version]
        except KeyError:
            known = ", ".join(f"v{v}" for v in sorted(self.versions, key=version_key))
            raise NotFound(f"version v{version} is not in the release manifest (known: {known or 'none'})") from None

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "latest_stable": self.latest_stable,
            "versions": {
                v: {"tarball": e.tarball, "sha256": e.sha256, "size": e.size}
                for v, e in sorted(self.versions.items(), key=lambda kv: version_key(kv[0]))
            },
        }


def _entry(version: str, raw: object) -> ReleaseEntry:
    where = f"manifest entry {version!r}"
    if not isinstance(raw, dict):
        raise BangerError(f"{where} is not an object")
    tarball, sha256, size = raw.get("tarball"), raw.get("sha256"), raw.get("size")
    if not isinstance(tarball, str) or not tarball:
        raise BangerError(f"{where} has no tarball path")
    parts = urlsplit(tarball)
    if parts.scheme not in ("", "http", "https") or ".." in parts.path.split("/") or "\\" in tarball:
        raise BangerError(f"{where}: tarball {tarball!r} must be a relative path or an http(s) URL")
    if parts.path.rsplit("/", 1)[-1] != tarball_name(version):
        raise BangerError(f"{where}: tarball {tarball!r} must be named {tarball_name(version)}")
    if not isinstance(sha256, str) or not _HEX64.fullmatch(sha256):
        raise BangerError(f"{where}: sha256 must be 64 lowercase hex digits")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_TARBALL_BYTES:
        raise BangerError(f"{where}: size must be a byte count from 1 to {MAX_TARBALL_BYTES}")
    return ReleaseEntry(version, tarball, sha256, size)


def parse(data: bytes, source: str = "manifest") -> Manifest:
    if len(data) > MAX_MANIFEST_BYTES:
        raise BangerError(f"{source} is {len(data)} bytes, over the cap of {MAX_MANIFEST_BYTES}")
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BangerError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise BangerError(f"{source} is not a JSON object")
    schema = raw.get("schema_version")
    if schema != SCHEMA_VERSION or isinstance(schema, bool):
        raise BangerError(
            f"{source} has schema_version {schema!r}; this banger understands only {SCHEMA_VERSION}",
            hint="a newer banger is needed to read it: install the latest release by hand",
        )
    versions_raw = raw.get("versions")
    if not isinstance(versions_raw, dict) or not versions_raw:
        raise BangerError(f"{source} lists no versions")
    versions: dict[str, ReleaseEntry] = {}
    for key, value in versions_raw.items():
        if normalize_version(key) != key:
            raise BangerError(f"{source}: version key {key!r} must be written without a leading 'v'")
        versions[key] = _entry(key, value)
    latest = raw.get("latest_stable")
    if not isinstance(latest, str) or latest not in versions:
        raise BangerError(f"{source}: latest_stable {latest!r} is not one of its versions")
    return Manifest(SCHEMA_VERSION, latest, versions)


def fetch_bytes(url: str, max_bytes: int, timeout: float = 60) -> bytes:
    """GET a small document into memory, refusing more than `max_bytes` (http, https or file URLs)."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        from urllib.parse import unquote

        path = unquote(urlsplit(url).path)
        try:
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
        except OSError as exc:
            raise BangerError(f"cannot read {url}: {exc.strerror or exc}") from None
    elif scheme in ("http", "https"):
        import httpx

        chunks: list[bytes] = []
        received = 0
        try:
            with httpx.Client(timeout=timeout, follow_redirects=True) as client, client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise BangerError(f"GET {url} failed: HTTP {resp.status_code} {resp.reason_phrase}".rstrip())
                for chunk in resp.iter_bytes():
                    received += len(chunk)
                    if received > max_bytes:
                        raise BangerError(f"{url}: refused: more than {max_bytes} bytes")
                    chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise BangerError(f"GET {url} failed: {' '.join(str(exc).split()) or type(exc).__name__}") from None
        data = b"".join(chunks)
    else:
        raise BangerError(f"URL {url!r} has scheme {scheme!r}; allowed: http, https, file")
    if len(data) > max_bytes:
        raise BangerError(f"{url}: refused: more than {max_bytes} bytes")
    return data


def fetch(url: str) -> Manifest:
    return parse(fetch_bytes(url, MAX_MANIFEST_BYTES), url)


def choose_target(manifest: Manifest, to: str | None) -> ReleaseEntry:
    """`--to vX.Y.Z`, or the manifest's latest stable release. Unknown versions fail here, before any change."""
    version = manifest.latest_stable if to is None else normalize_version(to)
    return manifest.entry(version)
