"""Image-text, text-text and image-image similarity over given sets (BertCLIP's predict_similarity).

Returns raw cosine similarity AND, as the seed does, the softmax over the candidates of
``exp(logit_scale) * cosine``. Softmax scores are relative to the candidate set, not absolute
similarities. In same-set modes an item never matches itself (the diagonal is excluded), which
needs at least two items. An image that cannot be read is skipped and listed in ``failed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ofaconv.core.errors import DataError, OfaconvError
from ofaconv.core.images import ImageInput
from ofaconv.core.batch import failure_summary
from .towers import ClipTowers

__all__ = ["SimilarityResult", "similarity", "similarity_from_features", "MODES"]

MODES = ("image-text", "text-image", "text-text", "image-image")


@dataclass
class SimilarityResult:
    mode: str
    queries: list
    candidates: list
    cosine: torch.Tensor  # [n_queries, n_candidates]
    probs: torch.Tensor  # row softmax of exp(logit_scale) * cosine, self excluded in same-set modes
    logit_scale: float
    self_excluded: bool
    failed: list = field(default_factory=list)  # (image, reason) of each image skipped as unreadable
    n_images: int = 0  # image inputs given, the failed ones included

    def ranked(self, row: int) -> list[tuple[int, float, float]]:
        """(candidate index, probability, cosine), best first; the excluded self entry is left out."""
        order = torch.sort(self.probs[row], descending=True, stable=True).indices.tolist()  # ties: earlier first
        return [(j, float(self.probs[row, j]), float(self.cosine[row, j])) for j in order
                if not (self.self_excluded and j == row)]

    def to_dict(self) -> dict:
        return {"mode": self.mode, "logit_scale": self.logit_scale, "self_excluded": self.self_excluded,
                "results": [{"query": str(q), "matches": [{"candidate": str(self.candidates[j]), "prob": p, "cosine": c}
                                                         for j, p, c in self.ranked(i)]}
                            for i, q in enumerate(self.queries)],
                "failed": [{"image": where, "error": reason} for where, reason in self.failed]}


def similarity_from_features(a: torch.Tensor, b: torch.Tensor | None, logit_scale: float) -> tuple:
    """(cosine, probs, self_excluded) for L2-normalised features; ``b=None`` means same-set."""
    same = b is None
    if same:
        if a.shape[0] < 2:
            raise OfaconvError(f"same-set similarity needs at least 2 items (an item never matches itself), got {a.shape[0]}")
        b = a
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise OfaconvError("similarity needs at least one query and one candidate")
    cosine = a.float() @ b.float().t()
    logits = cosine * torch.tensor(logit_scale).exp()
    if same:
        logits = logits.masked_fill(torch.eye(a.shape[0], dtype=torch.bool), float("-inf"))
    return cosine, logits.softmax(dim=-1), same


def similarity(towers: ClipTowers, mode: str, queries: list, candidates: list | None = None, *,
               batch_size: int = 64) -> SimilarityResult:
    """``mode`` is one of MODES. image-text / text-image need both sets; same-set modes take
    ``candidates=None`` to compare a set with itself, or a second set of the same kind."""
    if mode not in MODES:
        raise OfaconvError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    q_kind, c_kind = mode.split("-")
    if q_kind != c_kind and not candidates:
        raise OfaconvError(f"mode {mode} needs both {q_kind}s and {c_kind}s")

    failed: list[tuple[str, str]] = []

    def embed(kind, items):
        if kind == "text":
            return towers.encode_texts(items, batch_size=batch_size), items
        feats, kept, skipped = towers.encode_readable_images(items, batch_size=batch_size)
        failed.extend(skipped)
        return feats, [items[i].name if isinstance(items[i], ImageInput) else items[i] for i in kept]

    images = sum(len(items or ()) for kind, items in ((q_kind, queries), (c_kind, candidates)) if kind == "image")
    qa, queries = embed(q_kind, list(queries))
    cb, candidates = embed(c_kind, list(candidates)) if candidates else (None, None)
    try:
        cosine, probs, same = similarity_from_features(qa, cb, towers.logit_scale)
    except OfaconvError as exc:
        if not failed:
            raise
        raise DataError(f"{exc.detail}; {failure_summary(failed, images, 'images')}") from None
    return SimilarityResult(mode=mode, queries=queries, candidates=candidates or queries, cosine=cosine,
                            probs=probs, logit_scale=towers.logit_scale, self_excluded=same, failed=failed,
                            n_images=images)
