"""banger's own known_hosts: trust on first use, then exact pins.

The file is OpenSSH's format, so `ssh -o UserKnownHostsFile=<it> -o HostKeyAlias=<name>.vm` checks it
for us after the first contact. banger pins under the VM's `<name>.vm` alias rather than its IP: guest
IPs are reused, names are not (while the VM exists). The user's ~/.ssh/known_hosts is never touched.

The CLI and the daemon may both write the file, so every read-modify-write holds a process-wide
`threading.Lock` and an `fcntl.flock` on a lock file next to it; writes are atomic (temp file + rename).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import logging
import math
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from banger.errors import BangerError
from banger.system.run import run

log = logging.getLogger("banger.guest.knownhosts")

_LOCK = threading.Lock()
_MARKERS = ("@cert-authority", "@revoked")


class HostKeyMismatch(BangerError):
    """The guest offered a host key other than the one pinned for its alias."""


def vm_name_of(alias: str) -> str:
    """`web.vm` -> `web`: the name `banger vm ...` commands take."""
    return alias[: -len(".vm")] if alias.endswith(".vm") else alias


def _key_blob(key: str) -> tuple[str, bytes]:
    """Split `<keytype> <base64> [comment]` and check that the blob is well-formed and says its own type."""
    parts = key.split()
    if len(parts) < 2:
        raise BangerError(f"host key {key!r} is not `<keytype> <base64>`")
    keytype, b64 = parts[0], parts[1]
    try:
        blob = base64.b64decode(b64, validate=True)
    except binascii.Error:
        raise BangerError(f"host key {key[:60]!r} has invalid base64") from None
    # An OpenSSH public key blob starts with the key type as a length-prefixed string.
    if len(blob) < 4:
        raise BangerError(f"host key {key[:60]!r} is truncated")
    (n,) = struct.unpack(">I", blob[:4])
    if blob[4 : 4 + n] != keytype.encode():
        raise BangerError(f"host key {key[:60]!r} does not match its key type {keytype!r}")
    return keytype, blob


def normalise_key(key: str) -> str:
    """`<keytype> <base64>`, dropping any comment; raises BangerError on a malformed key."""
    keytype, blob = _key_blob(key)
    return f"{keytype} {base64.b64encode(blob).decode()}"


def fingerprint(key: str) -> str:
    """OpenSSH's `SHA256:...` fingerprint of `<keytype> <base64>` (unpadded base64 of the blob's sha256)."""
    _, blob = _key_blob(key)
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@contextlib.contextmanager
def _locked(known_hosts: Path) -> Iterator[None]:
    known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock_path = known_hosts.with_name(known_hosts.name + ".lock")
    with _LOCK:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock


def _read_lines(known_hosts: Path) -> list[str]:
    try:
        return known_hosts.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []


def _write_lines(known_hosts: Path, lines: list[str]) -> None:
    tmp = known_hosts.with_name(f".{known_hosts.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, known_hosts)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _split(line: str) -> tuple[str | None, list[str], list[str]] | None:
    """(marker, host patterns, rest) of an entry line; None for comments and blank lines."""
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        return None
    marker = None
    if fields[0] in _MARKERS:
        marker, fields = fields[0], fields[1:]
    if len(fields) < 3:
        return None
    return marker, fields[0].split(","), fields[1:]


def _host_forms(alias: str) -> set[str]:
    # OpenSSH writes non-default ports as `[host]:port`; `[host]:22` is the same host as `host`.
    return {alias, f"[{alias}]:22"}


def _keys_in(lines: list[str], alias: str) -> list[str]:
    forms = _host_forms(alias)
    keys: list[str] = []
    for line in lines:
        parsed = _split(line)
        if parsed is None or parsed[0] is not None:
            continue
        _, hosts, rest = parsed
        if forms.intersection(hosts):
            try:
                keys.append(normalise_key(" ".join(rest)))
            except BangerError:
                log.warning("ignoring malformed known_hosts entry for %s", alias)
    return keys


def lookup(known_hosts: Path, alias: str) -> list[str]:
    """The keys pinned for `alias`, as `<keytype> <base64>` strings (empty if none)."""
    return _keys_in(_read_lines(known_hosts), alias)


def scan_host_key(ip: str, port: int = 22, timeout: float = 5) -> list[str]:
    """The guest's ed25519 host key(s) as `<keytype> <base64>`, read with `ssh-keyscan`.

    Raises BangerError when nothing answered within `timeout`.
    """
    seconds = max(1, math.ceil(timeout))
    argv = ["ssh-keyscan", "-T", str(seconds), "-t", "ed25519", "-p", str(port), ip]
    # ssh-keyscan exits 0 even when the host did not answer; an empty stdout is the failure signal.
    proc = run(argv, check=False, timeout=seconds + 5)
    keys: list[str] = []
    for line in proc.stdout.decode("utf-8", "replace").splitlines():
        fields = line.split()
        if len(fields) < 3 or fields[0].startswith("#"):
            continue
        keys.append(normalise_key(" ".join(fields[1:])))
    if not keys:
        raise BangerError(f"no ed25519 host key from {ip}:{port} within {seconds}s (ssh-keyscan)")
    return keys


def _is_match(pinned: list[str], offered: list[str]) -> bool:
    """OpenSSH's rule: an offered key matches if pinned; a key of a pinned type that differs is a change."""
    pinned_set = set(pinned)
    pinned_types = {k.split()[0] for k in pinned}
    if not pinned_set.intersection(offered):
        return False
    return all(k in pinned_set for k in offered if k.split()[0] in pinned_types)


