"""Contract: every request banger sends to Firecracker is valid against Firecracker's official API spec.

The spec (swagger 2.0) is vendored in tests/data/firecracker. Its body schemas are turned into JSON-Schema
draft 4: `$ref`s into `definitions` are inlined, swagger-only keys dropped, and every object schema is made
closed (`additionalProperties: false`), because Firecracker's serde structs reject unknown fields; without
that a misspelt field name would pass here and fail against the real binary.

The API client itself is exercised against a small HTTP/1.1 server on a real Unix socket that records each
request, so what is validated is what actually went over the wire.
"""

from __future__ import annotations

import copy
import http.server
import json
import re
import socketserver
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from banger.errors import BadRequest, BangerError
from banger.vmm.firecracker.api import (
    FirecrackerApi,
    FirecrackerApiError,
    FirecrackerUnreachable,
    wait_for_socket,
)
from banger.vmm.firecracker.config import (
    Drive,
    FirecrackerVmConfig,
    NetIface,
    Vsock,
    apply,
    request_bodies,
)
from banger.vmm.firecracker.jailer import JailPlan, jailed_config

SPEC = Path(__file__).resolve().parents[1] / "data" / "firecracker" / "firecracker-api-v1.16.1.yaml"
_SWAGGER_ONLY = frozenset({"readOnly", "example", "discriminator", "xml", "externalDocs"})

# -- the spec ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(SPEC.read_text())
    assert data["swagger"] == "2.0"
    return data


