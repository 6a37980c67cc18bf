"""Generation parity: the converted model's ``generate`` against the reference's own fairseq-style
generator (``ofaconv.ofa.reference.generator.SequenceGenerator`` over ``FairseqReference``), which
shares no code with the model.

:func:`compare_generation` runs greedy, beam 5 and beam 8 (or the modes given) on both sides and
compares the top hypotheses token for token; it also checks that the model's cached and uncached
decoding give the same tokens.
"""

from __future__ import annotations

import math

import torch

from .reference.generator import SequenceGenerator

MODES = {"greedy": 1, "beam5": 5, "beam8": 8}
# fairseq SequenceGenerator knobs (ofa.md §E.3, English caption eval); callers override them.
DEFAULT_SETTINGS = {
    "max_len_a": 0,
    "max_len_b": 16,
    "min_len": 1,
    "no_repeat_ngram_size": 3,
    "lenpen": 1.0,
    "temperature": 1.0,
    "normalize_scores": True,
    "unk_penalty": 0.0,
    "constraint_range": None,
}


def hypothesis_tokens(row: list[int], bos: int = 0, eos: int = 2, pad: int = 1) -> list[int]:
    """A generated row (``<s> ... </s> <pad>...``) as fairseq's hypothesis tokens (``... </s>``)."""
    if row and row[0] == bos:
        row = row[1:]
    if eos in row:
        row = row[: row.index(eos) + 1]
    return [t for t in row if t != pad]


def _model_generate(model, inputs: dict, beam: int, settings: dict, use_cache: bool, encoder_outputs=None):
    out = model.generate(
        input_ids=inputs["input_ids"],
        encoder_outputs=encoder_outputs,  # None: generate encodes the inputs itself
        patch_images=inputs.get("patch_images"),
        patch_masks=inputs.get("patch_masks"),
        attention_mask=inputs.get("attention_mask"),
        num_beams=beam,
        max_len_a=settings["max_len_a"],
        max_len_b=settings["max_len_b"],
        min_len=settings["min_len"],
        no_repeat_ngram_size=settings["no_repeat_ngram_size"],
        lenpen=settings["lenpen"],
        fairseq_temperature=settings["temperature"],
        normalize_scores=settings["normalize_scores"],
        unk_penalty=settings["unk_penalty"],
        constraint_range=settings["constraint_range"],
        use_cache=use_cache,
        return_dict_in_generate=True,
    )
    config = model.config
    rows = [hypothesis_tokens(r, config.decoder_start_token_id, config.eos_token_id, config.pad_token_id)
            for r in out.sequences.tolist()]
    return rows, out.sequences_scores.tolist()


@torch.no_grad()
def reference_hypotheses(reference, inputs: dict, settings: dict | None = None, modes: dict | None = None, *,
                         encoder_out=None) -> dict[str, tuple[list[list[int]], list[float]]]:
    """``{mode: (top hypothesis tokens, their scores)}`` per sentence from the reference generator.

    ``encoder_out``: the reference's fairseq-layout encoding of ``inputs`` if the caller already
    has it (``reference._encode(...)``); every mode reuses it instead of encoding again.
    """
    knobs = _knobs(settings)
    results = {}
    for mode, beam in (modes or MODES).items():
        generator = SequenceGenerator(
            reference,
            beam_size=beam,
            max_len_a=knobs["max_len_a"],
            max_len_b=knobs["max_len_b"],
            min_len=knobs["min_len"],
            no_repeat_ngram_size=knobs["no_repeat_ngram_size"],
            lenpen=knobs["lenpen"],
            temperature=knobs["temperature"],
            normalize_scores=knobs["normalize_scores"],
            unk_penalty=knobs["unk_penalty"],
            constraint_range=knobs["constraint_range"],
        )
        ref = generator.generate(inputs["input_ids"], inputs.get("patch_images"), inputs.get("patch_masks"),
                                 encoder_out=encoder_out)
        results[mode] = ([hypos[0]["tokens"].tolist() for hypos in ref], [hypos[0]["score"] for hypos in ref])
    return results


