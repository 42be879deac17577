"""banger's known_hosts: TOFU pins, mismatch detection, removal, and the lock between processes."""

from __future__ import annotations

import base64
import multiprocessing
import multiprocessing.synchronize
import os
import re
import struct
import subprocess
from pathlib import Path

import pytest

from banger.errors import BangerError
from banger.guest import knownhosts
from banger.guest.knownhosts import HostKeyMismatch


def make_key(seed: int, keytype: str = "ssh-ed25519") -> str:
    """A well-formed public key line (`<type> <base64>`); the key material is arbitrary bytes."""

    def sshstr(b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + b

    material = bytes([seed % 256]) * 32
    blob = sshstr(keytype.encode()) + sshstr(material)
    return f"{keytype} {base64.b64encode(blob).decode()}"


def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    pub = (tmp_path / "k.pub").read_text().strip()
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", tmp_path / "k.pub"],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    expected = out.split()[1]
    assert expected.startswith("SHA256:")
    assert knownhosts.fingerprint(pub) == expected
    assert not knownhosts.fingerprint(pub).endswith("=")


@pytest.mark.parametrize(
    "bad",
    ["ssh-ed25519", "ssh-ed25519 !!notbase64!!", "ssh-rsa " + make_key(1).split()[1], "ssh-ed25519 AAAA"],
)
def test_malformed_keys_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(BangerError):
        knownhosts.pin(tmp_path / "known_hosts", "web.vm", [bad])
    assert not (tmp_path / "known_hosts").exists()


def test_first_pin_writes_plain_alias_lines_0600(tmp_path: Path) -> None:
    kh = tmp_path / "ssh" / "known_hosts"
    assert knownhosts.pin(kh, "web.vm", [make_key(1) + " comment"]) is True
    assert kh.read_text() == f"web.vm {make_key(1)}\n"
    assert (kh.stat().st_mode & 0o777) == 0o600
    assert knownhosts.lookup(kh, "web.vm") == [make_key(1)]
    assert knownhosts.lookup(kh, "other.vm") == []
    # Same key again: accepted, nothing rewritten.
    before = kh.stat().st_mtime_ns
    assert knownhosts.pin(kh, "web.vm", [make_key(1)]) is False
    assert kh.stat().st_mtime_ns == before


def test_changed_key_is_a_possible_mitm(tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    knownhosts.pin(kh, "web.vm", [make_key(1)])
    with pytest.raises(HostKeyMismatch) as info:
        knownhosts.pin(kh, "web.vm", [make_key(2)])
    err = info.value
    assert "possible MITM" in err.message
    assert "web.vm" in err.message
    assert knownhosts.fingerprint(make_key(1)) in err.message
    assert knownhosts.fingerprint(make_key(2)) in err.message
    assert err.hint == "if the VM was recreated, run `banger vm delete web` (which drops its pins)"
    assert "\n" not in str(err)
    # The pin is unchanged: a mismatch never overwrites.
    assert knownhosts.lookup(kh, "web.vm") == [make_key(1)]


def test_mismatch_hint_uses_given_vm_name(tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    knownhosts.pin(kh, "10.0.0.5", [make_key(1)])
    with pytest.raises(HostKeyMismatch, match="possible MITM") as info:
        knownhosts.pin(kh, "10.0.0.5", [make_key(2)], vm_name="db")
    assert info.value.hint is not None and "`banger vm delete db`" in info.value.hint


def test_offered_key_of_another_type_is_not_silently_added(tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    knownhosts.pin(kh, "web.vm", [make_key(1)])
    with pytest.raises(HostKeyMismatch):
        knownhosts.pin(kh, "web.vm", [make_key(1, "ssh-rsa")])
    # A pinned key plus one of an unpinned type is fine (OpenSSH accepts any pinned key).
    assert knownhosts.pin(kh, "web.vm", [make_key(1), make_key(3, "ssh-rsa")]) is False
    assert knownhosts.lookup(kh, "web.vm") == [make_key(1)]


def test_remove_drops_only_the_given_aliases_and_keeps_the_rest(tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text(
        "# a comment the user wrote\n"
        "\n"
        f"web.vm {make_key(1)}\n"
        f"10.0.0.5,db.vm {make_key(2)}\n"
        f"[10.0.0.5]:22 {make_key(2)}\n"
        f"@cert-authority web.vm,*.example {make_key(4)}\n"
        f"other.vm {make_key(3)}\n"
    )
    assert knownhosts.remove(kh, ["web.vm", "10.0.0.5"]) == 4
    assert kh.read_text() == (
        "# a comment the user wrote\n"
        "\n"
        f"db.vm {make_key(2)}\n"
        f"@cert-authority *.example {make_key(4)}\n"
        f"other.vm {make_key(3)}\n"
    )
    assert (kh.stat().st_mode & 0o777) == 0o600
    assert knownhosts.remove(kh, ["web.vm"]) == 0
    assert knownhosts.remove(tmp_path / "missing", ["web.vm"]) == 0
    assert not (tmp_path / "missing").exists()


def test_remove_then_repin_accepts_a_new_key(tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    knownhosts.pin(kh, "web.vm", [make_key(1)])
    knownhosts.pin(kh, "db.vm", [make_key(2)])
    knownhosts.remove(kh, ["web.vm"])
    assert knownhosts.pin(kh, "web.vm", [make_key(5)]) is True
    assert knownhosts.lookup(kh, "web.vm") == [make_key(5)]
    assert knownhosts.lookup(kh, "db.vm") == [make_key(2)]


def test_pin_preserves_foreign_lines(tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text(f"# keep me\n|1|c2FsdA==|aGFzaA== {make_key(9)}\n")
    knownhosts.pin(kh, "web.vm", [make_key(1)])
    assert kh.read_text() == f"# keep me\n|1|c2FsdA==|aGFzaA== {make_key(9)}\nweb.vm {make_key(1)}\n"


@pytest.mark.parametrize("alias", ["", "a b", "a,b", "#x"])
def test_unusable_alias_is_refused(tmp_path: Path, alias: str) -> None:
    with pytest.raises(BangerError, match="not usable"):
        knownhosts.pin(tmp_path / "known_hosts", alias, [make_key(1)])


def _race(
    kh: str, seed: int, barrier: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue[str]
) -> None:
    barrier.wait()
    try:
        first = knownhosts.pin(Path(kh), "web.vm", [make_key(seed)])
        out.put(f"{seed}:{'pinned' if first else 'matched'}")
    except HostKeyMismatch:
        out.put(f"{seed}:mismatch")


def test_concurrent_first_contact_from_processes_pins_exactly_once(tmp_path: Path) -> None:
    """Without the file lock, two writers would both see "no pin" and one pin would be lost."""
    kh = tmp_path / "known_hosts"
    ctx = multiprocessing.get_context("fork")
    n = 8
    barrier = ctx.Barrier(n)
    out: multiprocessing.Queue[str] = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(kh), seed, barrier, out)) for seed in range(1, n + 1)]
    for p in procs:
        p.start()
    results = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    pinned = [r for r in results if r.endswith(":pinned")]
    assert len(pinned) == 1, results
    assert sum(r.endswith(":mismatch") for r in results) == n - 1
    winner = int(pinned[0].split(":")[0])
    assert kh.read_text() == f"web.vm {make_key(winner)}\n"
    assert not [f for f in os.listdir(tmp_path) if re.search(r"\.tmp$", f)]
