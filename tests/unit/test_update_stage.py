"""Release archives: exact contents, safe wheel unpacking, and staging into a real virtualenv.

The archives here are small and synthetic (a stub "banger" wheel whose commands print a version and
exit with a chosen status), so every refusal can be produced precisely; the integration tests stage
real releases built from this checkout.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from banger.errors import BangerError
from banger.update import release, stage
from banger.update.stage import ReleaseInfo

PY = f"{sys.version_info.major}.{sys.version_info.minor}"

STUB = '''\
import os, sys
VERSION = "0.5.0"
def cli():
    print(f"banger v{VERSION} (commit stub)")
    return 0
def daemon():
    print("stub migrations line")
    return int(os.environ.get("STUB_MIGRATIONS", "0"))
'''


def make_wheel(dist: str, version: str, files: dict[str, bytes], entry_points: str | None = None,
               symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    info_dir = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{info_dir}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        zf.writestr(f"{info_dir}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        if entry_points is not None:
            zf.writestr(f"{info_dir}/entry_points.txt", entry_points)
        if symlink is not None:
            zi = zipfile.ZipInfo(symlink)
            zi.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(zi, "/etc/passwd")
        zf.writestr(f"{info_dir}/RECORD", "")
    return buf.getvalue()


def banger_wheel(version: str = "0.5.0") -> bytes:
    return make_wheel("banger", version, {"bgstub/__init__.py": STUB.replace("0.5.0", version).encode()},
                      "[console_scripts]\nbanger = bgstub:cli\nbangerd = bgstub:daemon\n")


def dep_wheel() -> bytes:
    return make_wheel("dep", "1.0", {
        "dep/__init__.py": b"X = 1\n",
        "dep-1.0.data/purelib/dep_extra.py": b"Y = 2\n",
        "dep-1.0.data/scripts/dep-tool": b"#!/bin/sh\n",
    })


def write_release(path: Path, wheels: dict[str, bytes], *, version: str = "0.5.0", python: str = PY,
                  listed: dict[str, bytes] | None = None) -> Path:
    """A well-formed archive of `wheels`; `listed` (default: the same) is what release.json declares."""
    wheel_dir = path.parent / "wheels-src"
    wheel_dir.mkdir(exist_ok=True)
    for name, data in wheels.items():
        (wheel_dir / name).write_bytes(data)
    declared = listed if listed is not None else wheels
    info = ReleaseInfo(version, "c0ffee", "2026-01-01T00:00:00Z", python,
                       tuple((n, hashlib.sha256(d).hexdigest()) for n, d in sorted(declared.items())))
    if listed is None:
        release.write_archive(path, info, wheel_dir, 0)
        return path
    with tarfile.open(path, "w:gz") as tar:
        add(tar, "release.json", (json.dumps(info.to_json()) + "\n").encode())
        for name, data in wheels.items():
            add(tar, f"wheels/{name}", data)
    return path


def add(tar: tarfile.TarFile, name: str, data: bytes | None = None, kind: bytes = tarfile.REGTYPE,
        linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if data is not None:
        info.size = len(data)
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


WHEELS = {"banger-0.5.0-py3-none-any.whl": banger_wheel(), "dep-1.0-py3-none-any.whl": dep_wheel()}


def repack(src: Path, dst: Path, *, drop: str | None = None,
           extra: list[tuple[str, bytes | None, bytes, str]] | None = None) -> Path:
    with tarfile.open(src, "r:gz") as tin, tarfile.open(dst, "w:gz") as tout:
        for member in tin:
            if member.name != drop:
                tout.addfile(member, tin.extractfile(member) if member.isfile() else None)
        for name, data, kind, linkname in extra or []:
            add(tout, name, data, kind, linkname)
    return dst


def test_exact_contents_are_accepted(tmp_path: Path) -> None:
    archive = write_release(tmp_path / "r.tar.gz", WHEELS)
    info, wheels = stage.read_archive(archive)
    assert info.version == "0.5.0" and info.python == PY
    assert info.banger_wheel == "banger-0.5.0-py3-none-any.whl"
    assert set(wheels) == set(WHEELS)
    with tarfile.open(archive) as tar:
        assert tar.getnames() == ["release.json", "wheels", "wheels/banger-0.5.0-py3-none-any.whl",
                                  "wheels/dep-1.0-py3-none-any.whl"]


@pytest.mark.parametrize(
    ("drop", "extra", "message"),
    [
        (None, [("evil.sh", b"rm -rf /", tarfile.REGTYPE, "")], "unexpected entry 'evil.sh'"),
        (None, [("wheels/x-1.0-py3-none-any.whl", b"zip", tarfile.REGTYPE, "")],
         "unexpected entry 'wheels/x-1.0-py3-none-any.whl'"),
        (None, [("lib", None, tarfile.DIRTYPE, "")], "unexpected directory 'lib'"),
        (None, [("../escape.whl", b"x", tarfile.REGTYPE, "")], "unexpected entry '../escape.whl'"),
        (None, [("/abs.whl", b"x", tarfile.REGTYPE, "")], "unexpected entry"),
        (None, [("wheels/link.whl", None, tarfile.SYMTYPE, "/etc/passwd")], "not a regular file"),
        (None, [("wheels/hard.whl", None, tarfile.LNKTYPE, "release.json")], "not a regular file"),
        (None, [("release.json", b"{}", tarfile.REGTYPE, "")], "appears twice"),
        ("wheels/dep-1.0-py3-none-any.whl", None, "missing 'wheels/dep-1.0-py3-none-any.whl'"),
        ("release.json", None, "missing release.json"),
    ],
)
def test_inexact_contents_are_refused(tmp_path: Path, drop: str | None,
                                      extra: list[tuple[str, bytes | None, bytes, str]] | None,
                                      message: str) -> None:
    good = write_release(tmp_path / "good.tar.gz", WHEELS)
    bad = repack(good, tmp_path / "bad.tar.gz", drop=drop, extra=extra)
    with pytest.raises(BangerError, match=message):
        stage.read_archive(bad)


def test_wheel_digest_must_match_release_json(tmp_path: Path) -> None:
    listed = dict(WHEELS)
    listed["dep-1.0-py3-none-any.whl"] = b"something else"
    archive = write_release(tmp_path / "r.tar.gz", WHEELS, listed=listed)
    with pytest.raises(BangerError, match=r"dep-1.0-py3-none-any.whl has sha256 .*release.json says"):
        stage.read_archive(archive)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"format": 2}, "format 2"),
        ({"version": "../x"}, "characters outside"),
        ({"wheels": []}, "lists no wheels"),
        ({"wheels": [{"file": "dep-1.0-py3-none-any.whl", "sha256": "a" * 64}]}, "exactly one banger wheel"),
        ({"wheels": [{"file": "../banger.whl", "sha256": "a" * 64}]}, "bad wheel file name"),
        ({"wheels": [{"file": "banger-1-py3-none-any.whl", "sha256": "A" * 64}]}, "has no sha256"),
    ],
)
def test_release_json_is_strict(raw: dict[str, object], message: str) -> None:
    good = {"format": 1, "version": "0.5.0", "commit": "c", "built_at": "t", "python": "3.11",
            "wheels": [{"file": "banger-0.5.0-py3-none-any.whl", "sha256": "a" * 64}]}
    with pytest.raises(BangerError, match=message):
        stage.parse_release_json(json.dumps({**good, **raw}).encode())


def test_unpack_wheel_maps_data_dirs_and_skips_scripts(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    assert stage.unpack_wheel(dep_wheel(), "dep.whl", site) == "dep-1.0.dist-info"
    assert (site / "dep/__init__.py").read_text() == "X = 1\n"
    assert (site / "dep_extra.py").read_text() == "Y = 2\n"
    assert not (site / "dep-tool").exists() and not (site / "dep-1.0.data").exists()
    assert (site / "dep-1.0.dist-info/METADATA").is_file()


@pytest.mark.parametrize("name", ["../evil.py", "/abs.py", "a/../../b.py", "a\\b.py", "./x.py"])
def test_unpack_wheel_refuses_unsafe_paths(tmp_path: Path, name: str) -> None:
    with pytest.raises(BangerError, match="unsafe path"):
        stage.unpack_wheel(make_wheel("bad", "1", {name: b"x"}), "bad.whl", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unpack_wheel_refuses_symlinks_and_non_zips(tmp_path: Path) -> None:
    with pytest.raises(BangerError, match="is a symlink"):
        stage.unpack_wheel(make_wheel("bad", "1", {}, symlink="bad/link"), "bad.whl", tmp_path)
    with pytest.raises(BangerError, match="not a zip archive"):
        stage.unpack_wheel(b"not a zip", "bad.whl", tmp_path)
    with pytest.raises(BangerError, match=r"exactly one .dist-info"):
        stage.unpack_wheel(make_wheel("a", "1", {"b-1.dist-info/METADATA": b""}), "two.whl", tmp_path)


def test_stage_makes_a_venv_with_launchers_and_sanity_checks(tmp_path: Path) -> None:
    archive = write_release(tmp_path / "r.tar.gz", WHEELS)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    staged = stage.stage(archive, digest, tmp_path / "versions", python=sys.executable)
    assert staged.directory == tmp_path / "versions" / f"0.5.0-{digest[:12]}"
    launcher = staged.program("banger").read_text()
    assert launcher.splitlines()[0] == f"#!{staged.directory}/bin/python3 -I"
    assert os.access(staged.program("bangerd"), os.X_OK)
    assert json.loads((staged.directory / "release.json").read_text())["version"] == "0.5.0"
    site = staged.directory / "lib" / f"python{PY}" / "site-packages"
    assert (site / "dep_extra.py").is_file() and (site / "bgstub/__init__.py").stat().st_mode & 0o777 == 0o644
    assert stage.sanity_check(staged, {"STUB_MIGRATIONS": "1"}) == "stub migrations line"
    with pytest.raises(BangerError, match="cannot use this host's database: stub migrations line"):
        stage.sanity_check(staged, {"STUB_MIGRATIONS": "2"})
    with pytest.raises(BangerError, match="check-migrations failed \\(exit status 3\\)"):
        stage.sanity_check(staged, {"STUB_MIGRATIONS": "3"})
    with pytest.raises(FileExistsError):
        stage.stage(archive, digest, tmp_path / "versions", python=sys.executable)


def test_staged_version_must_name_itself(tmp_path: Path) -> None:
    wheels = {"banger-0.5.0-py3-none-any.whl": banger_wheel("0.4.9"), "dep-1.0-py3-none-any.whl": dep_wheel()}
    archive = write_release(tmp_path / "r.tar.gz", wheels)
    staged = stage.stage(archive, "b" * 64, tmp_path / "versions", python=sys.executable)
    with pytest.raises(BangerError, match=r"does not run as v0.5.0: banger v0.4.9"):
        stage.sanity_check(staged, {})


def test_stage_refuses_another_python_and_leaves_nothing(tmp_path: Path) -> None:
    archive = write_release(tmp_path / "r.tar.gz", WHEELS, python="2.7")
    with pytest.raises(BangerError, match=f"built for Python 2.7, but .* is Python {PY}"):
        stage.stage(archive, "c" * 64, tmp_path / "versions", python=sys.executable)
    assert not (tmp_path / "versions").exists() or list((tmp_path / "versions").iterdir()) == []
    with pytest.raises(BangerError, match=r"contains version '0.5.0', not '0.6.0'"):
        stage.stage(write_release(tmp_path / "s.tar.gz", WHEELS), "d" * 64, tmp_path / "versions",
                    expect_version="0.6.0")
