"""Building a release from a source checkout (`scripts/make-release`, and `system install` from a checkout).

    scripts/make-release --version 0.2.0 --out DIR [--key KEY.pem]

writes `DIR/0.2.0/banger-0.2.0-linux-amd64.tar.gz`, `DIR/0.2.0/SHA256SUMS`, `DIR/0.2.0/SHA256SUMS.sig`
(with `--key`) and adds the version to `DIR/manifest.json`. The archive holds `release.json` and the
wheels of banger and of every dependency (see stage.py), so installing it needs no network.

The checkout is copied, not built in place: the copy gets the release version in `__init__.py` and
`pyproject.toml`, and a `_build.py` with the commit and build time that `banger --version` prints.
Dependency wheels are pinned to the versions installed in the building environment (the ones the tests
ran against) and cached in a wheelhouse, so later builds need no index.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gzip
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from banger.errors import BangerError
from banger.system.download import sha256_file
from banger.update import manifest as manifest_mod
from banger.update.stage import RELEASE_JSON, WHEELS_DIR, ReleaseInfo

TEST_FAULTS: Final = ("doctor",)
_PEP440 = re.compile(r"\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?(\+[0-9a-z]+(\.[0-9a-z]+)*)?")
_PASS_ENV = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


@dataclass(frozen=True)
class BuiltRelease:
    tarball: Path
    sha256: str
    size: int
    info: ReleaseInfo


def wheel_version(version: str) -> str:
    """The PEP 440 spelling of a release version for the wheel's metadata: `1.2.3-rc.1` → `1.2.3+rc.1`."""
    if manifest_mod.parse_version(version) is not None:
        base, _, label = version.partition("-")
        return f"{base}+{label.lower()}" if label else base
    if _PEP440.fullmatch(version):
        return version
    raise BangerError(f"version {version!r} is neither X.Y.Z[-label] nor a PEP 440 version")


def detect_checkout() -> Path | None:
    """The source checkout this banger runs from, if it runs from one (an editable install)."""
    import banger

    root = Path(banger.__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "src" / "banger" / "__init__.py").is_file():
        return root
    return None


def default_wheelhouse() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "banger-release" / "wheelhouse"


def _pip_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("PIP_") or k in _PASS_ENV}


def _commit(checkout: Path) -> str:
    from banger.system.run import run

    try:
        proc = run(["git", "-C", checkout, "rev-parse", "HEAD"], check=False, timeout=30)
    except BangerError:
        return "unknown"
    text = proc.stdout.decode().strip()
    return text if proc.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", text) else "unknown"


def _substitute(path: Path, pattern: str, replacement: str) -> None:
    text = path.read_text(encoding="utf-8")
    new, count = re.subn(pattern, replacement, text, count=1, flags=re.MULTILINE)
    if count != 1:
        raise BangerError(f"{path}: cannot find the line to set the release version in")
    path.write_text(new, encoding="utf-8")


def _copy_source(checkout: Path, dest: Path, version: str, commit: str, built_at: str,
                 test_fault: str | None) -> None:
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(checkout / name, dest / name)
    shutil.copytree(checkout / "src" / "banger", dest / "src" / "banger",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "_build.py"))
    _substitute(dest / "pyproject.toml", r'^version = "[^"]*"$', f'version = "{wheel_version(version)}"')
    _substitute(dest / "src" / "banger" / "__init__.py", r'^__version__ = "[^"]*"$', f'__version__ = "{version}"')
    lines = ['"""Written by banger.update.release for this build."""\n',
             f"COMMIT = {commit!r}\n", f"BUILT_AT = {built_at!r}\n"]
    if test_fault is not None:
        # Test-only: a deliberately broken release (doctor reports FAIL) to exercise update's rollback.
        lines.append(f"TEST_FAULT = {test_fault!r}\n")
    (dest / "src" / "banger" / "_build.py").write_text("".join(lines), encoding="utf-8")


