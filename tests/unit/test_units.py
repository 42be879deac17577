from __future__ import annotations

import pytest

from banger.units import UnitError, format_duration, format_size, parse_duration, parse_size

GIB = 1 << 30


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("12", 12),
        ("1073741824", GIB),
        ("64K", 64 << 10),
        ("512M", 512 << 20),
        ("8G", 8 * GIB),
        ("2T", 2 << 40),
        ("8g", 8 * GIB),  # the suffix letter is case-insensitive
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("4GiB", 'is not a size (write "4G"; K, M, G and T already mean KiB, MiB, GiB and TiB)'),
        ("4GB", 'is not a size (write "4G"; K, M, G and T already mean KiB, MiB, GiB and TiB)'),
        ("512mb", 'is not a size (write "512M"; K, M, G and T already mean KiB, MiB, GiB and TiB)'),
        (
            "1.5G",
            'is not a size (expected a whole number of bytes, or one with a K, M, G or T suffix such as "4G")',
        ),
        (
            "",
            'is not a size (expected a whole number of bytes, or one with a K, M, G or T suffix such as "4G")',
        ),
        (
            "4 G",
            'is not a size (expected a whole number of bytes, or one with a K, M, G or T suffix such as "4G")',
        ),
        (
            "-1G",
            'is not a size (expected a whole number of bytes, or one with a K, M, G or T suffix such as "4G")',
        ),
        (
            "4P",
            'is not a size (expected a whole number of bytes, or one with a K, M, G or T suffix such as "4G")',
        ),
        (
            "G",
            'is not a size (expected a whole number of bytes, or one with a K, M, G or T suffix such as "4G")',
        ),
    ],
)
def test_parse_size_rejects(text: str, reason: str) -> None:
    with pytest.raises(UnitError) as caught:
        parse_size(text)
    assert caught.value.reason == reason
    assert caught.value.text == text
    assert str(caught.value).startswith(f'"{text}" is not a size')


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, "0"),
        (1, "1"),
        (1025, "1025"),
        (1024, "1K"),
        (1536 << 20, "1536M"),
        (8 * GIB, "8G"),
        (3 << 40, "3T"),
    ],
)
def test_format_size_is_shortest_exact(size: int, expected: str) -> None:
    assert format_size(size) == expected
    assert parse_size(expected) == size


def test_format_size_rejects_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        format_size(-1)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("+0", 0.0),
        ("-0", 0.0),
        ("24h", 86400.0),
        ("2h30m", 9000.0),
        ("90s", 90.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        (".5s", 0.5),
        ("1.s", 1.0),
        ("1h0m0s", 3600.0),
        ("5m.5s", 300.5),
        ("-2m", -120.0),
        ("250us", 0.00025),
        ("250µs", 0.00025),  # micro sign
        ("250μs", 0.00025),  # greek mu
        ("1500ns", 0.0000015),
    ],
)
def test_parse_duration_follows_go(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12, abs=0)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", 'is not a duration (expected e.g. "90s", "2h30m" or "500ms")'),
        (".", 'is not a duration (expected e.g. "90s", "2h30m" or "500ms")'),
        ("-", 'is not a duration (expected e.g. "90s", "2h30m" or "500ms")'),
        ("10", 'is not a duration (a number is missing its unit, e.g. "10s")'),
        ("1h30", 'is not a duration (a number is missing its unit, e.g. "10s")'),
        ("1d", 'is not a duration (unknown unit "d"; use ns, us, ms, s, m or h)'),
        ("1 h", 'is not a duration (unknown unit " h"; use ns, us, ms, s, m or h)'),
        ("4GiB", 'is not a duration (unknown unit "GiB"; use ns, us, ms, s, m or h)'),
        ("h", 'is not a duration (expected e.g. "90s", "2h30m" or "500ms")'),
        ("3000000h", "is out of range (at most about 292 years)"),
    ],
)
def test_parse_duration_rejects(text: str, reason: str) -> None:
    with pytest.raises(UnitError) as caught:
        parse_duration(text)
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "0"),
        (0.5, "500ms"),
        (0.00025, "250us"),
        (2e-9, "2ns"),
        (90, "1m30s"),
        (9000, "2h30m"),
        (86400, "24h"),
        (1.5, "1.5s"),
        (3601.25, "1h1.25s"),
        (-90, "-1m30s"),
    ],
)
def test_format_duration_round_trips(seconds: float, expected: str) -> None:
    assert format_duration(seconds) == expected
    assert parse_duration(expected) == pytest.approx(seconds, rel=1e-12, abs=0)
