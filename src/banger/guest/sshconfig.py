"""banger's own ssh_config and the marker-fenced Include block in ~/.ssh/config."""

from __future__ import annotations

import os
from pathlib import Path

from banger import paths

BEGIN = "# >>> banger >>> (managed by `banger ssh-config`; remove with --uninstall)"
END = "# <<< banger <<<"
_LEGACY_BEGIN = "# banger: begin"
_LEGACY_END = "# banger: end"


def render_ssh_config(layout: paths.Layout, key_path: Path) -> str:
    return (
        "# Written by banger. `ssh <name>.vm` reaches a banger VM as root with banger's key and pins.\n"
        "Host *.vm\n"
        "  User root\n"
        f"  IdentityFile {key_path}\n"
        "  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {layout.known_hosts}\n"
        "  StrictHostKeyChecking accept-new\n"
        "  LogLevel ERROR\n"
    )


def include_block(layout: paths.Layout) -> str:
    return f"{BEGIN}\nInclude {layout.ssh_config}\n{END}\n"


def user_ssh_config(layout: paths.Layout) -> Path:
    return layout.owner_home / ".ssh" / "config"


def _strip_blocks(text: str) -> str:
    out: list[str] = []
    skipping = False
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped in (BEGIN, _LEGACY_BEGIN) or stripped.startswith("# >>> banger >>>"):
            skipping = True
            continue
        if skipping and stripped in (END, _LEGACY_END):
            skipping = False
            continue
        if not skipping:
            out.append(line)
    return "".join(out)


def _write_atomic(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.banger-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def install(layout: paths.Layout, key_path: Path) -> bool:
    """Write banger's ssh_config and put the Include block first in ~/.ssh/config. True if changed."""
    layout.ssh_config.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(layout.ssh_config, render_ssh_config(layout, key_path), 0o644)
    target = user_ssh_config(layout)
    target.parent.mkdir(mode=0o700, exist_ok=True)
    current = target.read_text(encoding="utf-8") if target.exists() else ""
    # Include must come before any Host block, or ssh scopes it to that block.
    updated = include_block(layout) + _strip_blocks(current)
    if updated == current:
        return False
    mode = target.stat().st_mode & 0o777 if target.exists() else 0o600
    _write_atomic(target, updated, mode)
    return True


def uninstall(layout: paths.Layout) -> bool:
    target = user_ssh_config(layout)
    if not target.exists():
        return False
    current = target.read_text(encoding="utf-8")
    updated = _strip_blocks(current)
    if updated == current:
        return False
    _write_atomic(target, updated, target.stat().st_mode & 0o777)
    return True


def is_installed(layout: paths.Layout) -> bool:
    target = user_ssh_config(layout)
    return target.exists() and f"Include {layout.ssh_config}" in target.read_text(encoding="utf-8")
