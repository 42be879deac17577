"""The pure half of the Debian archive client (banger.kernels.debian does the fetching and the gpgv
check): parsers over archive metadata text (clear-signed InRelease, deb822 Release and Packages), dpkg
version order, Depends relations, and choosing a package from a Packages index.

Functions over text only, unit-tested on fixtures; the text they get is already verified (the Release
by its signature, a Packages index by the Release's sha256), so they check shape, not trust.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from banger.errors import BadRequest, BangerError, NotFound

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RELATION = re.compile(
    r"^(?P<name>[a-z0-9][a-z0-9.+-]*)(?::[a-z0-9-]+)?"
    r"\s*(?:\(\s*(?P<op><<|<=|>=|>>|=|<|>)\s*(?P<version>[^\s)]+)\s*\))?"
    r"\s*(?:\[[^\]]*\])?\s*(?:<[^>]*>\s*)*$"
)


@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str
    filename: str  # path relative to the mirror root, e.g. pool/main/l/.../x.deb
    sha256: str
    size: int


@dataclass(frozen=True)
class IndexEntry:
    path: str  # relative to dists/<suite>/
    sha256: str
    size: int


@dataclass(frozen=True)
class Release:
    fields: dict[str, str]
    sha256: dict[str, IndexEntry]
    date: datetime | None
    valid_until: datetime | None

    @property
    def acquire_by_hash(self) -> bool:
        return self.fields.get("Acquire-By-Hash", "").lower() == "yes"


@dataclass(frozen=True)
class Relation:
    name: str
    op: str | None = None
    version: str | None = None


def parse_clearsigned(text: str) -> str:
    """The signed text of an OpenPGP clear-signed message, dash-escaping undone.

    Strict on purpose (like apt): nothing may precede the armor header or follow the signature, so a
    parser can never be fed unsigned lines that `gpgv` ignored.
    """
    lines = text.split("\n")
    i = 0
    if not lines or lines[0] != "-----BEGIN PGP SIGNED MESSAGE-----":
        raise BangerError("InRelease is not a clear-signed message (no '-----BEGIN PGP SIGNED MESSAGE-----')")
    i = 1
    while i < len(lines) and lines[i] != "":
        if not lines[i].startswith("Hash: "):
            raise BangerError(f"InRelease has an unexpected armor header {lines[i][:60]!r}")
        i += 1
    i += 1
    body: list[str] = []
    while True:
        if i >= len(lines):
            raise BangerError("InRelease has no signature block")
        line = lines[i]
        i += 1
        if line == "-----BEGIN PGP SIGNATURE-----":
            break
        if line.startswith("- "):
            line = line[2:]
        elif line.startswith("-"):
            raise BangerError(f"InRelease has an unexpected armor line {line[:60]!r}")
        body.append(line)
    while True:
        if i >= len(lines):
            raise BangerError("InRelease signature block is not terminated")
        line = lines[i]
        i += 1
        if line == "-----END PGP SIGNATURE-----":
            break
        if line.startswith("-----"):
            raise BangerError(f"InRelease has an unexpected armor line {line[:60]!r}")
    if any(rest.strip() for rest in lines[i:]):
        raise BangerError("InRelease has data after its signature; refused")
    if not body:
        raise BangerError("InRelease signed message is empty")
    return "\n".join(body) + "\n"


def parse_deb822(text: str) -> list[dict[str, str]]:
    """Stanzas of a deb822 file (Release, Packages). Continuation lines are joined with newlines."""
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key: str | None = None
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            if current:
                stanzas.append(current)
            current, key = {}, None
            continue
        if line.startswith("#"):
            continue
        if line[0] in " \t":
            if key is None:
                raise BangerError(f"deb822 line {number}: continuation line without a field: {line[:60]!r}")
            value = line.strip()
            current[key] += "\n" + ("" if value == "." else value)
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or any(c.isspace() for c in name):
            raise BangerError(f"deb822 line {number}: expected 'Field: value', got {line[:60]!r}")
        if name in current:
            raise BangerError(f"deb822 line {number}: field {name!r} appears twice in one stanza")
        current[name] = value.strip()
        key = name
    if current:
        stanzas.append(current)
    return stanzas


def _parse_date(value: str, field: str) -> datetime:
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError) as exc:
        raise BangerError(f"Release field {field} {value!r} is not a valid date") from exc
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def parse_release(text: str) -> Release:
    """The (already verified) Release text: its fields and its SHA256 table."""
    stanzas = parse_deb822(text)
    if len(stanzas) != 1:
        raise BangerError(f"Release file has {len(stanzas)} stanzas; expected exactly 1")
    fields = stanzas[0]
    table: dict[str, IndexEntry] = {}
    for line in fields.get("SHA256", "").split("\n"):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3 or not _SHA256.fullmatch(parts[0]) or not parts[1].isdigit():
            raise BangerError(f"Release SHA256 line is malformed: {line[:100]!r}")
        table[parts[2]] = IndexEntry(path=parts[2], sha256=parts[0], size=int(parts[1]))
    if not table:
        raise BangerError("Release file has no SHA256 entries")
    date = _parse_date(fields["Date"], "Date") if "Date" in fields else None
    valid_until = _parse_date(fields["Valid-Until"], "Valid-Until") if "Valid-Until" in fields else None
    return Release(fields=fields, sha256=table, date=date, valid_until=valid_until)


class ExpiredRelease(BangerError):
    """A well-signed Release past its Valid-Until: a stale mirror, or one replaying old metadata."""


def check_release(release: Release, suite: str, now: datetime, *, allow_expired: bool = False) -> None:
    """Refuse an expired Release (unless `allow_expired`), or one signed for another suite (a replayed
    or swapped file)."""
    names = {release.fields.get("Suite"), release.fields.get("Codename")}
    if suite not in names:
        got = ", ".join(sorted(n for n in names if n)) or "none"
        raise BangerError(
            f"Release is for suite {got}, not {suite!r}; refused (mirror serves the wrong file?)"
        )
    if release.valid_until is not None and now > release.valid_until and not allow_expired:
        raise ExpiredRelease(
            f"Release for {suite!r} expired at {release.valid_until.isoformat()}; refused",
            hint="the mirror is stale or replaying old metadata; try another mirror",
        )


def packages_index(release: Release, component: str, arch: str) -> IndexEntry:
    """The best-compressed Packages index the Release lists for component/arch."""
    for suffix in (".xz", ".gz", ""):
        entry = release.sha256.get(f"{component}/binary-{arch}/Packages{suffix}")
        if entry is not None:
            return entry
    raise NotFound(f"Release lists no Packages index for {component}/binary-{arch}")


def parse_relations(value: str) -> list[list[Relation]]:
    """A Depends-style field: a list of alternatives groups ('a (>= 1) | b, c')."""
    groups: list[list[Relation]] = []
    for group in value.replace("\n", " ").split(","):
        if not group.strip():
            continue
        alternatives: list[Relation] = []
        for alt in group.split("|"):
            match = _RELATION.match(alt.strip())
            if match is None:
                raise BangerError(f"cannot parse package relation {alt.strip()!r}")
            op = match["op"]
            alternatives.append(Relation(match["name"], {"<": "<=", ">": ">="}.get(op, op), match["version"]))
        groups.append(alternatives)
    return groups


def _order(s: str, i: int) -> int:
    if i >= len(s) or s[i] in "0123456789":
        return 0
    c = s[i]
    if ("a" <= c <= "z") or ("A" <= c <= "Z"):
        return ord(c)
    if c == "~":
        return -1
    return ord(c) + 256


def _verrevcmp(a: str, b: str) -> int:
    # dpkg's lib/dpkg/version.c:verrevcmp, transcribed.
    digits = "0123456789"
    i = j = 0
    while i < len(a) or j < len(b):
        first_diff = 0
        while (i < len(a) and a[i] not in digits) or (j < len(b) and b[j] not in digits):
            ac, bc = _order(a, i), _order(b, j)
            if ac != bc:
                return ac - bc
            i, j = i + 1, j + 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        while i < len(a) and a[i] in digits and j < len(b) and b[j] in digits:
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i, j = i + 1, j + 1
        if i < len(a) and a[i] in digits:
            return 1
        if j < len(b) and b[j] in digits:
            return -1
        if first_diff:
            return first_diff
    return 0


def _split_version(version: str) -> tuple[int, str, str]:
    epoch, sep, rest = version.partition(":")
    if not sep:
        epoch, rest = "0", version
    if not epoch.isdigit():
        raise BangerError(f"version {version!r} has a non-numeric epoch")
    upstream, dash, revision = rest.rpartition("-")
    if not dash:
        upstream, revision = rest, ""
    return int(epoch), upstream, revision


def compare_versions(a: str, b: str) -> int:
    """dpkg's version ordering: negative if a < b, 0 if equal, positive if a > b."""
    ea, ua, ra = _split_version(a)
    eb, ub, rb = _split_version(b)
    if ea != eb:
        return ea - eb
    return _verrevcmp(ua, ub) or _verrevcmp(ra, rb)


