"""What banger writes into a VM's disks before it boots, without mounting them.

The VM's writable layer (the overlay disk) gets its identity under `/upper`: hostname, /etc/hosts,
resolv.conf and the static network settings read by `banger-network`. The work disk (the guest's
/root) gets banger's SSH key, the owner's git identity and every `[[file_sync]]` entry.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from banger.images.inject import GuestFile

log = logging.getLogger("banger.identity")

UPPER = "/upper"  # overlayfs upperdir on the VM's writable disk; its /etc is the guest's /etc


@dataclass(frozen=True)
class NetworkIdentity:
    name: str
    ip: str
    prefix: int
    gateway: str
    dns: str
    mac: str


def overlay_files(net: NetworkIdentity) -> list[GuestFile]:
    hosts = (
        "127.0.0.1\tlocalhost\n"
        f"127.0.1.1\t{net.name}.vm {net.name}\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
    )
    env = (
        f"BANGER_IP={net.ip}/{net.prefix}\n"
        f"BANGER_GATEWAY={net.gateway}\n"
        f"BANGER_DNS={net.dns}\n"
        f"BANGER_MAC={net.mac}\n"
    )
    return [
        GuestFile(f"{UPPER}", None, 0o755, kind="dir"),
        GuestFile(f"{UPPER}/etc", None, 0o755, kind="dir"),
        GuestFile(f"{UPPER}/etc/banger", None, 0o755, kind="dir"),
        GuestFile(f"{UPPER}/etc/hostname", f"{net.name}\n".encode(), 0o644),
        GuestFile(f"{UPPER}/etc/hosts", hosts.encode(), 0o644),
        GuestFile(f"{UPPER}/etc/resolv.conf", f"nameserver {net.dns}\n".encode(), 0o644),
        GuestFile(f"{UPPER}/etc/banger/network.env", env.encode(), 0o644),
        GuestFile("/work", None, 0o755, kind="dir"),
    ]


@dataclass(frozen=True)
class SyncEntry:
    host: Path
    guest: str  # absolute guest path under /root
    mode: int | None


def work_files(authorized_key: str, git_identity: tuple[str, str] | None,
               sync: Sequence[SyncEntry]) -> list[GuestFile]:
    """Files for the work disk, whose root directory is the guest's /root."""
    files: dict[str, GuestFile] = {}

    def add(f: GuestFile) -> None:
        files[f.path] = f

    def add_dirs(path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/" + "/".join(parts[:i])
            if d not in files:
                add(GuestFile(d, None, 0o755, kind="dir"))

    add(GuestFile("/.ssh", None, 0o700, kind="dir"))
    add(GuestFile("/.ssh/authorized_keys", (authorized_key.strip() + "\n").encode(), 0o600))
    if git_identity is not None:
        name, email = git_identity
        add(GuestFile("/.gitconfig", f"[user]\n\tname = {name}\n\temail = {email}\n".encode(), 0o644))
    for entry in sync:
        rel = "/" + entry.guest.removeprefix("/root").lstrip("/")
        try:
            st = entry.host.stat()
        except FileNotFoundError:
            log.warning("file_sync host path is missing; skipped", extra={"host": str(entry.host)})
            continue
        if stat.S_ISDIR(st.st_mode):
            add_dirs(rel + "/x")
            add(GuestFile(rel, None, stat.S_IMODE(st.st_mode), kind="dir"))
            for root, dirs, names in os.walk(entry.host):
                base = rel + "/" + os.path.relpath(root, entry.host) if root != str(entry.host) else rel
                base = os.path.normpath(base)
                for d in sorted(dirs):
                    p = Path(root) / d
                    if not p.is_symlink():
                        add(GuestFile(f"{base}/{d}", None, stat.S_IMODE(p.stat().st_mode), kind="dir"))
                for n in sorted(names):
                    p = Path(root) / n
                    if p.is_file() and not p.is_symlink():
                        add(GuestFile(f"{base}/{n}", p.read_bytes(), stat.S_IMODE(p.stat().st_mode)))
        else:
            add_dirs(rel)
            add(GuestFile(rel, entry.host.read_bytes(), entry.mode if entry.mode is not None else 0o600))
    return list(files.values())


def host_git_identity() -> tuple[str, str] | None:
    from banger.system.run import run

    values = []
    for key in ("user.name", "user.email"):
        try:
            proc = run(["git", "config", "--global", "--get", key], check=False, timeout=5)
        except Exception:
            return None
        value = proc.stdout.decode(errors="replace").strip()
        if proc.returncode != 0 or not value or "\n" in value:
            return None
        values.append(value)
    return values[0], values[1]
