"""``ofaconv`` command line: one sub-command per module, each exposing ``add_parser(subparsers)``.

A sub-command's ``add_parser`` sets ``func`` (called with the parsed args, returns an exit code).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import os
import sys
import threading

from .core import registry
from .core.errors import OfaconvError

# Sub-command -> the module whose ``add_parser`` registers it, in the order of --help: the
# family-independent commands, then each family's (ofaconv.core.registry). Only the module of the
# command being run is imported: the others pull in transformers' model, trainer and image
# machinery, seconds of start-up that e.g. ``ofaconv convert`` never needs.
CORE_COMMANDS = {
    "verify": "ofaconv.core.verify",
    "export": "ofaconv.core.export",
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


class CommandParser(argparse.ArgumentParser):
    """ofaconv's parsers. A command-line mistake is one ``ofaconv: error:`` line. Options may come
    before, between or after positionals (``ofaconv synth VARIANT --full OUT.pt``, ``ofaconv caption
    FOLDER --out x.jsonl a.jpg b.jpg``): plain argparse hands an optional positional (``nargs="?"`` or
    ``"*"``) an empty match at the first option and then refuses what follows; intermixed parsing
    does not. A parser with commands of its own (``ofaconv clip``) parses as usual; its commands'
    parsers are of this class too."""

    _intermixing = False

    def error(self, message: str):
        """A command-line mistake is one line in the error contract's form (argparse prints the usage too)."""
        command = self.prog.partition(" ")[2]
        where = f"{command}: " if command else ""
        self.exit(2, f"ofaconv: error: {where}{' '.join(message.split())} (see `{self.prog} --help`)\n")

    def parse_known_args(self, args=None, namespace=None):
        nested = any(a.nargs in (argparse.PARSER, argparse.REMAINDER) for a in self._get_positional_actions())
        if self._intermixing or nested:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="ofaconv",
        description="Convert fairseq OFA checkpoints to Hugging Face transformers and prove parity.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"ofaconv {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of a failure (also OFACONV_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in commands().items():
        if command is None or name == command:
            importlib.import_module(module).add_parser(sub)
    return parser


def _debug(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("OFACONV_DEBUG", "") not in ("", "0")


def _unexpected(exc: BaseException) -> str:
    """One line for a failure that is not an ``OfaconvError``: the file when the OS names one."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}; check the path, its permissions and the free space"
    if isinstance(exc, MemoryError):
        return "out of memory; try a smaller --batch-size or a machine with more memory"
    if isinstance(exc, RecursionError):
        return "input nested too deeply to process"
    text = " ".join(str(exc).split())[:300]
    return f"unexpected {type(exc).__name__}: {text} (run with --debug for the traceback and report it)"


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0 ok, 2 bad input, 3 failed verification, 1 anything unexpected,
    130 interrupted, 141 output pipe closed (``ofaconv caption ... | head``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = _debug(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        parser = build_parser(_command(argv))
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except OfaconvError as exc:
        if debug:
            raise
        print(f"ofaconv: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("ofaconv: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away: say nothing more on a closed pipe (and keep Python's exit-time flush quiet).
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - the CLI boundary: one line, the traceback only with --debug
        if debug:
            raise
        print(f"ofaconv: error: {_unexpected(exc)}", file=sys.stderr)
        return 1


def run() -> None:
    """The console entry point (``ofaconv``, ``python -m ofaconv``): ``main``, then exit with its code."""
    code = main()
    if "torch" not in sys.modules:
        sys.exit(code)
    # An interpreter that imported torch spends about half a CPU-second at exit in libtorch's static
    # destructors, after the command's work is done (a tenth of a large conversion). Do what a normal
    # exit does for Python code (join non-daemon threads, run atexit: logging, multiprocessing,
    # weakref finalizers, flush the standard streams), then leave without the C++ teardown.
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is None:
        sys.exit(code)
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
