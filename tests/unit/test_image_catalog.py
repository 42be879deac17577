"""The embedded image catalog: what ships, and the strict loader's exact one-line errors."""

from __future__ import annotations

import copy
import json
from importlib import resources
from typing import Any

import pytest

from banger.errors import BangerError, NotFound
from banger.images import golden
from banger.images.catalog import BundleImage, GoldenImage, load_catalog, parse_catalog
from banger.kernels import catalog as kernel_catalog

KERNELS = {"debian-12-cloud", "debian-13-cloud"}
SHA = "ab" * 32
GOLD: dict[str, Any] = {
    "kind": "golden", "name": "gold", "suite": "bookworm", "variant": "base", "kernel_ref": "debian-12-cloud",
}
BUNDLE: dict[str, Any] = {
    "kind": "bundle", "name": "bun", "url": "https://images.example.org/bun-amd64-abababab.tar.zst",
    "sha256": SHA, "size": 123456, "kernel_ref": "debian-12-cloud",
}


def doc(*entries: Any) -> dict[str, Any]:
    return {"version": 1, "entries": list(entries)}


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    entry = copy.deepcopy(base)
    for key, value in changes.items():
        if value is None:
            entry.pop(key, None)
        else:
            entry[key] = value
    return entry


def test_embedded_catalog_ships_the_golden_images() -> None:
    cat = load_catalog()
    assert cat.names() == ["debian-bookworm", "debian-bookworm-full"]
    base, full = cat.get("debian-bookworm"), cat.get("debian-bookworm-full")
    assert isinstance(base, GoldenImage) and isinstance(full, GoldenImage)
    assert (base.suite, base.variant, base.kernel_ref, base.arch) == ("bookworm", "base", "debian-12-cloud", "amd64")
    assert (full.suite, full.variant, full.kernel_ref) == ("bookworm", "full", "debian-12-cloud")
    assert base.description and full.description
    # Every kernel_ref is pullable from the kernel catalog.
    kernels = {e.name for e in kernel_catalog.load_catalog()}
    assert {e.kernel_ref for e in cat} <= kernels


def test_to_json_round_trips_and_matches_the_file() -> None:
    cat = load_catalog()
    text = resources.files("banger.images").joinpath("catalog.json").read_text()
    assert cat.to_json() == json.loads(text)
    assert parse_catalog(cat.to_json(), KERNELS) == cat
    assert [e.to_json()["kind"] for e in cat] == ["golden", "golden"]
    assert next(iter(cat.get("debian-bookworm").to_json())) == "kind"


def test_catalog_variants_are_the_builders() -> None:
    assert set(golden.VARIANTS) == {"base", "full"}
    full = golden.GoldenVariant("x", "bookworm", "full", "debian-12-cloud")
    base = golden.GoldenVariant("x", "bookworm", "base", "debian-12-cloud")
    assert set(full.packages) - set(base.packages) == {"docker.io", "build-essential", "tmux"}
    assert {"openssh-server", "systemd-sysv", "python3", "sudo", "iproute2"} <= set(base.packages)
    assert list(base.packages) == sorted(base.packages)


def test_a_valid_bundle_parses() -> None:
    cat = parse_catalog(doc(GOLD, BUNDLE), KERNELS)
    assert cat.get("bun") == BundleImage(name="bun", url=BUNDLE["url"], sha256=SHA, size=123456,
                                         kernel_ref="debian-12-cloud")
    assert len(cat) == 2


def test_get_unknown_name() -> None:
    with pytest.raises(NotFound) as exc:
        load_catalog().get("debian-sid")
    assert exc.value.message == (
        "no image named 'debian-sid' in the catalog (available: debian-bookworm, debian-bookworm-full)"
    )


BUNDLE_FIELDS = "arch, description, distro, kernel_ref, kind, name, sha256, size, url"

