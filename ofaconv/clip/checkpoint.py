"""Chinese-CLIP training checkpoints.

Files are read by ``ofaconv.core.loader`` (the one safe loader); this module only interprets the
Chinese-CLIP training checkpoint layout.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch

from ofaconv.core.errors import CheckpointError
from ofaconv.core.loader import check_tensors, load_torch

__all__ = [
    "load_cnclip_pt",
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
