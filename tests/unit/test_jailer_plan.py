"""Jail planning: derived paths, the jailer's argv, what gets staged, and what is refused."""

from __future__ import annotations

import os
import posixpath
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from banger.errors import BadRequest
from banger.vmm.firecracker.config import Drive, FirecrackerVmConfig, NetIface, Vsock, request_bodies
from banger.vmm.firecracker.jailer import (
    JailPlan,
    StageKind,
    StageOp,
    files_to_stage,
    jailed_config,
    jailer_argv,
    validate_exec_file,
    validate_jail_id,
)

VM_ID = "0a1b2c3d-4e5f"
UID, GID = 1000, 1001
JAIL_DEV, OTHER_DEV = 0x801, 0x802

# The option order of the jailer's usage text (Firecracker docs/jailer.md, "Jailer Usage").
JAILER_USAGE_ORDER = [
    "--id", "--exec-file", "--uid", "--gid", "--cgroup-version", "--cgroup", "--parent-cgroup",
    "--chroot-base-dir", "--netns", "--resource-limit", "--daemonize", "--new-pid-ns",
]  # fmt: skip


def plan(**changes: Any) -> JailPlan:
    fields: dict[str, Any] = {
        "chroot_base": "/srv/jailer",
        "id": VM_ID,
        "exec_file": "/usr/local/bin/firecracker",
        "uid": UID,
        "gid": GID,
    }
    return JailPlan(**{**fields, **changes})


def host_config(**changes: Any) -> FirecrackerVmConfig:
    fields: dict[str, Any] = {
        "kernel_path": "/var/lib/banger/kernels/k1/vmlinux",
        "initrd_path": "/var/lib/banger/kernels/k1/initrd.img",
        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off",
        "vcpu": 2,
        "memory_mib": 1024,
        "drives": (
            Drive("rootfs", "/dev/mapper/banger-0a1b2c3d", is_root_device=True, is_read_only=True),
            Drive("work", "/var/lib/banger/vms/0a1b2c3d/work.ext4", is_root_device=False, is_read_only=False),
        ),
        "net": (NetIface("eth0", "tap-0a1b2c3d", "06:00:ac:10:00:02"),),
        "vsock": Vsock(42, "/run/banger/vms/0a1b2c3d/vsock.sock"),
        "log_path": "/var/lib/banger/vms/0a1b2c3d/firecracker.log",
        "metrics_path": "/var/lib/banger/vms/0a1b2c3d/metrics.json",
    }
    return FirecrackerVmConfig(**{**fields, **changes})


def stat_result(
    mode: int, *, dev: int = JAIL_DEV, uid: int = 0, gid: int = 0, rdev: int = 0
) -> os.stat_result:
    return os.stat_result((mode, 1, dev, 1, uid, gid, 0, 0, 0, 0), {"st_rdev": rdev})


class FakeFs:
    """`stat` over a table of paths, so every case (devices, other filesystems, owners) is exact."""

    def __init__(self, entries: dict[str, os.stat_result]) -> None:
        self.entries = {
            "/srv/jailer": stat_result(stat.S_IFDIR | 0o755),
            "/": stat_result(stat.S_IFDIR | 0o755),
        }
        self.entries.update(entries)

    def __call__(self, path: str) -> os.stat_result:
        try:
            return self.entries[path]
        except KeyError:
            raise FileNotFoundError(2, "No such file or directory", path) from None


def usual_fs(**overrides: os.stat_result) -> FakeFs:
    entries = {
        "/var/lib/banger/kernels/k1/vmlinux": stat_result(stat.S_IFREG | 0o644, uid=UID, gid=GID),
        "/var/lib/banger/kernels/k1/initrd.img": stat_result(stat.S_IFREG | 0o644, uid=UID, gid=GID),
        "/dev/mapper/banger-0a1b2c3d": stat_result(stat.S_IFBLK | 0o660, dev=5, rdev=os.makedev(253, 7)),
        "/var/lib/banger/vms/0a1b2c3d/work.ext4": stat_result(stat.S_IFREG | 0o600, uid=UID, gid=GID),
    }
    entries.update({k.replace("__", "/"): v for k, v in overrides.items()})
    return FakeFs(entries)


# -- paths -----------------------------------------------------------------------------------------------


def test_derived_paths_follow_the_jailer_layout() -> None:
    p = plan()
    root = f"/srv/jailer/firecracker/{VM_ID}/root"
    assert p.jail_dir == f"/srv/jailer/firecracker/{VM_ID}"
    assert p.chroot_dir == root
    assert p.api_sock == "/firecracker.socket"
    assert p.api_socket_path == f"{root}/firecracker.socket"
    assert p.jailed_exec_file == f"{root}/firecracker"
    assert p.pid_file == f"{root}/firecracker.pid"