def _dependency_wheels(checkout: Path, dest: Path, wheelhouse: Path) -> None:
    """Wheels of banger's dependencies, pinned to this environment's versions, into `dest`."""
    import importlib.metadata

    from banger.system.run import run

    with open(checkout / "pyproject.toml", "rb") as f:
        deps = [str(d) for d in tomllib.load(f)["project"]["dependencies"]]
    pins = sorted({f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
                   if d.metadata["Name"] and d.metadata["Name"].lower() != "banger"})
    constraints = dest.parent / "constraints.txt"
    constraints.write_text("\n".join(pins) + "\n", encoding="utf-8")
    wheelhouse.mkdir(parents=True, exist_ok=True)
    collected = dest.parent / "dependency-wheels"
    collected.mkdir()
    base: list[str | os.PathLike[str]] = [
        sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
        "-w", collected, "-c", constraints, "--find-links", wheelhouse]
    # The wheelhouse first (no index at all); the package index only for what it lacks.
    proc = run([*base, "--no-index", *deps], check=False, env=_pip_env(), timeout=600)
    if proc.returncode != 0:
        for stale in collected.glob("*.whl"):
            stale.unlink()
        run([*base, *deps], env=_pip_env(), timeout=1800)
    for wheel in collected.glob("*.whl"):
        if wheel.name.startswith("banger-"):
            raise BangerError(f"a dependency resolved to {wheel.name}; refusing to ship two banger wheels")
        cached = wheelhouse / wheel.name
        if not cached.exists():
            shutil.copy2(wheel, cached)
        shutil.move(wheel, dest / wheel.name)


def _tar_bytes(tar: tarfile.TarFile, name: str, data: bytes | None, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if data is None:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
    else:
        info.size = len(data)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))


def write_archive(path: Path, info: ReleaseInfo, wheel_dir: Path, mtime: int) -> None:
    """The release archive: release.json, the directory wheels/, and each wheel, in that order."""
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=mtime) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        entries: list[tuple[str, bytes | None]] = [
            (RELEASE_JSON, (json.dumps(info.to_json(), indent=2) + "\n").encode()),
            (WHEELS_DIR, None),
        ]
        entries += [(f"{WHEELS_DIR}/{name}", (wheel_dir / name).read_bytes()) for name, _ in info.wheels]
        for name, data in entries:
            _tar_bytes(tar, name, data, mtime)


def build_tarball(checkout: Path, version: str, out_dir: Path, *, wheelhouse: Path | None = None,
                  test_fault: str | None = None) -> BuiltRelease:
    """Build `out_dir/banger-<version>-linux-amd64.tar.gz` from `checkout`."""
    from banger.system.run import run

    if test_fault is not None and test_fault not in TEST_FAULTS:
        raise BangerError(f"unknown test fault {test_fault!r} (allowed: {', '.join(TEST_FAULTS)})")
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH") or time.time())
    built_at = datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    commit = _commit(checkout)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="banger-release-") as tmp_name:
        tmp = Path(tmp_name)
        src = tmp / "source"
        (src / "src").mkdir(parents=True)
        _copy_source(checkout, src, version, commit, built_at, test_fault)
        wheels = tmp / "wheels"
        wheels.mkdir()
        run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
             "-w", wheels, src], env=_pip_env(), timeout=600)
        if len(list(wheels.glob("banger-*.whl"))) != 1:
            raise BangerError("pip wheel did not produce exactly one banger wheel")
        _dependency_wheels(checkout, wheels, wheelhouse or default_wheelhouse())
        info = ReleaseInfo(
            version=version, commit=commit, built_at=built_at,
            python=f"{sys.version_info.major}.{sys.version_info.minor}",
            wheels=tuple((w.name, sha256_file(w)) for w in sorted(wheels.glob("*.whl"))),
        )
        tarball = out_dir / manifest_mod.tarball_name(version)
        partial = tarball.with_name(tarball.name + ".part")
        write_archive(partial, info, wheels, epoch)
        os.replace(partial, tarball)
    return BuiltRelease(tarball, sha256_file(tarball), tarball.stat().st_size, info)


