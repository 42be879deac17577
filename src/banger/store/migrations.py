"""Versioned, forward-only schema migrations.

`MIGRATIONS` is the ordered history of the schema; `schema_migrations` records which of them a database
has. Each migration runs in its own transaction together with the insert of its row, so a failure leaves
the database exactly at the previous version and the migration is retried on the next open.

A shipped migration is never edited or removed: databases in the field have already run it. Change the
schema by appending a migration with the next id.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from banger.errors import BangerError
from banger.store.db import open_readonly, utc_now

log = logging.getLogger("banger.store")

SchemaStatus = Literal["compatible", "migrations_needed", "incompatible"]


@dataclass(frozen=True)
class Migration:
    id: int
    name: str
    apply: Callable[[sqlite3.Connection], None]


def _execute_all(conn: sqlite3.Connection, statements: Sequence[str]) -> None:
    # Not executescript(): it COMMITs the open transaction first, which would break atomicity.
    for statement in statements:
        conn.execute(statement)


def _baseline(conn: sqlite3.Connection) -> None:
    # IF NOT EXISTS: idempotent, so a database created before versioning adopts the baseline as is.
    # vms.image_id has no foreign key on purpose: a VM record must survive whatever happens to its
    # image row; images.delete_image refuses while a VM references the image.
    _execute_all(
        conn,
        (
            """
            CREATE TABLE IF NOT EXISTS images (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                managed INTEGER NOT NULL DEFAULT 0,
                rootfs_path TEXT NOT NULL DEFAULT '',
                kernel_path TEXT NOT NULL DEFAULT '',
                initrd_path TEXT NOT NULL DEFAULT '',
                modules_path TEXT NOT NULL DEFAULT '',
                work_seed_path TEXT NOT NULL DEFAULT '',
                kernel_ref TEXT NOT NULL DEFAULT '',
                source TEXT NOT NULL DEFAULT '',
                created_at TEXT NOT NULL,
                extra_json TEXT NOT NULL DEFAULT '{}'
            )
            """,
            """
            CREATE TABLE IF NOT EXISTS vms (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                image_id TEXT NOT NULL,
                image_name TEXT NOT NULL,
                state TEXT NOT NULL CHECK (state IN ('created', 'running', 'stopped', 'error')),
                vcpu INTEGER NOT NULL,
                memory_mib INTEGER NOT NULL,
                disk_size_bytes INTEGER NOT NULL,
                system_overlay_size_bytes INTEGER NOT NULL,
                nat INTEGER NOT NULL DEFAULT 0,
                guest_ip TEXT NOT NULL DEFAULT '',
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL,
                runtime_json TEXT NOT NULL DEFAULT '{}',
                last_error TEXT NOT NULL DEFAULT ''
            )
            """,
            # A guest IP belongs to one VM at a time; '' means "none allocated".
            "CREATE UNIQUE INDEX IF NOT EXISTS vms_guest_ip ON vms(guest_ip) WHERE guest_ip != ''",
            "CREATE INDEX IF NOT EXISTS vms_image_id ON vms(image_id)",
        ),
    )


def _kernels(conn: sqlite3.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE IF NOT EXISTS kernels (
            name TEXT PRIMARY KEY,
            distro TEXT NOT NULL DEFAULT '',
            arch TEXT NOT NULL DEFAULT '',
            kernel_version TEXT NOT NULL DEFAULT '',
            source TEXT NOT NULL DEFAULT '',
            sha256 TEXT NOT NULL DEFAULT '',
            imported_at TEXT NOT NULL,
            vmlinux_path TEXT NOT NULL,
            kernel_path TEXT NOT NULL DEFAULT '',
            initrd_path TEXT NOT NULL DEFAULT '',
            modules_path TEXT NOT NULL DEFAULT ''
        )
        """
    )


def _vm_workspace(conn: sqlite3.Connection) -> None:
    # NULL = the VM has no workspace. Skipped if present, so the migration is idempotent like baseline.
    columns = {row[1] for row in conn.execute("PRAGMA table_info(vms)")}
    if "workspace_json" not in columns:
        conn.execute("ALTER TABLE vms ADD COLUMN workspace_json TEXT")


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "baseline", _baseline),
    Migration(2, "kernels", _kernels),
    Migration(3, "vm_workspace", _vm_workspace),
)


@dataclass(frozen=True)
class SchemaState:
    """How a database's applied migrations compare with the ones this binary knows."""

    applied: tuple[int, ...]
    known: tuple[int, ...]
    status: SchemaStatus
    fresh_install: bool = False  # no database file at all

    @property
    def pending(self) -> tuple[int, ...]:
        return tuple(i for i in self.known if i not in self.applied)

    @property
    def unknown(self) -> tuple[int, ...]:
        return tuple(i for i in self.applied if i not in self.known)

    @property
    def version(self) -> int:
        return max(self.applied, default=0)


