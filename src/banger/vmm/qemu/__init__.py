"""The QEMU backend: `-M microvm` argv (`argv`), the QMP client (`qmp`), and `QemuVmm` (`backend`)."""
