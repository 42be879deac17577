"""The SQLite store: migrations, schema state, read-only access and the record mappings."""

from __future__ import annotations

import dataclasses
import re
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger.errors import AlreadyExists, BadRequest, BangerError, NotFound
from banger.model import ImageRecord, KernelRecord, VmRecord, VmSpec, VmState
from banger.store import images, kernels, vms
from banger.store.db import Store, connect, open_db, open_readonly
from banger.store.migrations import (
    MIGRATIONS,
    Migration,
    inspect_path,
    migrate,
    schema_state,
    validate,
)

HEAD = len(MIGRATIONS)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    with open_db(db_path) as s:
        yield s


def make_vm(name: str = "dev", *, image_id: str = "img1", guest_ip: str = "", **kw: object) -> VmRecord:
    fields: dict[str, object] = {
        "id": f"{name}-id".ljust(32, "0"),
        "name": name,
        "image_id": image_id,
        "image_name": "debian",
        "state": VmState.CREATED,
        "spec": VmSpec(vcpu=2, memory_mib=2048, disk_size_bytes=8 << 30, system_overlay_size_bytes=2 << 30),
        "guest_ip": guest_ip,
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
    }
    fields.update(kw)
    return VmRecord(**fields)  # type: ignore[arg-type]


def make_image(name: str = "debian", image_id: str = "img1", **kw: object) -> ImageRecord:
    fields: dict[str, object] = {
        "id": image_id,
        "name": name,
        "managed": True,
        "rootfs_path": f"/state/images/{image_id}/rootfs.ext4",
        "kernel_path": "/state/kernels/k/vmlinux",
        "initrd_path": "",
        "modules_path": "",
        "work_seed_path": f"/state/images/{image_id}/work-seed.ext4",
        "kernel_ref": "debian-6.1",
        "source": "catalog",
        "created_at": "2026-01-01T00:00:00Z",
    }
    fields.update(kw)
    return ImageRecord(**fields)  # type: ignore[arg-type]


def make_kernel(name: str = "debian-6.1", **kw: object) -> KernelRecord:
    fields: dict[str, object] = {
        "name": name,
        "distro": "debian",
        "arch": "x86_64",
        "kernel_version": "6.1.0",
        "source": "catalog",
        "sha256": "ab" * 32,
        "imported_at": "2026-01-01T00:00:00Z",
        "vmlinux_path": f"/state/kernels/{name}/vmlinux",
    }
    fields.update(kw)
    return KernelRecord(**fields)  # type: ignore[arg-type]


