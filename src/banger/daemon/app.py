"""The owner daemon's composition root: layout, config, store, root-helper seam, RPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from banger import paths
from banger.daemon.ops import OperationRegistry
from banger.rpc.server import PeerCred, RpcServer

if TYPE_CHECKING:
    from banger.config import Config
    from banger.roothelper.client import PrivilegedOps
    from banger.store.db import Store

log = logging.getLogger("banger.daemon")


@dataclass
class Daemon:
    layout: paths.Layout
    config: Config
    store: Store
    helper: PrivilegedOps
    helper_socket: Path
    owner_uid: int
    ops: OperationRegistry = field(default_factory=OperationRegistry)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def authorize(self, peer: PeerCred) -> str | None:
        # The socket is 0600 and owned by the owner; this is the second lock on the door.
        if peer.uid in (self.owner_uid, 0):
            return None
        return f"uid {peer.uid} is not allowed to use this daemon (owner uid is {self.owner_uid})"


async def serve(daemon: Daemon, socket_path: Path) -> None:
    from banger.daemon.api import build_handlers

    server = RpcServer(
        "bangerd",
        build_handlers(daemon),
        authorize=daemon.authorize,
        trust_op_id=False,
        logger=log,
    )
    paths.ensure_private_dir(socket_path.parent)
    await server.start(socket_path)
    pidfile = daemon.layout.daemon_pidfile
    pidfile.write_text(f"{os.getpid()}\n")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stopping.set)
    log.info("bangerd listening", extra={"socket": str(socket_path), "mode": daemon.layout.mode,
                                          "uid": os.getuid()})
    try:
        await daemon.stopping.wait()
    finally:
        log.info("bangerd stopping")
        await server.close()
        await daemon.ops.cancel_all()
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()
