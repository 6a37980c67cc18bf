"""``ofaconv clip export-bert``: the text tower as a stock BertModel folder, with or without the
CLIP text projection, plus a sentence-transformers layout; checked by loading it back."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import BertModel

from ofaconv.core.digest import file_sha256
from ofaconv.core.errors import VerificationError
from ofaconv.core.writer import OutputFolder
from .convert import PROBE_TEXTS, load_package, source_entry, source_weights
from .package import clip_report, load_strict, write_text_tower
from .towers import ClipTowers, sentence_transformers_encode

__all__ = ["export_bert"]


def export_bert(src: str | os.PathLike, out: str | os.PathLike, *, with_projection: bool = True,
                force: bool = False, arch: str | None = None, vocab: str | None = None) -> dict:
    pkg, _, _, _ = load_package(src, arch=arch, vocab=vocab)
    model = pkg.build_model()
    towers = ClipTowers(model, pkg.image_processor, pkg.tokenizer, kind=pkg.kind, max_length=pkg.max_length)
    with OutputFolder(out, force=force, protect=[src]) as folder:
        tmp = folder.path
        write_text_tower(pkg, folder, "", with_projection=with_projection)
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
        checks = [{"name": name, "passed": True, "metric": "max_abs_diff", "value": value, "gate": 1e-5,
                   "detail": detail} for name, value, detail in (
            ("text_embedding", diff, "BertModel.from_pretrained of the folder vs the source model's text embedding"),
            ("sentence_transformers", st_diff, "the folder's sentence-transformers layout vs the normalised embedding"))]
        weights = source_weights(Path(src))
        folder.commit(clip_report(pkg, kind="conversion", source=source_entry(weights, file_sha256(weights)),
                                  checks=checks, exported="text tower (BertModel)", with_projection=with_projection))
    return {"output": str(out), "kind": pkg.kind, "with_projection": with_projection,
            "embedding_dim": int(got.shape[-1]), "max_abs_diff": diff, "sentence_transformers_max_abs_diff": st_diff}