def test_the_chroot_is_named_after_the_binary_file_name() -> None:
    p = plan(exec_file="/opt/fc/firecracker-v1.14.2-x86_64")
    assert p.chroot_dir == f"/srv/jailer/firecracker-v1.14.2-x86_64/{VM_ID}/root"
    assert p.pid_file.endswith("/root/firecracker-v1.14.2-x86_64.pid")


@pytest.mark.parametrize("good", ["a", "vm-1", "0A1b-2c3D", "x" * 64, "551e7604-e35c-42b3-b825-416853441234"])
def test_valid_jail_ids(good: str) -> None:
    assert validate_jail_id(good) == good
    assert plan(id=good).id == good


@pytest.mark.parametrize("bad", ["", "x" * 65, "vm_1", "vm.1", "vm/1", "../x", "vm 1", "vm\n", "é"])
def test_invalid_jail_ids_are_refused(bad: str) -> None:
    with pytest.raises(BadRequest, match=r"jail id .* is invalid \(1-64 characters: letters, digits, '-'\)"):
        plan(id=bad)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"uid": 0}, "jail uid 0 is not allowed"),
        ({"gid": 0}, "jail gid 0 is not allowed"),
        ({"uid": True}, "jail uid True is not allowed"),
        ({"chroot_base": "srv/jailer"}, "chroot base 'srv/jailer' is not an absolute, normalised path"),
        ({"chroot_base": "/srv/../etc"}, "chroot base '/srv/../etc' is not an absolute, normalised path"),
        ({"chroot_base": "/srv/jailer/"}, "is not an absolute, normalised path"),
        ({"chroot_base": "/"}, "jailer chroot base '/' is not allowed"),
        ({"exec_file": "firecracker"}, "firecracker binary 'firecracker' is not an absolute"),
        ({"netns": "my-netns"}, "network namespace path 'my-netns'"),
        ({"api_sock": "/run/fc.sock"}, "must be a free name at the top of the jail"),
        ({"api_sock": "/firecracker"}, "must be a free name at the top of the jail"),
        ({"cgroups": ("cpu.weight",)}, "is not of the form <file>=<value>"),
        ({"cgroups": ("cpu.weight=5=0",)}, "is not of the form <file>=<value>"),
        ({"resource_limits": ("no-file=10\n",)}, "is not fsize=<n> or no-file=<n>"),
        ({"parent_cgroup": "../escape"}, "must be a relative path"),
        ({"resource_limits": ("nproc=10",)}, "is not fsize=<n> or no-file=<n>"),
    ],
)
def test_bad_plans_are_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest, match=re.escape(message)):
        plan(**change)


def test_jailed_path_is_the_basename_at_the_top_of_the_jail() -> None:
    assert plan().jailed_path("/var/lib/banger/kernels/k1/vmlinux") == "/vmlinux"
    assert plan().jailed_path("/dev/mapper/banger-0a1b2c3d") == "/banger-0a1b2c3d"


@pytest.mark.parametrize(
    "host", ["/usr/local/bin/firecracker", "/x/firecracker.pid", "/x/firecracker.socket", "/x/dev", "/x/run"]
)
def test_jailed_path_refuses_names_the_jailer_owns(host: str) -> None:
    with pytest.raises(BadRequest, match="is reserved for the jailer or Firecracker"):
        plan().jailed_path(host)


@pytest.mark.parametrize("host", ["vmlinux", "/a/../vmlinux", "/a//vmlinux", "/", "/a/.", ""])
def test_jailed_path_refuses_odd_host_paths(host: str) -> None:
    with pytest.raises(BadRequest):
        plan().jailed_path(host)


@pytest.mark.parametrize(
    "jail_path", ["/../../etc/shadow", "/..", "..", "etc/shadow", "/", "/a/../../b", "/a\0b"]
)
def test_host_path_refuses_paths_outside_the_chroot(jail_path: str) -> None:
    with pytest.raises(BadRequest):
        plan().host_path(jail_path)


def test_host_path_maps_inside_the_chroot() -> None:
    assert plan().host_path("/vsock.sock") == f"/srv/jailer/firecracker/{VM_ID}/root/vsock.sock"


# -- argv ------------------------------------------------------------------------------------------------


