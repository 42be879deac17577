"""banger-first-boot in a real (busybox) root: package manager dispatch, install once, PID 1 hand-over.

The root is a directory with a static busybox; package managers are stubs that record their arguments
and "install" sshd and python3. Runs need root: chroot, and private mount and pid namespaces
(`unshare`) so the script's mounts never reach the host.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from banger.images.oci import firstboot

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chroot, unshare")]

STUB = """#!/bin/sh
echo "$0 $*" >>/stub.log
[ -e /stub.fail ] && exit 1
case "$*" in
    *install*|add*) for f in /usr/sbin/sshd /usr/bin/python3; do echo '#!/bin/sh' >"$f"; chmod 755 "$f"; done ;;
esac
exit 0
"""


def first_boot_tree(root: Path, os_release: str, *, stub: str = "", have: tuple[str, ...] = ()) -> Path:
    for d in ("bin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "run", "usr/local/libexec"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "bin/busybox").write_bytes(Path("/bin/busybox").read_bytes())
    (root / "bin/busybox").chmod(0o755)
    for applet in ("sh", "mount", "umount", "grep", "mkdir", "tail", "cat", "rm", "echo", "chmod", "sleep"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc/os-release").write_text(os_release)
    script = root / firstboot.PATH[1:]
    script.write_bytes(firstboot.script())
    script.chmod(0o755)
    if stub:
        (root / stub[1:]).write_text(STUB)
        (root / stub[1:]).chmod(0o755)
    for tool in have:
        (root / tool[1:]).write_text("#!/bin/sh\n")
        (root / tool[1:]).chmod(0o755)
    init = root / "usr/local/libexec/banger-init"
    init.write_text('#!/bin/sh\n[ -e /proc/mounts ] && m=yes || m=no\necho "banger-init ran as $$ with: $*; proc mounted: $m"\n')
    init.chmod(0o755)
    return root


def run_in(root: Path, *args: str, pid1: bool = False) -> subprocess.CompletedProcess[str]:
    unshare = ["unshare", "--mount", "--propagation", "private", *(["--pid", "--fork"] if pid1 else [])]
    return subprocess.run([*unshare, "chroot", str(root), "/bin/sh", firstboot.PATH, *args] if not pid1 else
                          [*unshare, "chroot", str(root), firstboot.PATH, *args],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    ("os_release", "have", "plan"),
    [
        ("ID=debian\n", (), "missing: ssh python\nmanager: apt\ncommand: apt-get update -q && apt-get install "
                            "-y -q --no-install-recommends openssh-server python3\n"),
        ('ID=ubuntu\nID_LIKE="debian"\n', ("/usr/sbin/sshd",), "missing: python\nmanager: apt\n"),
        ("ID=alpine\n", ("/usr/bin/python3",), "missing: ssh\nmanager: apk\ncommand: apk add --no-cache "
                                               "openssh-server openssh-keygen\n"),
        ('ID="rocky"\nID_LIKE="rhel centos fedora"\n', (), "manager: dnf\ncommand: yum install -y "
                                                          "openssh-server python3\n"),
        ("ID=arch\n", (), "command: pacman -Sy --noconfirm --needed openssh python\n"),
        ('ID="opensuse-leap"\nID_LIKE="suse opensuse"\n', (), "command: zypper --non-interactive install "
                                                              "--no-recommends openssh python3\n"),
        ("ID=debian\n", ("/usr/sbin/sshd", "/usr/bin/python3"), "missing: none\n"),
    ],
)
def test_first_boot_plan(tmp_path: Path, os_release: str, have: tuple[str, ...], plan: str) -> None:
    root = first_boot_tree(tmp_path / "root", os_release, have=have)
    proc = run_in(root, "--plan")
    assert proc.returncode == 0, proc.stderr
    assert plan in proc.stdout


def test_first_boot_installs_once(tmp_path: Path) -> None:
    root = first_boot_tree(tmp_path / "root", "ID=debian\nVERSION_ID=12\n", stub="/usr/bin/apt-get")
    (root / "stub.fail").write_text("")
    failed = run_in(root)
    assert failed.returncode == 1
    assert "installing openssh-server python3 failed; it is retried at the next boot" in failed.stderr
    assert not (root / firstboot.DONE_MARKER[1:]).exists()

    (root / "stub.fail").unlink()
    (root / "stub.log").unlink()
    ok = run_in(root)
    assert ok.returncode == 0, ok.stderr
    assert (root / "stub.log").read_text() == (
        "/usr/bin/apt-get update -q\n/usr/bin/apt-get install -y -q --no-install-recommends openssh-server python3\n")
    assert (root / firstboot.DONE_MARKER[1:]).exists()
    assert "installed openssh-server python3" in ok.stderr
    assert not list((root / "proc").iterdir())  # nothing stayed mounted: the namespace is gone

    again = run_in(root)  # later boots: nothing to do
    assert again.returncode == 0 and again.stderr == ""
    assert len((root / "stub.log").read_text().splitlines()) == 2


def test_first_boot_as_pid1_hands_over_to_banger_init(tmp_path: Path) -> None:
    root = first_boot_tree(tmp_path / "root", "ID=alpine\n", stub="/usr/sbin/apk")
    proc = run_in(root, pid1=True)
    assert proc.returncode == 0, proc.stderr
    assert (root / "stub.log").read_text() == "/usr/sbin/apk add --no-cache openssh-server openssh-keygen python3\n"
    # exec'd as PID 1 still, with what the script mounted unmounted again (banger-init mounts its own).
    assert "banger-init ran as 1 with: ; proc mounted: no" in proc.stdout


def test_first_boot_unknown_distro(tmp_path: Path) -> None:
    root = first_boot_tree(tmp_path / "root", 'ID=mystery\nID_LIKE="obscure"\n')
    proc = run_in(root)
    assert proc.returncode == 1
    assert ("lacks ssh python and its distribution (os-release: mystery obscure) has no known package manager"
            in proc.stderr)