def validate(migrations: Sequence[Migration]) -> None:
    """Ids must be 1, 2, 3, ... in order and names unique; anything else is a bug in the list."""
    ids = [m.id for m in migrations]
    if ids != list(range(1, len(ids) + 1)):
        raise ValueError(f"migration ids must be contiguous from 1 in order, got {ids}")
    names = [m.name for m in migrations]
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(f"migration names must be non-empty and unique, got {names}")


def migration_name(migration_id: int, migrations: Sequence[Migration] = MIGRATIONS) -> str:
    for m in migrations:
        if m.id == migration_id:
            return m.name
    return "?"


def _has_table(conn: sqlite3.Connection) -> bool:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'")
    return row.fetchone() is not None


def _classify(applied: tuple[int, ...], known: tuple[int, ...]) -> SchemaStatus:
    if any(i not in known for i in applied):
        return "incompatible"
    if any(i not in applied for i in known):
        return "migrations_needed"
    return "compatible"


def schema_state(conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS) -> SchemaState:
    """Read-only. A database without a `schema_migrations` table has every migration pending."""
    applied: tuple[int, ...] = ()
    if _has_table(conn):
        applied = tuple(sorted(int(row[0]) for row in conn.execute("SELECT id FROM schema_migrations")))
    known = tuple(m.id for m in migrations)
    return SchemaState(applied=applied, known=known, status=_classify(applied, known))


def inspect_path(path: Path, migrations: Sequence[Migration] = MIGRATIONS) -> SchemaState:
    """`schema_state` of the database file at `path`, opened read-only; never creates or writes it."""
    known = tuple(m.id for m in migrations)
    if not path.exists():
        return SchemaState(applied=(), known=known, status="migrations_needed", fresh_install=True)
    conn = open_readonly(path)
    try:
        return schema_state(conn, migrations)
    except sqlite3.Error as exc:
        raise BangerError(
            f"cannot read the schema of {path}: {exc}", hint="is it a banger state.db?"
        ) from exc
    finally:
        conn.close()


def incompatible_message(state: SchemaState) -> str:
    ids = ", ".join(str(i) for i in state.unknown)
    return f"database schema is newer than this binary (unknown migration ids: {ids})"


def _ensure_table(conn: sqlite3.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            applied_at TEXT NOT NULL
        )
        """
    )


def migrate(
    conn: sqlite3.Connection, upto: int | None = None, *, migrations: Sequence[Migration] = MIGRATIONS
) -> tuple[int, ...]:
    """Apply the pending migrations with id <= `upto` (all if None); returns the ids applied now.

    `conn` must be in autocommit mode (`db.connect`). Refuses a database that has migrations this
    binary does not know. A failing migration is rolled back on its own and raised as BangerError;
    the ones before it stay applied.
    """
    validate(migrations)
    if conn.isolation_level is not None:
        raise ValueError("migrate() needs an autocommit connection (isolation_level=None)")
    if upto is not None and not 0 <= upto <= len(migrations):
        raise ValueError(f"upto must be between 0 and {len(migrations)}, got {upto}")
    _ensure_table(conn)
    state = schema_state(conn, migrations)
    if state.status == "incompatible":
        raise BangerError(
            incompatible_message(state), hint="this database was written by a newer banger; use that version"
        )
    done: list[int] = []
    for migration in migrations[:upto]:
        if migration.id in state.applied:
            continue
        if _apply_one(conn, migration):
            done.append(migration.id)
            log.info("applied migration %d (%s)", migration.id, migration.name)
    return tuple(done)


def _apply_one(conn: sqlite3.Connection, migration: Migration) -> bool:
    try:
        conn.execute("BEGIN IMMEDIATE")
        # Another process may have applied it between our check and taking the write lock.
        if conn.execute("SELECT 1 FROM schema_migrations WHERE id = ?", (migration.id,)).fetchone():
            conn.execute("COMMIT")
            return False
        migration.apply(conn)
        if not conn.in_transaction:
            raise RuntimeError(f"migration {migration.id} ({migration.name}) ended its transaction")
        conn.execute(
            "INSERT INTO schema_migrations (id, name, applied_at) VALUES (?, ?, ?)",
            (migration.id, migration.name, utc_now()),
        )
        conn.execute("COMMIT")
    except BaseException as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise BangerError(
                f"migration {migration.id} ({migration.name}) failed: {exc}; "
                f"database left at version {migration.id - 1}",
                hint="the next start retries it; report this as a bug if it keeps failing",
            ) from exc
        raise
    return True
