"""generic-6.1: the shipped config, the source package from the verified archive index, and (marker
`slow`, deselected by default: about 7 minutes on 2 cores) the whole build through the real daemon."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from banger.kernels import build
from banger.kernels.catalog import SourceBuildKernel, load_catalog

SHARED_CONFIG = Path("/work/shared/firecracker/microvm-kernel-ci-x86_64-6.1.config")


def test_catalog_config_is_shipped() -> None:
    entry = load_catalog().get("generic-6.1")
    assert isinstance(entry, SourceBuildKernel)
    text = build.config_text(entry.config)
    assert text.startswith(b"#\n# Automatically generated file; DO NOT EDIT.\n")
    assert b"CONFIG_VIRTIO_BLK=y" in text and b"CONFIG_VIRTIO_VSOCKETS=y" in text
    if SHARED_CONFIG.is_file():
        assert hashlib.sha256(text).digest() == hashlib.sha256(SHARED_CONFIG.read_bytes()).digest()
    assert entry.package in build.SOURCE_SUITES


def test_unknown_config_is_refused() -> None:
    from banger.errors import NotFound

    with pytest.raises(NotFound, match=r"^kernel config 'nope' is not shipped with banger \(known: firecracker "):
        build.config_text("nope")


def test_missing_build_packages_names_debian_packages() -> None:
    assert set(build.missing_build_packages()) <= set(build.BUILD_PACKAGES)


@pytest.mark.network
def test_resolve_linux_source_from_the_signed_index(tmp_path: Path) -> None:
    pkg = build.resolve_source_package("http://deb.debian.org/debian", "bookworm", "linux-source-6.1",
                                       keyring=Path("/usr/share/keyrings/debian-archive-keyring.gpg"),
                                       work_dir=tmp_path)
    assert pkg.name == "linux-source-6.1" and pkg.version.startswith("6.1.")
    assert pkg.filename.startswith("pool/main/l/linux/linux-source-6.1_") and pkg.filename.endswith("_all.deb")
    assert len(pkg.sha256) == 64 and pkg.size > 100 << 20


@pytest.mark.slow
@pytest.mark.timeout(3 * 3600)
@pytest.mark.network
@pytest.mark.skipif(os.getuid() != 0, reason="embedded mode needs root")
def test_generic_61_builds_through_the_daemon() -> None:
    from tests.embedded import Embedded

    missing = build.missing_build_packages()
    if missing:
        pytest.skip(f"build tools missing: {', '.join(missing)} (scripts/setup installs them)")
    e = Embedded()
    try:
        pulled = json.loads(e.run("kernel", "pull", "generic-6.1", "--json", check=True, timeout=3 * 3600).stdout)
        kdir = e.state_dir / "kernels" / "generic-6.1"
        assert pulled["vmlinux_path"] == str(kdir / "vmlinux") and pulled["kernel_path"] == str(kdir / "vmlinuz")
        assert (kdir / "vmlinux").read_bytes()[:4] == b"\x7fELF"
        manifest = json.loads((kdir / "manifest.json").read_text())
        assert manifest["package"] == "linux-source-6.1" and manifest["kernel_version"].startswith("6.1.")
        assert manifest["config_sha256"] == hashlib.sha256(build.config_text(manifest["config"])).hexdigest()
        assert (kdir / "build.log").stat().st_size > 0
        assert not list((e.state_dir / "kernels").glob(".generic-6.1.*"))
    finally:
        e.close()
