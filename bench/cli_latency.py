#!/usr/bin/env python3
"""CLI start-up latency: `banger --version` and `banger vm list --json` (50 VMs in the store),
next to `python3 -c pass` as the floor. Prints medians in milliseconds.

Runs the embedded daemon as root in throw-away XDG directories; nothing of the user's is touched.
Usage: .venv/bin/python bench/cli_latency.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BANGER = REPO / ".venv/bin/banger"


def seed_vms(env: dict[str, str], count: int) -> None:
    code = f"""
from banger import model, paths
from banger.store import db, vms
layout = paths.resolve_user()
store = db.open_db(layout.db_path)
for i in range({count}):
    now = db.utc_now()
    spec = model.VmSpec(vcpu=2, memory_mib=1024, disk_size_bytes=8 << 30, system_overlay_size_bytes=8 << 30)
    vms.insert_vm(store, model.VmRecord(id=model.new_id(), name=f"bench-{{i}}", image_id="img", image_name="debian-bookworm",
        state=model.VmState.STOPPED, spec=spec, guest_ip=f"172.16.0.{{i + 2}}", created_at=now, updated_at=now))
"""
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def median_ms(argv: list[str], env: dict[str, str], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    if os.getuid() != 0:
        print("cli_latency: run as root (it uses the embedded daemon)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="bgr-bench-"))
    env = dict(os.environ, HOME=str(work / "home"), XDG_CONFIG_HOME=str(work / "cfg"),
               XDG_STATE_HOME=str(work / "state"), XDG_CACHE_HOME=str(work / "cache"),
               XDG_RUNTIME_DIR=str(work / "run"), NO_COLOR="1")
    (work / "run").mkdir(mode=0o700)
    try:
        seed_vms(env, 50)
        listing = subprocess.run([str(BANGER), "vm", "list", "--json"], env=env, check=True,
                                 capture_output=True, text=True).stdout  # also starts the daemon
        if listing.count('"name"') != 50:
            raise SystemExit("cli_latency: expected 50 VMs in the listing")
        baseline = median_ms([sys.executable, "-c", "pass"], env, args.runs)
        version = median_ms([str(BANGER), "--version"], env, args.runs)
        vm_list = median_ms([str(BANGER), "vm", "list", "--json"], env, args.runs)
    finally:
        subprocess.run([str(BANGER), "system", "stop"], env=env, stdout=subprocess.DEVNULL, check=False)
        shutil.rmtree(work, ignore_errors=True)
    print(f"runs per command:            {args.runs}")
    print(f"python3 -c pass (baseline):  {baseline:6.1f} ms")
    print(f"banger --version:            {version:6.1f} ms  ({version / baseline:.2f}x baseline)")
    print(f"banger vm list --json (50):  {vm_list:6.1f} ms  ({vm_list / baseline:.2f}x baseline; target <= 150 ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
