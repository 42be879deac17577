"""The progress sink image builders report to (golden builds, OCI pulls), called from their thread."""

from __future__ import annotations

from typing import Protocol


class BuildReporter(Protocol):
    def stage(self, name: str) -> None: ...

    def detail(self, text: str) -> None: ...


class Silent:
    """For callers that want no progress."""

    def stage(self, name: str) -> None:
        pass

    def detail(self, text: str) -> None:
        pass
