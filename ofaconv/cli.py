"""``ofaconv`` command line: one sub-command per module, each exposing ``add_parser(subparsers)``.

A sub-command's ``add_parser`` sets ``func`` (called with the parsed args, returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .core import registry
from .core.errors import OfaconvError

# Sub-command -> the module whose ``add_parser`` registers it, in the order of --help: the
# family-independent commands, then each family's (ofaconv.core.registry). Only the module of the
# command being run is imported: the others pull in transformers' model, trainer and image
# machinery, seconds of start-up that e.g. ``ofaconv convert`` never needs.
CORE_COMMANDS = {
    "verify": "ofaconv.core.verify",
    "push": "ofaconv.hub.push",
}


def commands() -> dict[str, str]:
    found = dict(registry.commands())
    clash = sorted(set(found) & set(CORE_COMMANDS))
    if clash:
        raise OfaconvError(f"a family redefines the command {clash[0]!r}", path="pyproject.toml")
    return {**found, **CORE_COMMANDS}


def _command(argv: list[str]) -> str | None:
    """The sub-command named by ``argv``, or None when the full parser is needed (help, errors)."""
    for arg in argv:
        if arg.startswith("-"):
            return None
        return arg if arg in commands() else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ofaconv",
        description="Convert fairseq OFA checkpoints to Hugging Face transformers and prove parity.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"ofaconv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in commands().items():
        if command is None or name == command:
            importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except OfaconvError as exc:
        print(f"ofaconv: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("ofaconv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
