"""From a release archive to a ready version directory (not yet the current one).

A release archive `banger-<v>-linux-amd64.tar.gz` holds exactly `release.json`, the directory `wheels/`
and the wheels that `release.json` lists with their sha256: banger's own wheel and its dependencies'.
Nothing else is accepted: no extra or missing entry, no path outside the archive, no link or device.

Staging turns it into `/opt/banger/versions/<v>-<sha12>/`, a virtual environment of the host's
/usr/bin/python3 (made with `python3 -m venv --without-pip`), the wheels unpacked into its
site-packages, and banger's console scripts in its `bin/`. No network and no pip are needed: the archive
carries everything. The directory name carries the archive's digest, so a staged version never collides
with the running one, even for a rebuild of the same version string.
"""

from __future__ import annotations

import configparser
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from banger.errors import BangerError

RELEASE_JSON: Final = "release.json"
WHEELS_DIR: Final = "wheels"
RELEASE_FORMAT: Final = 1
HOST_PYTHON: Final = "/usr/bin/python3"

MAX_RELEASE_JSON: Final = 64 << 10
MAX_UNPACKED_BYTES: Final = 1 << 30
MAX_ENTRIES: Final = 100_000

_WHEEL_NAME = re.compile(r"[A-Za-z0-9_.+!-]+\.whl")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_VERSION_TEXT = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+-]{0,63}")
_SCRIPT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


@dataclass(frozen=True)
class ReleaseInfo:
    """`release.json`: which build this is and which wheels make it up."""

    version: str
    commit: str
    built_at: str
    python: str  # "3.11": the interpreter the wheels were built for
    wheels: tuple[tuple[str, str], ...]  # (file name, sha256)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RELEASE_FORMAT,
            "version": self.version,
            "commit": self.commit,
            "built_at": self.built_at,
            "python": self.python,
            "platform": "linux-x86_64",
            "wheels": [{"file": f, "sha256": h} for f, h in self.wheels],
        }

    @property
    def banger_wheel(self) -> str:
        return next(f for f, _ in self.wheels if f.startswith("banger-"))


