#!/usr/bin/env python3
"""OCI pull: registry image -> bootable ext4, banger's pipeline next to skopeo + umoci + mkfs.ext4.

One run starts its own docker-registry on 127.0.0.1, pushes a realistic image to it (a Debian
bookworm minbase root file system split into three gzip layers: /usr, the rest, and a "slim" layer
that whites out the documentation, as Debian's -slim images do), then times, interleaved, N times each
(median reported):

  banger    pull_image(): resolve, fetch + verify + cache + unpack every layer in one pass,
            mkfs.ext4 -d, owners and modes with debugfs, guest files, work seed (a cold cache each run)
  baseline  skopeo copy docker://... oci:DIR  +  umoci unpack --rootless  +  mkfs.ext4 -d
            (same image size; this leaves every file owned by the builder, banger's output does not)

The rootfs tarball comes from /var/tmp/banger-test-cache/oci-bench (built there with mmdebstrap if
missing; --tarball takes any rootfs .tar or .tar.zst, e.g. the golden image's cached tarball).

Usage: .venv/bin/python bench/oci_pull.py [--runs 3] [--tarball PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import logging
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from tests.integration.oci_fixtures import Layer, LayoutBuilder, LocalRegistry  # noqa: E402

from banger.images.oci.pull import pull_image  # noqa: E402

CACHE = Path("/var/tmp/banger-test-cache/oci-bench")
MINBASE = CACHE / "debian-bookworm-minbase.tar"
MIRROR = "http://deb.debian.org/debian"


def ensure_minbase() -> Path:
    if MINBASE.exists():
        return MINBASE
    CACHE.mkdir(parents=True, exist_ok=True)
    part = CACHE / ".debian-bookworm-minbase.tar.part"
    print(f"building {MINBASE} with mmdebstrap (once) ...", flush=True)
    subprocess.run(["mmdebstrap", "--variant=minbase", "--format=tar", "--quiet",
                    '--customize-hook=rm -rf "$1"/var/lib/apt/lists/*', "bookworm", str(part), MIRROR], check=True)
    part.rename(MINBASE)
    return MINBASE


def open_tar(path: Path) -> tarfile.TarFile:
    if path.name.endswith(".zst"):
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(path.open("rb"), read_across_frames=True)
        return tarfile.open(fileobj=reader, mode="r|")
    return tarfile.open(path, mode="r|*")


def split_layers(tarball: Path) -> list[Layer]:
    """usr/ | everything else | a slim layer (opaque doc and man dirs, one new file); gzip like docker."""
    bufs = [io.BytesIO(), io.BytesIO()]
    placed: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        outs = [stack.enter_context(tarfile.open(fileobj=b, mode="w", format=tarfile.PAX_FORMAT)) for b in bufs]
        src = stack.enter_context(open_tar(tarball))
        for member in src:
            name = member.name.lstrip("./")
            index = 0 if name == "usr" or name.startswith("usr/") else 1
            if member.islnk():  # a hardlink must come after its target: in the same or a later layer
                index = max(index, placed.get(member.linkname.lstrip("./"), 1))
            placed[name] = index
            data = src.extractfile(member) if member.isreg() else None
            outs[index].addfile(member, data)
    slim = io.BytesIO()
    with tarfile.open(fileobj=slim, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in ("usr/share/doc/.wh..wh..opq", "usr/share/man/.wh..wh..opq", "usr/share/info/.wh..wh..opq"):
            tar.addfile(tarfile.TarInfo(path))
        motd = b"banger bench image\n"
        info = tarfile.TarInfo("etc/motd")
        info.size = len(motd)
        tar.addfile(info, io.BytesIO(motd))
    raws = [bufs[0].getvalue(), bufs[1].getvalue(), slim.getvalue()]
    return [Layer(raw, gzip.compress(raw, compresslevel=6, mtime=0)) for raw in raws]


def run(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def banger_pull(ref: str, run_dir: Path) -> tuple[float, dict[str, float], int]:
    """Seconds for a cold pull_image, its stage timings, and the image size."""
    work, out = run_dir / "b-work", run_dir / "b-out"
    for d in (work, out):
        d.mkdir(parents=True)
    start = time.perf_counter()
    result = pull_image(ref, work, out, cache_dir=run_dir / "b-cache" / "oci", kernel_ref="bench",
                        docker_config=run_dir / "none.json")
    return time.perf_counter() - start, result.timings, result.rootfs.stat().st_size


def baseline(ref: str, run_dir: Path, image_size: int) -> tuple[float, float, float]:
    """Seconds for skopeo copy, umoci unpack --rootless, and mkfs.ext4 -d into an image of `image_size`."""
    oci, bundle, img = run_dir / "oci", run_dir / "bundle", run_dir / "base.ext4"
    copy = run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}", f"oci:{oci}:bench"])
    unpack = run(["umoci", "unpack", "--rootless", "--image", f"{oci}:bench", str(bundle)])
    start = time.perf_counter()
    with img.open("wb") as f:
        f.truncate(image_size)
    run(["mkfs.ext4", "-q", "-F", "-L", "rootfs", "-d", str(bundle / "rootfs"), "-E", "root_owner=0:0", str(img)])
    return copy, unpack, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tarball", type=Path, help="rootfs .tar or .tar.zst (default: Debian minbase)")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where both pipelines write")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for tool in ("docker-registry", "skopeo", "umoci", "mkfs.ext4", "debugfs"):
        if shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin") is None:
            print(f"oci_pull: {tool} is missing (scripts/setup installs it)", file=sys.stderr)
            return 1
    tarball = args.tarball or ensure_minbase()
    work = Path(tempfile.mkdtemp(prefix="bgr-oci-bench-", dir=args.dir))
    registry = LocalRegistry(work / "registry")
    try:
        t0 = time.perf_counter()
        layers = split_layers(tarball)
        layout = LayoutBuilder(work / "layout")
        layout.tag("bench", layout.image(layers, config={"Cmd": ["/bin/bash"]}))
        registry.start()
        ref = registry.push(layout.root, "bench", "bench/debian")
        unpacked = sum(len(x.tar) for x in layers) / 1e6
        packed = sum(len(x.blob) for x in layers) / 1e6
        print(f"image: {tarball.name}, 3 layers, {packed:.0f} MB compressed / {unpacked:.0f} MB unpacked "
              f"(prepared in {time.perf_counter() - t0:.1f}s); {args.runs} runs each, interleaved")

        banger_times: list[float] = []
        base_times: list[float] = []
        stages: dict[str, list[float]] = {}
        steps: dict[str, list[float]] = {"skopeo copy": [], "umoci unpack": [], "mkfs.ext4 -d": []}
        for i in range(args.runs):
            run_dir = work / f"run{i}"
            secs, timings, image_size = banger_pull(ref, run_dir)
            banger_times.append(secs)
            for stage, value in timings.items():
                stages.setdefault(stage, []).append(value)
            parts = baseline(ref, run_dir, image_size)
            for key, value in zip(steps, parts, strict=True):
                steps[key].append(value)
            base_times.append(sum(parts))
            print(f"  run {i + 1}: banger {banger_times[-1]:.2f}s   baseline {base_times[-1]:.2f}s", flush=True)
            shutil.rmtree(run_dir, ignore_errors=True)

        banger, base = statistics.median(banger_times), statistics.median(base_times)
        print("banger:   " + ", ".join(f"{k} {statistics.median(v):.2f}s" for k, v in stages.items()))
        print("baseline: " + ", ".join(f"{k} {statistics.median(v):.2f}s" for k, v in steps.items()))
        print(f"median banger pull -> ext4:                 {banger:.2f} s")
        print(f"median skopeo copy + umoci unpack + mkfs:   {base:.2f} s")
        print(f"ratio: {banger / base:.2f}x (target <= 1.2x)")
        return 0
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
