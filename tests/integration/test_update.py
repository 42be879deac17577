"""`banger update` for real: releases built from this checkout by scripts/make-release (0.0.1, 0.0.2 and
0.0.2-baddoctor), signed with a test key, served by an HTTP server on 127.0.0.1, applied by the
installed 0.0.1 to a system install under BANGER_SYSTEM_PREFIX with a real unprivileged owner.

How the doctor failure is produced: 0.0.2-baddoctor is this checkout built with
`make-release --test-fault doctor`, which writes TEST_FAULT = "doctor" into that build's
banger/_build.py; its `banger doctor` then reports the row "release build" as FAIL. Nothing else differs.

The last test runs a real VM (QEMU) through such an install, kept in a network namespace of its own with
its bridge, taps, DNS server and release server, and updates (rolled back, then for real) under it.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.server
import io
import json
import os
import secrets
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from banger.system.download import sha256_file
from banger.update import release
from tests.e2e.banger_env import CONFIG, debian_kernel_files, golden_tarball, qemu_pids_under
from tests.integration.conftest import SystemUser
from tests.integration.test_system_install import (
    REPO,
    Host,
    ReleaseSet,
    _alive,
    destroy,
    new_host,
    release_set,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="needs root: a system install, a real owner user")

OVERSIZE = (256 << 20) + (1 << 20)


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/stream/") and self.path.endswith(".tar.gz"):
            # No Content-Length: the client learns the size only by counting what arrives.
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            self.close_connection = True
            chunk = b"\0" * (1 << 20)
            try:
                for _ in range(OVERSIZE // len(chunk)):
                    self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        super().do_GET()


@dataclass
class Site:
    """A copy of the release set served over HTTP, to be altered by one test."""

    root: Path
    url: str
    keys: ReleaseSet

    @property
    def manifest_url(self) -> str:
        return f"{self.url}/manifest.json"

    def manifest(self) -> dict[str, object]:
        data = json.loads((self.root / "manifest.json").read_text())
        assert isinstance(data, dict)
        return data

    def write_manifest(self, data: dict[str, object]) -> None:
        (self.root / "manifest.json").write_text(json.dumps(data))

    def republish(self, version: str, tarball_bytes: bytes) -> None:
        """Replace a version's archive, sign a new SHA256SUMS with the test key, update the manifest."""
        d = self.root / version
        name = f"banger-{version}-linux-amd64.tar.gz"
        (d / name).write_bytes(tarball_bytes)
        built = release.BuiltRelease(d / name, sha256_file(d / name), len(tarball_bytes),
                                     _info_of(d / name))
        release.publish_dir(built, self.root, self.keys.private_key.read_bytes(), latest=None)


def _info_of(tarball: Path) -> release.ReleaseInfo:
    from banger.update.stage import parse_release_json

    with tarfile.open(tarball) as tar:
        handle = tar.extractfile("release.json")
        assert handle is not None
        return parse_release_json(handle.read())


def _repack(src: Path, *, drop: str | None = None, extra: dict[str, bytes] | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(src) as tin, tarfile.open(fileobj=out, mode="w:gz") as tout:
        for member in tin:
            if member.name != drop:
                tout.addfile(member, tin.extractfile(member) if member.isfile() else None)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    return out.getvalue()


@contextlib.contextmanager
def _in_netns(ns: str | None) -> Iterator[None]:
    """This thread in network namespace `ns` meanwhile (None: stay); sockets made there stay there."""
    if ns is None:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    clone_newnet = 0x40000000
    with open(f"/run/netns/{ns}") as target, open("/proc/thread-self/ns/net") as home:
        if libc.setns(target.fileno(), clone_newnet) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), clone_newnet) != 0:
                raise OSError(ctypes.get_errno(), "setns back into the test's namespace")


