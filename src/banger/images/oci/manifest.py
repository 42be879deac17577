"""Manifests, indexes and image configs: OCI and Docker schema 2, parsed strictly.

Everything here comes from a registry we do not trust, so each document is checked for the fields
banger relies on before anything is fetched on its behalf: descriptors carry a sha256 digest and a
size within bounds, layers have a media type banger can unpack, and an index is resolved to exactly
one linux/amd64 manifest. Docker schema 1 (signed, deprecated since 2017) is refused by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from banger.errors import BadRequest, NotFound
from banger.images.oci.reference import check_digest

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))

# Layer media type -> compression ("" for a plain tar). flatten sniffs the real compression itself.
LAYER_TYPES: dict[str, str] = {
    "application/vnd.oci.image.layer.v1.tar": "",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
}
FOREIGN_LAYER_TYPES = (
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
)
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)

MAX_MANIFEST_BYTES = 4 << 20  # containerd's limit too
MAX_CONFIG_BYTES = 8 << 20
MAX_LAYERS = 256
MAX_INDEX_ENTRIES = 1024
PLATFORM = ("linux", "amd64")


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: tuple[str, str, str] | None = None  # (os, architecture, variant) for index entries
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def short(self) -> str:
        return self.digest[:19] + "…"

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            data["annotations"] = dict(self.annotations)
        return data


@dataclass(frozen=True)
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class ImageConfig:
    os: str
    architecture: str
    env: tuple[str, ...]
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    working_dir: str
    user: str
    diff_ids: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"os": self.os, "architecture": self.architecture, "env": list(self.env),
                "entrypoint": list(self.entrypoint), "cmd": list(self.cmd), "working_dir": self.working_dir,
                "user": self.user}


def _load(body: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"{what} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise BadRequest(f"{what} is not a JSON object")
    return data


def _str(data: dict[str, Any], key: str, what: str, *, required: bool = True) -> str:
    value = data.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"{what}: {key!r} must be a string, not {json.dumps(value)[:60]}")
    return value


def _str_list(data: dict[str, Any], key: str, what: str) -> tuple[str, ...]:
    value = data.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"{what}: {key!r} must be a list of strings")
    return tuple(value)


def parse_descriptor(data: Any, what: str, *, max_size: int | None = None) -> Descriptor:
    if not isinstance(data, dict):
        raise BadRequest(f"{what} is not a JSON object")
    media_type = _str(data, "mediaType", what)
    digest = check_digest(_str(data, "digest", what), f"{what} digest")
    size = data.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BadRequest(f"{what}: size {json.dumps(size)[:40]} is not a non-negative integer")
    if max_size is not None and size > max_size:
        raise BadRequest(f"{what} {digest[:19]}… is {size} bytes, over the cap of {max_size} bytes")
    platform = None
    raw_platform = data.get("platform")
    if isinstance(raw_platform, dict):
        platform = (str(raw_platform.get("os", "")), str(raw_platform.get("architecture", "")),
                    str(raw_platform.get("variant", "")))
    raw_annotations = data.get("annotations")
    annotations = ({str(k): str(v) for k, v in raw_annotations.items()}
                   if isinstance(raw_annotations, dict) else {})
    return Descriptor(media_type, digest, size, platform, annotations)


def effective_media_type(body: bytes, content_type: str | None) -> str:
    """The document's media type: its own `mediaType`, else the Content-Type the registry sent."""
    data = _load(body, "manifest")
    declared = data.get("mediaType")
    header = (content_type or "").split(";", 1)[0].strip()
    if isinstance(declared, str) and declared:
        known = (*INDEX_TYPES, *MANIFEST_TYPES)
        if header in known and declared in known and header != declared:
            raise BadRequest(f"manifest says it is {declared} but the registry sent it as {header}")
        return declared
    if data.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1[0]
    if header in (*INDEX_TYPES, *MANIFEST_TYPES):
        return header
    # An OCI document may omit mediaType; its shape says which one it is.
    if "manifests" in data:
        return OCI_INDEX
    if "layers" in data:
        return OCI_MANIFEST
    raise BadRequest(f"manifest has no media type (Content-Type {header or 'missing'})")


