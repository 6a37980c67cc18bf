"""``ofaconv`` command line: one sub-command per module, each exposing ``add_parser(subparsers)``.

A sub-command's ``add_parser`` sets ``func`` (called with the parsed args, returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import OfaconvError

# Modules that register sub-commands, in the order they appear in --help.
COMMAND_MODULES = [
    "ofaconv.convert",
    "ofaconv.inspect",
    "ofaconv.verify",
    "ofaconv.synth",
    "ofaconv.caption",
    "ofaconv.hub.push",
    "ofaconv.hub.upgrade",
    "ofaconv.finetune.cli",
    "ofaconv.clip.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ofaconv",
        description="Convert fairseq OFA checkpoints to Hugging Face transformers and prove parity.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"ofaconv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # not written yet in this checkout
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
