#!/usr/bin/env python3
"""`banger vm exec <vm> -- true` through the guest agent next to the same command over a fresh SSH
connection, in one run, on one VM. Prints both medians and the ratio (target: agent <= 10% of SSH).

Runs as root inside a network namespace of its own (the e2e harness); QEMU with TCG on this host.
Usage: .venv/bin/python bench/agent.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.e2e.banger_env import BangerNetns  # noqa: E402


def median_seconds(argv: list[str], env: dict[str, str], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    if os.getuid() != 0:
        print("agent: run as root", file=sys.stderr)
        return 1
    env = BangerNetns()
    try:
        env.pull_image("debian-bookworm")
        env.banger("vm", "create", "--name", "bench", check=True)
        env.banger("vm", "ssh", "bench", "--", "true", check=True)  # pins the host key
        vm = next(v for v in env.vms() if v["name"] == "bench")
        key = env.state_dir / "ssh/id_ed25519"
        known = Path(env.env["HOME"]) / ".local/state/banger/ssh/known_hosts"
        agent = median_seconds(env.exec_argv([sys.executable, "-m", "banger", "vm", "exec", "bench", "-n", "--",
                                              "true"]), env.env, args.runs)
        ssh = median_seconds(env.exec_argv([
            "ssh", "-F", "none", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known}",
            "-o", "StrictHostKeyChecking=yes", "-o", "HostKeyAlias=bench.vm", "-o", "BatchMode=yes",
            "-o", "ControlMaster=no", "-o", "ControlPath=none", f"root@{vm['guest_ip']}", "true"]),
            env.env, args.runs)
    finally:
        env.close()
    print(f"runs: {args.runs} (TCG, 1 vCPU, 512 MiB)")
    print(f"banger vm exec -- true (agent):      median {agent * 1000:7.1f} ms")
    print(f"ssh true (fresh connection):          median {ssh * 1000:7.1f} ms")
    print(f"agent / ssh:                          {agent / ssh:7.1%}  (target <= 10%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
