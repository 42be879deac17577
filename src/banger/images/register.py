"""`image register` (an unmanaged image made of host files) and `image promote` (copy it into the store).

A registered image boots either with a stored kernel (`kernel_ref`) or with an explicit kernel file,
optional initrd and optional modules directory; the two are mutually exclusive. Paths are resolved to
absolute ones (symlinks followed) and checked when registering; the files stay where they are and
belong to the user. Promotion copies them into a daemon-owned image directory (the rootfs sparse) and
builds a work seed, after which the image no longer depends on the host files.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from banger.errors import BadRequest

ROOTFS = "rootfs.ext4"
KERNEL = "vmlinux"
INITRD = "initrd.img"
MODULES = "modules"


@dataclass(frozen=True)
class RegisterSpec:
    rootfs: str
    kernel_ref: str = ""
    kernel: str = ""
    initrd: str = ""
    modules: str = ""


def _resolve(flag: str, value: str, *, directory: bool = False) -> str:
    if not os.path.isabs(value):
        raise BadRequest(f"{flag} {value!r} must be an absolute path")
    path = Path(value).resolve()
    if directory and not path.is_dir():
        raise BadRequest(f"{flag} {value!r} is not a directory")
    if not directory and not path.is_file():
        raise BadRequest(f"{flag} {value!r} is not a file")
    return str(path)


def check_spec(spec: RegisterSpec) -> RegisterSpec:
    """The spec with every path resolved and checked; the kernel choice must be exactly one of the two."""
    triple = [flag for flag, value in (("--kernel", spec.kernel), ("--initrd", spec.initrd),
                                       ("--modules", spec.modules)) if value]
    if spec.kernel_ref and triple:
        raise BadRequest(f"--kernel-ref and {'/'.join(triple)} are mutually exclusive",
                         hint="use a stored kernel (--kernel-ref) or kernel files (--kernel [--initrd] [--modules])")
    if not spec.kernel_ref and not spec.kernel:
        if triple:
            raise BadRequest(f"{'/'.join(triple)} need --kernel")
        raise BadRequest("one of --kernel-ref or --kernel is required",
                         hint="run `banger kernel list` to see the stored kernels")
    return RegisterSpec(
        rootfs=_resolve("--rootfs", spec.rootfs),
        kernel_ref=spec.kernel_ref,
        kernel=_resolve("--kernel", spec.kernel) if spec.kernel else "",
        initrd=_resolve("--initrd", spec.initrd) if spec.initrd else "",
        modules=_resolve("--modules", spec.modules, directory=True) if spec.modules else "",
    )


def copy_artifacts(spec: RegisterSpec, dest: Path) -> RegisterSpec:
    """Copy the files of `spec` into the directory `dest`; returns the spec of the copies."""
    from banger.images.bundle import write_sparse

    for flag, value in (("rootfs", spec.rootfs), ("kernel", spec.kernel), ("initrd", spec.initrd)):
        if value and not Path(value).is_file():
            raise BadRequest(f"cannot promote: the {flag} {value!r} is gone")
    if spec.modules and not Path(spec.modules).is_dir():
        raise BadRequest(f"cannot promote: the modules directory {spec.modules!r} is gone")
    with open(spec.rootfs, "rb") as source:
        write_sparse(source, dest / ROOTFS, 1 << 62, spec.rootfs)
    kernel = initrd = modules = ""
    if spec.kernel:
        kernel = str(shutil.copyfile(spec.kernel, dest / KERNEL))
    if spec.initrd:
        initrd = str(shutil.copyfile(spec.initrd, dest / INITRD))
    if spec.modules:
        modules = str(shutil.copytree(spec.modules, dest / MODULES, symlinks=True))
    return RegisterSpec(rootfs=str(dest / ROOTFS), kernel_ref=spec.kernel_ref, kernel=kernel, initrd=initrd,
                        modules=modules)
