"""Device nodes the owner's VMMs open, on hosts where nothing else sets their modes.

A persistent tap is owned by the owner uid, but attaching to it still means opening /dev/net/tun. udev's
default rule (systemd's 50-udev-default.rules: `KERNEL=="tun", MODE="0666"`) makes that node
world-openable on every udev host; opening it grants nothing by itself (a tap can be attached only by its
owner, a new one made only with CAP_NET_ADMIN). Hosts without udev (containers, minimal VMs, this CI
machine) keep devtmpfs's 0600, and then no VM of a system install could start. The helper, which is
root, applies udev's mode there, once at start, and logs that it did.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

TUN: Final = Path("/dev/net/tun")
UDEV_RUN: Final = Path("/run/udev")  # exists while udev (systemd-udevd or eudev) manages /dev
TUN_MODE: Final = 0o666


def ensure_tun_mode(owner_uid: int, tun: Path = TUN, udev_run: Path = UDEV_RUN) -> str | None:
    """Give `tun` udev's default mode where no udev does; a sentence saying what changed, or None."""
    if owner_uid == 0 or udev_run.exists():
        return None  # root needs no mode bits; where udev runs, its rules (and the admin's) decide
    try:
        st = os.stat(tun, follow_symlinks=False)
    except OSError:
        return None
    if not stat.S_ISCHR(st.st_mode) or stat.S_IMODE(st.st_mode) & TUN_MODE == TUN_MODE:
        return None
    before = stat.S_IMODE(st.st_mode)
    os.chmod(tun, stat.S_IMODE(st.st_mode) | TUN_MODE)  # lstat said: a device node, not a link
    return f"{tun} was {before:04o} with no udev to set it; made it {TUN_MODE:04o} as udev's default rule does"
