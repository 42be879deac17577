"""`bangerd --check-migrations [--system]` in a real process against real database files.

The check must answer from a read-only look: the database file's bytes and mtime stay the same and no
side files appear.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from banger.store.db import Store, connect, open_db
from banger.store.migrations import migrate


@dataclass(frozen=True)
class Snapshot:
    sha256: str
    mtime_ns: int
    size: int
    siblings: tuple[str, ...]


def snapshot(path: Path) -> Snapshot:
    st = path.stat()
    return Snapshot(
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        mtime_ns=st.st_mtime_ns,
        size=st.st_size,
        siblings=tuple(sorted(p.name for p in path.parent.iterdir())),
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_STATE_HOME": str(tmp_path / "xdg-state"),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
        "XDG_CACHE_HOME": str(tmp_path / "xdg-cache"),
        "XDG_RUNTIME_DIR": str(tmp_path / "xdg-runtime"),
        "BANGER_SYSTEM_PREFIX": str(tmp_path / "sysroot"),
    }


@pytest.fixture
def user_db(tmp_path: Path) -> Path:
    return tmp_path / "xdg-state" / "banger" / "state.db"


@pytest.fixture
def system_db(tmp_path: Path) -> Path:
    return tmp_path / "sysroot" / "var" / "lib" / "banger" / "state.db"


def check(env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "banger.daemon.check_migrations", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    return proc.returncode, lines[0]


def db_at_version(path: Path, version: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(path)
    migrate(conn, upto=version)
    conn.close()


def test_fresh_install(env: dict[str, str], user_db: Path) -> None:
    assert check(env) == (1, "no database yet (fresh install); migrations will run on first start")
    assert not user_db.parent.exists()


@pytest.mark.parametrize(
    ("version", "line"),
    [
        (0, "migrations needed: 3 pending (1 baseline, 2 kernels, 3 vm_workspace); safe to swap"),
        (1, "migrations needed: 2 pending (2 kernels, 3 vm_workspace); safe to swap"),
        (2, "migrations needed: 1 pending (3 vm_workspace); safe to swap"),
    ],
)
def test_older_database(env: dict[str, str], user_db: Path, version: int, line: str) -> None:
    db_at_version(user_db, version)
    before = snapshot(user_db)
    assert check(env) == (1, line)
    assert snapshot(user_db) == before


def test_compatible_database(env: dict[str, str], user_db: Path) -> None:
    open_db(user_db).close()
    before = snapshot(user_db)
    assert check(env) == (0, "schema compatible (version 3)")
    assert snapshot(user_db) == before


def test_newer_database(env: dict[str, str], user_db: Path) -> None:
    open_db(user_db).close()
    conn = connect(user_db)
    conn.execute("INSERT INTO schema_migrations VALUES (4, 'future', '2030-01-01T00:00:00Z')")
    conn.close()
    before = snapshot(user_db)
    assert check(env) == (2, "database schema is newer than this binary (unknown migration ids: 4); aborting")
    assert snapshot(user_db) == before


def test_unreadable_database_aborts(env: dict[str, str], user_db: Path) -> None:
    user_db.parent.mkdir(parents=True)
    user_db.write_bytes(b"not a database\n" * 200)
    before = snapshot(user_db)
    code, line = check(env)
    assert code == 2
    assert str(user_db) in line
    assert line.endswith("; aborting")
    assert snapshot(user_db) == before


@pytest.fixture
def running_daemon_store(user_db: Path) -> Iterator[Store]:
    # The old daemon is still up during `banger update`: the database is open, with a live WAL.
    with open_db(user_db) as store:
        with store.write() as conn:
            conn.execute(
                "INSERT INTO kernels (name, imported_at, vmlinux_path) VALUES ('k', '2026-01-01T00:00:00Z', '/v')"
            )
        yield store


def test_check_while_daemon_has_database_open(
    env: dict[str, str], user_db: Path, running_daemon_store: Store
) -> None:
    before = snapshot(user_db)
    wal = user_db.with_name("state.db-wal")
    wal_before = hashlib.sha256(wal.read_bytes()).hexdigest()
    assert check(env) == (0, "schema compatible (version 3)")
    assert snapshot(user_db) == before
    assert hashlib.sha256(wal.read_bytes()).hexdigest() == wal_before


def test_system_flag_reads_the_system_layout(env: dict[str, str], user_db: Path, system_db: Path) -> None:
    open_db(system_db).close()
    db_at_version(user_db, 1)
    sys_before, user_before = snapshot(system_db), snapshot(user_db)

    assert check(env, "--system") == (0, "schema compatible (version 3)")
    assert check(env) == (1, "migrations needed: 2 pending (2 kernels, 3 vm_workspace); safe to swap")
    assert (snapshot(system_db), snapshot(user_db)) == (sys_before, user_before)


def test_system_flag_fresh_and_newer(env: dict[str, str], system_db: Path) -> None:
    assert check(env, "--system")[0] == 1
    assert not system_db.parent.exists()
    open_db(system_db).close()
    conn = connect(system_db)
    conn.execute("INSERT INTO schema_migrations VALUES (7, 'future', '2030-01-01T00:00:00Z')")
    conn.close()
    assert check(env, "--system") == (
        2,
        "database schema is newer than this binary (unknown migration ids: 7); aborting",
    )