@contextlib.contextmanager
def serve_site(keys: ReleaseSet, root: Path, ns: str | None = None) -> Iterator[Site]:
    """The release set copied to `root` and served on 127.0.0.1 (of network namespace `ns` if given)."""
    shutil.copytree(keys.root, root)  # a copy: tests alter it; the session's release set stays intact
    handler = lambda *a: _Handler(*a, directory=str(root))  # noqa: E731
    with _in_netns(ns):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Site(root, f"http://127.0.0.1:{server.server_address[1]}", keys)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def site(release_set: ReleaseSet, tmp_path: Path) -> Iterator[Site]:  # noqa: F811
    with serve_site(release_set, tmp_path / "site") as served:
        yield served


@pytest.fixture
def host(owner_user: SystemUser, release_set: ReleaseSet) -> Iterator[Host]:  # noqa: F811
    h = new_host(owner_user)
    try:
        h.install_from(release_set.tarball("0.0.1"))
        assert h.ping()["version"] == "0.0.1"
        yield h
    finally:
        destroy(h)


def update(host: Host, site: Site, *args: str, user: SystemUser | None = None):  # type: ignore[no-untyped-def]
    return host.run("update", "--manifest-url", site.manifest_url, "--pubkey-file", str(site.keys.public_key),
                    *args, user=user)


def error_line(proc: object) -> str:
    """The one error line (progress lines come before it on stderr)."""
    stderr = getattr(proc, "stderr", "")
    return str(stderr).strip().splitlines()[-1]


def assert_untouched(host: Host, before: dict[str, str], daemon_pid: int | None) -> None:
    assert host.snapshot() == before
    assert host.pid("bangerd") == daemon_pid and daemon_pid is not None and _alive(daemon_pid)
    assert host.ping()["version"] == "0.0.1"


def test_happy_path(host: Host, site: Site) -> None:
    old_dir, old_meta = host.current, host.meta()
    old_pids = (host.pid("bangerd-root"), host.pid("bangerd"))
    proc = update(host, site)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "updated banger v0.0.1 -> v0.0.2"
    assert "banger: running `banger doctor` as v0.0.2" in proc.stderr
    new_dir = host.current
    assert new_dir.name.startswith("0.0.2-") and new_dir != old_dir
    # Both services restarted, on the new version, the daemon still as the owner.
    new_pids = (host.pid("bangerd-root"), host.pid("bangerd"))
    assert None not in new_pids and new_pids[0] != old_pids[0] and new_pids[1] != old_pids[1]
    ping = host.ping()
    assert (ping["version"], ping["uid"]) == ("0.0.2", host.owner.uid)
    status = json.loads(host.run("system", "status", "--json", user=host.owner).stdout)
    assert status["helper"]["version"] == "0.0.2"
    # Only version, commit and build time change in install.toml.
    meta = host.meta()
    assert meta.version == "0.0.2" and meta.built_at != "" and meta.commit == old_meta.commit
    assert (meta.owner_user, meta.owner_uid, meta.installed_at) == (
        old_meta.owner_user, old_meta.owner_uid, old_meta.installed_at)
    # Backups and staging are gone; the replaced version stays (it was running this very update).
    leftovers = [p for p in host.prefix.rglob("*.previous")]
    assert leftovers == []
    assert not (host.prefix / "opt/banger/staging").exists()
    assert host.versions() == sorted([old_dir.name, new_dir.name])
    out = host.run("--version")
    assert out.stdout.startswith("banger v0.0.2 (commit ")
    check = update(host, site, "--check", user=host.owner)
    assert (check.returncode, check.stdout.strip()) == (0, "banger v0.0.2 is up to date")
    again = update(host, site)
    assert (again.returncode, again.stdout.strip()) == (0, "banger v0.0.2 is up to date")


def test_check_needs_no_root_and_changes_nothing(host: Host, site: Site) -> None:
    before, pid = host.snapshot(), host.pid("bangerd")
    proc = update(host, site, "--check", user=host.owner)
    assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (
        0, "update available: v0.0.1 -> v0.0.2 (run `sudo banger update`)", "")
    proc = update(host, site, "--check", "--to", "v0.0.2-baddoctor", user=host.owner)
    assert proc.stdout.strip() == ("update available: v0.0.1 -> v0.0.2-baddoctor "
                                   "(run `sudo banger update --to v0.0.2-baddoctor`)")
    refused = update(host, site, user=host.owner)
    assert (refused.returncode, refused.stderr.strip()) == (1, "banger: banger update needs root; "
                                                              "run `sudo banger update`")
    assert_untouched(host, before, pid)


