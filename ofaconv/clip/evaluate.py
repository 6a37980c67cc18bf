"""Retrieval evaluation with Chinese-CLIP's protocol (cn_clip/eval, clip.md §D.1).

Features are L2-normalised, text is cut at a 52-token context (``[CLS]`` + 50 pieces + ``[SEP]``)
after cn_clip's text clean-up, a query scores a hit at k when ANY ground-truth id is in its top k,
and mean recall = (R@1 + R@5 + R@10) / 3, all in percent. Image->text inverts the annotations.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ofaconv.core.errors import OfaconvError
from .data import DataStats, read_cnclip_texts, read_image_tsv
from .towers import ClipTowers

__all__ = ["recall_at_k", "evaluate_retrieval", "preprocess_text", "PROTOCOL"]

PROTOCOL = {"context_length": 52, "ks": [1, 5, 10], "hit": "any ground-truth id in top-k",
            "mean_recall": "(R@1+R@5+R@10)/3", "features": "L2-normalised"}


def preprocess_text(text: str) -> str:
    """cn_clip's _preprocess_text: lower-case, curly double quotes to '"'."""
    return text.lower().replace("“", '"').replace("”", '"')


def recall_at_k(sim: torch.Tensor, ground_truth: list[set[int]], ks=(1, 5, 10)) -> dict:
    if sim.shape[0] != len(ground_truth):
        raise ValueError("one ground-truth set per query row")
    k_max = min(max(ks), sim.shape[1])
    top = sim.topk(k_max, dim=1).indices.tolist()
    out = {}
    for k in ks:
        hits = sum(1 for row, gt in zip(top, ground_truth) if gt & set(row[:k]))
        out[f"r{k}"] = 100.0 * hits / max(1, len(ground_truth))
    out["mean_recall"] = sum(out[f"r{k}"] for k in ks) / len(ks)
    return out


def evaluate_retrieval(towers: ClipTowers, texts: Path, images: Path, *, context_length: int = 52,
                       batch_size: int = 64, directions=("text_to_image", "image_to_text")) -> dict:
    stats = DataStats()
    records = read_cnclip_texts(texts, stats)
    store = read_image_tsv(images)
    image_ids = store.ids()
    if not records or not image_ids:
        raise OfaconvError("evaluation needs at least one text and one image", path=texts)
    index = {iid: j for j, iid in enumerate(image_ids)}
    unknown = [(r["text_id"], i) for r in records for i in r["image_ids"] if i not in index]
    if unknown:
        raise OfaconvError(f"text {unknown[0][0]} refers to image {unknown[0][1]} absent from the image TSV",
                           path=texts)
    img = torch.cat([towers.encode_images([store.load(i) for i in image_ids[s : s + batch_size]],
                                          batch_size=batch_size) for s in range(0, len(image_ids), batch_size)])
    txt = towers.encode_texts([preprocess_text(r["text"]) for r in records], batch_size=batch_size,
                              max_length=context_length)
    sim = txt @ img.t()
    result = {"protocol": dict(PROTOCOL, context_length=context_length), "n_texts": len(records),
              "n_images": len(image_ids), "truncated_texts": towers.last_truncated, "bad_rows": stats.bad_rows}
    if "text_to_image" in directions:
        result["text_to_image"] = recall_at_k(sim, [{index[i] for i in r["image_ids"]} for r in records])
    if "image_to_text" in directions:
        gt: dict[int, set[int]] = {}
        for t, r in enumerate(records):
            for i in r["image_ids"]:
                gt.setdefault(index[i], set()).add(t)
        rows = sorted(gt)
        result["image_to_text"] = recall_at_k(sim.t()[rows], [gt[j] for j in rows])
    return result
