"""`image pull <registry ref>`: an OCI image from a registry turned into a bootable banger image.

resolve (tag -> index -> the linux/amd64 manifest) -> config -> layers, each streamed once: from the
registry through a digest check into the cache and, in the same pass, into `flatten` (or from the
cache, re-checked on the way) -> mount points the init needs -> `mkfs.ext4 -d` -> owners and modes ->
banger's guest files, the first-boot script and busybox shims for tools the image lacks -> work seed
-> manifest.json. All rootless; the output matches `golden.build_golden`'s: rootfs.ext4,
work-seed.ext4 (optional) and manifest.json in `out_dir`.

A layer whose bytes do not match its digest fails the pull with that error even when `flatten`
choked on the bad bytes first, and never reaches the cache. On any failure `work_dir` and `out_dir`
are the caller's to remove, as with golden builds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, cast

from banger.errors import BadRequest, BangerError
from banger.images import ext4
from banger.images.flatten import flatten_layers
from banger.images.guestfiles import guest_files
from banger.images.inject import inject
from banger.images.oci import firstboot
from banger.images.oci import tree as tree_mod
from banger.images.oci.layout import BlobWriter, OciLayout
from banger.images.oci.manifest import (
    INDEX_TYPES,
    Descriptor,
    ImageConfig,
    Manifest,
    effective_media_type,
    parse,
    parse_config,
    select_platform,
)
from banger.images.oci.reference import Reference, default_image_name, parse_reference
from banger.images.oci.registry import (
    FetchedManifest,
    RegistryClient,
    docker_config_path,
    load_docker_credentials,
)
from banger.images.oci.verify import DigestMismatch, SizeMismatch, VerifyingReader, check_bytes
from banger.images.progress import BuildReporter, Silent
from banger.images.workseed import build_work_seed

log = logging.getLogger("banger.images.oci.pull")

DEFAULT_MAX_BYTES = 16 << 30
_PROGRESS_EVERY = 0.25




class Canceled(BangerError):
    def __init__(self) -> None:
        super().__init__("image pull canceled")


@dataclass(frozen=True)
class PulledImage:
    name: str
    reference: str  # normalised, as given (tag or digest)
    digest: str  # of the linux/amd64 image manifest
    directory: Path
    rootfs: Path
    work_seed: Path | None
    manifest_path: Path
    manifest: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Resolved:
    top: FetchedManifest  # what the reference points at (an index or a manifest)
    manifest: Manifest
    digest: str  # of `manifest`
    config: ImageConfig


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------ resolve


def _manifest(client: RegistryClient, cache: OciLayout, ref: Reference, desc: Descriptor | None) -> FetchedManifest:
    """The manifest `desc` points at (from the cache when there), or what `ref`'s tag names now (`desc` None).

    A descriptor with size -1 (a digest from the reference itself) is checked by digest only.
    """
    if desc is not None:
        what = f"manifest {ref.name}@{desc.digest}"
        cached = cache.read_bytes(desc, what)
        if cached is not None:
            return FetchedManifest(cached, effective_media_type(cached, desc.media_type or None), desc.digest)
        fetched = client.fetch_manifest(ref, desc.digest)
        check_bytes(fetched.body, desc.digest, desc.size if desc.size >= 0 else None, what)
    else:
        fetched = client.fetch_manifest(ref)
    cache.put_bytes(fetched.digest, fetched.body, f"manifest {fetched.digest}")
    return fetched


def resolve(client: RegistryClient, cache: OciLayout, ref: Reference, max_bytes: int) -> _Resolved:
    """Follow `ref` to one linux/amd64 image manifest and its config, all verified and cached.

    A tag is always asked of the registry (tags move); anything named by digest may come from the cache.
    """
    top = _manifest(client, cache, ref, Descriptor("", ref.digest, -1) if ref.digest is not None else None)
    current, digest = top, top.digest
    for _ in range(3):  # an index may (rarely) point at another index
        doc = parse(current.body, current.media_type, max_bytes)
        if isinstance(doc, Manifest):
            break
        entry = select_platform(doc)
        current = _manifest(client, cache, ref, entry)
        digest = entry.digest
    else:
        raise BadRequest(f"{ref}: image indexes nest deeper than 3 levels")
    config_what = f"image config {doc.config.digest[:19]}… of {ref}"
    body = cache.read_bytes(doc.config, config_what)
    if body is None:
        body = client.fetch_blob_bytes(ref, doc.config, config_what)
        cache.put_bytes(doc.config.digest, body, config_what)
    return _Resolved(top, doc, digest, parse_config(body, len(doc.layers)))


# ------------------------------------------------------------------------------------------- layers


class _LayerFeed:
    """Layers for `flatten_layers`, one open stream at a time, each verified when flatten is done with it."""

    def __init__(self, client: RegistryClient, cache: OciLayout, ref: Reference, layers: tuple[Descriptor, ...],
                 reporter: BuildReporter, cancel: threading.Event | None) -> None:
        self.client, self.cache, self.ref, self.layers = client, cache, ref, layers
        self.reporter, self.cancel = reporter, cancel
        self.total = sum(d.size for d in layers)
        self.done = 0
        self.fetched = 0
        self._last = 0.0
        self.reader: VerifyingReader | None = None
        self._stack: contextlib.ExitStack | None = None
        self._writer: BlobWriter | None = None
        self._cached: Path | None = None

    def _progress(self, n: int) -> None:
        self.done += n
        if self.cancel is not None and self.cancel.is_set():
            raise Canceled()
        now = time.monotonic()
        if now - self._last >= _PROGRESS_EVERY:
            self._last = now
            self.reporter.detail(f"{self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB")

    def __iter__(self) -> Iterator[tuple[str, BinaryIO]]:
        for index, desc in enumerate(self.layers, 1):
            if self.cancel is not None and self.cancel.is_set():
                raise Canceled()
            self._open(index, desc)
            yield desc.digest, cast(BinaryIO, self.reader)
            self._complete()

    def _open(self, index: int, desc: Descriptor) -> None:
        stack = contextlib.ExitStack()
        self._stack = stack
        what = f"layer {index} ({desc.digest[:19]}…) of {self.ref}"
        if self.cache.has_blob(desc):
            self._cached = self.cache.blob_path(desc.digest)
            handle = stack.enter_context(self._cached.open("rb"))

            def chunks() -> Iterator[bytes]:
                while chunk := handle.read(1 << 20):
                    yield chunk

            self.reader = VerifyingReader(chunks(), desc.digest, desc.size, what, on_chunk=self._progress)
            return
        writer = self.cache.writer(desc)
        self._writer = writer
        stack.callback(writer.abort)
        self.fetched += desc.size
        self.reader = stack.enter_context(
            self.client.open_blob(self.ref, desc, what, sink=writer.file, on_chunk=self._progress))

    def _complete(self) -> None:
        if self.reader is not None:
            self.reader.finish()
            if self._writer is not None:
                self._writer.commit(self.reader)
        self.close()

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack, self._writer, self._cached, self.reader = None, None, None, None

    def explain(self, error: BaseException) -> BaseException:
        """The error to report for a failed flatten: a digest mismatch of the open layer if there is one.

        Tampered bytes often break the tar or gzip stream before the end of the layer, where the digest
        check would have caught them; the digest is the more truthful complaint.
        """
        real = error
        reader, cached = self.reader, self._cached
        if reader is not None and not reader.verified and isinstance(error, (BadRequest, DigestMismatch,
                                                                              SizeMismatch)):
            try:
                reader.finish()
            except (DigestMismatch, SizeMismatch) as exc:
                real = exc
            except BangerError:
                pass
        if isinstance(real, (DigestMismatch, SizeMismatch)) and cached is not None:
            log.warning("cached blob %s is corrupt; deleted", cached)
            cached.unlink(missing_ok=True)
        self.close()
        return real


# ------------------------------------------------------------------------------------------ pull


@contextlib.contextmanager
def _deleting(tree: Path) -> Iterator[None]:
    """Delete `tree` in the background while the body runs (debugfs works on the finished image by
    then); the unpacked tree is as big as the image, so it goes as early as possible."""
    cleaner = threading.Thread(target=shutil.rmtree, args=(tree,), kwargs={"ignore_errors": True},
                               name="oci-tree-cleanup", daemon=True)
    cleaner.start()
    try:
        yield
    finally:
        cleaner.join()


def pull_image(ref: str | Reference, work_dir: Path, out_dir: Path, *, cache_dir: Path, kernel_ref: str,
               name: str | None = None, reporter: BuildReporter | None = None, cancel: threading.Event | None = None,
               max_bytes: int = DEFAULT_MAX_BYTES, client: RegistryClient | None = None,
               docker_config: Path | None = None, plain_http: Collection[str] = ()) -> PulledImage:
    """Pull `ref` into `out_dir` (rootfs.ext4, work-seed.ext4, manifest.json); scratch goes to `work_dir`.

    `max_bytes` caps each layer, all layers together (compressed) and the unpacked tree. `cache_dir`
    is the OCI layout (`Layout.oci_cache_dir`). Credentials come from `docker_config` (default
    ~/.docker/config.json) unless a ready `client` is given.
    """
    parsed = ref if isinstance(ref, Reference) else parse_reference(ref)
    image_name = name or default_image_name(parsed)
    rep: BuildReporter = reporter if reporter is not None else Silent()
    own_client = client is None
    if client is None:
        creds = load_docker_credentials(docker_config or docker_config_path())
        client = RegistryClient(credentials=creds, plain_http=plain_http)
    cache = OciLayout(cache_dir).ensure()
    try:
        with cache.in_use():
            return _pull(parsed, image_name, work_dir, out_dir, cache, client, rep, cancel, max_bytes, kernel_ref)
    finally:
        if own_client:
            client.close()


def _pull(ref: Reference, name: str, work_dir: Path, out_dir: Path, cache: OciLayout, client: RegistryClient,
          rep: BuildReporter, cancel: threading.Event | None, max_bytes: int, kernel_ref: str) -> PulledImage:
    timings: dict[str, float] = {}
    warnings: list[str] = []

    def checkpoint() -> None:
        if cancel is not None and cancel.is_set():
            raise Canceled()

    started = time.monotonic()
    rep.stage(f"resolving {ref}")
    resolved = resolve(client, cache, ref, max_bytes)
    layers = resolved.manifest.layers
    total = sum(d.size for d in layers)
    if total > max_bytes:
        raise BangerError(f"{ref}: its layers total {total} bytes, over the cap of {max_bytes} bytes")
    timings["resolve"] = time.monotonic() - started
    checkpoint()

    started = time.monotonic()
    rep.stage(f"fetching and unpacking {len(layers)} layer(s)")
    tree = work_dir / "rootfs"
    feed = _LayerFeed(client, cache, ref, layers, rep, cancel)
    try:
        metadata = flatten_layers(iter(feed), tree, max_bytes=max_bytes)
    except BaseException as exc:
        real = feed.explain(exc)
        if real is not exc:
            raise real from exc
        raise
    finally:
        feed.close()
    timings["layers"] = time.monotonic() - started
    log.info("%s: %d layer(s), %.1f MB fetched, %.1f MB from cache", ref, len(layers), feed.fetched / 1e6,
             (total - feed.fetched) / 1e6)
    checkpoint()

    tree_mod.add_mount_points(tree, metadata, warnings)
    os_release = firstboot.parse_os_release(tree_mod.read_guest(tree, "/etc/os-release")
                                            or tree_mod.read_guest(tree, "/usr/lib/os-release"))
    missing = [tool for tool in ("sshd", "python3") if not tree_mod.has_tool(tree, tool)]
    manager = firstboot.manager_for(os_release)
    if missing and manager is None:
        warnings.append(f"the image lacks {' and '.join(missing)} and banger knows no package manager for it "
                        f"(os-release ID {os_release.get('ID', 'missing')!r}); VMs will not be reachable over SSH")
    extra_files = [*firstboot.guest_files(), *tree_mod.shims(tree, warnings)]

    started = time.monotonic()
    rep.stage("making ext4")
    rootfs = out_dir / "rootfs.ext4"
    rep.detail("mkfs.ext4")
    ext4.build_ext4(tree, rootfs, label="rootfs")
    with _deleting(tree):
        checkpoint()
        rep.detail("owners and modes")
        ext4.apply_metadata(rootfs, metadata)
        timings["ext4"] = time.monotonic() - started
        checkpoint()

        started = time.monotonic()
        rep.stage("injecting guest files")
        inject(rootfs, [*guest_files(), *extra_files])
        timings["inject"] = time.monotonic() - started
        checkpoint()

        started = time.monotonic()
        rep.stage("work seed")
        seed: Path | None = out_dir / "work-seed.ext4"
        if not build_work_seed(rootfs, out_dir / "work-seed.ext4", work_dir):
            seed = None
        timings["work_seed"] = time.monotonic() - started

    top = resolved.top
    cache.record(str(ref), Descriptor(top.media_type, top.digest, len(top.body)))
    for warning in warnings:
        log.warning("%s: %s", ref, warning)
    manifest: dict[str, Any] = {
        "name": name,
        "source": "oci",
        "reference": str(ref),
        "registry": ref.domain,
        "repository": ref.repository,
        "digest": resolved.digest,
        "index_digest": top.digest if top.media_type in INDEX_TYPES else "",
        "platform": "linux/amd64",
        "layers": [d.digest for d in layers],
        "distro": os_release.get("ID", ""),
        "os_release": {k: os_release[k] for k in ("ID", "ID_LIKE", "VERSION_ID", "PRETTY_NAME") if k in os_release},
        "arch": "amd64",
        "kernel_ref": kernel_ref,
        "init": "fast",
        "first_boot": {"installs": missing, "package_manager": manager or ""},
        "config": resolved.config.to_json(),
        "pulled_at": _now(),
        "work_seed": seed is not None,
        "warnings": warnings,
    }
    manifest_path = out_dir / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log.info("OCI image %s pulled from %s: %s", name, ref,
             ", ".join(f"{step} {secs:.1f}s" for step, secs in timings.items()))
    return PulledImage(name=name, reference=str(ref), digest=resolved.digest, directory=out_dir, rootfs=rootfs,
                       work_seed=seed, manifest_path=manifest_path, manifest=manifest, timings=timings)
