"""`bangerd`: the owner daemon. Never root in a system install."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from banger import buildinfo, paths
from banger.errors import BangerError

log = logging.getLogger("banger.daemon")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bangerd", description="banger owner daemon")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--system", action="store_true", help="use the system install layout (/var/lib/banger, ...)")
    p.add_argument("--check-migrations", action="store_true",
                   help="print whether the database needs migrations; exit 0 ok, 1 needed, 2 newer than this binary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.version:
        print(buildinfo.current().one_line("bangerd"))
        return 0
    if args.check_migrations:
        from banger.daemon.check_migrations import check_migrations

        code, line = check_migrations(args.system)
        print(line)
        return code
    try:
        return asyncio.run(_run(args.system))
    except BangerError as exc:
        print(f"bangerd: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


async def _run(system: bool) -> int:
    from banger import config as config_mod
    from banger import log as blog
    from banger.daemon.app import Daemon, serve
    from banger.roothelper.client import HelperClient
    from banger.store.db import open_db
    from banger.system import installmeta

    if system:
        meta = installmeta.read()
        if meta is None:
            raise BangerError(f"no system install ({paths.system_install_meta()} is missing)",
                              hint="run `sudo banger system install --owner <user>`")
        if os.getuid() == 0:
            raise BangerError("refusing to run as root in a system install; bangerd runs as the owner "
                              f"{meta.owner_user!r} (uid {meta.owner_uid})")
        if os.getuid() != meta.owner_uid:
            raise BangerError(f"uid {os.getuid()} is not the install owner {meta.owner_user!r} "
                              f"(uid {meta.owner_uid})")
        layout = paths.resolve_system(meta.owner_home)
        owner_uid = meta.owner_uid
    else:
        layout = paths.resolve_user()
        owner_uid = os.getuid()
    config = config_mod.load(layout)
    blog.setup_service_logging(config.log_level, None if system else layout.daemon_log)
    paths.ensure_private_dir(layout.state_dir)
    store = open_db(layout.db_path)
    daemon = Daemon(
        layout=layout,
        config=config,
        store=store,
        helper=HelperClient(layout.helper_socket, system=system),
        helper_socket=layout.helper_socket,
        owner_uid=owner_uid,
    )
    await serve(daemon, layout.daemon_socket)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