def test_jailer_argv_minimal() -> None:
    assert jailer_argv(plan(), ["--level", "Info"], jailer="/usr/local/bin/jailer") == [
        "/usr/local/bin/jailer",
        "--id", VM_ID,
        "--exec-file", "/usr/local/bin/firecracker",
        "--uid", "1000",
        "--gid", "1001",
        "--chroot-base-dir", "/srv/jailer",
        "--",
        "--api-sock", "/firecracker.socket",
        "--level", "Info",
    ]  # fmt: skip


def test_jailer_argv_keeps_the_jailer_usage_order() -> None:
    p = plan(
        netns="/var/run/netns/banger",
        cgroup_version=2,
        cgroups=("cpu.weight=50", "cpu.max=max 100000"),
        parent_cgroup="banger/vms",
        resource_limits=("no-file=4096",),
    )
    argv = jailer_argv(p, ["--level", "Info"])
    options = argv[1 : argv.index("--")]
    flags = [a for a in options if a.startswith("--")]
    assert flags == [
        "--id", "--exec-file", "--uid", "--gid", "--cgroup-version", "--cgroup", "--cgroup",
        "--parent-cgroup", "--chroot-base-dir", "--netns", "--resource-limit",
    ]  # fmt: skip
    positions = [JAILER_USAGE_ORDER.index(f) for f in flags]
    assert positions == sorted(positions)
    assert options[options.index("--netns") + 1] == "/var/run/netns/banger"
    assert argv[argv.index("--") :] == ["--", "--api-sock", "/firecracker.socket", "--level", "Info"]


def test_jailer_argv_never_daemonizes_nor_uses_a_new_pid_namespace() -> None:
    argv = jailer_argv(plan(netns="/var/run/netns/x", cgroup_version=2))
    assert "--daemonize" not in argv
    assert "--new-pid-ns" not in argv


@pytest.mark.parametrize("arg", ["--api-sock", "--api-sock=/x.sock", "--id"])
def test_jailer_argv_refuses_firecracker_options_the_plan_sets(arg: str) -> None:
    with pytest.raises(BadRequest, match="is set by the jail plan"):
        jailer_argv(plan(), [arg, "x"])


# -- staging ---------------------------------------------------------------------------------------------


def by_source(ops: list[StageOp]) -> dict[str, StageOp]:
    return {op.source or op.target: op for op in ops}


def test_stage_on_the_jail_filesystem_links_files_and_mknods_block_devices() -> None:
    p = plan()
    root = p.chroot_dir
    ops = files_to_stage(p, host_config(), stat=usual_fs())
    assert ops[0] == StageOp(StageKind.MKDIR, root, mode=0o700)
    assert ops[1:] == [
        # The jailer copies the binary again over this copy (it opens it for writing and refuses a link).
        StageOp(StageKind.COPY, f"{root}/firecracker", source="/usr/local/bin/firecracker", mode=0o500,
                uid=UID, gid=GID),
        StageOp(StageKind.LINK, f"{root}/vmlinux", source="/var/lib/banger/kernels/k1/vmlinux"),
        StageOp(StageKind.LINK, f"{root}/initrd.img", source="/var/lib/banger/kernels/k1/initrd.img"),
        StageOp(
            StageKind.MKNOD,
            f"{root}/banger-0a1b2c3d",
            mode=0o400,
            uid=UID,
            gid=GID,
            node="block",
            major=253,
            minor=7,
        ),
        StageOp(StageKind.LINK, f"{root}/work.ext4", source="/var/lib/banger/vms/0a1b2c3d/work.ext4"),
        StageOp(StageKind.TOUCH, f"{root}/firecracker.log", mode=0o600, uid=UID, gid=GID),
        StageOp(StageKind.TOUCH, f"{root}/metrics.json", mode=0o600, uid=UID, gid=GID),
    ]


def test_every_target_is_inside_the_chroot_and_none_is_the_jailers() -> None:
    p = plan()
    ops = files_to_stage(p, host_config(), stat=usual_fs())
    jailer_own = {
        p.pid_file,
        p.api_socket_path,
        *(p.host_path(d) for d in ("/dev", "/run")),
    }
    assert [op for op in ops if op.target == p.jailed_exec_file] == [
        StageOp(StageKind.COPY, p.jailed_exec_file, source=p.exec_file, mode=0o500, uid=UID, gid=GID)]
    for op in ops:
        assert posixpath.commonpath([p.chroot_dir, op.target]) == p.chroot_dir, op
        assert op.target not in jailer_own, op
        assert not op.target.startswith(p.host_path("/dev") + "/"), op


