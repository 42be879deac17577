"""Guest kernels: the embedded catalog, and turning distribution kernel packages into boot artifacts.

* `catalog`: the catalog (`catalog.json`) and `pull_debian_kernel`, which writes a kernel directory.
* `debian`: signature-verified lookup and download of a Debian kernel package.
* `vmlinux`: the ELF kernel (PVH entry) out of a bzImage.
* `initrd`: the busybox mini initramfs that loads the virtio modules.

Nothing is imported here: the CLI imports this package at start-up only when it needs it.
"""
