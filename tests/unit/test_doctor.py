"""banger doctor: classifications, read-only behaviour, and the report's text/JSON shapes."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from banger import doctor
from banger.buildinfo import BuildInfo
from banger.doctor import checks, tool_checks
from banger.doctor.checks import CheckResult, DoctorContext
from banger.paths import Layout
from banger.system import kvm_probe
from banger.system.kvm_probe import KvmProbe
from banger.system.run import find_binary

QEMU_72 = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n"
QEMU_62 = (
    "QEMU emulator version 6.2.0 (Debian 1:6.2+dfsg-2ubuntu6.15)\nCopyright (c) 2003-2021 Fabrice Bellard\n"
)
QEMU_10 = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-1)\n"


def make_layout(root: Path, mode: str = "user") -> Layout:
    runtime = root / "run" / "banger"
    return Layout(
        mode=mode,  # type: ignore[arg-type]
        config_dir=root / "etc",
        state_dir=root / "state",
        cache_dir=root / "cache",
        runtime_dir=runtime,
        helper_runtime_dir=runtime if mode == "user" else root / "run" / "banger-root",
        owner_home=root / "home",
    )


@pytest.fixture(autouse=True)
def system_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # The version check reads <prefix>/etc/banger/install.toml; never look at this host's real one.
    prefix = tmp_path / "sysprefix"
    monkeypatch.setenv("BANGER_SYSTEM_PREFIX", str(prefix))
    return prefix


def ctx_for(tmp_path: Path, **kw: object) -> DoctorContext:
    return DoctorContext(make_layout(tmp_path / "banger"), **kw)  # type: ignore[arg-type]


def fake_tool(directory: Path, name: str, script: str) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return str(path)


# --- architecture ---------------------------------------------------------------------------------------


def test_architecture() -> None:
    assert checks.architecture_result("x86_64").status == "PASS"
    bad = checks.architecture_result("aarch64")
    assert bad.status == "FAIL"
    assert "'aarch64'" in bad.summary


# --- versions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (QEMU_72, (7, 2, 22)),
        (QEMU_62, (6, 2, 0)),
        (QEMU_10, (10, 0, 2)),
        ("QEMU emulator version 8.1\n", (8, 1, 0)),
        ("Firecracker v1.14.2\n\n", (1, 14, 2)),
        ("\nFirecracker v1.5.0\n", (1, 5, 0)),
        ("firecracker: unknown option\n", None),
        ("", None),
    ],
)
def test_parse_version(text: str, expected: tuple[int, int, int] | None) -> None:
    assert tool_checks.parse_version(text) == expected


def test_qemu_classification() -> None:
    assert tool_checks.qemu_result(QEMU_72, "/usr/bin/qemu-system-x86_64").status == "PASS"
    assert tool_checks.qemu_result(QEMU_10, "/q").status == "PASS"  # 10 > 7 numerically, not as text
    old = tool_checks.qemu_result(QEMU_62, "/q")
    assert old.status == "WARN"
    assert "6.2.0" in old.summary
    assert tool_checks.qemu_result("garbage", "/q").status == "WARN"


@pytest.mark.parametrize(
    ("version", "status"),
    [
        ("1.4.1", "FAIL"),
        ("1.5.0", "PASS"),
        ("1.10.0", "PASS"),
        ("1.14.1", "PASS"),
        ("1.14.2", "PASS"),
        ("1.14.99", "PASS"),
        ("1.15.0", "WARN"),
        ("1.16.1", "WARN"),
        ("2.0.0", "WARN"),
        ("0.25.2", "FAIL"),
    ],
)
def test_firecracker_ranges(version: str, status: str) -> None:
    result = tool_checks.firecracker_result(f"Firecracker v{version}\n\n", "/usr/local/bin/firecracker")
    assert result.status == status
    assert version in result.summary


def test_missing_qemu_fails_in_both_rows(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path, qemu_bin="/nonexistent/qemu")
    boot = tool_checks.check_tools_vm_boot(ctx)
    assert boot.status == "FAIL"
    assert "/nonexistent/qemu" in boot.summary
    assert boot.hint is not None and "apt-get install qemu-system-x86" in boot.hint
    version = tool_checks.check_qemu(ctx)
    assert version.status == "FAIL"
    assert version.hint is not None and "qemu-system-x86" in version.hint


def test_qemu_version_from_a_real_binary(tmp_path: Path) -> None:
    old = fake_tool(tmp_path / "bin", "qemu-old", f"printf '{QEMU_62}'")
    assert tool_checks.check_qemu(ctx_for(tmp_path, qemu_bin=old)).status == "WARN"
    broken = fake_tool(tmp_path / "bin", "qemu-broken", "echo boom >&2; exit 3")
    result = tool_checks.check_qemu(ctx_for(tmp_path, qemu_bin=broken))
    assert result.status == "WARN"
    assert "boom" in result.summary
    installed = find_binary("qemu-system-x86_64")
    if installed is not None:  # the host's own QEMU, through banger.system.run
        real = tool_checks.check_qemu(ctx_for(tmp_path))
        assert real.status in ("PASS", "WARN")
        assert real.details[0] == installed


def test_firecracker_binary(tmp_path: Path) -> None:
    missing = tool_checks.check_firecracker(ctx_for(tmp_path, firecracker_bin="/nonexistent/firecracker"))
    assert missing.status == "WARN"
    assert missing.hint is not None and "firecracker_bin" in missing.hint
    for version, status in (("1.14.2", "PASS"), ("1.4.0", "FAIL"), ("1.16.1", "WARN")):
        path = fake_tool(tmp_path / "bin", f"fc-{version}", f"echo 'Firecracker v{version}'; echo")
        result = tool_checks.check_firecracker(ctx_for(tmp_path, firecracker_bin=path))
        assert result.status == status, result
        assert result.details == (path, f"Firecracker v{version}")


def test_firecracker_not_on_path_is_a_warning(tmp_path: Path) -> None:
    result = tool_checks.check_firecracker(ctx_for(tmp_path))
    if find_binary("firecracker") is None:
        assert result.status == "WARN"
        assert result.hint is not None and "no distro package" in result.hint
    else:
        assert result.details[0] == find_binary("firecracker")


# --- guest agent transport (QEMU): vhost-device-vsock ---------------------------------------------------

INSTALL_CMD = "sudo banger internal install-vhost-vsock"


def test_agent_transport_result_pass_names_version_and_path() -> None:
    recorded = tool_checks.agent_transport_result("/usr/local/bin/vhost-device-vsock", recorded="0.3.0-2",
                                             version_text="vhost-device-vsock 0.3.0\n")
    assert recorded.status == "PASS"
    assert recorded.summary == "vsock via vhost-device-vsock 0.3.0-2 (/usr/local/bin/vhost-device-vsock)"
    assert recorded.details == ("/usr/local/bin/vhost-device-vsock", "vhost-device-vsock 0.3.0",
                                "installed by banger internal install-vhost-vsock")
    assert recorded.hint is None
    # Installed some other way: the version comes from --version.
    other = tool_checks.agent_transport_result("/usr/bin/vhost-device-vsock", version_text="vhost-device-vsock 0.2.1\n")
    assert (other.status, other.summary) == ("PASS", "vsock via vhost-device-vsock 0.2.1 (/usr/bin/vhost-device-vsock)")
    odd = tool_checks.agent_transport_result("/opt/v", version_text="no digits here\n")
    assert (odd.status, odd.summary) == ("PASS", "vsock via vhost-device-vsock (unknown version) (/opt/v)")


def test_agent_transport_result_warns_with_the_install_command() -> None:
    missing = tool_checks.agent_transport_result(None)
    assert missing.status == "WARN"
    assert missing.summary == "virtio-serial fallback (vhost-device-vsock not found)"
    assert missing.hint == f"for the vsock transport, install it: {INSTALL_CMD}"
    configured = tool_checks.agent_transport_result(None, configured="/opt/vhost")
    assert configured.status == "WARN"
    assert configured.summary == "virtio-serial fallback (vhost_vsock_bin /opt/vhost is not an executable file)"
    assert configured.hint is not None and INSTALL_CMD in configured.hint and "vhost_vsock_bin" in configured.hint
    broken = tool_checks.agent_transport_result("/usr/local/bin/vhost-device-vsock", error="GLIBC_2.38 not found")
    assert broken.status == "WARN"
    assert broken.summary == ("virtio-serial fallback (/usr/local/bin/vhost-device-vsock does not run: "
                              "GLIBC_2.38 not found)")
    assert broken.hint is not None and INSTALL_CMD in broken.hint


def test_agent_transport_check_runs_the_configured_binary(tmp_path: Path) -> None:
    good = fake_tool(tmp_path / "bin", "vhost-device-vsock", "echo 'vhost-device-vsock 0.3.0'")
    result = tool_checks.check_agent_transport(ctx_for(tmp_path, vhost_vsock_bin=good))
    assert (result.status, result.summary) == ("PASS", f"vsock via vhost-device-vsock 0.3.0 ({good})")
    # A record written by install-vhost-vsock names the Debian version, but only for the file it installed.
    record = Path(good + ".version")
    digest = hashlib.sha256(Path(good).read_bytes()).hexdigest()
    record.write_text(json.dumps({"version": "0.3.0-2", "sha256": digest}))
    assert tool_checks.check_agent_transport(ctx_for(tmp_path, vhost_vsock_bin=good)).summary.endswith(f"0.3.0-2 ({good})")
    record.write_text(json.dumps({"version": "0.3.0-2", "sha256": "0" * 64}))
    assert tool_checks.check_agent_transport(ctx_for(tmp_path, vhost_vsock_bin=good)).summary.endswith(f"0.3.0 ({good})")
    broken = fake_tool(tmp_path / "bin", "vhost-broken", "echo 'version GLIBC_2.38 not found' >&2; exit 1")
    result = tool_checks.check_agent_transport(ctx_for(tmp_path, vhost_vsock_bin=broken))
    assert result.status == "WARN" and "does not run" in result.summary and "GLIBC_2.38" in result.summary
    missing = tool_checks.check_agent_transport(ctx_for(tmp_path, vhost_vsock_bin=str(tmp_path / "none")))
    assert missing.status == "WARN" and "is not an executable file" in missing.summary


# --- banger version vs install metadata -----------------------------------------------------------------

RELEASE = BuildInfo("0.2.0", "0123456789abcdef", "2026-05-01T00:00:00Z")


def write_meta(prefix: Path, text: str) -> Path:
    meta = prefix / "etc/banger/install.toml"
    meta.parent.mkdir(parents=True)
    meta.write_text(text)
    return meta


def test_version_without_install(system_prefix: Path) -> None:
    result = checks.version_result(RELEASE, system_prefix / "etc/banger/install.toml", 0.0)
    assert result.status == "PASS"
    assert result.summary.startswith("v0.2.0 (commit 01234567)")


def test_version_matches_install(system_prefix: Path, tmp_path: Path) -> None:
    write_meta(system_prefix, 'version = "0.2.0"\ninstalled_at = 2026-05-01T00:00:00Z\n')
    now = datetime(2026, 5, 4, 1, 0, tzinfo=UTC).timestamp()
    result = checks.check_banger_version(ctx_for(tmp_path, build=RELEASE, now=lambda: now))
    assert result.status == "PASS"
    assert any("(3 days ago)" in d for d in result.details)


def test_version_drift_warns(system_prefix: Path) -> None:
    meta = write_meta(system_prefix, 'version = "0.1.9"\n')
    result = checks.version_result(RELEASE, meta, 0.0)
    assert result.status == "WARN"
    assert "v0.2.0" in result.summary and "v0.1.9" in result.summary
    assert result.hint is not None


def test_version_drift_ignored_for_source_checkouts(system_prefix: Path) -> None:
    meta = write_meta(system_prefix, 'version = "0.1.9"\n')
    result = checks.version_result(BuildInfo("0.2.0.dev0", "unknown", "unknown"), meta, 0.0)
    assert result.status == "PASS"
    assert "development build: drift check skipped" in result.details


@pytest.mark.parametrize("text", ["version = \n", 'owner_user = "me"\n'])
def test_version_bad_metadata_warns(system_prefix: Path, text: str) -> None:
    result = checks.version_result(RELEASE, write_meta(system_prefix, text), 0.0)
    assert result.status == "WARN"


# --- state store ----------------------------------------------------------------------------------------


def test_store_missing_is_a_fresh_install(tmp_path: Path) -> None:
    result = checks.check_state_store(ctx_for(tmp_path))
    assert (result.status, result.summary) == ("PASS", "fresh install (no database yet)")


def test_store_uses_the_inspector(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path, store_inspector=lambda p: f"schema compatible ({p.name})")
    ctx.layout.state_dir.mkdir(parents=True)
    sqlite3.connect(ctx.layout.db_path).close()
    result = checks.check_state_store(ctx)
    assert (result.status, result.summary) == ("PASS", "schema compatible (state.db)")


def test_store_inspector_failure_fails(tmp_path: Path) -> None:
    def broken(path: Path) -> str:
        raise sqlite3.DatabaseError("file is not a database")

    ctx = ctx_for(tmp_path, store_inspector=broken)
    ctx.layout.state_dir.mkdir(parents=True)
    ctx.layout.db_path.write_bytes(b"x" * 100)
    result = checks.check_state_store(ctx)
    assert result.status == "FAIL"
    assert "file is not a database" in result.summary


def test_store_without_inspector_checks_the_header(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path)
    ctx.layout.state_dir.mkdir(parents=True)
    con = sqlite3.connect(ctx.layout.db_path)
    con.execute("create table t (x)")
    con.commit()
    con.close()
    assert checks.check_state_store(ctx).status == "PASS"
    ctx.layout.db_path.write_bytes(b"not sqlite at all, just text")
    assert checks.check_state_store(ctx).status == "FAIL"
    ctx.layout.db_path.unlink()
    ctx.layout.db_path.mkdir()
    result = checks.check_state_store(ctx)
    assert result.status == "FAIL"
    assert "not a regular file" in result.summary


# --- hardware virtualization ----------------------------------------------------------------------------


def test_kvm_row_pass_and_warn() -> None:
    ok = checks.kvm_result(KvmProbe(True, "KVM runs guests (probe guest halted in 12 ms)", "hardware", 12.0))
    assert (ok.status, ok.summary) == ("PASS", "KVM runs guests (probe guest halted in 12 ms)")
    assert "kind: hardware" in ok.details
    emulated = checks.kvm_result(
        KvmProbe(False, "KVM is present but guests run emulated (PVM or nested without VMX)", "emulated")
    )
    assert emulated.status == "WARN"  # TCG still works: never a FAIL
    assert emulated.summary.startswith("KVM unusable here: KVM is present but guests run emulated")
    assert emulated.summary.endswith("VMs will use QEMU with software emulation (TCG), slower")
    no_access = checks.kvm_result(KvmProbe(False, "cannot open /dev/kvm: Permission denied", "no-access"))
    assert no_access.status == "WARN"
    assert no_access.hint is not None and "kvm group" in no_access.hint


# The child's lines, in the format `python -m banger.system.kvm_probe --child` prints them.
STARTED = '{"stage": "started", "pid": 4242}\n'
RUN = '{"stage": "run"}\n'


def verdict(output: str, *, timed_out: bool = False, pvm: bool = False) -> KvmProbe:
    return kvm_probe.classify(output, timed_out=timed_out, timeout=2.0, waited_ms=2003.0, pvm_module=pvm)


def test_probe_verdict_hardware() -> None:
    done = '{"stage": "done", "exit_reason": 5, "exit_name": "HLT", "elapsed_ms": 12.4}\n'
    probe = verdict(STARTED + RUN + done)
    assert (probe.usable, probe.kind, probe.child_pid) == (True, "hardware", 4242)
    assert probe.reason == "KVM runs guests (probe guest halted in 12 ms)"
    assert checks.kvm_result(probe).status == "PASS"


def test_probe_verdict_timeout_in_kvm_run_is_emulation() -> None:
    probe = verdict(STARTED + RUN, timed_out=True, pvm=True)
    assert (probe.usable, probe.kind) == (False, "emulated")
    assert probe.reason == kvm_probe.EMULATED_REASON
    assert probe.elapsed_ms == 2003.0


def test_probe_verdict_slow_halt_is_emulation() -> None:
    # What this host kind does when given enough time: the 20M-iteration loop halts after ~17 s.
    done = '{"stage": "done", "exit_reason": 5, "exit_name": "HLT", "elapsed_ms": 17132.2}\n'
    probe = verdict(STARTED + RUN + done)
    assert (probe.usable, probe.kind, probe.exit_name) == (False, "emulated", "HLT")


def test_probe_verdict_timeout_before_kvm_run_is_no_verdict() -> None:
    probe = verdict(STARTED, timed_out=True)
    assert (probe.usable, probe.kind) == (False, "error")
    assert "did not reach KVM_RUN within 2s" in probe.reason


def test_probe_verdict_failures() -> None:
    err = '{"stage": "error", "step": "KVM_CREATE_VM", "error": "Invalid argument (errno 22)"}\n'
    failed = verdict(STARTED + err, pvm=True)
    assert (failed.usable, failed.kind, failed.failed_step) == (False, "pvm", "KVM_CREATE_VM")
    assert failed.reason.startswith("KVM_CREATE_VM failed: Invalid argument (errno 22)")
    assert verdict(STARTED + err).kind == "error"
    internal = '{"stage": "done", "exit_reason": 17, "exit_name": "INTERNAL_ERROR", "elapsed_ms": 3.0, "suberror": 1}\n'
    stopped = verdict(STARTED + RUN + internal)
    assert (stopped.usable, stopped.kind) == (False, "error")
    assert "INTERNAL_ERROR (suberror 1) instead of HLT" in stopped.reason
    assert verdict("Traceback (most recent call last):\n").reason == "probe child exited without a result"


# --- host tools -----------------------------------------------------------------------------------------


def test_tools_rows_match_the_host(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path)
    for check, tools in (
        (tool_checks.check_tools_disks, ("mkfs.ext4", "debugfs", "truncate")),
        (tool_checks.check_tools_networking, ("ip", "nft")),
        (tool_checks.check_tools_guest_access, ("ssh", "ssh-keygen")),
    ):
        result = check(ctx)
        missing = [t for t in tools if find_binary(t) is None]
        assert result.status == ("FAIL" if missing else "PASS"), result
        assert len(result.details) == len(tools)


def test_missing_optional_tool_warns_with_apt_hint() -> None:
    result = tool_checks.tools_result(
        "golden image build", ("/nonexistent/mmdebstrap", "truncate"), required=False
    )
    assert result.status == "WARN"
    assert result.summary.startswith("missing: /nonexistent/mmdebstrap")
    assert result.hint == "install them: apt-get install mmdebstrap"
    required = tool_checks.tools_result("disks", ("/nonexistent/mkfs.ext4", "/nonexistent/debugfs"), required=True)
    assert required.status == "FAIL"
    assert required.hint == "install them: apt-get install e2fsprogs"  # one package, named once


# --- vm defaults and runtime directory ------------------------------------------------------------------


def test_vm_defaults_row(tmp_path: Path) -> None:
    rows = [("vcpu", 4, "host heuristic"), ("memory_mib", 2048, "config"), ("disk_size", "8G", "builtin")]
    result = checks.check_vm_defaults(ctx_for(tmp_path, vm_defaults_rows=rows))
    assert result.status == "PASS"
    assert result.details[:3] == (
        "vcpu 4 (host heuristic)",
        "memory_mib 2048 (config)",
        "disk_size 8G (builtin)",
    )
    assert result.details[3].endswith("config.toml (absent)")
    assert checks.check_vm_defaults(ctx_for(tmp_path)).status == "WARN"


def test_runtime_dir_posture(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path)
    run_dir = ctx.layout.runtime_dir
    absent = checks.check_runtime_dir(ctx)
    assert (absent.status, absent.summary) == ("PASS", "will be created")
    run_dir.mkdir(parents=True, mode=0o700)
    run_dir.chmod(0o700)
    assert checks.check_runtime_dir(ctx).status == "PASS"
    run_dir.chmod(0o755)
    assert checks.check_runtime_dir(ctx).status == "WARN"
    run_dir.rmdir()
    run_dir.symlink_to(tmp_path)
    assert checks.check_runtime_dir(ctx).status == "FAIL"
    run_dir.unlink()
    run_dir.write_text("")
    assert checks.check_runtime_dir(ctx).status == "FAIL"


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to chown")
def test_runtime_dir_owned_by_someone_else(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path)
    ctx.layout.runtime_dir.mkdir(parents=True, mode=0o700)
    os.chown(ctx.layout.runtime_dir, 65534, 65534)
    result = checks.check_runtime_dir(ctx)
    assert result.status == "FAIL"
    assert "not owned by you" in result.summary


def test_system_runtime_dirs(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "sys", mode="system")
    ctx = DoctorContext(layout)
    layout.runtime_dir.mkdir(parents=True, mode=0o755)
    layout.helper_runtime_dir.mkdir(mode=0o700)
    layout.runtime_dir.chmod(0o755)
    if os.getuid() == 0:
        assert checks.check_runtime_dir(ctx).status == "PASS"
    layout.runtime_dir.chmod(0o777)
    result = checks.check_runtime_dir(ctx)
    assert result.status == "FAIL"
    assert "writable by others" in result.summary


# --- run_checks, rendering ------------------------------------------------------------------------------

EXPECTED_ROWS = [
    "architecture",
    "banger version",
    "state store",
    "hardware virtualization",
    "VM boot (QEMU)",
    "root filesystem and work disk",
    "kernel extraction",
    "golden image build",
    "networking",
    "guest access",
    "qemu",
    "firecracker",
    "guest agent transport (QEMU)",
    "vm defaults",
    "runtime directory",
    "release build",
    "system services",
    "socket posture",
    "firecracker binary",
    "ssh config include",
    "images and kernels",
    "vm DNS",
    "devices",
    "bridge and tap pool",
    "nftables",
    "work seeds",
]


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_run_checks_is_read_only(tmp_path: Path) -> None:
    before = tree(tmp_path)
    ctx = DoctorContext(
        make_layout(tmp_path / "banger"),
        vm_defaults_rows=[("vcpu", 1, "host heuristic")],
        store_inspector=lambda p: "unused",
        kvm_probe_timeout=0.5,
    )
    results = doctor.run_checks(ctx)
    assert [r.name for r in results] == EXPECTED_ROWS
    assert tree(tmp_path) == before  # no layout directory, no database, no install metadata appeared
    assert not (tmp_path / "banger").exists()
    by_name = {r.name: r for r in results}
    assert by_name["state store"].summary == "fresh install (no database yet)"
    assert by_name["runtime directory"].summary == "will be created"
    assert doctor.exit_code(results) == (1 if any(r.status == "FAIL" for r in results) else 0)


def test_crashing_check_becomes_a_fail_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def check_exploding(ctx: DoctorContext) -> CheckResult:
        raise RuntimeError("boom")

    monkeypatch.setattr(doctor, "CHECKS", (checks.check_architecture, check_exploding))
    results = doctor.run_checks(ctx_for(tmp_path))
    assert [r.name for r in results] == ["architecture", "exploding"]
    assert results[1].status == "FAIL"
    assert "RuntimeError: boom" in results[1].summary
    assert doctor.exit_code(results) == 1


SAMPLE = [
    CheckResult("architecture", "PASS", "x86_64"),
    CheckResult("firecracker", "WARN", "firecracker not found", hint="set firecracker_bin"),
    CheckResult("qemu", "FAIL", "qemu-system-x86_64 not found", ("looked on PATH", "and in /usr/sbin")),
]


def test_render_text_plain() -> None:
    text = doctor.render_text(SAMPLE, color=False)
    assert "\x1b" not in text
    assert text.splitlines() == [
        "PASS\tarchitecture",
        "  - x86_64",
        "WARN\tfirecracker",
        "  - firecracker not found",
        "  hint: set firecracker_bin",
        "FAIL\tqemu",
        "  - qemu-system-x86_64 not found",
        "  - looked on PATH",
        "  - and in /usr/sbin",
    ]
    assert text.endswith("\n")
    assert doctor.render_text([], color=False) == ""


def test_render_text_color() -> None:
    lines = doctor.render_text(SAMPLE, color=True).splitlines()
    assert lines[0] == "\x1b[32mPASS\x1b[0m\tarchitecture"
    assert lines[2] == "\x1b[33mWARN\x1b[0m\tfirecracker"
    assert lines[5] == "\x1b[31mFAIL\x1b[0m\tqemu"


def test_to_json_and_exit_code() -> None:
    data = doctor.to_json(SAMPLE)
    assert json.loads(json.dumps(data)) == data
    assert data[2] == {
        "name": "qemu",
        "status": "FAIL",
        "summary": "qemu-system-x86_64 not found",
        "details": ["looked on PATH", "and in /usr/sbin"],
        "hint": None,
    }
    assert doctor.exit_code(SAMPLE) == 1
    assert doctor.exit_code(SAMPLE[:2]) == 0
    assert doctor.exit_code([]) == 0


def test_results_are_frozen() -> None:
    with pytest.raises(AttributeError):
        SAMPLE[0].status = "FAIL"  # type: ignore[misc]


# --- host state rows (pure verdicts) ------------------------------------------------------------------

def test_devices_verdicts() -> None:
    from banger.doctor.host_checks import DeviceAccess, devices_result

    tun_root_only = DeviceAccess("/dev/net/tun", True, 0o600, 0, 0)
    tun_open = DeviceAccess("/dev/net/tun", True, 0o666, 0, 0)
    kvm_group = DeviceAccess("/dev/kvm", True, 0o660, 0, 108)
    missing = DeviceAccess("/dev/kvm", False)
    r = devices_result(tun_root_only, kvm_group, "the owner dev", 1000, [1000])
    assert (r.status, r.summary) == ("WARN", "the owner dev cannot open /dev/net/tun: VMs cannot attach their taps")
    assert r.hint is not None and "0666" in r.hint
    r = devices_result(tun_open, kvm_group, "the owner dev", 1000, [1000])
    assert (r.status, r.summary) == ("WARN", "the owner dev cannot open /dev/kvm: KVM is out of reach, QEMU uses TCG")
    r = devices_result(tun_open, kvm_group, "the owner dev", 1000, [1000, 108])
    assert (r.status, r.summary) == ("PASS", "the owner dev can open /dev/net/tun and /dev/kvm")
    assert devices_result(tun_open, missing, "x", 1000, []).summary == "x can open /dev/net/tun"
    assert devices_result(DeviceAccess("/dev/net/tun", False), missing, "x", 1000, []).status == "FAIL"
    assert devices_result(tun_root_only, kvm_group, "root", 0, [0]).status == "PASS"


def test_bridge_nat_and_seed_verdicts() -> None:
    from banger.doctor.host_checks import bridge_result, nat_result, seeds_result

    assert bridge_result("br-fc", False, False, [], 4).summary == \
        "bridge br-fc not created yet (it comes up with the first VM)"
    down = bridge_result("br-fc", True, False, ["tap-pool-0"], 4)
    assert (down.status, down.hint) == ("WARN", "`ip link set br-fc up`, or restart bangerd")
    up = bridge_result("br-fc", True, True, ["tap-pool-1", "tap-pool-0"], 4)
    assert (up.status, up.summary, up.details[0]) == ("PASS", "bridge br-fc up with 2 tap(s)",
                                                      "taps on br-fc: tap-pool-0, tap-pool-1")
    assert nat_result(True, 3, True).summary == "`ip banger` table with 3 rule(s) for VMs with --nat"
    assert nat_result(True, None, False).summary == "no `ip banger` table: no VM has --nat right now"
    seeds = seeds_result(["a", "b"], ["b"])
    assert (seeds.status, seeds.details) == ("WARN", ("b",))
    assert seeds_result(["a"], []).summary == "all 1 image(s) have a work seed"

