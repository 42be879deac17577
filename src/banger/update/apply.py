"""`banger update`: the steps of reference §10.5, in order.

1. Fetch the manifest (≤ 1 MiB, known schema_version) and pick the target (`--to` or latest_stable);
   an unknown version fails here, before anything on the host changes.
2. `--check` prints one line and stops (no root needed).
3. Root from here on; a system install must exist.
4. Refuse while the daemon has operations in flight (`daemon.operations.list`), unless `--force`.
5. Clean the staging directory (/opt/banger/staging, root's alone); download SHA256SUMS (≤ 16 KiB) and its
   signature, verify the signature with the compiled-in key, parse SHA256SUMS strictly; stream the
   archive (≤ 256 MiB) hashing as it arrives; a mismatch deletes the partial file.
6. Check the archive's exact contents and stage it as a version directory (stage.py).
7. Sanity-run the staged version: `banger --version` names it; `bangerd --check-migrations --system`
   exits 0 or 1 (2, a database newer than that version, aborts before the swap).
8. `--dry-run` stops here and leaves the staging in place.
9. Swap install.toml (new version, commit, build time) and the `current` link, each with
   atomic_replace; restart the root helper, then the daemon; wait until the daemon answers as the new
   version.
10. Run `banger doctor` with the new version. A FAIL there, or any failure from the swap on, rolls
    everything back (files in reverse order, then the services again) and reports the original error
    with "(rolled back to previous install)". If the rollback fails too, both errors are reported.
11. Success: drop the backups, the staging, and versions older than the one just replaced.

Never automatic and never in the background: only this command changes the installed version.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from banger import buildinfo, paths
from banger.errors import BangerError
from banger.system import install as sysinstall
from banger.system import installmeta, supervise
from banger.system.atomic import atomic_replace, atomic_replace_rollback, remove_backup
from banger.update import manifest as manifest_mod
from banger.update import verify

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey

Say = Callable[[str], None]
Status = Literal["up-to-date", "available", "dry-run", "updated"]

DOCTOR_TIMEOUT = 180.0


@dataclass(frozen=True)
class UpdateRequest:
    check: bool = False
    to: str | None = None
    dry_run: bool = False
    force: bool = False
    manifest_url: str = manifest_mod.DEFAULT_MANIFEST_URL
    pubkey_file: Path | None = None


@dataclass(frozen=True)
class UpdateOutcome:
    status: Status
    line: str
    installed: str
    target: str


def check_line(installed: str, target: str, explicit: bool) -> tuple[Status, str]:
    if installed == target:
        return "up-to-date", f"banger v{installed} is up to date"
    if not explicit and manifest_mod.version_key(installed) > manifest_mod.version_key(target):
        return "up-to-date", f"banger v{installed} is up to date (newer than the latest stable v{target})"
    to = f" --to v{target}" if explicit else ""
    return "available", f"update available: v{installed} -> v{target} (run `sudo banger update{to}`)"


def in_flight(operations: object) -> list[dict[str, Any]]:
    """The operations of a `daemon.operations.list` answer that are not done."""
    if not isinstance(operations, list):
        raise BangerError("daemon.operations.list answered without a list of operations")
    return [op for op in operations if isinstance(op, dict) and not op.get("done")]


def _describe(op: dict[str, Any]) -> str:
    return f"{op.get('kind', '?')} {op.get('target', '')} ({op.get('id', '?')}, {op.get('stage', '?')})".replace(
        "  ", " ")


def _refuse_in_flight(svc: supervise.Services, force: bool, say: Say) -> None:
    from banger.rpc import client

    try:
        result = client.call(svc.layout.daemon_socket, "daemon.operations.list", {}, timeout=10, connect_timeout=2)
    except client.Unreachable:
        say("the daemon is not running: no operations to wait for")
        return
    busy = in_flight(result.get("operations") if isinstance(result, dict) else None)
    if not busy:
        return
    listed = "; ".join(_describe(op) for op in busy)
    if not force:
        raise BangerError(f"{len(busy)} operation(s) in flight: {listed}; refusing to update",
                          hint="wait for them to finish, or pass --force")
    say(f"--force: updating with {len(busy)} operation(s) in flight: {listed}")


def _fresh_dir(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, mode=0o700)


def _download(entry: manifest_mod.ReleaseEntry, url: str, staging: Path,
              key: EllipticCurvePublicKey, say: Say) -> Path:
    from banger.system.download import fetch_to

    say("downloading SHA256SUMS and SHA256SUMS.sig")
    sums_path = fetch_to(entry.sums_url(url), staging, max_bytes=verify.MAX_SUMS_BYTES)
    sig_path = fetch_to(entry.sig_url(url), staging, max_bytes=verify.MAX_SIG_BYTES)
    sums_bytes = sums_path.read_bytes()
    verify.verify_signature(sums_bytes, sig_path.read_bytes(), key)
    sums = verify.parse_sha256sums(sums_bytes)
    name = manifest_mod.tarball_name(entry.version)
    digest = sums.get(name)
    if digest is None:
        raise BangerError(f"the signed SHA256SUMS has no entry for {name}; refusing this release")
    if digest != entry.sha256:
        raise BangerError(f"the manifest's sha256 for {name} ({entry.sha256[:12]}…) differs from the signed "
                          f"SHA256SUMS ({digest[:12]}…); refusing this release")
    say(f"downloading {name} ({entry.size} bytes)")
    return fetch_to(entry.tarball_url(url), staging, max_bytes=manifest_mod.MAX_TARBALL_BYTES, sha256=digest,
                    size=entry.size)


def _doctor(ip: paths.InstallPaths, env: dict[str, str]) -> None:
    """`banger doctor --json` run through the stable entry point, i.e. by the version now current."""
    from banger.system.run import run

    program = ip.entry_point("banger")
    proc = run([program, "doctor", "--json"], check=False, env=env, timeout=DOCTOR_TIMEOUT)
    if proc.returncode == 0:
        return
    try:
        rows = json.loads(proc.stdout or b"")
    except ValueError:
        rows = None
    if isinstance(rows, list):
        failed = [r for r in rows if isinstance(r, dict) and r.get("status") == "FAIL"]
        if failed:
            first = failed[0]
            names = ", ".join(str(r.get("name")) for r in failed)
            raise BangerError(f"doctor reports FAIL ({names}): {first.get('summary', '')}")
    err = (proc.stderr or b"").decode(errors="replace").strip().splitlines()
    raise BangerError(f"`{program} doctor` failed with exit status {proc.returncode}"
                      + (f": {err[-1]}" if err else ""))


def _rollback(swapped: list[Path], restart: bool, svc: supervise.Services) -> list[str]:
    """Undo the swaps in reverse order, then restart the services if they were restarted. Returns errors."""
    errors: list[str] = []
    for path in reversed(swapped):
        try:
            atomic_replace_rollback(path, sysinstall.SUFFIX)
        except BangerError as exc:
            errors.append(str(exc))
    if restart:
        try:
            supervise.restart_all(svc)
        except BangerError as exc:
            errors.append(f"restarting the previous version: {exc}")
    return errors


def run_update(req: UpdateRequest, say: Say = lambda _: None) -> UpdateOutcome:
    manifest = manifest_mod.fetch(req.manifest_url)
    entry = manifest_mod.choose_target(manifest, req.to)
    meta = installmeta.read()
    installed = meta.version if meta is not None and meta.version else buildinfo.current().version
    status, line = check_line(installed, entry.version, req.to is not None)
    if req.check:
        return UpdateOutcome(status, line, installed, entry.version)

    sysinstall.require_root("banger update")
    if meta is None:
        raise BangerError("there is no system install to update",
                          hint="install one with `sudo banger system install --owner <user>`")
    if entry.version == installed:
        return UpdateOutcome("up-to-date", line, installed, entry.version)
    key = verify.key_from_file(req.pubkey_file) if req.pubkey_file else verify.compiled_in_key()
    ip = paths.system_install_paths()
    with sysinstall.exclusive(ip, "update"):
        return _apply(req, entry, meta, installed, key, ip, say)


def _apply(req: UpdateRequest, entry: manifest_mod.ReleaseEntry, meta: installmeta.InstallMeta, installed: str,
           key: EllipticCurvePublicKey, ip: paths.InstallPaths, say: Say) -> UpdateOutcome:
    svc = supervise.services(meta)
    _refuse_in_flight(svc, req.force, say)

    # Not /var/cache/banger/updates (reference §10.5): that directory's parent belongs to the owner, who
    # could swap a verified file before root uses it. /opt/banger is root's alone.
    staging = ip.staging_dir
    _fresh_dir(staging)
    tarball = _download(entry, req.manifest_url, staging, key, say)
    say(f"checking {tarball.name} and staging v{entry.version}")
    previous = sysinstall.current_version_dir(ip)
    env = sysinstall.service_env()
    version_dir, version, migrations = sysinstall.stage_tarball(tarball, ip, env, meta,
                                                                expect_version=entry.version)
    say(f"staged v{version} in {version_dir}; database: {migrations}")
    if req.dry_run:
        return UpdateOutcome("dry-run", f"dry run: v{installed} -> v{version} is ready to swap "
                             f"(staged in {version_dir}; downloads in {staging})", installed, version)

    info = sysinstall.version_info(version_dir)
    new_meta = replace(meta, version=version, commit=str(info.get("commit", "")),
                       built_at=str(info.get("built_at", "")))
    swapped: list[Path] = []
    restarted = False
    try:
        meta_path = svc.layout.install_meta
        pending = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.new")
        sysinstall.write_file_atomic(pending, installmeta.render(new_meta), 0o644)
        atomic_replace(pending, meta_path, sysinstall.SUFFIX)
        swapped.append(meta_path)
        sysinstall.swap_current(ip, version_dir)
        swapped.append(ip.current)
        say(f"swapped {ip.current} -> {version_dir.name}; restarting bangerd-root, then bangerd")
        restarted = True
        supervise.restart_all(svc)
        ping = supervise.daemon_ping(svc) or {}
        if ping.get("version") != version:
            raise BangerError(f"the restarted daemon reports v{ping.get('version')}, not v{version}")
        say(f"running `banger doctor` as v{version}")
        _doctor(ip, env)
    except BangerError as exc:
        errors = _rollback(swapped, restarted, svc)
        if errors:
            raise BangerError(
                f"update to v{version} failed: {exc}; the rollback failed too: {'; '.join(errors)}",
                hint=f"repair by hand: point {ip.current} at the previous version directory, restore "
                     f"{svc.layout.install_meta}{sysinstall.SUFFIX} if present, then `sudo banger system restart`",
            ) from exc
        shutil.rmtree(version_dir, ignore_errors=True)
        raise BangerError(f"update to v{version} failed: {exc} (rolled back to previous install)") from exc

    for path in swapped:
        remove_backup(path, sysinstall.SUFFIX)
    shutil.rmtree(staging, ignore_errors=True)
    sysinstall.prune_versions(ip, {version_dir} | ({previous} if previous else set()))
    return UpdateOutcome("updated", f"updated banger v{installed} -> v{version}", installed, version)