def sign(data: bytes, private_key_pem: bytes) -> bytes:
    """base64(ASN.1 DER ECDSA P-256 / SHA-256 signature of `data`) and a newline: SHA256SUMS.sig."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_pem_private_key(private_key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise BangerError("the signing key is not an ECDSA P-256 private key")
    return base64.b64encode(key.sign(data, ec.ECDSA(hashes.SHA256()))) + b"\n"


def sums_text(entries: dict[str, str]) -> bytes:
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(entries.items())).encode()


def add_to_manifest(out_dir: Path, entry: manifest_mod.ReleaseEntry, latest: bool | None) -> manifest_mod.Manifest:
    """Add (or replace) `entry` in `out_dir/manifest.json`. `latest=None`: latest if it is the newest stable."""
    path = out_dir / "manifest.json"
    versions: dict[str, manifest_mod.ReleaseEntry] = {}
    current_latest: str | None = None
    if path.exists():
        old = manifest_mod.parse(path.read_bytes(), str(path))
        versions, current_latest = dict(old.versions), old.latest_stable
    versions[entry.version] = entry
    if latest is None:
        newest_stable = max((v for v in versions if manifest_mod.is_stable(v)), key=manifest_mod.version_key,
                            default=None)
        latest = newest_stable == entry.version or current_latest is None
    new_latest = entry.version if latest else (current_latest or entry.version)
    result = manifest_mod.Manifest(manifest_mod.SCHEMA_VERSION, new_latest, versions)
    tmp = path.with_name(".manifest.json.tmp")
    tmp.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return result


def publish_dir(built: BuiltRelease, out_dir: Path, key_pem: bytes | None, latest: bool | None) -> Path:
    """SHA256SUMS (+ .sig) next to the tarball in `out_dir/<version>/`, and the manifest entry."""
    version_dir = built.tarball.parent
    sums = sums_text({built.tarball.name: built.sha256})
    (version_dir / "SHA256SUMS").write_bytes(sums)
    sig = version_dir / "SHA256SUMS.sig"
    if key_pem is not None:
        sig.write_bytes(sign(sums, key_pem))
    else:
        with contextlib.suppress(FileNotFoundError):
            sig.unlink()
    rel = built.tarball.relative_to(out_dir).as_posix()
    add_to_manifest(out_dir, manifest_mod.ReleaseEntry(built.info.version, rel, built.sha256, built.size), latest)
    return version_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make-release", description="Build a banger release from this checkout.")
    p.add_argument("--version", required=True, help="release version, X.Y.Z or X.Y.Z-label (a leading v is dropped)")
    p.add_argument("--out", required=True, type=Path, help="release directory (manifest.json, <version>/...)")
    p.add_argument("--key", type=Path, help="ECDSA P-256 private key (PEM) to sign SHA256SUMS with")
    p.add_argument("--checkout", type=Path, help="source checkout (default: the one this banger runs from)")
    p.add_argument("--wheelhouse", type=Path, help=f"dependency wheel cache (default: {default_wheelhouse()})")
    p.add_argument("--latest", action=argparse.BooleanOptionalAction, default=None,
                   help="make it the manifest's latest_stable (default: if it is the newest stable version)")
    p.add_argument("--test-fault", choices=TEST_FAULTS,
                   help="TEST ONLY: build a deliberately broken release (doctor reports FAIL)")
    args = p.parse_args(argv)
    try:
        version = manifest_mod.normalize_version(args.version)
        checkout = args.checkout or detect_checkout()
        if checkout is None:
            raise BangerError("cannot find the source checkout; pass --checkout")
        key_pem = args.key.read_bytes() if args.key else None
        out = args.out.resolve()
        built = build_tarball(checkout, version, out / version, wheelhouse=args.wheelhouse,
                              test_fault=args.test_fault)
        publish_dir(built, out, key_pem, args.latest)
    except (BangerError, OSError) as exc:
        print(f"make-release: {exc}", file=sys.stderr)
        return 1
    print(f"{built.tarball}  {built.sha256}  {built.size} bytes  ({len(built.info.wheels)} wheels)")
    if key_pem is None:
        print("make-release: not signed (no --key); `banger update` will refuse this release", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
