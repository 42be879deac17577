"""`banger ssh-config [--install|--uninstall]`"""

from __future__ import annotations

import argparse

from banger.cli.lifecycle import target
from banger.guest import sshconfig


def cmd_ssh_config(args: argparse.Namespace) -> int:
    layout = target().layout
    if args.install:
        changed = sshconfig.install(layout, layout.ssh_key)
        where = sshconfig.user_ssh_config(layout)
        print(f"{'added' if changed else 'already present:'} Include {layout.ssh_config} in {where}")
        return 0
    if args.uninstall:
        changed = sshconfig.uninstall(layout)
        print("removed the banger block from ~/.ssh/config" if changed else "nothing to remove")
        return 0
    state = "installed" if sshconfig.is_installed(layout) else "not installed"
    print(f"banger ssh config: {layout.ssh_config}")
    print(f"include line:      Include {layout.ssh_config}   ({state} in ~/.ssh/config)")
    print("install with:      banger ssh-config --install")
    print("remove with:       banger ssh-config --uninstall")
    return 0
