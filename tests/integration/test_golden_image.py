"""Golden images with real tools: guest files and the work seed through mkfs/debugfs, mmdebstrap's failure
path, and (marker `network`) the real debian-bookworm build from deb.debian.org, directly and through the
embedded daemon.

Everything is checked without mounting, through debugfs. BANGER_TEST_CACHE=<dir> (default
/var/tmp/banger-test-cache) keeps the mmdebstrap tarball and the kernel .deb between runs, so only the
first run pays for mmdebstrap.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger.errors import BangerError, NotFound
from banger.images import ext4
from banger.images.golden import Canceled, GoldenResult, GoldenVariant, build_golden
from banger.images.guestfiles import guest_files
from banger.images.inject import inject
from banger.images.workseed import build_work_seed
from tests.embedded import BANGER, REPO, Embedded
from tests.integration.conftest import SystemUser

MIRROR = "http://deb.debian.org/debian"
DEAD_MIRROR = "http://127.0.0.1:9/debian"  # nothing listens on the discard port
PACKAGE_FILES = Path(__file__).resolve().parents[2] / "src/banger/guest/files"
BOOKWORM = GoldenVariant(name="debian-bookworm", suite="bookworm", variant="base", kernel_ref="debian-12-cloud")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mmdebstrap and embedded mode run as root here")


def cache_dir() -> Path:
    return Path(os.environ.get("BANGER_TEST_CACHE") or "/var/tmp/banger-test-cache")


class Recorder:
    def __init__(self) -> None:
        self.stages: list[str] = []
        self.details: list[str] = []

    def stage(self, name: str) -> None:
        self.stages.append(name)

    def detail(self, text: str) -> None:
        self.details.append(text)


# --- guest files and the work seed on small images ---------------------------------------------------------


def test_guest_files_land_exactly(tmp_path: Path) -> None:
    image = tmp_path / "img.ext4"
    ext4.make_empty_ext4(image, 32 << 20, label="rootfs")
    files = guest_files()
    inject(image, files)
    for f in files:
        info = ext4.inode_info(image, f.path)
        assert (info.uid, info.gid) == (0, 0), f.path
        if f.kind == "file":
            assert info.mode == stat.S_IFREG | f.mode, f.path
            assert ext4.read_file(image, f.path) == f.data, f.path
        elif f.kind == "dir":
            assert info.mode == stat.S_IFDIR | f.mode, f.path
        else:
            assert stat.S_ISLNK(info.mode) and info.target == f.target, f.path
    init = ext4.read_file(image, "/usr/local/libexec/banger-init")
    assert init == (PACKAGE_FILES / "banger-init").read_bytes()
    # Parents made on the way are root:root 0755.
    assert ext4.stat(image, "/usr/local/libexec") == (0, 0, stat.S_IFDIR | 0o755)
    assert subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True).returncode == 0


def _rootfs_with_home(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    root = tree / "root"
    (root / ".ssh").mkdir(parents=True)
    (root / ".ssh").chmod(0o700)
    (root / ".bashrc").write_text("# bashrc\n")
    (root / ".profile").write_text("# profile\n")
    (root / ".profile").chmod(0o600)
    (root / ".config" / "tool").mkdir(parents=True)
    (root / ".config" / "tool" / "conf").write_bytes(os.urandom(3000))
    (root / "link").symlink_to(".bashrc")
    os.mkfifo(root / "fifo")
    image = tmp_path / "rootfs.ext4"
    ext4.build_ext4(tree, image, size_bytes=64 << 20)
    return image


def test_work_seed_copies_root_as_root(tmp_path: Path) -> None:
    image = _rootfs_with_home(tmp_path)
    seed = tmp_path / "work-seed.ext4"
    work = tmp_path / "work"
    work.mkdir()
    assert build_work_seed(image, seed, work) is True
    assert ext4.read_file(seed, "/.bashrc") == b"# bashrc\n"
    assert ext4.stat(seed, "/.bashrc") == (0, 0, stat.S_IFREG | 0o644)
    assert ext4.stat(seed, "/.profile") == (0, 0, stat.S_IFREG | 0o600)
    assert ext4.stat(seed, "/.ssh") == (0, 0, stat.S_IFDIR | 0o700)
    conf = ext4.read_file(seed, "/.config/tool/conf")
    assert conf == ext4.read_file(image, "/root/.config/tool/conf") and len(conf) == 3000
    for skipped in ("/link", "/fifo"):  # symlinks and specials are not carried over
        with pytest.raises(NotFound):
            ext4.stat(seed, skipped)
    assert ext4.stat(seed, "/") == (0, 0, stat.S_IFDIR | 0o755)  # what sshd's StrictModes wants
    assert seed.stat().st_size == 64 << 20
    assert list(work.iterdir()) == []  # the rdump scratch is gone
    assert subprocess.run(["e2fsck", "-fn", str(seed)], capture_output=True).returncode == 0


def test_work_seed_failure_is_false_and_leaves_nothing(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    image = tmp_path / "rootfs.ext4"
    ext4.build_ext4(tree, image, size_bytes=16 << 20)
    seed = tmp_path / "work-seed.ext4"
    assert build_work_seed(image, seed, tmp_path) is False  # no /root in this image
    assert not seed.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rootfs.ext4", "tree"]


# --- mmdebstrap failing ------------------------------------------------------------------------------------


@needs_root
def test_mmdebstrap_failure_is_one_line_with_its_tail(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    rec = Recorder()
    with pytest.raises(BangerError) as exc:
        build_golden(BOOKWORM, DEAD_MIRROR, work, out, cache_dir=tmp_path / "cache", reporter=rec)
    message = str(exc.value)
    assert message.startswith("mmdebstrap failed with exit status ")
    assert "127.0.0.1" in message and "\n" not in message
    assert exc.value.hint == f"check that {DEAD_MIRROR} is reachable and serves bookworm"
    assert (work / "mmdebstrap.log").read_text().strip()
    assert rec.stages == ["building root filesystem (mmdebstrap)"]
    assert list(out.iterdir()) == []
    assert not (tmp_path / "cache").exists()  # nothing cached from a failed build


@needs_root
def test_without_root_says_what_is_missing(tmp_path: Path, foreign_user: SystemUser) -> None:
    tmp_path.chmod(0o755)
    work, out = tmp_path / "work", tmp_path / "out"
    for d in (work, out):
        d.mkdir()
        os.chown(d, foreign_user.uid, foreign_user.gid)
    code = (
        "import sys\nfrom pathlib import Path\nfrom banger.errors import BangerError\n"
        "from banger.images.golden import GoldenVariant, build_golden\n"
        "v = GoldenVariant('debian-bookworm', 'bookworm', 'base', 'debian-12-cloud')\n"
        f"try:\n    build_golden(v, {DEAD_MIRROR!r}, Path({str(work)!r}), Path({str(out)!r}), cache_dir=None)\n"
        "except BangerError as exc:\n    print(exc.message)\n    print(exc.hint)\n    sys.exit(3)\n"
    )
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO / "src"), "HOME": str(tmp_path)}
    proc = subprocess.run(foreign_user.argv([sys.executable, "-c", code]), capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    message, hint = proc.stdout.splitlines()
    assert message.startswith("cannot build debian-bookworm without root: ")
    problem = message.split(": ", 1)[1]
    # Which one is missing depends on the host; each is named precisely.
    assert (problem.startswith("unprivileged user namespaces are disabled")
            or problem == f"user {foreign_user.name} has no subordinate id range in /etc/subuid"
            or problem == f"user {foreign_user.name} has no subordinate id range in /etc/subgid"
            or problem == "newuidmap/newgidmap are missing (Debian package uidmap)"), problem
    assert "usermod --add-subuids" in hint
    assert list(work.iterdir()) == [] and list(out.iterdir()) == []


@needs_root
def test_failed_pull_through_the_daemon_leaves_nothing(tmp_path: Path) -> None:
    emb = Embedded()
    try:
        emb.config_file.parent.mkdir(parents=True)
        emb.config_file.write_text(f'kernel_mirror = "{DEAD_MIRROR}"\n')
        # A kernel row, so the pull goes straight to mmdebstrap (which then cannot reach the mirror).
        emb.python(
            "from banger import model, paths\nfrom banger.store import db, kernels\n"
            "store = db.open_db(paths.resolve_user().db_path)\n"
            "kernels.upsert_kernel(store, model.KernelRecord(name='debian-12-cloud', distro='debian', "
            "arch='amd64', kernel_version='6.1', source='test', sha256='0' * 64, imported_at=db.utc_now(), "
            "vmlinux_path='/nonexistent'))\n"
        )
        proc = emb.run("image", "pull", "debian-bookworm", timeout=300)
        assert proc.returncode != 0
        last = proc.stderr.strip().splitlines()[-1]
        assert "mmdebstrap failed with exit status" in last and "Traceback" not in proc.stderr
        assert json.loads(emb.run("image", "list", "--json", check=True).stdout) == []
        images_dir = emb.state_dir / "images"
        assert not images_dir.exists() or list(images_dir.iterdir()) == []
        unknown = emb.run("image", "pull", "debian-sid")
        assert unknown.returncode != 0
        assert "no image named 'debian-sid' in the catalog" in unknown.stderr
    finally:
        emb.close()


# --- the real thing ----------------------------------------------------------------------------------------


def _build(tmp_path: Path, label: str) -> tuple[GoldenResult, Recorder, float]:
    work, out = tmp_path / f"work-{label}", tmp_path / f"out-{label}"
    work.mkdir()
    out.mkdir()
    rec = Recorder()
    started = time.monotonic()
    result = build_golden(BOOKWORM, MIRROR, work, out, cache_dir=cache_dir(), reporter=rec)
    return result, rec, time.monotonic() - started


@pytest.fixture(scope="module")
def bookworm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GoldenResult]:
    if os.geteuid() != 0:
        pytest.skip("mmdebstrap runs as root here")
    tmp = tmp_path_factory.mktemp("golden")
    result, rec, seconds = _build(tmp, "first")
    lines = [f"{'cached' if result.cached else 'cold'} build: {seconds:.1f}s "
             + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())]
    assert rec.stages == ["building root filesystem (mmdebstrap)", "making ext4", "injecting guest files",
                          "work seed"]
    if not result.cached:
        # The second build must reuse the tarball the first one cached.
        again, _, seconds = _build(tmp, "again")
        assert again.cached is True
        assert again.manifest["built_at"] == result.manifest["built_at"]
        lines.append(f"cached build: {seconds:.1f}s " + ", ".join(f"{k} {v:.1f}s" for k, v in again.timings.items()))
    sizes = {p.name: (p.stat().st_size >> 20, p.stat().st_blocks * 512 >> 20) for p in result.directory.iterdir()
             if p.suffix == ".ext4"}
    lines.append("sizes (MiB apparent/allocated): " + ", ".join(f"{n} {a}/{b}" for n, (a, b) in sizes.items()))
    print("\n[debian-bookworm golden] " + "\n  ".join(lines))
    yield result


@pytest.mark.network
def test_bundle_layout_and_manifest(bookworm: GoldenResult) -> None:
    assert sorted(p.name for p in bookworm.directory.iterdir()) == ["manifest.json", "rootfs.ext4",
                                                                    "work-seed.ext4"]
    manifest = json.loads(bookworm.manifest_path.read_text())
    assert manifest == bookworm.manifest
    assert {k: manifest[k] for k in ("name", "distro", "suite", "arch", "variant", "kernel_ref", "init")} == {
        "name": "debian-bookworm", "distro": "debian", "suite": "bookworm", "arch": "amd64", "variant": "base",
        "kernel_ref": "debian-12-cloud", "init": "fast",
    }
    assert manifest["packages"] == list(BOOKWORM.packages)
    assert manifest["installed_packages"] > 100
    assert time.strptime(manifest["built_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert manifest["work_seed"] is True
    cached = list(cache_dir().glob(f"golden-debian-bookworm-amd64-{BOOKWORM.cache_key()[:16]}.tar.zst"))
    assert len(cached) == 1
    digest = hashlib.sha256(cached[0].read_bytes()).hexdigest()
    assert manifest["tarball_sha256"] == digest


@pytest.mark.network
def test_owners_and_modes_survive(bookworm: GoldenResult) -> None:
    image = bookworm.rootfs
    assert ext4.stat(image, "/usr/bin/sudo") == (0, 0, stat.S_IFREG | 0o4755)
    shadow = ext4.stat(image, "/etc/shadow")
    assert (shadow.uid, shadow.mode) == (0, stat.S_IFREG | 0o640)
    group = ext4.read_file(image, "/etc/group").decode()
    assert f"shadow:x:{shadow.gid}:" in group  # root:shadow, by the image's own group table
    assert ext4.stat(image, "/root") == (0, 0, stat.S_IFDIR | 0o700)
    assert ext4.stat(image, "/tmp") == (0, 0, stat.S_IFDIR | 0o1777)
    assert ext4.stat(image, "/") == (0, 0, stat.S_IFDIR | 0o755)


@pytest.mark.network
def test_guest_files_and_first_boot_state(bookworm: GoldenResult) -> None:
    image = bookworm.rootfs
    for name in ("banger-init", "banger-fast-init", "banger-network"):
        path = f"/usr/local/libexec/{name}"
        assert ext4.stat(image, path) == (0, 0, stat.S_IFREG | 0o755)
        assert ext4.read_file(image, path) == (PACKAGE_FILES / name).read_bytes()
    listing = subprocess.run(["debugfs", "-R", "ls /etc/ssh", str(image)], capture_output=True, text=True,
                             check=True).stdout
    assert "sshd_config" in listing and "ssh_host_" not in listing  # every VM makes its own keys
    fstab = ext4.read_file(image, "/etc/fstab").decode()
    assert "/dev/vdc /root ext4 defaults,noatime,nofail 0 0" in fstab.splitlines()
    assert ext4.read_file(image, "/etc/machine-id") == b""
    assert ext4.read_file(image, "/etc/hostname") == b"debian\n"  # not the build host's
    with pytest.raises(NotFound):
        ext4.stat(image, "/etc/resolv.conf")
    shadow = dict(line.split(":")[:2] for line in ext4.read_file(image, "/etc/shadow").decode().splitlines())
    assert shadow["root"].startswith("!")  # locked: root logs in by key only
    assert ext4.stat(image, "/etc/ssh/sshd_config.d/banger.conf") == (0, 0, stat.S_IFREG | 0o644)
    units = "/etc/systemd/system"
    assert ext4.inode_info(image, f"{units}/multi-user.target.wants/banger-network.service").target == (
        f"{units}/banger-network.service")
    assert ext4.inode_info(image, f"{units}/ctrl-alt-del.target").target == "/lib/systemd/system/poweroff.target"
    # Tools the scripts and users rely on.
    for tool in ("/usr/bin/python3", "/usr/sbin/sshd", "/usr/bin/ssh-keygen", "/usr/sbin/ip", "/usr/bin/git",
                 "/usr/bin/curl", "/usr/bin/jq", "/lib/systemd/systemd"):
        info = ext4.inode_info(image, tool)
        assert stat.S_ISREG(info.mode) or stat.S_ISLNK(info.mode), tool
    with pytest.raises(NotFound):  # apt lists are cleaned
        ext4.stat(image, "/var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease")


@pytest.mark.network
def test_images_are_fsck_clean(bookworm: GoldenResult) -> None:
    assert bookworm.work_seed is not None
    for image in (bookworm.rootfs, bookworm.work_seed):
        proc = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.network
def test_work_seed_has_roots_files(bookworm: GoldenResult) -> None:
    seed = bookworm.work_seed
    assert seed is not None and seed.name == "work-seed.ext4"
    for name in (".bashrc", ".profile"):
        assert ext4.read_file(seed, f"/{name}") == ext4.read_file(bookworm.rootfs, f"/root/{name}")
        assert ext4.stat(seed, f"/{name}") == (0, 0, stat.S_IFREG | 0o644)


@pytest.mark.network
@needs_root
def test_cancel_kills_mmdebstrap_and_leaves_no_mounts(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    cancel = threading.Event()

    class CancelOnFirstDetail(Recorder):
        def detail(self, text: str) -> None:
            super().detail(text)
            cancel.set()

    rec = CancelOnFirstDetail()
    started = time.monotonic()
    with pytest.raises(Canceled):
        build_golden(BOOKWORM, MIRROR, work, out, cache_dir=None, reporter=rec, cancel=cancel)
    assert time.monotonic() - started < 30
    assert rec.details  # it was mmdebstrap's progress that triggered the cancel
    assert str(work) not in Path("/proc/self/mounts").read_text()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert str(work).encode() not in cmdline.read_bytes(), f"{cmdline.parent.name} still runs"
        except (FileNotFoundError, ProcessLookupError):
            continue
    assert list(out.iterdir()) == []


# --- through the daemon ------------------------------------------------------------------------------------


def _link_files(src: Path, dest: Path, patterns: tuple[str, ...]) -> None:
    """Hard-link (or copy) the cache files matching `patterns` from `src` into `dest` if missing there."""
    if not src.is_dir():
        return
    dest.mkdir(parents=True, exist_ok=True)
    for pattern in patterns:
        for path in src.glob(pattern):
            target = dest / path.name
            if target.exists() or not path.is_file():
                continue
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)


CACHE_PATTERNS = ("golden-debian-bookworm-amd64-*", "*.deb")


@pytest.mark.network
@needs_root
def test_pull_through_the_daemon() -> None:
    emb = Embedded()
    downloads = emb.root / "cache/banger/downloads"
    _link_files(cache_dir(), downloads, CACHE_PATTERNS)
    try:
        assert json.loads(emb.run("image", "list", "--json", check=True).stdout) == []  # starts the daemon
        started = time.monotonic()
        pulls = [subprocess.Popen([*BANGER, "image", "pull", "debian-bookworm", "--json"], env=emb.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
                 for _ in range(2)]
        outputs = [p.communicate(timeout=1200) for p in pulls]
        seconds = time.monotonic() - started
        for p, (_out, err) in zip(pulls, outputs, strict=True):
            assert p.returncode == 0, err
        results = [json.loads(out) for out, _ in outputs]
        assert results[0] == results[1]  # the second pull joined the first
        assert all("image debian-bookworm: done in" in err for _, err in outputs)
        ops = json.loads(emb.python(
            "import json\nfrom banger.cli.lifecycle import target\nfrom banger.rpc import client\n"
            "print(json.dumps(client.call(target().socket, 'daemon.operations.list', {})))\n"))["operations"]
        pulls_done = [op for op in ops if op["kind"] == "image.pull"]
        assert len(pulls_done) == 1 and pulls_done[0]["target"] == "debian-bookworm"
        stages = [s["name"] for s in pulls_done[0]["stages"]]
        assert stages[-5:] == ["building root filesystem (mmdebstrap)", "making ext4", "injecting guest files",
                               "work seed", "registering"]
        images = json.loads(emb.run("image", "list", "--json", check=True).stdout)
        assert [i["name"] for i in images] == ["debian-bookworm"]

        shown = json.loads(emb.run("image", "show", "debian-bookworm", "--json", check=True).stdout)
        assert shown == results[0]
        assert shown["kernel_ref"] == "debian-12-cloud" and shown["managed"] is True
        assert shown["source"] == "golden:debian-bookworm"
        assert shown["extra"]["init"] == "fast" and shown["extra"]["suite"] == "bookworm"
        image_dir = emb.state_dir / "images" / shown["id"]
        assert shown["rootfs_path"] == str(image_dir / "rootfs.ext4")
        assert shown["work_seed_path"] == str(image_dir / "work-seed.ext4")
        assert sorted(p.name for p in image_dir.iterdir()) == ["manifest.json", "rootfs.ext4", "work-seed.ext4"]
        assert sorted(p.name for p in (emb.state_dir / "images").iterdir()) == [shown["id"]]  # no staging left
        kernels = json.loads(emb.run("kernel", "list", "--json", check=True).stdout)
        assert [k["name"] for k in kernels] == ["debian-12-cloud"]  # pulled on the way
        # The text form names the boot files the kernel reference resolves to, and the work seed.
        text = emb.run("image", "show", "debian-bookworm", check=True).stdout
        rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in text.splitlines())
        kdir = emb.state_dir / "kernels" / "debian-12-cloud"
        assert rows["kernel path"] == f"{kdir / 'vmlinux'} (kernel debian-12-cloud)"
        assert rows["initrd path"] == f"{kdir / 'initrd.img'} (kernel debian-12-cloud)"
        assert rows["work seed path"] == str(image_dir / "work-seed.ext4")

        again = emb.run("image", "pull", "debian-bookworm")
        assert again.returncode != 0
        assert "image 'debian-bookworm' already exists" in again.stderr
        assert "banger image delete debian-bookworm" in again.stderr

        # A VM using the image blocks its deletion.
        vm_id = "f" * 32
        store = ("from banger import model, paths\nfrom banger.store import db, vms\n"
                 "store = db.open_db(paths.resolve_user().db_path)\nnow = db.utc_now()\n")
        emb.python(
            store + "spec = model.VmSpec(vcpu=1, memory_mib=512, disk_size_bytes=1 << 30, "
            "system_overlay_size_bytes=1 << 30)\n"
            f"vms.insert_vm(store, model.VmRecord(id={vm_id!r}, name='user-vm', image_id={shown['id']!r}, "
            "image_name='debian-bookworm', state=model.VmState.STOPPED, spec=spec, guest_ip='172.16.0.9', "
            "created_at=now, updated_at=now))\n"
        )
        refused = emb.run("image", "delete", "debian-bookworm")
        assert refused.returncode != 0 and "is used by 1 vm(s): user-vm" in refused.stderr
        assert image_dir.is_dir()
        emb.python(store + f"vms.delete_vm(store, {vm_id!r})\n")
        deleted = emb.run("image", "rm", shown["id"][:8], check=True)
        assert deleted.stdout.strip() == f"deleted image debian-bookworm ({shown['id'][:8]})"
        assert json.loads(emb.run("image", "list", "--json", check=True).stdout) == []
        assert list((emb.state_dir / "images").iterdir()) == []
        print(f"\n[image pull through the daemon, two coalesced clients: {seconds:.1f}s]")
    finally:
        _link_files(downloads, cache_dir(), CACHE_PATTERNS)  # warm the shared cache for the next run
        emb.close()

