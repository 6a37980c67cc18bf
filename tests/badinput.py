"""The bad-input harness shared by test_bad_input.py (OFA and core commands) and test_bad_input_clip.py
(``ofaconv clip``): a table row (:class:`Case`), small input writers, and :func:`check`, which runs a
row and asserts the error contract: the right non-zero exit, no traceback, exactly one
``ofaconv: error:`` line naming the input at fault, none of other tools' wording, and nothing left
where output would go (an absent path stays absent, an existing file or folder unchanged, no hidden
temp sibling or lock file).

Rows run ``ofaconv.cli.main`` in the test process, except those where a crash, an abort or a closed
pipe is the risk (``subprocess=True``), which run ``python -m ofaconv``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

# Other tools' wording that must not reach an ofaconv error line (torch's unsafe-load hint and its
# colour codes, Python 2 pickle names such as commands.Popen for subprocess.Popen).
FOREIGN = ("Traceback", "weights_only", "\x1b[", "commands.", "pytorch.org", "Please ")


@dataclass
class Case:
    id: str
    argv: Callable  # inputs -> argv
    names: Callable  # inputs -> text (or a tuple of texts) the error line must contain: the input at fault
    out: Callable | None = None  # inputs -> where output would go (absent, or unchanged if it existed)
    code: int = 2
    subprocess: bool = False
    partial: bool = False  # a batch with some good items: its result is written, and it still exits 2
    no_gpu: bool = False  # run as on a machine without a GPU


def png(path: Path, color="red", size=(24, 20)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def b64_png(color, *, urlsafe: bool = False) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (20, 16), color).save(buf, format="PNG")
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    return encode(buf.getvalue()).decode()


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def snapshot(path: Path) -> dict | None:
    """What is at ``path`` (file bytes or a folder's tree), to tell "unchanged" from "written"."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def cli_env() -> dict:
    """The environment of a ``python -m ofaconv`` run: one thread, offline, no --debug tracebacks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("OFACONV_DEBUG", None)
    return env


def run(case: Case, argv: list[str], capfd, monkeypatch) -> tuple[int, str]:
    """Exit code and stderr of one row."""
    if case.subprocess:
        proc = subprocess.run([sys.executable, "-m", "ofaconv", *argv], capture_output=True, text=True, env=cli_env(),
                              timeout=300)
        return proc.returncode, proc.stderr
    from ofaconv.cli import main

    if case.no_gpu:
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    capfd.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's mistakes exit as argparse does
        code = exc.code
    return code, capfd.readouterr().err


def check(case: Case, inputs, capfd, monkeypatch) -> None:
    """Run ``case`` against ``inputs`` (which has ``marker``: a file a malicious pickle would create)."""
    out = case.out(inputs) if case.out else None
    before = snapshot(out) if out else None
    siblings = set(out.parent.iterdir()) if out else set()
    code, err = run(case, case.argv(inputs), capfd, monkeypatch)
    assert code == case.code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ofaconv: error: "), err
    names = case.names(inputs)
    assert all(text in lines[0] for text in (names if isinstance(names, tuple) else (names,))), lines[0]
    assert not any(word in lines[0] for word in FOREIGN), lines[0]
    if case.partial:
        assert " failed (first: " in lines[0]
    if out is not None:
        assert snapshot(out) == before, f"{out} was written"
        assert set(out.parent.iterdir()) == siblings, "a temp sibling or lock file was left behind"
    assert not inputs.marker.exists()
