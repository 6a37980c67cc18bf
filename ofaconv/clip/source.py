"""Chinese-CLIP training checkpoints, and atomic folder writing.

Files are read by ``ofaconv.core.loader`` (the one safe loader); this module only interprets the
Chinese-CLIP training checkpoint layout.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors.torch import save_file

from ofaconv.core.errors import CheckpointError
from ofaconv.core.loader import check_tensors, load_torch

__all__ = [
    "load_cnclip_pt",
    "save_safetensors",
    "atomic_output_dir",
]


def load_cnclip_pt(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a Chinese-CLIP training checkpoint: ({epoch, step, name}, state dict without ``module.``)."""
    obj, _ = load_torch(path)
    if not isinstance(obj, Mapping) or "state_dict" not in obj or not isinstance(obj["state_dict"], Mapping):
        got = sorted(map(str, obj))[:6] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"not a Chinese-CLIP checkpoint: expected a dict with 'state_dict', got {got}", path=path)
    meta = {k: obj[k] for k in ("epoch", "step", "name") if k in obj}
    check_tensors(obj["state_dict"], path=path)
    state = {}
    for key, value in obj["state_dict"].items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if name in state:
            raise CheckpointError("duplicate key after stripping 'module.'", path=path, key=key)
        state[name] = value
    return meta, state


def save_safetensors(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp sibling of ``out``; on success it is renamed into place, on failure removed."""
    out = Path(out)
    if out.exists() and not overwrite:
        if not out.is_dir() or any(out.iterdir()):
            raise CheckpointError("output exists and is not empty (pass --overwrite to replace it)", path=out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
