"""Choosing a VM's backend and agent channel (daemon/vmplan.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from banger.daemon.vmplan import AgentEndpoint, agent_endpoint_for, choose_backend, parse_backend
from banger.errors import BadRequest, NotFound
from banger.vmm.base import Backend


def _never() -> tuple[bool, str]:
    raise AssertionError("the KVM probe must not run for this choice")


def test_explicit_qemu_never_probes() -> None:
    choice = choose_backend("qemu", "/usr/bin/firecracker", _never)
    assert (choice.backend, choice.reason) == (Backend.QEMU, "vmm = qemu")


def test_explicit_firecracker_needs_the_binary() -> None:
    assert choose_backend("firecracker", "/opt/fc", _never).backend == Backend.FIRECRACKER
    with pytest.raises(NotFound, match="vmm = firecracker, but no firecracker binary was found") as err:
        choose_backend("firecracker", None, _never)
    assert err.value.hint == 'install it and set firecracker_bin in config.toml, or set vmm = "qemu"'


def test_auto_without_firecracker_is_qemu_without_probing() -> None:
    choice = choose_backend("auto", None, _never)
    assert (choice.backend, choice.reason) == (Backend.QEMU, "auto: no firecracker binary")


@pytest.mark.parametrize(("kvm", "backend", "reason"), [
    ((True, "guest ran"), Backend.FIRECRACKER, "auto: firecracker at /opt/fc, KVM runs guests"),
    ((False, "PVM"), Backend.QEMU, "auto: KVM cannot run guests here (PVM), so QEMU with TCG"),
])
def test_auto_follows_the_kvm_probe(kvm: tuple[bool, str], backend: Backend, reason: str) -> None:
    choice = choose_backend("auto", "/opt/fc", lambda: kvm)
    assert (choice.backend, choice.reason) == (backend, reason)


def test_parse_backend_refuses_unknown_names() -> None:
    assert parse_backend("firecracker") == Backend.FIRECRACKER
    with pytest.raises(BadRequest, match=r"^vmm 'kvmtool' is not one of firecracker, qemu$"):
        parse_backend("kvmtool")


def test_agent_channel_is_vsock_wherever_the_vmm_offers_it(tmp_path: Path) -> None:
    assert agent_endpoint_for(Backend.FIRECRACKER, tmp_path, None) == AgentEndpoint("vsock", tmp_path / "vsock.sock")
    assert agent_endpoint_for(Backend.QEMU, tmp_path, "/usr/local/bin/vhost-device-vsock") == AgentEndpoint(
        "vsock", tmp_path / "vsock.sock")
    assert agent_endpoint_for(Backend.QEMU, tmp_path, None) == AgentEndpoint("serial", tmp_path / "agent.sock")


def test_agent_endpoint_round_trips_through_the_runtime_record(tmp_path: Path) -> None:
    endpoint = AgentEndpoint("vsock", tmp_path / "v.sock")
    assert AgentEndpoint.from_runtime(endpoint.to_runtime(), tmp_path / "other") == endpoint
    # Records from before the transport was recorded: the serial socket in the VM's run directory.
    assert AgentEndpoint.from_runtime({}, tmp_path) == AgentEndpoint("serial", tmp_path / "agent.sock")
