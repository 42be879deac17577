"""`/etc/banger/install.toml`: who owns a system install, and which build is installed."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from banger import paths
from banger.errors import BangerError


@dataclass(frozen=True)
class InstallMeta:
    owner_user: str
    owner_uid: int
    owner_gid: int
    owner_home: Path
    installed_at: str = ""
    version: str = ""
    commit: str = ""
    built_at: str = ""


def read(path: Path | None = None) -> InstallMeta | None:
    """The install metadata, or None when there is no system install."""
    path = path or paths.system_install_meta()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BangerError(f"{path}: cannot read install metadata: {exc}",
                          hint="re-run `sudo banger system install --owner <user>`") from None
    try:
        return InstallMeta(
            owner_user=str(data["owner_user"]),
            owner_uid=int(data["owner_uid"]),
            owner_gid=int(data["owner_gid"]),
            owner_home=Path(str(data["owner_home"])),
            installed_at=str(data.get("installed_at", "")),
            version=str(data.get("version", "")),
            commit=str(data.get("commit", "")),
            built_at=str(data.get("built_at", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BangerError(f"{path}: install metadata is missing or has a bad {exc}",
                          hint="re-run `sudo banger system install --owner <user>`") from None


def render(meta: InstallMeta) -> str:
    def q(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "".join([
        f"owner_user = {q(meta.owner_user)}\n",
        f"owner_uid = {meta.owner_uid}\n",
        f"owner_gid = {meta.owner_gid}\n",
        f"owner_home = {q(str(meta.owner_home))}\n",
        f"installed_at = {q(meta.installed_at)}\n",
        f"version = {q(meta.version)}\n",
        f"commit = {q(meta.commit)}\n",
        f"built_at = {q(meta.built_at)}\n",
    ])