def satisfies(version: str, relation: Relation) -> bool:
    if relation.op is None or relation.version is None:
        return True
    cmp = compare_versions(version, relation.version)
    return {"<<": cmp < 0, "<=": cmp <= 0, "=": cmp == 0, ">=": cmp >= 0, ">>": cmp > 0}[relation.op]


def find_stanzas(text: str, wanted: Callable[[str], bool]) -> list[dict[str, str]]:
    """The stanzas of a large Packages text whose Package name passes `wanted`.

    Only stanzas whose first line names a wanted package are parsed: a full parse of the 50 MB
    index would cost seconds for a handful of stanzas.
    """
    found: list[dict[str, str]] = []
    for chunk in re.split(r"\n[ \t]*\n", text):
        head = chunk.lstrip("\n").split("\n", 1)[0]
        if head.startswith("Package:") and wanted(head[len("Package:") :].strip()):
            found.extend(parse_deb822(chunk))
    return found


def _highest(stanzas: list[dict[str, str]]) -> dict[str, str]:
    best = stanzas[0]
    for stanza in stanzas[1:]:
        if compare_versions(stanza.get("Version", "0"), best.get("Version", "0")) > 0:
            best = stanza
    return best


def _deb_package(stanza: dict[str, str]) -> DebPackage:
    name = stanza.get("Package", "")
    missing = [f for f in ("Version", "Filename", "SHA256", "Size") if not stanza.get(f)]
    if missing:
        raise BangerError(f"package {name!r} in the index lacks {', '.join(missing)}")
    filename, digest, size = stanza["Filename"], stanza["SHA256"].lower(), stanza["Size"]
    parts = filename.split("/")
    if filename.startswith("/") or ".." in parts or not filename.endswith(".deb") or "" in parts:
        raise BangerError(f"package {name!r} has an unsafe Filename {filename!r}")
    if not _SHA256.fullmatch(digest):
        raise BangerError(f"package {name!r} has a malformed SHA256 {digest!r}")
    if not size.isdigit():
        raise BangerError(f"package {name!r} has a malformed Size {size!r}")
    return DebPackage(name=name, version=stanza["Version"], filename=filename, sha256=digest, size=int(size))