def test_a_writable_block_device_gets_a_writable_node() -> None:
    cfg = host_config(drives=(Drive("rootfs", "/dev/mapper/banger-0a1b2c3d", True, False),))
    (node,) = [op for op in files_to_stage(plan(), cfg, stat=usual_fs()) if op.kind is StageKind.MKNOD]
    assert node.mode == 0o600


def test_on_another_filesystem_read_only_content_is_copied_and_owned_by_the_jail_user() -> None:
    fs = usual_fs()
    fs.entries["/var/lib/banger/kernels/k1/vmlinux"] = stat_result(stat.S_IFREG | 0o644, dev=OTHER_DEV)
    fs.entries["/img/base.ext4"] = stat_result(stat.S_IFREG | 0o644, dev=OTHER_DEV)
    cfg = host_config(initrd_path=None, drives=(Drive("rootfs", "/img/base.ext4", True, True),))
    ops = by_source(files_to_stage(plan(), cfg, stat=fs))
    root = plan().chroot_dir
    assert ops["/var/lib/banger/kernels/k1/vmlinux"] == StageOp(
        StageKind.COPY,
        f"{root}/vmlinux",
        source="/var/lib/banger/kernels/k1/vmlinux",
        mode=0o400,
        uid=UID,
        gid=GID,
    )
    assert ops["/img/base.ext4"].kind is StageKind.COPY


def test_a_copy_needs_read_access_the_jail_user_already_has() -> None:
    """Root copies for the jail user: a root-only file on another filesystem must not be handed out."""
    fs = usual_fs()
    fs.entries["/var/lib/banger/kernels/k1/vmlinux"] = stat_result(stat.S_IFREG | 0o600, uid=0, gid=0,
                                                                  dev=OTHER_DEV)
    with pytest.raises(BadRequest, match=r"kernel .* is not readable by the jail user 1000:1001"):
        files_to_stage(plan(), host_config(), stat=fs)


def test_a_writable_disk_on_another_filesystem_is_refused_not_copied() -> None:
    fs = usual_fs()
    fs.entries["/var/lib/banger/vms/0a1b2c3d/work.ext4"] = stat_result(
        stat.S_IFREG | 0o600, dev=OTHER_DEV, uid=UID
    )
    with pytest.raises(BadRequest, match="is writable and on another filesystem than the jail") as info:
        files_to_stage(plan(), host_config(), stat=fs)
    assert info.value.hint == "keep VM disks on the same filesystem as jailer_chroot_base"


def test_a_hard_link_needs_access_the_jail_user_already_has() -> None:
    fs = usual_fs()
    fs.entries["/var/lib/banger/kernels/k1/vmlinux"] = stat_result(stat.S_IFREG | 0o600, uid=0, gid=0)
    with pytest.raises(
        BadRequest, match=r"kernel .* is not readable by the jail user 1000:1001 \(owner 0:0, mode 0600\)"
    ):
        files_to_stage(plan(), host_config(), stat=fs)
    # A writable disk must be writable, not merely readable.
    fs = usual_fs()
    fs.entries["/var/lib/banger/vms/0a1b2c3d/work.ext4"] = stat_result(stat.S_IFREG | 0o644, uid=0, gid=0)
    with pytest.raises(BadRequest, match="is not read and writeable by the jail user"):
        files_to_stage(plan(), host_config(), stat=fs)
    # Group access counts when the file's group is the jail's group.
    fs = usual_fs()
    fs.entries["/var/lib/banger/vms/0a1b2c3d/work.ext4"] = stat_result(stat.S_IFREG | 0o660, uid=0, gid=GID)
    assert files_to_stage(plan(), host_config(), stat=fs)


@pytest.mark.parametrize(
    ("path", "entry", "message"),
    [
        (
            "/var/lib/banger/vms/0a1b2c3d/work.ext4",
            stat_result(stat.S_IFCHR | 0o666),
            "neither a block device nor",
        ),
        (
            "/var/lib/banger/vms/0a1b2c3d/work.ext4",
            stat_result(stat.S_IFDIR | 0o777),
            "neither a block device nor",
        ),
        ("/var/lib/banger/kernels/k1/vmlinux", stat_result(stat.S_IFBLK | 0o666), "is not a regular file"),
    ],
)
def test_unsupported_file_types_are_refused(path: str, entry: os.stat_result, message: str) -> None:
    fs = usual_fs()
    fs.entries[path] = entry
    with pytest.raises(BadRequest, match=message):
        files_to_stage(plan(), host_config(), stat=fs)


