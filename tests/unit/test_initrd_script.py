"""The initramfs's module loading, run by a real busybox sh: `<module>.<param>=` words on the kernel
command line reach that module's insmod, the way modprobe would pass them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from banger.kernels.initrd import INIT_SCRIPT

BUSYBOX = shutil.which("busybox")


@pytest.mark.skipif(BUSYBOX is None, reason="needs busybox (apt install busybox-static)")
def test_module_parameters_from_the_kernel_command_line(tmp_path: Path) -> None:
    assert BUSYBOX is not None
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 root=/dev/vda "
                       "virtio_mmio.device=4K@0xd0001000:6 virtio_blk.queue_depth=64 ro\n")
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "load-order").write_text("kernel/drivers/virtio/virtio_mmio.ko\nvirtio_blk.ko.xz\nvsock.ko\n")
    log = tmp_path / "insmod.log"
    # The one stand-in: insmod records its arguments instead of loading into this host's kernel (a shell
    # function, since busybox sh runs its own applets before anything on PATH).
    stub = f'insmod() {{ echo "$*" >>{log}; }}\n'
    loop = INIT_SCRIPT[INIT_SCRIPT.index("read -r cmdline"):INIT_SCRIPT.index("root=/dev/vda;")]
    script = loop.replace("/proc/cmdline", str(cmdline)).replace("/lib/modules/", f"{modules}/")
    proc = subprocess.run([BUSYBOX, "sh", "-c", stub + script], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().splitlines() == [
        f"{modules}/kernel/drivers/virtio/virtio_mmio.ko device=4K@0xd0000000:5 device=4K@0xd0001000:6",
        f"{modules}/virtio_blk.ko.xz queue_depth=64",
        f"{modules}/vsock.ko",
    ]
