"""The image service: pull from the catalog (coalescing concurrent pulls of one name), delete.

A pull builds in `<images_dir>/.<name>.staging-*` (scratch in `.<name>.work-*` next to it), renames
the staging directory to `<images_dir>/<image id>/` and only then inserts the row; any failure or
cancellation removes whatever it made, so a failed pull leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from banger import model
from banger.errors import AlreadyExists, BadRequest, NotFound

if TYPE_CHECKING:
    from banger.daemon.app import Daemon
    from banger.daemon.ops import Reporter
    from banger.images.catalog import BundleImage, CatalogEntry, GoldenImage
    from banger.images.golden import GoldenResult
    from banger.images.oci.pull import PulledImage
    from banger.images.oci.reference import Reference
    from banger.images.register import RegisterSpec

_T = TypeVar("_T")

log = logging.getLogger("banger.images")

# The kernel OCI images boot with unless `--kernel-ref` says otherwise (the golden images' kernel).
DEFAULT_OCI_KERNEL = "debian-12-cloud"


class _ThreadReporter:
    """Lets the building thread report: `Reporter.stage` must run on the event loop."""

    def __init__(self, rep: Reporter, loop: asyncio.AbstractEventLoop) -> None:
        self._rep = rep
        self._loop = loop

    def stage(self, name: str) -> None:
        self._loop.call_soon_threadsafe(self._rep.stage, name)

    def detail(self, text: str) -> None:
        self._rep.detail(text)


@dataclass(frozen=True)
class _Built:
    """What a builder left in the staging dir: file names there, where it came from, manifest extras."""

    rootfs: str
    work_seed: str | None
    source: str
    extra: dict[str, Any]


async def _in_thread(fn: Callable[[], _T], cancel: threading.Event) -> _T:
    """Run a blocking build in a thread. A thread cannot be killed: on cancel, ask it to stop and wait
    for it, so nothing writes into the staging dir after it has been cleaned up."""
    task = asyncio.ensure_future(asyncio.to_thread(fn))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        cancel.set()
        with contextlib.suppress(BaseException):
            await task
        raise


class ImageService:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def catalog_entry(self, name: str) -> CatalogEntry:
        from banger.images import catalog

        model.validate_artifact_name("image", name)
        try:
            return catalog.load_catalog().get(name)
        except NotFound as exc:
            raise NotFound(exc.message, hint="a local image is pulled once; see `banger image list`") from exc

    async def pull(self, name: str, rep: Reporter) -> dict[str, Any]:
        from banger.images import catalog
        from banger.store import kernels as kernel_rows

        entry = self.catalog_entry(name)
        if not isinstance(entry, catalog.GoldenImage | catalog.BundleImage):
            raise BadRequest(f"image {name!r} is of kind {entry.kind!r}, which this version cannot pull yet",
                             hint="use a golden image such as debian-bookworm")
        async with self._lock(name):
            self._refuse_existing(name)
            if entry.kernel_ref not in {k.name for k in kernel_rows.list_kernels(self.d.store)}:
                rep.stage(f"pulling kernel {entry.kernel_ref}")
                await self.d.kernels.pull(entry.kernel_ref, rep)
            if isinstance(entry, catalog.BundleImage):
                record = await self._build_bundle(entry, rep)
            else:
                record = await self._build_golden(entry, rep)
            log.info("image pulled", extra={"image": name, "image_id": record.id})
            return record.to_json()

    def _refuse_existing(self, name: str) -> None:
        from banger.store import images as rows

        with contextlib.suppress(NotFound):
            existing = rows.get_image_by_name(self.d.store, name)
            raise AlreadyExists(f"image {name!r} already exists (id {existing.id[:model.SHORT_ID_LEN]})",
                                hint=f"run `banger image delete {name}` first to build it again")

    async def _build(self, name: str, kernel_ref: str, rep: Reporter,
                     produce: Callable[[Path, Path], Awaitable[_Built]]) -> model.ImageRecord:
        """Build into a staging dir next to the store, then rename it into place and insert the row;
        any failure (or cancel) removes everything, so nothing half-built is ever left."""
        from banger.store import db
        from banger.store import images as rows

        layout = self.d.layout
        layout.images_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=layout.images_dir))
        work = Path(tempfile.mkdtemp(prefix=f".{name}.work-", dir=layout.images_dir))
        final: Path | None = None
        try:
            built = await produce(work, staging)
            rep.stage("registering")
            image_id = model.new_id()
            os.chmod(staging, 0o755)  # mkdtemp made it 0700; the VMM (maybe jailed) reads these files
            final = layout.image_dir(image_id)
            os.rename(staging, final)
            record = model.ImageRecord(
                id=image_id, name=name, managed=True, rootfs_path=str(final / built.rootfs),
                kernel_path="", initrd_path="", modules_path="",
                work_seed_path=str(final / built.work_seed) if built.work_seed else "",
                kernel_ref=kernel_ref, source=built.source, created_at=db.utc_now(),
                extra={"init": "fast", **built.extra})
            rows.insert_image(self.d.store, record)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, staging, True)
            if final is not None:
                await asyncio.to_thread(shutil.rmtree, final, True)
            raise
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
        return record

    async def _build_golden(self, entry: GoldenImage, rep: Reporter) -> model.ImageRecord:
        from banger.images import golden

        variant = golden.GoldenVariant(name=entry.name, suite=entry.suite, variant=entry.variant,
                                       kernel_ref=entry.kernel_ref, arch=entry.arch)

        async def produce(work: Path, staging: Path) -> _Built:
            cancel = threading.Event()
            reporter = _ThreadReporter(rep, asyncio.get_running_loop())
            result: GoldenResult = await _in_thread(lambda: golden.build_golden(
                variant, self.d.config.kernel_mirror, work, staging, cache_dir=self.d.layout.downloads_dir,
                reporter=reporter, cancel=cancel), cancel)
            return _Built(result.rootfs.name, result.work_seed.name if result.work_seed is not None else None,
                          f"golden:{entry.name}", dict(result.manifest))

        return await self._build(entry.name, entry.kernel_ref, rep, produce)

    async def _build_bundle(self, entry: BundleImage, rep: Reporter) -> model.ImageRecord:
        """A catalog bundle: bounded download, hash before extraction, then the work seed (images.bundle)."""
        from banger.images import bundle
        from banger.images.workseed import build_work_seed

        def progress(done: int, total: int | None) -> None:
            rep.detail(f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB")

        async def produce(work: Path, staging: Path) -> _Built:
            rep.stage("downloading and verifying")
            manifest = await asyncio.to_thread(
                bundle.pull_bundle, entry.url, entry.sha256, entry.size, work, staging,
                self.d.config.max_download_bytes, progress=progress)
            rep.stage("work seed")
            seed = staging / "work-seed.ext4"
            has_seed = await asyncio.to_thread(build_work_seed, staging / bundle.ROOTFS, seed, work)
            return _Built(bundle.ROOTFS, seed.name if has_seed else None, f"bundle:{entry.url}",
                          {"bundle_sha256": entry.sha256, "bundle_manifest": manifest})

        return await self._build(entry.name, entry.kernel_ref, rep, produce)

    async def pull_oci(self, ref: str, rep: Reporter, *, name: str | None = None,
                       kernel_ref: str | None = None) -> dict[str, Any]:
        """`image pull <registry>/<repo>:<tag>|@sha256:...`: a container image made bootable (images.oci)."""
        from banger.images.oci.reference import default_image_name, parse_reference
        from banger.store import kernels as kernel_rows

        parsed = parse_reference(ref)
        image_name = model.validate_artifact_name("image", name or default_image_name(parsed))
        kernel = kernel_ref or DEFAULT_OCI_KERNEL
        async with self._lock(image_name):
            self._refuse_existing(image_name)
            if kernel not in {k.name for k in kernel_rows.list_kernels(self.d.store)}:
                self.d.kernels.catalog_entry(kernel)  # NotFound for a kernel that is neither pulled nor known
                rep.stage(f"pulling kernel {kernel}")
                await self.d.kernels.pull(kernel, rep)
            record = await self._build_oci(parsed, image_name, kernel, rep)
            log.info("OCI image pulled", extra={"image": image_name, "image_id": record.id, "ref": str(parsed)})
            return record.to_json()

    async def _build_oci(self, ref: Reference, name: str, kernel_ref: str, rep: Reporter) -> model.ImageRecord:
        from banger.images.oci import pull as oci_pull
        from banger.images.oci.registry import docker_config_path

        async def produce(work: Path, staging: Path) -> _Built:
            cancel = threading.Event()
            reporter = _ThreadReporter(rep, asyncio.get_running_loop())
            layout = self.d.layout
            result: PulledImage = await _in_thread(lambda: oci_pull.pull_image(
                ref, work, staging, cache_dir=layout.oci_cache_dir, kernel_ref=kernel_ref, name=name,
                reporter=reporter, cancel=cancel, max_bytes=self.d.config.max_download_bytes,
                docker_config=docker_config_path(layout.owner_home)), cancel)
            return _Built(result.rootfs.name, result.work_seed.name if result.work_seed is not None else None,
                          f"oci:{result.reference}", dict(result.manifest))

        return await self._build(name, kernel_ref, rep, produce)

    async def register(self, name: str, spec: RegisterSpec) -> model.ImageRecord:
        """`image register`: an unmanaged image made of host files (banger.images.register)."""
        from banger.images.register import check_spec
        from banger.store import db
        from banger.store import images as rows
        from banger.store import kernels as kernel_rows

        model.validate_artifact_name("image", name)
        checked = await asyncio.to_thread(check_spec, spec)
        if checked.kernel_ref and checked.kernel_ref not in {k.name for k in kernel_rows.list_kernels(self.d.store)}:
            raise NotFound(f"no kernel named {checked.kernel_ref!r} is stored",
                           hint="run `banger kernel list` (or `banger kernel pull <name>`)")
        async with self._lock(name):
            self._refuse_existing(name)
            record = model.ImageRecord(
                id=model.new_id(), name=name, managed=False, rootfs_path=checked.rootfs,
                kernel_path=checked.kernel, initrd_path=checked.initrd, modules_path=checked.modules,
                work_seed_path="", kernel_ref=checked.kernel_ref, source="register", created_at=db.utc_now(),
                extra={"init": "fast"})
            rows.insert_image(self.d.store, record)
        log.info("image registered", extra={"image": name, "image_id": record.id})
        return record

    async def promote(self, ref: str) -> model.ImageRecord:
        """`image promote`: copy an unmanaged image's files into its own managed directory."""
        import dataclasses

        from banger.images.register import RegisterSpec, copy_artifacts
        from banger.images.workseed import build_work_seed
        from banger.store import images as rows

        image = model.resolve_ref(ref, rows.list_images(self.d.store), kind="image")
        if image.managed:
            raise BadRequest(f"image {image.name!r} is already managed")
        layout = self.d.layout
        layout.images_dir.mkdir(parents=True, exist_ok=True)
        async with self._lock(image.name):
            staging = Path(tempfile.mkdtemp(prefix=f".{image.name}.staging-", dir=layout.images_dir))
            final: Path | None = None
            try:
                spec = RegisterSpec(rootfs=image.rootfs_path, kernel_ref=image.kernel_ref, kernel=image.kernel_path,
                                    initrd=image.initrd_path, modules=image.modules_path)
                copied = await asyncio.to_thread(copy_artifacts, spec, staging)
                seed = staging / "work-seed.ext4"
                has_seed = await asyncio.to_thread(build_work_seed, staging / "rootfs.ext4", seed, staging)
                os.chmod(staging, 0o755)
                final = layout.image_dir(image.id)
                os.rename(staging, final)

                def moved(path: str) -> str:
                    return str(final / Path(path).name) if path else ""

                record = dataclasses.replace(
                    image, managed=True, rootfs_path=moved(copied.rootfs), kernel_path=moved(copied.kernel),
                    initrd_path=moved(copied.initrd), modules_path=moved(copied.modules),
                    work_seed_path=str(final / seed.name) if has_seed else "",
                    extra={**image.extra, "promoted_from": image.rootfs_path})
                rows.update_image(self.d.store, record)
            except BaseException:
                await asyncio.to_thread(shutil.rmtree, staging, True)
                if final is not None:
                    await asyncio.to_thread(shutil.rmtree, final, True)
                raise
        log.info("image promoted", extra={"image": image.name, "image_id": image.id})
        return record

    async def delete(self, ref: str) -> model.ImageRecord:
        from banger.store import images as rows

        image = model.resolve_ref(ref, rows.list_images(self.d.store), kind="image")
        async with self._lock(image.name):
            users = rows.vms_using_image(self.d.store, image.id)
            if users:
                raise BadRequest(f"image {image.name!r} is used by {len(users)} vm(s): "
                                 f"{', '.join(vm.name for vm in users)}", hint="delete those vms first")
            directory = self.d.layout.image_dir(image.id)
            aside: Path | None = None
            if image.managed and directory.exists():
                # Out of the way first, so a refused delete (a VM created meanwhile) can put it back.
                aside = directory.with_name(f".{image.id}.deleting-{secrets.token_hex(4)}")
                os.rename(directory, aside)
            try:
                rows.delete_image(self.d.store, image.id)  # re-checks the users atomically
            except BaseException:
                if aside is not None:
                    os.rename(aside, directory)
                raise
            if aside is not None:
                await asyncio.to_thread(shutil.rmtree, aside, True)
            log.info("image deleted", extra={"image": image.name, "image_id": image.id})
            return image
