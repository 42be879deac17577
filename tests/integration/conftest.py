"""Shared integration fixtures: real unprivileged users for tests that check who may do what.

The users are system accounts without a home or a login shell; they are created once and reused
across runs (deleting them would race other test sessions using them).
"""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class SystemUser:
    name: str
    uid: int
    gid: int

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` run as this user, with no supplementary groups."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", *argv]


def ensure_system_user(name: str) -> SystemUser:
    if os.geteuid() != 0:
        pytest.skip("creating users needs root")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        proc = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True,
            text=True,
            check=False,
        )
        try:  # another session may have created it in the meantime
            entry = pwd.getpwnam(name)
        except KeyError:
            raise RuntimeError(f"useradd {name} failed: {proc.stderr.strip()}") from None
    return SystemUser(name, entry.pw_uid, entry.pw_gid)


@pytest.fixture(scope="session")
def owner_user() -> SystemUser:
    """Plays the install owner (the uid the owner daemon runs as)."""
    return ensure_system_user("banger-owner-t")


@pytest.fixture(scope="session")
def foreign_user() -> SystemUser:
    """Some other local user, who must be refused everywhere."""
    return ensure_system_user("banger-foreign-t")
