"""Manifests, indexes, configs, auth challenges and Docker credentials, parsed strictly."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from banger.errors import BadRequest, NotFound
from banger.images.oci import firstboot
from banger.images.oci.manifest import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Index,
    Manifest,
    effective_media_type,
    parse,
    parse_config,
    select_platform,
)
from banger.images.oci.registry import Credentials, load_docker_credentials, parse_challenge

D = ["sha256:" + c * 64 for c in "0123456789abcdef"]
GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
CAP = 1 << 30


def doc(**fields: Any) -> bytes:
    return json.dumps({"schemaVersion": 2, **fields}).encode()


def desc(digest: str, size: int = 10, media_type: str = GZ, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": size, **extra}


def image_manifest(**override: Any) -> bytes:
    fields: dict[str, Any] = {
        "mediaType": OCI_MANIFEST,
        "config": desc(D[1], 100, "application/vnd.oci.image.config.v1+json"),
        "layers": [desc(D[2], 1000), desc(D[3], 20, "application/vnd.docker.image.rootfs.diff.tar.gzip")],
    }
    fields.update(override)
    return doc(**fields)


def plat(arch: str, os_name: str = "linux", variant: str = "") -> dict[str, str]:
    p = {"os": os_name, "architecture": arch}
    if variant:
        p["variant"] = variant
    return p


# ----------------------------------------------------------------------------------------- manifests


def test_manifest_parses() -> None:
    m = parse(image_manifest(), OCI_MANIFEST, CAP)
    assert isinstance(m, Manifest)
    assert m.config.digest == D[1] and m.config.size == 100
    assert [(x.digest, x.size) for x in m.layers] == [(D[2], 1000), (D[3], 20)]


def test_docker_manifest_and_list_parse() -> None:
    body = image_manifest(mediaType=DOCKER_MANIFEST,
                          config=desc(D[1], 5, "application/vnd.docker.container.image.v1+json"))
    assert isinstance(parse(body, DOCKER_MANIFEST, CAP), Manifest)
    lst = doc(mediaType=DOCKER_LIST, manifests=[desc(D[4], 500, DOCKER_MANIFEST, platform=plat("amd64"))])
    index = parse(lst, DOCKER_LIST, CAP)
    assert isinstance(index, Index)
    assert select_platform(index).digest == D[4]


@pytest.mark.parametrize(
    ("body", "header", "expected"),
    [
        (image_manifest(), None, OCI_MANIFEST),
        (image_manifest(), "application/vnd.oci.image.manifest.v1+json; charset=utf-8", OCI_MANIFEST),
        (doc(config=desc(D[1]), layers=[]), None, OCI_MANIFEST),  # no mediaType: the shape decides
        (doc(manifests=[]), "application/json", OCI_INDEX),
        (doc(manifests=[]), DOCKER_LIST, DOCKER_LIST),
        (json.dumps({"schemaVersion": 1, "fsLayers": []}).encode(), "application/json",
         "application/vnd.docker.distribution.manifest.v1+json"),
    ],
)
def test_effective_media_type(body: bytes, header: str | None, expected: str) -> None:
    assert effective_media_type(body, header) == expected


def test_media_type_conflict_is_refused() -> None:
    with pytest.raises(BadRequest) as info:
        effective_media_type(image_manifest(), OCI_INDEX)
    assert info.value.message == f"manifest says it is {OCI_MANIFEST} but the registry sent it as {OCI_INDEX}"


@pytest.mark.parametrize(
    ("body", "media_type", "message"),
    [
        (b"{not json", OCI_MANIFEST, "manifest is not valid JSON"),
        (b"[]", OCI_MANIFEST, "manifest is not a JSON object"),
        (json.dumps({"schemaVersion": 1}).encode(), "application/vnd.docker.distribution.manifest.v1+prettyjws",
         "the image uses Docker manifest schema 1, which is not supported"),
        (image_manifest(), "application/vnd.example+json", "unsupported manifest media type 'application/vnd"),
        (image_manifest(schemaVersion=3), OCI_MANIFEST, "manifest schemaVersion is 3, expected 2"),
        (image_manifest(layers=[]), OCI_MANIFEST, "image manifest has no layers"),
        (image_manifest(layers=None), OCI_MANIFEST, "image manifest has no 'layers' list"),
        (image_manifest(layers=[desc(D[2])] * 257), OCI_MANIFEST, "257 layers; at most 256 are allowed"),
        (image_manifest(layers=[desc("sha256:12")]), OCI_MANIFEST,
         "layer 1 digest 'sha256:12' is not a valid digest"),
        (image_manifest(layers=[desc("sha512:" + "a" * 128)]), OCI_MANIFEST,
         "uses the 'sha512' algorithm; only sha256 is supported"),
        (image_manifest(layers=[desc(D[2], -1)]), OCI_MANIFEST, "layer 1: size -1 is not a non-negative integer"),
        (image_manifest(layers=[desc(D[2], True)]), OCI_MANIFEST, "layer 1: size true is not a non-negative"),
        (image_manifest(layers=[desc(D[2], CAP + 1)]), OCI_MANIFEST,
         f"layer 1 sha256:222222222222… is {CAP + 1} bytes, over the cap of {CAP} bytes"),
        (image_manifest(layers=[desc(D[2], 5, "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip")]),
         OCI_MANIFEST, "layer 1 is a foreign (non-distributable) layer"),
        (image_manifest(layers=[desc(D[2], 5, "application/vnd.cncf.helm.chart.content.v1.tar+gzip")]),
         OCI_MANIFEST, "layer 1 has unsupported media type 'application/vnd.cncf.helm.chart.content.v1.tar+gzip'"),
        (image_manifest(config=desc(D[1], 5, "application/vnd.cncf.helm.config.v1+json")), OCI_MANIFEST,
         "not a container image config"),
        (image_manifest(config=desc(D[1], 9 << 20, "application/vnd.oci.image.config.v1+json")), OCI_MANIFEST,
         "over the cap of 8388608 bytes"),
        (image_manifest(config="x"), OCI_MANIFEST, "image config descriptor is not a JSON object"),
        (doc(mediaType=OCI_INDEX), OCI_INDEX, "image index has no 'manifests' list"),
        (doc(mediaType=OCI_INDEX, manifests=[desc(D[1])] * 1025), OCI_INDEX, "lists 1025 manifests"),
    ],
)
def test_bad_manifests(body: bytes, media_type: str, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse(body, media_type, CAP)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------- indexes


def index_of(*entries: dict[str, Any]) -> Index:
    parsed = parse(doc(mediaType=OCI_INDEX, manifests=list(entries)), OCI_INDEX, CAP)
    assert isinstance(parsed, Index)
    return parsed


def test_index_selects_linux_amd64() -> None:
    index = index_of(
        desc(D[1], 500, OCI_MANIFEST, platform=plat("arm64", variant="v8")),
        desc(D[2], 500, OCI_MANIFEST, platform=plat("amd64", "windows")),
        desc(D[3], 500, OCI_MANIFEST, platform=plat("amd64", variant="v3")),
        desc(D[4], 500, OCI_MANIFEST, platform=plat("amd64")),
        desc(D[5], 500, OCI_MANIFEST, platform=plat("unknown", "unknown")),
    )
    assert select_platform(index).digest == D[4]  # the plain variant over the v3 one


def test_index_variant_only() -> None:
    index = index_of(desc(D[3], 500, OCI_MANIFEST, platform=plat("amd64", variant="v2")))
    assert select_platform(index).digest == D[3]


def test_index_without_amd64_names_what_it_has() -> None:
    index = index_of(
        desc(D[1], 500, OCI_MANIFEST, platform=plat("arm64", variant="v8")),
        desc(D[2], 500, OCI_MANIFEST, platform=plat("arm", variant="v7")),
        desc(D[5], 500, OCI_MANIFEST, platform=plat("unknown", "unknown")),  # an attestation: not listed
        desc(D[6], 500, OCI_MANIFEST),
    )
    with pytest.raises(NotFound) as info:
        select_platform(index)
    assert info.value.message == "image has no linux/amd64 variant (it has: linux/arm/v7, linux/arm64/v8, unspecified)"


def test_index_entry_that_is_not_a_manifest() -> None:
    index = index_of(desc(D[1], 500, "application/vnd.example.sbom", platform=plat("amd64")))
    with pytest.raises(BadRequest, match=r"has media type 'application/vnd\.example\.sbom', not an image manifest"):
        select_platform(index)


# ------------------------------------------------------------------------------------------- configs


def config(**fields: Any) -> bytes:
    base: dict[str, Any] = {"os": "linux", "architecture": "amd64",
                            "config": {"Env": ["A=1"], "Entrypoint": ["/init"], "Cmd": ["-v"],
                                       "WorkingDir": "/srv", "User": "app"},
                            "rootfs": {"type": "layers", "diff_ids": [D[7], D[8]]}}
    base.update(fields)
    return json.dumps(base).encode()


def test_config_parses() -> None:
    c = parse_config(config(), 2)
    assert (c.env, c.entrypoint, c.cmd, c.working_dir, c.user) == (("A=1",), ("/init",), ("-v",), "/srv", "app")
    assert c.diff_ids == (D[7], D[8])
    assert c.to_json()["entrypoint"] == ["/init"]
    minimal = parse_config(b"{}", 3)  # everything optional
    assert minimal.env == () and minimal.os == ""


@pytest.mark.parametrize(
    ("body", "layers", "message"),
    [
        (config(architecture="arm64"), 2, "image is for linux/arm64, not linux/amd64"),
        (config(os="windows"), 2, "image is for windows/amd64, not linux/amd64"),
        (config(), 3, "image config lists 2 layer diff_ids but the manifest has 3 layers"),
        (config(config={"Env": "A=1"}), 2, "image config: 'Env' must be a list of strings"),
        (config(config=[]), 2, "image config: 'config' is not a JSON object"),
        (b"\xff", 2, "image config is not valid JSON"),
    ],
)
def test_bad_configs(body: bytes, layers: int, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_config(body, layers)
    assert message in str(info.value)


# -------------------------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    ("header", "scheme", "params"),
    [
        ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
         'scope="repository:library/alpine:pull"', "bearer",
         {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
          "scope": "repository:library/alpine:pull"}),
        ('Bearer realm="http://x/t",scope="repository:a:pull,push",error="insufficient_scope"', "bearer",
         {"realm": "http://x/t", "scope": "repository:a:pull,push", "error": "insufficient_scope"}),
        ('Basic realm="banger-test"', "basic", {"realm": "banger-test"}),
        ('bearer realm=unquoted, service = "s\\"q"', "bearer", {"realm": "unquoted", "service": 's"q'}),
        ("", "", {}),
    ],
)
def test_parse_challenge(header: str, scheme: str, params: dict[str, str]) -> None:
    assert parse_challenge(header) == (scheme, params)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_docker_credentials(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "auths": {
            "https://index.docker.io/v1/": {"auth": b64("hubuser:hub:pass")},  # the password may hold ':'
            "ghcr.io": {"username": "gh", "password": "token"},
            "http://127.0.0.1:5000/v2/": {"auth": b64("local:pw")},
            "quay.io": {"identitytoken": "opaque"},  # OAuth refresh tokens are not supported: skipped
            "broken": "not an object",
        },
        "credsStore": "desktop",
    }))
    assert load_docker_credentials(path) == {
        "docker.io": Credentials("hubuser", "hub:pass"),
        "ghcr.io": Credentials("gh", "token"),
        "127.0.0.1:5000": Credentials("local", "pw"),
    }
    assert Credentials("a", "b").basic() == "Basic " + b64("a:b")


def test_docker_credentials_missing_or_bad(tmp_path: Path) -> None:
    assert load_docker_credentials(tmp_path / "absent.json") == {}
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(BadRequest, match=r"bad.json is not valid JSON"):
        load_docker_credentials(bad)
    bad.write_text(json.dumps({"auths": {"ghcr.io": {"auth": "%%%"}}}))
    with pytest.raises(BadRequest, match=r"the 'auth' of 'ghcr.io' is not base64 of user:password"):
        load_docker_credentials(bad)
    bad.write_text(json.dumps({"auths": {"ghcr.io": {"auth": b64("nocolon")}}}))
    with pytest.raises(BadRequest, match=r"does not decode to user:password"):
        load_docker_credentials(bad)


# ------------------------------------------------------------------------------------- first boot


@pytest.mark.parametrize(
    ("os_release", "manager"),
    [
        ('ID=debian\nVERSION_ID="12"\n', "apt"),
        ("ID=ubuntu\nID_LIKE=debian\n", "apt"),
        ('ID=linuxmint\nID_LIKE="ubuntu debian"\n', "apt"),
        ("ID=alpine\n", "apk"),
        ('ID="fedora"\n', "dnf"),
        ('ID="rocky"\nID_LIKE="rhel centos fedora"\n', "dnf"),
        ("ID=arch\n", "pacman"),
        ('ID="opensuse-tumbleweed"\nID_LIKE="opensuse suse"\n', "zypper"),
        ('ID="opensuse-microos"\n', "zypper"),
        ('ID=sles\n', "zypper"),
        ("ID=mystery\nID_LIKE=\"other\"\n", None),
        ("", None),
    ],
)
def test_manager_for(os_release: str, manager: str | None) -> None:
    assert firstboot.manager_for(firstboot.parse_os_release(os_release)) == manager


def test_parse_os_release() -> None:
    text = 'NAME="Debian GNU/Linux"\nID=debian\n# comment\nPRETTY_NAME=\'x "y"\'\nBAD LINE\nHOME_URL="a\\$b"\n'
    assert firstboot.parse_os_release(text) == {"NAME": "Debian GNU/Linux", "ID": "debian",
                                                "PRETTY_NAME": 'x "y"', "HOME_URL": "a$b"}


def test_script_lists_every_manager() -> None:
    script = firstboot.script().decode()
    assert script.startswith("#!/bin/sh\n")
    for token, manager in firstboot.MANAGERS.items():
        assert f"{token}|" in script or f"|{token})" in script or f"{token})" in script, token
        assert f"{manager}:ssh)" in script
    assert "@" not in script.replace("$@", "").replace("@$", "")  # every placeholder filled
    files = {f.path: f for f in firstboot.guest_files()}
    assert files[firstboot.PATH].mode == 0o755
    assert files[firstboot.WANTS_PATH].target == firstboot.UNIT_PATH


def test_first_boot_script_syntax(tmp_path: Path) -> None:
    script = tmp_path / "first-boot"
    script.write_bytes(firstboot.script())
    for shell in (["/bin/dash", "-n"], ["/bin/busybox", "sh", "-n"], ["/bin/bash", "--posix", "-n"]):
        if Path(shell[0]).exists():
            proc = subprocess.run([*shell, str(script)], capture_output=True, text=True, check=False)
            assert proc.returncode == 0, (shell, proc.stderr)
