"""VM rows ↔ `banger.model.VmRecord`. Mapping and constraint errors only; no lifecycle logic."""

from __future__ import annotations

import sqlite3

from banger.errors import AlreadyExists, NotFound
from banger.model import VmRecord, VmSpec, VmState
from banger.store.db import Store, dump_json, load_json_object, unique_violation, utc_now

_COLUMNS = (
    "id",
    "name",
    "image_id",
    "image_name",
    "state",
    "vcpu",
    "memory_mib",
    "disk_size_bytes",
    "system_overlay_size_bytes",
    "nat",
    "guest_ip",
    "created_at",
    "updated_at",
    "runtime_json",
    "workspace_json",
    "last_error",
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM vms"
_INSERT = f"INSERT INTO vms ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})"
_UPDATE = f"UPDATE vms SET {', '.join(f'{c} = ?' for c in _COLUMNS[1:])} WHERE id = ?"


def _to_row(rec: VmRecord) -> tuple[object, ...]:
    return (
        rec.id,
        rec.name,
        rec.image_id,
        rec.image_name,
        str(VmState(rec.state)),
        rec.spec.vcpu,
        rec.spec.memory_mib,
        rec.spec.disk_size_bytes,
        rec.spec.system_overlay_size_bytes,
        int(rec.spec.nat),
        rec.guest_ip,
        rec.created_at,
        rec.updated_at,
        dump_json(rec.runtime),
        None if rec.workspace is None else dump_json(rec.workspace),
        rec.last_error,
    )


def vm_from_row(row: sqlite3.Row) -> VmRecord:
    vm_id = row["id"]
    workspace = row["workspace_json"]
    return VmRecord(
        id=vm_id,
        name=row["name"],
        image_id=row["image_id"],
        image_name=row["image_name"],
        state=VmState(row["state"]),
        spec=VmSpec(
            vcpu=row["vcpu"],
            memory_mib=row["memory_mib"],
            disk_size_bytes=row["disk_size_bytes"],
            system_overlay_size_bytes=row["system_overlay_size_bytes"],
            nat=bool(row["nat"]),
        ),
        guest_ip=row["guest_ip"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        runtime=load_json_object(row["runtime_json"], f'vm "{vm_id}" runtime_json'),
        workspace=None if workspace is None else load_json_object(workspace, f'vm "{vm_id}" workspace_json'),
        last_error=row["last_error"],
    )


def _conflict(exc: sqlite3.IntegrityError, rec: VmRecord) -> Exception:
    column = unique_violation(exc)
    if column == "vms.name":
        return AlreadyExists(f'vm name "{rec.name}" is already taken')
    if column == "vms.guest_ip":
        return AlreadyExists(f'guest ip "{rec.guest_ip}" is already assigned to another vm')
    if column == "vms.id":
        return AlreadyExists(f'vm id "{rec.id}" already exists')
    return exc


def _not_found(vm_id: str) -> NotFound:
    return NotFound(f'no vm with id "{vm_id}"', hint="see `banger vm list`")


def insert_vm(store: Store, rec: VmRecord) -> None:
    try:
        with store.write() as conn:
            conn.execute(_INSERT, _to_row(rec))
    except sqlite3.IntegrityError as exc:
        raise _conflict(exc, rec) from exc


def update_vm(store: Store, rec: VmRecord) -> None:
    """Overwrite every column of the row with `rec.id`; the caller sets `updated_at`."""
    row = _to_row(rec)
    try:
        with store.write() as conn:
            cursor = conn.execute(_UPDATE, (*row[1:], rec.id))
            if cursor.rowcount == 0:
                raise _not_found(rec.id)
    except sqlite3.IntegrityError as exc:
        raise _conflict(exc, rec) from exc


def get_vm(store: Store, vm_id: str) -> VmRecord:
    with store.read() as conn:
        row = conn.execute(f"{_SELECT} WHERE id = ?", (vm_id,)).fetchone()
    if row is None:
        raise _not_found(vm_id)
    return vm_from_row(row)


def list_vms(store: Store) -> list[VmRecord]:
    """All VMs, oldest first."""
    with store.read() as conn:
        rows = conn.execute(f"{_SELECT} ORDER BY created_at, name").fetchall()
    return [vm_from_row(row) for row in rows]


def delete_vm(store: Store, vm_id: str) -> None:
    with store.write() as conn:
        if conn.execute("DELETE FROM vms WHERE id = ?", (vm_id,)).rowcount == 0:
            raise _not_found(vm_id)


def set_vm_state(store: Store, vm_id: str, state: VmState, last_error: str = "") -> VmRecord:
    """Record a state transition (and its error, cleared by default); returns the updated record."""
    with store.write() as conn:
        cursor = conn.execute(
            "UPDATE vms SET state = ?, last_error = ?, updated_at = ? WHERE id = ?",
            (str(VmState(state)), last_error, utc_now(), vm_id),
        )
        if cursor.rowcount == 0:
            raise _not_found(vm_id)
        return get_vm(store, vm_id)
