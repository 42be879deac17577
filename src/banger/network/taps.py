"""A pool of idle, bridge-attached tap devices, so starting a VM does not wait for one to be made.

Taps are created and deleted by the root helper; the pool only decides names and keeps the idle
ones. A VM's tap name is persisted in its runtime record, so a tap survives in-memory state loss and
is returned (or deleted) on stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from banger.roothelper.client import PrivilegedOps

log = logging.getLogger("banger.taps")

PREFIX = "tap-pool-"


class TapPool:
    def __init__(self, helper: PrivilegedOps, bridge: str, size: int) -> None:
        self.helper = helper
        self.bridge = bridge
        self.size = size
        self._idle: list[str] = []
        self._in_use: set[str] = set()
        self._lock = asyncio.Lock()
        self._next = 0

    def _new_name(self) -> str:
        taken = set(self._idle) | self._in_use
        while f"{PREFIX}{self._next}" in taken:
            self._next += 1
        name = f"{PREFIX}{self._next}"
        self._next += 1
        return name

    def mark_in_use(self, name: str) -> None:
        """A tap recorded by a running VM (found at daemon start) is not free."""
        self._in_use.add(name)

    async def acquire(self) -> str:
        async with self._lock:
            if self._idle:
                name = self._idle.pop()
            else:
                name = self._new_name()
                await self.helper.create_tap(name, self.bridge)
            self._in_use.add(name)
            return name

    async def release(self, name: str) -> None:
        async with self._lock:
            self._in_use.discard(name)
            if len(self._idle) < self.size and name.startswith(PREFIX) and name not in self._idle:
                self._idle.append(name)
                return
        with contextlib.suppress(Exception):
            await self.helper.delete_tap(name)

    async def adopt_leftovers(self) -> None:
        """Taps of a previous daemon (one killed before it could drain its pool): idle ones join the pool
        up to its size, the rest are deleted. Call after re-adopting running VMs (`mark_in_use`)."""
        try:
            found = (await self.helper.list_taps(self.bridge)).get("taps", [])
        except Exception as exc:
            log.warning("could not list leftover taps", extra={"error": str(exc)})
            return
        async with self._lock:
            spare = [t for t in found if t.startswith(PREFIX) and t not in self._in_use and t not in self._idle]
            keep = spare[: max(0, self.size - len(self._idle))]
            self._idle.extend(keep)
            drop = [t for t in spare if t not in keep]
        for name in drop:
            with contextlib.suppress(Exception):
                await self.helper.delete_tap(name)

    async def warm(self) -> None:
        """Fill the pool up to `size` in the background; failures are logged, not fatal."""
        async with self._lock:
            missing = self.size - len(self._idle)
            names = [self._new_name() for _ in range(max(0, missing))]
            for name in names:
                try:
                    await self.helper.create_tap(name, self.bridge)
                except Exception as exc:
                    log.warning("tap warm-up failed", extra={"tap": name, "error": str(exc)})
                    break
                self._idle.append(name)

    async def drain(self) -> None:
        async with self._lock:
            idle, self._idle = self._idle, []
        for name in idle:
            with contextlib.suppress(Exception):
                await self.helper.delete_tap(name)