def to_draft4(node: Any, definitions: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    """A swagger 2.0 schema as a self-contained, closed draft-4 schema."""
    if isinstance(node, list):
        return [to_draft4(item, definitions, seen) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].removeprefix("#/definitions/")
        assert name not in seen, f"recursive $ref {name}"
        # Draft 4 ignores the siblings of $ref (swagger puts descriptions there), so only the target counts.
        return to_draft4(definitions[name], definitions, (*seen, name))
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-") or key in _SWAGGER_ONLY:
            continue
        if key == "properties":
            out[key] = {prop: to_draft4(sub, definitions, seen) for prop, sub in value.items()}
        else:
            out[key] = to_draft4(value, definitions, seen)
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def spec_template(spec: dict[str, Any], path: str) -> str | None:
    """The spec path template a concrete path belongs to (`/drives/rootfs` -> `/drives/{drive_id}`)."""
    for template in spec["paths"]:
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            return str(template)
    return None


def body_schema(spec: dict[str, Any], method: str, path: str) -> dict[str, Any] | None:
    template = spec_template(spec, path)
    assert template is not None, f"{path} is not a path of the Firecracker API"
    operation = spec["paths"][template].get(method.lower())
    assert operation is not None, f"{method} {template} is not an operation of the Firecracker API"
    for param in operation.get("parameters", []):
        if param["in"] == "body":
            schema = to_draft4(param["schema"], spec["definitions"])
            jsonschema.Draft4Validator.check_schema(schema)
            return dict(schema)
    return None


def spec_errors(spec: dict[str, Any], method: str, path: str, body: Any) -> list[str]:
    schema = body_schema(spec, method, path)
    if schema is None:
        return [] if body is None else [f"{method} {path} takes no body, got {body!r}"]
    validator = jsonschema.Draft4Validator(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<body>'}: {e.message}" for e in validator.iter_errors(body)
    ]


# -- configurations banger really builds -------------------------------------------------------------------


def minimal_config() -> FirecrackerVmConfig:
    return FirecrackerVmConfig(
        kernel_path="/var/lib/banger/kernels/generic-6.1/vmlinux",
        initrd_path=None,
        boot_args="console=ttyS0 reboot=k panic=1 pci=off",
        vcpu=1,
        memory_mib=128,
        drives=(Drive("rootfs", "/var/lib/banger/images/debian/rootfs.ext4", True, False),),
    )


def full_config() -> FirecrackerVmConfig:
    return FirecrackerVmConfig(
        kernel_path="/var/lib/banger/kernels/generic-6.1/vmlinux",
        initrd_path="/var/lib/banger/kernels/generic-6.1/initrd.img",
        boot_args="console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda ro",
        vcpu=2,
        memory_mib=2048,
        drives=(
            # The work disk is listed first on purpose: the root drive must still be sent first.
            Drive("work", "/var/lib/banger/vms/0a1b2c3d/work.ext4", is_root_device=False, is_read_only=False),
            Drive("rootfs", "/dev/mapper/banger-0a1b2c3d", is_root_device=True, is_read_only=True),
        ),
        net=(NetIface("eth0", "tap-0a1b2c3d", "06:00:ac:10:00:02"),),
        vsock=Vsock(guest_cid=42, uds_path="/run/banger/vms/0a1b2c3d/vsock.sock"),
        log_path="/var/lib/banger/vms/0a1b2c3d/firecracker.log",
        metrics_path="/var/lib/banger/vms/0a1b2c3d/metrics.json",
        log_level="Debug",
        entropy=True,
    )


def jailed_full_config() -> FirecrackerVmConfig:
    plan = JailPlan("/srv/jailer", "0a1b2c3d-vm", "/usr/bin/firecracker", 1000, 1000)
    return jailed_config(plan, full_config())


CONFIGS: dict[str, Callable[[], FirecrackerVmConfig]] = {
    "minimal": minimal_config,
    "full": full_config,
    "jailed": jailed_full_config,
    "no-net-no-vsock-with-initrd": lambda: FirecrackerVmConfig(
        kernel_path="/k/vmlinux",
        initrd_path="/k/initrd",
        boot_args="console=ttyS0",
        vcpu=32,
        memory_mib=512,
        log_path="/l/fc.log",
    ),
}

INSTANCE_START = ("PUT", "/actions", {"action_type": "InstanceStart"})


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_request_body_is_valid_against_the_spec(spec: dict[str, Any], name: str) -> None:
    calls = [*request_bodies(CONFIGS[name]()), INSTANCE_START]
    for method, path, body in calls:
        assert spec_errors(spec, method, path, body) == [], f"{method} {path} {body}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_call_exists_in_the_spec(spec: dict[str, Any], name: str) -> None:
    for method, path, _ in request_bodies(CONFIGS[name]()):
        template = spec_template(spec, path)
        assert template is not None, path
        assert method.lower() in spec["paths"][template], f"{method} {template}"


def test_every_resource_of_the_client_is_a_spec_operation(spec: dict[str, Any], tmp_path: Path) -> None:
    with FirecrackerApi(tmp_path / "unused.sock") as api:
        resources = api.resources()
    assert len(resources) >= 14
    for resource in resources:
        assert resource.template in spec["paths"], resource.template
        for method in resource.methods:
            assert method.lower() in spec["paths"][resource.template], f"{method} {resource.template}"


@pytest.mark.parametrize(
    ("method", "path", "body", "complaint"),
    [
        ("PUT", "/machine-config", {"vcpu_count": "2", "mem_size_mib": 512}, "is not of type 'integer'"),
        ("PUT", "/machine-config", {"vcpu_count": 33, "mem_size_mib": 512}, "maximum"),
        ("PUT", "/machine-config", {"vcpu_count": 2}, "'mem_size_mib' is a required property"),
        ("PUT", "/boot-source", {"boot_args": "console=ttyS0"}, "'kernel_image_path' is a required property"),
        ("PUT", "/boot-source", {"kernel_image_path": "/k", "initrd_path": None}, "is not of type 'string'"),
        (
            "PUT",
            "/drives/rootfs",
            {"drive_id": "rootfs", "path_on_host": "/r"},
            "'is_root_device' is a required",
        ),
        (
            "PUT",
            "/drives/rootfs",
            {"drive_id": "rootfs", "is_root_device": True, "readonly": True},
            "Additional",
        ),
        ("PUT", "/vsock", {"guest_cid": 2, "uds_path": "/v.sock"}, "less than the minimum"),
        ("PUT", "/actions", {"action_type": "Reboot"}, "is not one of"),
        ("PUT", "/logger", {"log_path": "/l", "level": "Verbose"}, "is not one of"),
        ("PATCH", "/vm", {"state": "Stopped"}, "is not one of"),
    ],
)
def test_a_wrong_body_fails_validation(
    spec: dict[str, Any], method: str, path: str, body: dict[str, Any], complaint: str
) -> None:
    errors = spec_errors(spec, method, path, body)
    assert errors, f"{method} {path} {body} passed validation"
    assert any(complaint in e for e in errors), errors


def test_an_unknown_path_is_not_in_the_spec(spec: dict[str, Any]) -> None:
    assert spec_template(spec, "/drive/rootfs") is None
    assert spec_template(spec, "/drives/a/b") is None
    assert spec_template(spec, "/drives/rootfs") == "/drives/{drive_id}"


def test_order_logger_first_root_drive_before_other_drives() -> None:
    paths = [path for _, path, _ in request_bodies(full_config())]
    assert paths == [
        "/logger",
        "/metrics",
        "/machine-config",
        "/boot-source",
        "/drives/rootfs",
        "/drives/work",
        "/network-interfaces/eth0",
        "/vsock",
        "/entropy",
    ]


def test_unset_optional_fields_are_left_out_not_sent_as_null() -> None:
    cfg = FirecrackerVmConfig(
        kernel_path="/k/vmlinux",
        initrd_path=None,
        boot_args="console=ttyS0",
        vcpu=1,
        memory_mib=128,
        net=(NetIface("eth0", "tap0"),),
    )
    bodies = {path: body for _, path, body in request_bodies(cfg)}
    assert bodies["/boot-source"] == {"kernel_image_path": "/k/vmlinux", "boot_args": "console=ttyS0"}
    assert bodies["/network-interfaces/eth0"] == {"iface_id": "eth0", "host_dev_name": "tap0"}
    assert "/logger" not in bodies and "/metrics" not in bodies and "/vsock" not in bodies


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vcpu": 0}, "vcpu 0 is out of range"),
        ({"vcpu": 33}, "vcpu 33 is out of range"),
        ({"memory_mib": "512"}, "memory_mib '512' is not an integer"),
        ({"kernel_path": "vmlinux"}, "kernel path 'vmlinux' is not an absolute path"),
        ({"log_level": "Verbose"}, "log level 'Verbose'"),
        (
            {"drives": (Drive("a", "/a", True, False), Drive("b", "/b", True, False))},
            "at most one drive can be the root device",
        ),
        (
            {"drives": (Drive("a", "/a", True, False), Drive("a", "/b", False, False))},
            "drive_id 'a' is used twice",
        ),
        ({"net": (NetIface("eth0", "tap0"), NetIface("eth1", "tap0"))}, "tap device 'tap0' is used twice"),
    ],
)
def test_config_rejects_bad_values(change: dict[str, Any], message: str) -> None:
    fields = {**minimal_config().__dict__, **change}
    with pytest.raises(BadRequest, match=re.escape(message)):
        FirecrackerVmConfig(**fields)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Drive("root fs", "/r", True, False), "drive_id 'root fs' is invalid"),
        (lambda: Drive("rootfs\n", "/r", True, False), "drive_id 'rootfs\\n' is invalid"),
        (lambda: Drive("rootfs", "r.ext4", True, False), "is not an absolute path"),
        (lambda: NetIface("eth0", "a-much-too-long-tap-name"), "is not a valid interface name"),
        (lambda: NetIface("eth0", "tap0", "06:00:ac:10:00"), "guest MAC '06:00:ac:10:00'"),
        (lambda: Vsock(2, "/v.sock"), "vsock guest CID 2 is out of range"),
    ],
)
def test_devices_reject_bad_values(build: Callable[[], object], message: str) -> None:
    with pytest.raises(BadRequest, match=re.escape(message)):
        build()


