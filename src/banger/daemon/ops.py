"""Registry of long operations (create, image pull, kernel pull).

`*.begin` registers an operation whose id is the op_id of the begin call, the work runs as a task,
`*.status` reads its stage, and `daemon.operations.list` shows in-flight and recently finished ones
(`banger update` refuses while any is in flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from banger import log as blog
from banger.errors import BangerError, NotFound

log = logging.getLogger("banger.ops")

KEEP_FINISHED_SECONDS = 600.0


@dataclass(frozen=True)
class Operation:
    id: str
    kind: str
    target: str
    stage: str = "queued"
    done: bool = False
    error: dict[str, Any] | None = None
    result: Any = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    stages: tuple[tuple[str, float], ...] = ()
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "target": self.target,
            "stage": self.stage,
            "done": self.done,
            "error": self.error,
            "result": self.result,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "stages": [{"name": n, "at": t} for n, t in self.stages],
            "detail": self.detail,
        }




class Reporter:
    """Handed to an operation's work: `stage()` from the loop, `detail()` also from worker threads."""

    def __init__(self, registry: OperationRegistry, op_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self._registry = registry
        self._op_id = op_id
        self._loop = loop

    def stage(self, name: str) -> None:
        self._registry._set_stage(self._op_id, name)

    def detail(self, text: str) -> None:
        self._loop.call_soon_threadsafe(self._registry._set_detail, self._op_id, text)


class OperationRegistry:
    def __init__(self) -> None:
        self._ops: dict[str, Operation] = {}
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._changed = asyncio.Event()

    def begin(self, kind: str, target: str, work: Callable[[Reporter], Awaitable[Any]]) -> Operation:
        """Start `work` in the background under the current op_id; it reports through its Reporter."""
        op_id = blog.current_op_id.get() or blog.new_op_id()
        op = Operation(id=op_id, kind=kind, target=target)
        self._ops[op_id] = op
        loop = asyncio.get_running_loop()
        reporter = Reporter(self, op_id, loop)

        async def runner() -> None:
            blog.current_op_id.set(op_id)
            try:
                result = await work(reporter)
            except asyncio.CancelledError:
                self._finish(op_id, error={"code": "operation_failed", "message": "operation canceled"})
                raise
            except BangerError as exc:
                self._finish(op_id, error={"code": exc.code, "message": exc.message, "hint": exc.hint})
            except Exception as exc:
                log.exception("operation crashed", extra={"kind": kind})
                self._finish(op_id, error={"code": "operation_failed", "message": f"internal error: {exc}"})
            else:
                self._finish(op_id, result=result)

        self._tasks[op_id] = loop.create_task(runner(), name=f"{kind}:{op_id}")
        self.prune()
        return op

    def _set_stage(self, op_id: str, name: str) -> None:
        current = self._ops[op_id]
        self._ops[op_id] = replace(current, stage=name, detail="", stages=(*current.stages, (name, time.time())))
        log.info("operation stage", extra={"kind": current.kind, "target": current.target, "stage": name})
        self._notify()

    def _set_detail(self, op_id: str, text: str) -> None:
        current = self._ops.get(op_id)
        if current is not None and not current.done:
            self._ops[op_id] = replace(current, detail=text)
            self._notify()

    def find_running(self, kind: str, target: str) -> Operation | None:
        for op in self._ops.values():
            if op.kind == kind and op.target == target and not op.done:
                return op
        return None

    def _finish(self, op_id: str, *, result: Any = None, error: dict[str, Any] | None = None) -> None:
        current = self._ops[op_id]
        stage = "failed" if error else "done"
        self._ops[op_id] = replace(current, done=True, stage=stage, result=result, error=error,
                                   finished_at=time.time())
        self._tasks.pop(op_id, None)
        log.info("operation finished", extra={"kind": current.kind, "target": current.target,
                                               "failed": error is not None, "op_id": op_id})
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def get(self, op_id: str) -> Operation:
        op = self._ops.get(op_id)
        if op is None:
            raise NotFound(f"no operation {op_id!r}", hint="finished operations are kept for 10 minutes")
        return op

    async def wait_change(self, op_id: str, timeout: float) -> Operation:
        """Long-poll: return when the operation changes (or after `timeout`)."""
        op = self.get(op_id)
        if not op.done:
            event = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        return self.get(op_id)

    def snapshot(self) -> list[Operation]:
        self.prune()
        return sorted(self._ops.values(), key=lambda o: o.started_at)

    def in_flight(self) -> list[Operation]:
        return [op for op in self._ops.values() if not op.done]

    def prune(self) -> None:
        cutoff = time.time() - KEEP_FINISHED_SECONDS
        for op_id, op in list(self._ops.items()):
            if op.done and op.finished_at is not None and op.finished_at < cutoff:
                del self._ops[op_id]

    async def cancel_all(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
