"""Image references: Docker's normalisation rules and one-line errors that quote the bad input."""

from __future__ import annotations

import pytest

from banger.errors import BadRequest
from banger.images.oci.reference import Reference, check_digest, default_image_name, parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "domain", "repository", "tag", "digest"),
    [
        ("alpine", "docker.io", "library/alpine", "latest", None),
        ("alpine:3.20", "docker.io", "library/alpine", "3.20", None),
        ("library/alpine:3.20", "docker.io", "library/alpine", "3.20", None),
        ("docker.io/alpine", "docker.io", "library/alpine", "latest", None),
        ("index.docker.io/library/alpine:edge", "docker.io", "library/alpine", "edge", None),
        ("registry-1.docker.io/bitnami/redis:7", "docker.io", "bitnami/redis", "7", None),
        ("bitnami/redis", "docker.io", "bitnami/redis", "latest", None),
        ("ghcr.io/org/team/image:v1.2.3", "ghcr.io", "org/team/image", "v1.2.3", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("localhost:5000/app:dev", "localhost:5000", "app", "dev", None),
        ("127.0.0.1:41234/test/busybox:v1", "127.0.0.1:41234", "test/busybox", "v1", None),
        ("[::1]:5000/app:x", "[::1]:5000", "app", "x", None),
        (f"alpine@{DIGEST}", "docker.io", "library/alpine", None, DIGEST),
        (f"quay.io/a/b:1.0@{DIGEST}", "quay.io", "a/b", "1.0", DIGEST),
        ("Registry.Example/a", "Registry.Example", "a", "latest", None),  # a domain may have capitals
        ("a.b/c__d/e-f/g.h_i:T_1.x-y", "a.b", "c__d/e-f/g.h_i", "T_1.x-y", None),
        ("a/b---c", "docker.io", "a/b---c", "latest", None),
    ],
)
def test_parse(text: str, domain: str, repository: str, tag: str | None, digest: str | None) -> None:
    ref = parse_reference(text)
    assert ref == Reference(domain, repository, tag, digest)


def test_derived_names() -> None:
    hub = parse_reference("alpine:3.20")
    assert hub.api_host == "registry-1.docker.io"
    assert hub.name == "docker.io/library/alpine"
    assert str(hub) == "docker.io/library/alpine:3.20"
    assert hub.manifest_ref == "3.20"
    local = parse_reference(f"127.0.0.1:5000/x/y:t@{DIGEST}")
    assert local.api_host == "127.0.0.1:5000"
    assert local.manifest_ref == DIGEST  # the digest wins over the tag
    assert str(local) == f"127.0.0.1:5000/x/y:t@{DIGEST}"
    assert parse_reference(str(local)) == local


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "image reference is empty"),
        ("docker://alpine", "image reference 'docker://alpine' has a URL scheme"),
        ("alp ine", "image reference 'alp ine' contains whitespace or control characters"),
        ("alpine\n", "image reference 'alpine\\n' contains whitespace or control characters"),
        ("Alpine", "image reference 'Alpine': repository name 'library/Alpine' must be lowercase"),
        ("ghcr.io/Org/x", "image reference 'ghcr.io/Org/x': repository name 'Org/x' must be lowercase"),
        ("alpine:", "image reference 'alpine:' has an invalid tag ''"),
        ("alpine:.hidden", "image reference 'alpine:.hidden' has an invalid tag '.hidden'"),
        ("alpine:" + "t" * 129, f"image reference 'alpine:{'t' * 129}' has an invalid tag"),
        ("a..b/c", "image reference 'a..b/c' has an invalid registry 'a..b'"),
        ("-bad.io/x", "image reference '-bad.io/x' has an invalid registry '-bad.io'"),
        ("ghcr.io/x//y", "image reference 'ghcr.io/x//y' has an invalid repository name 'x//y'"),
        ("ghcr.io/x/", "image reference 'ghcr.io/x/' has an invalid repository name 'x/'"),
        ("ghcr.io/-x", "image reference 'ghcr.io/-x' has an invalid repository name '-x'"),
        (":tag", "image reference ':tag' has no repository name"),
        ("alpine@sha256:abc", "image reference 'alpine@sha256:abc': digest 'sha256:abc' is not a valid digest"),
        ("alpine@sha256:" + "AB" * 32, "is not a valid digest (expected sha256: and 64 lowercase hex digits)"),
        ("alpine@sha512:" + "ab" * 64, "uses the 'sha512' algorithm; only sha256 is supported"),
        ("ghcr.io/" + "a" * 250, "is longer than 255 characters"),
    ],
)
def test_invalid(text: str, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_reference(text)
    assert message in str(info.value)
    assert "\n" not in info.value.message


def test_check_digest() -> None:
    assert check_digest(DIGEST) == DIGEST
    with pytest.raises(BadRequest, match="layer digest 'md5:x' uses the 'md5' algorithm; only sha256"):
        check_digest("md5:x", "layer digest")
    with pytest.raises(BadRequest, match="layer digest 'sha256' is not a valid digest"):
        check_digest("sha256", "layer digest")


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("alpine:3.20", "alpine-3.20"),
        ("ghcr.io/org/my_app:v1", "my_app-v1"),
        (f"quay.io/a/b@{DIGEST}", "b-" + "ab" * 6),
    ],
)
def test_default_image_name(text: str, name: str) -> None:
    from banger.model import validate_artifact_name

    assert default_image_name(parse_reference(text)) == name
    assert validate_artifact_name("image", name) == name