def pin(known_hosts: Path, alias: str, keys: Iterable[str], *, vm_name: str | None = None) -> bool:
    """Pin `keys` for `alias` on first contact (True); afterwards they must match the pin (False).

    Raises HostKeyMismatch when they do not.
    """
    offered = [normalise_key(k) for k in keys]
    if not offered:
        raise BangerError(f"no host key to pin for {alias}")
    if any(c.isspace() or c in ",#" for c in alias) or not alias:
        raise BangerError(f"host alias {alias!r} is not usable in known_hosts", hint="use `<vm name>.vm`")
    with _locked(known_hosts):
        lines = _read_lines(known_hosts)
        pinned = _keys_in(lines, alias)
        if not pinned:
            lines.extend(f"{alias} {k}" for k in dict.fromkeys(offered))
            _write_lines(known_hosts, lines)
            log.info("pinned host key %s for %s", fingerprint(offered[0]), alias)
            return True
    if _is_match(pinned, offered):
        return False
    name = vm_name or vm_name_of(alias)
    raise HostKeyMismatch(
        f"host key for {alias} changed: pinned {', '.join(fingerprint(k) for k in pinned)}, "
        f"offered {', '.join(fingerprint(k) for k in offered)}; possible MITM",
        hint=f"if the VM was recreated, run `banger vm delete {name}` (which drops its pins)",
    )


def remove(known_hosts: Path, aliases: Iterable[str]) -> int:
    """Drop the entries for `aliases` (a VM's `<name>.vm` and its IP); returns how many hosts were dropped.

    Other entries, comments and blank lines are kept as they are.
    """
    forms: set[str] = set()
    for alias in aliases:
        forms |= _host_forms(alias)
    if not forms:
        return 0
    with _locked(known_hosts):
        lines = _read_lines(known_hosts)
        kept: list[str] = []
        dropped = 0
        for line in lines:
            parsed = _split(line)
            if parsed is None:
                kept.append(line)
                continue
            marker, hosts, rest = parsed
            remaining = [h for h in hosts if h not in forms]
            if len(remaining) == len(hosts):
                kept.append(line)
                continue
            dropped += len(hosts) - len(remaining)
            if remaining:
                kept.append(" ".join([*([marker] if marker else []), ",".join(remaining), *rest]))
        if dropped:
            _write_lines(known_hosts, kept)
        return dropped
