"""The command tree. Handlers are named as "module:function" and imported only when chosen."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import Any

from banger import __version__

ROOT_HELP = """\
One-command development sandboxes on real microVMs.

The command you want most of the time:
  banger vm run                     a fresh VM and a shell in it
"""
ROOT_EPILOG = """\
examples:
  banger vm list                    VMs and their state
  banger doctor                     is this host ready?
  banger completion bash > /etc/bash_completion.d/banger
"""


class BangerParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        from banger.errors import BadRequest

        # One line, with where to look for the right usage.
        raise BadRequest(f"{message} (see `{self.prog} --help`)")


def _group(sub: Any, name: str, help_text: str, description: str, epilog: str,
           aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=description, epilog=epilog, aliases=list(aliases),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    return p


def _cmd(sub: Any, name: str, help_text: str, handler: str, epilog: str = "",
         aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=help_text, epilog=epilog or None, aliases=list(aliases),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(handler=handler)
    return p


def _complete(action: argparse.Action, kind: str) -> argparse.Action:
    action.completer = kind  # type: ignore[attr-defined]
    return action


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _vm_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="VM name (a DNS label; default: generated)")
    _complete(p.add_argument("--image", help="image to boot (default: debian-bookworm)"), "image")
    p.add_argument("--vcpu", type=int, help="virtual CPUs")
    p.add_argument("--memory", type=int, metavar="MIB", help="memory in MiB")
    p.add_argument("--disk-size", metavar="SIZE", help="work disk (/root) size, e.g. 8G")
    p.add_argument("--nat", action="store_true", help="give the VM outbound network access")
    p.add_argument("--init", choices=("fast", "systemd"),
                   help="PID 1 in the guest: banger's fast init (default) or the image's systemd")
    p.add_argument("--vmm", choices=("firecracker", "qemu"),
                   help="VM monitor for this VM (default: the vmm setting; auto picks firecracker where KVM runs guests)")


def _workspace_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--include-untracked", action="store_true",
                   help="also copy untracked files (never gitignored ones)")
    p.add_argument("--dry-run", action="store_true", help="print the files that would be copied; no VM, no copy")
    p.add_argument("--branch", metavar="B", help="create this guest-only branch in the workspace")
    p.add_argument("--from", dest="from_ref", metavar="REF", help="start --branch at REF (default: HEAD)")
    p.add_argument("--guest-path", metavar="P", help="where the repository goes in the guest (default /root/repo)")


def build() -> argparse.ArgumentParser:
    root = BangerParser(prog="banger", description=ROOT_HELP, epilog=ROOT_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    root.add_argument("--version", action="store_true", help="print the version and exit")
    sub = root.add_subparsers(dest="command", metavar="<command>", parser_class=BangerParser)

    # vm
    vm = _group(sub, "vm", "create, run and manage VMs", "Create, run and manage microVMs.",
                "examples:\n  banger vm list\n  banger vm show brave-otter\n  banger vm list --json")
    vm_sub = vm.add_subparsers(dest="vm_command", metavar="<command>", parser_class=BangerParser)
    p = _cmd(vm_sub, "list", "list VMs", "banger.cli.vm:cmd_list", aliases=("ls",))
    _json(p)
    p.add_argument("--ids", action="store_true", help="print only the short ids")
    p = _cmd(vm_sub, "show", "show one VM", "banger.cli.vm:cmd_show",
             "examples:\n  banger vm show brave-otter\n  banger vm show 3f2a --json")
    _complete(p.add_argument("vm", help="VM name, id or unique id prefix"), "vm")
    _json(p)
    run_help = ("examples:\n"
                "  banger vm run                      a fresh VM and a shell in it\n"
                "  banger vm run ./repo -- make test  the repo at /root/repo, then a command in it\n"
                "  banger vm run ./repo --dry-run     show what would be copied; no VM\n"
                "  banger vm run --rm -- make test    run a command; its exit status is banger's\n"
                "  banger vm run -d --name web --nat  start and leave it running\n")
    p = _cmd(vm_sub, "run", "create a VM, wait for SSH, then a shell or `-- command`", "banger.cli.vm:cmd_run",
             run_help)
    _vm_flags(p)
    p.add_argument("--rm", action="store_true", help="delete the VM when the session or command ends")
    p.add_argument("-d", "--detach", action="store_true", help="leave the VM running; do not attach")
    p.add_argument("path", nargs="?", help="a git repository to ship into the VM as a workspace")
    _workspace_flags(p)
    p.add_argument("--no-bootstrap", action="store_true",
                   help="do not install the repository's tools (mise) in the guest")
    p = _cmd(vm_sub, "create", "create (and start) a VM", "banger.cli.vm:cmd_create",
             "examples:\n  banger vm create --name dev --vcpu 2 --memory 2048\n  banger vm create --no-start")
    _vm_flags(p)
    p.add_argument("--no-start", action="store_true", help="create the VM without starting it")
    _json(p)
    for name, help_text, handler, aliases in (
        ("start", "start stopped VMs", "cmd_start", ()),
        ("stop", "stop running VMs gracefully", "cmd_stop", ()),
        ("restart", "stop then start VMs", "cmd_restart", ()),
        ("kill", "force-stop VMs (when `vm stop` hangs)", "cmd_kill", ()),
        ("delete", "stop VMs and remove their disks (irreversible)", "cmd_delete", ("rm",)),
    ):
        p = _cmd(vm_sub, name, help_text, f"banger.cli.vm:{handler}", aliases=aliases)
        _complete(p.add_argument("vms", nargs="+", metavar="vm", help="VM names or ids"), "vm")
    p = _cmd(vm_sub, "set", "change a VM's vcpu, memory, disk size or NAT", "banger.cli.vm:cmd_set",
             "examples:\n  banger vm set dev --vcpu 4     (while stopped)\n  banger vm set dev --nat")
    _complete(p.add_argument("vm", help="VM name or id"), "vm")
    p.add_argument("--vcpu", type=int, help="virtual CPUs")
    p.add_argument("--memory", type=int, metavar="MIB", help="memory in MiB")
    p.add_argument("--disk-size", metavar="SIZE", help="grow the work disk, e.g. 16G")
    p.add_argument("--nat", action=argparse.BooleanOptionalAction, default=None, help="outbound NAT on or off")
    p = _cmd(vm_sub, "prune", "delete every VM that is not running", "banger.cli.vm:cmd_prune")
    p.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")
    p = _cmd(vm_sub, "stats", "CPU time, memory and disk use of VMs", "banger.cli.vm:cmd_stats",
             "examples:\n  banger vm stats web\n  banger vm stats web db --json")
    _complete(p.add_argument("vms", nargs="+", metavar="vm", help="VM names or ids"), "vm")
    _json(p)
    p = _cmd(vm_sub, "logs", "show a VM's console log", "banger.cli.vm:cmd_logs")
    _complete(p.add_argument("vm", help="VM name or id"), "vm")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    p = _cmd(vm_sub, "ssh", "ssh into a VM (`-- cmd` runs a command)", "banger.cli.vm:cmd_ssh",
             "examples:\n  banger vm ssh dev\n  banger vm ssh dev -- uname -a")
    _complete(p.add_argument("vm", help="VM name or id"), "vm")
    p = _cmd(vm_sub, "exec", "run a command in a running VM through its agent (`-- cmd`)",
             "banger.cli.guest:cmd_exec",
             "The command runs as given, without a shell (use `-- sh -c '...'` for shell syntax), in the\n"
             "VM's workspace if it has one, else /root. Output is streamed; the exit status is the\n"
             "command's (128+N when signal N ended it). A stdin that is not a terminal is sent (up to\n"
             "64 MiB; -n to skip). Without a guest agent banger falls back to ssh.\n\n"
             "examples:\n  banger vm exec dev -- uname -a\n  banger vm exec dev --env DEBUG=1 -- make test\n"
             "  tar c . | banger vm exec dev -- tar x -C /root/src\n  banger vm exec -t dev -- htop")
    _complete(p.add_argument("vm", help="VM name or id"), "vm")
    p.add_argument("--guest-path", metavar="P", help="working directory in the guest")
    p.add_argument("--auto-prepare", action="store_true",
                   help="re-sync the workspace first if the host repository's HEAD moved")
    p.add_argument("--env", action="append", metavar="K=V", help="set an environment variable (repeatable)")
    p.add_argument("--timeout", type=int, metavar="S", help="kill the command after S seconds")
    p.add_argument("-t", "--tty", action="store_true", help="run over ssh with a terminal (interactive)")
    p.add_argument("-n", "--no-stdin", action="store_true", help="do not read or send stdin")
    p = _cmd(vm_sub, "cp", "copy files and directories between the host and a VM", "banger.cli.guest:cmd_cp",
             "One side is <vm>:<path> (relative guest paths are under /root). Directories are copied\n"
             "recursively, modes kept; symlinks and special files are skipped with a warning.\n\n"
             "examples:\n  banger vm cp ./src dev:/root/src\n  banger vm cp dev:/var/log/syslog .\n"
             "  banger vm cp dev:out/ ./results")
    p.add_argument("src", help="source: a host path or <vm>:<path>")
    p.add_argument("dst", help="destination: a host path or <vm>:<path>")
    p = _cmd(vm_sub, "ports", "list listening ports of VMs, with HTTP links", "banger.cli.guest:cmd_ports",
             "examples:\n  banger vm ports\n  banger vm ports dev web --json")
    _complete(p.add_argument("vms", nargs="*", metavar="vm", help="VM names or ids (default: all running)"), "vm")
    _json(p)
    workspace = _group(vm_sub, "workspace", "ship a git repository into a VM and take changes back",
                       "A workspace is a git repository copied into a VM: its history, and its working\n"
                       "tree as it is now (tracked files; untracked ones with --include-untracked;\n"
                       "ignored ones never). `export` brings the guest's changes back as a patch.",
                       "examples:\n  banger vm workspace prepare dev . --dry-run\n"
                       "  banger vm workspace prepare dev ~/src/app --include-untracked\n"
                       "  banger vm workspace export dev --output guest.patch && git apply guest.patch")
    ws_sub = workspace.add_subparsers(dest="workspace_command", metavar="<command>", parser_class=BangerParser)
    p = _cmd(ws_sub, "prepare", "copy a repository into a VM (replaces an earlier workspace there)",
             "banger.cli.workspace:cmd_workspace_prepare",
             "examples:\n  banger vm workspace prepare dev .\n"
             "  banger vm workspace prepare dev . --branch try-x --from main")
    _complete(p.add_argument("vm", help="VM name or id"), "vm")
    p.add_argument("path", help="a path inside the git repository to ship")
    _workspace_flags(p)
    _json(p)
    p = _cmd(ws_sub, "export", "the guest's changes since the workspace base, as a binary patch (non-mutating)",
             "banger.cli.workspace:cmd_workspace_export",
             "Guest commits past the base, uncommitted edits and untracked files (not ignored ones),\n"
             "as one patch for `git apply`.\n\n"
             "examples:\n  banger vm workspace export dev > guest.patch\n"
             "  banger vm workspace export dev --base-commit HEAD~2 --output guest.patch")
    _complete(p.add_argument("vm", help="VM name or id"), "vm")
    p.add_argument("--base-commit", metavar="SHA", help="diff against this commit (default: the prepared HEAD)")
    p.add_argument("--output", metavar="FILE", help="write the patch here instead of stdout")
    p.add_argument("--guest-path", metavar="P", help="the workspace's guest path (default: the recorded one)")
    p = _cmd(sub, "ps", "list VMs (same as `banger vm list`)", "banger.cli.vm:cmd_list")
    _json(p)
    p.add_argument("--ids", action="store_true", help="print only the short ids")

    # image
    image = _group(sub, "image", "manage root filesystem images", "Images are what VMs boot from.",
                   "examples:\n  banger image list\n  banger image show debian-bookworm")
    image_sub = image.add_subparsers(dest="image_command", metavar="<command>", parser_class=BangerParser)
    p = _cmd(image_sub, "list", "list images", "banger.cli.artifacts:cmd_image_list", aliases=("ls",))
    _json(p)
    p = _cmd(image_sub, "show", "show one image", "banger.cli.artifacts:cmd_image_show")
    _complete(p.add_argument("image", help="image name or id"), "image")
    _json(p)
    p = _cmd(image_sub, "pull", "build or fetch an image from banger's catalog",
             "banger.cli.artifacts:cmd_image_pull",
             "examples:\n  banger image pull debian-bookworm\n  banger image pull debian-bookworm-full --json")
    _complete(p.add_argument("name", help="catalog name (e.g. debian-bookworm) or registry reference "
                                          "(e.g. 127.0.0.1:5000/tools:1.0)"), "image-catalog")
    p.add_argument("--name", dest="as_name", metavar="NAME", help="image name for a registry pull")
    _complete(p.add_argument("--kernel-ref", metavar="KERNEL", help="kernel for a registry pull "
                                                                     "(default debian-12-cloud)"), "kernel")
    _json(p)
    cache = _group(image_sub, "cache", "the OCI layer cache", "Cached registry blobs.",
                   "examples:\n  banger image cache prune --dry-run")
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="<command>", parser_class=BangerParser)
    p = _cmd(cache_sub, "prune", "empty the OCI layer cache", "banger.cli.artifacts:cmd_image_cache_prune")
    p.add_argument("--dry-run", action="store_true", help="only say what would be freed")
    p = _cmd(image_sub, "register", "register host files (rootfs + kernel) as an unmanaged image",
             "banger.cli.artifacts:cmd_image_register",
             "examples:\n  banger image register --name mine --rootfs ./rootfs.ext4 --kernel-ref debian-12-cloud\n"
             "  banger image register --name mine --rootfs ./rootfs.ext4 --kernel ./vmlinux --initrd ./initrd.img")
    p.add_argument("--name", required=True, help="image name")
    p.add_argument("--rootfs", required=True, metavar="P", help="ext4 root filesystem image")
    _complete(p.add_argument("--kernel-ref", metavar="KERNEL", help="a stored kernel (see `banger kernel list`)"),
              "kernel")
    p.add_argument("--kernel", metavar="P", help="kernel file (instead of --kernel-ref)")
    p.add_argument("--initrd", metavar="P", help="initrd file (with --kernel)")
    p.add_argument("--modules", metavar="DIR", help="modules directory (with --kernel)")
    _json(p)
    p = _cmd(image_sub, "promote", "copy an unmanaged image's files into banger's store",
             "banger.cli.artifacts:cmd_image_promote", "examples:\n  banger image promote mine")
    _complete(p.add_argument("image", help="image name or id"), "image")
    _json(p)
    p = _cmd(image_sub, "delete", "delete an image (refused while a VM uses it)",
             "banger.cli.artifacts:cmd_image_delete", aliases=("rm",))
    _complete(p.add_argument("image", help="image name, id or unique id prefix"), "image")

    # kernel
    kernel = _group(sub, "kernel", "manage guest kernels", "Guest kernels, local and from the catalog.",
                    "examples:\n  banger kernel list\n  banger kernel list --available")
    kernel_sub = kernel.add_subparsers(dest="kernel_command", metavar="<command>", parser_class=BangerParser)
    p = _cmd(kernel_sub, "list", "list kernels", "banger.cli.artifacts:cmd_kernel_list", aliases=("ls",))
    p.add_argument("--available", action="store_true", help="list the kernels in banger's catalog")
    _json(p)
    p = _cmd(kernel_sub, "show", "show one kernel", "banger.cli.artifacts:cmd_kernel_show")
    _complete(p.add_argument("kernel", help="kernel name"), "kernel")
    _json(p)
    p = _cmd(kernel_sub, "pull", "fetch a kernel from banger's catalog", "banger.cli.artifacts:cmd_kernel_pull",
             "examples:\n  banger kernel pull debian-12-cloud\n  banger kernel list --available")
    _complete(p.add_argument("name", help="catalog name (see `banger kernel list --available`)"), "kernel-catalog")
    _json(p)
    p = _cmd(kernel_sub, "rm", "delete a local kernel", "banger.cli.artifacts:cmd_kernel_rm", aliases=("delete",))
    _complete(p.add_argument("kernel", help="kernel name"), "kernel")
    p = _cmd(kernel_sub, "import", "copy a local kernel build (vmlinux, initrd.img, modules/) into the store",
             "banger.cli.artifacts:cmd_kernel_import",
             "The maintainer flow before publishing a tarball kernel: --from is a directory holding\n"
             "vmlinux (an ELF), optionally initrd.img and modules/ (other files are ignored).\n\n"
             "examples:\n  banger kernel import generic-6.1 --from ./out --distro generic --arch amd64 "
             "--kernel-version 6.1.140")
    p.add_argument("name", help="kernel name")
    p.add_argument("--from", dest="from_dir", required=True, metavar="DIR", help="directory with the build")
    p.add_argument("--distro", required=True, help="distribution label, e.g. generic or debian")
    p.add_argument("--arch", default="amd64", help="architecture (amd64)")
    p.add_argument("--kernel-version", required=True, metavar="V", help="kernel release, e.g. 6.1.140")
    _json(p)

    # doctor, system, ssh-config, version, completion
    p = _cmd(sub, "doctor", "check whether this host is ready", "banger.cli.doctor:cmd_doctor",
             "examples:\n  banger doctor\n  banger doctor --json")
    _json(p)
    system = _group(sub, "system", "the banger services", "The owner daemon and the root helper.",
                    "examples:\n  banger system status\n  sudo banger system install --owner $USER\n"
                    "  banger system stop")
    system_sub = system.add_subparsers(dest="system_command", metavar="<command>", parser_class=BangerParser)
    p = _cmd(system_sub, "status", "show the services, sockets, versions and install metadata",
             "banger.cli.install:cmd_status")
    _json(p)
    p = _cmd(system_sub, "install", "install banger for an owner user and start its services (root)",
             "banger.cli.install:cmd_install",
             "examples:\n  sudo banger system install --owner $USER\n"
             "  sudo banger system install --owner alice --from banger-0.2.0-linux-amd64.tar.gz")
    p.add_argument("--owner", required=True, metavar="USER", help="the unprivileged user the daemon runs as")
    p.add_argument("--owner-home", metavar="DIR", help="the owner's home (default: from passwd)")
    p.add_argument("--from", dest="from_tarball", metavar="TARBALL",
                   help="install this release archive (default: build this source checkout)")
    p = _cmd(system_sub, "uninstall", "stop the services and remove the install (root)",
             "banger.cli.install:cmd_uninstall",
             "examples:\n  sudo banger system uninstall          keep VMs, images and config\n"
             "  sudo banger system uninstall --purge  remove them too (never the owner's home)")
    p.add_argument("--purge", action="store_true", help="also remove /var/lib/banger, /var/cache/banger, "
                   "/etc/banger and the logs")
    _cmd(system_sub, "start", "start the services when systemd does not supervise them (root)",
         "banger.cli.install:cmd_start")
    _cmd(system_sub, "restart", "restart the root helper, then the daemon (root)", "banger.cli.install:cmd_restart")
    _cmd(system_sub, "stop", "stop the daemon and the root helper", "banger.cli.install:cmd_stop")
    p = _cmd(sub, "update", "update a system install to a signed release (root)", "banger.cli.update:cmd_update",
             "examples:\n  banger update --check\n  sudo banger update\n  sudo banger update --to v0.2.0 --dry-run")
    p.add_argument("--check", action="store_true", help="only say whether an update is available")
    p.add_argument("--to", metavar="vX.Y.Z", help="this version instead of the latest stable one")
    p.add_argument("--dry-run", action="store_true", help="download, verify and stage, but do not swap")
    p.add_argument("--force", action="store_true", help="update even while operations are in flight")
    # Hidden, for tests: another release server and another signing key.
    p.add_argument("--manifest-url", help=argparse.SUPPRESS)
    p.add_argument("--pubkey-file", help=argparse.SUPPRESS)
    p = _cmd(sub, "ssh-config", "wire `ssh <name>.vm` into your ssh config", "banger.cli.sshconfig:cmd_ssh_config",
             "examples:\n  banger ssh-config             show the include line\n"
             "  banger ssh-config --install   add it to ~/.ssh/config\n")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--install", action="store_true", help="add an Include block to ~/.ssh/config")
    mode.add_argument("--uninstall", action="store_true", help="remove the Include block from ~/.ssh/config")
    p = _cmd(sub, "version", "print version details", "banger.cli.system:cmd_version")
    _json(p)
    p = _cmd(sub, "completion", "print a shell completion script", "banger.cli.completion:cmd_completion",
             "examples:\n  banger completion bash > /etc/bash_completion.d/banger\n"
             "  banger completion zsh > \"${fpath[1]}/_banger\"\n"
             "  banger completion fish > ~/.config/fish/completions/banger.fish")
    _complete(p.add_argument("shell", choices=("bash", "zsh", "fish"), help="bash, zsh or fish"), "shell")
    # Hidden maintainer commands (reference §3.9).
    internal = sub.add_parser("internal", description="Maintainer commands.")
    internal_sub = internal.add_subparsers(dest="internal_command", metavar="<command>", parser_class=BangerParser)
    p = _cmd(internal_sub, "make-bundle", "make an image-catalog bundle from a root filesystem tarball",
             "banger.cli.artifacts:cmd_make_bundle",
             "Flattens the tarball, builds the ext4 (owners and modes kept), injects banger's guest files\n"
             "and writes <name>-<arch>-<sha256 prefix>.tar.zst into --out; prints path, sha256 and size.\n\n"
             "examples:\n  banger internal make-bundle --rootfs-tar rootfs.tar --name debian-bookworm "
             "--distro debian --arch amd64 --kernel-ref debian-12-cloud --out dist/")
    p.add_argument("--rootfs-tar", required=True, metavar="FILE", help="root filesystem tarball, or - for stdin")
    p.add_argument("--name", required=True, help="image name")
    p.add_argument("--distro", required=True, help="distribution (debian)")
    p.add_argument("--arch", required=True, help="architecture (amd64)")
    p.add_argument("--kernel-ref", required=True, metavar="KERNEL", help="catalog kernel the image boots with")
    p.add_argument("--description", default="", help="one line for the catalog")
    p.add_argument("--size", metavar="SIZE", help="ext4 size, e.g. 4G (default: 1.5x the content, at least 1G)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the bundle")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = _cmd(internal_sub, "install-vhost-vsock", "install vhost-device-vsock (QEMU's vsock agent transport)",
             "banger.cli.internal:cmd_install_vhost_vsock",
             "Fetches Debian's vhost-device-vsock package from --suite through the verified archive chain\n"
             "(gpgv, signed index, sha256), and installs only its binary into --dest, atomically, mode 0755.\n"
             "The same version already there: nothing to do. The mirror is kernel_mirror in config.toml.\n\n"
             "examples:\n  sudo banger internal install-vhost-vsock\n"
             "  banger internal install-vhost-vsock --dest ~/.local/bin")
    p.add_argument("--dest", default="/usr/local/bin", metavar="DIR", help="directory (default: /usr/local/bin)")
    p.add_argument("--suite", default="sid", help="Debian suite that has the package (default: sid)")
    p.add_argument("--allow-expired", action="store_true",
                   help="accept the suite's metadata past its Valid-Until (a frozen mirror); still verified")
    # Hidden: the completion scripts call this.
    hidden = sub.add_parser("__complete", add_help=False)
    hidden.set_defaults(handler="banger.cli.completion:cmd_complete")
    hidden.add_argument("cword", type=int)
    hidden.add_argument("words", nargs=argparse.REMAINDER)
    sub._choices_actions = [a for a in sub._choices_actions if a.dest not in ("__complete", "internal")]
    return root


def dispatch(argv: list[str]) -> int:
    parser = build()
    # Everything after `--` is the guest command, never banger's flags.
    command: list[str] | None = None
    if "--" in argv and argv[:1] != ["__complete"]:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    args.command_argv = command
    if command is not None and getattr(args, "handler", None) not in _TAKES_COMMAND:
        from banger.errors import BadRequest

        raise BadRequest("`-- <command>` only goes with `banger vm run`, `banger vm exec` and `banger vm ssh`")
    if args.version:
        from banger import buildinfo

        print(buildinfo.current().one_line("banger"))
        return 0
    handler = getattr(args, "handler", None)
    if handler is None:
        # A group without a subcommand: show its help, the common command first.
        target = parser
        if args.command:
            target = _subparser(parser, [args.command])
        target.print_help()
        return 0 if not args.command else 2
    module_name, _, func_name = handler.partition(":")
    func: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module_name), func_name)
    return func(args)


_TAKES_COMMAND = {"banger.cli.vm:cmd_run", "banger.cli.vm:cmd_ssh", "banger.cli.guest:cmd_exec"}


def _subparser(parser: argparse.ArgumentParser, path: list[str]) -> argparse.ArgumentParser:
    current = parser
    for name in path:
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction) and name in action.choices:
                current = action.choices[name]
                break
    return current


def version_string() -> str:
    return __version__


if __name__ == "__main__":
    sys.exit(dispatch(sys.argv[1:]))
