"""The CLIP key maps (``mappings/<name>.yaml``, run by :mod:`ofaconv.core.keymap`) and the CLIP data tables.

Each CLIP layout change is one fail-closed key map; counts (layers) are read off the state, so a map
applies to every size. Where a source comes in more than one layout (flat or nested VTDE vision keys,
BertModel or BertForMaskedLM), the caller names the candidate maps and exactly one must fit.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Mapping, Sequence

import torch
import yaml

from ofaconv.core.errors import KeyMapError
from ofaconv.core.keymap import KeyMap

__all__ = ["clip_tables", "load_map", "apply_map"]

TABLES = "clip/clip_architectures.yaml"


@functools.lru_cache(maxsize=None)
def clip_tables() -> dict:
    """``mappings/clip_architectures.yaml``: Chinese-CLIP architectures, text defaults, image statistics."""
    data = yaml.safe_load(resources.files("ofaconv.mappings").joinpath(TABLES).read_text())
    if data.get("schema") != "ofaconv/clip-architectures@1":
        raise KeyMapError("unexpected schema", path=f"mappings/{TABLES}")
    return data


@functools.lru_cache(maxsize=None)
def load_map(name: str) -> KeyMap:
    return KeyMap.load(name)


def apply_map(names: str | Sequence[str], state: Mapping[str, torch.Tensor], *, path=None) -> dict[str, torch.Tensor]:
    """Map ``state`` with the one key map of ``names`` it follows; the result is materialised (ops applied)."""
    names = (names,) if isinstance(names, str) else tuple(names)
    plans, errors = [], []
    for name in names:
        keymap = load_map(name)
        try:
            plans.append(keymap.plan(state, keymap.infer_counts(state), source_path=path))
        except KeyMapError as exc:
            errors.append(exc)
    if len(plans) > 1:
        raise KeyMapError(f"ambiguous layout: follows the key maps {', '.join(p.keymap.name for p in plans)}", path=path)
    if not plans:
        if len(errors) == 1:
            raise errors[0]
        raise KeyMapError(f"follows none of the key maps {', '.join(names)} ({'; '.join(map(str, errors))})",
                          path=path, key=errors[0].key)
    return plans[0].materialize(state)
