from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from banger.errors import BangerError
from banger.update import release, verify
from banger.update.release_key import RELEASE_PUBLIC_KEY_PEM

HEX = "0123456789abcdef" * 4


def keypair() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return priv, pub


def test_signature_round_trip_and_tampering() -> None:
    priv, pub = keypair()
    key = verify.load_public_key(pub)
    data = release.sums_text({"banger-0.2.0-linux-amd64.tar.gz": HEX})
    sig = release.sign(data, priv)
    verify.verify_signature(data, sig, key)
    verify.verify_signature(data, b"  " + sig.strip() + b"\n\n", key)  # whitespace around base64 is fine
    with pytest.raises(BangerError, match="does not verify with banger's release key"):
        verify.verify_signature(data.replace(b"0123", b"0124", 1), sig, key)
    other_priv, _ = keypair()
    with pytest.raises(BangerError, match="does not verify"):
        verify.verify_signature(data, release.sign(data, other_priv), key)
    with pytest.raises(BangerError, match="not base64"):
        verify.verify_signature(data, b"not*base64!", key)
    with pytest.raises(BangerError, match="does not verify"):
        verify.verify_signature(data, base64.b64encode(b"\x30\x00"), key)
    with pytest.raises(BangerError, match="over the cap"):
        verify.verify_signature(data, b"A" * (verify.MAX_SIG_BYTES + 1), key)


def test_compiled_in_key_is_a_real_p256_key() -> None:
    key = verify.compiled_in_key()
    assert key.curve.name == "secp256r1"
    assert RELEASE_PUBLIC_KEY_PEM.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert b"PRIVATE" not in RELEASE_PUBLIC_KEY_PEM


def test_key_loading_refuses_other_curves_and_garbage(tmp_path: Path) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(BangerError, match="not an ECDSA P-256 public key"):
        verify.load_public_key(p384)
    with pytest.raises(BangerError, match="not a PEM public key"):
        verify.load_public_key(b"hello")
    with pytest.raises(BangerError, match="cannot read public key"):
        verify.key_from_file(tmp_path / "missing.pub")


def test_sha256sums_gnu_and_bsd_forms() -> None:
    text = (f"{HEX}  banger-0.2.0-linux-amd64.tar.gz\n"
            f"{HEX} *binary-mode.bin\n"
            f"SHA256 (bsd style.txt) = {HEX}\n").encode()
    assert verify.parse_sha256sums(text) == {
        "banger-0.2.0-linux-amd64.tar.gz": HEX, "binary-mode.bin": HEX, "bsd style.txt": HEX}
    assert verify.parse_sha256sums(f"{HEX}  no-final-newline".encode()) == {"no-final-newline": HEX}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"{HEX.upper()}  a\n", "malformed"),
        (f"{HEX} a\n", "malformed"),  # one space: neither text nor binary marker
        (f"{HEX[:-1]}  a\n", "malformed"),
        (f"{HEX}  a\n\n", "malformed"),  # blank line
        (f"{HEX}  a\n# comment\n", "malformed"),
        (f"MD5 (a) = {HEX}\n", "malformed"),
        (f"{HEX}  dir/a\n", "bad file name"),
        (f"{HEX}  ..\n", "bad file name"),
        (f"{HEX}  a\n{HEX}  a\n", "twice"),
        ("", "empty"),
        ("\n", "malformed"),
    ],
)
def test_sha256sums_malformed(text: str, message: str) -> None:
    with pytest.raises(BangerError, match=message):
        verify.parse_sha256sums(text.encode())


def test_sha256sums_caps_and_encoding() -> None:
    with pytest.raises(BangerError, match="over the cap"):
        verify.parse_sha256sums(b"x" * (verify.MAX_SUMS_BYTES + 1))
    with pytest.raises(BangerError, match="not UTF-8"):
        verify.parse_sha256sums(b"\xff\xfe")
