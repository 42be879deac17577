"""`banger image ...` and `banger kernel ...`"""

from __future__ import annotations

import argparse
from typing import Any

from banger.cli import output
from banger.cli.lifecycle import call


def cmd_image_list(args: argparse.Namespace) -> int:
    images = call("image.list")["images"]
    if args.json:
        output.print_json(images)
        return 0
    output.print_table(
        ["ID", "NAME", "MANAGED", "KERNEL", "SOURCE", "CREATED"],
        [[i["id"][:8], i["name"], "yes" if i["managed"] else "no", i.get("kernel_ref") or "-",
          i.get("source", ""), str(i.get("created_at", ""))[:19].replace("T", " ")] for i in images],
    )
    return 0


def cmd_image_show(args: argparse.Namespace) -> int:
    image = call("image.show", {"ref": args.image})
    if args.json:
        output.print_json(image)
        return 0
    shown = dict(image)
    ref = image.get("kernel_ref")
    if ref and not image.get("kernel_path"):
        # The boot files of a kernel reference live with the kernel: show where, not "-".
        kernel = call("kernel.show", {"ref": ref})
        for key, value in (("kernel_path", kernel.get("vmlinux_path") or kernel.get("kernel_path")),
                           ("initrd_path", kernel.get("initrd_path")), ("modules_path", kernel.get("modules_path"))):
            if value:
                shown[key] = f"{value} (kernel {ref})"
    keys = ("id", "name", "managed", "source", "kernel_ref", "rootfs_path", "kernel_path", "initrd_path",
            "modules_path", "work_seed_path", "created_at")
    print(output.kv_block([(k.replace("_", " "), shown.get(k) if shown.get(k) not in ("", None) else "-")
                           for k in keys]))
    return 0


def cmd_image_pull(args: argparse.Namespace) -> int:
    from banger.cli.progress import follow

    params = {"name": args.name}
    if args.as_name:
        params["as"] = args.as_name
    if args.kernel_ref:
        params["kernel_ref"] = args.kernel_ref
    begin = call("image.pull.begin", params)
    image = follow(begin["op_id"], f"image {args.name}")
    if args.json:
        output.print_json(image)
    else:
        print(f"{image['name']}: {image['id'][:8]} (kernel {image['kernel_ref']}, {image['rootfs_path']})")
    return 0


def cmd_image_register(args: argparse.Namespace) -> int:
    import os

    from banger.errors import BadRequest

    triple = [f for f, v in (("--kernel", args.kernel), ("--initrd", args.initrd), ("--modules", args.modules)) if v]
    if args.kernel_ref and triple:
        raise BadRequest(f"--kernel-ref and {'/'.join(triple)} are mutually exclusive",
                         hint="use a stored kernel (--kernel-ref) or kernel files (--kernel [--initrd] [--modules])")
    params = {"name": args.name, "rootfs": os.path.abspath(args.rootfs)}
    if args.kernel_ref:
        params["kernel_ref"] = args.kernel_ref
    for key in ("kernel", "initrd", "modules"):
        if getattr(args, key):
            params[key] = os.path.abspath(getattr(args, key))
    image = call("image.register", params)
    if args.json:
        output.print_json(image)
    else:
        print(f"registered image {image['name']} ({image['id'][:8]}, unmanaged)")
    return 0


def cmd_image_promote(args: argparse.Namespace) -> int:
    image = call("image.promote", {"ref": args.image}, timeout=3600)
    if args.json:
        output.print_json(image)
    else:
        print(f"promoted image {image['name']} ({image['id'][:8]}, {image['rootfs_path']})")
    return 0


def cmd_image_delete(args: argparse.Namespace) -> int:
    deleted = call("image.delete", {"ref": args.image})
    print(f"deleted image {deleted['deleted']} ({deleted['id'][:8]})")
    return 0


def _catalog_rows() -> list[dict[str, Any]]:
    from banger.kernels import catalog

    return [e.to_json() for e in catalog.load_catalog()]



