"""Golden images: Debian root filesystems built on this host from Debian's archive.

`build_golden` runs mmdebstrap (minbase plus a fixed package list) into a zstd tarball, then the same
rootless pipeline as every other image: flatten the tar, `mkfs.ext4 -d`, replay owners and modes with
debugfs, inject banger's guest files, build the work seed, write manifest.json. The output directory
ends up holding rootfs.ext4, work-seed.ext4 (unless that failed; it is optional) and manifest.json.

The tarball is cached under `cache_dir`, keyed by what went into it (suite, arch, package list, the
customize hooks, this module's format version). The archive moves on, but a cached build is still a
valid image; the manifest records when the tarball was built. mmdebstrap runs in `--mode=unshare`:
as root that only means private namespaces; as another user it needs unprivileged user namespaces
and subordinate ids.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pwd
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from banger.errors import BangerError
from banger.images import ext4
from banger.images.flatten import flatten_tar_file
from banger.images.guestfiles import guest_files
from banger.images.inject import inject
from banger.images.progress import BuildReporter, Silent
from banger.images.workseed import build_work_seed
from banger.system.download import sha256_file
from banger.system.run import find_binary, run, spawn

if TYPE_CHECKING:
    import subprocess

log = logging.getLogger("banger.images.golden")

CACHE_FORMAT = 1
MMDEBSTRAP_VARIANT = "minbase"
MMDEBSTRAP_TIMEOUT = 3600.0
DEFAULT_MAX_BYTES = 16 << 30
LOG_TAIL_LINES = 12
_PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")

# Bookworm names. Some are Essential or Priority: required already; listing them costs nothing.
BASE_PACKAGES: tuple[str, ...] = (
    "systemd", "systemd-sysv", "udev", "dbus", "openssh-server", "python3", "iproute2", "iputils-ping",
    "ca-certificates", "curl", "git", "jq", "sudo", "less", "procps", "netbase", "kmod", "util-linux",
    "vim-tiny", "nano", "ncurses-base",
)
VARIANTS: dict[str, tuple[str, ...]] = {
    "base": (),
    "full": ("docker.io", "build-essential", "tmux"),
}

# Run by mmdebstrap on the host with the chroot as "$1", after the packages are installed.
CUSTOMIZE_HOOKS: tuple[str, ...] = (
    'rm -f "$1"/etc/ssh/ssh_host_*',  # every VM makes its own at first boot
    'chroot "$1" passwd -l root',  # root logs in by key only
    'rm -rf "$1"/var/lib/apt/lists/*',
    ': > "$1"/etc/machine-id',  # systemd's first-boot semantics; each VM gets its own id
    # mmdebstrap copies these two from the build host; each VM gets its own (banger.guest.identity).
    'echo debian > "$1"/etc/hostname',
    'rm -f "$1"/etc/resolv.conf',
    # The one name in bookworm that debugfs scripts cannot carry (a backslash); systemd makes the slice
    # on the fly when something needs it, and nothing does without cryptsetup.
    'rm -f "$1/usr/lib/systemd/system/system-systemd\\x2dcryptsetup.slice"',
)


@dataclass(frozen=True)
class GoldenVariant:
    name: str  # the image name, e.g. debian-bookworm
    suite: str
    variant: str  # a key of VARIANTS
    kernel_ref: str
    arch: str = "amd64"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            allowed = ", ".join(VARIANTS)
            raise BangerError(f"golden variant {self.variant!r} is not known (allowed: {allowed})")

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(sorted({*BASE_PACKAGES, *VARIANTS[self.variant]}))

    def cache_key(self) -> str:
        """sha256 over everything that decides the tarball's contents (the mirror does not)."""
        spec = {
            "format": CACHE_FORMAT,
            "suite": self.suite,
            "arch": self.arch,
            "mmdebstrap_variant": MMDEBSTRAP_VARIANT,
            "packages": list(self.packages),
            "hooks": list(CUSTOMIZE_HOOKS),
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class GoldenResult:
    directory: Path
    rootfs: Path
    work_seed: Path | None  # None when the seed could not be built (non-fatal)
    manifest_path: Path
    manifest: dict[str, Any]
    cached: bool  # the mmdebstrap tarball came from the cache
    timings: dict[str, float] = field(default_factory=dict)


class Canceled(BangerError):
    def __init__(self) -> None:
        super().__init__("image build canceled")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------- mmdebstrap


def _unshare_problem() -> str | None:
    """Why `mmdebstrap --mode=unshare` cannot work for this user, or None."""
    for knob, meaning in (("/proc/sys/kernel/unprivileged_userns_clone", "kernel.unprivileged_userns_clone"),
                          ("/proc/sys/user/max_user_namespaces", "user.max_user_namespaces")):
        with contextlib.suppress(OSError, ValueError):
            if int(Path(knob).read_text().strip()) == 0:
                return f"unprivileged user namespaces are disabled ({meaning}=0)"
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    for table in ("/etc/subuid", "/etc/subgid"):
        try:
            lines = Path(table).read_text().splitlines()
        except OSError:
            lines = []
        if not any(line.split(":", 1)[0] in (user, str(uid)) for line in lines if ":" in line):
            return f"user {user} has no subordinate id range in {table}"
    if find_binary("newuidmap") is None or find_binary("newgidmap") is None:
        return "newuidmap/newgidmap are missing (Debian package uidmap)"
    return None


def _mode(variant: GoldenVariant) -> str:
    """mmdebstrap's --mode: `unshare` whenever it works, else (as root) `auto`, which picks `root`.

    As root, unshare mode still gives mmdebstrap private mount and pid namespaces, so a build that is
    killed (canceled, timed out) leaves no /proc, /sys or /dev mounts behind inside the work directory.
    """
    if os.geteuid() == 0:
        try:
            probe = run(["unshare", "--mount", "--propagation", "unchanged", "--", "true"], check=False)
        except BangerError:
            return "auto"
        return "unshare" if probe.returncode == 0 else "auto"
    problem = _unshare_problem()
    if problem:
        raise BangerError(f"cannot build {variant.name} without root: {problem}",
                          hint="run the daemon as root, or give the user subordinate ids "
                               "(`usermod --add-subuids 100000-165535 --add-subgids 100000-165535 USER`)")
    return "unshare"


def _mmdebstrap_argv(variant: GoldenVariant, mirror: str, out: Path, mode: str) -> list[str]:
    return [
        "mmdebstrap",
        f"--variant={MMDEBSTRAP_VARIANT}",
        f"--mode={mode}",
        "--format=tar",
        f"--architectures={variant.arch}",
        f"--include={','.join(variant.packages)}",
        *(f"--customize-hook={hook}" for hook in CUSTOMIZE_HOOKS),
        variant.suite,
        os.fspath(out),
        mirror,
    ]


def _kill_group(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGKILL mmdebstrap's process group (its own session: apt, dpkg, tar, the namespace's processes)
    and wait until every member is gone, so nothing writes into the work directory afterwards."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        proc.poll()  # reap the leader (our child), or the group never empties
        time.sleep(0.05)
    log.warning("processes of mmdebstrap's group %d survived SIGKILL for %.0fs", proc.pid, timeout)


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 16384))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip()][-lines:]


