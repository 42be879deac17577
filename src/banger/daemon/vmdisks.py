"""A VM's disks on the host: making the per-VM overlay and work disk, and `vm set`, which resizes them.

Nothing here mounts anything: ext4 images are made with mkfs and filled with debugfs (images/ext4.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from banger import model
from banger.errors import BadRequest

if TYPE_CHECKING:
    from banger.config import Config
    from banger.daemon.vms import VmService


def prepare_disks(cfg: Config, vm: model.VmRecord, image: model.ImageRecord, vm_dir: Path,
                  runtime: dict[str, Any]) -> None:
    """The per-VM disks, made once: a sparse overlay holding the guest's identity, and the work disk
    (`/root`) seeded from the image and holding the SSH key, git identity and `[[file_sync]]` files."""
    from banger.guest import identity
    from banger.guest.ssh import ensure_key, public_key
    from banger.images import ext4
    from banger.vmm.base import mac_for

    vm_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    overlay = vm_dir / "overlay.ext4"
    work = vm_dir / "work.ext4"
    net = identity.NetworkIdentity(name=vm.name, ip=vm.guest_ip, prefix=cfg.cidr, gateway=cfg.bridge_ip,
                                   dns=cfg.default_dns, mac=mac_for(vm.id))
    if not overlay.exists():
        ext4.make_empty_ext4(overlay, vm.spec.system_overlay_size_bytes, label="overlay")
        ext4.write_files(overlay, identity.overlay_files(net))
    if not work.exists():
        ensure_key(cfg.ssh_key_path)
        seed = Path(image.work_seed_path) if image.work_seed_path else None
        ext4.make_empty_ext4(work, vm.spec.disk_size_bytes, label="work")
        if seed is not None and seed.exists():
            copy_seed(seed, work, vm_dir)
        sync = [identity.SyncEntry(e.host, e.guest, e.mode) for e in cfg.file_sync]
        files = identity.work_files(public_key(cfg.ssh_key_path), identity.host_git_identity(), sync)
        ext4.write_files(work, files)
    runtime.update({"vm_dir": str(vm_dir), "overlay": str(overlay), "work_disk": str(work),
                    "mac": net.mac, "console_log": str(vm_dir / "console.log")})


def copy_seed(seed: Path, work: Path, vm_dir: Path) -> None:
    """Copy the image's /root seed into a fresh work disk (rdump out, write in; no mounts)."""
    import tempfile

    from banger.images import ext4
    from banger.images.inject import GuestFile

    with tempfile.TemporaryDirectory(dir=vm_dir) as tmp:
        root = Path(tmp)
        ext4.rdump_root(seed, root)
        files: list[GuestFile] = []
        for path in sorted(root.rglob("*")):
            rel = "/" + str(path.relative_to(root))
            if path.is_symlink() or rel == "/lost+found" or rel.startswith("/lost+found/"):
                continue
            if path.is_dir():
                files.append(GuestFile(rel, None, path.stat().st_mode & 0o7777, kind="dir"))
            elif path.is_file():
                files.append(GuestFile(rel, path.read_bytes(), path.stat().st_mode & 0o7777))
        if files:
            ext4.write_files(work, files)


async def set_spec(svc: VmService, vm: model.VmRecord, raw: dict[str, Any]) -> model.VmRecord:
    """`vm set`: CPU and memory apply at the next start (refused while running); the work disk only
    grows, with the VM stopped; NAT switches on or off at once."""
    from banger.rpc.protocol import Params

    p = Params(raw, allowed={"ref", "vcpu", "memory_mib", "disk_size_bytes", "nat"})
    vcpu = p.get_int("vcpu", minimum=1, maximum=32)
    memory = p.get_int("memory_mib", minimum=128, maximum=65536)
    disk = p.get_int("disk_size_bytes", minimum=64 << 20)
    nat = raw.get("nat")
    if nat is not None and not isinstance(nat, bool):
        raise BadRequest(f"param 'nat' must be true or false, got {nat!r}")
    async with svc.lock(vm.id):
        vm = svc.reload(vm.id)
        running = vm.state == model.VmState.RUNNING
        if running and (vcpu is not None or memory is not None or disk is not None):
            raise BadRequest(f"vm {vm.name!r} is running; vcpu, memory and disk size change only while stopped",
                             hint=f"banger vm stop {vm.name}, then set, then start")
        spec = vm.spec
        if disk is not None and disk != spec.disk_size_bytes:
            if disk < spec.disk_size_bytes:
                raise BadRequest(f"the work disk can only grow (now {spec.disk_size_bytes} bytes, asked {disk})")
            work = svc.d.layout.vm_dir(vm.id) / "work.ext4"
            if work.exists():
                await asyncio.to_thread(grow_ext4, work, disk)
        runtime = dict(vm.runtime)
        if nat is not None and nat != spec.nat and running:
            if nat:
                await svc.nat_add(vm, runtime)
            else:
                await svc.d.helper.nat_remove(vm.id)
                runtime.pop("nat", None)
        spec = replace(spec, vcpu=vcpu or spec.vcpu, memory_mib=memory or spec.memory_mib,
                       disk_size_bytes=disk or spec.disk_size_bytes, nat=spec.nat if nat is None else nat)
        return svc.save(replace(vm, spec=spec, runtime=runtime))


def grow_ext4(image: Path, size: int) -> None:
    import os

    from banger.system.run import run

    run(["e2fsck", "-f", "-p", str(image)], check=False)
    os.truncate(image, size)
    run(["resize2fs", str(image)])
