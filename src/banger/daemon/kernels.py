"""The kernel service: pull from the catalog (coalescing concurrent pulls of one name), delete."""

from __future__ import annotations

import asyncio
import logging
import shutil
from typing import TYPE_CHECKING, Any

from banger import model
from banger.errors import BadRequest, NotFound

if TYPE_CHECKING:
    from banger.daemon.app import Daemon
    from banger.daemon.ops import Reporter

log = logging.getLogger("banger.kernels")


class KernelService:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self._locks: dict[str, asyncio.Lock] = {}

    def catalog_entry(self, name: str) -> Any:
        from banger.kernels import catalog

        model.validate_artifact_name("kernel", name)
        entry = catalog.load_catalog().get(name)
        if entry is None:
            raise NotFound(f"no kernel named {name!r} in banger's catalog",
                           hint="see `banger kernel list --available`")
        return entry

    async def pull(self, name: str, rep: Reporter) -> dict[str, Any]:
        from banger.kernels import catalog
        from banger.store import kernels as rows

        entry = self.catalog_entry(name)
        if not isinstance(entry, catalog.DebianKernel):
            raise BadRequest(f"kernel {name!r} is of kind {entry.kind!r}, which this version cannot pull yet",
                             hint="use a Debian archive kernel such as debian-12-cloud")
        async with self._locks.setdefault(name, asyncio.Lock()):
            cfg = self.d.config
            layout = self.d.layout

            def progress(done: int, total: int | None) -> None:
                rep.detail(f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB")

            rep.stage("downloading and verifying")
            artifacts = await asyncio.to_thread(
                catalog.pull_debian_kernel, entry, cfg.kernel_mirror, layout.kernel_dir(name),
                cfg.max_download_bytes, cache_dir=layout.downloads_dir, progress=progress)
            rep.stage("registering")
            m = artifacts.manifest
            record = model.KernelRecord(
                name=name, distro=str(m["distro"]), arch=str(m["arch"]), kernel_version=str(m["kernel_version"]),
                source=str(m["source"]), sha256=str(m["sha256"]), imported_at=str(m["imported_at"]),
                vmlinux_path=str(artifacts.vmlinux), kernel_path=str(artifacts.vmlinuz),
                initrd_path=str(artifacts.initrd), modules_path="")
            rows.upsert_kernel(self.d.store, record)
            log.info("kernel pulled", extra={"kernel": name, "version": record.kernel_version})
            return record.to_json()

    async def delete(self, name: str) -> None:
        from banger.store import images as image_rows
        from banger.store import kernels as rows

        kernel = rows.get_kernel(self.d.store, name)
        users = [img.name for img in image_rows.list_images(self.d.store) if img.kernel_ref == kernel.name]
        if users:
            raise BadRequest(f"kernel {name!r} is used by image(s) {', '.join(sorted(users))}",
                             hint="delete those images first")
        async with self._locks.setdefault(name, asyncio.Lock()):
            rows.delete_kernel(self.d.store, name)
            await asyncio.to_thread(shutil.rmtree, self.d.layout.kernel_dir(name), True)
