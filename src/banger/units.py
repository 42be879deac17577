"""Sizes ("8G") and durations ("2h30m") as people write them in config files and flags.

Sizes use binary suffixes written as one letter, like the original tool: K, M, G, T mean KiB, MiB, GiB,
TiB; a plain number is bytes. "4GiB" and "4GB" are refused rather than guessed at, because "GB" could
mean either 10^9 or 2^30 and the original never accepted them.

Durations follow Go's `time.ParseDuration`, since config files written for the Go tool must keep working:
a sequence of decimal numbers, each with a unit (ns, us, µs, ms, s, m, h), optionally signed; the bare
"0" needs no unit.
"""

from __future__ import annotations

import json
import re

SIZE_UNITS: dict[str, int] = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

_SIZE = re.compile(r"(?P<num>[0-9]+)(?P<unit>[KMGTkmgt]?)")
_SIZE_LONG_SUFFIX = re.compile(r"(?P<num>[0-9]+)(?P<unit>[KMGTkmgt])(?:i?[Bb])")

_NS_PER_UNIT: dict[str, int] = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
_DURATION_PART = re.compile(r"(?P<int>[0-9]*)(?:\.(?P<frac>[0-9]*))?(?P<unit>[^0-9.]*)")
_MAX_NS = (1 << 63) - 1  # Go's time.Duration is an int64 of nanoseconds.


class UnitError(ValueError):
    """`text` is not a size or duration; `reason` completes the sentence "<text> ...".

    The config loader puts the key in front of the quoted value; on its own the message reads
    `"4GiB" is not a size (...)`.
    """

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason
        super().__init__(f"{json.dumps(text, ensure_ascii=False)} {reason}")


def parse_size(text: str) -> int:
    """Bytes in `text`: "8G" -> 8 GiB, "512M", "64K", "1T", or a plain number of bytes."""
    match = _SIZE.fullmatch(text)
    if match is None:
        long_form = _SIZE_LONG_SUFFIX.fullmatch(text)
        if long_form is not None:
            short = long_form["num"] + long_form["unit"].upper()
            raise UnitError(text, f'is not a size (write "{short}"; K, M, G and T already mean KiB, MiB, GiB and TiB)')
        raise UnitError(
            text, 'is not a size (expected a whole number of bytes, or one with a K, M, G or T suffix such as "4G")'
        )
    multiplier = SIZE_UNITS[match["unit"].upper()] if match["unit"] else 1
    return int(match["num"]) * multiplier


def format_size(size: int) -> str:
    """The shortest exact spelling of `size` bytes that `parse_size` reads back: 8 GiB -> "8G"."""
    if size < 0:
        raise ValueError(f"size {size} is negative")
    for suffix in ("T", "G", "M", "K"):
        unit = SIZE_UNITS[suffix]
        if size and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def parse_duration(text: str) -> float:
    """Seconds in a Go duration string: "0", "90s", "2h30m", "500ms", "1.5h", "-2m"."""
    return _duration_ns(text) / 1e9


def _duration_ns(text: str) -> int:
    rest = text
    sign = 1
    if rest[:1] in ("-", "+"):
        sign = -1 if rest[0] == "-" else 1
        rest = rest[1:]
    if rest == "0":
        return 0
    if not rest:
        raise UnitError(text, 'is not a duration (expected e.g. "90s", "2h30m" or "500ms")')
    total = 0
    while rest:
        match = _DURATION_PART.match(rest)
        # The pattern matches the empty string, so `match` is never None; check what it took.
        if match is None or not (match["int"] or match["frac"]):
            raise UnitError(text, 'is not a duration (expected e.g. "90s", "2h30m" or "500ms")')
        unit_text = match["unit"]
        if not unit_text:
            raise UnitError(text, 'is not a duration (a number is missing its unit, e.g. "10s")')
        if unit_text not in _NS_PER_UNIT:
            shown = json.dumps(unit_text, ensure_ascii=False)
            raise UnitError(text, f"is not a duration (unknown unit {shown}; use ns, us, ms, s, m or h)")
        per = _NS_PER_UNIT[unit_text]
        whole = int(match["int"] or "0") * per
        frac_digits = match["frac"] or ""
        fraction = int(frac_digits) * per // 10 ** len(frac_digits) if frac_digits else 0
        total += whole + fraction
        if total > _MAX_NS:
            raise UnitError(text, "is out of range (at most about 292 years)")
        rest = rest[match.end() :]
    return sign * total


def format_duration(seconds: float) -> str:
    """A compact Go-style duration that `parse_duration` reads back: 9000 -> "2h30m", 0.5 -> "500ms"."""
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < _NS_PER_UNIT["s"]:
        for unit in ("ms", "us"):
            if ns % _NS_PER_UNIT[unit] == 0:
                return f"{sign}{ns // _NS_PER_UNIT[unit]}{unit}"
        return f"{sign}{ns}ns"
    hours, ns = divmod(ns, _NS_PER_UNIT["h"])
    minutes, ns = divmod(ns, _NS_PER_UNIT["m"])
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else ""]
    if ns:
        whole, frac = divmod(ns, _NS_PER_UNIT["s"])
        parts.append(f"{whole}.{frac:09d}".rstrip("0").rstrip(".") + "s" if frac else f"{whole}s")
    return sign + "".join(parts)