# -- the client on a real Unix socket ----------------------------------------------------------------------


class FakeFirecracker(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Speaks just enough HTTP/1.1 to stand in for Firecracker's API: records every request and answers
    with `responses[(method, path)]` or a plausible default (204 for writes, JSON for reads)."""

    daemon_threads = True

    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[tuple[str, str, Any]] = []
        self.responses: dict[tuple[str, str], tuple[int, bytes]] = {}
        super().__init__(path, _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeFirecracker

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        self.server.requests.append((self.command, self.path, body))
        status, payload = self.server.responses.get(
            (self.command, self.path), _default(self.command, self.path)
        )
        self.send_response(status)
        if payload:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if payload:
            self.wfile.write(payload)

    do_GET = do_PUT = do_PATCH = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet; and client_address is '' on a Unix socket, which the default logger cannot print


_GET_ANSWERS: dict[str, Any] = {
    "/": {
        "app_name": "Firecracker",
        "id": "anonymous-instance",
        "state": "Not started",
        "vmm_version": "1.16.1",
    },
    "/version": {"firecracker_version": "1.16.1"},
    "/machine-config": {"vcpu_count": 2, "mem_size_mib": 1024, "smt": False, "track_dirty_pages": False},
    "/vm/config": {"machine-config": {"vcpu_count": 2, "mem_size_mib": 1024}, "drives": []},
}


def _default(method: str, path: str) -> tuple[int, bytes]:
    if method == "GET":
        return 200, json.dumps(_GET_ANSWERS[path]).encode()
    return 204, b""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer than that.
    with tempfile.TemporaryDirectory(prefix="bgfc-") as d:
        yield Path(d)


@pytest.fixture
def fake_fc(short_dir: Path) -> Iterator[FakeFirecracker]:
    server = FakeFirecracker(str(short_dir / "api.sock"))
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_typed_methods_send_spec_valid_requests(spec: dict[str, Any], fake_fc: FakeFirecracker) -> None:
    with FirecrackerApi(fake_fc.path) as api:
        assert api.get_instance_info()["state"] == "Not started"
        assert api.get_version() == "1.16.1"
        assert api.get_machine_config()["vcpu_count"] == 2
        assert "machine-config" in api.get_vm_config()
        api.put_logger(log_path="/l/fc.log", level="Info", show_level=True)
        api.put_metrics(metrics_path="/l/metrics.json")
        api.put_machine_config(vcpu_count=2, mem_size_mib=1024, smt=False)
        api.put_boot_source(kernel_image_path="/k/vmlinux", boot_args="console=ttyS0")
        api.put_drive("rootfs", path_on_host="/d/rootfs", is_root_device=True, is_read_only=True)
        api.put_drive(
            "work", path_on_host="/d/work", is_root_device=False, is_read_only=False, io_engine="Sync"
        )
        api.patch_drive("work", path_on_host="/d/work-resized")
        api.put_network_interface("eth0", host_dev_name="tap0", guest_mac="06:00:ac:10:00:02")
        api.put_vsock(guest_cid=3, uds_path="/v.sock")
        api.put_entropy()
        api.instance_start()
        api.flush_metrics()
        api.send_ctrl_alt_del()
        api.pause()
        api.create_snapshot(snapshot_path="/s/vm.snap", mem_file_path="/s/vm.mem", snapshot_type="Full")
        api.resume()
        api.load_snapshot(snapshot_path="/s/vm.snap", mem_file_path="/s/vm.mem", resume_vm=True)
        resources = api.resources()

    sent = fake_fc.requests
    assert ("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "/d/rootfs",
                                      "is_root_device": True, "is_read_only": True}) in sent  # fmt: skip
    assert ("PUT", "/actions", {"action_type": "InstanceStart"}) in sent
    assert ("PATCH", "/vm", {"state": "Paused"}) in sent
    for method, path, body in sent:
        assert spec_errors(spec, method, path, body) == [], f"{method} {path} {body}"
    # Every operation the client knows was exercised above, so none escapes the contract.
    exercised = {(method, spec_template(spec, path)) for method, path, _ in sent}
    declared = {(method, r.template) for r in resources for method in r.methods}
    assert declared == exercised


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_apply_sends_the_bodies_in_order_then_instance_start(fake_fc: FakeFirecracker, name: str) -> None:
    cfg = CONFIGS[name]()
    with FirecrackerApi(fake_fc.path) as api:
        apply(api, cfg)
    assert fake_fc.requests == [*request_bodies(cfg), INSTANCE_START]


def test_error_carries_status_method_path_and_fault_message(fake_fc: FakeFirecracker) -> None:
    fault = "Invalid kernel path: No such file or directory (os error 2)\n  caused by: open /k/vmlinux"
    fake_fc.responses[("PUT", "/boot-source")] = (400, json.dumps({"fault_message": fault}).encode())
    with FirecrackerApi(fake_fc.path) as api, pytest.raises(FirecrackerApiError) as info:
        api.put_boot_source(kernel_image_path="/k/vmlinux", boot_args="console=ttyS0")
    err = info.value
    assert isinstance(err, BangerError)
    assert (err.status, err.method, err.path, err.fault_message) == (400, "PUT", "/boot-source", fault)
    assert str(err) == (
        "Firecracker API PUT /boot-source failed with HTTP 400: Invalid kernel path: No such file or directory "
        "(os error 2) caused by: open /k/vmlinux"
    )
    assert "\n" not in str(err)


def test_error_without_json_body_still_says_what_failed(fake_fc: FakeFirecracker) -> None:
    fake_fc.responses[("PUT", "/actions")] = (500, b"internal error")
    with FirecrackerApi(fake_fc.path) as api, pytest.raises(FirecrackerApiError) as info:
        api.instance_start()
    assert str(info.value) == "Firecracker API PUT /actions failed with HTTP 500: internal error"


def test_apply_stops_at_the_first_failing_call(fake_fc: FakeFirecracker) -> None:
    fake_fc.responses[("PUT", "/drives/rootfs")] = (
        400,
        b'{"fault_message": "Unable to open the block device"}',
    )
    with (
        FirecrackerApi(fake_fc.path) as api,
        pytest.raises(FirecrackerApiError, match="block device"),
    ):
        apply(api, full_config())
    assert fake_fc.requests[-1][1] == "/drives/rootfs"
    assert ("PUT", "/actions", {"action_type": "InstanceStart"}) not in fake_fc.requests


def test_nothing_listening_is_unreachable_not_an_api_error(short_dir: Path) -> None:
    with FirecrackerApi(short_dir / "absent.sock") as api, pytest.raises(FirecrackerUnreachable) as info:
        api.get_instance_info()
    assert str(short_dir / "absent.sock") in str(info.value)
    assert "GET /" in str(info.value)


def test_wait_for_socket_returns_instance_info(fake_fc: FakeFirecracker) -> None:
    info = wait_for_socket(fake_fc.path, 5)
    assert info["app_name"] == "Firecracker"


def test_wait_for_socket_gives_up_after_the_timeout(short_dir: Path) -> None:
    with pytest.raises(BangerError, match=r"did not answer within 0.2s \(the socket does not exist yet\)"):
        wait_for_socket(short_dir / "never.sock", 0.2)


def test_wait_for_socket_stops_when_the_process_is_gone(short_dir: Path) -> None:
    with pytest.raises(BangerError, match="Firecracker exited before its API socket"):
        wait_for_socket(short_dir / "never.sock", 30, alive=lambda: False)


def test_wait_for_socket_ignores_a_stale_socket_file_until_it_answers(short_dir: Path) -> None:
    import socket

    path = short_dir / "stale.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # bound, never listening: connect() is refused, as after a crash
    try:
        with pytest.raises(BangerError, match="Connect"):
            wait_for_socket(path, 0.3)
    finally:
        stale.close()


def test_schema_conversion_closes_objects_and_inlines_refs(spec: dict[str, Any]) -> None:
    schema = body_schema(spec, "PUT", "/drives/x")
    assert schema is not None
    assert schema["additionalProperties"] is False
    assert schema["properties"]["rate_limiter"]["properties"]["bandwidth"]["required"] == [
        "refill_time",
        "size",
    ]
    assert "$ref" not in json.dumps(schema)
    # The conversion must not mutate the loaded spec.
    before = copy.deepcopy(spec["definitions"]["Drive"])
    body_schema(spec, "PUT", "/drives/x")
    assert spec["definitions"]["Drive"] == before


class _NoLauncher:
    """configure() of a jailed VM must not need the root helper; any call would be a bug."""

    def stage(self, request: object) -> None:
        raise AssertionError("stage called")

    def launch(self, vm_id: str, console_log: Path) -> int:
        raise AssertionError("launch called")

    def cleanup(self, vm_id: str) -> None:
        raise AssertionError("cleanup called")


def test_a_jailed_vm_is_configured_with_in_jail_paths_only(spec: dict[str, Any], fake_fc: FakeFirecracker) -> None:
    from banger.vmm.base import DriveSpec, VmProcess, VmSpec, VsockSpec
    from banger.vmm.firecracker.backend import FirecrackerVmm
    from banger.vmm.firecracker.launcher import JailSetup

    run = Path("/run/banger/vms/0a1b2c3d")
    vm = VmSpec(vm_id="0a1b2c3d4e5f6071", name="j", vcpu=1, memory_mib=256, kernel=Path("/k/vmlinux"),
                initrd=Path("/k/initrd.img"), cmdline="root=/dev/vda ro", console_log=Path("/v/console.log"),
                run_dir=run, drives=(DriveSpec("rootfs", Path("/i/rootfs.ext4"), read_only=True, root=True),),
                vsock=VsockSpec(3, run / "vsock.sock"))
    fc = FirecrackerVmm(firecracker_bin="/usr/bin/firecracker", jail=JailSetup(_NoLauncher(), "/srv/jailer", 1000, 1000))
    proc = VmProcess(vm_id=vm.vm_id, pid=0, run_dir=run, control_socket=Path(fake_fc.path), pidfile=run / "fc.pid",
                     stderr_log=vm.console_log, sockets=())
    fc.configure(proc, vm)
    paths = {key: body[key] for _, _, body in fake_fc.requests
             for key in ("kernel_image_path", "initrd_path", "path_on_host", "uds_path", "log_path", "metrics_path")
             if key in body}
    assert paths == {"kernel_image_path": "/vmlinux", "initrd_path": "/initrd.img", "path_on_host": "/rootfs.ext4",
                     "uds_path": "/vsock.sock", "log_path": "/firecracker.log", "metrics_path": "/firecracker.metrics"}
    for method, path, body in fake_fc.requests:
        assert spec_errors(spec, method, path, body) == [], f"{method} {path} {body}"
