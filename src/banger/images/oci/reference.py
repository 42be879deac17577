"""Image references: `[registry/]repository[:tag][@sha256:<hex>]`, normalised the way Docker does.

`alpine` is `docker.io/library/alpine:latest`; a first component is a registry only if it has a `.`
or a `:` or is `localhost` (so `bitnami/redis` is on Docker Hub, `ghcr.io/x/y` is not). A reference
with both a tag and a digest is pulled by the digest; the tag is kept for display. Only sha256
digests are accepted: it is the only algorithm registries use and the only one banger verifies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from banger.errors import BadRequest

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"
NAME_MAX = 255

_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"^{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$")
_DOMAIN_COMPONENT = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_DOMAIN = re.compile(rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_ANY_DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[A-Za-z0-9=_-]+$")
_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io")


@dataclass(frozen=True)
class Reference:
    domain: str  # as written, e.g. docker.io, ghcr.io, 127.0.0.1:5000
    repository: str  # e.g. library/alpine
    tag: str | None
    digest: str | None  # sha256:<64 hex>

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host[:port] that serves the v2 API (Docker Hub's differs from its name)."""
        return DOCKER_HUB_API if self.domain == DOCKER_HUB else self.domain

    @property
    def manifest_ref(self) -> str:
        """What goes after /manifests/: the digest if there is one, else the tag."""
        if self.digest is not None:
            return self.digest
        return self.tag if self.tag is not None else DEFAULT_TAG

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.domain, self.repository, self.tag, check_digest(digest, "digest"))

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def check_digest(value: str, what: str = "digest") -> str:
    """`value` if it is `sha256:<64 lowercase hex>`; BadRequest naming `what` otherwise."""
    if _DIGEST.fullmatch(value):
        return value
    if _ANY_DIGEST.fullmatch(value) and not value.startswith("sha256:"):
        algorithm = value.split(":", 1)[0]
        raise BadRequest(f"{what} {value!r} uses the {algorithm!r} algorithm; only sha256 is supported")
    raise BadRequest(f"{what} {value!r} is not a valid digest (expected sha256: and 64 lowercase hex digits)")


def digest_hex(digest: str) -> str:
    return check_digest(digest)[len("sha256:") :]


def parse_reference(text: str) -> Reference:
    """Parse and normalise an image reference; BadRequest quoting it and saying what is wrong."""
    shown = repr(text)
    if not text:
        raise BadRequest("image reference is empty")
    if "://" in text:
        raise BadRequest(f"image reference {shown} has a URL scheme",
                         hint="write it as registry/repository:tag, e.g. ghcr.io/org/image:1.0")
    if any(c.isspace() for c in text) or not text.isprintable():
        raise BadRequest(f"image reference {shown} contains whitespace or control characters")
    rest = text
    digest: str | None = None
    if "@" in rest:
        rest, raw_digest = rest.split("@", 1)
        digest = check_digest(raw_digest, f"image reference {shown}: digest")
    tag: str | None = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise BadRequest(f"image reference {shown} has an invalid tag {tag!r} "
                             "(allowed: letters, digits, '_', '.', '-'; at most 128; not starting with '.' or '-')")
    if not rest:
        raise BadRequest(f"image reference {shown} has no repository name")
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.lower() != first):
        domain, path = first, remainder
        if not _DOMAIN.fullmatch(domain):
            raise BadRequest(f"image reference {shown} has an invalid registry {domain!r}")
        if domain in _HUB_ALIASES:
            domain = DOCKER_HUB
    else:
        domain, path = DOCKER_HUB, rest
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if path.lower() != path:
        raise BadRequest(f"image reference {shown}: repository name {path!r} must be lowercase")
    if not _PATH.fullmatch(path):
        raise BadRequest(f"image reference {shown} has an invalid repository name {path!r} "
                         "(allowed: lowercase letters and digits, separated by '/', '.', '_', '__' or '-')")
    if len(domain) + 1 + len(path) > NAME_MAX:
        raise BadRequest(f"image reference {shown} is longer than {NAME_MAX} characters")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest)


def default_image_name(ref: Reference) -> str:
    """A banger image name for `ref`: the last repository component plus the tag or a digest prefix."""
    base = ref.repository.rsplit("/", 1)[-1]
    suffix = ref.tag if ref.tag is not None else (ref.digest or "")[len("sha256:") :][:12]
    name = f"{base}-{suffix}" if suffix else base
    name = re.sub(r"[^A-Za-z0-9._-]", "-", name).replace("..", ".")
    return name[:128]
