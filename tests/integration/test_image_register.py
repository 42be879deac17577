"""`image register` and `image promote` through the real CLI and daemon, with their exact errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger.errors import BadRequest
from banger.images import ext4
from tests.embedded import Embedded
from tests.tarballs import FAKE_VMLINUX

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="embedded mode needs root")


@pytest.fixture
def emb() -> Iterator[Embedded]:
    e = Embedded()
    try:
        yield e
    finally:
        e.close()


def _error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return re.sub(r" \(op-[0-9a-f]{6}\)$", "", lines[0])  # the daemon's operation id


@pytest.fixture
def files(tmp_path: Path) -> Path:
    ext4.make_empty_ext4(tmp_path / "rootfs.ext4", 64 << 20, label="rootfs")
    (tmp_path / "vmlinux").write_bytes(FAKE_VMLINUX)
    (tmp_path / "initrd.img").write_bytes(b"initrd")
    (tmp_path / "mods/6.1").mkdir(parents=True)
    (tmp_path / "mods/6.1/a.ko").write_bytes(b"ko")
    os.symlink("a.ko", tmp_path / "mods/6.1/b.ko")
    return tmp_path


def test_register_errors(emb: Embedded, files: Path) -> None:
    rootfs = str(files / "rootfs.ext4")
    err = _error(emb.run("image", "register", "--name", "x", "--rootfs", rootfs, "--kernel-ref", "k",
                         "--kernel", str(files / "vmlinux")))
    assert err == ("banger: --kernel-ref and --kernel are mutually exclusive; use a stored kernel (--kernel-ref) "
                   "or kernel files (--kernel [--initrd] [--modules])")
    # The daemon refuses the same, for RPC callers other than this CLI.
    from banger.images.register import RegisterSpec, check_spec

    with pytest.raises(BadRequest) as caught:
        check_spec(RegisterSpec(rootfs=rootfs, kernel_ref="k", initrd="/x", modules="/y"))
    assert caught.value.message == "--kernel-ref and --initrd/--modules are mutually exclusive"
    err = _error(emb.run("image", "register", "--name", "x", "--rootfs", rootfs))
    assert err == "banger: one of --kernel-ref or --kernel is required; run `banger kernel list` to see the stored kernels"
    err = _error(emb.run("image", "register", "--name", "x", "--rootfs", rootfs, "--kernel-ref", "nope"))
    assert err == "banger: not found: no kernel named 'nope' is stored; run `banger kernel list` (or `banger kernel pull <name>`)"
    err = _error(emb.run("image", "register", "--name", "x", "--rootfs", str(files / "missing.ext4"),
                         "--kernel", str(files / "vmlinux")))
    assert err == f"banger: --rootfs '{files / 'missing.ext4'}' is not a file"
    err = _error(emb.run("image", "register", "--name", "x", "--rootfs", rootfs, "--initrd",
                         str(files / "initrd.img")))
    assert err == "banger: --initrd need --kernel"
    assert json.loads(emb.run("image", "list", "--json", check=True).stdout) == []


def test_register_then_promote(emb: Embedded, files: Path) -> None:
    os.symlink(files / "rootfs.ext4", files / "link.ext4")
    reg = json.loads(emb.run("image", "register", "--name", "mine", "--rootfs", str(files / "link.ext4"), "--kernel",
                             str(files / "vmlinux"), "--initrd", str(files / "initrd.img"), "--modules",
                             str(files / "mods"), "--json", check=True).stdout)
    assert reg["managed"] is False and reg["source"] == "register"
    assert reg["rootfs_path"] == str(files / "rootfs.ext4")  # absolute, symlinks resolved
    assert reg["kernel_path"] == str(files / "vmlinux") and reg["modules_path"] == str(files / "mods")
    err = _error(emb.run("image", "register", "--name", "mine", "--rootfs", str(files / "rootfs.ext4"),
                         "--kernel", str(files / "vmlinux")))
    assert "image 'mine' already exists" in err

    promoted = json.loads(emb.run("image", "promote", "mine", "--json", check=True).stdout)
    image_dir = emb.state_dir / "images" / reg["id"]
    assert promoted["managed"] is True and promoted["id"] == reg["id"]
    assert promoted["rootfs_path"] == str(image_dir / "rootfs.ext4")
    assert promoted["kernel_path"] == str(image_dir / "vmlinux")
    assert promoted["initrd_path"] == str(image_dir / "initrd.img")
    assert os.readlink(image_dir / "modules/6.1/b.ko") == "a.ko"
    assert (image_dir / "rootfs.ext4").read_bytes() == (files / "rootfs.ext4").read_bytes()
    shown = json.loads(emb.run("image", "show", "mine", "--json", check=True).stdout)
    assert shown == promoted
    assert _error(emb.run("image", "promote", "mine")) == "banger: image 'mine' is already managed"
    # Managed now: deleting removes the copies, never the user's files.
    emb.run("image", "delete", "mine", check=True)
    assert not image_dir.exists() and (files / "rootfs.ext4").is_file()
