"""CLIP packages (BertCLIP ``VisionTextDualEncoderModel``, Chinese-CLIP ``ChineseCLIPModel``) as
ONNX graphs (``ofaconv export onnx``; the command is :mod:`ofaconv.core.export`).

``vision.onnx``  ``pixel_values`` [batch, 3, S, S] float32 -> ``image_embeds`` [batch, dim]
``text.onnx``    ``input_ids``, ``attention_mask`` [batch, tokens] int64 -> ``text_embeds`` [batch, dim]
``onnx_clip.json``  ``logit_scale``, the embedding size, the text length the model was trained at

Both embeddings are what :class:`ofaconv.clip.towers.ClipTowers` returns by default
(``encode_images`` / ``encode_texts``): the projected features, L2-normalised, so
``exp(logit_scale) * image_embeds @ text_embeds.T`` are the CLIP logits. Pixels come from the
copied ``preprocessor_config.json``, tokens from the copied tokenizer (truncate at ``max_length``).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["export_onnx", "VISION", "TEXT", "SETTINGS"]

VISION, TEXT, SETTINGS = "vision.onnx", "text.onnx", "onnx_clip.json"


def _graphs(model):
    import torch
    import torch.nn.functional as F

    from .towers import _unwrap

    class VisionGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return F.normalize(_unwrap(self.model.get_image_features(pixel_values=pixel_values)), dim=-1)

    class TextGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            features = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
            return F.normalize(_unwrap(features), dim=-1)

    return VisionGraph().eval(), TextGraph().eval()


def export_onnx(folder, out, *, threads: int | None = None) -> dict:
    """The family hook (:mod:`ofaconv.core.export`): write ``vision.onnx``, ``text.onnx`` and
    ``onnx_clip.json`` into ``out`` and measure them against the package's towers."""
    from ofaconv.core.errors import OfaconvError
    from ofaconv.core.export import trace
    from .convert import PROBE_TEXTS
    from .towers import ClipTowers

    folder, out = Path(folder), Path(out)
    try:
        towers = ClipTowers.from_pretrained(folder)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise OfaconvError(f"cannot load the CLIP package ({str(exc).splitlines()[0][:200]})", path=folder) from None
    vision, text = _graphs(towers.model)
    pixels = _pixels(towers, 2)
    batch = towers.tokenize(PROBE_TEXTS[:2])  # two lengths: the example pads one text
    trace(vision, (pixels,), out / VISION, inputs=["pixel_values"], outputs=["image_embeds"],
          dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}})
    trace(text, (batch["input_ids"], batch["attention_mask"]), out / TEXT, inputs=["input_ids", "attention_mask"],
          outputs=["text_embeds"], dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                                 "attention_mask": {0: "batch", 1: "tokens"}, "text_embeds": {0: "batch"}})
    settings = {"kind": towers.kind, "logit_scale": towers.logit_scale, "max_length": towers.max_length,
                "embedding_dim": int(towers.model.config.projection_dim), "normalized": True}
    (out / SETTINGS).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    graphs = {VISION: {"inputs": ["pixel_values"], "outputs": ["image_embeds"]},
              TEXT: {"inputs": ["input_ids", "attention_mask"], "outputs": ["text_embeds"]}}
    return {"graphs": graphs, "checks": _parity(towers, out, threads)}


def _pixels(towers, n: int):
    from .convert import probe_images

    return towers.preprocess_images(probe_images(n))


def _parity(towers, out: Path, threads) -> list[dict]:
    """Both graphs at batch 1 and 3 (texts of different lengths, one truncated) against the towers."""
    from ofaconv.core.export import inference_session, max_abs_diff, parity_row
    from .convert import PROBE_TEXTS

    vision, text = inference_session(out / VISION, threads), inference_session(out / TEXT, threads)
    checks = []
    for rows in (1, 3):
        pixels = _pixels(towers, rows)
        got = vision.run(None, {"pixel_values": pixels.numpy()})[0]
        checks.append(parity_row(f"vision_batch{rows}", max_abs_diff(got, towers.encode_pixels(pixels).numpy()),
                                 detail="image_embeds vs ClipTowers.encode_pixels"))
        batch = towers.tokenize(PROBE_TEXTS[-rows:])
        got = text.run(None, {k: batch[k].numpy() for k in ("input_ids", "attention_mask")})[0]
        checks.append(parity_row(f"text_batch{rows}", max_abs_diff(got, towers.encode_token_batch(batch).numpy()),
                                 detail="text_embeds vs ClipTowers.encode_token_batch"))
    return checks
