from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from banger.errors import BangerError, NotFound
from banger.update import apply
from banger.update import manifest as m

SHA = "a" * 64


def doc(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "schema_version": 1,
        "latest_stable": "0.2.0",
        "versions": {
            "0.1.0": {"tarball": "0.1.0/banger-0.1.0-linux-amd64.tar.gz", "sha256": SHA, "size": 10},
            "0.2.0": {"tarball": "0.2.0/banger-0.2.0-linux-amd64.tar.gz", "sha256": SHA, "size": 20},
            "0.3.0-rc.1": {"tarball": "https://mirror.example/banger-0.3.0-rc.1-linux-amd64.tar.gz",
                           "sha256": SHA, "size": 30},
        },
    }
    base.update(over)
    return base


def parse(d: dict[str, Any]) -> m.Manifest:
    return m.parse(json.dumps(d).encode())


def test_parse_and_urls() -> None:
    man = parse(doc())
    assert man.latest_stable == "0.2.0"
    entry = m.choose_target(man, None)
    url = "http://127.0.0.1:8000/releases/manifest.json"
    assert entry.tarball_url(url) == "http://127.0.0.1:8000/releases/0.2.0/banger-0.2.0-linux-amd64.tar.gz"
    assert entry.sums_url(url) == "http://127.0.0.1:8000/releases/0.2.0/SHA256SUMS"
    assert entry.sig_url(url) == "http://127.0.0.1:8000/releases/0.2.0/SHA256SUMS.sig"
    assert m.choose_target(man, "v0.3.0-rc.1").tarball_url(url).startswith("https://mirror.example/")
    assert parse(man.to_json()) == man


def test_unknown_version_is_not_found() -> None:
    with pytest.raises(NotFound) as exc:
        m.choose_target(parse(doc()), "v9.9.9")
    assert exc.value.message == "version v9.9.9 is not in the release manifest (known: v0.1.0, v0.2.0, v0.3.0-rc.1)"
    with pytest.raises(BangerError, match="is not a release version"):
        m.choose_target(parse(doc()), "latest")


@pytest.mark.parametrize("schema", [2, 0, "1", None, True])
def test_unknown_schema_is_refused(schema: object) -> None:
    with pytest.raises(BangerError, match=r"schema_version .*; this banger understands only 1"):
        parse(doc(schema_version=schema))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"latest_stable": "0.9.0"}, "latest_stable '0.9.0' is not one of its versions"),
        ({"versions": {}}, "lists no versions"),
        ({"versions": {"v0.1.0": {}}}, "without a leading 'v'"),
        ({"versions": {"0.1": {}}}, "is not a release version"),
    ],
)
def test_bad_documents(change: dict[str, Any], message: str) -> None:
    with pytest.raises(BangerError, match=message):
        parse(doc(**change))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"tarball": "../x/banger-0.2.0-linux-amd64.tar.gz"}, "relative path or an http"),
        ({"tarball": "file:///etc/banger-0.2.0-linux-amd64.tar.gz"}, "relative path or an http"),
        ({"tarball": "0.2.0/banger-0.1.0-linux-amd64.tar.gz"}, "must be named banger-0.2.0-linux-amd64.tar.gz"),
        ({"sha256": "A" * 64}, "64 lowercase hex"),
        ({"size": 0}, "size must be"),
        ({"size": (256 << 20) + 1}, "size must be"),
        ({"size": True}, "size must be"),
    ],
)
def test_bad_entries(entry: dict[str, Any], message: str) -> None:
    d = doc()
    d["versions"]["0.2.0"].update(entry)
    with pytest.raises(BangerError, match=message):
        parse(d)


def test_oversized_and_non_json_manifests() -> None:
    with pytest.raises(BangerError, match="over the cap"):
        m.parse(b" " * (m.MAX_MANIFEST_BYTES + 1))
    with pytest.raises(BangerError, match="not valid JSON"):
        m.parse(b"<html>")
    with pytest.raises(BangerError, match="not a JSON object"):
        m.parse(b"[]")


def test_fetch_bytes_caps_file_urls(tmp_path: Path) -> None:
    f = tmp_path / "manifest.json"
    f.write_bytes(b"x" * 11)
    assert m.fetch_bytes(f.as_uri(), 11) == b"x" * 11
    with pytest.raises(BangerError, match="more than 10 bytes"):
        m.fetch_bytes(f.as_uri(), 10)
    with pytest.raises(BangerError, match="scheme 'ftp'"):
        m.fetch_bytes("ftp://example/manifest.json", 10)


def test_version_order() -> None:
    ordered = ["0.1.0", "0.2.0-alpha", "0.2.0-alpha.1", "0.2.0-alpha.beta", "0.2.0-beta.2", "0.2.0-beta.11",
               "0.2.0-rc.1", "0.2.0", "0.10.0", "1.0.0"]
    assert sorted(reversed(ordered), key=m.version_key) == ordered
    assert m.version_key("0.1.0.dev0") < m.version_key("0.0.1")  # a development build is older than any release
    assert m.is_stable("1.2.3") and not m.is_stable("1.2.3-rc.1") and not m.is_stable("0.1.0.dev0")
    assert m.normalize_version("v1.2.3") == "1.2.3"
    for bad in ("1.2", "01.2.3", "1.2.3+build", "1.2.3-", "v", ""):
        with pytest.raises(BangerError):
            m.normalize_version(bad)


def test_check_lines() -> None:
    assert apply.check_line("0.2.0", "0.2.0", False) == ("up-to-date", "banger v0.2.0 is up to date")
    assert apply.check_line("0.3.0", "0.2.0", False) == (
        "up-to-date", "banger v0.3.0 is up to date (newer than the latest stable v0.2.0)")
    assert apply.check_line("0.1.0", "0.2.0", False) == (
        "available", "update available: v0.1.0 -> v0.2.0 (run `sudo banger update`)")
    # An explicit --to is offered even when it is older: that is a deliberate downgrade.
    assert apply.check_line("0.3.0", "0.2.0", True) == (
        "available", "update available: v0.3.0 -> v0.2.0 (run `sudo banger update --to v0.2.0`)")