def parse_release_json(data: bytes) -> ReleaseInfo:
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BangerError(f"release.json is not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != RELEASE_FORMAT:
        raise BangerError(f"release.json has format {raw.get('format') if isinstance(raw, dict) else None!r}; "
                          f"this banger understands only {RELEASE_FORMAT}")
    fields = {k: raw.get(k) for k in ("version", "commit", "built_at", "python")}
    for key, value in fields.items():
        if not isinstance(value, str) or not value or len(value) > 100 or not value.isprintable():
            raise BangerError(f"release.json: {key} must be a short non-empty string")
    if not _VERSION_TEXT.fullmatch(str(fields["version"])):
        raise BangerError(f"release.json: version {fields['version']!r} has characters outside [0-9A-Za-z.+-]")
    wheels_raw = raw.get("wheels")
    if not isinstance(wheels_raw, list) or not wheels_raw:
        raise BangerError("release.json lists no wheels")
    wheels: list[tuple[str, str]] = []
    for item in wheels_raw:
        if not isinstance(item, dict):
            raise BangerError("release.json: every wheel must be an object")
        name, digest = item.get("file"), item.get("sha256")
        if not isinstance(name, str) or not _WHEEL_NAME.fullmatch(name) or name.startswith("."):
            raise BangerError(f"release.json: bad wheel file name {name!r}")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise BangerError(f"release.json: wheel {name} has no sha256 (64 lowercase hex digits)")
        wheels.append((name, digest))
    names = [n for n, _ in wheels]
    if len(set(names)) != len(names):
        raise BangerError("release.json lists a wheel twice")
    if sum(1 for n in names if n.startswith("banger-")) != 1:
        raise BangerError("release.json must list exactly one banger wheel")
    return ReleaseInfo(str(fields["version"]), str(fields["commit"]), str(fields["built_at"]),
                       str(fields["python"]), tuple(wheels))


def read_archive(tarball: Path) -> tuple[ReleaseInfo, dict[str, bytes]]:
    """Check the archive's exact contents and return its release.json and wheels (verified)."""
    expected_dirs = {WHEELS_DIR}
    members: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for count, member in enumerate(tar, 1):
                if count > 1000:
                    raise BangerError(f"{tarball.name}: more than 1000 entries; refusing")
                name = member.name
                if name in members:
                    raise BangerError(f"{tarball.name}: entry {name!r} appears twice")
                if member.isdir():
                    if name not in expected_dirs:
                        raise BangerError(f"{tarball.name}: unexpected directory {name!r} in the release archive")
                    expected_dirs.discard(name)
                    continue
                if not member.isfile():
                    raise BangerError(f"{tarball.name}: entry {name!r} is not a regular file (links and devices "
                                      "are refused)")
                if name != RELEASE_JSON and not (name.startswith(WHEELS_DIR + "/")
                                                 and _WHEEL_NAME.fullmatch(name[len(WHEELS_DIR) + 1:])):
                    raise BangerError(f"{tarball.name}: unexpected entry {name!r} in the release archive")
                total += member.size
                if total > MAX_UNPACKED_BYTES:
                    raise BangerError(f"{tarball.name}: more than {MAX_UNPACKED_BYTES} bytes unpacked; refusing")
                if name == RELEASE_JSON and member.size > MAX_RELEASE_JSON:
                    raise BangerError(f"{tarball.name}: release.json is {member.size} bytes; refusing")
                handle = tar.extractfile(member)
                if handle is None:
                    raise BangerError(f"{tarball.name}: cannot read entry {name!r}")
                members[name] = handle.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BangerError(f"{tarball.name} is not a readable .tar.gz: {exc}") from None
    if RELEASE_JSON not in members:
        raise BangerError(f"{tarball.name}: release archive is missing release.json")
    info = parse_release_json(members.pop(RELEASE_JSON))
    listed = {f"{WHEELS_DIR}/{name}": digest for name, digest in info.wheels}
    extra = sorted(set(members) - set(listed))
    if extra:
        raise BangerError(f"{tarball.name}: unexpected entry {extra[0]!r} in the release archive "
                          "(not listed in release.json)")
    missing = sorted(set(listed) - set(members))
    if missing:
        raise BangerError(f"{tarball.name}: release archive is missing {missing[0]!r} (listed in release.json)")
    wheels: dict[str, bytes] = {}
    for path, digest in listed.items():
        data = members[path]
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise BangerError(f"{tarball.name}: {path} has sha256 {actual}, release.json says {digest}")
        wheels[path[len(WHEELS_DIR) + 1:]] = data
    return info, wheels


def _safe_parts(name: str, where: str) -> list[str]:
    if not name or name.startswith("/") or "\\" in name or "\0" in name:
        raise BangerError(f"{where}: unsafe path {name!r}")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise BangerError(f"{where}: unsafe path {name!r}")
    return parts


def unpack_wheel(data: bytes, wheel_name: str, site_packages: Path) -> str | None:
    """Install one wheel's files into `site_packages` (PEP 427); returns its dist-info directory name.

    `.data/purelib` and `.data/platlib` go to site-packages like the rest; `.data/scripts`, `headers` and
    `data` are skipped (banger writes its own console scripts and uses no data files).
    """
    written = 0
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise BangerError(f"{wheel_name} is not a zip archive: {exc}") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ENTRIES:
            raise BangerError(f"{wheel_name}: more than {MAX_ENTRIES} entries; refusing")
        dist_infos = {i.filename.split("/", 1)[0] for i in infos if i.filename.split("/", 1)[0].endswith(".dist-info")}
        if len(dist_infos) != 1:
            raise BangerError(f"{wheel_name}: expected exactly one .dist-info directory, found {len(dist_infos)}")
        dist_info = dist_infos.pop()
        data_dir = dist_info.removesuffix(".dist-info") + ".data"
        for info in infos:
            if info.is_dir():
                continue
            parts = _safe_parts(info.filename, wheel_name)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise BangerError(f"{wheel_name}: {info.filename!r} is a symlink; refusing")
            if parts[0] == data_dir:
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            written += info.file_size
            if written > MAX_UNPACKED_BYTES:
                raise BangerError(f"{wheel_name}: more than {MAX_UNPACKED_BYTES} bytes unpacked; refusing")
            target = site_packages.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            executable = (info.external_attr >> 16) & 0o111
            os.chmod(target, 0o755 if executable else 0o644)
    return dist_info


def _console_scripts(site_packages: Path, dist_info: str) -> dict[str, tuple[str, str]]:
    path = site_packages / dist_info / "entry_points.txt"
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(path.read_text(encoding="utf-8"))
    except (OSError, configparser.Error) as exc:
        raise BangerError(f"banger's wheel has no readable entry_points.txt: {exc}") from None
    scripts: dict[str, tuple[str, str]] = {}
    if parser.has_section("console_scripts"):
        for name, value in parser.items("console_scripts"):
            module, _, func = value.strip().partition(":")
            if not _SCRIPT_NAME.fullmatch(name) or not _DOTTED.fullmatch(module) or not func.isidentifier():
                raise BangerError(f"banger's wheel has a bad console script {name!r} = {value!r}")
            scripts[name] = (module, func)
    if "banger" not in scripts:
        raise BangerError("banger's wheel does not provide the `banger` command")
    return scripts


def _write_script(bin_dir: Path, name: str, module: str, func: str) -> None:
    # -I: the services and root must not pick up PYTHONPATH, the user's site-packages or the cwd.
    text = (f"#!{bin_dir / 'python3'} -I\n"
            "# Written by banger's installer for this version.\n"
            "import sys\n"
            f"from {module} import {func}\n"
            f"sys.exit({func}())\n")
    path = bin_dir / name
    path.write_text(text, encoding="utf-8")
    os.chmod(path, 0o755)


@dataclass(frozen=True)
class StagedVersion:
    directory: Path
    info: ReleaseInfo

    def program(self, name: str) -> Path:
        return self.directory / "bin" / name


def version_dir_name(version: str, tarball_sha256: str) -> str:
    return f"{version}-{tarball_sha256[:12]}"


def stage(tarball: Path, tarball_sha256: str, versions_dir: Path, *, python: str = HOST_PYTHON,
          expect_version: str | None = None) -> StagedVersion:
    """Unpack a checked release archive into a new version directory under `versions_dir`.

    The directory must not exist yet (callers remove a leftover that is not the current version).
    On any failure the partial directory is removed.
    """
    from banger.system.run import run

    info, wheels = read_archive(tarball)
    if expect_version is not None and info.version != expect_version:
        raise BangerError(f"{tarball.name} contains version {info.version!r}, not {expect_version!r}")
    proc = run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], timeout=30)
    host = proc.stdout.decode().strip()
    if host != info.python:
        raise BangerError(f"this release is built for Python {info.python}, but {python} is Python {host}",
                          hint="use a release built for this host's Python")
    target = versions_dir / version_dir_name(info.version, tarball_sha256)
    versions_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    target.mkdir(mode=0o755)
    done = False
    try:
        run([python, "-m", "venv", "--without-pip", target], timeout=120)
        site_packages = target / "lib" / f"python{info.python}" / "site-packages"
        if not site_packages.is_dir():
            raise BangerError(f"python3 -m venv made no {site_packages}")
        banger_dist: str | None = None
        for name, data in wheels.items():
            dist_info = unpack_wheel(data, name, site_packages)
            if name == info.banger_wheel:
                banger_dist = dist_info
        if banger_dist is None:  # parse_release_json guarantees the wheel; this is belt and braces
            raise BangerError("banger's wheel was not unpacked")
        for script, (module, func) in _console_scripts(site_packages, banger_dist).items():
            _write_script(target / "bin", script, module, func)
        (target / RELEASE_JSON).write_text(json.dumps(info.to_json(), indent=2) + "\n", encoding="utf-8")
        # Byte-compile now: the services run as a user who cannot write here, and start-up time counts.
        run([target / "bin" / "python3", "-m", "compileall", "-q", "-j", "0", site_packages],
            check=False, timeout=600)
        for root, dirs, files in os.walk(target):
            for d in dirs:
                p = os.path.join(root, d)
                if not os.path.islink(p):  # venv's lib64 -> lib
                    os.chmod(p, 0o755)
            for f in files:
                p = os.path.join(root, f)
                if not os.path.islink(p):
                    os.chmod(p, 0o755 if os.stat(p).st_mode & 0o100 else 0o644)
        done = True
    finally:
        if not done:
            shutil.rmtree(target, ignore_errors=True)
    return StagedVersion(target, info)


