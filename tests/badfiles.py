"""Bad inputs for tests: corrupt, malicious and mis-shaped checkpoints (test-only, never shipped)."""

from __future__ import annotations

import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ofaconv.core.loader import load_torch


class _Payload:
    """Unpickling this runs code (it writes ``marker``): the canonical malicious-pickle shape."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


@dataclass
class BadFile:
    path: Path
    kind: str
    key: str | None = None  # the state-dict key at fault, for key-level kinds
    marker: Path | None = None  # for "malicious_pickle": the file its payload would create


BAD_KINDS = (
    "empty", "random_bytes", "truncated", "zip_not_torch", "malicious_pickle", "malicious_legacy", "not_ofa",
    "no_model", "no_args", "text_only_fairseq", "nan_weight", "inf_weight", "missing_key", "missing_layer",
    "extra_key", "misshaped_key", "expanded_weight", "wrong_derived_table", "legacy_torch_format",
)


def expanded_like(tensor: torch.Tensor) -> torch.Tensor:
    """A stride-0 view with ``tensor``'s shape and dtype over one stored element: a few bytes in the
    file that would become the full tensor once copied."""
    return torch.zeros(1, dtype=tensor.dtype).expand(tensor.shape)


def write_bad_checkpoint(path, kind: str, *, base=None, marker=None) -> BadFile:
    """Write one kind of bad OFA input (see ``BAD_KINDS``) to ``path``.

    Kinds derived from a good file (truncated, nan-weight, missing-key, ...) need ``base``, a
    synthetic checkpoint path (micro, with at least 2 encoder and 2 decoder layers).
    "malicious_pickle" writes a ``torch.save`` file whose unpickling would create ``marker``
    (default ``<path>.payload-ran``); "malicious_legacy" the same in the pre-zip format.
    "expanded_weight" stores one weight as a stride-0 view of the right shape.
    "legacy_torch_format" is not bad as such: a valid checkpoint in the pre-zip format
    (torch < 1.6), which loads without mmap.
    """
    path = Path(path)
    kind = kind.replace("-", "_")
    assert kind in BAD_KINDS, f"unknown bad-checkpoint kind {kind!r}"
    result = BadFile(path, kind)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "zip_not_torch":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("README.txt", "not a checkpoint")
    elif kind in ("malicious_pickle", "malicious_legacy"):
        result.marker = Path(marker) if marker else path.with_name(path.name + ".payload-ran")
        torch.save({"model": _Payload(str(result.marker)), "args": None}, path,
                   _use_new_zipfile_serialization=kind == "malicious_pickle")
    elif kind == "not_ofa":
        g = torch.Generator().manual_seed(0)
        torch.save(
            OrderedDict(
                [
                    ("bert.embeddings.word_embeddings.weight", torch.randn(100, 16, generator=g)),
                    ("bert.encoder.layer.0.attention.self.query.weight", torch.randn(16, 16, generator=g)),
                    ("cls.predictions.bias", torch.zeros(100)),
                ]
            ),
            path,
        )
    elif kind == "truncated":
        data = Path(base).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        ckpt, _ = load_torch(base)
        state = ckpt["model"]
        if kind == "no_model":
            del ckpt["model"]
        elif kind == "no_args":
            ckpt["args"], ckpt["cfg"] = None, None
        elif kind == "text_only_fairseq":
            for name in [k for k in state if k.startswith("encoder.embed_images.")]:
                del state[name]
        elif kind in ("nan_weight", "inf_weight"):
            result.key = "encoder.layers.1.fc2.weight" if kind == "nan_weight" else "decoder.layers.0.self_attn.q_proj.bias"
            state[result.key] = state[result.key].clone()
            state[result.key].view(-1)[3] = float("nan") if kind == "nan_weight" else float("inf")
        elif kind == "missing_key":
            result.key = "encoder.layers.1.final_layer_norm.bias"
            del state[result.key]
        elif kind == "missing_layer":
            result.key = "decoder.layers.0"
            for name in [k for k in state if k.startswith("decoder.layers.0.")]:
                del state[name]
        elif kind == "extra_key":
            result.key = "encoder.layers.0.self_attn.extra_proj.weight"
            state[result.key] = torch.zeros_like(state["encoder.layers.0.self_attn.q_proj.weight"])
        elif kind == "misshaped_key":
            result.key = "encoder.layers.1.fc1.bias"
            state[result.key] = torch.zeros(state[result.key].numel() + 1, dtype=state[result.key].dtype)
        elif kind == "expanded_weight":
            result.key = "encoder.layers.0.fc1.weight"
            state[result.key] = expanded_like(state[result.key])
        elif kind == "wrong_derived_table":
            result.key = "decoder.token_rp_bucket"
            state[result.key] = state[result.key].clone()
            state[result.key].view(-1)[5] += 1
        torch.save(ckpt, path, _use_new_zipfile_serialization=kind != "legacy_torch_format")
    return result
