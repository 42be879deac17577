"""The root helper's argument chokepoint: every rule with accepted and refused values and exact messages."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from banger.errors import BadRequest
from banger.roothelper import validate, validate_jail
from banger.vmm.firecracker.config import Drive, FirecrackerVmConfig, Vsock
from banger.vmm.firecracker.jailer import JailPlan
from banger.vmm.firecracker.launcher import JailRequest


def refused(fn: Any, *args: Any) -> str:
    with pytest.raises(BadRequest) as exc:
        fn(*args)
    assert exc.value.code == "bad_request"
    assert "\n" not in exc.value.message
    return exc.value.message


# --- bridge names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["br-fc", "br-fc-1", "br-fc-dev-2", "br-fc-abcdefghi"])
def test_bridge_name_accepted(name: str) -> None:
    assert validate.bridge_name(name) == name


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("eth0", 'bridge name "eth0" is not allowed (must be "br-fc" or start with "br-fc-")'),
        ("docker0", 'bridge name "docker0" is not allowed (must be "br-fc" or start with "br-fc-")'),
        ("br-fcx", 'bridge name "br-fcx" is not allowed (must be "br-fc" or start with "br-fc-")'),
        ("", 'bridge name "" is not allowed (must be "br-fc" or start with "br-fc-")'),
        ("BR-FC", 'bridge name "BR-FC" is not allowed (must be "br-fc" or start with "br-fc-")'),
        ("br-fc-", 'bridge name "br-fc-" is not allowed (needs a suffix after "br-fc-")'),
        ("br-fc-abcdefghij", 'bridge name "br-fc-abcdefghij" is 16 characters; max is 15'),
        ("br-fc-Dev", 'bridge name "br-fc-Dev" has invalid character "D" (allowed: a-z, 0-9, \'-\')'),
        ("br-fc-a b", 'bridge name "br-fc-a b" has invalid character " " (allowed: a-z, 0-9, \'-\')'),
        ("br-fc-a/b", 'bridge name "br-fc-a/b" has invalid character "/" (allowed: a-z, 0-9, \'-\')'),
        ("br-fc-\n", 'bridge name "br-fc-\\n" has invalid character "\\n" (allowed: a-z, 0-9, \'-\')'),
        (3, "bridge name must be a string, got 3"),
        (None, "bridge name must be a string, got null"),
        (["br-fc"], "bridge name must be a string, got list"),
    ],
)
def test_bridge_name_refused(value: object, message: str) -> None:
    assert refused(validate.bridge_name, value) == message


# --- tap names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tap-0", "tap-pool-12", "tap-abcdefghijk", "tap--"])
def test_tap_name_accepted(name: str) -> None:
    assert validate.tap_name(name) == name


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("eth0", 'tap name "eth0" is not allowed (must start with "tap-")'),
        ("tap0", 'tap name "tap0" is not allowed (must start with "tap-")'),
        ("tap", 'tap name "tap" is not allowed (must start with "tap-")'),
        ("tap-", 'tap name "tap-" is not allowed (needs a suffix after "tap-")'),
        ("tap-abcdefghijkl", 'tap name "tap-abcdefghijkl" is 16 characters; max is 15'),
        ("tap-A", 'tap name "tap-A" has invalid character "A" (allowed: a-z, 0-9, \'-\')'),
        ("tap-a.b", 'tap name "tap-a.b" has invalid character "." (allowed: a-z, 0-9, \'-\')'),
        (True, "tap name must be a string, got true"),
    ],
)
def test_tap_name_refused(value: object, message: str) -> None:
    assert refused(validate.tap_name, value) == message


# --- addresses ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ip", ["172.16.0.1", "10.0.0.1", "192.168.100.254", "169.254.1.1"])
def test_ipv4_accepted(ip: str) -> None:
    assert validate.ipv4_address(ip) == ip


NOT_UNICAST = "is not allowed (must be a unicast address: not loopback, multicast, reserved or 0.0.0.0)"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("127.0.0.1", f'bridge ip "127.0.0.1" {NOT_UNICAST}'),
        ("127.1.2.3", f'bridge ip "127.1.2.3" {NOT_UNICAST}'),
        ("224.0.0.1", f'bridge ip "224.0.0.1" {NOT_UNICAST}'),
        ("0.0.0.0", f'bridge ip "0.0.0.0" {NOT_UNICAST}'),
        ("255.255.255.255", f'bridge ip "255.255.255.255" {NOT_UNICAST}'),
        ("240.0.0.1", f'bridge ip "240.0.0.1" {NOT_UNICAST}'),
        ("abc", 'bridge ip "abc" is not a valid IPv4 address'),
        ("172.16.0.256", 'bridge ip "172.16.0.256" is not a valid IPv4 address'),
        ("172.016.0.1", 'bridge ip "172.016.0.1" is not a valid IPv4 address'),
        ("172.16.0.1/24", 'bridge ip "172.16.0.1/24" is not a valid IPv4 address'),
        ("fd00::1", 'bridge ip "fd00::1" is not a valid IPv4 address'),
        ("", 'bridge ip "" is not a valid IPv4 address'),
        (17216001, "bridge ip must be a string, got 17216001"),
    ],
)
def test_ipv4_refused(value: object, message: str) -> None:
    assert refused(validate.ipv4_address, value) == message


@pytest.mark.parametrize(
    ("value", "expected"), [(8, 8), (24, 24), (30, 30), ("8", 8), ("24", 24), ("30", 30)]
)
def test_prefix_accepted(value: object, expected: int) -> None:
    assert validate.prefix_len(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (7, "prefix 7 is out of range (must be 8..30)"),
        (31, "prefix 31 is out of range (must be 8..30)"),
        (32, "prefix 32 is out of range (must be 8..30)"),
        (-24, "prefix -24 is out of range (must be 8..30)"),
        ("31", 'prefix "31" is out of range (must be 8..30)'),
        ("0", 'prefix "0" is out of range (must be 8..30)'),
        ("abc", 'prefix "abc" is not a number (must be 8..30)'),
        ("/24", 'prefix "/24" is not a number (must be 8..30)'),
        (" 24", 'prefix " 24" is not a number (must be 8..30)'),
        ("-24", 'prefix "-24" is not a number (must be 8..30)'),
        ("", 'prefix "" is not a number (must be 8..30)'),
        (24.0, "prefix 24.0 is not a number (must be 8..30)"),
        (True, "prefix true is not a number (must be 8..30)"),
    ],
)
def test_prefix_refused(value: object, message: str) -> None:
    assert refused(validate.prefix_len, value) == message


def test_bridge_cidr() -> None:
    validate.bridge_cidr("172.16.0.1", 24)
    validate.bridge_cidr("10.0.255.255", 8)
    assert refused(validate.bridge_cidr, "172.16.0.0", 24) == (
        'bridge ip "172.16.0.0" is the network address of 172.16.0.0/24; use a host address'
    )
    assert refused(validate.bridge_cidr, "172.16.0.255", 24) == (
        'bridge ip "172.16.0.255" is the broadcast address of 172.16.0.0/24; use a host address'
    )


# --- processes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [2, 4242, validate.PID_MAX])
def test_pid_accepted(value: int) -> None:
    assert validate.pid(value) == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1, "pid 1 is not allowed (must be 2..4194304)"),
        (0, "pid 0 is not allowed (must be 2..4194304)"),
        (-1, "pid -1 is not allowed (must be 2..4194304)"),
        (validate.PID_MAX + 1, "pid 4194305 is not allowed (must be 2..4194304)"),
        ("1234", 'pid must be an integer, got "1234"'),
        (12.5, "pid must be an integer, got 12.5"),
        (True, "pid must be an integer, got true"),
        (None, "pid must be an integer, got null"),
    ],
)
def test_pid_refused(value: object, message: str) -> None:
    assert refused(validate.pid, value) == message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("TERM", signal.SIGTERM),
        ("term", signal.SIGTERM),
        ("SIGTERM", signal.SIGTERM),
        ("sigterm", signal.SIGTERM),
        ("SigKill", signal.SIGKILL),
        ("INT", signal.SIGINT),
        ("hup", signal.SIGHUP),
        ("SIGQUIT", signal.SIGQUIT),
        ("usr1", signal.SIGUSR1),
        ("SIGUSR2", signal.SIGUSR2),
        ("abrt", signal.SIGABRT),
    ],
)
def test_signal_accepted(value: str, expected: signal.Signals) -> None:
    assert validate.signal_name(value) == expected


ALLOWED_SIGNALS = "(allowed: TERM, KILL, INT, HUP, QUIT, USR1, USR2, ABRT)"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("STOP", f'signal "STOP" is not allowed {ALLOWED_SIGNALS}'),
        ("SIGSTOP", f'signal "SIGSTOP" is not allowed {ALLOWED_SIGNALS}'),
        ("cont", f'signal "cont" is not allowed {ALLOWED_SIGNALS}'),
        ("SIGRTMIN", f'signal "SIGRTMIN" is not allowed {ALLOWED_SIGNALS}'),
        ("RTMIN+3", f'signal "RTMIN+3" is not allowed {ALLOWED_SIGNALS}'),
        ("9", f'signal "9" is not allowed {ALLOWED_SIGNALS}'),
        (9, f"signal 9 is not allowed {ALLOWED_SIGNALS}"),
        (15, f"signal 15 is not allowed {ALLOWED_SIGNALS}"),
        ("SIG", f'signal "SIG" is not allowed {ALLOWED_SIGNALS}'),
        ("SIGSIGTERM", f'signal "SIGSIGTERM" is not allowed {ALLOWED_SIGNALS}'),
        (" TERM", f'signal " TERM" is not allowed {ALLOWED_SIGNALS}'),
        ("", f'signal "" is not allowed {ALLOWED_SIGNALS}'),
    ],
)
def test_signal_refused(value: object, message: str) -> None:
    assert refused(validate.signal_name, value) == message


def test_uid_for_tap() -> None:
    assert validate.uid_for_tap(None, 1000) == 1000
    assert validate.uid_for_tap(1000, 1000) == 1000
    assert (
        refused(validate.uid_for_tap, 0, 1000)
        == "owner_uid 0 is not allowed (taps belong to the owner uid 1000)"
    )
    assert refused(validate.uid_for_tap, "1000", 1000) == 'owner_uid must be an integer, got "1000"'


ROOTS = (Path("/var/lib/banger"), Path("/run/banger"))


def cmdline(*args: str) -> bytes:
    return b"".join(a.encode() + b"\0" for a in args)


@pytest.mark.parametrize(
    ("args", "program"),
    [
        (("/usr/bin/firecracker", "--api-sock", "/run/banger/fc-1.sock"), "firecracker"),
        (("firecracker", "--api-sock=/run/banger/fc-1.sock"), "firecracker"),
        (("/usr/bin/jailer", "--id", "x", "--chroot-base-dir", "/var/lib/banger/jail"), "jailer"),
        (
            ("qemu-system-x86_64", "-drive", "file=/var/lib/banger/vms/a/root.ext4,format=raw"),
            "qemu-system-x86_64",
        ),
        (
            ("/usr/bin/vhost-device-vsock", "--vm", "guest-cid=3,socket=/run/banger/vsock-1.sock"),
            "vhost-device-vsock",
        ),
        (("qemu-system-x86_64", "-qmp", "unix:/run/banger/qmp.sock,server"), "qemu-system-x86_64"),
    ],
)
def test_vmm_process_accepted(args: tuple[str, ...], program: str) -> None:
    assert validate.vmm_process(4242, cmdline(*args), ROOTS) == program


NOT_VMM = "(program must be one of: firecracker, jailer, qemu-system-x86_64, vhost-device-vsock)"
NO_PATH = "(no argument under banger's directories)"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            cmdline("/usr/sbin/sshd", "-D", "/run/banger/x"),
            f'pid 4242 ("sshd") is not a banger-launched process {NOT_VMM}',
        ),
        (cmdline("sleep", "100"), f'pid 4242 ("sleep") is not a banger-launched process {NOT_VMM}'),
        (
            cmdline("/usr/bin/python3", "/run/banger/qemu-system-x86_64"),
            f'pid 4242 ("python3") is not a banger-launched process {NOT_VMM}',
        ),
        (
            cmdline("firecracker-evil", "/run/banger/x"),
            f'pid 4242 ("firecracker-evil") is not a banger-launched process {NOT_VMM}',
        ),
        (
            cmdline("qemu-system-x86_64", "-drive", "file=/srv/vm.img"),
            f'pid 4242 ("qemu-system-x86_64") is not a banger-launched process {NO_PATH}',
        ),
        (
            cmdline("firecracker", "--api-sock", "/run/banger/../../etc/x"),
            f'pid 4242 ("firecracker") is not a banger-launched process {NO_PATH}',
        ),
        (
            cmdline("firecracker", "--api-sock", "/run/bangerx/fc.sock"),
            f'pid 4242 ("firecracker") is not a banger-launched process {NO_PATH}',
        ),
        (
            cmdline("firecracker", "--api-sock", "/run/banger"),
            f'pid 4242 ("firecracker") is not a banger-launched process {NO_PATH}',
        ),
        (
            cmdline("firecracker", "--api-sock", "run/banger/fc.sock"),
            f'pid 4242 ("firecracker") is not a banger-launched process {NO_PATH}',
        ),
        (b"", "pid 4242 is not a banger-launched process (no command line: exited or a kernel thread)"),
    ],
)
def test_vmm_process_refused(raw: bytes, message: str) -> None:
    assert refused(validate.vmm_process, 4242, raw, ROOTS) == message


# --- paths --------------------------------------------------------------------------------------------


def test_managed_path_accepts_paths_below_a_root(tmp_path: Path) -> None:
    state, run = tmp_path / "state", tmp_path / "run"
    state.mkdir()
    run.mkdir()
    (state / "vms").mkdir()
    assert (
        validate.managed_path(str(state / "vms" / "a" / "disk"), (state, run)) == state / "vms" / "a" / "disk"
    )
    assert validate.managed_path(run / "fc.sock", (state, run)) == run / "fc.sock"
    # A symlink inside the tree that stays inside is fine; the resolved path is returned.
    (state / "link").symlink_to(run)
    assert validate.managed_path(str(state / "link" / "x"), (state, run)) == run / "x"
    # Roots given through a symlink resolve the same way.
    (tmp_path / "alias").symlink_to(state)
    assert validate.managed_path(str(state / "vms"), (tmp_path / "alias",)) == state / "vms"


def test_managed_path_refusals(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    roots = (state,)
    assert (
        refused(validate.managed_path, "/etc/passwd", roots)
        == 'path "/etc/passwd" is outside banger\'s directories'
    )
    assert (
        refused(validate.managed_path, f"{state}/../x", roots)
        == f'path "{state}/../x" must not contain ".." components'
    )
    assert refused(validate.managed_path, "/etc/../etc/passwd", roots) == (
        'path "/etc/../etc/passwd" must not contain ".." components'
    )
    assert refused(validate.managed_path, "state/x", roots) == 'path "state/x" must be absolute'
    assert refused(validate.managed_path, "", roots) == 'path "" must be absolute'
    assert (
        refused(validate.managed_path, f"{state}/a\0b", roots)
        == f'path "{state}/a\\u0000b" contains a NUL byte'
    )
    assert refused(validate.managed_path, 42, roots) == "path must be a string, got 42"
    assert refused(validate.managed_path, str(state), roots) == (
        f'path "{state}" is a banger root directory; only paths below it are allowed'
    )
    assert (
        refused(validate.managed_path, f"{state}x/y", roots)
        == f'path "{state}x/y" is outside banger\'s directories'
    )
    # A symlink planted inside a managed directory cannot lead outside it.
    (state / "escape").symlink_to("/etc")
    assert refused(validate.managed_path, f"{state}/escape/passwd", roots) == (
        f'path "{state}/escape/passwd" resolves to "/etc/passwd", outside banger\'s directories'
    )
    assert (
        refused(validate.managed_path, "/etc/passwd", ())
        == 'path "/etc/passwd" is outside banger\'s directories'
    )


# --- whole requests -----------------------------------------------------------------------------------


def test_ensure_bridge_request() -> None:
    req = validate.ensure_bridge_request({"name": "br-fc", "ip": "172.16.0.1", "prefix": "24"})
    assert req == validate.BridgeRequest("br-fc", "172.16.0.1", 24)
    assert refused(validate.ensure_bridge_request, {"name": "br-fc", "ip": "172.16.0.1"}) == (
        'priv.ensure_bridge needs param "prefix"'
    )
    assert refused(validate.ensure_bridge_request, {"name": "br-fc", "ip": "172.16.0.1", "prefix": None}) == (
        'priv.ensure_bridge needs param "prefix"'
    )
    assert (
        refused(
            validate.ensure_bridge_request, {"name": "br-fc", "ip": "172.16.0.1", "prefix": 24, "dev": "eth0"}
        )
        == 'priv.ensure_bridge does not take param "dev" (allowed: ip, name, prefix)'
    )
    assert refused(validate.ensure_bridge_request, {"name": "br-fc", "ip": "172.16.0.0", "prefix": 24}) == (
        'bridge ip "172.16.0.0" is the network address of 172.16.0.0/24; use a host address'
    )


def test_other_requests() -> None:
    assert validate.create_tap_request({"name": "tap-1", "bridge": "br-fc"}, 1000) == validate.TapRequest(
        "tap-1", "br-fc", 1000
    )
    assert refused(validate.create_tap_request, {"name": "tap-1", "bridge": "eth0"}, 1000) == (
        'bridge name "eth0" is not allowed (must be "br-fc" or start with "br-fc-")'
    )
    assert (
        refused(validate.create_tap_request, {"name": "tap-1"}, 1000)
        == 'priv.create_tap needs param "bridge"'
    )
    assert validate.delete_tap_request({"name": "tap-1"}) == "tap-1"
    assert validate.delete_bridge_request({"name": "br-fc-2"}) == "br-fc-2"
    assert refused(validate.delete_bridge_request, {"name": "lo"}) == (
        'bridge name "lo" is not allowed (must be "br-fc" or start with "br-fc-")'
    )
    assert validate.signal_process_request({"pid": 4242, "signal": "sigterm"}) == validate.SignalRequest(
        4242, signal.SIGTERM
    )
    assert validate.kill_process_request({"pid": 4242}) == validate.SignalRequest(4242, signal.SIGKILL)
    assert refused(validate.kill_process_request, {"pid": 4242, "signal": "TERM"}) == (
        'priv.kill_process does not take param "signal" (allowed: pid)'
    )
    validate.ping_request({})
    assert (
        refused(validate.ping_request, {"a": 1, "b": 2})
        == 'priv.ping does not take params "a", "b" (allowed: none)'
    )


def test_quote_escapes_control_characters() -> None:
    assert validate.quote('a"b\x1b') == '"a\\"b\\u001b"'


def test_list_taps_request() -> None:
    from banger.errors import BadRequest
    from banger.roothelper import validate as v

    assert v.list_taps_request({"bridge": "br-fc-x"}) == "br-fc-x"
    with pytest.raises(BadRequest, match='bridge name "eth0" is not allowed'):
        v.list_taps_request({"bridge": "eth0"})
    with pytest.raises(BadRequest, match=r'priv.list_taps does not take param "all" \(allowed: bridge\)'):
        v.list_taps_request({"bridge": "br-fc", "all": True})


# --- jail requests ------------------------------------------------------------------------------------


def jail_request(tmp_path: Path) -> tuple[JailRequest, validate_jail.JailPolicy]:
    state, run = tmp_path / "state", tmp_path / "run"
    for d in (state, run / "vms" / "0a1b2c3d"):
        d.mkdir(parents=True)
    run_dir = str(run / "vms" / "0a1b2c3d")
    policy = validate_jail.JailPolicy("/srv/jailer", 1000, 1001, (state, run))
    plan = JailPlan(chroot_base="/srv/jailer", id="0a1b2c3d", exec_file="/usr/bin/firecracker", uid=1000, gid=1001)
    cfg = FirecrackerVmConfig(
        kernel_path=f"{state}/kernels/k/vmlinux", initrd_path=None, boot_args="", vcpu=1, memory_mib=1,
        drives=(Drive("rootfs", f"{state}/images/i/rootfs.ext4", is_root_device=True, is_read_only=True),
                Drive("work", f"{state}/vms/v/work.ext4", is_root_device=False, is_read_only=False)),
        vsock=Vsock(3, f"{run_dir}/vsock.sock"), log_path=f"{run_dir}/firecracker.log", metrics_path=None,
    )
    return JailRequest("0a1b2c3d4e5f6071", run_dir, plan, cfg), policy


def test_jail_stage_request_round_trip(tmp_path: Path) -> None:
    """What the daemon's JailRequest sends is what the helper parses back, with every path resolved."""
    request, policy = jail_request(tmp_path)
    stage = validate_jail.jail_stage_request(request.params(), policy)
    assert stage.request == request
    assert stage.run_dir == Path(request.run_dir)
    assert set(stage.sources) == {request.cfg.kernel_path, *(d.path_on_host for d in request.cfg.drives)}


