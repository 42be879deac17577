"""`banger system install|status|start|stop|restart|uninstall` for real, under BANGER_SYSTEM_PREFIX.

Everything a system install touches (/opt/banger, /usr/local/bin, /etc, /var, /run) lives under a
temporary prefix; the daemon runs as a real unprivileged owner user (setpriv), the helper as root. This
machine's PID 1 is not systemd, so banger supervises the two services itself: the mode these tests
exercise. The unit files it writes are checked with `systemd-analyze verify`.

`Host` and `release_set` are shared with test_update.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from banger import __version__
from banger.system import installmeta, units
from tests.integration.conftest import SystemUser

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="needs root: a system install, a real owner user")

REPO = Path(__file__).resolve().parents[2]
MAKE_RELEASE = REPO / "scripts" / "make-release"


@dataclass
class Host:
    """A system install under a temporary prefix, driven through real `banger` processes."""

    prefix: Path
    owner: SystemUser
    home: Path

    @property
    def env(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if k.startswith("PIP_") or k.endswith("_proxy")}
        return {**keep, "PATH": os.environ["PATH"], "HOME": "/root", "BANGER_SYSTEM_PREFIX": str(self.prefix),
                "NO_COLOR": "1", "LANG": "C.UTF-8"}

    @property
    def entry(self) -> Path:
        return self.prefix / "usr/local/bin/banger"

    def run(self, *args: str, user: SystemUser | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """The installed `banger` (through /usr/local/bin), as root or as `user`."""
        argv = [str(self.entry), *args]
        env = self.env
        if user is not None:
            argv = user.argv(argv)
            env = {**env, "HOME": str(self.home)}
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd="/")

    def dev(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """This checkout's banger (the one that installs from a checkout or a release archive)."""
        return subprocess.run([sys.executable, "-m", "banger", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, cwd=REPO)

    def install_from(self, tarball: Path) -> subprocess.CompletedProcess[str]:
        proc = self.dev("system", "install", "--owner", self.owner.name, "--owner-home", str(self.home),
                        "--from", str(tarball))
        assert proc.returncode == 0, proc.stderr
        return proc

    @property
    def current(self) -> Path:
        return (self.prefix / "opt/banger/current").resolve()

    def meta(self) -> installmeta.InstallMeta:
        meta = installmeta.read(self.prefix / "etc/banger/install.toml")
        assert meta is not None
        return meta

    def pid(self, name: str) -> int | None:
        pidfile = self.prefix / ("run/banger/bangerd.pid" if name == "bangerd" else "run/banger-root/bangerd-root.pid")
        try:
            return int(pidfile.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def ping(self) -> dict[str, Any]:
        from banger.rpc import client

        result = client.call(self.prefix / "run/banger/bangerd.sock", "daemon.ping", {}, timeout=10)
        assert isinstance(result, dict)
        return result

    def versions(self) -> list[str]:
        d = self.prefix / "opt/banger/versions"
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    def snapshot(self) -> dict[str, str]:
        """What an update may change: the code, the links, the install metadata, the unit files."""
        out: dict[str, str] = {}
        for rel in ("opt/banger", "usr/local/bin", "etc/banger", "etc/systemd/system"):
            root = self.prefix / rel
            for p in sorted(root.iterdir()) if root.is_dir() else []:
                key = str(p.relative_to(self.prefix))
                if key == "opt/banger/staging":
                    continue  # update downloads; the tests look at them separately
                out[key] = f"-> {os.readlink(p)}" if p.is_symlink() else (p.read_text() if p.is_file() else "dir")
        out["versions"] = " ".join(self.versions())
        return out

    def stop_everything(self) -> None:
        """Teardown that does not trust banger: signal whatever runs from this prefix, by pidfile."""
        for name in ("bangerd", "bangerd-root"):
            pid = self.pid(name)
            if pid is None:
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if str(self.prefix).encode() not in cmdline:
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def kv(text: str) -> dict[str, str]:
    """A `key  value` block (output.kv_block) as a dict; continuation lines have the key ''."""
    pairs = (re.split(r"\s{2,}", line, maxsplit=1) for line in text.splitlines())
    return {p[0]: p[1] for p in pairs if len(p) == 2}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def new_host(owner: SystemUser) -> Host:
    probe = subprocess.run(owner.argv(["/usr/bin/python3", "-c", "pass"]), capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot run commands as the test owner user (setpriv failed)")
    prefix = Path(tempfile.mkdtemp(prefix="bgsys-"))
    prefix.chmod(0o755)
    home = prefix / "home/owner"
    home.mkdir(parents=True)
    os.chown(home, owner.uid, owner.gid)
    return Host(prefix, owner, home)


def destroy(host: Host) -> None:
    host.stop_everything()
    shutil.rmtree(host.prefix, ignore_errors=True)


# --- releases built from this checkout ------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseSet:
    root: Path  # manifest.json and <version>/ directories
    private_key: Path
    public_key: Path

    def tarball(self, version: str) -> Path:
        return self.root / version / f"banger-{version}-linux-amd64.tar.gz"


def build_release_set(base: Path) -> ReleaseSet:
    """0.0.1 and 0.0.2 from this checkout, and 0.0.2-baddoctor: the same code built with
    `make-release --test-fault doctor`, whose `banger doctor` reports a FAIL row ("release build")."""
    root, key, pub = base / "releases", base / "test-key.pem", base / "test-key.pub"
    done = base / "complete"
    if not done.exists():
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        private = ec.generate_private_key(ec.SECP256R1())
        key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        pub.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
        builds = [("0.0.1", []), ("0.0.2", []), ("0.0.2-baddoctor", ["--test-fault", "doctor"])]
        for version, extra in builds:
            proc = subprocess.run([str(MAKE_RELEASE), "--version", version, "--out", str(root), "--key", str(key),
                                   "--wheelhouse", str(base.parent / "wheelhouse"), *extra],
                                  capture_output=True, text=True, timeout=900,
                                  env={**os.environ, "BANGER_RELEASE_PYTHON": sys.executable})
            assert proc.returncode == 0, proc.stderr
        done.touch()
    return ReleaseSet(root, key, pub)


@pytest.fixture(scope="session")
def release_set(tmp_path_factory: pytest.TempPathFactory) -> ReleaseSet:
    return build_release_set(tmp_path_factory.getbasetemp() / "banger-release-set")


# --- an install from this checkout, shared by the tests below ------------------------------------------


@pytest.fixture(scope="module")
def checkout_install(owner_user: SystemUser) -> Iterator[tuple[Host, subprocess.CompletedProcess[str]]]:
    host = new_host(owner_user)
    try:
        proc = host.dev("system", "install", "--owner", owner_user.name, "--owner-home", str(host.home))
        assert proc.returncode == 0, proc.stderr
        yield host, proc
    finally:
        destroy(host)


def test_install_from_checkout(checkout_install: tuple[Host, subprocess.CompletedProcess[str]]) -> None:
    host, proc = checkout_install
    p = host.prefix
    assert "systemd is not running here" in proc.stderr
    assert kv(proc.stdout)["supervised by"] == "banger itself: systemd is not running here; use `banger system start|stop`"
    # Versioned code, one `current` link, stable entry points through it.
    assert host.current.parent == p / "opt/banger/versions"
    assert host.current.name.startswith(f"{__version__}-")
    assert os.readlink(p / "opt/banger/current") == f"versions/{host.current.name}"
    for program in ("banger", "bangerd", "bangerd-root"):
        assert os.readlink(p / "usr/local/bin" / program) == str(p / "opt/banger/current/bin" / program)
    shebang = (host.current / "bin/bangerd").read_text().splitlines()[0]
    assert shebang == f"#!{host.current}/bin/python3 -I"
    assert json.loads((host.current / "release.json").read_text())["version"] == __version__
    # Install metadata as the services read it.
    meta = host.meta()
    assert (meta.owner_user, meta.owner_uid, meta.owner_home) == (host.owner.name, host.owner.uid, host.home)
    assert meta.version == __version__
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert meta.commit == head and meta.built_at.endswith("Z") and meta.installed_at.endswith("Z")
    # Directory ownership and modes, as the units' RuntimeDirectory= and the daemon expect them.
    for rel, uid, mode in (("var/lib/banger", host.owner.uid, 0o700), ("var/cache/banger", host.owner.uid, 0o700),
                           ("run/banger", host.owner.uid, 0o700), ("run/banger-root", 0, 0o711),
                           ("etc/banger", 0, 0o755), ("opt/banger", 0, 0o755)):
        st = (p / rel).stat()
        assert (st.st_uid, st.st_mode & 0o777) == (uid, mode), rel
    # The daemon really runs as the owner, the helper as root, and both run the installed version.
    daemon_pid, helper_pid = host.pid("bangerd"), host.pid("bangerd-root")
    assert daemon_pid and helper_pid
    assert Path(f"/proc/{daemon_pid}").stat().st_uid == host.owner.uid
    assert Path(f"/proc/{helper_pid}").stat().st_uid == 0
    assert str(host.prefix / "usr/local/bin/bangerd") in Path(f"/proc/{daemon_pid}/cmdline").read_text()
    assert host.ping()["version"] == __version__


def test_status_as_owner_and_root(checkout_install: tuple[Host, subprocess.CompletedProcess[str]]) -> None:
    host, _ = checkout_install
    proc = host.run("system", "status", "--json", user=host.owner)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["install"]["owner_uid"] == host.owner.uid
    assert status["supervisor"] == "banger (systemd is not running)"
    assert status["current"] == str(host.current)
    assert status["versions"] == [host.current.name]
    assert status["services"]["bangerd"] == {"running": True, "pid": host.pid("bangerd"),
                                             "detail": f"running, pid {host.pid('bangerd')}"}
    assert status["services"]["bangerd-root"]["running"] is True
    for name, dir_uid, dir_mode in (("bangerd", host.owner.uid, "0700"), ("bangerd-root", 0, "0711")):
        sock = status["sockets"][name]
        assert (sock["is_socket"], sock["mode"], sock["uid"]) == (True, "0600", host.owner.uid)
        assert (sock["dir_uid"], sock["dir_mode"]) == (dir_uid, dir_mode)
    assert status["daemon"]["uid"] == host.owner.uid and status["helper"]["owner_uid"] == host.owner.uid
    text = host.run("system", "status")
    assert text.returncode == 0, text.stderr
    rows = kv(text.stdout)
    assert rows["bangerd log"] == f"{host.prefix}/var/log/banger/bangerd.log"
    assert rows["supervised by"] == "banger (systemd is not running)"
    assert rows["operations in flight"] == "0"


def test_rendered_units_pass_systemd_analyze_verify(
        checkout_install: tuple[Host, subprocess.CompletedProcess[str]]) -> None:
    host, _ = checkout_install
    unit_dir = host.prefix / "etc/systemd/system"
    daemon_unit, helper_unit = unit_dir / "bangerd.service", unit_dir / "bangerd-root.service"
    assert units.missing_directives("bangerd.service", daemon_unit.read_text()) == []
    assert units.missing_directives("bangerd-root.service", helper_unit.read_text()) == []
    daemon_lines = daemon_unit.read_text().splitlines()
    assert f"User={host.owner.name}" in daemon_lines
    assert f"ExecStart={host.prefix}/usr/local/bin/bangerd --system" in daemon_lines
    assert f"Environment=BANGER_SYSTEM_PREFIX={host.prefix}" in daemon_lines
    assert "RuntimeDirectoryMode=0711" in helper_unit.read_text().splitlines()
    assert f"ExecStart={host.prefix}/usr/local/bin/bangerd-root --system" in helper_unit.read_text().splitlines()
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("SKIPPED LOUDLY: systemd-analyze is not installed (apt-get install systemd; scripts/setup "
                    "does it), so the rendered units were NOT verified")
    proc = subprocess.run([tool, "verify", str(helper_unit), str(daemon_unit)], capture_output=True, text=True,
                          timeout=120)
    # verify prints a line for every unknown key or bad value even when it exits 0: require silence.
    assert (proc.returncode, proc.stdout.strip(), proc.stderr.strip()) == (0, "", "")


def test_doctor_as_owner_sees_a_healthy_install(
        checkout_install: tuple[Host, subprocess.CompletedProcess[str]]) -> None:
    host, _ = checkout_install
    proc = host.run("doctor", "--json", user=host.owner)
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert proc.returncode == (1 if any(r["status"] == "FAIL" for r in rows.values()) else 0)
    assert rows["system services"]["status"] == "PASS", rows["system services"]
    assert rows["socket posture"]["status"] == "PASS", rows["socket posture"]
    assert rows["release build"]["status"] == "PASS"
    assert rows["banger version"]["summary"].endswith("same as the system install")
    assert rows["ssh config include"]["status"] == "WARN"  # not installed for this owner: a gentle warning


def test_restart_stop_start(checkout_install: tuple[Host, subprocess.CompletedProcess[str]]) -> None:
    host, _ = checkout_install
    before = (host.pid("bangerd-root"), host.pid("bangerd"))
    proc = host.run("system", "restart")
    assert proc.returncode == 0, proc.stderr
    after = (host.pid("bangerd-root"), host.pid("bangerd"))
    assert None not in after and after[0] != before[0] and after[1] != before[1]
    assert host.ping()["pid"] == after[1]

    refused = host.run("system", "stop", user=host.owner)
    assert (refused.returncode, refused.stderr.strip()) == (
        1, "banger: banger system stop needs root; run `sudo banger system stop`")

    proc = host.run("system", "stop")
    assert (proc.returncode, proc.stdout.strip()) == (0, "stopped bangerd, bangerd-root"), proc.stderr
    assert not _alive(after[0]) and not _alive(after[1])
    assert not (host.prefix / "run/banger/bangerd.sock").exists()
    down = host.run("system", "status")
    assert down.returncode == 1
    rows = kv(down.stdout)
    assert rows["bangerd"] == rows["bangerd-root"] == "not running"
    assert rows["daemon answers"].startswith("no: no server socket at")
    assert host.run("system", "stop").stdout.strip() == "stopped nothing (not running)"

    proc = host.run("system", "start")
    assert proc.returncode == 0, proc.stderr
    assert host.ping()["uid"] == host.owner.uid


def test_reinstall_from_the_installed_banger_keeps_the_version(
        checkout_install: tuple[Host, subprocess.CompletedProcess[str]]) -> None:
    # What a user does after `banger update` to refresh the unit files: no checkout, no archive.
    host, _ = checkout_install
    current, daemon_pid = host.current, host.pid("bangerd")
    proc = host.run("system", "install", "--owner", host.owner.name, "--owner-home", str(host.home))
    assert proc.returncode == 0, proc.stderr
    assert f"reinstalling the current version from {current}" in proc.stderr
    assert host.current == current and host.versions() == [current.name]
    assert host.pid("bangerd") != daemon_pid and host.ping()["version"] == __version__


def test_uninstall_keeps_state_and_purge_removes_it_but_never_the_home(
        owner_user: SystemUser, release_set: ReleaseSet) -> None:
    host = new_host(owner_user)
    try:
        host.install_from(release_set.tarball("0.0.1"))
        pins = host.home / ".local/state/banger/ssh/known_hosts"
        pins.parent.mkdir(parents=True, exist_ok=True)
        pins.write_text("dev.vm ssh-ed25519 AAAA\n")
        (host.prefix / "etc/banger/config.toml").write_text("log_level = \"debug\"\n")
        daemon_pid = host.pid("bangerd")
        assert daemon_pid is not None
        db_inode = (host.prefix / "var/lib/banger/state.db").stat().st_ino

        proc = host.run("system", "uninstall")
        assert proc.returncode == 0, proc.stderr
        assert not _alive(daemon_pid)
        for gone in ("opt/banger", "usr/local/bin/banger", "usr/local/bin/bangerd-root", "etc/banger/install.toml",
                     "etc/systemd/system/bangerd.service"):
            assert not (host.prefix / gone).exists(), gone
        for kept in ("var/lib/banger/state.db", "etc/banger/config.toml", "var/log/banger/bangerd.log"):
            assert (host.prefix / kept).exists(), kept
        assert kv(proc.stdout)["kept"] == "(remove with --purge)"
        # Reinstalling finds the state as it was left: the same database file.
        host.install_from(release_set.tarball("0.0.1"))
        assert (host.prefix / "var/lib/banger/state.db").stat().st_ino == db_inode

        proc = host.run("system", "uninstall", "--purge")
        assert proc.returncode == 0, proc.stderr
        assert sorted(p.name for p in (host.prefix / "var").iterdir() if any(p.iterdir())) == []
        assert not (host.prefix / "etc/banger").exists()
        assert pins.read_text() == "dev.vm ssh-ed25519 AAAA\n"  # the owner's pins survive a purge
        assert host.home.stat().st_uid == owner_user.uid
        assert not host.entry.exists() and not (host.prefix / "opt/banger").exists()
    finally:
        destroy(host)
