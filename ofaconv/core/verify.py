"""``ofaconv verify FOLDER [--against SOURCE]``: check any family's folder.

The folder's family (``ofaconv.core.registry``) runs its own checks (loading, probe forward, and
with ``--against`` the full parity check against the source it was converted from).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import registry


def verify(folder, against=None, *, ema: bool | None = None) -> tuple[list[dict], bool]:
    """Check ``folder``; returns the check rows and whether every check passed."""
    family = registry.family_of_folder(folder)
    return family.load_hooks().verify_folder(Path(folder), against, ema=ema)


def format_checks(checks: list[dict]) -> list[str]:
    lines = [f"{'check':<16} {'result':<6} {'value':>12}  detail"]
    for c in checks:
        value = c.get("value")
        shown = "" if value is None else (f"{value:.3g}" if isinstance(value, float) else str(value))
        lines.append(f"{c['name']:<16} {'ok' if c['passed'] else 'FAIL':<6} {shown:>12}  {c.get('detail', '')}")
    return lines


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="check a converted folder (any family); with --against, full parity vs the source")
    p.add_argument("folder")
    p.add_argument("--against", metavar="SOURCE", help="the checkpoint (or folder) the folder was converted from")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="OFA: compare against the checkpoint's EMA weights (default: as the report says)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=_run)


def _run(args) -> int:
    checks, passed = verify(args.folder, args.against, ema=args.ema)
    if args.json:
        print(json.dumps(checks, indent=2))
    else:
        for line in format_checks(checks):
            print(line)
    return 0 if passed else 3