def test_jail_stage_request_refusals(tmp_path: Path) -> None:
    request, policy = jail_request(tmp_path)
    good = request.params()
    cases: list[tuple[dict[str, object], str]] = [
        ({"uid": 0}, "jail uid 0 is not allowed (Firecracker runs as the owner uid 1000)"),
        ({"gid": 1000}, "jail gid 1000 is not allowed (Firecracker runs as the owner's group 1001)"),
        ({"uid": True}, "uid must be an integer, got true"),
        ({"chroot_base": "/tmp"}, 'chroot_base "/tmp" is not the helper\'s jailer_chroot_base "/srv/jailer"'),
        ({"exec_file": "firecracker"},
         "firecracker binary 'firecracker' is not an absolute, normalised path (no '.', '..', '//')"),
        ({"exec_file": 7}, "exec_file must be a string, got 7"),
        ({"kernel": "/etc/passwd"}, 'path "/etc/passwd" is outside banger\'s directories'),
        ({"run_dir": "/run"}, 'path "/run" is outside banger\'s directories'),
        ({"vsock": "/elsewhere/v.sock"}, "jailed Firecracker's vsock socket '/elsewhere/v.sock' must be a file of "
                                         f"the run directory {request.run_dir} other than fc.sock"),
        ({"log": f"{request.run_dir}/fc.sock"}, "jailed Firecracker's log"),
        ({"drives": [{"id": "a/b", "path": request.cfg.kernel_path, "read_only": True}]}, "drive_id 'a/b' is invalid"),
        ({"drives": [{"id": "a", "path": request.cfg.kernel_path, "read_only": True, "cache": "x"}]},
         'a drive of priv.jail_stage does not take param "cache" (allowed: id, path, read_only, root)'),
        ({"drives": [None]}, "each drive must be an object, got null"),
        ({"vm_id": "0A1B2C3D"}, 'vm_id "0A1B2C3D" is not allowed (must be 8 to 32 lowercase hex digits)'),
        ({"initrd": 3}, "initrd must be a string, got 3"),
    ]
    for change, message in cases:
        with pytest.raises(BadRequest) as info:
            validate_jail.jail_stage_request({**good, **change}, policy)
        assert info.value.message.startswith(message), (change, info.value.message)
    # Embedded mode (the owner is root): the caller is root, who may pick any unprivileged user, never root.
    root_policy = validate_jail.JailPolicy("/srv/jailer", 0, 0, policy.roots)
    assert validate_jail.jail_stage_request({**good, "uid": 4242, "gid": 4242}, root_policy).request.plan.uid == 4242
    with pytest.raises(BadRequest, match="Firecracker must not run as root"):
        validate_jail.jail_stage_request({**good, "uid": 0, "gid": 0}, root_policy)
    no_group = validate_jail.JailPolicy("/srv/jailer", 1000, None, policy.roots)
    with pytest.raises(BadRequest, match="owner uid 1000 has no passwd entry"):
        validate_jail.jail_stage_request(good, no_group)


def test_jail_launch_and_cleanup_requests(tmp_path: Path) -> None:
    roots = (tmp_path,)
    assert validate_jail.jail_launch_request({"vm_id": "0a1b2c3d", "console_log": f"{tmp_path}/c.log"}, roots) == (
        "0a1b2c3d", tmp_path / "c.log")
    assert refused(validate_jail.jail_launch_request, {"vm_id": "0a1b2c3d", "console_log": "/var/log/x"}, roots) == (
        'path "/var/log/x" is outside banger\'s directories')
    assert refused(validate_jail.jail_launch_request, {"vm_id": "0a1b2c3d", "console_log": "x", "argv": []},
                   roots) == 'priv.jail_launch does not take param "argv" (allowed: console_log, vm_id)'
    assert validate_jail.jail_cleanup_request({"vm_id": "0a1b2c3d"}) == "0a1b2c3d"
    assert refused(validate_jail.jail_cleanup_request, {"vm_id": "../x"}) == (
        'vm_id "../x" is not allowed (must be 8 to 32 lowercase hex digits)')
