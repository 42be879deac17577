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

    # doctor, system, ssh-config, version, completion
    p = _cmd(sub, "doctor", "check whether this host is ready", "banger.cli.doctor:cmd_doctor",
             "examples:\n  banger doctor\n  banger doctor --json")
    _json(p)
    system = _group(sub, "system", "the banger services", "The owner daemon and the root helper.",
                    "examples:\n  banger system status\n  banger system stop")
    system_sub = system.add_subparsers(dest="system_command", metavar="<command>", parser_class=BangerParser)
    p = _cmd(system_sub, "status", "show the daemon and root helper", "banger.cli.system:cmd_status")
    _json(p)
    _cmd(system_sub, "stop", "stop the embedded daemon and helper (no system install)",
         "banger.cli.system:cmd_stop")
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
    # Hidden: the completion scripts call this.
    hidden = sub.add_parser("__complete", add_help=False)
    hidden.set_defaults(handler="banger.cli.completion:cmd_complete")
    hidden.add_argument("cword", type=int)
    hidden.add_argument("words", nargs=argparse.REMAINDER)
    sub._choices_actions = [a for a in sub._choices_actions if a.dest != "__complete"]
    return root


def dispatch(argv: list[str]) -> int:
    parser = build()
    args = parser.parse_args(argv)
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
