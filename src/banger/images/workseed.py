"""The work seed: a small ext4 holding the image's /root, copied onto each new VM's work disk.

Every VM mounts its own work disk at /root, which hides the image's /root; the seed carries the
image's dotfiles (.bashrc, .profile, .ssh/) over. It is built without mounting: `debugfs rdump`
out of the root filesystem, then `ext4.write_files` into a fresh image, everything root-owned with
the original modes. Symlinks and special files are skipped. A missing seed only means an empty
/root in new VMs, so failures are logged and reported as False, never raised.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

from banger.errors import BangerError
from banger.images import ext4
from banger.images.inject import GuestFile, inject

log = logging.getLogger("banger.images.workseed")

MIN_SIZE = 64 * ext4.MIB
LABEL = "work"


def _collect(tree: Path) -> tuple[list[GuestFile], int]:
    """The directories and regular files under `tree` as guest paths below "/", and their byte total."""
    files: list[GuestFile] = []
    total = 0
    for root, dirs, names in os.walk(tree):
        dirs.sort()
        rel = os.path.relpath(root, tree)
        guest_dir = "/" if rel == "." else "/" + rel.replace(os.sep, "/")
        for name in [*sorted(dirs), *sorted(names)]:
            host = Path(root) / name
            info = host.lstat()
            guest = f"{guest_dir.rstrip('/')}/{name}"
            if stat.S_ISDIR(info.st_mode):
                files.append(GuestFile(guest, None, stat.S_IMODE(info.st_mode), kind="dir"))
            elif stat.S_ISREG(info.st_mode):
                data = host.read_bytes()
                total += len(data)
                files.append(GuestFile(guest, data, stat.S_IMODE(info.st_mode)))
            else:
                log.debug("work seed: skipping %s (not a directory or regular file)", guest)
    return files, total


def build_work_seed(rootfs: Path, out: Path, work_dir: Path) -> bool:
    """Make `out` an ext4 image with the contents of /root in `rootfs`; False (and no `out`) on failure."""
    tmp: Path | None = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix="work-seed-", dir=work_dir))
        tree = ext4.rdump(rootfs, "/root", tmp)
        files, total = _collect(tree)
        ext4.make_empty_ext4(out, max(MIN_SIZE, total * 2), label=LABEL)
        inject(out, files)
    except (BangerError, OSError) as exc:
        log.warning("work seed not built from %s: %s", rootfs, exc)
        out.unlink(missing_ok=True)
        return False
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("work seed %s: %d entries, %d bytes of files", out, len(files), total)
    return True
