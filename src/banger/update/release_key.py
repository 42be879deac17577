"""banger's release public key (ECDSA P-256). `SHA256SUMS.sig` of every release must verify with it.

The private half is kept off the repository by the release maintainer; `scripts/make-release --key`
takes it. Tests sign with their own key and pass its public half with `banger update --pubkey-file`.
"""

from __future__ import annotations

from typing import Final

RELEASE_PUBLIC_KEY_PEM: Final = b"""\
-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEivgXVI5XP8bkyHFWBwD+bjtS1WyK
tBLm4mB+tCI9SMCkqGesBCc0TyvUsQbPai90DliK58/aDR5Syefc3XgmnA==
-----END PUBLIC KEY-----
"""
