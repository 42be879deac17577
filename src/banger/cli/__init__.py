"""`banger`: the command line. Parses, calls the daemon, prints. Errors are one line, never a traceback."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from banger.errors import BangerError
    from banger.rpc.protocol import RpcError

    args_list = sys.argv[1:] if argv is None else argv
    try:
        from banger.cli.parser import dispatch

        return dispatch(args_list)
    except RpcError as exc:
        _error(exc.render())
        return 1
    except BangerError as exc:
        _error(f"{exc.message}; {exc.hint}" if exc.hint else exc.message)
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    except BrokenPipeError:
        return 141
    except Exception as exc:
        import os

        if os.environ.get("BANGER_DEBUG"):
            raise
        _error(f"internal error: {type(exc).__name__}: {exc} (set BANGER_DEBUG=1 for a traceback, and please report it)")
        return 70


def _error(text: str) -> None:
    from banger.cli.output import paint, use_color

    color = use_color(sys.stderr)
    # The op_id in parentheses is dim: it is for `grep`, not for reading.
    if text.endswith(")") and " (op-" in text:
        head, _, op = text.rpartition(" (")
        text = f"{head} {paint('(' + op, 'dim', color)}"
    sys.stderr.write(f"banger: {text}\n")
