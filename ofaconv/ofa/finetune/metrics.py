"""Caption metrics as the COCO / MUGE evaluation computes them: corpus BLEU-4 and CIDEr-D.

Both follow the coco-caption scorers formula for formula (BLEU with the "closest" reference
length, CIDEr-D with document frequencies over the evaluated references, clipped tf-idf,
Gaussian length penalty sigma 6, scaled by 10), so the numbers are comparable with published
MUGE / COCO scores. Chinese captions are scored over characters (MUGE splits every caption into
characters before scoring); English ones over lower-cased words with ASCII punctuation removed,
as fairseq's caption evaluation does.
"""

from __future__ import annotations

import math
import string
from collections import Counter, defaultdict
from typing import Mapping, Sequence

__all__ = ["tokenize_caption", "corpus_bleu", "cider_d", "exact_match", "caption_metrics"]

_ASCII_PUNCT = str.maketrans("", "", string.punctuation)


def tokenize_caption(text: str, family: str = "cn") -> list[str]:
    """Scoring tokens: characters for Chinese, punctuation-free lower-case words for English."""
    text = text.translate(_ASCII_PUNCT)
    if family == "cn":
        return [ch for ch in text if not ch.isspace()]
    return text.lower().split()


def _ngrams(tokens: Sequence[str], n: int = 4) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            counts[tuple(tokens[i : i + k])] += 1
    return counts


def corpus_bleu(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[Sequence[str]]], n: int = 4) -> list[float]:
    """Cumulative corpus BLEU-1..n over token lists (coco-caption ``Bleu``, option "closest")."""
    tiny, small = 1e-15, 1e-9
    test_len = ref_len = 0
    guess = [0] * n
    correct = [0] * n
    for hyp, hyp_refs in zip(hyps, refs, strict=True):
        max_counts: dict = {}
        for ref in hyp_refs:
            for gram, count in _ngrams(ref, n).items():
                max_counts[gram] = max(max_counts.get(gram, 0), count)
        length = len(hyp)
        # Closest reference length; ties go to the shorter reference.
        ref_len += min((abs(len(r) - length), len(r)) for r in hyp_refs)[1]
        test_len += length
        for gram, count in _ngrams(hyp, n).items():
            correct[len(gram) - 1] += min(max_counts.get(gram, 0), count)
        for k in range(n):
            guess[k] += max(length - k, 0)
    scores, bleu = [], 1.0
    for k in range(n):
        bleu *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(bleu ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def cider_d(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[Sequence[str]]], n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D (coco-caption ``Cider``): mean over images of the per-image score x 10."""
    ref_counts = [[_ngrams(r, n) for r in image_refs] for image_refs in refs]
    hyp_counts = [_ngrams(h, n) for h in hyps]
    if len(hyp_counts) != len(ref_counts):
        raise ValueError(f"{len(hyp_counts)} hypotheses for {len(ref_counts)} reference sets")
    if not hyp_counts:
        return 0.0
    doc_freq: Counter = Counter()
    for image_refs in ref_counts:
        for gram in {g for r in image_refs for g in r}:
            doc_freq[gram] += 1
    log_num_images = math.log(float(len(ref_counts)))

    def to_vec(counts: Counter):
        vec = [defaultdict(float) for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            value = float(tf) * (log_num_images - math.log(max(1.0, doc_freq[gram])))
            vec[k][gram] = value
            norm[k] += value * value
            if k == 1:  # the reference implementation measures length in bigrams
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def sim(vh, nh, lh, vr, nr, lr):
        delta = float(lh - lr)
        out = [0.0] * n
        for k in range(n):
            for gram in vh[k]:
                out[k] += min(vh[k][gram], vr[k][gram]) * vr[k][gram]
            if nh[k] != 0 and nr[k] != 0:
                out[k] /= nh[k] * nr[k]
            out[k] *= math.e ** (-(delta**2) / (2 * sigma**2))
        return out

    total = 0.0
    for hyp, image_refs in zip(hyp_counts, ref_counts):
        vh, nh, lh = to_vec(hyp)
        score = [0.0] * n
        for ref in image_refs:
            vr, nr, lr = to_vec(ref)
            score = [a + b for a, b in zip(score, sim(vh, nh, lh, vr, nr, lr))]
        total += sum(score) / n / len(image_refs) * 10.0
    return total / len(hyp_counts)


def exact_match(hyps: Sequence[str], refs: Sequence[Sequence[str]], family: str = "cn") -> float:
    """Fraction of hypotheses whose scoring tokens equal those of one of their references."""
    if not hyps:
        return 0.0
    hits = 0
    for hyp, image_refs in zip(hyps, refs, strict=True):
        tokens = tokenize_caption(hyp, family)
        hits += any(tokens == tokenize_caption(r, family) for r in image_refs)
    return hits / len(hyps)


def caption_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], family: str = "cn") -> dict:
    """``{"bleu4", "cider_d", "exact_match", "num_images"}`` over the images of ``predictions``."""
    ids = sorted(predictions)
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise ValueError(f"no references for {len(missing)} images (e.g. {missing[0]!r})")
    hyps = [tokenize_caption(predictions[i], family) for i in ids]
    refs = [[tokenize_caption(r, family) for r in references[i]] for i in ids]
    if not ids:
        return {"bleu4": 0.0, "cider_d": 0.0, "exact_match": 0.0, "num_images": 0}
    return {
        "bleu4": corpus_bleu(hyps, refs)[3],
        "cider_d": cider_d(hyps, refs),
        "exact_match": exact_match([predictions[i] for i in ids], [references[i] for i in ids], family),
        "num_images": len(ids),
    }
