"""The one door for subprocesses.

Every external tool banger uses is started here: argv as a list, a minimal environment, stdin from
/dev/null unless given, the command logged at debug level, and a failure raised as `CommandFailed`
naming the command, its exit status and the tail of its stderr. A missing binary is a clear error
that points at `banger doctor`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from banger.errors import BangerError, CommandFailed

log = logging.getLogger("banger.run")

_ENV_KEEP = ("PATH", "TERM", "HOME", "USER", "LOGNAME", "TMPDIR", "NO_COLOR", "SSH_AUTH_SOCK")
_STDERR_TAIL = 600


def minimal_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: os.environ[k] for k in _ENV_KEEP if k in os.environ}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env["LANG"] = "C.UTF-8"
    env["LC_ALL"] = "C.UTF-8"
    if extra:
        env.update(extra)
    return env


def find_binary(name: str) -> str | None:
    """PATH lookup that also sees the sbin directories a non-root PATH often lacks."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _resolve(argv: Sequence[str | os.PathLike[str]]) -> list[str]:
    args = [os.fspath(a) for a in argv]
    if not args:
        raise ValueError("empty argv")
    if "/" not in args[0]:
        path = find_binary(args[0])
        if path is None:
            raise BangerError(f"{args[0]} not found", hint="run `banger doctor` to see which tools are missing")
        args[0] = path
    return args


def _tail(data: bytes | str | None) -> str:
    if not data:
        return ""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    text = text.strip()
    return text[-_STDERR_TAIL:].replace("\n", " | ")


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    input: bytes | None = None,
    check: bool = True,
    capture: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command to completion. stdout/stderr are captured unless `capture=False`."""
    args = _resolve(argv)
    log.debug("+ %s", shlex.join(args))
    try:
        proc = subprocess.run(
            args,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            env=minimal_env(env),
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BangerError(f"`{shlex.join(args)}` timed out after {timeout:g}s") from exc
    if check and proc.returncode != 0:
        log.debug("command failed", extra={"argv": args, "rc": proc.returncode, "stderr": _tail(proc.stderr)})
        raise CommandFailed(args, proc.returncode, _tail(proc.stderr) or _tail(proc.stdout))
    return proc


def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    stdout: int | None = subprocess.DEVNULL,
    stderr: int | None = subprocess.DEVNULL,
    stdin: int | None = subprocess.DEVNULL,
    new_session: bool = False,
    pass_fds: Sequence[int] = (),
    cwd: str | os.PathLike[str] | None = None,
    inherit_env: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a long-lived child. The caller owns it and must wait for or kill it."""
    args = _resolve(argv)
    log.debug("+ %s &", shlex.join(args))
    full_env = dict(os.environ) if inherit_env else minimal_env()
    if env:
        full_env.update(env)
    return subprocess.Popen(
        args,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env=full_env,
        start_new_session=new_session,
        pass_fds=tuple(pass_fds),
        cwd=cwd,
    )


def exec_replace(argv: Sequence[str | os.PathLike[str]], *, env: Mapping[str, str] | None = None) -> None:
    """Replace this process (used by the CLI for the interactive ssh session)."""
    args = _resolve(argv)
    log.debug("exec %s", shlex.join(args))
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    os.execve(args[0], args, full_env)


async def arun(
    argv: Sequence[str | os.PathLike[str]],
    *,
    input: bytes | None = None,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Async `run`: a cancelled caller kills the child and waits for it, so nothing is orphaned."""
    args = _resolve(argv)
    log.debug("+ %s", shlex.join(args))
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=minimal_env(env),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(input), timeout)
    except (asyncio.CancelledError, TimeoutError) as exc:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if isinstance(exc, TimeoutError):
            raise BangerError(f"`{shlex.join(args)}` timed out after {timeout:g}s") from exc
        raise
    returncode = proc.returncode if proc.returncode is not None else -1
    result = subprocess.CompletedProcess(args, returncode, out, err)
    if check and returncode != 0:
        raise CommandFailed(args, returncode, _tail(err) or _tail(out))
    return result
