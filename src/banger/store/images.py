"""Image rows ↔ `banger.model.ImageRecord`.

VM rows reference images by id without a foreign key (a VM record must outlive anything that happens to
its image row), so `delete_image` itself refuses while a VM still uses the image.
"""

from __future__ import annotations

import sqlite3

from banger.errors import AlreadyExists, BadRequest, NotFound
from banger.model import ImageRecord, VmRecord
from banger.store.db import Store, dump_json, load_json_object, unique_violation
from banger.store.vms import vm_from_row

_COLUMNS = (
    "id",
    "name",
    "managed",
    "rootfs_path",
    "kernel_path",
    "initrd_path",
    "modules_path",
    "work_seed_path",
    "kernel_ref",
    "source",
    "created_at",
    "extra_json",
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM images"
_INSERT = f"INSERT INTO images ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})"
_UPDATE = f"UPDATE images SET {', '.join(f'{c} = ?' for c in _COLUMNS[1:])} WHERE id = ?"


def _to_row(rec: ImageRecord) -> tuple[object, ...]:
    return (
        rec.id,
        rec.name,
        int(rec.managed),
        rec.rootfs_path,
        rec.kernel_path,
        rec.initrd_path,
        rec.modules_path,
        rec.work_seed_path,
        rec.kernel_ref,
        rec.source,
        rec.created_at,
        dump_json(rec.extra),
    )


def _from_row(row: sqlite3.Row) -> ImageRecord:
    return ImageRecord(
        id=row["id"],
        name=row["name"],
        managed=bool(row["managed"]),
        rootfs_path=row["rootfs_path"],
        kernel_path=row["kernel_path"],
        initrd_path=row["initrd_path"],
        modules_path=row["modules_path"],
        work_seed_path=row["work_seed_path"],
        kernel_ref=row["kernel_ref"],
        source=row["source"],
        created_at=row["created_at"],
        extra=load_json_object(row["extra_json"], f'image "{row["name"]}" extra_json'),
    )


def _conflict(exc: sqlite3.IntegrityError, rec: ImageRecord) -> Exception:
    column = unique_violation(exc)
    if column == "images.name":
        return AlreadyExists(f'image name "{rec.name}" is already taken')
    if column == "images.id":
        return AlreadyExists(f'image id "{rec.id}" already exists')
    return exc


def _not_found(what: str, value: str) -> NotFound:
    return NotFound(f'no image with {what} "{value}"', hint="see `banger image list`")


def insert_image(store: Store, rec: ImageRecord) -> None:
    try:
        with store.write() as conn:
            conn.execute(_INSERT, _to_row(rec))
    except sqlite3.IntegrityError as exc:
        raise _conflict(exc, rec) from exc


def update_image(store: Store, rec: ImageRecord) -> None:
    """Overwrite every column of the row with `rec.id`."""
    row = _to_row(rec)
    try:
        with store.write() as conn:
            if conn.execute(_UPDATE, (*row[1:], rec.id)).rowcount == 0:
                raise _not_found("id", rec.id)
    except sqlite3.IntegrityError as exc:
        raise _conflict(exc, rec) from exc


def get_image(store: Store, image_id: str) -> ImageRecord:
    with store.read() as conn:
        row = conn.execute(f"{_SELECT} WHERE id = ?", (image_id,)).fetchone()
    if row is None:
        raise _not_found("id", image_id)
    return _from_row(row)


def get_image_by_name(store: Store, name: str) -> ImageRecord:
    with store.read() as conn:
        row = conn.execute(f"{_SELECT} WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise _not_found("name", name)
    return _from_row(row)


def list_images(store: Store) -> list[ImageRecord]:
    """All images, by name."""
    with store.read() as conn:
        rows = conn.execute(f"{_SELECT} ORDER BY name").fetchall()
    return [_from_row(row) for row in rows]


def vms_using_image(store: Store, image_id: str) -> list[VmRecord]:
    """The VMs whose image is `image_id`, by name."""
    with store.read() as conn:
        rows = conn.execute("SELECT * FROM vms WHERE image_id = ? ORDER BY name", (image_id,)).fetchall()
    return [vm_from_row(row) for row in rows]


def delete_image(store: Store, image_id: str) -> None:
    """Delete the row; refused (BadRequest) while any VM uses the image. Check and delete are atomic."""
    with store.write() as conn:
        image = get_image(store, image_id)
        users = [row["name"] for row in conn.execute(
            "SELECT name FROM vms WHERE image_id = ? ORDER BY name", (image_id,)
        )]
        if users:
            raise BadRequest(
                f'image "{image.name}" is used by {len(users)} vm(s): {", ".join(users)}',
                hint="delete those vms first",
            )
        conn.execute("DELETE FROM images WHERE id = ?", (image_id,))
