"""`banger vm create --vmm firecracker`: the daemon driving a real `firecracker` binary.

Where KVM runs guests, the VM boots and its agent answers over Firecracker's hybrid vsock. Where it
cannot (this PVM host: a stock guest kernel crawls, then KVM_EXIT_INTERNAL_ERROR), the test still shows
the daemon's side for real: the whole configuration accepted through the API, InstanceStart succeeding,
the failure reported in one line, and nothing left behind. Skips loudly without a binary (CI has none).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.banger_env import BangerNetns
from tests.integration.test_firecracker_binary import firecracker_binary

pytestmark = [pytest.mark.vm, pytest.mark.network,
              pytest.mark.skipif(os.getuid() != 0, reason="VM tests need root (embedded mode, namespaces)")]


def firecracker_pids_under(root: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (proc / "cmdline").read_bytes()
                if b"firecracker" in cmdline.split(b"\0")[0] and str(root).encode() in cmdline:
                    pids.append(int(proc.name))
    return pids


@pytest.fixture(scope="module")
def fc_env() -> Iterator[BangerNetns]:
    binary = firecracker_binary()  # skips (visibly) when there is none
    env = BangerNetns()
    try:
        config = env.root / "cfg/banger/config.toml"
        # Top-level keys before the file's [vm_defaults] table. Embedded mode runs Firecracker directly.
        config.write_text(f'firecracker_bin = "{binary}"\n' + config.read_text())
        env.pull_image("debian-bookworm")
        yield env
    finally:
        env.close()


def test_firecracker_vm_through_the_daemon(fc_env: BangerNetns) -> None:
    from banger.system.kvm_probe import probe_kvm

    env = fc_env
    env.banger("vm", "create", "--name", "fc1", "--vmm", "firecracker", "--no-start", check=True)
    started = time.monotonic()
    start = env.banger("vm", "start", "fc1", timeout=400)
    print(f"\nfirecracker start: {time.monotonic() - started:.1f}s, exit {start.returncode}")
    vm = json.loads(env.banger("vm", "show", "fc1", "--json", check=True).stdout)
    runtime = vm["runtime"]
    assert runtime["vmm"] == "firecracker" and runtime["agent_transport"] == "vsock"
    fc_log = Path(runtime["run_dir"]) / "firecracker.log"
    log_text = fc_log.read_text()
    assert '"action_type\\":\\"InstanceStart\\"' in log_text, log_text[-2000:]
    # The API thread's next line after the request is its answer (vCPU and main-thread lines interleave).
    api_lines = [ln for ln in log_text[log_text.index("InstanceStart"):].splitlines()[1:] if ":fc_api:" in ln]
    assert "The request was executed successfully" in api_lines[0], log_text[-2000:]
    if probe_kvm().usable:
        assert start.returncode == 0, start.stderr
        assert env.banger("vm", "exec", "fc1", "--", "cat", "/proc/cmdline", check=True).stdout.strip()
        out = env.banger("vm", "show", "fc1", check=True).stdout
        assert "firecracker" in out and "vsock" in out
        env.banger("vm", "stop", "fc1", check=True, timeout=120)
    else:
        print("KVM cannot run this guest here: checking the daemon's failure path with the real binary")
        assert start.returncode == 1
        line = start.stderr.strip()
        assert line.startswith("banger: fc1: vm 'fc1' stopped while booting: ") and "\n" not in line, line
        assert vm["state"] == "error"
        assert firecracker_pids_under(env.root) == []
        assert "MicroVMStoppedWithError" in line or "KVM_EXIT_INTERNAL_ERROR" in log_text
    env.banger("vm", "delete", "fc1", check=True, timeout=120)
    assert env.vms() == []
    assert firecracker_pids_under(env.root) == []
    assert not Path(runtime["run_dir"]).exists()
    taps = [link for link in env.links() if link.startswith("tap-")]
    assert len(taps) <= 1, taps
