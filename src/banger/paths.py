"""Where banger keeps things. The only module that builds banger's paths.

Two layouts: user mode (XDG directories of the invoking user; the embedded default) and system mode
(`/etc/banger`, `/var/lib/banger`, ...; set up by `banger system install`). `BANGER_SYSTEM_PREFIX`
relocates the system layout under a directory, for tests and packaging.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from banger.errors import BangerError

Mode = Literal["user", "system"]


@dataclass(frozen=True)
class Layout:
    mode: Mode
    config_dir: Path
    state_dir: Path
    cache_dir: Path
    runtime_dir: Path
    helper_runtime_dir: Path
    owner_home: Path

    # Files and directories derived from the roots above.
    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.toml"

    @property
    def install_meta(self) -> Path:
        return self.config_dir / "install.toml"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def daemon_log(self) -> Path:
        return self.state_dir / "bangerd.log"

    @property
    def helper_log(self) -> Path:
        return self.state_dir / "bangerd-root.log"

    @property
    def vms_dir(self) -> Path:
        return self.state_dir / "vms"

    @property
    def images_dir(self) -> Path:
        return self.state_dir / "images"

    @property
    def kernels_dir(self) -> Path:
        return self.state_dir / "kernels"

    @property
    def oci_cache_dir(self) -> Path:
        return self.cache_dir / "oci"

    @property
    def downloads_dir(self) -> Path:
        return self.cache_dir / "downloads"

    @property
    def updates_dir(self) -> Path:
        return self.cache_dir / "updates"

    @property
    def ssh_dir(self) -> Path:
        return self.state_dir / "ssh"

    @property
    def ssh_key(self) -> Path:
        return self.ssh_dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        # Pins live in the owner's home in both modes and survive `system uninstall --purge`.
        return self.owner_home / ".local" / "state" / "banger" / "ssh" / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        return self.owner_home / ".config" / "banger" / "ssh_config"

    @property
    def daemon_socket(self) -> Path:
        return self.runtime_dir / "bangerd.sock"

    @property
    def helper_socket(self) -> Path:
        return self.helper_runtime_dir / "bangerd-root.sock"

    @property
    def daemon_pidfile(self) -> Path:
        return self.runtime_dir / "bangerd.pid"

    @property
    def helper_pidfile(self) -> Path:
        return self.helper_runtime_dir / "bangerd-root.pid"

    def vm_dir(self, vm_id: str) -> Path:
        return self.vms_dir / vm_id

    def image_dir(self, image_id: str) -> Path:
        return self.images_dir / image_id

    def kernel_dir(self, name: str) -> Path:
        return self.kernels_dir / name

    def managed_roots(self) -> tuple[Path, ...]:
        """Directories under which the root helper accepts paths."""
        return (self.state_dir, self.cache_dir, self.runtime_dir, self.helper_runtime_dir)


def _xdg(var: str, home: Path, default: str) -> Path:
    value = os.environ.get(var)
    if value and os.path.isabs(value):
        return Path(value)
    return home / default


def home_of_current_user() -> Path:
    home = os.environ.get("HOME")
    if home and os.path.isabs(home):
        return Path(home)
    import pwd

    return Path(pwd.getpwuid(os.getuid()).pw_dir)


def resolve_user() -> Layout:
    home = home_of_current_user()
    xdg_runtime = os.environ.get("XDG_RUNTIME_DIR")
    if xdg_runtime and os.path.isabs(xdg_runtime):
        runtime = Path(xdg_runtime) / "banger"
    else:
        runtime = Path(f"/tmp/banger-runtime-{os.getuid()}")
    return Layout(
        mode="user",
        config_dir=_xdg("XDG_CONFIG_HOME", home, ".config") / "banger",
        state_dir=_xdg("XDG_STATE_HOME", home, ".local/state") / "banger",
        cache_dir=_xdg("XDG_CACHE_HOME", home, ".cache") / "banger",
        runtime_dir=runtime,
        helper_runtime_dir=runtime,
        owner_home=home,
    )


def system_prefix() -> Path:
    prefix = os.environ.get("BANGER_SYSTEM_PREFIX", "")
    return Path(prefix) if prefix else Path("/")


def resolve_system(owner_home: Path | None = None) -> Layout:
    p = system_prefix()
    return Layout(
        mode="system",
        config_dir=p / "etc/banger",
        state_dir=p / "var/lib/banger",
        cache_dir=p / "var/cache/banger",
        runtime_dir=p / "run/banger",
        helper_runtime_dir=p / "run/banger-root",
        owner_home=owner_home if owner_home is not None else home_of_current_user(),
    )


def system_install_meta() -> Path:
    return system_prefix() / "etc/banger/install.toml"


@dataclass(frozen=True)
class InstallPaths:
    """Where a system install puts banger itself (not its state): the versioned code, the stable
    entry points, the unit files and the logs of the services when systemd does not supervise them."""

    opt_dir: Path  # /opt/banger
    bin_dir: Path  # /usr/local/bin
    unit_dir: Path  # /etc/systemd/system
    log_dir: Path  # /var/log/banger

    @property
    def versions_dir(self) -> Path:
        return self.opt_dir / "versions"

    @property
    def current(self) -> Path:
        """Symlink to the active version directory; swapping it is the one atomic step of an update."""
        return self.opt_dir / "current"

    @property
    def staging_dir(self) -> Path:
        """Update downloads: root-only, unlike /var/cache/banger, which the owner daemon can write."""
        return self.opt_dir / "staging"

    def version_dir(self, name: str) -> Path:
        return self.versions_dir / name

    def entry_point(self, program: str) -> Path:
        return self.bin_dir / program

    def unit_file(self, unit: str) -> Path:
        return self.unit_dir / unit

    def service_log(self, program: str) -> Path:
        return self.log_dir / f"{program}.log"


def system_install_paths() -> InstallPaths:
    p = system_prefix()
    return InstallPaths(
        opt_dir=p / "opt/banger",
        bin_dir=p / "usr/local/bin",
        unit_dir=p / "etc/systemd/system",
        log_dir=p / "var/log/banger",
    )


def ensure_private_dir(path: Path, mode: int = 0o700) -> Path:
    """Create `path` (0700 by default) or check an existing one: a real directory we own, not a symlink.

    The fallback runtime directory lives in /tmp, where another user could plant a symlink or a
    directory of their own first; both are refused.
    """
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=mode, parents=True)
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        raise BangerError(f"{path} is a symlink; refusing to use it", hint="remove it and retry")
    if not stat.S_ISDIR(st.st_mode):
        raise BangerError(f"{path} is not a directory", hint="remove it and retry")
    if st.st_uid != os.getuid():
        raise BangerError(
            f"{path} is owned by uid {st.st_uid}, not {os.getuid()}; refusing to use it",
            hint="remove it or set XDG_RUNTIME_DIR",
        )
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)
    return path
