"""The kernel service: pull from the catalog (coalescing concurrent pulls of one name), delete."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from banger import model
from banger.errors import BadRequest, NotFound

if TYPE_CHECKING:
    from banger.daemon.app import Daemon
    from banger.daemon.ops import Reporter
    from banger.kernels.catalog import SourceBuildKernel, TarballKernel
    from banger.kernels.tarball import InstalledKernel

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
        if isinstance(entry, catalog.TarballKernel):
            return await self._pull_tarball(entry, rep)
        if isinstance(entry, catalog.SourceBuildKernel):
            return await self._build_source(entry, rep)
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

    def _progress(self, rep: Reporter) -> Callable[[int, int | None], None]:
        def progress(done: int, total: int | None) -> None:
            rep.detail(f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB")

        return progress

    def _register(self, installed: InstalledKernel, kernel_path: str = "") -> model.KernelRecord:
        from banger.store import kernels as rows

        m = installed.manifest
        record = model.KernelRecord(
            name=str(m["name"]), distro=str(m["distro"]), arch=str(m["arch"]),
            kernel_version=str(m["kernel_version"]), source=str(m["source"]), sha256=str(m["sha256"]),
            imported_at=str(m["imported_at"]), vmlinux_path=str(installed.vmlinux), kernel_path=kernel_path,
            initrd_path=str(installed.initrd or ""), modules_path=str(installed.modules or ""))
        rows.upsert_kernel(self.d.store, record)
        return record

    async def _pull_tarball(self, entry: TarballKernel, rep: Reporter) -> dict[str, Any]:
        """A prebuilt `<name>-<arch>.tar.zst` (banger.kernels.tarball)."""
        from banger.kernels import tarball

        async with self._locks.setdefault(entry.name, asyncio.Lock()):
            rep.stage("downloading and verifying")
            installed = await asyncio.to_thread(
                tarball.pull_tarball_kernel, entry.name, entry.url, entry.sha256, entry.size,
                self.d.layout.kernel_dir(entry.name), self.d.config.max_download_bytes, distro=entry.distro,
                arch=entry.arch, kernel_version=entry.kernel_version, progress=self._progress(rep))
            rep.stage("registering")
            record = self._register(installed)
            log.info("kernel pulled", extra={"kernel": entry.name, "version": record.kernel_version})
            return record.to_json()

    async def _build_source(self, entry: SourceBuildKernel, rep: Reporter) -> dict[str, Any]:
        """Build from a Debian source package with a shipped config (banger.kernels.build); minutes."""
        import contextlib
        import threading

        from banger.kernels import build

        async with self._locks.setdefault(entry.name, asyncio.Lock()):
            loop = asyncio.get_running_loop()
            cancel = threading.Event()
            layout = self.d.layout

            def stage(name: str) -> None:  # called from the build thread; Reporter.stage runs on the loop
                loop.call_soon_threadsafe(rep.stage, name)

            task = asyncio.ensure_future(asyncio.to_thread(
                build.build_source_kernel, entry, self.d.config.kernel_mirror, layout.kernel_dir(entry.name),
                self.d.config.max_download_bytes, log_path=layout.kernels_dir / f".{entry.name}.build.log",
                cache_dir=layout.downloads_dir, stage=stage,
                detail=rep.detail, cancel=cancel))
            try:
                installed = await asyncio.shield(task)
            except asyncio.CancelledError:
                cancel.set()  # the thread stops make and cleans up; wait for it before returning
                with contextlib.suppress(BaseException):
                    await task
                raise
            rep.stage("registering")
            record = self._register(installed, kernel_path=str(installed.directory / "vmlinuz"))
            log.info("kernel built", extra={"kernel": entry.name, "version": record.kernel_version})
            return record.to_json()

    async def import_dir(self, name: str, source: str, *, distro: str, arch: str,
                         kernel_version: str) -> dict[str, Any]:
        """`kernel import`: a maintainer's local build (vmlinux, initrd.img, modules/) into the store."""
        from banger.kernels import tarball

        model.validate_artifact_name("kernel", name)
        async with self._locks.setdefault(name, asyncio.Lock()):
            installed = await asyncio.to_thread(
                tarball.import_kernel, name, Path(source), self.d.layout.kernel_dir(name), distro=distro,
                arch=arch, kernel_version=kernel_version, max_bytes=self.d.config.max_download_bytes)
            record = self._register(installed)
            log.info("kernel imported", extra={"kernel": name, "version": kernel_version})
            return record.to_json()
