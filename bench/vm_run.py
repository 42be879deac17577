#!/usr/bin/env python3
"""`banger vm run --rm -- true` against the same boot done by hand, in one run.

Prints: the median wall time of `banger vm run --rm -- true` (default image, QEMU); the median of a
hand-written QEMU command line booting the same kernel, initrd and disks to the same readiness point
(`ssh root@guest true` succeeds) and torn down; their ratio; banger's per-stage breakdown (from the
daemon's operation record); and `vm create` time with the image's root file system at 1 GiB and at
4 GiB (the per-VM root must cost O(1) in the image size).

Runs as root inside a network namespace of its own, with the e2e harness's throw-away directories;
the image and kernel come from (and are cached in) $BANGER_TEST_CACHE.
Usage: .venv/bin/python bench/vm_run.py [--runs N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.e2e.banger_env import BangerNetns  # noqa: E402


def timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def banger_run(env: BangerNetns) -> float:
    return timed(lambda: env.banger("vm", "run", "--rm", "--", "true", check=True))


def stage_breakdown(env: BangerNetns) -> dict[str, float]:
    out = env.banger("vm", "create", "--name", "stages", "--json", check=True)
    vm = json.loads(out.stdout)
    ops = json.loads(subprocess.run(
        env.exec_argv([sys.executable, "-c",
                       "import json; from banger.cli.lifecycle import call; "
                       "print(json.dumps(call('daemon.operations.list')))"]),
        env=env.env, capture_output=True, text=True, check=True, cwd=REPO).stdout)["operations"]
    env.banger("vm", "delete", vm["name"], check=True)
    create = [op for op in ops if op["kind"] == "vm.create" and op["done"]][-1]
    marks = [(s["name"], s["at"]) for s in create["stages"]] + [("end", create["finished_at"])]
    return {name: nxt - at for (name, at), (_, nxt) in itertools.pairwise(marks)}


def hand_boot(env: BangerNetns, image: dict[str, str], kernel: dict[str, str], runs: int) -> list[float]:
    """QEMU by hand: same kernel/initrd/rootfs/cmdline, fresh overlay + work disk, own tap, ssh true."""
    from banger.guest.ssh import ensure_key, public_key
    from banger.images import ext4
    from banger.images.inject import GuestFile

    work = Path(tempfile.mkdtemp(prefix="bgb-"))
    key = work / "id"
    ensure_key(key)
    ns = env.ns
    subprocess.run(["ip", "-n", ns, "link", "add", "br-hand", "type", "bridge"], check=True)
    subprocess.run(["ip", "-n", ns, "addr", "add", "172.31.99.1/24", "dev", "br-hand"], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", "br-hand", "up"], check=True)
    subprocess.run(["ip", "-n", ns, "tuntap", "add", "dev", "tap-hand", "mode", "tap"], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", "tap-hand", "master", "br-hand", "up"], check=True)
    from banger.vmm.base import host_tsc_khz

    khz = host_tsc_khz() or 0
    times = []
    try:
        for _ in range(runs):
            overlay, workdisk = work / "overlay.ext4", work / "work.ext4"
            for p in (overlay, workdisk):
                p.unlink(missing_ok=True)
            start = time.perf_counter()
            ext4.make_empty_ext4(overlay, 1 << 30, label="overlay")
            env_text = (b"BANGER_IP=172.31.99.2/24\nBANGER_GATEWAY=172.31.99.1\nBANGER_DNS=1.1.1.1\n"
                        b"BANGER_MAC=52:54:00:12:34:56\n")
            ext4.write_files(overlay, [GuestFile("/upper", None, 0o755, kind="dir"),
                                       GuestFile("/upper/etc", None, 0o755, kind="dir"),
                                       GuestFile("/upper/etc/banger", None, 0o755, kind="dir"),
                                       GuestFile("/upper/etc/banger/network.env", env_text, 0o644),
                                       GuestFile("/work", None, 0o755, kind="dir")])
            ext4.make_empty_ext4(workdisk, 1 << 30, label="work")
            ext4.write_files(workdisk, [GuestFile("/.ssh", None, 0o700, kind="dir"),
                                        GuestFile("/.ssh/authorized_keys", public_key(key).encode() + b"\n", 0o600)])
            qemu = subprocess.Popen(env.exec_argv([
                "qemu-system-x86_64", "-M", "microvm,acpi=on", "-accel", "tcg,thread=multi,tb-size=32",
                "-cpu", "max", "-m", "512", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
                "-no-reboot", "-serial", f"file:{work}/console.log",
                "-kernel", kernel["vmlinux_path"], "-initrd", kernel["initrd_path"],
                "-append", f"console=ttyS0 root=/dev/vda ro rootfstype=ext4 init=/usr/local/libexec/banger-init "
                           f"banger.overlay=/dev/vdb banger.work=/dev/vdc banger.init=fast panic=-1 "
                           f"tsc_early_khz={khz}",
                "-drive", f"id=root,file={image['rootfs_path']},format=raw,if=none,readonly=on",
                "-device", "virtio-blk-device,drive=root",
                "-drive", f"id=ov,file={overlay},format=raw,if=none", "-device", "virtio-blk-device,drive=ov",
                "-drive", f"id=wk,file={workdisk},format=raw,if=none", "-device", "virtio-blk-device,drive=wk",
                "-netdev", "tap,id=n0,ifname=tap-hand,script=no,downscript=no",
                "-device", "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56"]),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            ssh = env.exec_argv(["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o",
                                 "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=2", "-o", "BatchMode=yes",
                                 "-o", "LogLevel=ERROR", "root@172.31.99.2", "true"])
            while subprocess.run(ssh, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
                if qemu.poll() is not None:
                    raise SystemExit(f"hand-written QEMU exited: see {work}/console.log")
                time.sleep(0.2)
            qemu.kill()
            qemu.wait()
            times.append(time.perf_counter() - start)
    finally:
        subprocess.run(["ip", "-n", ns, "link", "del", "tap-hand"], check=False)
        subprocess.run(["ip", "-n", ns, "link", "del", "br-hand"], check=False)
        shutil.rmtree(work, ignore_errors=True)
    return times


def create_ready(env: BangerNetns, init: str) -> float:
    """`vm create` returns when the guest agent answers health: that is exec-ready."""
    start = time.perf_counter()
    env.banger("vm", "create", "--name", f"ready-{init}", "--init", init, check=True)
    elapsed = time.perf_counter() - start
    env.banger("vm", "delete", f"ready-{init}", check=True)
    return elapsed


def create_time(env: BangerNetns, image_name: str, runs: int) -> float:
    samples = []
    for i in range(runs):
        start = time.perf_counter()
        env.banger("vm", "create", "--name", f"size-{i}", "--no-start", check=True)
        out = env.banger("vm", "start", f"size-{i}", check=True)
        samples.append(time.perf_counter() - start)
        del out
        env.banger("vm", "delete", f"size-{i}", check=True)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if os.getuid() != 0:
        print("vm_run: run as root", file=sys.stderr)
        return 1
    env = BangerNetns()
    try:
        env.pull_image("debian-bookworm")
        image = json.loads(env.banger("image", "show", "debian-bookworm", "--json", check=True).stdout)
        kernel = json.loads(env.banger("kernel", "show", image["kernel_ref"], "--json", check=True).stdout)
        banger_run(env)  # warm-up: daemon start, tap pool, page cache
        runs = [banger_run(env) for _ in range(args.runs)]
        hand = hand_boot(env, image, kernel, args.runs)
        stages = stage_breakdown(env)
        # Time to exec-ready (the agent answers) with banger's fast init and with systemd, same image.
        fast = [timed(lambda: env.banger("vm", "run", "--rm", "--init", "fast", "--", "true", check=True))
                for _ in range(3)]
        systemd = [timed(lambda: env.banger("vm", "run", "--rm", "--init", "systemd", "--", "true", check=True))
                   for _ in range(3)]
        ready_fast = [create_ready(env, "fast") for _ in range(3)]
        ready_systemd = [create_ready(env, "systemd") for _ in range(3)]
        # The per-VM root must not depend on the image size: grow the image's ext4 to 4 GiB and compare.
        small = create_time(env, "debian-bookworm", 3)
        rootfs = Path(image["rootfs_path"])
        size_before = rootfs.stat().st_size
        os.truncate(rootfs, 4 << 30)
        subprocess.run(["resize2fs", "-f", str(rootfs)], check=True, capture_output=True)
        big = create_time(env, "debian-bookworm", 3)
    finally:
        env.close()
    b, h = statistics.median(runs), statistics.median(hand)
    print(f"runs: {args.runs} (TCG, 1 vCPU, 512 MiB)")
    print(f"banger vm run --rm -- true:     median {b:6.2f} s")
    print(f"hand-written QEMU to ssh true:  median {h:6.2f} s")
    print(f"ratio banger / hand:            {b / h:6.2f}x  (target <= 1.10x)")
    print("per-stage (one vm create):      " + ", ".join(f"{k} {v:.2f}s" for k, v in stages.items()))
    f, sd = statistics.median(ready_fast), statistics.median(ready_systemd)
    print(f"exec-ready, fast init:          median {f:6.2f} s")
    print(f"exec-ready, systemd:            median {sd:6.2f} s  (fast = {f / sd:.0%} of systemd; target <= 30%)")
    print(f"vm run --rm -- true, fast / systemd: {statistics.median(fast):.2f} s / {statistics.median(systemd):.2f} s")
    print(f"create+start, image {size_before / (1 << 30):.1f} GiB:   median {small:6.2f} s")
    print(f"create+start, image 4.0 GiB:   median {big:6.2f} s  ({big / small:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
