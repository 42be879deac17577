"""`banger vm ...`"""

from __future__ import annotations

import argparse
from typing import Any

from banger.cli import output
from banger.cli.lifecycle import call


def _row(vm: dict[str, Any]) -> list[Any]:
    spec = vm.get("spec", {})
    workspace = vm.get("workspace") or {}
    return [
        vm["short_id"], vm["name"], vm["state"], vm.get("image_name", ""), vm.get("guest_ip", ""),
        spec.get("vcpu", ""), f"{spec.get('memory_mib', '')} MiB",
        output.size_short(int(spec.get("disk_size_bytes", 0))),
        workspace.get("guest_path", "-") if workspace else "-",
        str(vm.get("created_at", ""))[:19].replace("T", " "),
    ]


def cmd_list(args: argparse.Namespace) -> int:
    vms = call("vm.list")["vms"]
    if args.json:
        output.print_json(vms)
    elif args.ids:
        for vm in vms:
            print(vm["short_id"])
    else:
        output.print_table(["ID", "NAME", "STATE", "IMAGE", "IP", "VCPU", "MEM", "DISK", "WORKSPACE", "CREATED"],
                           [_row(vm) for vm in vms])
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    vm = call("vm.show", {"ref": args.vm})
    if args.json:
        output.print_json(vm)
        return 0
    spec = vm.get("spec", {})
    pairs: list[tuple[str, Any]] = [
        ("id", vm["id"]), ("name", vm["name"]), ("state", vm["state"]), ("image", vm.get("image_name")),
        ("ip", vm.get("guest_ip")), ("dns", f"{vm['name']}.vm"), ("vcpu", spec.get("vcpu")),
        ("memory", f"{spec.get('memory_mib')} MiB"),
        ("disk", output.size_short(int(spec.get("disk_size_bytes", 0)))),
        ("nat", "on" if spec.get("nat") else "off"), ("created", vm.get("created_at")),
        ("updated", vm.get("updated_at")),
    ]
    if vm.get("last_error"):
        pairs.append(("last error", vm["last_error"]))
    if vm.get("workspace"):
        pairs.append(("workspace", vm["workspace"].get("guest_path")))
    print(output.kv_block(pairs))
    return 0
