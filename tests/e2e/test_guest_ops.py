"""`vm exec`, `vm cp`, `vm ports`, workspaces and `vm run ./repo` end to end, on real VMs.

One long-lived VM ("ops") serves every exec/cp/ports/workspace test (tests run in file order and some
build on the previous ones' state); the `vm run ./repo` cases boot their own short-lived VMs. The
namespace gets a default route into a tun device nobody reads, so `--nat` has an uplink: packets to
it go nowhere, and nothing can reach the internet.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.banger_env import REPO, BangerNetns

pytestmark = [pytest.mark.vm, pytest.mark.network,
              pytest.mark.skipif(os.getuid() != 0, reason="VM tests need root (embedded mode, namespaces)")]

VM = "ops"


@pytest.fixture(scope="module")
def env(env: BangerNetns) -> BangerNetns:
    """conftest's env, plus an uplink for the tooling tests and the VM every test here uses."""
    for cmd in (["tuntap", "add", "dev", "uplink0", "mode", "tun"], ["link", "set", "uplink0", "up"],
                ["addr", "add", "198.51.100.1/24", "dev", "uplink0"], ["route", "add", "default", "dev", "uplink0"]):
        subprocess.run(["ip", "-n", env.ns, *cmd], check=True)
    started = time.monotonic()
    env.banger("vm", "create", "--name", VM, check=True)
    print(f"vm create {VM}: {time.monotonic() - started:.1f}s")
    return env


