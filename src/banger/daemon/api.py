"""The daemon's RPC method table: parse params, call the services, shape the result."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from banger import buildinfo, model
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

    async def kernel_list(ctx: CallContext, raw: dict[str, Any]) -> Any:
        Params(raw, allowed=set())
        return {"kernels": [k.to_json() for k in kernel_rows.list_kernels(d.store)]}

    async def kernel_show(ctx: CallContext, raw: dict[str, Any]) -> Any:
        p = Params(raw, allowed={"ref"})
        kernels = kernel_rows.list_kernels(d.store)
        k = model.resolve_ref(p.get_str("ref", required=True), kernels, key_id="name", kind="kernel")
        return k.to_json()

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
        "kernel.list": kernel_list,
        "kernel.show": kernel_show,
    }
    return table