def test_unknown_version_fails_before_any_change(host: Host, site: Site) -> None:
    before, pid = host.snapshot(), host.pid("bangerd")
    proc = update(host, site, "--to", "v9.9.9")
    assert (proc.returncode, proc.stderr.strip()) == (
        1, "banger: version v9.9.9 is not in the release manifest (known: v0.0.1, v0.0.2-baddoctor, v0.0.2)")
    assert_untouched(host, before, pid)
    assert not (host.prefix / "opt/banger/staging").exists()


def test_unknown_schema_is_refused(host: Host, site: Site) -> None:
    before, pid = host.snapshot(), host.pid("bangerd")
    site.write_manifest({**site.manifest(), "schema_version": 2})
    proc = update(host, site)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"banger: {site.manifest_url} has schema_version 2; this banger understands only 1; "
        "a newer banger is needed to read it: install the latest release by hand")
    assert_untouched(host, before, pid)


def test_bad_signature_is_refused(host: Host, site: Site, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    before, pid = host.snapshot(), host.pid("bangerd")
    intruder = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    sums = (site.root / "0.0.2/SHA256SUMS").read_bytes()
    (site.root / "0.0.2/SHA256SUMS.sig").write_bytes(release.sign(sums, intruder))
    proc = update(host, site)
    assert proc.returncode == 1
    assert error_line(proc) == (
        "banger: SHA256SUMS signature does not verify with banger's release key; refusing this release; the "
        "release or its download was tampered with, or it was not signed by banger's maintainers")
    assert_untouched(host, before, pid)
    assert sorted(p.name for p in (host.prefix / "opt/banger/staging").iterdir()) == [
        "SHA256SUMS", "SHA256SUMS.sig"]  # the archive was never fetched
    # The real signature is accepted by the test key but not by the compiled-in release key.
    proc = host.run("update", "--manifest-url", site.manifest_url)
    assert "does not verify with banger's release key" in proc.stderr


def test_checksum_mismatch_is_refused_and_the_partial_file_removed(host: Host, site: Site) -> None:
    before, pid = host.snapshot(), host.pid("bangerd")
    path = site.root / "0.0.2/banger-0.0.2-linux-amd64.tar.gz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the digest can tell
    path.write_bytes(bytes(data))
    proc = update(host, site)
    assert proc.returncode == 1
    assert "banger-0.0.2-linux-amd64.tar.gz: sha256 mismatch: expected " in proc.stderr
    assert_untouched(host, before, pid)
    assert sorted(p.name for p in (host.prefix / "opt/banger/staging").iterdir()) == [
        "SHA256SUMS", "SHA256SUMS.sig"]


def test_extra_archive_entry_is_refused(host: Host, site: Site) -> None:
    before, pid = host.snapshot(), host.pid("bangerd")
    tarball = site.root / "0.0.2/banger-0.0.2-linux-amd64.tar.gz"
    site.republish("0.0.2", _repack(tarball, extra={"postinst.sh": b"#!/bin/sh\nrm -rf /\n"}))
    proc = update(host, site)
    assert proc.returncode == 1
    assert error_line(proc) == ("banger: banger-0.0.2-linux-amd64.tar.gz: unexpected entry 'postinst.sh' "
                                   "in the release archive")
    assert_untouched(host, before, pid)


def test_missing_archive_entry_is_refused(host: Host, site: Site) -> None:
    before, pid = host.snapshot(), host.pid("bangerd")
    tarball = site.root / "0.0.2/banger-0.0.2-linux-amd64.tar.gz"
    with tarfile.open(tarball) as tar:
        victim = next(n for n in tar.getnames() if n.startswith("wheels/httpx-"))
    site.republish("0.0.2", _repack(tarball, drop=victim))
    proc = update(host, site)
    assert proc.returncode == 1
    assert error_line(proc) == (f"banger: banger-0.0.2-linux-amd64.tar.gz: release archive is missing "
                                   f"{victim!r} (listed in release.json)")
    assert_untouched(host, before, pid)


def test_oversized_download_is_cut_off(host: Host, site: Site) -> None:
    before, pid = host.snapshot(), host.pid("bangerd")
    doc = site.manifest()
    versions = doc["versions"]
    assert isinstance(versions, dict)
    # The signed SHA256SUMS stays valid; the archive URL now streams 257 MiB with no Content-Length.
    versions["0.0.2"]["tarball"] = "stream/0.0.2/banger-0.0.2-linux-amd64.tar.gz"
    (site.root / "stream").mkdir()
    shutil.copytree(site.root / "0.0.2", site.root / "stream/0.0.2")
    site.write_manifest(doc)
    proc = update(host, site)
    assert proc.returncode == 1
    assert error_line(proc) == (f"banger: {site.url}/stream/0.0.2/banger-0.0.2-linux-amd64.tar.gz: refused: "
                                "the body exceeds the cap of 268435456 bytes")
    assert_untouched(host, before, pid)
    assert sorted(p.name for p in (host.prefix / "opt/banger/staging").iterdir()) == [
        "SHA256SUMS", "SHA256SUMS.sig"]


def test_newer_database_aborts_before_the_swap(host: Host, site: Site) -> None:
    db_path = host.prefix / "var/lib/banger/state.db"
    with sqlite3.connect(db_path) as db:  # a migration only a future banger knows
        db.execute("INSERT INTO schema_migrations (id, name, applied_at) VALUES (999, 'future', 'now')")
    for suffix in ("", "-wal", "-shm"):
        p = Path(f"{db_path}{suffix}")
        if p.exists():
            os.chown(p, host.owner.uid, host.owner.gid)
    before, pid = host.snapshot(), host.pid("bangerd")
    proc = update(host, site)
    assert proc.returncode == 1
    assert error_line(proc) == (
        "banger: v0.0.2 cannot use this host's database: database schema is newer than this binary "
        "(unknown migration ids: 999); aborting")
    assert "swapped" not in proc.stderr
    assert_untouched(host, before, pid)  # the staged 0.0.2 was removed again


def test_dry_run_stages_but_does_not_swap(host: Host, site: Site) -> None:
    before, pid = host.snapshot(), host.pid("bangerd")
    proc = update(host, site, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("dry run: v0.0.1 -> v0.0.2 is ready to swap (staged in ")
    assert host.ping()["version"] == "0.0.1" and host.pid("bangerd") == pid
    assert host.current.name.startswith("0.0.1-")
    staged = [v for v in host.versions() if v.startswith("0.0.2-")]
    assert len(staged) == 1
    assert {k: v for k, v in host.snapshot().items() if k != "versions"} == {
        k: v for k, v in before.items() if k != "versions"}
    # A real update afterwards replaces the leftover staging and succeeds.
    proc = update(host, site)
    assert proc.returncode == 0, proc.stderr
    assert host.ping()["version"] == "0.0.2"


def test_failing_doctor_rolls_back(host: Host, site: Site) -> None:
    before = host.snapshot()
    old_dir, old_pids = host.current, (host.pid("bangerd-root"), host.pid("bangerd"))
    proc = update(host, site, "--to", "v0.0.2-baddoctor")
    assert proc.returncode == 1
    assert error_line(proc) == (
        "banger: update to v0.0.2-baddoctor failed: doctor reports FAIL (release build): this build was made "
        "with `make-release --test-fault doctor`: a deliberately broken release for tests "
        "(rolled back to previous install)")
    assert "running `banger doctor` as v0.0.2-baddoctor" in proc.stderr  # it did get swapped in and run
    # Files: everything as before (current link, install.toml, units, entry points, versions).
    assert host.current == old_dir
    assert host.snapshot() == before
    assert host.meta().version == "0.0.1"
    # Services: restarted once more, on the old version, answering.
    pids = (host.pid("bangerd-root"), host.pid("bangerd"))
    assert None not in pids and pids[0] != old_pids[0] and pids[1] != old_pids[1]
    ping = host.ping()
    assert (ping["version"], ping["uid"]) == ("0.0.1", host.owner.uid)
    doctor = host.run("doctor", "--json")
    rows = {r["name"]: r["status"] for r in json.loads(doctor.stdout)}
    assert rows["release build"] == "PASS" and rows["system services"] == "PASS"


def test_refuses_while_an_operation_is_in_flight_unless_forced(host: Host, site: Site) -> None:
    # A real long operation: a kernel pull whose Debian "mirror" (on 127.0.0.1) holds every request for
    # STALL seconds before failing it, so the pull stays in flight meanwhile.
    from banger.rpc import client

    stall, asked = 8.0, threading.Event()

    class Mirror(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            asked.set()
            threading.Event().wait(stall)
            self.send_error(503)

    mirror = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Mirror)
    threading.Thread(target=mirror.serve_forever, daemon=True).start()
    try:
        (host.prefix / "etc/banger/config.toml").write_text(
            f'kernel_mirror = "http://127.0.0.1:{mirror.server_address[1]}/debian"\n')
        assert host.run("system", "restart").returncode == 0
        begun = client.call(host.prefix / "run/banger/bangerd.sock", "kernel.pull.begin", {"name": "debian-12-cloud"})
        assert asked.wait(15), "the kernel pull never reached the mirror"
        before, pid = host.snapshot(), host.pid("bangerd")
        proc = update(host, site)
        assert proc.returncode == 1
        line = error_line(proc)  # the stage name between the op id and ")" belongs to the kernel code
        assert line.startswith(f"banger: 1 operation(s) in flight: kernel.pull debian-12-cloud ({begun['op_id']}, ")
        assert line.endswith("); refusing to update; wait for them to finish, or pass --force")
        assert_untouched(host, before, pid)
        proc = update(host, site, "--force")
        assert proc.returncode == 0, proc.stderr
        assert "banger: --force: updating with 1 operation(s) in flight: kernel.pull debian-12-cloud" in proc.stderr
        assert host.ping()["version"] == "0.0.2"
    finally:
        mirror.shutdown()
        mirror.server_close()


# --- a VM running across updates --------------------------------------------------------------------


@dataclass
class NetnsHost(Host):
    """A Host whose banger processes all run in the network namespace `ns`: the services they start (at
    install, and again at every update and rollback) inherit it, so the bridge, the taps, the VMs and the
    DNS server on 127.0.0.1 live there and nothing touches the host's network.

    `tun`: the daemon runs QEMU as the owner, who must open /dev/net/tun. udev makes it 0666; without udev
    (this CI machine) it stays 0600 root and no VM of a system install can start. Then every command runs
    with a 0666 node of the same device bind-mounted over /dev/net/tun in the mount namespace that
    `ip netns exec` makes for it (the services and their VMs inherit it), without changing the machine."""

    ns: str = ""
    tun: Path | None = None

    @property
    def bridge(self) -> str:
        return f"br-fc-u{self.ns.rsplit('-', 1)[1]}"

    def _in_ns(self, argv: list[str]) -> list[str]:
        if self.tun is None:
            return ["ip", "netns", "exec", self.ns, *argv]
        return ["ip", "netns", "exec", self.ns, "sh", "-c", 'mount --bind "$0" /dev/net/tun && exec "$@"',
                str(self.tun), *argv]

    def run(self, *args: str, user: SystemUser | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        argv = [str(self.entry), *args]
        env = self.env
        if user is not None:
            argv = user.argv(argv)
            env = {**env, "HOME": str(self.home)}
        return subprocess.run(self._in_ns(argv), env=env, capture_output=True, text=True, timeout=timeout, cwd="/")

    def dev(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self._in_ns([sys.executable, "-m", "banger", *args]), env=self.env,
                              capture_output=True, text=True, timeout=timeout, cwd=REPO)

    def ok(self, *args: str, timeout: float = 300) -> str:
        proc = self.run(*args, timeout=timeout)
        assert proc.returncode == 0, f"banger {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def qemu_pids(self) -> list[int]:
        return qemu_pids_under(self.prefix)

    def dig(self, name: str) -> str:
        argv = ["dig", "+short", "+time=2", "+tries=2", "@127.0.0.1", "-p", "42069", name]
        return subprocess.run(self._in_ns(argv), capture_output=True, text=True, timeout=30).stdout.strip()

    def tap_master(self, tap: str) -> str | None:
        out = subprocess.run(["ip", "-n", self.ns, "-j", "link", "show", "dev", tap], capture_output=True, text=True)
        links = json.loads(out.stdout) if out.returncode == 0 else []
        return links[0].get("master") if links else None


@pytest.fixture
def vm_host(owner_user: SystemUser, release_set: ReleaseSet) -> Iterator[NetnsHost]:  # noqa: F811
    """0.0.1 installed in a network namespace of its own, with the default image built by its daemon from
    the cached mmdebstrap tarball, and the kernel built from the cached Debian package and imported (the
    namespace cannot reach the archive to pull it)."""
    tar, record = golden_tarball("debian-bookworm")
    suffix = secrets.token_hex(2)
    base = new_host(owner_user)
    host = NetnsHost(base.prefix, base.owner, base.home, ns=f"banger-upd-{suffix}")
    subprocess.run(["ip", "netns", "add", host.ns], check=True)
    try:
        subprocess.run(["ip", "-n", host.ns, "link", "set", "lo", "up"], check=True)
        tun = os.stat("/dev/net/tun")
        if stat.S_IMODE(tun.st_mode) != 0o666:
            host.tun = host.prefix / "tun"
            os.mknod(host.tun, stat.S_IFCHR | 0o666, tun.st_rdev)
            os.chmod(host.tun, 0o666)  # mknod's mode went through the umask
        (host.prefix / "etc/banger").mkdir(parents=True)
        (host.prefix / "etc/banger/config.toml").write_text(
            CONFIG.format(bridge=host.bridge, net=int(suffix, 16) % 250 + 1))
        started = time.monotonic()
        host.install_from(release_set.tarball("0.0.1"))
        installed = time.monotonic()
        downloads = host.prefix / "var/cache/banger/downloads"
        downloads.mkdir(mode=0o700)
        for src in (tar, record):
            shutil.copyfile(src, downloads / src.name)
        for p in (downloads, *downloads.iterdir()):
            os.chown(p, host.owner.uid, host.owner.gid)
        kernel = host.prefix / "kernel-build"  # where the owner's daemon can read it
        kver = debian_kernel_files("debian-12-cloud", kernel)
        host.ok("kernel", "import", "debian-12-cloud", "--from", str(kernel), "--distro", "debian", "--arch", "amd64",
                "--kernel-version", kver)
        imported = time.monotonic()
        host.ok("image", "pull", "debian-bookworm", timeout=600)
        print(f"\ninstall {installed - started:.1f}s, kernel {imported - installed:.1f}s, "
              f"image pull {time.monotonic() - imported:.1f}s")
        yield host
    finally:
        with contextlib.suppress(Exception):
            for vm in json.loads(host.run("vm", "list", "--json", timeout=30).stdout):
                host.run("vm", "delete", vm["name"], timeout=120)
        with contextlib.suppress(Exception):
            host.run("system", "uninstall", "--purge", timeout=60)
        for pid in host.qemu_pids():  # a VM banger failed to delete (the test has failed then)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", host.ns], check=False)
        destroy(host)


@pytest.mark.vm
@pytest.mark.network  # only with an empty BANGER_TEST_CACHE: the golden tarball and the kernel package
def test_running_vm_survives_a_rolled_back_update_and_an_update(
        vm_host: NetnsHost, release_set: ReleaseSet, tmp_path: Path) -> None:  # noqa: F811
    host = vm_host
    started = time.monotonic()
    host.ok("vm", "create", "--name", "keeper", timeout=600)
    created = time.monotonic()
    before = json.loads(host.ok("vm", "show", "keeper", "--json"))
    pid, tap, ip = int(before["runtime"]["pid"]), str(before["runtime"]["tap"]), before["guest_ip"]
    assert before["state"] == "running" and host.qemu_pids() == [pid]
    boot_id = host.ok("vm", "exec", "keeper", "--", "cat", "/proc/sys/kernel/random/boot_id").strip()
    assert len(boot_id) == 36
    assert host.dig("keeper.vm") == ip and host.tap_master(tap) == host.bridge

    def assert_same_vm_adopted(daemon_pid: int | None) -> None:
        # A daemon other than the one that launched the VM now serves it: restarted, not left running.
        assert host.pid("bangerd") not in (None, daemon_pid)
        # The same QEMU process, never restarted: the guest has the same boot id (agent and ssh both).
        assert host.qemu_pids() == [pid] and _alive(pid)
        vm = json.loads(host.ok("vm", "show", "keeper", "--json"))
        assert (vm["state"], vm["runtime"]["pid"], vm["runtime"]["tap"]) == ("running", pid, tap)
        assert json.loads(host.ok("vm", "list", "--json"))[0]["state"] == "running"
        assert host.ok("vm", "exec", "keeper", "--", "cat", "/proc/sys/kernel/random/boot_id").strip() == boot_id
        # Re-adopted: back in the new daemon's DNS, its tap still on the bridge, reachable over the network.
        assert host.dig("keeper.vm") == ip and host.tap_master(tap) == host.bridge
        assert host.ok("vm", "ssh", "keeper", "--", "cat", "/proc/sys/kernel/random/boot_id").strip() == boot_id

    with serve_site(release_set, tmp_path / "site", ns=host.ns) as site:  # on the loopback `update` sees
        daemon_pid = host.pid("bangerd")
        proc = update(host, site, "--to", "v0.0.2-baddoctor")
        rolled_back = time.monotonic()
        assert proc.returncode == 1, proc.stderr
        assert error_line(proc) == (
            "banger: update to v0.0.2-baddoctor failed: doctor reports FAIL (release build): this build was made "
            "with `make-release --test-fault doctor`: a deliberately broken release for tests "
            "(rolled back to previous install)")
        assert "running `banger doctor` as v0.0.2-baddoctor" in proc.stderr  # it ran, with the VM, then went
        assert host.ping()["version"] == "0.0.1"
        assert_same_vm_adopted(daemon_pid)
        checked = time.monotonic()

        daemon_pid = host.pid("bangerd")
        proc = update(host, site)
        assert (proc.returncode, proc.stdout.strip()) == (0, "updated banger v0.0.1 -> v0.0.2"), proc.stderr
        assert host.ping()["version"] == "0.0.2"
        assert_same_vm_adopted(daemon_pid)
        updated = time.monotonic()
    # The adopted VM's tap is still its own (marked in use, not back in the pool): a new VM gets another
    # one and runs beside it.
    second = host.run("vm", "run", "--rm", "--name", "second", "--", "true", timeout=600)
    assert second.returncode == 0, second.stderr
    assert host.qemu_pids() == [pid]
    ran = time.monotonic()

    host.ok("vm", "delete", "keeper", timeout=120)
    assert host.qemu_pids() == [] and not _alive(pid)
    assert json.loads(host.ok("vm", "list", "--json")) == [] and host.dig("keeper.vm") == ""
    services = (host.pid("bangerd"), host.pid("bangerd-root"))
    host.ok("system", "uninstall", "--purge", timeout=60)
    assert not any(_alive(p) for p in services if p is not None)
    print(f"vm create {created - started:.1f}s, update rolled back {rolled_back - created:.1f}s, "
          f"checks {checked - rolled_back:.1f}s, update + checks {updated - checked:.1f}s, "
          f"second vm {ran - updated:.1f}s, delete + uninstall {time.monotonic() - ran:.1f}s")