def bx(env: BangerNetns, *args: str, stdin: str | bytes = b"", timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI with a finite stdin (an inherited, never-closed stdin would be read by `vm exec`)."""
    data = stdin.encode() if isinstance(stdin, str) else stdin
    return subprocess.run(env.exec_argv([sys.executable, "-m", "banger", *args]), env=env.env, input=data,
                          capture_output=True, timeout=timeout, cwd=REPO)


def ok(proc: subprocess.CompletedProcess[bytes]) -> str:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout.decode()


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def make_repo(root: Path) -> Path:
    root.mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "host@example.com")
    git(root, "config", "user.name", "Host")
    (root / "tracked.txt").write_text("tracked v1\n")
    (root / ".gitignore").write_text("*.log\n")
    (root / "bin").mkdir()
    (root / "bin" / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    (root / "bin" / "tool.sh").chmod(0o755)
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "first")
    (root / "tracked.txt").write_text("tracked v2 (uncommitted)\n")
    (root / "untracked.txt").write_text("untracked content\n")
    (root / "noise.log").write_text("ignored\n")
    return root


# --- vm exec -----------------------------------------------------------------------------------------


def test_exec_exit_codes(env: BangerNetns) -> None:
    started = time.monotonic()
    assert ok(bx(env, "vm", "exec", VM, "--", "echo", "hi")) == "hi\n"
    print(f"vm exec echo: {time.monotonic() - started:.2f}s")
    assert bx(env, "vm", "exec", VM, "--", "true").returncode == 0
    assert bx(env, "vm", "exec", VM, "--", "sh", "-c", "exit 3").returncode == 3
    assert bx(env, "vm", "exec", VM, "--", "sh", "-c", "kill -TERM $$").returncode == 128 + 15
    missing = bx(env, "vm", "exec", VM, "--", "no-such-command")
    assert missing.returncode == 127 and b"no-such-command: command not found" in missing.stderr
    no_cmd = bx(env, "vm", "exec", VM)
    assert no_cmd.returncode == 1 and b"give the command after `--`" in no_cmd.stderr


def test_exec_streams_output_as_it_comes(env: BangerNetns) -> None:
    proc = subprocess.Popen(env.exec_argv([sys.executable, "-m", "banger", "vm", "exec", VM, "--", "sh", "-c",
                                           "echo first; echo err >&2; sleep 2; echo second"]),
                            env=env.env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    started = time.monotonic()
    first = proc.stdout.readline()
    first_at = time.monotonic() - started
    still_running = proc.poll() is None
    rest = proc.stdout.read()
    proc.wait(60)
    total = time.monotonic() - started
    assert first == b"first\n" and rest == b"second\n"
    assert still_running, "the first line arrived only after the command ended"
    assert total - first_at >= 1.5, (first_at, total)
    assert proc.stderr.read() == b"err\n"
    assert proc.returncode == 0


def test_exec_stdin_env_cwd_timeout(env: BangerNetns) -> None:
    assert ok(bx(env, "vm", "exec", VM, "--", "cat", stdin="piped in\n")) == "piped in\n"
    assert ok(bx(env, "vm", "exec", VM, "-n", "--", "cat", stdin="not sent\n")) == ""
    out = ok(bx(env, "vm", "exec", VM, "--env", "FOO=bar baz", "--env", "EMPTY=", "--", "sh", "-c",
                'echo "$FOO|$EMPTY"; pwd'))
    assert out == "bar baz|\n/root\n"
    assert ok(bx(env, "vm", "exec", VM, "--guest-path", "/tmp", "--", "pwd")) == "/tmp\n"
    # -t goes over ssh (no local terminal here, so ssh allocates none), with the same env and cwd rules.
    assert ok(bx(env, "vm", "exec", "-t", "--env", "A=1", VM, "--", "sh", "-c", 'echo "$A"; pwd')) == "1\n/root\n"
    # Over the 2 MiB inline limit: the CLI spools stdin through a file the daemon reads.
    big = os.urandom(3 << 20)
    out = ok(bx(env, "vm", "exec", VM, "--", "sha256sum", stdin=big))
    assert out.split()[0] == hashlib.sha256(big).hexdigest()
    too_big = bx(env, "vm", "exec", VM, "--", "wc", "-c", stdin=b"\0" * ((64 << 20) + 1))
    assert too_big.returncode == 1 and b"stdin is larger than 64 MiB" in too_big.stderr
    timed = bx(env, "vm", "exec", VM, "--timeout", "1", "--", "sleep", "30")
    assert timed.returncode == 128 + 9 and b"timed out after 1s" in timed.stderr


def test_exec_interrupt_kills_the_guest_command(env: BangerNetns) -> None:
    proc = subprocess.Popen(env.exec_argv([sys.executable, "-m", "banger", "vm", "exec", VM, "--", "sh", "-c",
                                           "echo started; exec sleep 4242"]),
                            env=env.env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"started\n"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130
    for _ in range(50):
        left = bx(env, "vm", "exec", VM, "--", "sh", "-c", "pgrep -x sleep -a | grep 4242 || true")
        if ok(left) == "":
            break
        time.sleep(0.2)
    assert ok(left) == ""


# --- vm cp -------------------------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, tuple[str, int, bytes]]:
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
        found[str(path.relative_to(root))] = (kind, stat.S_IMODE(st.st_mode),
                                              path.read_bytes() if kind == "file" else b"")
    return found


def test_cp_round_trip_keeps_modes(env: BangerNetns, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    (src / "nested" / "deeper").mkdir(parents=True)
    (src / "private").mkdir(mode=0o700)
    (src / "private").chmod(0o700)
    (src / "run.sh").write_text("#!/bin/sh\necho run\n")
    (src / "run.sh").chmod(0o755)
    (src / "secret").write_text("s3cret\n")
    (src / "secret").chmod(0o600)
    (src / "empty").write_bytes(b"")
    (src / "nested" / "deeper" / "blob.bin").write_bytes(os.urandom(300_000))
    (src / "private" / "key").write_text("k\n")
    (src / "link").symlink_to("run.sh")
    pushed = bx(env, "vm", "cp", str(src), f"{VM}:/root/")
    ok(pushed)
    assert pushed.stderr.decode() == f"banger: warning: skipped symlink {src / 'link'}\n"
    listing = ok(bx(env, "vm", "exec", VM, "--", "sh", "-c",
                    "cd /root/tree && find . -printf '%M %p\\n' | sort -k2"))
    assert "-rwxr-xr-x ./run.sh" in listing and "-rw------- ./secret" in listing
    assert "drwx------ ./private" in listing and "./link" not in listing
    assert ok(bx(env, "vm", "exec", VM, "--", "./tree/run.sh")) == "run\n"
    back = tmp_path / "back"
    back.mkdir()
    ok(bx(env, "vm", "cp", f"{VM}:tree", str(back)))
    expected = _tree(src)
    del expected["link"]
    assert _tree(back / "tree") == expected
    # A single file, both ways, to a new name.
    ok(bx(env, "vm", "cp", str(src / "secret"), f"{VM}:/tmp/secret-copy"))
    ok(bx(env, "vm", "cp", f"{VM}:/tmp/secret-copy", str(tmp_path / "secret-again")))
    assert (tmp_path / "secret-again").read_text() == "s3cret\n"
    assert stat.S_IMODE((tmp_path / "secret-again").stat().st_mode) == 0o600


def test_cp_errors(env: BangerNetns, tmp_path: Path) -> None:
    missing = bx(env, "vm", "cp", str(tmp_path / "nope"), f"{VM}:/root/")
    assert missing.returncode == 1
    assert missing.stderr.decode() == f"banger: cannot copy {str(tmp_path / 'nope')!r}: no such file or directory\n"
    gone = bx(env, "vm", "cp", f"{VM}:/root/does-not-exist", str(tmp_path))
    assert gone.returncode == 1
    assert "cannot copy ops:/root/does-not-exist: no such file or directory in the guest" in gone.stderr.decode()
    (tmp_path / "d").mkdir()
    onto_file = bx(env, "vm", "cp", str(tmp_path / "d"), f"{VM}:/etc/hostname")
    assert onto_file.returncode == 1
    assert f"cannot overwrite non-directory ops:/etc/hostname with directory {tmp_path / 'd'}" \
        in onto_file.stderr.decode()
    no_parent = bx(env, "vm", "cp", str(tmp_path / "d"), f"{VM}:/root/x/y/z")
    assert no_parent.returncode == 1 and "guest directory ops:/root/x/y does not exist" in no_parent.stderr.decode()
    (tmp_path / "hostname").write_text("a file where a directory is needed\n")
    clash = bx(env, "vm", "cp", f"{VM}:/etc", str(tmp_path / "hostname"))
    assert clash.returncode == 1 and "cannot overwrite non-directory" in clash.stderr.decode()
    both = bx(env, "vm", "cp", "a", "b")
    assert both.returncode == 1 and "exactly one of the two paths must be in a VM" in both.stderr.decode()


# --- vm ports ----------------------------------------------------------------------------------------


def test_ports_show_a_guest_http_server(env: BangerNetns) -> None:
    ok(bx(env, "vm", "exec", VM, "--", "sh", "-c",
          "setsid nohup python3 -m http.server 8080 --bind 0.0.0.0 --directory /tmp >/dev/null 2>&1 &"))
    row = None
    for _ in range(60):
        vms = json.loads(ok(bx(env, "vm", "ports", VM, "--json")))
        row = next((p for p in vms[0]["ports"] if p["port"] == 8080), None)
        if row is not None and row["url"]:
            break
        time.sleep(0.5)
    assert row is not None
    assert row["proto"] == "tcp" and row["endpoint"] == f"{VM}.vm:8080"
    assert row["url"] == f"http://{VM}.vm:8080/" and "python3" in row["processes"]
    ssh = next(p for p in vms[0]["ports"] if p["port"] == 22)
    assert ssh["url"] is None  # sshd answers, but not HTTP
    table = ok(bx(env, "vm", "ports"))
    assert table.splitlines()[0].split() == ["VM", "PROTO", "PORT", "PROCESS", "ENDPOINT", "URL"]
    assert re.search(rf"^{VM}\s+tcp\s+8080\s+python3\s+{VM}\.vm:8080\s+http://{VM}\.vm:8080/$", table, re.M), table
    bad = bx(env, "vm", "ports", VM, "no-such-vm")
    assert bad.returncode == 1 and b"no-such-vm" in bad.stderr and b"8080" in bad.stdout


# --- workspaces ----------------------------------------------------------------------------------------


def test_workspace_prepare_export_apply(env: BangerNetns, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "app")
    base = git(repo, "rev-parse", "HEAD").strip()
    dry = bx(env, "vm", "workspace", "prepare", VM, str(repo), "--dry-run")
    assert ok(dry).splitlines()[-4:] == ["files (3):", ".gitignore", "bin/tool.sh", "tracked.txt"]
    started = time.monotonic()
    prepared = bx(env, "vm", "workspace", "prepare", VM, str(repo), "--include-untracked")
    ok(prepared)
    print(f"workspace prepare: {time.monotonic() - started:.1f}s")
    assert f"HEAD {base[:12]}" in prepared.stdout.decode()
    vm = json.loads(ok(bx(env, "vm", "show", VM, "--json")))
    assert vm["workspace"]["guest_path"] == "/root/repo" and vm["workspace"]["head_commit"] == base
    assert vm["workspace"]["host_path"] == str(repo.resolve()) and vm["workspace"]["branch"] == "main"
    # The exec default cwd is now the workspace.
    out = ok(bx(env, "vm", "exec", VM, "--", "sh", "-c",
                "pwd; cat tracked.txt untracked.txt; test -e noise.log || echo no-log; ./bin/tool.sh; "
                "git log --format=%H -1; git status --short"))
    assert out.splitlines()[:6] == ["/root/repo", "tracked v2 (uncommitted)", "untracked content", "no-log", "tool",
                                    base]
    assert sorted(out.splitlines()[6:]) == [" M tracked.txt", "?? untracked.txt"]
    # Work in the guest: a commit, an uncommitted edit, a new untracked file, a binary, an ignored file.
    guest_work = ("git -c user.name=Guest -c user.email=guest@example.com checkout -q -b work && "
                  "echo committed > committed.txt && git add committed.txt && "
                  "git -c user.name=Guest -c user.email=guest@example.com commit -q -m guest && "
                  "echo 'edited in guest' >> tracked.txt && echo fresh > fresh.txt && "
                  "head -c 4096 /dev/urandom > blob.bin && echo nope > more.log && rm bin/tool.sh")
    ok(bx(env, "vm", "exec", VM, "--", "sh", "-c", guest_work))
    patch_path = tmp_path / "guest.patch"
    exported = bx(env, "vm", "workspace", "export", VM, "--output", str(patch_path))
    ok(exported)
    assert f"against {base[:12]}" in exported.stderr.decode()
    patch = patch_path.read_bytes()
    assert b"more.log" not in patch and b"GIT binary patch" in patch
    assert bx(env, "vm", "workspace", "export", VM).stdout == patch  # the same patch on stdout; non-mutating
    # Apply on a clean checkout of the base, then the tree must equal the guest's.
    clean = tmp_path / "clean"
    subprocess.run(["git", "clone", "-q", str(repo), str(clean)], check=True)
    git(clean, "checkout", "-q", base)
    git(clean, "apply", "--check", str(patch_path))
    git(clean, "apply", str(patch_path))
    for name in ("tracked.txt", "untracked.txt", "committed.txt", "fresh.txt", "blob.bin"):
        guest = bx(env, "vm", "exec", VM, "--", "cat", name).stdout
        assert (clean / name).read_bytes() == guest, name
    assert not (clean / "bin" / "tool.sh").exists() and not (clean / "more.log").exists()
    assert (clean / "tracked.txt").read_text() == "tracked v2 (uncommitted)\nedited in guest\n"


def test_exec_auto_prepare_resyncs_a_moved_host_head(env: BangerNetns, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "moving")
    ok(bx(env, "vm", "workspace", "prepare", VM, str(repo), "--guest-path", "/root/moving"))
    (repo / "later.txt").write_text("committed later\n")
    git(repo, "add", "later.txt")
    git(repo, "commit", "-q", "-m", "later")
    stale = bx(env, "vm", "exec", VM, "--", "sh", "-c", "cat later.txt 2>/dev/null || echo missing")
    assert ok(stale) == "missing\n"
    assert b"--auto-prepare re-syncs it" in stale.stderr
    fresh = bx(env, "vm", "exec", VM, "--auto-prepare", "--", "cat", "later.txt")
    assert ok(fresh) == "committed later\n"
    assert b"re-syncing" in fresh.stderr
    vm = json.loads(ok(bx(env, "vm", "show", VM, "--json")))
    assert vm["workspace"]["head_commit"] == git(repo, "rev-parse", "HEAD").strip()
    again = bx(env, "vm", "exec", VM, "--", "true")
    assert again.returncode == 0 and again.stderr == b""


def test_workspace_refusals(env: BangerNetns, tmp_path: Path) -> None:
    occupied = bx(env, "vm", "workspace", "prepare", VM, str(make_repo(tmp_path / "r")), "--guest-path",
                  "/root/tree")  # the cp test's directory: not a workspace, not empty
    assert occupied.returncode == 1
    assert "guest path ops:/root/tree already exists and is not this VM's workspace" in occupied.stderr.decode()
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    refused = bx(env, "vm", "workspace", "prepare", VM, str(bare))
    assert refused.returncode == 1 and "is a bare git repository" in refused.stderr.decode()


# --- vm run ./repo -------------------------------------------------------------------------------------


def test_vm_run_with_a_repository(env: BangerNetns, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "proj")
    (repo / ".tool-versions").write_text("nodejs 20.11.1\n")
    (repo / "go.mod").write_text("module example.com/proj\n\ngo 1.22\n")
    git(repo, "add", ".tool-versions", "go.mod")
    git(repo, "commit", "-q", "-m", "tools")
    before = [vm["name"] for vm in env.vms()]
    refused = bx(env, "vm", "run", "--rm", str(repo), "--", "true")
    assert refused.returncode == 1
    assert refused.stderr.decode().strip() == (
        "banger: the repository declares tools in .tool-versions, and installing them needs outbound network: "
        "add --nat to give the VM network access, or --no-bootstrap to skip the tooling bootstrap")
    dry = ok(bx(env, "vm", "run", str(repo), "--dry-run"))
    assert "files (5):" in dry and "tooling: go@1.22 from go.mod (go directive)" in dry
    assert [vm["name"] for vm in env.vms()] == before  # neither made a VM

    started = time.monotonic()
    plain = bx(env, "vm", "run", "--rm", "--no-bootstrap", str(repo), "--", "sh", "-c",
               "pwd; cat tracked.txt; test -e untracked.txt && echo present || echo absent")
    assert ok(plain) == "/root/repo\ntracked v2 (uncommitted)\nabsent\n"
    assert "workspace: 1 untracked file not copied (add --include-untracked to ship them)" in plain.stderr.decode()
    print(f"vm run --rm ./repo -- cmd: {time.monotonic() - started:.1f}s")

    name = "tooled"
    log = f"/root/.cache/banger/vm-run-tooling-{name}.log"
    tooled = bx(env, "vm", "run", "--rm", "--nat", "--include-untracked", "--name", name, str(repo), "--",
                "sh", "-c", f"cat untracked.txt; cat {log}")
    out = ok(tooled)
    assert out.startswith("untracked content\nbanger tooling plan for /root/repo")
    assert "skip: go: " not in out and "skipped: mise is not installed in this image" in out
    assert "  repo managed: mise install (.tool-versions)" in out
    assert "  mise use -g --pin go@1.22   # go.mod: go directive" in out
    assert f"tooling: log in {name}:{log}" in tooled.stderr.decode()
    assert [vm["name"] for vm in env.vms()] == before


# --- the agent's protocol version and the SSH fallback, through the real VM's socket ----------------------------------------


def _agent_channel(env: BangerNetns) -> tuple[str, Path]:
    """The VM's agent transport and the host socket of it, as the daemon recorded them."""
    runtime = json.loads(ok(bx(env, "vm", "show", VM, "--json")))["runtime"]
    return runtime["agent_transport"], Path(runtime["agent_path"])


def test_agent_refuses_an_unknown_protocol_version(env: BangerNetns) -> None:
    from banger.guest.agent_client import AgentClient
    from banger.guest.agent_wire import AgentVersionMismatch

    transport, sock = _agent_channel(env)
    if transport == "serial":
        env.banger("system", "stop", check=True)  # the daemon holds the serial port's only connection
        client = AgentClient.connect_serial(sock, handshake=False)
    else:
        client = AgentClient.connect_vsock_uds(sock, handshake=False, timeout=20)
    try:
        with pytest.raises(AgentVersionMismatch, match="guest agent speaks protocol 1, banger speaks 99"):
            client.hello(version=99, timeout=20)
    finally:
        client.close()
    assert ok(bx(env, "vm", "exec", VM, "--", "echo", "still fine")) == "still fine\n"


def test_exec_falls_back_to_ssh_without_the_agent(env: BangerNetns) -> None:
    from banger.guest.agent_client import AgentClient

    transport, sock = _agent_channel(env)
    env.banger("system", "stop", check=True)  # a fresh daemon, with no agent connection yet
    aside = sock.with_name(sock.name + ".aside")
    holder = None
    if transport == "serial":
        holder = AgentClient.connect_serial(sock)  # QEMU's chardev serves one client: the daemon gets none
    else:
        sock.rename(aside)  # fault injection: the vsock socket is gone, as if vhost-device-vsock were
    try:
        fallback = bx(env, "vm", "exec", "--env", "X=over ssh", VM, "--", "sh", "-c", 'cat; echo "$X"; exit 4',
                      stdin="from stdin\n")
        assert fallback.returncode == 4, fallback.stderr
        assert fallback.stdout == b"from stdin\nover ssh\n"
        assert b"banger: warning: the guest agent is not available" in fallback.stderr
    finally:
        if holder is not None:
            holder.close()
        else:
            aside.rename(sock)
    assert ok(bx(env, "vm", "exec", VM, "--", "echo", "agent again")) == "agent again\n"