def select_package(packages_text: str, name: str, arch: str = "amd64") -> DebPackage:
    """The highest version of binary package `name` built for `arch` (or `all`) in a Packages text."""
    stanzas = [s for s in find_stanzas(packages_text, lambda n: n == name) if s.get("Architecture") in (arch, "all")]
    if not stanzas:
        raise NotFound(f"package {name!r} not found in the {arch} index")
    return _deb_package(_highest(stanzas))


def select_kernel_package(packages_text: str, meta_package: str, arch: str = "amd64") -> DebPackage:
    """Follow `meta_package`'s Depends to the versioned kernel image it pulls in (highest version wins).

    linux-image-cloud-amd64 depends on e.g. `linux-image-6.1.0-50-cloud-amd64 (= 6.1.176-1)`: the
    candidates are the dependencies named `linux-image-<abi>-<flavour>` for the meta package's flavour.
    """
    if not meta_package.startswith("linux-image-"):
        raise BadRequest(f"meta package {meta_package!r} must be named linux-image-<flavour>")
    flavour = meta_package[len("linux-image-") :]
    pattern = re.compile(r"^linux-image-\d[a-z0-9.+~]*(?:-[a-z0-9.+~]+)*?-" + re.escape(flavour) + r"$")
    arches = {arch, "all"}
    metas = [
        s for s in find_stanzas(packages_text, lambda n: n == meta_package) if s.get("Architecture") in arches
    ]
    if not metas:
        raise NotFound(f"package {meta_package!r} not found in the {arch} index")
    meta = _highest(metas)
    wanted: list[Relation] = [
        rel
        for group in parse_relations(meta.get("Depends", ""))
        for rel in group
        if rel.name != meta_package and pattern.match(rel.name)
    ]
    if not wanted:
        raise NotFound(
            f"{meta_package} {meta.get('Version', '?')} depends on no linux-image-*-{flavour} package "
            f"(Depends: {meta.get('Depends', '')!r})"
        )
    names = {rel.name for rel in wanted}
    candidates = [
        stanza
        for stanza in find_stanzas(packages_text, lambda n: n in names)
        if stanza.get("Architecture") in arches
        and any(rel.name == stanza["Package"] and satisfies(stanza.get("Version", ""), rel) for rel in wanted)
    ]
    if not candidates:
        wanted_text = ", ".join(f"{r.name} ({r.op} {r.version})" if r.op else r.name for r in wanted)
        raise NotFound(f"{meta_package} depends on {wanted_text}, which the {arch} index does not have")
    return _deb_package(_highest(candidates))
