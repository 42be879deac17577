"""Shell completion: one engine (`banger __complete`) behind thin bash, zsh and fish scripts.

The engine walks the argparse tree, so new commands complete without touching the scripts, and asks
a running daemon for live VM, image and kernel names (never starting one; no daemon, no names).
"""

from __future__ import annotations

import argparse
import sys

BASH = r"""# bash completion for banger
_banger() {
    local IFS=$'\n'
    COMPREPLY=($(banger __complete "$COMP_CWORD" "${COMP_WORDS[@]}" 2>/dev/null))
}
complete -o default -F _banger banger
"""

ZSH = r"""#compdef banger
_banger() {
    local -a candidates
    candidates=("${(@f)$(banger __complete $((CURRENT - 1)) "${words[@]}" 2>/dev/null)}")
    compadd -a candidates
}
compdef _banger banger
"""

FISH = r"""# fish completion for banger
function __banger_complete
    set -l words (commandline -opc) (commandline -ct)
    banger __complete (math (count $words) - 1) $words 2>/dev/null
end
complete -c banger -f -a '(__banger_complete)'
"""


def cmd_completion(args: argparse.Namespace) -> int:
    sys.stdout.write({"bash": BASH, "zsh": ZSH, "fish": FISH}[args.shell])
    return 0


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[argparse.ArgumentParser] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def candidates(words: list[str], cword: int) -> list[str]:
    from banger.cli.parser import build

    parser = build()
    current = words[cword] if cword < len(words) else ""
    positionals: list[str] = []
    skip_value = False
    for word in words[1:cword]:
        if skip_value:
            skip_value = False
            continue
        sub = _subparsers(parser)
        if word.startswith("-"):
            action = parser._option_string_actions.get(word.split("=", 1)[0])
            skip_value = action is not None and action.nargs != 0 and "=" not in word
            continue
        if sub is not None and word in sub.choices:
            parser = sub.choices[word]
            positionals = []
            continue
        positionals.append(word)
    if current.startswith("-"):
        opts = [o for a in parser._actions for o in a.option_strings if a.help != argparse.SUPPRESS]
        return sorted(o for o in opts if o.startswith(current))
    sub = _subparsers(parser)
    if sub is not None:
        names = [a.dest for a in sub._choices_actions]
        return sorted(n for n in names if n.startswith(current) and not n.startswith("__"))
    pos_actions = [a for a in parser._actions if not a.option_strings and a.dest != "help"]
    if len(positionals) >= len(pos_actions):
        return []
    action = pos_actions[len(positionals)]
    if action.choices:
        return sorted(str(c) for c in action.choices if str(c).startswith(current))
    kind = getattr(action, "completer", None)
    return sorted(n for n in _live_names(kind) if n.startswith(current)) if kind else []


def _live_names(kind: str) -> list[str]:
    from banger.cli.lifecycle import target
    from banger.errors import BangerError
    from banger.rpc import client

    method, key = {"vm": ("vm.list", "vms"), "image": ("image.list", "images"),
                   "kernel": ("kernel.list", "kernels"),
                   "kernel-catalog": ("kernel.catalog", "kernels"),
                   "image-catalog": ("image.catalog", "images")}.get(kind, ("", ""))
    if not method:
        return []
    try:
        result = client.call(target().socket, method, {}, timeout=1.0, connect_timeout=0.3)
    except BangerError:
        return []
    return [str(item["name"]) for item in result.get(key, [])]


def cmd_complete(args: argparse.Namespace) -> int:
    for candidate in candidates(list(args.words), args.cword):
        print(candidate)
    return 0