def run_mmdebstrap(variant: GoldenVariant, mirror: str, out: Path, work_dir: Path, *,
                   reporter: BuildReporter, cancel: threading.Event | None = None) -> None:
    """Build `out` (a .tar.zst) with mmdebstrap; its output goes to `work_dir/mmdebstrap.log`."""
    if find_binary("mmdebstrap") is None:
        raise BangerError("mmdebstrap not found; it builds golden images",
                          hint="install it (`apt-get install mmdebstrap`) or run `banger doctor`")
    argv = _mmdebstrap_argv(variant, mirror, out, _mode(variant))
    log_path = work_dir / "mmdebstrap.log"
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        # TMPDIR: mmdebstrap's chroot lives in the work directory, not in a possibly small /tmp.
        # apt inside it needs the host's proxy settings, which the minimal environment leaves out.
        env = {k: os.environ[k] for k in _PROXY_VARS if k in os.environ}
        env["TMPDIR"] = os.fspath(work_dir)
        proc = spawn(argv, stdout=fd, stderr=fd, env=env, new_session=True)
    finally:
        os.close(fd)
    deadline = time.monotonic() + MMDEBSTRAP_TIMEOUT
    shown = ""
    try:
        while proc.poll() is None:
            if cancel is not None and cancel.is_set():
                raise Canceled()
            if time.monotonic() > deadline:
                raise BangerError(f"mmdebstrap did not finish within {MMDEBSTRAP_TIMEOUT:.0f}s")
            latest = next((ln for ln in reversed(_tail(log_path, 4)) if ln.startswith("I: ")), "")
            if latest and latest != shown:
                shown = latest
                reporter.detail(latest[3:].rstrip("."))
            if cancel is not None:
                cancel.wait(0.5)
            else:
                time.sleep(0.5)
    finally:
        if proc.poll() is None:
            _kill_group(proc)
            proc.wait()
    if proc.returncode != 0:
        tail = _tail(log_path)
        log.warning("mmdebstrap failed (exit %d); last lines:\n%s", proc.returncode, "\n".join(tail))
        detail = " | ".join(line for line in tail if not line.startswith("I: ")) or " | ".join(tail)
        raise BangerError(f"mmdebstrap failed with exit status {proc.returncode}: {detail[-800:]}",
                          hint=f"check that {mirror} is reachable and serves {variant.suite}")
    if not out.is_file():
        raise BangerError(f"mmdebstrap succeeded but wrote no {out.name}")