def parse(body: bytes, media_type: str, max_layer_bytes: int) -> Index | Manifest:
    """Parse a manifest or an index of `media_type` (from `effective_media_type`)."""
    if media_type in DOCKER_SCHEMA1:
        raise BadRequest("the image uses Docker manifest schema 1, which is not supported",
                         hint="push it again with a current tool (docker, skopeo, buildah) to get schema 2")
    if media_type not in (*INDEX_TYPES, *MANIFEST_TYPES):
        raise BadRequest(f"unsupported manifest media type {media_type!r}")
    data = _load(body, "manifest")
    if data.get("schemaVersion") != 2:
        raise BadRequest(f"manifest schemaVersion is {json.dumps(data.get('schemaVersion'))}, expected 2")
    if media_type in INDEX_TYPES:
        entries = data.get("manifests")
        if not isinstance(entries, list):
            raise BadRequest("image index has no 'manifests' list")
        if len(entries) > MAX_INDEX_ENTRIES:
            raise BadRequest(f"image index lists {len(entries)} manifests; at most {MAX_INDEX_ENTRIES} are allowed")
        return Index(media_type, tuple(
            parse_descriptor(e, f"index entry {i}", max_size=MAX_MANIFEST_BYTES) for i, e in enumerate(entries)))
    config = parse_descriptor(data.get("config"), "image config descriptor", max_size=MAX_CONFIG_BYTES)
    if config.media_type not in CONFIG_TYPES:
        raise BadRequest(f"image config has media type {config.media_type!r}, not a container image config",
                         hint="this is an OCI artifact (e.g. a Helm chart or a signature), not a container image")
    layers = data.get("layers")
    if not isinstance(layers, list):
        raise BadRequest("image manifest has no 'layers' list")
    if not layers:
        raise BadRequest("image manifest has no layers")
    if len(layers) > MAX_LAYERS:
        raise BadRequest(f"image manifest has {len(layers)} layers; at most {MAX_LAYERS} are allowed")
    parsed = []
    for i, raw in enumerate(layers, 1):
        layer = parse_descriptor(raw, f"layer {i}", max_size=max_layer_bytes)
        if layer.media_type in FOREIGN_LAYER_TYPES:
            raise BadRequest(f"layer {i} is a foreign (non-distributable) layer ({layer.media_type}); "
                             "banger only pulls Linux images whose layers are in the registry")
        if layer.media_type not in LAYER_TYPES:
            raise BadRequest(f"layer {i} has unsupported media type {layer.media_type!r} "
                             f"(allowed: {', '.join(sorted(LAYER_TYPES))})")
        parsed.append(layer)
    return Manifest(media_type, config, tuple(parsed))


def _platform_name(p: tuple[str, str, str] | None) -> str:
    if p is None:
        return "unspecified"
    return "/".join(part for part in p if part) or "unspecified"


def select_platform(index: Index, os_name: str = PLATFORM[0], arch: str = PLATFORM[1]) -> Descriptor:
    """The index entry for os/arch; NotFound naming the platforms the image does have."""
    matches = [d for d in index.manifests if d.platform is not None and d.platform[:2] == (os_name, arch)]
    if not matches:
        # Attestations and other artifacts appear as unknown/unknown; they are not platforms anyone can run.
        offered = sorted({_platform_name(d.platform) for d in index.manifests
                          if d.platform is None or d.platform[:2] != ("unknown", "unknown")})
        raise NotFound(f"image has no {os_name}/{arch} variant (it has: {', '.join(offered) or 'none'})",
                       hint="banger runs x86_64 Linux guests only")
    plain = [d for d in matches if d.platform is not None and d.platform[2] in ("", "v1")]
    chosen = (plain or matches)[0]
    if chosen.media_type not in (*INDEX_TYPES, *MANIFEST_TYPES):
        raise BadRequest(f"the {os_name}/{arch} entry of the index has media type {chosen.media_type!r}, "
                         "not an image manifest")
    return chosen


def parse_config(body: bytes, layer_count: int) -> ImageConfig:
    data = _load(body, "image config")
    what = "image config"
    os_name = _str(data, "os", what, required=False)
    arch = _str(data, "architecture", what, required=False)
    if (os_name and os_name != PLATFORM[0]) or (arch and arch != PLATFORM[1]):
        raise BadRequest(f"image is for {os_name or '?'}/{arch or '?'}, not {PLATFORM[0]}/{PLATFORM[1]}",
                         hint="banger runs x86_64 Linux guests only")
    inner = data.get("config")
    inner = {} if inner is None else inner
    if not isinstance(inner, dict):
        raise BadRequest("image config: 'config' is not a JSON object")
    rootfs = data.get("rootfs")
    diff_ids: tuple[str, ...] = ()
    if isinstance(rootfs, dict) and rootfs.get("diff_ids") is not None:
        diff_ids = _str_list(rootfs, "diff_ids", "image config rootfs")
        if len(diff_ids) != layer_count:
            raise BadRequest(f"image config lists {len(diff_ids)} layer diff_ids but the manifest has "
                             f"{layer_count} layers")
    return ImageConfig(
        os=os_name, architecture=arch,
        env=_str_list(inner, "Env", what), entrypoint=_str_list(inner, "Entrypoint", what),
        cmd=_str_list(inner, "Cmd", what), working_dir=_str(inner, "WorkingDir", what, required=False),
        user=_str(inner, "User", what, required=False), diff_ids=diff_ids,
    )
