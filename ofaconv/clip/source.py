"""Safe reading of the checkpoints the CLIP tools accept, and atomic folder writing.

Pickled files (``pytorch_model.bin``, Chinese-CLIP ``.pt``) go through ``torch.load(weights_only=
True)`` only: its fixed allow-list (tensors, dicts, lists, numbers, strings) covers every real
file of these formats, and nothing else is ever unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ofaconv.core.errors import CheckpointError

__all__ = [
    "load_pickle_checkpoint",
    "load_cnclip_pt",
    "read_folder_state_dict",
    "read_config",
    "check_finite",
    "save_safetensors",
    "atomic_output_dir",
]


def load_pickle_checkpoint(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("no such file", path=path)
    try:
        with contextlib.suppress(RuntimeError, ValueError):
            if zipfile.is_zipfile(path):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"refused to unpickle (not a plain weights file): {first}", path=path) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"not a readable torch checkpoint (truncated or corrupt?): {first}", path=path) from exc


def load_cnclip_pt(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a Chinese-CLIP training checkpoint: ({epoch, step, name}, state dict without ``module.``)."""
    obj = load_pickle_checkpoint(path)
    if not isinstance(obj, Mapping) or "state_dict" not in obj or not isinstance(obj["state_dict"], Mapping):
        got = sorted(obj)[:6] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"not a Chinese-CLIP checkpoint: expected a dict with 'state_dict', got {got}", path=path)
    meta = {k: obj[k] for k in ("epoch", "step", "name") if k in obj}
    state = {}
    for key, value in obj["state_dict"].items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"state_dict entry is a {type(value).__name__}, not a tensor", path=path, key=key)
        name = key[len("module.") :] if key.startswith("module.") else key
        if name in state:
            raise CheckpointError("duplicate key after stripping 'module.'", path=path, key=key)
        state[name] = value
    return meta, state


def read_config(folder: str | os.PathLike) -> dict:
    cfg_path = Path(folder) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError("no config.json", path=folder)
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"malformed JSON: {exc}", path=cfg_path) from exc
    if not isinstance(cfg, dict):
        raise CheckpointError("config is not a JSON object", path=cfg_path)
    return cfg


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable safetensors file: {exc}", path=path) from exc


def read_folder_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """State dict of a transformers model folder: single or sharded safetensors, else pytorch_model.bin."""
    folder = Path(folder)
    for index_name, loader in (("model.safetensors.index.json", _load_safetensors),
                               ("pytorch_model.bin.index.json", None)):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"malformed shard index: {exc}", path=index) from exc
            state = {}
            for shard in sorted(set(weight_map.values())):
                part = loader(folder / shard) if loader else _bin_state(folder / shard)
                state.update(part)
            missing = sorted(set(weight_map) - set(state))
            if missing:
                raise CheckpointError("key listed in the shard index is absent from its shard", path=index, key=missing[0])
            return state
    if (folder / "model.safetensors").is_file():
        return _load_safetensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return _bin_state(folder / "pytorch_model.bin")
    raise CheckpointError("no model.safetensors or pytorch_model.bin", path=folder)


def _bin_state(path: Path) -> dict[str, torch.Tensor]:
    obj = load_pickle_checkpoint(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a state dict, got {type(obj).__name__}", path=path)
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"entry is a {type(value).__name__}, not a tensor", path=path, key=key)
    return dict(obj)


def check_finite(state: Mapping[str, torch.Tensor], *, path=None) -> None:
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError("tensor holds NaN or Inf values", path=path, key=key)


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
