"""The daemon's RPC method table: parse params, call the services, shape the result."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from banger import buildinfo, model
from banger.errors import BangerError
from banger.rpc.protocol import Params
from banger.rpc.server import CallContext, Handler

if TYPE_CHECKING:
    from banger.daemon.app import Daemon


def build_handlers(d: Daemon) -> dict[str, Handler]:
    from banger.store import images as image_rows
    from banger.store import kernels as kernel_rows
    from banger.store import vms as vm_rows

    async def ping(ctx: CallContext, raw: dict[str, Any]) -> Any:
        Params(raw, allowed=set())
        info = buildinfo.current()
        return {"version": info.version, "commit": info.commit, "pid": os.getpid(), "uid": os.getuid(),
                "mode": d.layout.mode, "socket": str(d.layout.daemon_socket)}

    async def shutdown(ctx: CallContext, raw: dict[str, Any]) -> Any:
        Params(raw, allowed=set())
        d.stopping.set()
        return {"stopping": True}

    async def system_status(ctx: CallContext, raw: dict[str, Any]) -> Any:
        Params(raw, allowed=set())
        info = buildinfo.current()
        helper = await d.helper.ping()
        return {
            "daemon": {"version": info.version, "pid": os.getpid(), "uid": os.getuid(),
                       "mode": d.layout.mode, "socket": str(d.layout.daemon_socket)},
            "helper": {**helper, "socket": str(d.helper_socket)},
            "operations_in_flight": len(d.ops.in_flight()),
        }

    async def operations_list(ctx: CallContext, raw: dict[str, Any]) -> Any:
        Params(raw, allowed=set())
        return {"operations": [op.to_json() for op in d.ops.snapshot()]}

    async def operation_status(ctx: CallContext, raw: dict[str, Any]) -> Any:
        p = Params(raw, allowed={"id", "wait"})
        op_id = p.get_str("id", required=True)
        wait = p.get_int("wait", default=0, minimum=0, maximum=60) or 0
        op = await d.ops.wait_change(op_id, float(wait)) if wait else d.ops.get(op_id)
        return op.to_json()

    async def vm_list(ctx: CallContext, raw: dict[str, Any]) -> Any:
        Params(raw, allowed=set())
        return {"vms": [vm.to_json() for vm in vm_rows.list_vms(d.store)]}

    async def vm_show(ctx: CallContext, raw: dict[str, Any]) -> Any:
        p = Params(raw, allowed={"ref"})
        vm = model.resolve_ref(p.get_str("ref", required=True), vm_rows.list_vms(d.store), kind="vm")
        return vm.to_json()

    async def image_list(ctx: CallContext, raw: dict[str, Any]) -> Any:
        Params(raw, allowed=set())
        return {"images": [img.to_json() for img in image_rows.list_images(d.store)]}

    async def image_show(ctx: CallContext, raw: dict[str, Any]) -> Any:
        p = Params(raw, allowed={"ref"})
        img = model.resolve_ref(p.get_str("ref", required=True), image_rows.list_images(d.store), kind="image")
        return img.to_json()

    async def image_catalog(ctx: CallContext, raw: dict[str, Any]) -> Any:
        from banger.images import catalog

        Params(raw, allowed=set())
        return {"images": [e.to_json() for e in catalog.load_catalog()]}

    async def image_pull_begin(ctx: CallContext, raw: dict[str, Any]) -> Any:
        p = Params(raw, allowed={"name", "as", "kernel_ref"})
        name = p.get_str("name", required=True)
        as_name = p.get_str("as") or None
        kernel_ref = p.get_str("kernel_ref") or None
        is_oci = any(c in name for c in "/:@")
        if is_oci:
            # A registry reference: `--name` picks the image name, `--kernel-ref` its kernel.
            from banger.images.oci.reference import default_image_name, parse_reference

            target = as_name or default_image_name(parse_reference(name))
            model.validate_artifact_name("image", target)
        else:
            if as_name or kernel_ref:
                raise BangerError("--name and --kernel-ref go with registry references, not catalog names",
                                  code="bad_request")
            d.images.catalog_entry(name)  # a bad name fails the begin call itself
            target = name
        running = d.ops.find_running("image.pull", target)
        if running is not None:  # concurrent pulls of one image coalesce
            return {"op_id": running.id, "coalesced": True}
        if is_oci:
            op = d.ops.begin("image.pull", target,
                             lambda rep: d.images.pull_oci(name, rep, name=as_name, kernel_ref=kernel_ref))
        else:
            op = d.ops.begin("image.pull", target, lambda rep: d.images.pull(name, rep))
        return {"op_id": op.id, "coalesced": False}

    async def image_cache_prune(ctx: CallContext, raw: dict[str, Any]) -> Any:
        import asyncio as aio

        from banger.images.oci.layout import OciLayout

        p = Params(raw, allowed={"dry_run"})
        cache = OciLayout(d.layout.oci_cache_dir)
        usage = await aio.to_thread(cache.prune, dry_run=p.get_bool("dry_run"))
        return {"blobs": usage.blobs, "bytes": usage.bytes, "path": str(d.layout.oci_cache_dir),
                "dry_run": p.get_bool("dry_run")}

    async def image_register(ctx: CallContext, raw: dict[str, Any]) -> Any:
        from banger.images.register import RegisterSpec

        p = Params(raw, allowed={"name", "rootfs", "kernel_ref", "kernel", "initrd", "modules"})
        spec = RegisterSpec(rootfs=p.get_str("rootfs", required=True), kernel_ref=p.get_str("kernel_ref"),
                            kernel=p.get_str("kernel"), initrd=p.get_str("initrd"), modules=p.get_str("modules"))
        return (await d.images.register(p.get_str("name", required=True), spec)).to_json()

    async def image_promote(ctx: CallContext, raw: dict[str, Any]) -> Any:
        p = Params(raw, allowed={"ref"})
        return (await d.images.promote(p.get_str("ref", required=True))).to_json()

    async def image_delete(ctx: CallContext, raw: dict[str, Any]) -> Any:
        p = Params(raw, allowed={"ref"})
        img = await d.images.delete(p.get_str("ref", required=True))
        return {"deleted": img.name, "id": img.id}

    async def kernel_list(ctx: CallContext, raw: dict[str, Any]) -> Any:
        Params(raw, allowed=set())
        return {"kernels": [k.to_json() for k in kernel_rows.list_kernels(d.store)]}

    async def kernel_show(ctx: CallContext, raw: dict[str, Any]) -> Any:
        p = Params(raw, allowed={"ref"})
        kernels = kernel_rows.list_kernels(d.store)
        k = model.resolve_ref(p.get_str("ref", required=True), kernels, key_id="name", kind="kernel")
        return k.to_json()

    async def kernel_catalog(ctx: CallContext, raw: dict[str, Any]) -> Any:
        from banger.kernels import catalog

        Params(raw, allowed=set())
        return {"kernels": [e.to_json() for e in catalog.load_catalog()]}

    async def kernel_pull_begin(ctx: CallContext, raw: dict[str, Any]) -> Any:
        p = Params(raw, allowed={"name"})
        name = p.get_str("name", required=True)
        d.kernels.catalog_entry(name)  # a bad name fails the begin call itself
        running = d.ops.find_running("kernel.pull", name)
        if running is not None:  # concurrent pulls of one kernel coalesce
            return {"op_id": running.id, "coalesced": True}
        op = d.ops.begin("kernel.pull", name, lambda rep: d.kernels.pull(name, rep))
        return {"op_id": op.id, "coalesced": False}

    async def kernel_import(ctx: CallContext, raw: dict[str, Any]) -> Any:
        p = Params(raw, allowed={"name", "from", "distro", "arch", "kernel_version"})
        return await d.kernels.import_dir(
            p.get_str("name", required=True), p.get_str("from", required=True),
            distro=p.get_str("distro", required=True), arch=p.get_str("arch") or "amd64",
            kernel_version=p.get_str("kernel_version", required=True))

    async def kernel_delete(ctx: CallContext, raw: dict[str, Any]) -> Any:
        p = Params(raw, allowed={"ref"})
        name = p.get_str("ref", required=True)
        await d.kernels.delete(name)
        return {"deleted": name}

    async def vm_create_begin(ctx: CallContext, raw: dict[str, Any]) -> Any:
        d.vms.validate_spec(raw)  # bad input fails the begin call, before any operation exists
        label = str(raw.get("name") or "(generated name)")
        op = d.ops.begin("vm.create", label, lambda rep: d.vms.create(raw, rep.stage))
        return {"op_id": op.id}

    def fan_out(action: Callable[[model.VmRecord], Awaitable[Any]]) -> Handler:
        async def handler(ctx: CallContext, raw: dict[str, Any]) -> Any:
            p = Params(raw, allowed={"refs"})
            refs = model.dedupe(p.get_str_list("refs", required=True))
            snapshot = d.vms.all()

            async def one(ref: str) -> dict[str, Any]:
                try:
                    vm = model.resolve_ref(ref, snapshot, kind="vm")
                    result = await action(vm)
                    return {"ref": ref, "ok": True, "vm": result}
                except BangerError as exc:
                    return {"ref": ref, "ok": False, "error": {"code": exc.code, "message": exc.message,
                                                               "hint": exc.hint}}

            return {"results": await asyncio.gather(*(one(r) for r in refs))}

        return handler

    async def do_start(vm: model.VmRecord) -> Any:
        return (await d.vms.start(vm, lambda _s: None)).to_json()

    async def do_stop(vm: model.VmRecord) -> Any:
        return (await d.vms.stop(vm)).to_json()

    async def do_kill(vm: model.VmRecord) -> Any:
        return (await d.vms.stop(vm, force=True)).to_json()

    async def do_restart(vm: model.VmRecord) -> Any:
        stopped = await d.vms.stop(vm)
        return (await d.vms.start(stopped, lambda _s: None)).to_json()

    async def do_delete(vm: model.VmRecord) -> Any:
        await d.vms.delete(vm)
        return {"id": vm.id, "name": vm.name}

    async def vm_logs(ctx: CallContext, raw: dict[str, Any]) -> Any:
        p = Params(raw, allowed={"ref"})
        vm = d.vms.resolve(p.get_str("ref", required=True))
        return {"path": str(d.layout.vm_dir(vm.id) / "console.log"), "state": str(vm.state)}

    async def vm_ssh_info(ctx: CallContext, raw: dict[str, Any]) -> Any:
        p = Params(raw, allowed={"ref"})
        vm = d.vms.resolve(p.get_str("ref", required=True))
        if vm.state != model.VmState.RUNNING:
            raise BangerError(f"vm {vm.name!r} is {vm.state}, not running", hint=f"start it: banger vm start {vm.name}")
        return d.vms.ssh_info(vm)

    async def vm_set(ctx: CallContext, raw: dict[str, Any]) -> Any:
        from banger.daemon.vmdisks import set_spec

        vm = d.vms.resolve(Params(raw).get_str("ref", required=True))
        return (await set_spec(d.vms, vm, raw)).to_json()

    async def vm_prune(ctx: CallContext, raw: dict[str, Any]) -> Any:
        p = Params(raw, allowed={"dry_run"})
        victims = [vm for vm in d.vms.all() if vm.state != model.VmState.RUNNING]
        if p.get_bool("dry_run"):
            return {"vms": [vm.to_json() for vm in victims]}
        deleted = []
        for vm in victims:
            await d.vms.delete(vm)
            deleted.append(vm.to_json())
        return {"vms": deleted}

    async def vm_exec(ctx: CallContext, raw: dict[str, Any]) -> Any:
        from banger.daemon import guestops

        return await guestops.vm_exec(d, ctx, raw)

    async def vm_ports(ctx: CallContext, raw: dict[str, Any]) -> Any:
        from banger.daemon import guestops

        return await guestops.vm_ports(d, ctx, raw)

    async def vm_cp_push(ctx: CallContext, raw: dict[str, Any]) -> Any:
        from banger.daemon import guestcp

        return await guestcp.vm_cp_push(d, ctx, raw)

    async def vm_cp_pull(ctx: CallContext, raw: dict[str, Any]) -> Any:
        from banger.daemon import guestcp

        return await guestcp.vm_cp_pull(d, ctx, raw)

    async def vm_workspace_prepare(ctx: CallContext, raw: dict[str, Any]) -> Any:
        from banger.daemon import workspace

        return await workspace.prepare(d, ctx, raw)

    async def vm_workspace_export(ctx: CallContext, raw: dict[str, Any]) -> Any:
        from banger.daemon import workspace

        return await workspace.export(d, ctx, raw)

    async def do_stats(vm: model.VmRecord) -> Any:
        return vm_stats(d, vm)

    table: dict[str, Callable[[CallContext, dict[str, Any]], Any]] = {
        "daemon.ping": ping,
        "daemon.shutdown": shutdown,
        "daemon.operations.list": operations_list,
        "daemon.operations.status": operation_status,
        "system.status": system_status,
        "vm.list": vm_list,
        "vm.show": vm_show,
        "image.list": image_list,
        "image.show": image_show,
        "image.catalog": image_catalog,
        "image.pull.begin": image_pull_begin,
        "image.cache.prune": image_cache_prune,
        "image.delete": image_delete,
        "image.register": image_register,
        "image.promote": image_promote,
        "kernel.list": kernel_list,
        "kernel.show": kernel_show,
        "kernel.catalog": kernel_catalog,
        "kernel.pull.begin": kernel_pull_begin,
        "kernel.delete": kernel_delete,
        "kernel.import": kernel_import,
        "vm.create.begin": vm_create_begin,
        "vm.start": fan_out(do_start),
        "vm.stop": fan_out(do_stop),
        "vm.kill": fan_out(do_kill),
        "vm.restart": fan_out(do_restart),
        "vm.delete": fan_out(do_delete),
        "vm.logs": vm_logs,
        "vm.ssh_info": vm_ssh_info,
        "vm.set": vm_set,
        "vm.prune": vm_prune,
        "vm.stats": fan_out(do_stats),
        "vm.exec": vm_exec,
        "vm.ports": vm_ports,
        "vm.cp.push": vm_cp_push,
        "vm.cp.pull": vm_cp_pull,
        "vm.workspace.prepare": vm_workspace_prepare,
        "vm.workspace.export": vm_workspace_export,
    }
    return table


def vm_stats(d: Daemon, vm: model.VmRecord) -> dict[str, Any]:
    """What the host sees of a VM: the VMM's CPU time and memory (from /proc) and the disk space its
    sparse disks really use."""
    import time
    from pathlib import Path

    stats: dict[str, Any] = {"name": vm.name, "state": str(vm.state), "vcpu": vm.spec.vcpu,
                             "memory_mib": vm.spec.memory_mib}
    pid = vm.runtime.get("pid")
    if vm.state == model.VmState.RUNNING and pid:
        try:
            fields = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()
            ticks = os.sysconf("SC_CLK_TCK")
            stats["cpu_seconds"] = round((int(fields[11]) + int(fields[12])) / ticks, 2)
            rss_pages = int(Path(f"/proc/{int(pid)}/statm").read_text().split()[1])
            stats["rss_bytes"] = rss_pages * os.sysconf("SC_PAGE_SIZE")
            started = float(vm.runtime.get("started_at") or 0.0)
            stats["uptime_seconds"] = round(time.time() - started, 1) if started else None
        except (OSError, ValueError, IndexError):
            stats["cpu_seconds"] = stats["rss_bytes"] = stats["uptime_seconds"] = None
    for key, name in (("overlay_bytes", "overlay.ext4"), ("work_disk_bytes", "work.ext4")):
        try:
            stats[key] = (d.layout.vm_dir(vm.id) / name).stat().st_blocks * 512
        except OSError:
            stats[key] = None
    return stats
