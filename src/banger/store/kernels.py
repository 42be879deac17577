"""Kernel rows ↔ `banger.model.KernelRecord`. Kernels are keyed by their (validated) name."""

from __future__ import annotations

import sqlite3

from banger.errors import NotFound
from banger.model import KernelRecord
from banger.store.db import Store

_COLUMNS = (
    "name",
    "distro",
    "arch",
    "kernel_version",
    "source",
    "sha256",
    "imported_at",
    "vmlinux_path",
    "kernel_path",
    "initrd_path",
    "modules_path",
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM kernels"
_UPSERT = (
    f"INSERT INTO kernels ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)}) "
    f"ON CONFLICT (name) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in _COLUMNS[1:])}"
)


def _to_row(rec: KernelRecord) -> tuple[object, ...]:
    return tuple(getattr(rec, column) for column in _COLUMNS)


def _from_row(row: sqlite3.Row) -> KernelRecord:
    return KernelRecord(**{column: row[column] for column in _COLUMNS})


def _not_found(name: str) -> NotFound:
    return NotFound(f'no kernel named "{name}"', hint="see `banger kernel list`")


def upsert_kernel(store: Store, rec: KernelRecord) -> None:
    """Insert, or replace every field of the kernel with the same name (re-import)."""
    with store.write() as conn:
        conn.execute(_UPSERT, _to_row(rec))


def get_kernel(store: Store, name: str) -> KernelRecord:
    with store.read() as conn:
        row = conn.execute(f"{_SELECT} WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise _not_found(name)
    return _from_row(row)


def list_kernels(store: Store) -> list[KernelRecord]:
    """All kernels, by name."""
    with store.read() as conn:
        rows = conn.execute(f"{_SELECT} ORDER BY name").fetchall()
    return [_from_row(row) for row in rows]


def delete_kernel(store: Store, name: str) -> None:
    with store.write() as conn:
        if conn.execute("DELETE FROM kernels WHERE name = ?", (name,)).rowcount == 0:
            raise _not_found(name)
