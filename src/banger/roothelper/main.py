"""`bangerd-root`: the root helper process.

System mode (`--system`, under `bangerd-root.service`): the owner comes from /etc/banger/install.toml,
logs go to stderr (journald). Embedded mode (root runs banger without a system install, and tests):
the invoking user's layout, owner uid from `--owner-uid`, logs to the layout's helper log.
Either way the jail settings (jailer_bin, jailer_chroot_base) come from the layout's config.toml.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import socket
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from banger import __version__, config, paths
from banger import log as blog
from banger.errors import BangerError, ConfigError
from banger.roothelper import ops
from banger.rpc.server import Authorizer, CallContext, Handler, PeerCred, RpcServer

log = logging.getLogger("banger.roothelper")

SOCKET_DIR_MODE = 0o711  # owner daemon may traverse to the socket, but not list or write


@dataclass(frozen=True)
class Settings:
    mode: paths.Mode
    owner_uid: int
    socket_path: Path
    pidfile: Path
    roots: tuple[Path, ...]
    log_file: Path | None
    # The socket directory belongs to the helper alone, so its mode may be enforced.
    dedicated_socket_dir: bool
    owner_gid: int | None = None
    jailer_bin: str = "/usr/bin/jailer"
    chroot_base: str = ""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bangerd-root", description="banger root helper (privileged operations)")
    p.add_argument("--system", action="store_true",
                   help="system install: owner from install.toml, system layout, logs to stderr")
    p.add_argument("--owner-uid", type=int, metavar="UID",
                   help="uid allowed besides root (embedded mode only; default: the current uid)")
    p.add_argument("--socket", type=Path, metavar="PATH", help="listen here instead of the layout's helper socket")
    p.add_argument("--state-dir", type=Path, metavar="DIR", help="override the managed state directory")
    p.add_argument("--cache-dir", type=Path, metavar="DIR", help="override the managed cache directory")
    p.add_argument("--runtime-dir", type=Path, metavar="DIR", help="override the managed runtime directory")
    p.add_argument("--log-file", type=Path, metavar="PATH", help="write JSON logs here")
    p.add_argument("--log-level", metavar="LEVEL", help="debug, info, warn or error (default: info)")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


def _override_dir(flag: str, value: Path | None, default: Path) -> Path:
    if value is None:
        return default
    if not value.is_absolute() or value == Path("/"):
        raise ConfigError(f"{flag} {str(value)!r} must be an absolute directory other than /")
    return Path(os.path.normpath(value))


def resolve_settings(args: argparse.Namespace) -> Settings:
    owner_gid: int | None
    if args.system:
        from banger.system import installmeta

        if args.owner_uid is not None:
            raise ConfigError("--owner-uid cannot be combined with --system (the owner comes from install.toml)")
        meta = installmeta.read()
        if meta is None:
            raise ConfigError(f"no system install ({paths.system_install_meta()} is missing)",
                              hint="run `sudo banger system install --owner <user>`")
        layout = paths.resolve_system(meta.owner_home)
        owner_uid, owner_gid = meta.owner_uid, meta.owner_gid
    else:
        layout = paths.resolve_user()
        owner_uid = os.getuid() if args.owner_uid is None else args.owner_uid
        if owner_uid < 0:
            raise ConfigError(f"--owner-uid {owner_uid} must be a non-negative uid")
        owner_gid = _primary_gid(owner_uid)
    layout = dataclasses.replace(
        layout,
        state_dir=_override_dir("--state-dir", args.state_dir, layout.state_dir),
        cache_dir=_override_dir("--cache-dir", args.cache_dir, layout.cache_dir),
        runtime_dir=_override_dir("--runtime-dir", args.runtime_dir, layout.runtime_dir),
    )
    socket_path = layout.helper_socket if args.socket is None else Path(os.path.abspath(args.socket))
    if args.log_file is not None:
        log_file: Path | None = args.log_file
    else:
        log_file = None if args.system else layout.helper_log
    cfg = config.load(layout)
    return Settings(
        mode=layout.mode,
        owner_uid=owner_uid,
        socket_path=socket_path,
        pidfile=socket_path.with_suffix(".pid"),
        roots=layout.managed_roots(),
        log_file=log_file,
        dedicated_socket_dir=args.socket is None and layout.mode == "system",
        owner_gid=owner_gid,
        jailer_bin=str(cfg.jailer_bin),
        # The jailer resolves symlinks in the base; the helper checks and names the resolved path.
        chroot_base=os.path.realpath(cfg.jailer_chroot_base),
    )


def _primary_gid(uid: int) -> int | None:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return None


def authorizer(owner_uid: int) -> Authorizer:
    def authorize(peer: PeerCred) -> str | None:
        if peer.uid in (0, owner_uid):
            return None
        return f"uid {peer.uid} is not allowed to use the root helper (owner uid is {owner_uid})"

    return authorize


def prepare_socket_dir(directory: Path, *, dedicated: bool) -> None:
    """Root-owned 0711: the owner can reach the socket inside but nobody can plant files there."""
    created = False
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=SOCKET_DIR_MODE, parents=True)
        created = True
    st = directory.lstat()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise BangerError(f"socket directory {directory} is not a real directory; refusing to use it",
                          hint="remove it and retry")
    if st.st_uid != 0:
        raise BangerError(f"socket directory {directory} is owned by uid {st.st_uid}, not root; refusing to use it",
                          hint="remove it and retry")
    if created or dedicated:
        if stat.S_IMODE(st.st_mode) != SOCKET_DIR_MODE:
            os.chmod(directory, SOCKET_DIR_MODE)
    elif st.st_mode & 0o022:
        raise BangerError(f"socket directory {directory} is writable by group or others; refusing to use it",
                          hint="pass --socket in a directory of its own")


def _already_serving(socket_path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(socket_path))
        except OSError:
            return False
        return True


def _write_pidfile(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")


def _remove_if_ours(path: Path, inode: int | None) -> None:
    """Remove the socket/pidfile only if it is still the one we made (a successor may have replaced it)."""
    with contextlib.suppress(FileNotFoundError):
        if inode is None or path.lstat().st_ino == inode:
            path.unlink()


def _injected_fault(method: str) -> Handler:
    """Fault injection for tests (BANGER_TEST_FAULT=<method>): that method fails like a real one would."""

    async def fail(ctx: CallContext, params: dict[str, Any]) -> Any:
        raise BangerError(f"injected fault in {method} (BANGER_TEST_FAULT)")

    return fail


async def serve(settings: Settings) -> None:
    if _already_serving(settings.socket_path):
        raise BangerError(f"another bangerd-root is already serving {settings.socket_path}",
                          hint="stop it first, or pass another --socket")
    prepare_socket_dir(settings.socket_path.parent, dedicated=settings.dedicated_socket_dir)
    from banger.roothelper.devices import ensure_tun_mode

    with contextlib.suppress(OSError):
        changed = ensure_tun_mode(settings.owner_uid)
        if changed:
            log.warning(changed)
    cfg = ops.HelperConfig(owner_uid=settings.owner_uid, roots=settings.roots, owner_gid=settings.owner_gid,
                           chroot_base=settings.chroot_base, jailer_bin=settings.jailer_bin)
    handlers: dict[str, Handler] = {name: functools.partial(fn, cfg) for name, fn in ops.METHODS.items()}
    fault = os.environ.get("BANGER_TEST_FAULT", "")
    if fault in handlers:
        handlers[fault] = _injected_fault(fault)
    server = RpcServer("helper", handlers, authorize=authorizer(settings.owner_uid), trust_op_id=True,
                       logger=log, done_level=logging.INFO)
    await server.start(settings.socket_path, mode=0o600, owner_uid=settings.owner_uid)
    socket_inode = settings.socket_path.lstat().st_ino
    pid_inode: int | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        _write_pidfile(settings.pidfile)
        pid_inode = settings.pidfile.lstat().st_ino
        log.info("bangerd-root started", extra={
            "version": __version__, "pid": os.getpid(), "mode": settings.mode, "owner_uid": settings.owner_uid,
            "socket": str(settings.socket_path), "managed_roots": [str(r) for r in settings.roots],
            "jailer_bin": settings.jailer_bin, "jailer_chroot_base": settings.chroot_base})
        await stop.wait()
        log.info("bangerd-root stopping")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await server.close()
        _remove_if_ours(settings.socket_path, socket_inode)
        if pid_inode is not None:
            _remove_if_ours(settings.pidfile, pid_inode)
    log.info("bangerd-root stopped")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.version:
        from banger import buildinfo

        print(buildinfo.current().one_line("bangerd-root"))
        return 0
    if os.geteuid() != 0:
        print("bangerd-root: must run as root", file=sys.stderr)
        return 2
    logging_ready = False
    try:
        settings = resolve_settings(args)
        blog.setup_service_logging(args.log_level, settings.log_file)
        logging_ready = True
        asyncio.run(serve(settings))
    except (BangerError, OSError) as exc:
        if logging_ready:
            log.error("bangerd-root failed", extra={"error": str(exc)})
        print(f"bangerd-root: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
