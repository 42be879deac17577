"""`banger update`: move a system install to another signed release, rolling back if it fails."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _say(text: str) -> None:
    print(f"banger: {text}", file=sys.stderr, flush=True)


def cmd_update(args: argparse.Namespace) -> int:
    from banger.update import apply
    from banger.update.manifest import DEFAULT_MANIFEST_URL

    req = apply.UpdateRequest(
        check=args.check,
        to=args.to,
        dry_run=args.dry_run,
        force=args.force,
        manifest_url=args.manifest_url or DEFAULT_MANIFEST_URL,
        pubkey_file=Path(args.pubkey_file) if args.pubkey_file else None,
    )
    outcome = apply.run_update(req, say=_say)
    print(outcome.line)
    return 0
