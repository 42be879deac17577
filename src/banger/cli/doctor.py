"""`banger doctor`: read-only host readiness report. Runs in the CLI so it works with no daemon."""

from __future__ import annotations

import argparse
from pathlib import Path

from banger.cli import output
from banger.cli.lifecycle import target


def _store_status(db_path: Path) -> str:
    from banger.errors import BangerError
    from banger.store import migrations

    state = migrations.inspect_path(db_path)
    if state.status == "incompatible":
        raise BangerError(migrations.incompatible_message(state))
    if state.status == "migrations_needed":
        return f"schema version {state.version}; {len(state.pending)} migration(s) will run at daemon start"
    return f"schema version {state.version} (compatible)"


def cmd_doctor(args: argparse.Namespace) -> int:
    from banger import config as config_mod
    from banger import doctor
    from banger.doctor.checks import DoctorContext, VmDefaultsRow
    from banger.errors import ConfigError

    layout = target().layout
    rows: list[VmDefaultsRow] = []
    firecracker_bin: str | None = None
    vhost_vsock_bin: str | None = None
    bridge_name = "br-fc"
    tap_pool_size = 4
    qemu_bin = "qemu-system-x86_64"
    config_error: str | None = None
    try:
        cfg = config_mod.load(layout)
    except ConfigError as exc:
        config_error = exc.message
    else:
        defaults = config_mod.resolve_vm_defaults(cfg)
        rows = [
            ("vcpu", str(defaults.vcpu), defaults.provenance["vcpu"]),
            ("memory_mib", f"{defaults.memory_mib} MiB", defaults.provenance["memory_mib"]),
            ("disk_size", output.size_short(defaults.disk_size_bytes), defaults.provenance["disk_size_bytes"]),
            ("system_overlay_size", output.size_short(defaults.system_overlay_size_bytes),
             defaults.provenance["system_overlay_size_bytes"]),
        ]
        firecracker_bin = str(cfg.firecracker_bin) if cfg.firecracker_bin else None
        qemu_bin = str(cfg.qemu_bin) if cfg.qemu_bin else qemu_bin
        vhost_vsock_bin = str(cfg.vhost_vsock_bin) if cfg.vhost_vsock_bin else None
        bridge_name = cfg.bridge_name
        tap_pool_size = cfg.tap_pool_size
    ctx = DoctorContext(layout=layout, vm_defaults_rows=rows, store_inspector=_store_status,
                        firecracker_bin=firecracker_bin, qemu_bin=qemu_bin, vhost_vsock_bin=vhost_vsock_bin,
                        bridge_name=bridge_name, tap_pool_size=tap_pool_size)
    results = doctor.run_checks(ctx)
    if config_error is not None:
        results.insert(0, doctor.CheckResult("config", "FAIL", config_error,
                                             hint=f"fix {layout.config_file} and run banger doctor again"))
    if args.json:
        output.print_json(doctor.to_json(results))
    else:
        print(doctor.render_text(results, output.use_color()), end="")
    return doctor.exit_code(results)
