"""``ofaconv clip export-bert``: the text tower as a stock BertModel folder, with or without the
CLIP text projection, plus a sentence-transformers layout; checked by loading it back."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file
from transformers import BertModel

from ofaconv.core.errors import VerificationError
from .source import atomic_output_dir
from .convert import PROBE_TEXTS, load_package
from .package import load_strict, write_text_tower
from .towers import ClipTowers, sentence_transformers_encode

__all__ = ["export_bert"]


def export_bert(src: str | os.PathLike, out: str | os.PathLike, *, with_projection: bool = True,
                overwrite: bool = False, arch: str | None = None, vocab: str | None = None) -> dict:
    pkg, _, _, _ = load_package(src, arch=arch, vocab=vocab)
    model = pkg.build_model()
    towers = ClipTowers(model, pkg.image_processor, pkg.tokenizer, kind=pkg.kind, max_length=pkg.max_length)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        write_text_tower(pkg, tmp, with_projection=with_projection)
        bert = load_strict(BertModel, tmp)  # as a user loads it: a missing pooler must show
        batch = towers.tokenize(PROBE_TEXTS)
        with torch.no_grad():
            out_t = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            pooled = out_t.pooler_output if pkg.kind == "vtde" else out_t.last_hidden_state[:, 0]
            if with_projection:
                expected = towers.encode_token_batch(batch, normalize=False)
                got = pooled @ load_file(str(tmp / "text_projection.safetensors"))["weight"].t()
            else:
                text = model.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                expected = text.pooler_output if pkg.kind == "vtde" else text.last_hidden_state[:, 0]
                got = pooled
            st = sentence_transformers_encode(tmp, batch["input_ids"], batch["attention_mask"], bert)
        diff = float((got - expected).abs().max())
        st_diff = float((st - torch.nn.functional.normalize(expected, dim=-1)).abs().max())
        if diff > 1e-5 or st_diff > 1e-5:
            raise VerificationError(f"exported text tower differs from the source model ({max(diff, st_diff):.3g})",
                                    path=tmp)
    return {"output": str(out), "kind": pkg.kind, "with_projection": with_projection,
            "embedding_dim": int(got.shape[-1]), "max_abs_diff": diff, "sentence_transformers_max_abs_diff": st_diff}
