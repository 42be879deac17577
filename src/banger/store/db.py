"""Opening banger's SQLite database and serialising access to it.

The daemon keeps one read-write connection for its whole life. SQLite allows one writer at a time and a
single `sqlite3.Connection` must not interleave transactions from several threads, so every access goes
through `Store.read()` / `Store.write()`, which hold one re-entrant lock. Writes run in `BEGIN IMMEDIATE`
transactions (the write lock is taken up front, so a transaction never fails half-way with SQLITE_BUSY
after it has read); a nested `write()` becomes a savepoint inside the outer transaction.

`open_readonly` is for doctor and `bangerd --check-migrations`: it never creates, migrates or writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from banger.errors import BangerError, NotFound

BUSY_TIMEOUT_MS = 5000


def utc_now() -> str:
    """Timestamps stored in the database: RFC 3339, UTC, second precision."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def connect(path: Path) -> sqlite3.Connection:
    """A read-write connection with banger's connection profile; does not migrate.

    Autocommit mode (`isolation_level=None`): transactions are explicit, never opened behind our back
    by the sqlite3 module, so DDL in migrations is transactional too.
    """
    try:
        conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise BangerError(f"cannot open database {path}: {exc}") from exc
    try:
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        _enable_wal(conn, path)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")
    except sqlite3.Error as exc:
        conn.close()
        hint = None if _is_busy(exc) else "is it a banger state.db? move it aside to start fresh"
        raise BangerError(f"cannot open database {path}: {exc}", hint=hint) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _is_busy(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _enable_wal(conn: sqlite3.Connection, path: Path) -> None:
    """Switch to WAL (persistent, so in practice only the very first open converts the file).

    SQLite reports SQLITE_BUSY for a journal-mode change without calling the busy handler when another
    connection is converting the same fresh file at that moment, hence the retry loop.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            break
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    if str(mode).lower() != "wal":
        raise BangerError(f"cannot switch database {path} to WAL mode (journal_mode is {mode!r})")


def open_readonly(path: Path) -> sqlite3.Connection:
    """A connection that can only read `path`; a missing file is NotFound (nothing is created).

    `mode=ro` alone still creates the `-wal`/`-shm` side files when they are absent and leaves them
    behind, owned by whoever ran the check (root during `banger update`), which would lock the daemon
    out of its own database. When no `-wal` file exists no connection has the database open (SQLite
    removes it when the last one closes), so the file is read as `immutable`, which touches nothing.
    With a live daemon the side files exist already and the normal locking read is used.
    """
    if not path.exists():
        raise NotFound(f"database {path} does not exist", hint="bangerd creates it on first start")
    uri = f"file:{quote(str(path))}?mode=ro"
    if not path.with_name(path.name + "-wal").exists():
        uri += "&immutable=1"
    try:
        conn = sqlite3.connect(
            uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise BangerError(f"cannot open database {path} read-only: {exc}") from exc
    try:
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA query_only = ON")
    except sqlite3.Error as exc:
        conn.close()
        raise BangerError(f"cannot open database {path} read-only: {exc}") from exc
    return conn


def open_db(path: Path) -> Store:
    """Open (creating if needed) the database at `path`, bring its schema to head, return a Store.

    Refuses a database written by a newer banger (it has migrations this binary does not know).
    """
    # migrations.py imports this module (inspect_path needs open_readonly), hence the late import.
    from banger.store.migrations import migrate

    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Create the file 0600 before SQLite does (it would use the umask); the -wal/-shm files SQLite
    # creates later copy the main file's mode.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)
    conn = connect(path)
    try:
        migrate(conn)
    except sqlite3.Error as exc:
        conn.close()
        raise BangerError(f"cannot migrate database {path}: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return Store(conn, path)


class Store:
    """The daemon's database: one connection, one lock, explicit transactions."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        # Re-entrant so a write() can call helpers that open their own write()/read().
        self._lock = threading.RLock()
        self._depth = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """The connection, for queries. Holds the lock so no other thread's open transaction is seen."""
        with self._lock:
            yield self.conn

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A transaction: committed when the block ends, rolled back if it raises.

        Nested inside another write() on the same thread it is a savepoint: an exception rolls back the
        inner block only (if the caller catches it), the outer transaction decides the commit.
        """
        with self._lock:
            if self._depth:
                yield from self._savepoint()
                return
            self.conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
            finally:
                self._depth = 0

    def _savepoint(self) -> Iterator[sqlite3.Connection]:
        name = f"sp{self._depth}"
        self._depth += 1
        self.conn.execute(f"SAVEPOINT {name}")
        try:
            yield self.conn
            self.conn.execute(f"RELEASE {name}")
        except BaseException:
            self.conn.execute(f"ROLLBACK TO {name}")
            self.conn.execute(f"RELEASE {name}")
            raise
        finally:
            self._depth -= 1

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Helpers shared by the record modules.


def dump_json(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def load_json_object(text: str | None, what: str) -> dict[str, Any]:
    """Parse a JSON column that must hold an object; `what` names it in the error ("vm x runtime_json")."""
    try:
        value = json.loads(text if text is not None else "{}")
    except json.JSONDecodeError as exc:
        raise BangerError(f"{what} is not valid JSON: {exc}", hint="the state database is damaged") from exc
    if not isinstance(value, dict):
        raise BangerError(
            f"{what} holds a JSON {type(value).__name__}, not an object", hint="the state database is damaged"
        )
    return value


def unique_violation(exc: sqlite3.IntegrityError) -> str | None:
    """The `table.column` a UNIQUE/PRIMARY KEY violation names, or None for other integrity errors."""
    prefix = "UNIQUE constraint failed: "
    message = str(exc)
    if message.startswith(prefix):
        return message[len(prefix) :].split(",")[0].strip()
    return None