def _knobs(settings: dict | None) -> dict:
    knobs = {**DEFAULT_SETTINGS, **(settings or {})}
    knobs.pop("beam_size", None)
    return knobs


@torch.no_grad()
def model_hypotheses(model, inputs: dict, settings: dict | None = None, modes: dict | None = None,
                     check_cache=True, *, encoder_outputs=None) -> dict[str, dict]:
    """``{mode: {"tokens", "scores"[, "uncached"]}}``: ``model.generate``'s top hypothesis per
    sentence (and, for the modes ``check_cache`` names — True: all — the uncached decoding's)."""
    knobs = _knobs(settings)
    results = {}
    for mode, beam in (modes or MODES).items():
        tokens, scores = _model_generate(model, inputs, beam, knobs, True, encoder_outputs)
        results[mode] = {"tokens": tokens, "scores": scores}
        if check_cache is True or (check_cache and mode in check_cache):
            results[mode]["uncached"] = _model_generate(model, inputs, beam, knobs, False, encoder_outputs)[0]
    return results


def compare_hypotheses(ours: dict, expected: dict) -> dict:
    """:func:`model_hypotheses` vs :func:`reference_hypotheses`, as :func:`compare_generation` reports."""
    report: dict = {"identical": True, "mismatches": [], "modes": {}}
    for mode, mine in ours.items():
        ref_rows, ref_scores = expected[mode]
        rows, scores = mine["tokens"], mine["scores"]
        same = 0
        score_diff = 0.0
        for i, (a, b) in enumerate(zip(rows, ref_rows)):
            if a == b:
                same += 1
                score_diff = max(score_diff, abs(scores[i] - ref_scores[i]) if math.isfinite(scores[i]) else 0.0)
            else:
                report["mismatches"].append({"mode": mode, "index": i, "model": a, "reference": b, "cache": False})
        entry = {"identical": same, "total": len(ref_rows), "max_score_diff": score_diff}
        if "uncached" in mine:
            cache_same = 0
            for i, (a, b) in enumerate(zip(rows, mine["uncached"])):
                if a == b:
                    cache_same += 1
                else:
                    report["mismatches"].append({"mode": mode, "index": i, "cached": a, "uncached": b, "cache": True})
            entry["cache_identical"] = cache_same
        report["modes"][mode] = entry
    report["identical"] = not report["mismatches"]
    return report


@torch.no_grad()
def compare_generation(model, reference, inputs: dict, settings: dict | None = None, modes: dict | None = None,
                       check_cache=True, *, encoder_outputs=None, reference_encoder_out=None) -> dict:
    """Top hypotheses of ``model.generate`` vs the reference generator, per mode.

    Args:
        model: an ``OFAForConditionalGeneration`` (eval mode).
        reference: a ``FairseqReference`` over the source fairseq state dict.
        inputs: ``input_ids`` (and ``patch_images``, ``patch_masks``, optionally ``attention_mask``
            — the reference reads padding from the pad id, as fairseq does).
        settings: fairseq knobs overriding :data:`DEFAULT_SETTINGS` (``beam_size`` comes from the mode).
        modes: ``{name: beam_size}``, default greedy / beam5 / beam8.
        check_cache: also decode without the key/value cache and require the same tokens: True for
            every mode, or the names of the modes to do it for.
        encoder_outputs, reference_encoder_out: each side's encoding of ``inputs`` if the caller
            already has it (``model.get_encoder()(...)``, ``reference._encode(...)``); every mode
            reuses it instead of encoding again.

    Returns a dict: ``identical`` (every mode, every sample, cached and uncached), ``mismatches``
    (``{"mode", "index", "model", "reference", "cache": False}`` rows, and
    ``{"mode", "index", "cached", "uncached", "cache": True}`` for a cached/uncached disagreement),
    and ``modes`` with per-mode ``identical``/``total`` counts and the largest difference between
    the two sides' normalised scores.
    """
    expected = reference_hypotheses(reference, inputs, settings, modes, encoder_out=reference_encoder_out)
    ours = model_hypotheses(model, inputs, settings, modes, check_cache, encoder_outputs=encoder_outputs)
    return compare_hypotheses(ours, expected)
