"""The real CLI against real embedded services (root, no system install), in throw-away directories."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.embedded import BANGER, SEED_VMS, Embedded, _alive

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="embedded mode needs root")

OP = r"\(op-[0-9a-f]{6}\)"


@pytest.fixture
def emb() -> Iterator[Embedded]:
    e = Embedded()
    try:
        yield e
    finally:
        e.close()


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_autostart_list_status_stop(emb: Embedded) -> None:
    first = emb.run("vm", "list", "--json", check=True)
    assert json.loads(first.stdout) == []
    pids = emb.pids()
    assert set(pids) == {"bangerd", "bangerd-root"}
    # Second call reuses the running services.
    emb.run("vm", "list", check=True)
    assert emb.pids() == pids
    status = json.loads(emb.run("system", "status", "--json", check=True).stdout)
    assert status["daemon"]["pid"] == pids["bangerd"]
    assert status["helper"]["pid"] == pids["bangerd-root"]
    assert status["daemon"]["mode"] == "user"
    stopped = emb.run("system", "stop", check=True)
    assert "bangerd" in stopped.stdout
    for pid in pids.values():
        for _ in range(100):
            if not _alive(pid):
                break
            import time

            time.sleep(0.05)
        assert not _alive(pid)
    assert not (emb.runtime_dir / "bangerd.sock").exists()


def test_list_and_show_with_records(emb: Embedded) -> None:
    emb.python(SEED_VMS.format(names=["brave-otter", "calm-heron"]))
    table = emb.run("vm", "list", check=True).stdout.splitlines()
    assert table[0].split() == [
        "ID",
        "NAME",
        "STATE",
        "IMAGE",
        "IP",
        "VCPU",
        "MEM",
        "DISK",
        "WORKSPACE",
        "CREATED",
    ]
    assert any(
        "brave-otter" in line and "stopped" in line and "1024 MiB" in line and "8G" in line
        for line in table[1:]
    )
    listed = json.loads(emb.run("ps", "--json", check=True).stdout)
    assert sorted(v["name"] for v in listed) == ["brave-otter", "calm-heron"]
    short = listed[0]["short_id"]
    shown = json.loads(emb.run("vm", "show", short, "--json", check=True).stdout)
    assert shown["id"] == listed[0]["id"]
    text = emb.run("vm", "show", "calm-heron", check=True).stdout
    assert re.search(r"^dns\s+calm-heron\.vm$", text, re.M)
    ids = emb.run("vm", "list", "--ids", check=True).stdout.split()
    assert sorted(ids) == sorted(v["short_id"] for v in listed)


def test_not_found_is_one_line_with_op_id_and_logged(emb: Embedded) -> None:
    line = one_line_error(emb.run("vm", "show", "nosuch"))
    assert re.fullmatch(
        rf"banger: not found: no vm named or with id 'nosuch'; see `banger vm list` {OP}", line
    )
    op_id = re.search(r"op-[0-9a-f]{6}", line)
    assert op_id
    log_lines = [json.loads(raw) for raw in (emb.state_dir / "bangerd.log").read_text().splitlines()]
    assert any(
        entry.get("op_id") == op_id.group(0) and entry.get("method") == "vm.show" for entry in log_lines
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["vm", "list", "--bogus"], "banger: unrecognized arguments: --bogus (see `banger --help`)"),
        (
            ["vm", "frobnicate"],
            "banger: argument <command>: invalid choice: 'frobnicate' (choose from 'list', "
            "'ls', 'show', 'run', 'create', 'start', 'stop', 'restart', 'kill', 'delete', "
            "'rm', 'set', 'prune', 'stats', 'logs', 'ssh', 'exec', 'cp', 'ports', 'workspace') "
            "(see `banger vm --help`)",
        ),
        (["vm", "run", "--vcpu", "two"], "banger: argument --vcpu: invalid int value: 'two' "
                                         "(see `banger vm run --help`)"),
        (["vm", "list", "--", "echo"], "banger: `-- <command>` only goes with `banger vm run`, "
                                       "`banger vm exec` and `banger vm ssh`"),
        (["vm", "run", "-d", "--rm"], "banger: -d/--detach and --rm cannot be combined (a detached VM is meant "
                                      "to stay)"),
        (["vm", "run", "-d", "--", "ls"], "banger: -d/--detach cannot run a command; drop `-- <cmd>` or drop -d"),
        (["vm", "run", "--memory", "0"], "banger: --memory must be a positive number, got 0"),
        (["vm", "run", "--disk-size", "4GiB"], "banger: --disk-size '4GiB' is not a size (e.g. 8G, 512M): "),
        (["vm", "run", "--name", "Bad_Name"], "banger: vm name 'Bad_Name' has invalid character 'B' at position 0 "
                                              "(allowed: lowercase a-z, 0-9, '-')"),
        (["vm", "set", "x"], "banger: nothing to set; give --vcpu, --memory, --disk-size, --nat or --no-nat"),
        (["vm", "show"], "banger: the following arguments are required: vm (see `banger vm show --help`)"),
        (
            ["completion", "tcsh"],
            "banger: argument shell: invalid choice: 'tcsh' (choose from 'bash', 'zsh', "
            "'fish') (see `banger completion --help`)",
        ),
        (
            ["ssh-config", "--install", "--uninstall"],
            "banger: argument --uninstall: not allowed with argument "
            "--install (see `banger ssh-config --help`)",
        ),
    ],
)
def test_bad_flags_one_line(emb: Embedded, args: list[str], message: str) -> None:
    line = one_line_error(emb.run(*args))
    assert line == message or (message.endswith(": ") and line.startswith(message))
    # Parsing errors never start the services or write state.
    assert not emb.state_dir.exists()


def test_bad_config_stops_daemon_with_one_line(emb: Embedded) -> None:
    emb.config_file.parent.mkdir(parents=True)
    emb.config_file.write_text('bridge_name = "eth0"\n')
    line = one_line_error(emb.run("vm", "list"))
    # The helper starts first and reads config.toml too (jailer settings): it is the one that says so.
    assert line == (f"banger: bangerd-root failed to start: {emb.config_file}: bridge_name \"eth0\" is not allowed "
                    '(must be "br-fc" or start with "br-fc-")')
    assert not (emb.runtime_dir / "bangerd.sock").exists()


def test_group_help_shows_common_command(emb: Embedded) -> None:
    top = emb.run(check=True)
    assert "banger vm run" in top.stdout and "examples:" in top.stdout
    for group in ("vm", "image", "kernel", "system"):
        out = emb.run(group, "--help", check=True).stdout
        assert "examples:" in out and f"banger {group}" in out


def test_version_forms(emb: Embedded) -> None:
    assert re.fullmatch(r"banger v\S+ \(commit \S+, built \S+\)\n", emb.run("--version", check=True).stdout)
    data = json.loads(emb.run("version", "--json", check=True).stdout)
    assert set(data) == {"version", "commit", "built_at"}


def test_completion_static_and_live(emb: Embedded) -> None:
    assert emb.run("__complete", "2", "banger", "vm", "sh", check=True).stdout.split() == ["show"]
    assert "ssh-config" in emb.run("__complete", "1", "banger", "", check=True).stdout.split()
    assert "__complete" not in emb.run("__complete", "1", "banger", "", check=True).stdout
    assert emb.run("__complete", "3", "banger", "vm", "list", "--j", check=True).stdout.split() == ["--json"]
    assert emb.run("__complete", "2", "banger", "completion", "f", check=True).stdout.split() == ["fish"]
    # No daemon: no live names, no error, and no daemon started.
    assert emb.run("__complete", "3", "banger", "vm", "show", "", check=True).stdout == ""
    assert emb.pids() == {}
    emb.python(SEED_VMS.format(names=["brave-otter", "calm-heron"]))
    emb.run("vm", "list", check=True)
    assert emb.run("__complete", "3", "banger", "vm", "show", "b", check=True).stdout.split() == [
        "brave-otter"
    ]


def test_completion_scripts_work_in_bash(emb: Embedded) -> None:
    script = emb.run("completion", "bash", check=True).stdout
    assert "complete -o default -F _banger banger" in script
    assert "#compdef banger" in emb.run("completion", "zsh", check=True).stdout
    assert "complete -c banger" in emb.run("completion", "fish", check=True).stdout
    shim = emb.root / "bin"
    shim.mkdir()
    (shim / "banger").write_text(f'#!/bin/sh\nexec {" ".join(BANGER)} "$@"\n')
    (shim / "banger").chmod(0o755)
    env = dict(emb.env, PATH=f"{shim}:{os.environ['PATH']}")
    probe = f'{script}\nCOMP_WORDS=(banger ker); COMP_CWORD=1; _banger; echo "${{COMPREPLY[@]}}"'
    out = subprocess.run(
        ["bash", "-c", probe],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout
    assert out.split() == ["kernel"]


def test_ssh_config_install_uninstall(emb: Embedded) -> None:
    home = Path(emb.env["HOME"])
    ssh_config = home / ".ssh/config"
    ssh_config.parent.mkdir(mode=0o700)
    ssh_config.write_text("Host example\n  User me\n")
    emb.run("ssh-config", "--install", check=True)
    text = ssh_config.read_text()
    assert text.startswith("# >>> banger >>>")
    assert f"Include {home}/.config/banger/ssh_config" in text and text.endswith("Host example\n  User me\n")
    emb.run("ssh-config", "--install", check=True)
    assert ssh_config.read_text() == text  # idempotent
    assert "Host *.vm" in (home / ".config/banger/ssh_config").read_text()
    assert "(installed in ~/.ssh/config)" in emb.run("ssh-config", check=True).stdout
    emb.run("ssh-config", "--uninstall", check=True)
    assert ssh_config.read_text() == "Host example\n  User me\n"
    assert "nothing to remove" in emb.run("ssh-config", "--uninstall", check=True).stdout


def test_non_root_without_system_install_is_told_what_to_run(emb: Embedded, tmp_path: Path) -> None:
    home = tmp_path / "nobody"
    home.mkdir()
    os.chown(home, 65534, 65534)
    env = dict(
        emb.env, HOME=str(home), XDG_RUNTIME_DIR="", XDG_STATE_HOME="", XDG_CONFIG_HOME="", XDG_CACHE_HOME=""
    )
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *BANGER, "vm", "list"],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert one_line_error(proc) == (
        "banger: banger has no system install and the embedded daemon needs root; run `sudo banger system "
        "install --owner $USER` once (then banger works as you), or run banger as root"
    )


def test_doctor_is_read_only_and_reports(emb: Embedded) -> None:
    proc = emb.run("doctor", "--json")
    rows = json.loads(proc.stdout)
    names = [r["name"] for r in rows]
    assert {"architecture", "state store", "hardware virtualization", "qemu", "vm defaults"} <= set(names)
    assert proc.returncode == (1 if any(r["status"] == "FAIL" for r in rows) else 0)
    assert not emb.state_dir.exists() and not (emb.root / "cfg/banger").exists()
    assert emb.pids() == {}  # doctor never starts the services
    text = emb.run("doctor").stdout
    assert "\033[" not in text  # NO_COLOR is set and stdout is not a TTY


def test_doctor_reports_bad_config_as_fail(emb: Embedded) -> None:
    emb.config_file.parent.mkdir(parents=True)
    emb.config_file.write_text("vmm = 'xen'\n")
    proc = emb.run("doctor", "--json")
    rows = json.loads(proc.stdout)
    assert proc.returncode == 1
    assert rows[0]["name"] == "config" and rows[0]["status"] == "FAIL"
    assert str(emb.config_file) in rows[0]["summary"] and "vmm" in rows[0]["summary"]


def _run_on_tty(emb: Embedded, env: dict[str, str], *args: str) -> str:
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen([*BANGER, *args], env=env, stdout=follower, stderr=follower, cwd=emb.root)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(60)
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def test_colour_only_on_tty_and_never_with_no_color(emb: Embedded) -> None:
    env = {k: v for k, v in emb.env.items() if k != "NO_COLOR"}
    env["TERM"] = "xterm"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src")
    assert "\033[32mPASS" in _run_on_tty(emb, env, "doctor")
    assert "\033[" not in _run_on_tty(emb, {**env, "NO_COLOR": "1"}, "doctor")


@pytest.mark.parametrize(
    ("method", "params", "code", "message"),
    [
        ("vm.show", {}, "bad_request", "param 'ref' is required"),
        ("vm.show", {"ref": 7}, "bad_request", "param 'ref' must be a string, got int"),
        ("vm.show", {"ref": "x", "force": True}, "bad_request", "unknown param(s): force"),
        ("vm.list", {"all": 1}, "bad_request", "unknown param(s): all"),
        ("image.show", {"ref": ""}, "bad_request", "param 'ref' must not be empty"),
        ("kernel.show", {"ref": "nope"}, "not_found", "no kernel named or with id 'nope'"),
        ("daemon.operations.status", {"id": "op-000000"}, "not_found", "no operation 'op-000000'"),
        ("daemon.operations.status", {"id": "op-000000", "wait": 61}, "bad_request",
         "param 'wait' must be <= 60, got 61"),
        ("vm.destroy_everything", {}, "unknown_method", "unknown method 'vm.destroy_everything'"),
    ],
)
def test_daemon_rejects_bad_rpc_params(emb: Embedded, method: str, params: dict[str, object], code: str,
                                       message: str) -> None:
    emb.python(SEED_VMS.format(names=["keep-me"]))
    emb.run("vm", "list", check=True)
    probe = (
        "import json, sys\nfrom banger import paths\nfrom banger.rpc import client, protocol\n"
        f"try:\n    client.call(paths.resolve_user().daemon_socket, {method!r}, json.loads(sys.argv[1]))\n"
        "except protocol.RpcError as e:\n    print(json.dumps([e.code, e.message, e.op_id]))\n"
    )
    import sys

    out = subprocess.run([sys.executable, "-c", probe, json.dumps(params)], env=emb.env, capture_output=True,
                         text=True, check=True).stdout
    got_code, got_message, op_id = json.loads(out)
    assert (got_code, got_message) == (code, message)
    assert re.fullmatch(r"op-[0-9a-f]{6}", op_id)
    # Nothing was written: the one seeded VM is still the only record.
    assert [v["name"] for v in json.loads(emb.run("vm", "list", "--json", check=True).stdout)] == ["keep-me"]
