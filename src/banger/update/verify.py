"""Checking a release: the ECDSA P-256 signature over `SHA256SUMS`, and `SHA256SUMS` itself.

`SHA256SUMS.sig` is the base64 encoding of an ASN.1 DER ECDSA signature (SHA-256 digest, curve P-256)
over the exact bytes of `SHA256SUMS`; the public key is compiled in (release_key.py). `SHA256SUMS` lines
are GNU (`<hex>  <file>`, or `<hex> *<file>`) or BSD (`SHA256 (<file>) = <hex>`) style, lowercase hex;
anything else is refused rather than skipped, so a tampered file cannot hide an entry.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from typing import TYPE_CHECKING, Final

from banger.errors import BangerError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey

MAX_SUMS_BYTES: Final = 16 << 10
MAX_SIG_BYTES: Final = 4 << 10

_GNU = re.compile(r"([0-9a-f]{64}) ([ *])(.+)")
_BSD = re.compile(r"SHA256 \((.+)\) = ([0-9a-f]{64})")


def load_public_key(pem: bytes, source: str = "the release key") -> EllipticCurvePublicKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise BangerError(f"{source} is not a PEM public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise BangerError(f"{source} is not an ECDSA P-256 public key")
    return key


def compiled_in_key() -> EllipticCurvePublicKey:
    from banger.update.release_key import RELEASE_PUBLIC_KEY_PEM

    return load_public_key(RELEASE_PUBLIC_KEY_PEM, "the compiled-in release key")


def key_from_file(path: Path) -> EllipticCurvePublicKey:
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise BangerError(f"cannot read public key {path}: {exc.strerror or exc}") from None
    return load_public_key(pem, str(path))


def verify_signature(data: bytes, sig_text: bytes, key: EllipticCurvePublicKey) -> None:
    """Raise unless `sig_text` (base64 DER) is a valid signature of `data` by `key`."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    if len(sig_text) > MAX_SIG_BYTES:
        raise BangerError(f"SHA256SUMS.sig is {len(sig_text)} bytes, over the cap of {MAX_SIG_BYTES}")
    try:
        der = base64.b64decode(b"".join(sig_text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BangerError("SHA256SUMS.sig is not base64") from None
    try:
        key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise BangerError(
            "SHA256SUMS signature does not verify with banger's release key; refusing this release",
            hint="the release or its download was tampered with, or it was not signed by banger's maintainers",
        ) from None


def _check_name(name: str, lineno: int) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name or name != name.strip():
        raise BangerError(f"SHA256SUMS line {lineno}: bad file name {name!r}")
    return name


def parse_sha256sums(data: bytes) -> dict[str, str]:
    """{file name: lowercase hex digest}. Malformed lines, duplicates and empty files are refused."""
    if len(data) > MAX_SUMS_BYTES:
        raise BangerError(f"SHA256SUMS is {len(data)} bytes, over the cap of {MAX_SUMS_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BangerError("SHA256SUMS is not UTF-8 text") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    sums: dict[str, str] = {}
    for lineno, line in enumerate(lines, 1):
        if (m := _GNU.fullmatch(line)) is not None:
            digest, name = m[1], m[3]
        elif (m := _BSD.fullmatch(line)) is not None:
            name, digest = m[1], m[2]
        else:
            raise BangerError(f"SHA256SUMS line {lineno} is malformed: {line[:80]!r}")
        name = _check_name(name, lineno)
        if name in sums:
            raise BangerError(f"SHA256SUMS lists {name!r} twice")
        sums[name] = digest
    if not sums:
        raise BangerError("SHA256SUMS is empty")
    return sums
