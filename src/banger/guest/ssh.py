"""Talking SSH to guests with the OpenSSH client: banger's key, argv for `ssh`, and waiting for sshd.

Host keys: banger does its own trust-on-first-use (`knownhosts.pin`, fed by `ssh-keyscan`), so `ssh`
itself always runs with `StrictHostKeyChecking=yes` against banger's known_hosts, under the VM's
`<name>.vm` alias. A guest IP that is reused by another VM therefore never meets a stale pin.

Speed: under software emulation a fresh OpenSSH connection costs about a second (the key exchange),
a multiplexed one through a ControlMaster socket well under a tenth of that; `ssh_argv(control_dir=)`
turns multiplexing on, and `curve25519-sha256` is the cheapest key exchange the guest offers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shlex
import socket
import stat
import time
from collections.abc import Sequence
from pathlib import Path

from banger import paths
from banger.errors import BangerError
from banger.guest import knownhosts
from banger.system.run import run

log = logging.getLogger("banger.guest.ssh")

KEX = "curve25519-sha256"
CONTROL_PERSIST_S = 60
# sun_path is 108 bytes with the NUL; ssh binds the master at `<ControlPath>.<16 random chars>` first.
_SUN_PATH_MAX = 107
_SSH_TEMP_SUFFIX = 17
_NOT_CONNECTED = 255  # ssh's own failures (connect, auth, host key) exit 255


def _pub_path(path: Path) -> Path:
    return path.with_name(path.name + ".pub")


def ensure_key(path: Path) -> Path:
    """Make sure banger's ed25519 key exists at `path` (0600, directory 0700); returns the `.pub` path.

    An existing private key that others can read is refused rather than silently fixed: ssh would
    refuse it too, and the user should know the key may have leaked.
    """
    paths.ensure_private_dir(path.parent)
    pub = _pub_path(path)
    # flock on the directory: the CLI and the daemon may both get here first on a fresh machine.
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        if path.exists():
            _check_private_key(path)
            if not pub.exists():
                proc = run(["ssh-keygen", "-y", "-f", path])
                _write_public(pub, proc.stdout.decode().strip() + "\n")
            return pub
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp_pub = _pub_path(tmp)
        for stale in (tmp, tmp_pub):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "banger", "-f", tmp])
        os.chmod(tmp, 0o600)
        os.chmod(tmp_pub, 0o644)
        # Public half first: whoever sees the private key may read the public one.
        os.replace(tmp_pub, pub)
        os.replace(tmp, path)
        log.info("generated ssh key %s", path)
        return pub
    finally:
        os.close(dir_fd)


def _check_private_key(path: Path) -> None:
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise BangerError(f"ssh key {path} is not a regular file", hint="remove it and retry")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise BangerError(
            f"ssh key {path} is readable by others (mode {mode:04o}); it must be 0600",
            hint=f"if nobody else could have read it, run `chmod 600 {path}`; otherwise delete it and its "
            "VMs' authorized_keys will be refreshed with a new key",
        )


def _write_public(pub: Path, text: str) -> None:
    tmp = pub.with_name(f".{pub.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, pub)


def public_key(path: Path) -> str:
    """The one-line public key (`ssh-ed25519 AAAA... banger`) for a private key path or its `.pub`."""
    pub = path if path.name.endswith(".pub") else _pub_path(path)
    try:
        text = pub.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise BangerError(f"public key {pub} does not exist", hint="run `banger doctor`") from None
    if not text or "\n" in text:
        raise BangerError(f"public key {pub} is not a single line")
    return text


def control_path(control_dir: Path, host_alias: str, target_ip: str, port: int = 22) -> Path:
    """The ControlMaster socket for one guest. Keyed by alias and address, so a reused IP gets a new one.

    Kept short on purpose: a Unix socket path has 108 bytes, and ssh needs 17 more while binding.
    """
    digest = hashlib.sha256(f"{host_alias}\0{target_ip}\0{port}".encode()).hexdigest()[:16]
    path = control_dir / digest
    if len(os.fsencode(path)) + _SSH_TEMP_SUFFIX > _SUN_PATH_MAX:
        raise BangerError(
            f"ssh control directory {control_dir} is too long for a Unix socket path "
            f"(at most {_SUN_PATH_MAX - _SSH_TEMP_SUFFIX - 17} bytes)",
            hint="use a shorter runtime directory (XDG_RUNTIME_DIR)",
        )
    return path


def ssh_argv(
    target_ip: str,
    *,
    key: Path,
    known_hosts: Path,
    host_alias: str,
    command: Sequence[str] | None,
    tty: bool,
    control_dir: Path | None,
    connect_timeout: float = 5,
    extra_opts: Sequence[str] = (),
    port: int = 22,
    batch: bool = True,
) -> list[str]:
    """argv for `ssh root@<target_ip>`: banger's key and pins only, no user or system ssh config.

    `command` is shell-quoted into one argument (the remote side hands it to a shell), so
    `["sh", "-c", "exit 42"]` runs as written. `batch=False` allows prompts (interactive sessions).
    `extra_opts` are `Key=value` strings added as `-o` options before the defaults (ssh keeps the
    first value it sees). `control_dir` must exist (0700); masters linger for 60 s.
    """
    opts = [
        *extra_opts,
        "IdentitiesOnly=yes",
        "IdentityAgent=none",
        f"UserKnownHostsFile={known_hosts}",
        "GlobalKnownHostsFile=/dev/null",
        "StrictHostKeyChecking=yes",
        f"HostKeyAlias={host_alias}",
        "CheckHostIP=no",
        "UpdateHostKeys=no",
        f"KexAlgorithms={KEX}",
        f"ConnectTimeout={max(1, round(connect_timeout))}",
        "ServerAliveInterval=10",
        "ServerAliveCountMax=3",
        "LogLevel=ERROR",
    ]
    if batch:
        opts.append("BatchMode=yes")
    if control_dir is not None:
        opts += [
            "ControlMaster=auto",
            f"ControlPath={control_path(control_dir, host_alias, target_ip, port)}",
            f"ControlPersist={CONTROL_PERSIST_S}",
        ]
    argv = ["ssh", "-F", "none", "-i", str(key), "-p", str(port)]
    for opt in opts:
        argv += ["-o", opt]
    argv.append("-t" if tty else "-T")
    argv += ["-l", "root", "--", target_ip]
    if command:
        argv.append(shlex.join(command))
    return argv


def stop_master(target_ip: str, *, host_alias: str, control_dir: Path, port: int = 22) -> None:
    """Close a lingering ControlMaster for a guest (before it is stopped or deleted); quiet if none."""
    path = control_path(control_dir, host_alias, target_ip, port)
    if not path.exists():
        return
    run(
        ["ssh", "-F", "none", "-o", f"ControlPath={path}", "-O", "exit", "--", target_ip],
        check=False,
        timeout=10,
    )
    # The master acknowledges `exit` before it removes its socket: wait briefly, so that a caller that
    # deletes the VM (or its directory) next does not race it.
    deadline = time.monotonic() + 2.0
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def _tcp_banner(ip: str, port: int, timeout: float) -> str | None:
    """None once sshd greets us with `SSH-`, else what went wrong."""
    try:
        with socket.create_connection((ip, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            greeting = sock.recv(64)
    except OSError as exc:
        return f"TCP {ip}:{port}: {exc.strerror or exc}"
    if greeting.startswith(b"SSH-"):
        return None
    return f"TCP {ip}:{port}: no SSH banner (got {greeting[:20]!r})"


def wait_for_ssh(
    ip: str,
    port: int = 22,
    *,
    deadline: float,
    key: Path,
    known_hosts: Path,
    alias: str,
    vm_name: str | None = None,
    probe_interval: float = 0.25,
    control_dir: Path | None = None,
    scan: bool = True,
) -> float:
    """Wait until `ssh root@ip true` works; returns the seconds waited.

    `deadline` is an absolute `time.monotonic()` instant. Stages: TCP accept with an SSH banner
    (cheap), TOFU (`ssh-keyscan` + `knownhosts.pin`; a changed key raises HostKeyMismatch at once),
    then `ssh ... true` until it exits 0. With `control_dir`, the successful probe leaves a master
    behind that the next commands reuse.
    """
    start = time.monotonic()
    name = vm_name or knownhosts.vm_name_of(alias)
    problem = "not tried"

    def remaining() -> float:
        return deadline - time.monotonic()

    def pause() -> None:
        time.sleep(max(0.0, min(probe_interval, remaining())))

    # Without `scan` the daemon has also seen sshd listen (through the agent): no TCP probe, which would
    # cost the guest a forked sshd child (about half a second of its CPU under emulation).
    stage = "tcp" if scan else "ssh"
    while remaining() > 0:
        if stage == "tcp":
            problem = _tcp_banner(ip, port, min(2.0, max(0.1, remaining()))) or ""
            if problem:
                pause()
                continue
            # Without `scan`, the caller has pinned the key through a trusted channel (the guest agent)
            # and ssh's StrictHostKeyChecking does the comparison: one SSH handshake fewer.
            stage = "pin" if scan else "ssh"
        if stage == "pin":
            try:
                keys = knownhosts.scan_host_key(ip, port, timeout=min(5.0, max(1.0, remaining())))
            except BangerError as exc:
                problem = exc.message
                pause()
                continue
            knownhosts.pin(known_hosts, alias, keys, vm_name=name)
            stage = "ssh"
        argv = ssh_argv(
            ip, key=key, known_hosts=known_hosts, host_alias=alias, command=["true"], tty=False,
            control_dir=control_dir, connect_timeout=min(5.0, max(1.0, remaining())), port=port,
        )  # fmt: skip
        try:
            proc = run(argv, check=False, timeout=max(0.1, remaining()))
        except BangerError as exc:  # timed out
            problem = exc.message
            continue
        if proc.returncode == 0:
            waited = time.monotonic() - start
            log.debug("ssh to %s (%s) ready after %.2fs", alias, ip, waited)
            return waited
        err = proc.stderr.decode("utf-8", "replace").strip().replace("\n", " | ")
        problem = f"ssh exited {proc.returncode}" + (f": {err[-300:]}" if err else "")
        if proc.returncode != _NOT_CONNECTED:
            problem += " (running `true`)"
        pause()
    waited = time.monotonic() - start
    raise BangerError(
        f"ssh to {alias} ({ip}:{port}) not ready after {waited:.1f}s: {problem}",
        hint=f"sshd in the guest is the likely suspect; look at `banger vm logs {name}`",
    )