def sanity_check(staged: StagedVersion, env: Mapping[str, str], run_as: tuple[int, int] | None = None) -> str:
    """Run the staged programs the way update does before swapping: returns check-migrations' line.

    `banger --version` must name the version; `bangerd --check-migrations --system` must exit 0 (schema
    compatible) or 1 (it will migrate on start); 2 (database newer than this version) aborts. The check
    reads the owner's database, so with `run_as` (uid, gid) it runs as the owner, not as root.
    """
    from banger.system.run import run

    as_owner: list[str] = []
    if run_as is not None:
        as_owner = ["setpriv", f"--reuid={run_as[0]}", f"--regid={run_as[1]}", "--clear-groups"]
    version = staged.info.version
    proc = run([staged.program("banger"), "--version"], check=False, env=env, timeout=60)
    out = (proc.stdout or b"").decode(errors="replace").strip()
    if proc.returncode != 0 or f"v{version}" not in out.split():
        err = (proc.stderr or b"").decode(errors="replace").strip().splitlines()
        detail = out or (err[-1] if err else f"exit status {proc.returncode}")
        raise BangerError(f"the staged banger does not run as v{version}: {detail}")
    proc = run([*as_owner, staged.program("bangerd"), "--check-migrations", "--system"], check=False, env=env,
               timeout=60, cwd="/")
    line = (proc.stdout or b"").decode(errors="replace").strip()
    if proc.returncode == 2:
        raise BangerError(f"v{version} cannot use this host's database: {line}")
    if proc.returncode not in (0, 1):
        err = (proc.stderr or b"").decode(errors="replace").strip().splitlines()
        raise BangerError(f"the staged bangerd --check-migrations failed (exit status {proc.returncode}): "
                          f"{err[-1] if err else line}")
    return line
