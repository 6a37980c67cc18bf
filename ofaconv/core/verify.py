"""``ofaconv verify FOLDER [--against SOURCE]``: check any family's folder.

The first check, ``manifest``, is the family's-independent one: the folder holds exactly the files
its ``conversion_report.json`` lists, byte for byte, and no link. Only then does the folder's family
(``ofaconv.core.registry``) run its own checks (loading, probe forward, and with ``--against`` the
full parity check against the source it was converted from): loading files nobody verified proves
nothing about the conversion.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import registry
from .errors import OfaconvError
from .report import REPORT_NAME, check_problems, covering_report, manifest_part, manifest_problems, schema_problems

SHOWN_PROBLEMS = 3


def verify(folder, against=None, *, ema: bool | None = None) -> tuple[list[dict], bool]:
    """Check ``folder``; returns the check rows and whether every check passed."""
    root = Path(folder)
    if not root.is_dir():
        raise OfaconvError("not a directory", path=root)
    row, prefix = manifest_check(root)
    if not row["passed"]:
        return [row], False
    home = root.parent if prefix else root
    if covering_report(root)[0].get("format") == "onnx":
        from .export import verify_graphs

        checks = verify_graphs(root)
        return [row, *checks], all(c["passed"] for c in checks)
    checks, passed = registry.family_of_folder(home).load_hooks().verify_folder(root, against, ema=ema)
    if against is None:
        # With --against the family has just rewritten the report's checks; without, the folder is
        # only as proven as the checks its report records.
        recorded = recorded_check(covering_report(root)[0])
        checks, passed = [*checks, recorded], passed and recorded["passed"]
    return [row, *checks], passed


def manifest_check(folder: Path) -> tuple[dict, str]:
    """The ``manifest`` row: the folder's files are exactly its report's manifest (or, for a subfolder
    a conversion wrote, the part of the parent's manifest under its name, returned as the prefix)."""
    try:
        report, prefix = covering_report(folder)
    except OfaconvError as exc:
        return _row(False, f"{exc}; only a folder written by ofaconv can be verified", "")
    problems = schema_problems(report)
    listed = manifest_part(report, prefix)
    if not problems:
        problems = manifest_problems(folder, listed)
    if problems:
        more = f" (+{len(problems) - SHOWN_PROBLEMS} more)" if len(problems) > SHOWN_PROBLEMS else ""
        return _row(False, "; ".join(problems[:SHOWN_PROBLEMS]) + more, prefix)
    where = f"../{REPORT_NAME} under {prefix}" if prefix else REPORT_NAME
    return _row(True, f"{len(listed)} files match {where}, no links", prefix)


def recorded_check(report: dict) -> dict:
    """The ``report`` row: the conversion's own checks (parity against its source) were run and passed."""
    problems = check_problems(report)
    detail = "; ".join(problems) if problems else f"{len(report['checks'])} recorded checks passed"
    return {"name": "report", "passed": not problems, "detail": detail}


def _row(passed: bool, detail: str, prefix: str) -> tuple[dict, str]:
    return {"name": "manifest", "passed": passed, "detail": detail}, prefix


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
    if passed:
        return 0
    failed = [c for c in checks if not c["passed"]]
    detail = " ".join(str(failed[0].get("detail", "")).split())
    print(f"ofaconv: error: {args.folder}: verification failed ({', '.join(c['name'] for c in failed)}: "
          f"{detail[:300]})", file=sys.stderr)
    return 3