def _cache_paths(cache_dir: Path, variant: GoldenVariant) -> tuple[Path, Path]:
    stem = f"golden-{variant.name}-{variant.arch}-{variant.cache_key()[:16]}"
    return cache_dir / f"{stem}.tar.zst", cache_dir / f"{stem}.json"


def _cached_tar(cache_dir: Path, variant: GoldenVariant) -> tuple[Path, dict[str, Any]] | None:
    """The cached tarball and its record, if both are there and the tarball still matches its sha256."""
    tar, meta_path = _cache_paths(cache_dir, variant)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if not tar.is_file() or not isinstance(meta, dict) or meta.get("key") != variant.cache_key():
        return None
    if tar.stat().st_size != meta.get("size") or sha256_file(tar) != meta.get("sha256"):
        log.warning("cached %s does not match its record; building again", tar)
        tar.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
        return None
    return tar, meta


def _store_in_cache(cache_dir: Path, variant: GoldenVariant, built: Path, meta: dict[str, Any]) -> Path:
    """Move `built` into the cache (record first, then the tarball, each atomically); drop stale keys."""
    tar, meta_path = _cache_paths(cache_dir, variant)
    cache_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"golden-{variant.name}-{variant.arch}-"
    for old in cache_dir.glob(f"{prefix}*"):
        if old not in (tar, meta_path):
            old.unlink(missing_ok=True)
    fd, tmp_meta = tempfile.mkstemp(prefix=".golden-", dir=cache_dir)
    with os.fdopen(fd, "w") as handle:
        json.dump(meta, handle, indent=2)
        os.fchmod(handle.fileno(), 0o644)
    os.replace(tmp_meta, meta_path)
    fd, tmp_tar = tempfile.mkstemp(prefix=".golden-", dir=cache_dir)
    os.close(fd)
    try:
        shutil.move(built, tmp_tar)
        os.chmod(tmp_tar, 0o644)
        os.replace(tmp_tar, tar)
    except BaseException:
        Path(tmp_tar).unlink(missing_ok=True)
        raise
    return tar


