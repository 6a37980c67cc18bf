"""Retrieval evaluation with Chinese-CLIP's protocol (cn_clip/eval, clip.md §D.1).

Features are L2-normalised, text is cut at a 52-token context (``[CLS]`` + 50 pieces + ``[SEP]``)
after cn_clip's text clean-up, a query scores a hit at k when ANY ground-truth id is in its top k,
and mean recall = (R@1 + R@5 + R@10) / 3, all in percent. Image->text inverts the annotations.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ofaconv.core.errors import DataError
from ofaconv.core.batch import failure_summary
from .data import DataStats, read_cnclip_texts, read_image_tsv
from .towers import ClipTowers

__all__ = ["top_k", "recall_at_k", "evaluate_retrieval", "preprocess_text", "PROTOCOL"]

PROTOCOL = {"context_length": 52, "ks": [1, 5, 10], "hit": "any ground-truth id in top-k",
            "mean_recall": "(R@1+R@5+R@10)/3", "features": "L2-normalised"}


def preprocess_text(text: str) -> str:
    """cn_clip's _preprocess_text: lower-case, curly double quotes to '"'."""
    return text.lower().replace("“", '"').replace("”", '"')


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of the ``k`` best scores per row, best first. Equal scores keep column order,
    as the protocol's stable ``sorted(..., reverse=True)`` does: the earlier gallery item ranks first
    (``torch.topk`` breaks such ties its own way, which moves R@k on galleries with duplicates)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


def recall_at_k(sim: torch.Tensor, ground_truth: list[set[int]], ks=(1, 5, 10)) -> dict:
    if sim.shape[0] != len(ground_truth):
        raise ValueError("one ground-truth set per query row")
    top = top_k(sim, min(max(ks), sim.shape[1])).tolist()
    out = {}
    for k in ks:
        hits = sum(1 for row, gt in zip(top, ground_truth) if gt & set(row[:k]))
        out[f"r{k}"] = 100.0 * hits / max(1, len(ground_truth))
    out["mean_recall"] = sum(out[f"r{k}"] for k in ks) / len(ks)
    return out


def evaluate_retrieval(towers: ClipTowers, texts: Path, images: Path, *, context_length: int = 52,
                       batch_size: int = 64, directions=("text_to_image", "image_to_text")) -> dict:
    """Recall in both directions. Unusable items are skipped and counted: text lines (``bad_rows``)
    and images that do not decode (``bad_images``, left out of the gallery; their captions still
    count as queries). ``failed`` lists each as (file:line, reason)."""
    stats, failed = DataStats(), []
    records = read_cnclip_texts(texts, stats, failed)
    store = read_image_tsv(images)
    image_ids = store.ids()
    if not records:
        raise DataError("no usable text; evaluation needs at least one" + (
            f" ({failure_summary(failed, stats.rows, 'lines')})" if failed else ""), path=texts)
    unknown = [(r["where"], i) for r in records for i in r["image_ids"] if i not in store]
    if unknown:
        raise DataError(f"refers to image {unknown[0][1]}, absent from {images}; evaluate on the matching "
                        "texts and images files", path=unknown[0][0])
    img, kept, skipped = towers.encode_readable_images(image_ids, load=store.load, batch_size=batch_size)
    for where, reason in skipped:
        stats.bad("bad_images", f"{where}: {reason}")
    failed += skipped
    if not kept:
        raise DataError(f"no image decodes ({failure_summary(skipped, len(image_ids), 'images')})", path=images)
    index = {image_ids[j]: n for n, j in enumerate(kept)}
    txt = towers.encode_texts([preprocess_text(r["text"]) for r in records], batch_size=batch_size,
                              max_length=context_length)
    sim = txt @ img.t()
    result = {"protocol": dict(PROTOCOL, context_length=context_length), "n_texts": len(records),
              "n_images": len(kept), "truncated_texts": towers.last_truncated, "bad_rows": stats.bad_rows,
              "bad_images": stats.bad_images, "failed": [{"item": w, "error": r} for w, r in failed],
              "items": stats.rows + len(image_ids)}
    if "text_to_image" in directions:
        result["text_to_image"] = recall_at_k(sim, [{index[i] for i in r["image_ids"] if i in index} for r in records])
    if "image_to_text" in directions:
        gt: dict[int, set[int]] = {}
        for t, r in enumerate(records):
            for i in r["image_ids"]:
                if i in index:
                    gt.setdefault(index[i], set()).add(t)
        rows = sorted(gt)
        result["image_to_text"] = recall_at_k(sim.t()[rows], [gt[j] for j in rows])
    return result