def db_at_version(path: Path, version: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(path)
    try:
        migrate(conn, upto=version)
    finally:
        conn.close()


def columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def tables(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


# --- migrations --------------------------------------------------------------------------------------


def test_migration_list_is_contiguous_and_named() -> None:
    validate(MIGRATIONS)
    assert [(m.id, m.name) for m in MIGRATIONS] == [(1, "baseline"), (2, "kernels"), (3, "vm_workspace")]


@pytest.mark.parametrize("ids", [[1, 1], [2], [1, 3], [2, 1]])
def test_bad_migration_lists_are_rejected(tmp_path: Path, ids: list[int]) -> None:
    broken = tuple(Migration(i, f"m{n}", lambda conn: None) for n, i in enumerate(ids))
    conn = connect(tmp_path / "x.db")
    with pytest.raises(ValueError, match="contiguous"):
        migrate(conn, migrations=broken)
    conn.close()


def test_duplicate_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="unique"):
        validate((Migration(1, "a", lambda c: None), Migration(2, "a", lambda c: None)))


def test_open_db_on_empty_path_builds_head_schema(db_path: Path) -> None:
    with open_db(db_path) as store, store.read() as conn:
        assert schema_state(conn).status == "compatible"
        rows = conn.execute("SELECT id, name, applied_at FROM schema_migrations ORDER BY id").fetchall()
        assert [(r["id"], r["name"]) for r in rows] == [(1, "baseline"), (2, "kernels"), (3, "vm_workspace")]
        assert all(r["applied_at"].endswith("Z") for r in rows)
        assert {"images", "vms", "kernels", "schema_migrations"} <= tables(conn)
        assert "workspace_json" in columns(conn, "vms")
        assert columns(conn, "kernels")[:2] == ["name", "distro"]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700


def test_open_db_twice_applies_nothing_more(db_path: Path) -> None:
    open_db(db_path).close()
    conn = connect(db_path)
    assert migrate(conn) == ()
    assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == HEAD
    conn.close()


@pytest.mark.parametrize("version", range(HEAD))
def test_older_database_is_migrated_to_head(db_path: Path, version: int) -> None:
    db_at_version(db_path, version)
    conn = open_readonly(db_path)
    state = schema_state(conn)
    conn.close()
    assert state.status == "migrations_needed"
    assert state.applied == tuple(range(1, version + 1))
    assert state.pending == tuple(range(version + 1, HEAD + 1))

    conn = connect(db_path)
    assert migrate(conn) == tuple(range(version + 1, HEAD + 1))
    assert schema_state(conn).status == "compatible"
    conn.close()


def test_rows_written_at_version_1_survive_migration(db_path: Path) -> None:
    db_at_version(db_path, 1)
    conn = connect(db_path)
    assert "workspace_json" not in columns(conn, "vms")
    conn.execute(
        "INSERT INTO images (id, name, managed, rootfs_path, created_at, extra_json) "
        "VALUES ('img1', 'debian', 1, '/r.ext4', '2026-01-01T00:00:00Z', '{\"k\":1}')"
    )
    conn.execute(
        "INSERT INTO vms (id, name, image_id, image_name, state, vcpu, memory_mib, disk_size_bytes, "
        "system_overlay_size_bytes, nat, guest_ip, created_at, updated_at, runtime_json) VALUES "
        "('vm1', 'old', 'img1', 'debian', 'stopped', 1, 512, 100, 50, 1, '172.16.0.2', "
        "'2026-01-01T00:00:00Z', '2026-01-02T00:00:00Z', '{\"pid\":0}')"
    )
    conn.close()

    with open_db(db_path) as store:
        vm = vms.get_vm(store, "vm1")
        assert vm.name == "old"
        assert vm.state is VmState.STOPPED
        assert vm.spec == VmSpec(1, 512, 100, 50, nat=True)
        assert vm.guest_ip == "172.16.0.2"
        assert vm.runtime == {"pid": 0}
        assert vm.workspace is None
        with store.read() as c:
            assert c.execute("SELECT workspace_json FROM vms WHERE id = 'vm1'").fetchone()[0] is None
        img = images.get_image(store, "img1")
        assert img.extra == {"k": 1}
        assert img.kernel_path == ""
        assert kernels.list_kernels(store) == []


def test_failing_migration_rolls_back_only_itself(db_path: Path) -> None:
    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE partial (x INTEGER)")
        conn.execute("INSERT INTO partial VALUES (1)")
        conn.execute("ALTER TABLE no_such_table ADD COLUMN y TEXT")

    faulty = (*MIGRATIONS[:1], Migration(2, "broken", broken))
    db_path.parent.mkdir(parents=True)
    conn = connect(db_path)
    with pytest.raises(BangerError, match=r"migration 2 \(broken\) failed: .*no_such_table.*version 1"):
        migrate(conn, migrations=faulty)
    assert not conn.in_transaction
    assert schema_state(conn).applied == (1,)
    assert "partial" not in tables(conn)
    assert "images" in tables(conn)
    # The real history retries from where it stopped.
    assert migrate(conn) == (2, 3)
    conn.close()


def test_migration_that_ends_its_transaction_is_refused(db_path: Path) -> None:
    def sneaky(conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")

    db_path.parent.mkdir(parents=True)
    conn = connect(db_path)
    with pytest.raises(RuntimeError, match="ended its transaction"):
        migrate(conn, migrations=(Migration(1, "sneaky", sneaky),))
    conn.close()


def test_upto_out_of_range(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    conn = connect(db_path)
    with pytest.raises(ValueError, match="upto"):
        migrate(conn, upto=HEAD + 1)
    conn.close()


def test_newer_database_is_incompatible_and_not_migrated(db_path: Path) -> None:
    db_at_version(db_path, 1)
    conn = connect(db_path)
    conn.execute("INSERT INTO schema_migrations VALUES (99, 'from_the_future', '2030-01-01T00:00:00Z')")
    state = schema_state(conn)
    assert state.status == "incompatible"
    assert state.unknown == (99,)
    conn.close()

    with pytest.raises(BangerError, match=r"newer than this binary \(unknown migration ids: 99\)"):
        open_db(db_path)
    conn = connect(db_path)
    assert schema_state(conn).applied == (1, 99)  # nothing was applied
    conn.close()


def test_missing_schema_table_means_everything_pending(tmp_path: Path) -> None:
    path = tmp_path / "legacy.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE something (x)")
    conn.commit()
    state = schema_state(conn)
    assert (state.status, state.applied, state.pending) == ("migrations_needed", (), (1, 2, 3))
    conn.close()


def test_inspect_path(tmp_path: Path, db_path: Path) -> None:
    missing = tmp_path / "nope" / "state.db"
    fresh = inspect_path(missing)
    assert (fresh.status, fresh.fresh_install, fresh.pending) == ("migrations_needed", True, (1, 2, 3))
    assert not missing.parent.exists()

    db_at_version(db_path, 2)
    older = inspect_path(db_path)
    assert (older.status, older.fresh_install, older.pending, older.version) == (
        "migrations_needed",
        False,
        (3,),
        2,
    )
    open_db(db_path).close()
    head = inspect_path(db_path)
    assert (head.status, head.version) == ("compatible", HEAD)

    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(BangerError, match=r"garbage\.db"):
        inspect_path(garbage)


# --- read-only access --------------------------------------------------------------------------------


def test_readonly_missing_file_is_not_found_and_not_created(tmp_path: Path) -> None:
    path = tmp_path / "missing.db"
    with pytest.raises(NotFound, match="does not exist"):
        open_readonly(path)
    assert list(tmp_path.iterdir()) == []


def test_readonly_refuses_writes_and_creates_no_side_files(db_path: Path) -> None:
    db_at_version(db_path, 1)
    before = sorted(p.name for p in db_path.parent.iterdir())
    conn = open_readonly(db_path)
    assert schema_state(conn).version == 1
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        conn.execute("CREATE TABLE x (y)")
    with pytest.raises(BangerError, match=r"migration 2 .* readonly") as info:
        migrate(conn)
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    conn.close()
    assert sorted(p.name for p in db_path.parent.iterdir()) == before == ["state.db"]
    assert inspect_path(db_path).version == 1


def test_readonly_while_the_daemon_has_it_open(store: Store, db_path: Path) -> None:
    vms.insert_vm(store, make_vm("live"))  # committed to the WAL, maybe not to the main file yet
    conn = open_readonly(db_path)
    assert conn.execute("SELECT name FROM vms").fetchall()[0][0] == "live"
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        conn.execute("DELETE FROM vms")
    conn.close()
    assert [v.name for v in vms.list_vms(store)] == ["live"]


# --- Store transactions ------------------------------------------------------------------------------


def test_write_rolls_back_on_error(store: Store) -> None:
    with pytest.raises(RuntimeError), store.write() as conn:
        conn.execute("INSERT INTO kernels (name, imported_at, vmlinux_path) VALUES ('k', 'now', '/v')")
        raise RuntimeError("boom")
    assert kernels.list_kernels(store) == []
    assert not store.conn.in_transaction


def test_nested_write_is_a_savepoint(store: Store) -> None:
    with store.write():
        kernels.upsert_kernel(store, make_kernel("outer"))
        with pytest.raises(RuntimeError), store.write():
            kernels.upsert_kernel(store, make_kernel("inner"))
            vms.insert_vm(store, make_vm("a"))
            raise RuntimeError("inner block fails")
        # A failing nested write (itself a savepoint) rolls back alone.
        vms.insert_vm(store, make_vm("b"))
        with pytest.raises(AlreadyExists):
            vms.insert_vm(store, make_vm("b"))
        kernels.upsert_kernel(store, make_kernel("outer2"))
        assert store.conn.in_transaction
    assert not store.conn.in_transaction
    assert [k.name for k in kernels.list_kernels(store)] == ["outer", "outer2"]
    assert [v.name for v in vms.list_vms(store)] == ["b"]


def test_outer_failure_rolls_back_committed_savepoints(store: Store) -> None:
    with pytest.raises(RuntimeError), store.write():
        vms.insert_vm(store, make_vm("a"))
        raise RuntimeError("outer fails")
    assert vms.list_vms(store) == []


def test_concurrent_writers_from_threads(store: Store) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(20):
                vms.insert_vm(store, make_vm(f"vm-{n}-{i}", guest_ip=f"10.0.{n}.{i + 2}"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(vms.list_vms(store)) == 160


# --- VMs ---------------------------------------------------------------------------------------------


def test_vm_round_trip(store: Store) -> None:
    vm = make_vm("dev", guest_ip="172.16.0.2", runtime={"pid": 42, "tap": {"name": "tap0", "up": True}})
    vms.insert_vm(store, vm)
    assert vms.get_vm(store, vm.id) == vm
    assert vms.get_vm(store, vm.id).workspace is None

    changed = make_vm(
        "dev2",
        guest_ip="172.16.0.3",
        state=VmState.RUNNING,
        spec=VmSpec(4, 4096, 1, 2, nat=True),
        runtime={"pid": 7, "list": [1, "two", None]},
        workspace={"path": "/home/me/repo", "mode": "copy", "files": 3},
        last_error="",
        updated_at="2026-02-01T00:00:00Z",
    )
    changed = dataclasses.replace(changed, id=vm.id)
    vms.update_vm(store, changed)
    assert vms.get_vm(store, vm.id) == changed

    empty_ws = dataclasses.replace(changed, workspace={})
    vms.update_vm(store, empty_ws)
    assert vms.get_vm(store, vm.id).workspace == {}


def test_list_vms_oldest_first(store: Store) -> None:
    vms.insert_vm(store, make_vm("b", created_at="2026-01-02T00:00:00Z"))
    vms.insert_vm(store, make_vm("a", created_at="2026-01-03T00:00:00Z"))
    vms.insert_vm(store, make_vm("c", created_at="2026-01-01T00:00:00Z"))
    assert [v.name for v in vms.list_vms(store)] == ["c", "b", "a"]


def test_duplicate_vm_name(store: Store) -> None:
    vms.insert_vm(store, make_vm("x"))
    with pytest.raises(AlreadyExists) as info:
        vms.insert_vm(store, make_vm("x", id="other".ljust(32, "0")))
    assert info.value.message == 'vm name "x" is already taken'
    assert len(vms.list_vms(store)) == 1

    vms.insert_vm(store, make_vm("y"))
    with pytest.raises(AlreadyExists, match='vm name "x" is already taken'):
        vms.update_vm(store, make_vm("x", id=make_vm("y").id))


def test_duplicate_vm_id_and_guest_ip(store: Store) -> None:
    vms.insert_vm(store, make_vm("a", guest_ip="172.16.0.2"))
    with pytest.raises(AlreadyExists, match="vm id"):
        vms.insert_vm(store, make_vm("b", id=make_vm("a").id))
    with pytest.raises(AlreadyExists, match=re.escape('guest ip "172.16.0.2"')):
        vms.insert_vm(store, make_vm("c", guest_ip="172.16.0.2"))
    # An unallocated ('') guest IP is not unique.
    vms.insert_vm(store, make_vm("d"))
    vms.insert_vm(store, make_vm("e"))
    assert [v.name for v in vms.list_vms(store)] == ["a", "d", "e"]


def test_set_vm_state(store: Store) -> None:
    vm = make_vm("s")
    vms.insert_vm(store, vm)
    failed = vms.set_vm_state(store, vm.id, VmState.ERROR, last_error="firecracker exited 1")
    assert (failed.state, failed.last_error) == (VmState.ERROR, "firecracker exited 1")
    assert failed.updated_at != vm.updated_at
    running = vms.set_vm_state(store, vm.id, VmState.RUNNING)
    assert (running.state, running.last_error) == (VmState.RUNNING, "")
    assert vms.get_vm(store, vm.id) == running


def test_vm_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match='no vm with id "nope"'):
        vms.get_vm(store, "nope")
    with pytest.raises(NotFound):
        vms.update_vm(store, make_vm("ghost"))
    with pytest.raises(NotFound):
        vms.delete_vm(store, "nope")
    with pytest.raises(NotFound):
        vms.set_vm_state(store, "nope", VmState.STOPPED)


def test_delete_vm(store: Store) -> None:
    vm = make_vm("d", guest_ip="172.16.0.9")
    vms.insert_vm(store, vm)
    vms.delete_vm(store, vm.id)
    assert vms.list_vms(store) == []
    vms.insert_vm(store, make_vm("d2", guest_ip="172.16.0.9"))  # the IP is free again


def test_state_check_constraint(store: Store) -> None:
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"), store.write() as conn:
        conn.execute(
            "INSERT INTO vms (id, name, image_id, image_name, state, vcpu, memory_mib, disk_size_bytes, "
            "system_overlay_size_bytes, created_at, updated_at) "
            "VALUES ('i', 'n', 'img', 'img', 'paused', 1, 1, 1, 1, 'now', 'now')"
        )


def test_corrupt_json_is_reported(store: Store) -> None:
    vm = make_vm("c")
    vms.insert_vm(store, vm)
    with store.write() as conn:
        conn.execute("UPDATE vms SET runtime_json = '[1, 2]'")
    with pytest.raises(BangerError, match="runtime_json holds a JSON list"):
        vms.get_vm(store, vm.id)
    with store.write() as conn:
        conn.execute("UPDATE vms SET runtime_json = '{', workspace_json = NULL")
    with pytest.raises(BangerError, match="runtime_json is not valid JSON"):
        vms.list_vms(store)


# --- images ------------------------------------------------------------------------------------------


def test_image_round_trip(store: Store) -> None:
    img = make_image(extra={"oci": {"ref": "docker.io/library/debian:12", "layers": ["sha256:aa"]}})
    images.insert_image(store, img)
    assert images.get_image(store, img.id) == img
    assert images.get_image_by_name(store, "debian") == img

    updated = make_image(name="debian-12", managed=False, extra={}, source="register")
    images.update_image(store, updated)
    assert images.get_image(store, img.id) == updated
    with pytest.raises(NotFound, match='no image with name "debian"'):
        images.get_image_by_name(store, "debian")


def test_list_images_and_duplicates(store: Store) -> None:
    images.insert_image(store, make_image("zeta", "i2"))
    images.insert_image(store, make_image("alpha", "i1"))
    assert [i.name for i in images.list_images(store)] == ["alpha", "zeta"]
    with pytest.raises(AlreadyExists, match='image name "alpha" is already taken'):
        images.insert_image(store, make_image("alpha", "i3"))
    with pytest.raises(AlreadyExists, match='image id "i1"'):
        images.insert_image(store, make_image("beta", "i1"))
    with pytest.raises(NotFound):
        images.update_image(store, make_image("gamma", "i9"))


def test_delete_image_refused_while_in_use(store: Store) -> None:
    images.insert_image(store, make_image("debian", "img1"))
    images.insert_image(store, make_image("alpine", "img2"))
    vms.insert_vm(store, make_vm("b", image_id="img1"))
    vms.insert_vm(store, make_vm("a", image_id="img1"))
    vms.insert_vm(store, make_vm("other", image_id="img2"))

    assert [v.name for v in images.vms_using_image(store, "img1")] == ["a", "b"]
    with pytest.raises(BadRequest, match=r'image "debian" is used by 2 vm\(s\): a, b'):
        images.delete_image(store, "img1")
    assert images.get_image(store, "img1").name == "debian"

    vms.delete_vm(store, make_vm("a").id)
    vms.delete_vm(store, make_vm("b").id)
    images.delete_image(store, "img1")
    assert [i.name for i in images.list_images(store)] == ["alpine"]
    with pytest.raises(NotFound):
        images.delete_image(store, "img1")


def test_vm_record_survives_image_row_removed_behind_our_back(store: Store) -> None:
    images.insert_image(store, make_image())
    vms.insert_vm(store, make_vm("keep", image_id="img1"))
    with store.write() as conn:
        conn.execute("DELETE FROM images")  # no foreign key: the VM row stays
    assert vms.get_vm(store, make_vm("keep").id).image_name == "debian"


# --- kernels -----------------------------------------------------------------------------------------


def test_kernel_upsert_get_list_delete(store: Store) -> None:
    k = make_kernel("debian-6.1")
    kernels.upsert_kernel(store, k)
    assert kernels.get_kernel(store, "debian-6.1") == k
    k2 = make_kernel("debian-6.1", sha256="cd" * 32, initrd_path="/i", modules_path="/m", kernel_path="/k")
    kernels.upsert_kernel(store, k2)
    assert kernels.get_kernel(store, "debian-6.1") == k2
    kernels.upsert_kernel(store, make_kernel("alpine-6.6"))
    assert [x.name for x in kernels.list_kernels(store)] == ["alpine-6.6", "debian-6.1"]
    kernels.delete_kernel(store, "debian-6.1")
    with pytest.raises(NotFound, match=re.escape('no kernel named "debian-6.1"')):
        kernels.get_kernel(store, "debian-6.1")
    with pytest.raises(NotFound):
        kernels.delete_kernel(store, "debian-6.1")


def test_data_survives_reopen(db_path: Path) -> None:
    with open_db(db_path) as s:
        images.insert_image(s, make_image())
        vms.insert_vm(s, make_vm("p", workspace={"path": "/src"}))
        kernels.upsert_kernel(s, make_kernel())
    with open_db(db_path) as s:
        assert vms.get_vm(s, make_vm("p").id).workspace == {"path": "/src"}
        assert images.list_images(s) == [make_image()]
        assert kernels.list_kernels(s) == [make_kernel()]


def test_concurrent_first_opens_apply_each_migration_once(db_path: Path) -> None:
    # Several processes (here: connections on threads) starting at once on a fresh database.
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def opener() -> None:
        try:
            barrier.wait()
            open_db(db_path).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    conn = open_readonly(db_path)
    assert [r[0] for r in conn.execute("SELECT id FROM schema_migrations ORDER BY id")] == [1, 2, 3]
    conn.close()
