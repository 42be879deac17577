"""Version and build identity, printed by `--version` and checked by doctor and update."""

from __future__ import annotations

from dataclasses import dataclass

from banger import __version__


@dataclass(frozen=True)
class BuildInfo:
    version: str
    commit: str
    built_at: str

    def one_line(self, program: str) -> str:
        return f"{program} v{self.version} (commit {self.commit[:8]}, built {self.built_at})"


def current() -> BuildInfo:
    # A release build writes _build.py next to this file; a source checkout has none.
    try:
        from banger import _build  # type: ignore[attr-defined]

        return BuildInfo(__version__, str(_build.COMMIT), str(_build.BUILT_AT))
    except ImportError:
        return BuildInfo(__version__, "unknown", "unknown")
