"""`bangerd --check-migrations [--system]`: may this binary replace the running one?

Run by `banger update` before swapping binaries. Reads the database read-only and answers in one line:
exit 0 = schema compatible, 1 = this binary will migrate on start (safe to swap), 2 = the database is
newer than this binary or unreadable (abort the swap). Never creates, migrates or writes anything.
"""

from __future__ import annotations

import argparse
import sys

from banger import paths
from banger.errors import BangerError
from banger.store.migrations import MIGRATIONS, incompatible_message, inspect_path, migration_name


def check_migrations(system: bool) -> tuple[int, str]:
    """(exit code, one line) for the database of the user or the system layout."""
    layout = paths.resolve_system() if system else paths.resolve_user()
    try:
        state = inspect_path(layout.db_path, MIGRATIONS)
    except BangerError as exc:
        return 2, f"{exc}; aborting"
    if state.status == "incompatible":
        return 2, f"{incompatible_message(state)}; aborting"
    if state.fresh_install:
        return 1, "no database yet (fresh install); migrations will run on first start"
    if state.status == "migrations_needed":
        pending = ", ".join(f"{i} {migration_name(i, MIGRATIONS)}" for i in state.pending)
        return 1, f"migrations needed: {len(state.pending)} pending ({pending}); safe to swap"
    return 0, f"schema compatible (version {state.version})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bangerd --check-migrations", description=__doc__)
    parser.add_argument("--system", action="store_true", help="check the system install's database")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    code, line = check_migrations(args.system)
    print(line)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