def _obtain_tar(variant: GoldenVariant, mirror: str, work_dir: Path, cache_dir: Path | None,
                reporter: BuildReporter, cancel: threading.Event | None) -> tuple[Path, dict[str, Any], bool]:
    if cache_dir is not None:
        hit = _cached_tar(cache_dir, variant)
        if hit is not None:
            log.info("using cached golden tarball %s (built %s)", hit[0], hit[1].get("built_at"))
            return hit[0], hit[1], True
    built = work_dir / "rootfs.tar.zst"
    run_mmdebstrap(variant, mirror, built, work_dir, reporter=reporter, cancel=cancel)
    meta = {"key": variant.cache_key(), "built_at": _now(), "mirror": mirror, "size": built.stat().st_size,
            "sha256": sha256_file(built), "packages": list(variant.packages)}
    if cache_dir is None:
        return built, meta, False
    return _store_in_cache(cache_dir, variant, built, meta), meta, False


# ------------------------------------------------------------------------------------------ the image


def _installed_packages(root: Path) -> int:
    try:
        status = (root / "var/lib/dpkg/status").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return 0
    return sum(1 for block in status.split("\n\n") if "\nStatus: install ok installed" in f"\n{block}")


def build_golden(variant: GoldenVariant, mirror: str, work_dir: Path, out_dir: Path, *,
                 cache_dir: Path | None, reporter: BuildReporter | None = None,
                 cancel: threading.Event | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> GoldenResult:
    """Build `variant` into `out_dir` (rootfs.ext4, work-seed.ext4, manifest.json).

    `work_dir` holds scratch files (the unpacked tree, mmdebstrap.log) and is the caller's to remove;
    on failure `out_dir` may hold partial files and is the caller's to remove too. `cancel` is checked
    between steps and while mmdebstrap runs.
    """
    rep: BuildReporter = reporter if reporter is not None else Silent()
    timings: dict[str, float] = {}

    def checkpoint() -> None:
        if cancel is not None and cancel.is_set():
            raise Canceled()

    started = time.monotonic()
    rep.stage("building root filesystem (mmdebstrap)")
    tar, tar_meta, cached = _obtain_tar(variant, mirror, work_dir, cache_dir, rep, cancel)
    timings["mmdebstrap"] = time.monotonic() - started
    checkpoint()

    started = time.monotonic()
    rep.stage("making ext4")
    rep.detail("unpacking")
    tree = work_dir / "rootfs"
    metadata = flatten_tar_file(tar, tree, max_bytes)
    installed = _installed_packages(tree)
    checkpoint()
    rootfs = out_dir / "rootfs.ext4"
    rep.detail("mkfs.ext4")
    ext4.build_ext4(tree, rootfs, label="rootfs")
    shutil.rmtree(tree, ignore_errors=True)  # the tree is as big as the image; free it early
    checkpoint()
    rep.detail("owners and modes")
    ext4.apply_metadata(rootfs, metadata)
    timings["ext4"] = time.monotonic() - started
    checkpoint()

    started = time.monotonic()
    rep.stage("injecting guest files")
    inject(rootfs, guest_files())
    timings["inject"] = time.monotonic() - started
    checkpoint()

    started = time.monotonic()
    rep.stage("work seed")
    seed_path = out_dir / "work-seed.ext4"
    seed = seed_path if build_work_seed(rootfs, seed_path, work_dir) else None
    timings["work_seed"] = time.monotonic() - started

    manifest: dict[str, Any] = {
        "name": variant.name,
        "distro": "debian",
        "suite": variant.suite,
        "arch": variant.arch,
        "variant": variant.variant,
        "kernel_ref": variant.kernel_ref,
        "packages": list(variant.packages),
        "installed_packages": installed,
        "built_at": tar_meta.get("built_at", ""),
        "assembled_at": _now(),
        "mirror": tar_meta.get("mirror", mirror),
        "tarball_sha256": tar_meta.get("sha256", ""),
        "init": "fast",
        "work_seed": seed is not None,
    }
    manifest_path = out_dir / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log.info("golden image %s built (%s): %s", variant.name,
             "cached tarball" if cached else "fresh mmdebstrap",
             ", ".join(f"{step} {secs:.1f}s" for step, secs in timings.items()))
    return GoldenResult(directory=out_dir, rootfs=rootfs, work_seed=seed, manifest_path=manifest_path,
                        manifest=manifest, cached=cached, timings=timings)

