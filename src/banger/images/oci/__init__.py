"""OCI images from registries: references, a registry v2 client, a layout cache and the pull pipeline.

`pull.pull_image` turns `<registry>/<repo>:<tag>` (or `@sha256:...`) into the same bundle a golden
image build produces (rootfs.ext4, work-seed.ext4, manifest.json), rootless: resolve the manifest,
fetch every blob verified against its digest into `<cache>/oci`, replay the layers with
`images.flatten`, build and fix the ext4 with `images.ext4`, inject banger's guest files.
"""
