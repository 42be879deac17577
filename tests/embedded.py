"""An isolated embedded-mode banger (root, no system install) for integration tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BANGER = [sys.executable, "-m", "banger"]


class Embedded:
    """Throw-away XDG directories; `run()` invokes the real CLI; `close()` stops the services."""

    def __init__(self) -> None:
        # Short base path: Unix socket paths are limited to 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="bgr-"))
        self.env = dict(
            os.environ,
            HOME=str(self.root / "home"),
            XDG_CONFIG_HOME=str(self.root / "cfg"),
            XDG_STATE_HOME=str(self.root / "state"),
            XDG_CACHE_HOME=str(self.root / "cache"),
            XDG_RUNTIME_DIR=str(self.root / "run"),
            NO_COLOR="1",
        )
        self.env.pop("BANGER_SYSTEM_PREFIX", None)
        (self.root / "home").mkdir()
        (self.root / "run").mkdir(mode=0o700)

    @property
    def state_dir(self) -> Path:
        return self.root / "state/banger"

    @property
    def runtime_dir(self) -> Path:
        return self.root / "run/banger"

    @property
    def config_file(self) -> Path:
        return self.root / "cfg/banger/config.toml"

    def run(
        self, *args: str, check: bool = False, timeout: float = 60, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*BANGER, *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=REPO, **kw
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"banger {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def python(self, code: str) -> str:
        """Run Python with this environment (e.g. to seed the store through the real store module)."""
        return subprocess.run(
            [sys.executable, "-c", code], env=self.env, capture_output=True, text=True, check=True
        ).stdout

    def pids(self) -> dict[str, int]:
        found = {}
        for name, pidfile in (("bangerd", "bangerd.pid"), ("bangerd-root", "bangerd-root.pid")):
            with contextlib.suppress(FileNotFoundError, ValueError):
                found[name] = int((self.runtime_dir / pidfile).read_text().strip())
        return found

    def close(self) -> None:
        self.run("system", "stop", timeout=30)
        deadline = time.monotonic() + 10
        for pid in self.pids().values():
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours is not alive.
    with contextlib.suppress(FileNotFoundError):
        return " Z " not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:4]
    return False


SEED_VMS = """
from banger import model, paths
from banger.store import db, vms
layout = paths.resolve_user()
store = db.open_db(layout.db_path)
for i, name in enumerate({names!r}):
    now = db.utc_now()
    spec = model.VmSpec(vcpu=2, memory_mib=1024, disk_size_bytes=8 << 30, system_overlay_size_bytes=8 << 30)
    vms.insert_vm(store, model.VmRecord(id=model.new_id(), name=name, image_id="img", image_name="debian-bookworm",
        state=model.VmState.STOPPED, spec=spec, guest_ip=f"172.16.0.{{i + 2}}", created_at=now, updated_at=now))
"""
