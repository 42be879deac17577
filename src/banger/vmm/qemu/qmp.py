"""A thin QMP client over the `qemu.qmp` library: one connection per call, errors as one-line BangerErrors.

`qemu.qmp` is asyncio-based, so the real functions are async (`a*`); the plain-named functions are a
sync facade (`asyncio.run`) for callers on a worker thread, never for code already inside an event loop.
A QEMU socket chardev serves one client at a time, so each call connects, does its work and
disconnects rather than holding the monitor.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from banger.errors import BangerError

if TYPE_CHECKING:
    from qemu.qmp import QMPClient

_POLL = 0.05
_MIGRATE_FD_NAME = "banger-migrate"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {' '.join(str(cause).split())}"
    return text or type(exc).__name__


async def aconnect(socket_path: Path, timeout: float) -> QMPClient:
    """A connected client; retries until the socket appears and accepts, or `timeout` passes."""
    from qemu.qmp import QMPClient, QMPError

    deadline = time.monotonic() + timeout
    last = "the socket does not exist"
    while True:
        remaining = deadline - time.monotonic()
        if socket_path.exists():
            client = QMPClient("banger")
            try:
                await asyncio.wait_for(client.connect(str(socket_path)), max(remaining, 0.1))
                return client
            except (QMPError, OSError, TimeoutError) as exc:
                last = _one_line(exc)
        if time.monotonic() >= deadline:
            raise BangerError(f"cannot connect to QMP socket {socket_path} within {timeout:g}s: {last}")
        await asyncio.sleep(_POLL)


@contextlib.asynccontextmanager
async def session(socket_path: Path, timeout: float) -> AsyncIterator[QMPClient]:
    client = await aconnect(socket_path, timeout)
    try:
        yield client
    finally:
        # disconnect() re-raises whatever ended the connection (EOF after `quit`, for one): not our error.
        with contextlib.suppress(Exception):
            await client.disconnect()


async def _execute(
    client: QMPClient, command: str, arguments: Mapping[str, object] | None, timeout: float
) -> Any:
    from qemu.qmp import QMPError

    try:
        return await asyncio.wait_for(client.execute(command, arguments), timeout)
    except TimeoutError as exc:
        raise BangerError(f"QMP {command} got no reply within {timeout:g}s") from exc
    except QMPError as exc:
        raise BangerError(f"QMP {command} failed: {_one_line(exc)}") from exc


async def aexecute(
    socket_path: Path, command: str, arguments: Mapping[str, object] | None = None, *, timeout: float = 5.0
) -> Any:
    async with session(socket_path, timeout) as client:
        return await _execute(client, command, arguments, timeout)


async def aquery_status(socket_path: Path, *, timeout: float = 5.0) -> str:
    """The VM run state: "running", "paused", "inmigrate", "postmigrate", "shutdown", ..."""
    result = await aexecute(socket_path, "query-status", timeout=timeout)
    if not isinstance(result, dict) or not isinstance(result.get("status"), str):
        raise BangerError(f"QMP query-status returned an unexpected reply: {result!r:.200}")
    return str(result["status"])


async def asystem_powerdown(socket_path: Path, *, timeout: float = 5.0) -> None:
    """Press the ACPI power button. The guest decides what to do; nothing is waited for."""
    await aexecute(socket_path, "system_powerdown", timeout=timeout)


async def astop(socket_path: Path, *, timeout: float = 5.0) -> None:
    await aexecute(socket_path, "stop", timeout=timeout)


async def acont(socket_path: Path, *, timeout: float = 5.0) -> None:
    await aexecute(socket_path, "cont", timeout=timeout)


async def aquit(socket_path: Path, *, timeout: float = 5.0) -> None:
    """Ask QEMU to exit at once. The monitor may hang up before it replies; that counts as success."""
    from qemu.qmp import ExecInterruptedError

    async with session(socket_path, timeout) as client:
        with contextlib.suppress(ExecInterruptedError):
            await asyncio.wait_for(client.execute("quit"), timeout)


async def amigrate_to_file(socket_path: Path, dest: Path, *, timeout: float = 120.0) -> None:
    """Pause the VM and write its RAM and device state to `dest` (for `-incoming` restore later).

    The VM is left paused ("postmigrate"): the caller copies the disks while nothing writes to them,
    then `cont`s or quits. The file is opened here and passed over the socket (SCM_RIGHTS), so no
    shell (`exec:`) is involved and QEMU needs no access to `dest`'s directory. A failed migration
    removes `dest`.
    """
    deadline = time.monotonic() + timeout
    async with session(socket_path, min(timeout, 10.0)) as client:
        await _execute(client, "stop", None, 10.0)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                client.send_fd_scm(fd)
            except Exception as exc:  # the library raises QMPError or OSError here
                raise BangerError(f"cannot pass {dest} to QEMU: {_one_line(exc)}") from exc
            await _execute(client, "getfd", {"fdname": _MIGRATE_FD_NAME}, 10.0)
        finally:
            os.close(fd)
        try:
            await _execute(client, "migrate", {"uri": f"fd:{_MIGRATE_FD_NAME}"}, 10.0)
            while True:
                info = await _execute(client, "query-migrate", None, 10.0)
                status = info.get("status") if isinstance(info, dict) else None
                if status == "completed":
                    return
                if status in ("failed", "cancelled"):
                    reason = info.get("error-desc", "no reason given")
                    raise BangerError(f"migration of the VM to {dest} {status}: {reason}")
                if time.monotonic() >= deadline:
                    with contextlib.suppress(BangerError):
                        await _execute(client, "migrate_cancel", None, 5.0)
                    raise BangerError(f"migration of the VM to {dest} did not finish within {timeout:g}s")
                await asyncio.sleep(_POLL)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise


# --- sync facade --------------------------------------------------------------------------------------


def query_status(socket_path: Path, *, timeout: float = 5.0) -> str:
    return asyncio.run(aquery_status(socket_path, timeout=timeout))


def system_powerdown(socket_path: Path, *, timeout: float = 5.0) -> None:
    asyncio.run(asystem_powerdown(socket_path, timeout=timeout))


def stop(socket_path: Path, *, timeout: float = 5.0) -> None:
    asyncio.run(astop(socket_path, timeout=timeout))


def cont(socket_path: Path, *, timeout: float = 5.0) -> None:
    asyncio.run(acont(socket_path, timeout=timeout))


def quit(socket_path: Path, *, timeout: float = 5.0) -> None:  # named after the QMP command
    asyncio.run(aquit(socket_path, timeout=timeout))


def migrate_to_file(socket_path: Path, dest: Path, *, timeout: float = 120.0) -> None:
    asyncio.run(amigrate_to_file(socket_path, dest, timeout=timeout))
