"""`banger doctor`: a read-only host readiness report of PASS/WARN/FAIL rows.

`run_checks(ctx)` runs every check in `checks.CHECKS` and returns one `CheckResult` per row;
`render_text` and `to_json` turn them into the CLI's two output forms and `exit_code` into its status
(1 when anything FAILs; update uses that to roll back). Nothing here writes to disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from banger.doctor.checks import CHECKS, CheckResult, DoctorContext, Status, VmDefaultsRow

__all__ = [
    "CheckResult",
    "DoctorContext",
    "Status",
    "VmDefaultsRow",
    "exit_code",
    "render_text",
    "run_checks",
    "to_json",
]


def _check_name(fn: object) -> str:
    name = str(getattr(fn, "__name__", "check"))
    return name.removeprefix("check_").replace("_", " ")


def run_checks(ctx: DoctorContext) -> list[CheckResult]:
    results: list[CheckResult] = []
    for check in CHECKS:
        try:
            results.append(check(ctx))
        except Exception as exc:
            # One broken check must not hide the other rows; it reports itself as a failure instead.
            results.append(
                CheckResult(
                    _check_name(check),
                    "FAIL",
                    f"check crashed: {type(exc).__name__}: {exc}",
                    hint="this is a bug in banger doctor; please report it",
                )
            )
    return results


_COLORS: dict[Status, str] = {"PASS": "\x1b[32m", "WARN": "\x1b[33m", "FAIL": "\x1b[31m"}
_DIM = "\x1b[2m"
_RESET = "\x1b[0m"


def render_text(results: Sequence[CheckResult], color: bool) -> str:
    """`PASS\\tname` rows; the summary and details follow as `  - ` lines, the hint as `  hint: `."""
    lines: list[str] = []
    for r in results:
        status = f"{_COLORS[r.status]}{r.status}{_RESET}" if color else r.status
        lines.append(f"{status}\t{r.name}")
        if r.summary:
            lines.append(f"  - {r.summary}")
        lines.extend(f"  - {detail}" for detail in r.details)
        if r.hint:
            hint = f"  hint: {r.hint}"
            lines.append(f"{_DIM}{hint}{_RESET}" if color else hint)
    return "\n".join(lines) + ("\n" if lines else "")


def to_json(results: Sequence[CheckResult]) -> list[dict[str, Any]]:
    return [
        {
            "name": r.name,
            "status": r.status,
            "summary": r.summary,
            "details": list(r.details),
            "hint": r.hint,
        }
        for r in results
    ]


def exit_code(results: Sequence[CheckResult]) -> int:
    return 1 if any(r.status == "FAIL" for r in results) else 0