def cmd_kernel_list(args: argparse.Namespace) -> int:
    if args.available:
        entries = _catalog_rows()
        if args.json:
            output.print_json(entries)
        else:
            output.print_table(["NAME", "KIND", "DESCRIPTION"],
                               [[e["name"], e["kind"], e.get("description", "")] for e in entries])
        return 0
    kernels = call("kernel.list")["kernels"]
    if args.json:
        output.print_json(kernels)
        return 0
    output.print_table(["NAME", "DISTRO", "ARCH", "VERSION", "IMPORTED"],
                       [[k["name"], k["distro"], k["arch"], k["kernel_version"],
                         str(k.get("imported_at", ""))[:19].replace("T", " ")] for k in kernels])
    return 0


def cmd_kernel_show(args: argparse.Namespace) -> int:
    kernel = call("kernel.show", {"ref": args.kernel})
    if args.json:
        output.print_json(kernel)
        return 0
    print(output.kv_block([(k.replace("_", " "), v if v not in ("", None) else "-") for k, v in kernel.items()]))
    return 0


def cmd_kernel_pull(args: argparse.Namespace) -> int:
    from banger.cli.progress import follow

    begin = call("kernel.pull.begin", {"name": args.name})
    kernel = follow(begin["op_id"], f"kernel {args.name}")
    if args.json:
        output.print_json(kernel)
    else:
        print(f"{kernel['name']}: {kernel['distro']} {kernel['kernel_version']} ({kernel['vmlinux_path']})")
    return 0


def cmd_kernel_import(args: argparse.Namespace) -> int:
    import os

    kernel = call("kernel.import", {"name": args.name, "from": os.path.abspath(args.from_dir),
                                    "distro": args.distro, "arch": args.arch,
                                    "kernel_version": args.kernel_version}, timeout=600)
    if args.json:
        output.print_json(kernel)
    else:
        print(f"{kernel['name']}: {kernel['distro']} {kernel['kernel_version']} ({kernel['vmlinux_path']})")
    return 0


def cmd_kernel_rm(args: argparse.Namespace) -> int:
    call("kernel.delete", {"ref": args.kernel})
    print(f"deleted kernel {args.kernel}")
    return 0


def cmd_image_cache_prune(args: argparse.Namespace) -> int:
    result = call("image.cache.prune", {"dry_run": bool(args.dry_run)})
    size = output.human_bytes(int(result["bytes"]))
    verb = "would free" if args.dry_run else "freed"
    print(f"{verb} {size} across {result['blobs']} blob(s) in {result['path']}")
    return 0


def cmd_make_bundle(args: argparse.Namespace) -> int:
    """`banger internal make-bundle`: runs here, not in the daemon (a maintainer's build step)."""
    import contextlib
    import sys
    from pathlib import Path

    from banger.errors import BadRequest
    from banger.images import bundle
    from banger.units import UnitError, parse_size

    out_dir = Path(args.out).resolve()
    if not out_dir.is_dir():
        raise BadRequest(f"--out {args.out!r} is not a directory")
    try:
        size = parse_size(args.size) if args.size else None
    except UnitError as exc:
        raise BadRequest(f"--size {exc}") from exc
    with contextlib.ExitStack() as stack:
        if args.rootfs_tar == "-":
            tar = stack.enter_context(bundle.staged_stdin(sys.stdin.buffer, out_dir))
        else:
            tar = Path(args.rootfs_tar).resolve()
            if not tar.is_file():
                raise BadRequest(f"--rootfs-tar {args.rootfs_tar!r} is not a file")
        made = bundle.make_bundle(tar, out_dir, name=args.name, distro=args.distro, arch=args.arch,
                                  kernel_ref=args.kernel_ref, description=args.description, size_bytes=size)
    if args.json:
        output.print_json({"path": str(made.path), "sha256": made.sha256, "size": made.size})
    else:
        print(f"path:   {made.path}\nsha256: {made.sha256}\nsize:   {made.size}")
    return 0
