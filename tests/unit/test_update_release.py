from __future__ import annotations

import json
from pathlib import Path

import pytest

from banger.errors import BangerError
from banger.update import apply, release, verify
from banger.update import manifest as m

SHA = "b" * 64


@pytest.mark.parametrize(
    ("version", "expected"),
    [("1.2.3", "1.2.3"), ("0.0.2-baddoctor", "0.0.2+baddoctor"), ("1.0.0-rc.1", "1.0.0+rc.1"),
     ("0.1.0.dev0", "0.1.0.dev0"), ("2.0.0-RC1", "2.0.0+rc1")],
)
def test_wheel_version(version: str, expected: str) -> None:
    assert release.wheel_version(version) == expected


def test_wheel_version_refuses_nonsense() -> None:
    with pytest.raises(BangerError, match="neither"):
        release.wheel_version("next-week")


def entry(version: str) -> m.ReleaseEntry:
    return m.ReleaseEntry(version, f"{version}/{m.tarball_name(version)}", SHA, 100)


def test_manifest_latest_follows_the_newest_stable(tmp_path: Path) -> None:
    assert release.add_to_manifest(tmp_path, entry("0.1.0"), None).latest_stable == "0.1.0"
    assert release.add_to_manifest(tmp_path, entry("0.2.0"), None).latest_stable == "0.2.0"
    # A pre-release or an older version does not move latest_stable unless asked to.
    assert release.add_to_manifest(tmp_path, entry("0.3.0-rc.1"), None).latest_stable == "0.2.0"
    assert release.add_to_manifest(tmp_path, entry("0.1.1"), None).latest_stable == "0.2.0"
    assert release.add_to_manifest(tmp_path, entry("0.1.1"), True).latest_stable == "0.1.1"
    final = m.parse((tmp_path / "manifest.json").read_bytes())
    assert list(final.versions) == ["0.1.0", "0.1.1", "0.2.0", "0.3.0-rc.1"]
    assert json.loads((tmp_path / "manifest.json").read_text())["schema_version"] == 1


def test_sums_text_is_what_the_parser_reads() -> None:
    text = release.sums_text({"b.tar.gz": SHA, "a.tar.gz": "c" * 64})
    assert text == f"{'c' * 64}  a.tar.gz\n{SHA}  b.tar.gz\n".encode()
    assert verify.parse_sha256sums(text) == {"a.tar.gz": "c" * 64, "b.tar.gz": SHA}


def test_signing_refuses_other_keys() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(BangerError, match="not an ECDSA P-256 private key"):
        release.sign(b"x", pem)


def test_in_flight_operations() -> None:
    ops = [{"id": "op-1", "kind": "vm.create", "target": "dev", "done": False, "stage": "boot"},
           {"id": "op-2", "kind": "kernel.pull", "target": "k", "done": True, "stage": "done"}]
    assert [op["id"] for op in apply.in_flight(ops)] == ["op-1"]
    assert apply.in_flight([]) == []
    with pytest.raises(BangerError, match="without a list"):
        apply.in_flight(None)