BAD: list[tuple[Any, str]] = [
    ([], "image catalog must be an object with exactly 'version' and 'entries'"),
    ({"version": 1, "entries": [], "extra": 1}, "image catalog must be an object with exactly 'version' and 'entries'"),
    ({"version": 2, "entries": []}, "image catalog version 2 is not supported (expected 1)"),
    ({"version": True, "entries": []}, "image catalog version True is not supported (expected 1)"),
    ({"version": 1, "entries": {}}, "image catalog 'entries' must be a list"),
    (doc("debian"), "image catalog entry 0 must be an object, not str"),
    (doc(with_(GOLD, name=None)), "image catalog entry 0: name must be a string"),
    (doc(GOLD, with_(GOLD, name="../etc")),
     "image catalog entry 1 ('../etc'): image name '../etc' is invalid (allowed: letters, digits, '.', '-', '_'; "
     "must start with a letter or digit; at most 128 characters)"),
    (doc(with_(GOLD, kind="oci")), "image catalog entry 0 ('gold'): unknown kind 'oci' (allowed: golden, bundle)"),
    (doc(with_(GOLD, kind=None)), "image catalog entry 0 ('gold'): unknown kind None (allowed: golden, bundle)"),
    (doc(with_(BUNDLE, sha512="00")),
     f"image catalog entry 0 ('bun'): unknown field 'sha512' for kind 'bundle' (allowed: {BUNDLE_FIELDS})"),
    (doc(with_(GOLD, url="https://x.org/a")),
     "image catalog entry 0 ('gold'): unknown field 'url' for kind 'golden' "
     "(allowed: arch, description, kernel_ref, kind, name, suite, variant)"),
    (doc(with_(BUNDLE, sha256=None)), "image catalog entry 0 ('bun'): missing field 'sha256'"),
    (doc(with_(GOLD, kernel_ref=None)), "image catalog entry 0 ('gold'): missing field 'kernel_ref'"),
    (doc(with_(BUNDLE, sha256="ab" * 31)), "image catalog entry 0 ('bun'): sha256 must be 64 hex digits, got 62 characters"),
    (doc(with_(BUNDLE, sha256="AB" * 32)), f"image catalog entry 0 ('bun'): sha256 {'AB' * 32!r} must be lowercase hex"),
    (doc(with_(BUNDLE, sha256="zz" * 32)), f"image catalog entry 0 ('bun'): sha256 {'zz' * 32!r} must be lowercase hex"),
    (doc(with_(BUNDLE, sha256=7)), "image catalog entry 0 ('bun'): sha256 must be a string, not int"),
    (doc(with_(BUNDLE, url="http://images.example.org/x.tar.zst")),
     "image catalog entry 0 ('bun'): url 'http://images.example.org/x.tar.zst' must be an https:// URL with a "
     "host (got scheme 'http')"),
    (doc(with_(BUNDLE, url="https:///x.tar.zst")),
     "image catalog entry 0 ('bun'): url 'https:///x.tar.zst' must be an https:// URL with a host "
     "(got scheme 'https')"),
    (doc(with_(BUNDLE, url="images.example.org/x")),
     "image catalog entry 0 ('bun'): url 'images.example.org/x' must be an https:// URL with a host "
     "(got scheme 'none')"),
    (doc(with_(BUNDLE, url="https://u:p@images.example.org/x")),
     "image catalog entry 0 ('bun'): url 'https://u:p@images.example.org/x' must not carry credentials, "
     "a query or a fragment"),
    (doc(with_(BUNDLE, url="https://images.example.org/x?v=1")),
     "image catalog entry 0 ('bun'): url 'https://images.example.org/x?v=1' must not carry credentials, "
     "a query or a fragment"),
    (doc(with_(BUNDLE, size=0)), "image catalog entry 0 ('bun'): size must be a positive integer, not 0"),
    (doc(with_(BUNDLE, size=True)), "image catalog entry 0 ('bun'): size must be a positive integer, not True"),
    (doc(with_(BUNDLE, size="1")), "image catalog entry 0 ('bun'): size must be a positive integer, not '1'"),
    (doc(with_(GOLD, variant="huge")),
     "image catalog entry 0 ('gold'): variant 'huge' is not known (allowed: base, full)"),
    (doc(with_(GOLD, suite="Bookworm")),
     "image catalog entry 0 ('gold'): suite 'Bookworm' is invalid (lowercase letters, digits and '-')"),
    (doc(with_(GOLD, arch="arm64")), "image catalog entry 0 ('gold'): arch 'arm64' is not supported (allowed: amd64)"),
    (doc(with_(BUNDLE, distro="alpine")),
     "image catalog entry 0 ('bun'): distro 'alpine' is not supported (allowed: debian)"),
    (doc(with_(GOLD, kernel_ref="generic-6.12")),
     "image catalog entry 0 ('gold'): kernel_ref 'generic-6.12' is not in the kernel catalog "
     "(known: debian-12-cloud, debian-13-cloud)"),
    (doc(with_(GOLD, kernel_ref="../k")),
     "image catalog entry 0 ('gold'): kernel_ref: kernel name '../k' is invalid (allowed: letters, digits, '.', "
     "'-', '_'; must start with a letter or digit; at most 128 characters)"),
    (doc(with_(GOLD, description=["x"])), "image catalog entry 0 ('gold'): description must be a string, not list"),
    (doc(GOLD, BUNDLE, with_(BUNDLE, url="https://images.example.org/other")),
     "image catalog entry 2: duplicate name 'bun'"),
]


@pytest.mark.parametrize(("data", "message"), BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_catalogs_fail_with_one_line(data: Any, message: str) -> None:
    with pytest.raises(BangerError) as exc:
        parse_catalog(data, KERNELS)
    assert exc.value.message == message
    assert "\n" not in str(exc.value)


def test_kernel_refs_unchecked_without_kernel_names() -> None:
    cat = parse_catalog(doc(with_(GOLD, kernel_ref="my-own-kernel")))
    assert cat.get("gold").kernel_ref == "my-own-kernel"

