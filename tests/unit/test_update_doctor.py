"""The doctor rows that gate `banger update` and describe a system install (doctor/install_checks.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from banger import paths
from banger.buildinfo import BuildInfo
from banger.doctor import install_checks as ic
from banger.doctor.checks import DoctorContext


def layout(tmp_path: Path) -> paths.Layout:
    return paths.Layout(mode="user", config_dir=tmp_path / "cfg", state_dir=tmp_path / "state",
                        cache_dir=tmp_path / "cache", runtime_dir=tmp_path / "run",
                        helper_runtime_dir=tmp_path / "run", owner_home=tmp_path / "home")


def test_release_build_row() -> None:
    release = BuildInfo("0.2.0", "0123456789abcdef", "2026-01-01T00:00:00Z")
    assert ic.build_result(release, None).summary == "v0.2.0, commit 01234567, built 2026-01-01T00:00:00Z"
    assert ic.build_result(BuildInfo("0.1.0.dev0", "unknown", "unknown"), None).status == "PASS"
    faulty = ic.build_result(release, "doctor")
    assert faulty.status == "FAIL" and "make-release --test-fault doctor" in faulty.summary


def test_firecracker_posture(tmp_path: Path) -> None:
    binary = tmp_path / "firecracker"
    binary.write_bytes(b"\x7fELF")
    binary.chmod(0o755)
    if os.geteuid() == 0:
        assert ic.executable_posture(str(binary)) == []
    else:
        assert ic.executable_posture(str(binary)) == [f"{binary} is owned by uid {os.getuid()}, not root"]
    binary.chmod(0o775)
    assert f"{binary} is writable by group or others (mode 0775)" in ic.executable_posture(str(binary))
    binary.chmod(0o644)
    assert f"{binary} is not executable" in ic.executable_posture(str(binary))
    link = tmp_path / "fc-link"
    link.symlink_to(binary)
    assert ic.executable_posture(str(link)) == [
        f"{link} is a symlink (to {binary}); point firecracker_bin at the file itself"]
    assert ic.executable_posture(str(tmp_path / "missing"))[0].startswith("cannot stat")
    ctx = DoctorContext(layout(tmp_path), firecracker_bin=str(link))
    assert ic.check_firecracker_binary(ctx).status == "FAIL"


def test_socket_posture_rules(tmp_path: Path) -> None:
    d = tmp_path / "run"
    d.mkdir(mode=0o711)
    d.chmod(0o711)
    path = d / "x.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        path.chmod(0o600)
        facts, problems = ic.socket_problems(path, os.getuid(), dir_uid=os.getuid(), dir_mode=0o711)
        assert problems == [] and facts == f"{path}: mode 0600, uid {os.getuid()}; directory mode 0711, uid {os.getuid()}"
        path.chmod(0o666)
        _, problems = ic.socket_problems(path, os.getuid() + 1, dir_mode=0o700)
        assert problems == [f"{path} has mode 0666, not 0600",
                            f"{path} is owned by uid {os.getuid()}, not the owner uid {os.getuid() + 1}",
                            f"{d} has mode 0711, not 0700"]
    path.unlink()  # closing a bound socket leaves its file behind
    assert ic.socket_problems(path, 0) == (f"{path}: absent", [f"{path} does not exist"])


def test_ssh_include_and_artifacts_rows(tmp_path: Path) -> None:
    lay = layout(tmp_path)
    ctx = DoctorContext(lay)
    assert ic.check_ssh_config_include(ctx).status == "WARN"
    (lay.owner_home / ".ssh").mkdir(parents=True)
    (lay.owner_home / ".ssh/config").write_text(f"Include {lay.ssh_config}\n")
    assert ic.check_ssh_config_include(ctx).status == "PASS"
    assert ic.check_images_and_kernels(ctx).summary == "no kernel yet: VMs cannot boot until one is pulled"
    (lay.kernels_dir / "debian-12").mkdir(parents=True)
    assert ic.check_images_and_kernels(ctx).summary == "1 kernel(s), no image yet"
    (lay.images_dir / "img1").mkdir(parents=True)
    (lay.images_dir / ".partial").mkdir()
    row = ic.check_images_and_kernels(ctx)
    assert (row.status, row.summary) == ("PASS", "1 image(s), 1 kernel(s)")


def test_dns_probe_talks_to_a_real_udp_server() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        import threading

        def answer() -> None:
            data, peer = server.recvfrom(512)
            server.sendto(data[:2] + b"\x81\x80" + data[4:], peer)

        t = threading.Thread(target=answer)
        t.start()
        assert ic._dns_answers("127.0.0.1", port) is True
        t.join()
    assert ic._dns_answers("127.0.0.1", port, timeout=0.2) is False


@pytest.mark.parametrize("status", ["PASS", "WARN"])
def test_not_a_system_install(status: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BANGER_SYSTEM_PREFIX", str(tmp_path))
    ctx = DoctorContext(layout(tmp_path))
    rows = {"WARN": ic.check_system_services(ctx), "PASS": ic.check_socket_posture(ctx)}
    assert rows[status].status == status
    (tmp_path / "etc/banger").mkdir(parents=True)
    (tmp_path / "etc/banger/install.toml").write_text("owner_user = 1\n")
    assert ic.check_system_services(ctx).status == "FAIL"  # unreadable metadata is a failure, not a skip
