"""Starting Firecracker through its jailer, which must run as root: the seam to the root helper.

The daemon is never root, so a jailed start is three privileged steps that `FirecrackerVmm` asks of a
`JailLauncher`: stage (build the chroot), launch (run the jailer; Firecracker's pid comes back), cleanup
(remove the chroot). The daemon adapts its root-helper client to this Protocol, so this backend never
imports the helper. The methods block: `Vmm` methods run in a worker thread.

`JailRequest` is what stage sends: the jail and the VM's files by host path. The helper trusts none of it:
it re-derives every path, re-checks every file and plans the staging itself with `jailer.files_to_stage`.
`jail_links()` is shared by both sides: the sockets and logs Firecracker makes inside the chroot are
reached through symlinks in the VM's run directory, at the paths a direct launch would use, so the rest
of banger sees one layout either way (and the API socket's path stays short for AF_UNIX).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from banger.errors import BadRequest
from banger.vmm.firecracker.config import FirecrackerVmConfig
from banger.vmm.firecracker.jailer import JailPlan

API_SOCKET_NAME: Final = "fc.sock"  # in the run directory: the socket itself (direct) or a link to it (jailed)


@dataclass(frozen=True)
class JailRequest:
    """One VM's jail: `plan` says where, `cfg` (with host paths) what goes in, `run_dir` where the links go."""

    vm_id: str
    run_dir: str
    plan: JailPlan
    cfg: FirecrackerVmConfig

    def params(self) -> dict[str, Any]:
        """The params of `priv.jail_stage`."""
        cfg = self.cfg
        return {
            "vm_id": self.vm_id,
            "run_dir": self.run_dir,
            "chroot_base": self.plan.chroot_base,
            "exec_file": self.plan.exec_file,
            "uid": self.plan.uid,
            "gid": self.plan.gid,
            "kernel": cfg.kernel_path,
            "initrd": cfg.initrd_path,
            "drives": [{"id": d.drive_id, "path": d.path_on_host, "read_only": d.is_read_only,
                        "root": d.is_root_device} for d in cfg.drives],
            "log": cfg.log_path,
            "metrics": cfg.metrics_path,
            "vsock": None if cfg.vsock is None else cfg.vsock.uds_path,
        }

    def links(self) -> tuple[tuple[str, str], ...]:
        return jail_links(self.plan, self.cfg, self.run_dir)


def jail_links(plan: JailPlan, cfg: FirecrackerVmConfig, run_dir: str) -> tuple[tuple[str, str], ...]:
    """(link in `run_dir`, its target inside the chroot) for the API socket, the vsock socket and the logs.

    The log, metrics and vsock paths of `cfg` are the links themselves, so they must sit in `run_dir`.
    """
    links = [(posixpath.join(run_dir, API_SOCKET_NAME), plan.api_socket_path)]
    for what, host in (("vsock socket", None if cfg.vsock is None else cfg.vsock.uds_path),
                       ("log", cfg.log_path), ("metrics file", cfg.metrics_path)):
        if host is None:
            continue
        if posixpath.dirname(host) != run_dir or posixpath.basename(host) == API_SOCKET_NAME:
            raise BadRequest(f"jailed Firecracker's {what} {host!r} must be a file of the run directory {run_dir} "
                             f"other than {API_SOCKET_NAME}")
        links.append((host, plan.host_path(plan.jailed_path(host))))
    return tuple(links)


class JailLauncher(Protocol):
    """The root helper's jail methods (priv.jail_stage / jail_launch / jail_cleanup), blocking."""

    def stage(self, request: JailRequest) -> None:
        """Build the chroot; on failure nothing is left."""
        ...

    def launch(self, vm_id: str, console_log: Path) -> int:
        """Run the jailer on the staged chroot in its own session, its output appended to `console_log`, and
        make the run directory's links; Firecracker's pid (the jailer execs it, same pid)."""
        ...

    def cleanup(self, vm_id: str) -> None:
        """Remove the VM's chroot and links. Idempotent."""
        ...


@dataclass(frozen=True)
class JailSetup:
    """Run Firecracker jailed (config `jailer_enabled`): the launcher, the chroot base (config
    `jailer_chroot_base`) and who Firecracker runs as (the install's owner)."""

    launcher: JailLauncher
    chroot_base: str
    uid: int
    gid: int
