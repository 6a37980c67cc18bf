"""Start-up cost: `import ofaconv` is cheap, `ofaconv --help` and every command's and subcommand's
--help import neither torch nor transformers, the Auto registration happens when transformers'
factory modules load (in either import order), `ofaconv convert` never imports the transformers
model, trainer or image machinery, and the source hash is exact and can be stopped."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import subprocess
import sys
import threading

import pytest

from ofaconv.core.digest import BackgroundSha256, file_sha256

HEAVY = ("transformers.modeling_utils", "transformers.processing_utils", "transformers.trainer", "torchvision")


def run_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_import_ofaconv_imports_neither_torch_nor_transformers():
    out = run_python("import sys, ofaconv; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert out.strip() == "[]"


def _help_paths() -> list[tuple[str, ...]]:
    """Every command path of the CLI as the parser has it: (), ("convert",), ("clip", "train"), ..."""
    import argparse

    from ofaconv.cli import build_parser

    def walk(parser, path):
        yield path
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from walk(child, (*path, name))

    return list(walk(build_parser(), ()))


HELP_PATHS = _help_paths()
# Runs ``python -m ofaconv ARGS --help`` with a finder that records every top-level import asked for
# (also one a try/except would swallow); prints the exit code and the heavy ones asked for.
_HELP_RUN = """
import json, runpy, sys

asked = set()

class Recorder:
    def find_spec(self, name, path=None, target=None):
        asked.add(name.partition(".")[0])
        return None

sys.meta_path.insert(0, Recorder())
sys.argv = ["ofaconv", *json.loads(sys.argv[1]), "--help"]
try:
    runpy.run_module("ofaconv", run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "transformers") if m in asked or m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


def test_every_command_is_checked():
    commands = {path[0] for path in HELP_PATHS if path}
    assert {"convert", "caption", "verify", "export", "push", "clip"} <= commands
    assert ("clip", "train") in HELP_PATHS and ("export", "onnx") in HELP_PATHS


@pytest.mark.parametrize("path", HELP_PATHS, ids=lambda p: " ".join(p) or "ofaconv")
def test_help_imports_neither_torch_nor_transformers(path):
    proc = subprocess.run([sys.executable, "-c", _HELP_RUN, json.dumps(path)], capture_output=True, text=True,
                          timeout=300)
    result = json.loads(proc.stderr.strip().splitlines()[-1])
    assert result["code"] == 0, proc.stderr
    assert "usage: ofaconv" in proc.stdout and (not path or path[-1] in proc.stdout.partition("\n")[0])
    assert result["heavy"] == [], f"`ofaconv {' '.join(path)} --help` imported {result['heavy']}"


@pytest.mark.slow
@pytest.mark.parametrize("order", ["ofaconv-first", "transformers-first"])
def test_auto_classes_resolve_in_either_import_order(converted_cn, order):
    imports = ("import ofaconv\nfrom transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoProcessor, AutoImageProcessor"
               if order == "ofaconv-first" else
               "from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoProcessor, AutoImageProcessor\nimport ofaconv")
    out = run_python(f"""
{imports}
import json
folder = {str(converted_cn)!r}
print(json.dumps([type(AutoConfig.from_pretrained(folder)).__module__,
                  type(AutoModelForSeq2SeqLM.from_pretrained(folder)).__module__,
                  type(AutoProcessor.from_pretrained(folder)).__module__,
                  type(AutoImageProcessor.from_pretrained(folder)).__module__]))
""")
    assert json.loads(out.strip().splitlines()[-1]) == [
        "ofaconv.ofa.modeling.configuration_ofa",
        "ofaconv.ofa.modeling.modeling_ofa",
        "ofaconv.ofa.modeling.processing_ofa",
        "ofaconv.ofa.modeling.image_processing_ofa",
    ]


def test_convert_command_does_not_import_transformers(cn_checkpoint, tmp_path):
    """config, generation config, tokenizer and processor files are written without it."""
    src = cn_checkpoint
    out = run_python(f"""
import sys
from ofaconv.cli import main
assert main(["convert", {str(src)!r}, {str(tmp_path / "out")!r}]) == 0
print(sorted(m for m in ("transformers", *{HEAVY!r}) if m in sys.modules))
""")
    assert out.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("argv, code", [(["inspect"], 0), (["convert", "--dtype", "fp64"], 2)])
def test_cli_exit_after_torch_runs_the_python_side_of_exit(cn_checkpoint, tmp_path, argv, code):
    """The entry point skips libtorch's teardown, not Python's: the exit code, everything printed
    (to a pipe, so block-buffered), atexit handlers and non-daemon threads all survive."""
    argv = [argv[0], str(cn_checkpoint), *([str(tmp_path / "out")] if argv[0] == "convert" else []), *argv[1:]]
    proc = subprocess.run([sys.executable, "-c", f"""
import atexit, sys, threading, time
import torch  # the fast exit is taken once torch is imported
from ofaconv.cli import run
atexit.register(lambda: print("atexit ran", flush=True))
threading.Thread(target=lambda: (time.sleep(0.5), print("thread finished", flush=True))).start()
sys.stdout.write("x" * 100000 + "\\n")
sys.argv = ["ofaconv", *{argv!r}]
run()
"""], capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "x" * 100000 and lines[-2:] == ["thread finished", "atexit ran"], lines[-3:]
    assert (code == 0) == (len(lines) > 3)  # inspect's table, or convert's one-line error on stderr
    assert code == 0 or proc.stderr.count("\n") == 1


@pytest.mark.slow
def test_convert_verify_with_cold_imports(cn_checkpoint, tmp_path):
    """--verify imports the model code on a thread while the weights are written; with no bytecode
    cached (a fresh install) that import is still running when the checks start, and transformers'
    lazy module must not be imported from two threads at once."""
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(tmp_path / "pycache"), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "ofaconv", "convert", str(cn_checkpoint), str(tmp_path / "out"),
                           "--verify"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def cn_checkpoint(micro_converted):
    return micro_converted("ofa-cn-base")[1]


@pytest.fixture(scope="module")
def converted_cn(micro_converted):
    return micro_converted("ofa-cn-base")[0]


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 3 * 4096 + 17])
def test_file_sha256_matches_hashlib(tmp_path, size):
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * (size // 256) + bytes(size % 256))
    assert file_sha256(path, chunk_bytes=4096) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert BackgroundSha256(path).result() == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="multiple of the page size"):
        file_sha256(path, chunk_bytes=1000)


def test_file_sha256_stops_when_asked(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 3 * 4096)
    stop = threading.Event()
    stop.set()
    with pytest.raises(concurrent.futures.CancelledError):
        file_sha256(path, chunk_bytes=4096, stop=stop)
    background = BackgroundSha256(path)
    background.cancel()
    try:
        background.result()  # finished before the cancel, or stopped by it
    except concurrent.futures.CancelledError:
        pass


def test_api_names_stay_functions_once_their_submodules_are_imported():
    """``ofaconv.clip.convert`` / ``.similarity`` / ``.embed`` are the API functions, also after the
    CLI (or anyone) imported the submodules of the same names."""
    import importlib
    import types

    import ofaconv.clip as clip

    names = ("convert", "similarity", "embed")
    modules = [importlib.import_module(f"ofaconv.clip.{name}") for name in names]
    import ofaconv.clip.convert  # noqa: F401 - the import statement sets the package attribute too

    assert all(isinstance(m, types.ModuleType) for m in modules)
    assert [type(getattr(clip, name)).__name__ for name in names] == ["function"] * 3