def test_a_missing_file_is_a_clear_error() -> None:
    fs = usual_fs()
    del fs.entries["/var/lib/banger/kernels/k1/initrd.img"]
    with pytest.raises(
        BadRequest,
        match=r"initrd '/var/lib/banger/kernels/k1/initrd.img' cannot be staged into the jail: No such file",
    ):
        files_to_stage(plan(), host_config(), stat=fs)


def test_two_host_files_with_one_name_are_refused() -> None:
    fs = usual_fs()
    fs.entries["/other/vmlinux"] = stat_result(stat.S_IFREG | 0o666, uid=UID)
    cfg = host_config(drives=(Drive("data", "/other/vmlinux", False, False),))
    with pytest.raises(BadRequest, match="two host files would both enter the jail as 'vmlinux'"):
        files_to_stage(plan(), cfg, stat=fs)
    # The vsock socket is created by Firecracker, but its name must not collide either.
    cfg = host_config(vsock=Vsock(3, "/elsewhere/work.ext4"))
    with pytest.raises(BadRequest, match=re.escape("'work.ext4'")):
        files_to_stage(plan(), cfg, stat=usual_fs())


def test_staging_with_real_files(tmp_path: Path) -> None:
    """The default `stat` on real files: same filesystem, so hard links; the jail base need not exist."""
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    kernel.chmod(0o644)
    work = tmp_path / "work.ext4"
    work.write_bytes(b"")
    work.chmod(0o666)
    p = plan(chroot_base=str(tmp_path / "jail"))
    cfg = host_config(
        kernel_path=str(kernel),
        initrd_path=None,
        drives=(Drive("work", str(work), True, False),),
        vsock=None,
        log_path=None,
        metrics_path=None,
    )
    ops = files_to_stage(p, cfg)
    assert [(op.kind, op.source) for op in ops] == [
        (StageKind.MKDIR, None),
        (StageKind.COPY, "/usr/local/bin/firecracker"),
        (StageKind.LINK, str(kernel)),
        (StageKind.LINK, str(work)),
    ]


def test_jailed_config_names_only_in_jail_paths() -> None:
    p = plan()
    jailed = jailed_config(p, host_config())
    assert jailed.kernel_path == "/vmlinux"
    assert jailed.initrd_path == "/initrd.img"
    assert [d.path_on_host for d in jailed.drives] == ["/banger-0a1b2c3d", "/work.ext4"]
    assert jailed.vsock == Vsock(42, "/vsock.sock")
    assert (jailed.log_path, jailed.metrics_path) == ("/firecracker.log", "/metrics.json")
    assert jailed.net == host_config().net
    # What Firecracker is told matches what was staged: every file it opens is a staged target.
    staged = {op.target for op in files_to_stage(p, host_config(), stat=usual_fs())}
    for _, _, body in request_bodies(jailed):
        for key in ("kernel_image_path", "initrd_path", "path_on_host", "log_path", "metrics_path"):
            if key in body:
                assert p.host_path(body[key]) in staged, body


# -- the binary the jailer copies -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (stat_result(stat.S_IFREG | 0o755), None),
        (stat_result(stat.S_IFREG | 0o775), "must be owned by root and not group/world-writable"),
        (stat_result(stat.S_IFREG | 0o757), "must be owned by root and not group/world-writable"),
        (stat_result(stat.S_IFREG | 0o755, uid=UID), r"\(owner uid 1000, mode 0755\)"),
        (stat_result(stat.S_IFLNK | 0o777), "is not a regular file"),
        # Its copy in the jail belongs to the jail user: a file only root may read is not handed out.
        (stat_result(stat.S_IFREG | 0o750), r"must be readable and executable by everyone \(mode 0750\)"),
        (stat_result(stat.S_IFREG | 0o711), "must be readable and executable by everyone"),
        (stat_result(stat.S_IFREG | 0o555), None),
    ],
)
def test_validate_exec_file(entry: os.stat_result, message: str | None) -> None:
    def lstat(path: str) -> os.stat_result:
        return entry

    if message is None:
        validate_exec_file("/usr/local/bin/firecracker", lstat=lstat)
    else:
        with pytest.raises(BadRequest, match=message):
            validate_exec_file("/usr/local/bin/firecracker", lstat=lstat)


def test_validate_exec_file_on_real_files(tmp_path: Path) -> None:
    missing = tmp_path / "firecracker"
    with pytest.raises(BadRequest, match="cannot be read: No such file or directory"):
        validate_exec_file(str(missing))
    missing.write_bytes(b"")
    link = tmp_path / "fc-link"
    link.symlink_to(missing)
    with pytest.raises(BadRequest, match="is not a regular file"):
        validate_exec_file(str(link))
