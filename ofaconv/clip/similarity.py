"""Image-text, text-text and image-image similarity over given sets (BertCLIP's predict_similarity).

Returns raw cosine similarity AND, as the seed does, the softmax over the candidates of
``exp(logit_scale) * cosine``. Softmax scores are relative to the candidate set, not absolute
similarities. In same-set modes an item never matches itself (the diagonal is excluded), which
needs at least two items.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ofaconv.core.errors import OfaconvError
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

    def ranked(self, row: int) -> list[tuple[int, float, float]]:
        """(candidate index, probability, cosine), best first; the excluded self entry is left out."""
        order = torch.argsort(self.probs[row], descending=True).tolist()
        return [(j, float(self.probs[row, j]), float(self.cosine[row, j])) for j in order
                if not (self.self_excluded and j == row)]

    def to_dict(self) -> dict:
        return {"mode": self.mode, "logit_scale": self.logit_scale, "self_excluded": self.self_excluded,
                "results": [{"query": str(q), "matches": [{"candidate": str(self.candidates[j]), "prob": p, "cosine": c}
                                                         for j, p, c in self.ranked(i)]}
                            for i, q in enumerate(self.queries)]}


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

    def embed(kind, items):
        if kind == "image":
            return towers.encode_images(items, batch_size=batch_size)
        return towers.encode_texts(items, batch_size=batch_size)

    qa = embed(q_kind, queries)
    cb = embed(c_kind, candidates) if candidates else None
    cosine, probs, same = similarity_from_features(qa, cb, towers.logit_scale)
    return SimilarityResult(mode=mode, queries=list(queries), candidates=list(candidates or queries), cosine=cosine,
                            probs=probs, logit_scale=towers.logit_scale, self_excluded=same)
