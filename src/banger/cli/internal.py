"""`banger internal install-vhost-vsock`: a maintainer/setup step that runs here, not in the daemon."""

from __future__ import annotations

import argparse
import sys
import time


def cmd_install_vhost_vsock(args: argparse.Namespace) -> int:
    from pathlib import Path

    from banger import config
    from banger.cli.lifecycle import target
    from banger.system import hosttools

    tool = hosttools.VHOST_VSOCK
    mirror = config.load(target().layout).kernel_mirror
    tty = sys.stderr.isatty()
    label = tool.package

    def progress(done: int, total: int | None) -> None:
        if tty:  # one live line; a log or a pipe gets only the stage lines
            size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
            sys.stderr.write(f"\r\033[K{label}: downloading {size}")
            sys.stderr.flush()

    def stage(text: str) -> None:
        sys.stderr.write(f"{label}: {text}\n")
        sys.stderr.flush()

    started = time.monotonic()
    try:
        result = hosttools.install(tool, Path(args.dest).absolute(), mirror=mirror, suite=args.suite,
                                   allow_expired=args.allow_expired, progress=progress, stage=stage)
    finally:
        if tty:
            sys.stderr.write("\r\033[K")
    if result.expired_at is not None:
        sys.stderr.write(f"{label}: warning: {args.suite}'s Release expired at {result.expired_at:%Y-%m-%d %H:%M} "
                         "UTC; accepted because of --allow-expired\n")
    where = f"{result.package} {result.version} ({result.suite})"
    if result.changed:
        print(f"{where} installed at {result.path} ({result.deb_size / 1e6:.1f} MB download, "
              f"{time.monotonic() - started:.1f}s)")
    else:
        print(f"{where} is already installed at {result.path}; nothing to do")
    return 0
