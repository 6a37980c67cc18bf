"""fairseq-faithful generation (ofaconv/modeling/generation_ofa.py) against the independent
reference generator (ofaconv/reference/generator.py).

Two kinds of parity:
- scripted language models (hash-seeded logits, sharp and EOS-prone) drive both searches through
  every bookkeeping path: every hypothesis, score and per-token score must be bit-identical,
  cached and uncached, and deliberately broken searches must be caught;
- the converted micro fixture of every variant family: greedy, beam 5 and beam 8 top hypotheses
  identical to the reference, cached = uncached, with the family's settings (OFA-Huge's
  temperature/lenpen) and with a sharpened head whose hypotheses end at different steps.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig

from ofaconv.ofa.checkpoint import load_checkpoint, read_flags
from ofaconv.ofa.generation_parity import compare_generation, hypothesis_tokens
from ofaconv.ofa.modeling import OFAEncoderOutput, OFAForConditionalGeneration
from ofaconv.ofa.modeling import generation_ofa
from ofaconv.ofa.modeling.configuration_ofa import build_generation_config
from ofaconv.ofa.modeling.generation_ofa import SearchSettings, fairseq_search
from ofaconv.ofa.reference import FairseqReference
from ofaconv.ofa.reference.generator import SequenceGenerator
from ofaconv.ofa.variants import generation_defaults, get_variant, variant_names

EOS, PAD = 2, 1


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny ops on a shared 2-core machine: one thread is several times faster
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Scripted language models
# ---------------------------------------------------------------------------------------------


def scripted_logits(seed: int, prefix: list[int], vocab: int, sharpness: float, eos_bias: float) -> torch.Tensor:
    digest = hashlib.blake2b(repr((seed, prefix)).encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little"))
    logits = torch.randn(vocab, generator=gen) * sharpness
    logits[EOS] += eos_bias * (len(prefix) - 1)
    return logits


class ScriptedReference:
    """What SequenceGenerator needs of a FairseqReference; the sentence seed rides in the image."""

    def __init__(self, vocab=40, sharpness=3.0, eos_bias=0.6):
        self.vocab_size = vocab
        self.sharpness, self.eos_bias = sharpness, eos_bias
        self.token_rp_bucket = {"decoder": torch.zeros(1024, 1)}

    def _encode(self, src_tokens, patch_images, patch_masks):
        seeds = patch_images.reshape(patch_images.shape[0], -1)[:, 0]
        return {
            "encoder_out": seeds.view(1, -1, 1),
            "padding_mask": torch.zeros(len(seeds), 1, dtype=torch.bool),
            "position_embeddings": seeds.view(-1, 1, 1),
        }

    def _decode(self, tokens, encoder_out, incremental_state=None):
        if incremental_state is None:
            seeds, prefixes = encoder_out["encoder_out"][0, :, 0], tokens
        else:
            # as the real reference does with its keys/values: the sentence seed and the token
            # history are read back from the saved state, so a wrong reorder changes the logits
            seeds = incremental_state.setdefault("seed", encoder_out["encoder_out"][0, :, 0])
            saved = incremental_state.get("history")
            prefixes = tokens[:, -1:] if saved is None else torch.cat([saved, tokens[:, -1:]], 1)
            incremental_state["history"] = prefixes
        rows = [scripted_logits(int(s), row, self.vocab_size, self.sharpness, self.eos_bias)
                for s, row in zip(seeds.tolist(), prefixes.tolist())]
        steps = 1 if incremental_state is not None else tokens.shape[1]
        return torch.stack(rows)[:, None, :].expand(-1, steps, -1).clone()

    @staticmethod
    def reorder_incremental_state(state, new_order):
        for name, saved in state.items():
            state[name] = saved.index_select(0, new_order)


class _ScriptedCache:
    def __init__(self):
        self.self_kv = [None]
        self.cross_kv = [None]

    def reorder(self, index, num_heads):
        flat = (index[:, None] * num_heads + torch.arange(num_heads)).reshape(-1)
        self.self_kv = [(k.index_select(0, flat), v.index_select(0, flat)) for k, v in self.self_kv]
        self.cross_kv = [(k.index_select(0, flat), v.index_select(0, flat)) for k, v in self.cross_kv]


class ScriptedModel:
    """What fairseq_search needs of the model. With a cache, the token history and the sentence
    seed are read back from the cache only, so a wrong reorder of either changes the logits."""

    def __init__(self, reference: ScriptedReference, heads=2):
        self.ref = reference
        self.heads = heads
        self.config = SimpleNamespace(vocab_size=reference.vocab_size, max_position_embeddings=1024,
                                      decoder_attention_heads=heads)

    def encode(self, patch_images):
        seeds = patch_images.reshape(patch_images.shape[0], -1)[:, 0].float()
        return OFAEncoderOutput(last_hidden_state=seeds.view(-1, 1, 1), position_embedding=seeds.view(-1, 1, 1),
                                padding_mask=torch.zeros(len(seeds), 1, dtype=torch.bool))

    def __call__(self, decoder_input_ids, encoder_outputs, cache=None, use_cache=False):
        h = self.heads
        if use_cache:
            cache = cache or _ScriptedCache()
            new = decoder_input_ids.float().repeat_interleave(h, 0)[:, :, None]
            if cache.cross_kv[0] is None:
                seeds = encoder_outputs.last_hidden_state[:, :1, :].repeat_interleave(h, 0)
                cache.cross_kv[0] = (seeds, seeds)
            history = new if cache.self_kv[0] is None else torch.cat([cache.self_kv[0][0], new], 1)
            cache.self_kv[0] = (history, history)
            prefixes = history[::h, :, 0].long().tolist()
            seeds = cache.cross_kv[0][0][::h, 0, 0].tolist()
        else:
            cache = None
            prefixes = decoder_input_ids.tolist()
            seeds = encoder_outputs.last_hidden_state[:, 0, 0].tolist()
        rows = [scripted_logits(int(s), p, self.ref.vocab_size, self.ref.sharpness, self.ref.eos_bias)
                for s, p in zip(seeds, prefixes)]
        return SimpleNamespace(logits=torch.stack(rows)[:, None, :], cache=cache)


def run_scripted(*, vocab=40, sharpness=3.0, eos_bias=0.6, beam=5, max_len_b=6, min_len=1, ngram=3, lenpen=1.0,
                 temperature=1.0, normalize=True, constraint=None, bsz=2, use_cache=True, seed=0):
    """(reference hypotheses, ofaconv hypotheses) as comparable lists of (tokens, score, per-token)."""
    reference = ScriptedReference(vocab, sharpness, eos_bias)
    model = ScriptedModel(reference)
    images = torch.zeros(bsz, 1, 1, 1)
    images[:, 0, 0, 0] = torch.arange(bsz) + seed
    src = torch.zeros(bsz, 3, dtype=torch.long)
    ref = SequenceGenerator(reference, beam_size=beam, max_len_b=max_len_b, min_len=min_len,
                            no_repeat_ngram_size=ngram, lenpen=lenpen, temperature=temperature,
                            normalize_scores=normalize, constraint_range=constraint).generate(src, images, None)
    settings = SearchSettings(beam_size=beam, max_len_b=max_len_b, min_len=min_len, no_repeat_ngram_size=ngram,
                              lenpen=lenpen, temperature=temperature, normalize_scores=normalize, use_cache=use_cache,
                              constraint_range=generation_ofa.parse_constraint_range(constraint))
    ours = fairseq_search(model, model.encode(images), settings, src_len=3)

    def flat(results):
        return [[(h["tokens"].tolist(), float(h["score"]), h["positional_scores"].tolist()) for h in hypos]
                for hypos in results]

    return flat(ref), flat(ours)


SCRIPTED_CASES = {
    "greedy": dict(beam=1),
    "beam5": dict(beam=5),
    "beam8": dict(beam=8, bsz=3),
    "beam10": dict(beam=10, bsz=2),  # OFA-Huge's width, the one its folders' verify searches with
    "uncached": dict(beam=5, use_cache=False),
    "early-eos": dict(beam=5, eos_bias=2.0, bsz=4, max_len_b=10),
    "min-len": dict(beam=3, eos_bias=3.0, min_len=3),
    "max-len-forced-eos": dict(beam=3, eos_bias=-5.0, max_len_b=4),
    "max-len-1": dict(beam=2, max_len_b=1),
    "ngram-1": dict(beam=3, ngram=1, vocab=60),
    "ngram-2-small-vocab": dict(beam=4, ngram=2, vocab=12, sharpness=6.0),
    "no-ngram": dict(beam=4, ngram=0, sharpness=6.0, vocab=12),
    "lenpen-and-temperature": dict(beam=5, lenpen=0.98, temperature=0.98, eos_bias=1.0),
    "lenpen-short": dict(beam=5, lenpen=0.3, eos_bias=1.5),
    "unnormalized": dict(beam=5, normalize=False, eos_bias=1.0),
    "constraint-range": dict(beam=4, constraint="6,20"),
    "beam-larger-than-text": dict(beam=8, vocab=12, ngram=0),
}


@pytest.mark.parametrize("case", list(SCRIPTED_CASES))
def test_scripted_search_is_bit_identical_to_reference(case):
    kwargs = SCRIPTED_CASES[case]
    for seed in (0, 100, 200):
        ref, ours = run_scripted(**kwargs, seed=seed)
        assert ours == ref, f"{case} seed {seed}"


def test_scripted_random_sweep():
    rng = random.Random(7)
    lengths = set()
    for trial in range(60):
        kwargs = dict(vocab=rng.choice([16, 40, 100]), sharpness=rng.choice([0.5, 2.0, 5.0]),
                      eos_bias=rng.choice([0.0, 0.4, 1.5]), beam=rng.choice([1, 2, 3, 5, 8]),
                      max_len_b=rng.choice([2, 4, 7]), min_len=rng.choice([0, 1, 2]), ngram=rng.choice([0, 2, 3]),
                      lenpen=rng.choice([1.0, 0.6, 1.3]), temperature=rng.choice([1.0, 0.7]),
                      bsz=rng.choice([1, 2, 4]), use_cache=rng.choice([True, False]), seed=trial * 10)
        ref, ours = run_scripted(**kwargs)
        assert ours == ref, kwargs
        lengths.update(len(h[0]) for hypos in ref for h in hypos)
    assert len(lengths) >= 5  # the sweep did reach many different finishing steps


def _detects(monkeypatch, name, replacement, cases=("beam5", "early-eos", "lenpen-and-temperature", "ngram-2-small-vocab")):
    """Whether a broken search picks different hypotheses (tokens only, scores ignored)."""
    with monkeypatch.context() as m:
        m.setattr(generation_ofa, name, replacement)
        for case in cases:
            for seed in (0, 100, 200, 300, 400):
                ref, ours = run_scripted(**SCRIPTED_CASES[case], seed=seed)
                if [[h[0] for h in hypos] for hypos in ours] != [[h[0] for h in hypos] for hypos in ref]:
                    return True
    return False


def test_mutation_no_ngram_blocking_is_caught(monkeypatch):
    assert _detects(monkeypatch, "block_repeated_ngrams", lambda *args: None)


def test_mutation_no_beam_reorder_is_caught(monkeypatch):
    assert _detects(monkeypatch, "_reorder_self_attention", lambda *args: None)


def test_mutation_length_normalisation_off_by_one_is_caught(monkeypatch):
    original = generation_ofa._finalize

    def hf_style(step, *args, **kwargs):  # newer transformers: generated length without EOS
        settings = args[-1]
        if settings.normalize_scores and step > 0:
            # rescale so the division uses `step` instead of fairseq's `step + 1`
            args = list(args)
            args[1] = args[1] * (step + 1) ** settings.lenpen / step**settings.lenpen
        return original(step, *args, **kwargs)

    assert _detects(monkeypatch, "_finalize", hf_style)


def test_mutation_temperature_after_log_softmax_is_caught(monkeypatch):
    class Late(generation_ofa._Decoder):
        def lprobs(self, tokens, step, encoder_outputs):
            t = self.settings.temperature
            self.settings.temperature = 1.0
            try:
                return super().lprobs(tokens, step, encoder_outputs) / t
            finally:
                self.settings.temperature = t

    assert _detects(monkeypatch, "_Decoder", Late, cases=("lenpen-and-temperature",))


def test_block_repeated_ngrams_includes_bos():
    tokens = torch.tensor([[0, 5, 0, 5, 1, 1]])  # <s> 5 0 5, then pad
    lprobs = torch.zeros(1, 10)
    generation_ofa.block_repeated_ngrams(tokens, lprobs, step=2, ngram_size=2)
    # key (0,): the bigram (<s>, 5) counts, so 5 is banned after the second 0
    assert lprobs[0, 5] == -math.inf and torch.isfinite(lprobs[0, torch.arange(10) != 5]).all()
    lprobs = torch.zeros(1, 10)
    generation_ofa.block_repeated_ngrams(tokens, lprobs, step=3, ngram_size=2)
    assert lprobs[0, 0] == -math.inf and torch.isfinite(lprobs[0, 1:]).all()
    lprobs = torch.zeros(1, 10)
    generation_ofa.block_repeated_ngrams(tokens, lprobs, step=1, ngram_size=3)  # too short to block
    assert torch.isfinite(lprobs).all()


# ---------------------------------------------------------------------------------------------
# Converted micro fixtures of every variant family
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(micro_converted):
    return micro_converted


def load_pair(folder: Path, src: Path):
    # eager: fairseq's arithmetic operation by operation, bit-exact against the reference (sdpa, the
    # transformers default, agrees within float rounding only)
    model = OFAForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    ckpt = load_checkpoint(src)
    args = {**ckpt.task_args, **ckpt.model_args, **read_flags(ckpt)}
    return model, FairseqReference(ckpt.state_dict, args)


def probe(folder: Path, model, n: int = 2, seed: int = 0) -> dict:
    """The saved processor's prompt and n smooth random images at the checkpoint's resolution."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    size = model.config.patch_image_size
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=gen) * 2 - 1
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    text = processor.tokenizer([processor.prompt] * n, return_tensors="pt")
    return {"input_ids": text["input_ids"], "patch_images": images, "patch_masks": torch.ones(n, dtype=torch.bool)}


def sharpen(model, reference, scale: float = 20.0, boost: dict | None = None, inputs: dict | None = None):
    """Scale the decoder's final LayerNorm (peaky distributions) and shift its bias along token
    embeddings (a logit boost per token), identically in the model and the reference. With
    ``inputs``, EOS is boosted to the level of the top logit so hypotheses end at varied steps."""
    with torch.no_grad():
        weight, bias = model.decoder.layer_norm.weight, model.decoder.layer_norm.bias
        embed = model.encoder.embed_tokens.weight
        weight.mul_(scale)
        boost = dict(boost or {})
        if inputs is not None:
            prefix = torch.tensor([[0, 50, 60, 70]] * inputs["input_ids"].shape[0])
            logits = model(**inputs, decoder_input_ids=prefix).logits
            boost[EOS] = boost.get(EOS, 0.0) + float((logits.max(-1).values - logits[..., EOS]).mean()) + 0.5
        for token, amount in boost.items():
            bias.add_(amount * embed[token] / embed[token].dot(embed[token]))
        reference.sd["decoder.layer_norm.weight"] = weight.detach().clone()
        reference.sd["decoder.layer_norm.bias"] = bias.detach().clone()


def family_settings(model) -> dict:
    """The folder's saved fairseq knobs (OFA-Huge: lenpen and temperature 0.98), short max_len_b."""
    gc = model.generation_config
    return {"lenpen": gc.lenpen, "temperature": gc.fairseq_temperature, "min_len": gc.min_len,
            "no_repeat_ngram_size": gc.no_repeat_ngram_size, "max_len_b": 8}


@pytest.mark.parametrize("variant", variant_names())
def test_variant_generation_matches_reference(variant, converted):
    folder, src = converted(variant)
    model, reference = load_pair(folder, src)
    inputs = probe(folder, model)
    settings = family_settings(model)
    expected = generation_defaults(variant)
    assert model.generation_config.num_beams == expected["num_beams"]
    assert model.generation_config.fairseq_temperature == expected["temperature"]

    # Sharpened head: hypotheses finish at different steps, so finalization, sentence removal
    # and cache reordering across a shrinking batch are all exercised against the reference.
    sharpen(model, reference, inputs=inputs)
    report = compare_generation(model, reference, inputs, settings)
    assert report["identical"], report["mismatches"]
    assert all(m["identical"] == m["total"] == 2 and m["cache_identical"] == 2 for m in report["modes"].values())
    rows = model.generate(**inputs, num_beams=5, max_len_b=8, num_return_sequences=5)
    assert min(len(hypothesis_tokens(row)) for row in rows.tolist()) < 9  # some ended before max_len


def test_mutation_broken_cache_reorder_fails_real_parity(converted, monkeypatch):
    folder, src = converted("ofa-tiny")
    model, reference = load_pair(folder, src)
    inputs = probe(folder, model)
    sharpen(model, reference, inputs=inputs)
    monkeypatch.setattr(generation_ofa, "_reorder_self_attention", lambda *args: None)
    report = compare_generation(model, reference, inputs, {"max_len_b": 8}, modes={"beam5": 5, "beam8": 8})
    assert not report["identical"]


# ---------------------------------------------------------------------------------------------
# Behaviour on one converted model
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tiny(converted):
    folder, src = converted("ofa-tiny")
    model, reference = load_pair(folder, src)
    return SimpleNamespace(model=model, reference=reference, inputs=probe(folder, model), folder=folder)


def _rows(sequences) -> list[list[int]]:
    return [hypothesis_tokens(r) for r in sequences.tolist()]


@pytest.mark.parametrize("min_len", [0, 1, 3])
def test_min_len(tiny, min_len):
    sharpen(tiny.model, tiny.reference, scale=1.0, boost={EOS: 60.0})  # EOS wins whenever it is allowed
    out = tiny.model.generate(**tiny.inputs, num_beams=3, max_len_b=6, min_len=min_len)
    assert all(len(row) == min_len + 1 and row[-1] == EOS for row in _rows(out)), out.tolist()


def test_max_len_forces_eos_and_hf_lengths_map(tiny):
    sharpen(tiny.model, tiny.reference, scale=1.0, boost={EOS: -60.0})  # EOS never wins on its own
    out = tiny.model.generate(**tiny.inputs, num_beams=3, max_len_b=5)
    assert out.shape[1] == 5 + 2
    assert all(len(row) == 6 and row[-1] == EOS and EOS not in row[:-1] for row in _rows(out))
    assert torch.equal(tiny.model.generate(**tiny.inputs, num_beams=3, max_new_tokens=6), out)
    assert torch.equal(tiny.model.generate(**tiny.inputs, num_beams=3, max_length=7), out)


def test_pad_is_never_emitted(tiny):
    # <pad>'s embedding row is zero (padding_idx); give it token 5's row, then boost both
    with torch.no_grad():
        embed = tiny.model.encoder.embed_tokens.weight
        embed[PAD] = embed[5]
        for key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight"):
            if key in tiny.reference.sd:
                tiny.reference.sd[key] = embed.detach().clone()
    sharpen(tiny.model, tiny.reference, scale=1.0, boost={5: 60.0})
    logits = tiny.model(**tiny.inputs, decoder_input_ids=torch.zeros(2, 1, dtype=torch.long)).logits
    assert (logits[:, -1, PAD] == logits[:, -1].max(-1).values).all()  # pad ties with 5 for first place
    for beams in (1, 5):
        out = tiny.model.generate(**tiny.inputs, num_beams=beams, max_len_b=4, num_return_sequences=beams)
        rows = _rows(out)
        assert all(PAD not in row for row in rows) and all(row[0] == 5 for row in rows[::beams])
    report = compare_generation(tiny.model, tiny.reference, tiny.inputs, {"max_len_b": 4}, modes={"beam5": 5})
    assert report["identical"], report["mismatches"]


def test_no_repeat_ngram_blocking(tiny):
    sharpen(tiny.model, tiny.reference)  # the sharpened micro model loves repeating itself

    def repeats(rows, n):
        for row in rows:
            seq = [0] + row
            grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
            if len(grams) != len(set(grams)):
                return True
        return False

    free = _rows(tiny.model.generate(**tiny.inputs, num_beams=3, max_len_b=8, no_repeat_ngram_size=0))
    assert repeats(free, 2)
    for n in (2, 3):
        blocked = _rows(tiny.model.generate(**tiny.inputs, num_beams=3, max_len_b=8, no_repeat_ngram_size=n,
                                            num_return_sequences=3))
        assert not repeats(blocked, n)


def test_text_only_never_emits_codes_or_bins(tiny):
    code = 55000  # an <code_*> id of the English vocabulary
    sharpen(tiny.model, tiny.reference, scale=1.0, boost={code: 60.0})
    free = _rows(tiny.model.generate(**tiny.inputs, num_beams=3, max_len_b=4))
    assert any(code in row for row in free)
    first, last = tiny.model.generation_config.text_token_range
    assert (first, last) == (4, 50263)
    constrained = _rows(tiny.model.generate(**tiny.inputs, num_beams=3, max_len_b=4, text_only=True,
                                            num_return_sequences=3))
    assert all(t <= last or t == EOS for row in constrained for t in row)
    report = compare_generation(tiny.model, tiny.reference, tiny.inputs,
                                {"max_len_b": 4, "constraint_range": f"{first},{last + 1}"}, modes={"beam5": 5})
    assert report["identical"], report["mismatches"]


def test_batch_and_single_agree(tiny):
    sharpen(tiny.model, tiny.reference, inputs=tiny.inputs)
    batch = tiny.model.generate(**tiny.inputs, num_beams=5, max_len_b=8, return_dict_in_generate=True)
    for i in range(2):
        single = tiny.model.generate(**{k: v[i:i + 1] for k, v in tiny.inputs.items()}, num_beams=5, max_len_b=8,
                                     return_dict_in_generate=True)
        assert _rows(single.sequences) == _rows(batch.sequences[i:i + 1])
        assert torch.allclose(single.sequences_scores, batch.sequences_scores[i:i + 1], atol=1e-5)


def test_output_format(tiny):
    sharpen(tiny.model, tiny.reference, inputs=tiny.inputs)
    out = tiny.model.generate(**tiny.inputs, num_beams=5, num_return_sequences=3, max_len_b=8,
                              return_dict_in_generate=True)
    seqs, scores, token_scores = out.sequences, out.sequences_scores, out.token_scores
    assert seqs.shape[0] == 6 and scores.shape == (6,) and token_scores.shape == (6, seqs.shape[1] - 1)
    assert (seqs[:, 0] == 0).all()
    for i, row in enumerate(seqs.tolist()):
        end = row.index(EOS)
        assert all(t == PAD for t in row[end + 1:])
        # fairseq: score = sum of per-token log-probs (EOS included) / length ** lenpen
        assert math.isclose(float(token_scores[i, :end].sum()), float(scores[i]) * end, rel_tol=1e-5)
    for b in range(2):
        assert scores[3 * b:3 * b + 3].tolist() == sorted(scores[3 * b:3 * b + 3].tolist(), reverse=True)
    assert torch.equal(tiny.model.generate(**tiny.inputs, num_beams=5, max_len_b=8), seqs.view(2, 3, -1)[:, 0])


def test_saved_generation_config_drives_defaults(tiny):
    gc = tiny.model.generation_config
    assert (gc.num_beams, gc.max_len_b, gc.max_length, gc.no_repeat_ngram_size) == (5, 16, 18, 3)
    default = tiny.model.generate(**tiny.inputs)
    explicit = tiny.model.generate(**tiny.inputs, num_beams=5, max_len_b=16, no_repeat_ngram_size=3, min_len=1)
    assert torch.equal(default, explicit)
    assert default.shape[1] <= 18


def test_hf_names_map_onto_fairseq_knobs(tiny):
    sharpen(tiny.model, tiny.reference, inputs=tiny.inputs)
    base = dict(**tiny.inputs, num_beams=4, max_len_b=6, return_dict_in_generate=True)
    fairseq = tiny.model.generate(**base, lenpen=0.5, fairseq_temperature=0.9, min_len=2)
    hf = tiny.model.generate(**{**base, "max_len_b": None}, max_new_tokens=7, length_penalty=0.5, temperature=0.9,
                             min_new_tokens=2)
    assert torch.equal(fairseq.sequences, hf.sequences)
    assert torch.equal(fairseq.sequences_scores, hf.sequences_scores)
    # a config passed to generate: what it sets wins, the model's generation_config fills the rest
    expected = tiny.model.generate(**tiny.inputs, num_beams=4, max_len_b=6)
    for config in (GenerationConfig(max_new_tokens=7, num_beams=4), GenerationConfig(max_length=8, num_beams=4),
                   GenerationConfig.from_dict({**tiny.model.generation_config.to_dict(), "max_new_tokens": 7,
                                               "num_beams": 4})):
        assert torch.equal(tiny.model.generate(**tiny.inputs, generation_config=config), expected)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"num_beam_groups": 2, "diversity_penalty": 0.5}, ValueError),
        ({"penalty_alpha": 0.6, "top_k": 4}, ValueError),
        ({"guidance_scale": 1.5}, ValueError),
        ({"num_beams": 3, "streamer": SimpleNamespace(put=lambda x: None, end=lambda: None)}, ValueError),
        ({"num_beams": 2, "num_return_sequences": 3}, ValueError),
        ({"min_len": 5, "max_len_b": 3}, ValueError),
        ({"max_len_b": 2000}, ValueError),
        ({"temperature": 0.0}, ValueError),
        ({"decoder_input_ids": torch.zeros(2, 1, dtype=torch.long)}, TypeError),
        ({"frobnicate": True}, TypeError),
    ],
)
def test_unsupported_requests_are_refused(tiny, kwargs, error):
    with pytest.raises(error):
        tiny.model.generate(**tiny.inputs, **kwargs)


def test_sampling_falls_back_to_transformers(tiny):
    torch.manual_seed(0)
    out = tiny.model.generate(**tiny.inputs, do_sample=True, top_k=20, num_return_sequences=2, max_new_tokens=6)
    assert out.shape[0] == 4 and (out[:, 0] == 0).all() and out.shape[1] <= 7
    assert all(PAD not in row for row in _rows(out))
    with pytest.raises(ValueError):
        tiny.model.generate(**tiny.inputs, do_sample=True, max_len_b=4)


def test_encoder_outputs_can_be_passed(tiny):
    encoder_outputs = tiny.model.get_encoder()(**tiny.inputs)
    direct = tiny.model.generate(**tiny.inputs, num_beams=3, max_len_b=5)
    reused = tiny.model.generate(input_ids=tiny.inputs["input_ids"], encoder_outputs=encoder_outputs, num_beams=3,
                                 max_len_b=5)
    assert torch.equal(direct, reused)


def test_padded_prompts_match_reference(tiny):
    """A batch whose second prompt is shorter (right-padded): attention mask from the pad id."""
    ids = tiny.inputs["input_ids"].clone()
    short = ids[1, :4].tolist() + [EOS]
    ids[1] = torch.tensor(short + [PAD] * (ids.shape[1] - len(short)))
    inputs = {**tiny.inputs, "input_ids": ids, "attention_mask": ids.ne(PAD).long()}
    report = compare_generation(tiny.model, tiny.reference, inputs, {"max_len_b": 5}, modes={"beam5": 5})
    assert report["identical"], report["mismatches"]


# ---------------------------------------------------------------------------------------------
# generation_config.json
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", variant_names())
def test_build_generation_config_per_variant(variant, tmp_path):
    settings = generation_defaults(variant)
    family = get_variant(variant)["family"]
    vocab = {"en": 59457, "cn": 30325}[family]
    config = build_generation_config(settings, SimpleNamespace(vocab_size=vocab, decoder_start_token_id=0,
                                                               bos_token_id=0, eos_token_id=2, pad_token_id=1))
    config.save_pretrained(tmp_path)  # transformers validates strictly on save
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert {k: saved[k] for k in ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id",
                                  "forced_eos_token_id")} == {"decoder_start_token_id": 0, "bos_token_id": 0,
                                                              "eos_token_id": 2, "pad_token_id": 1,
                                                              "forced_eos_token_id": 2}
    assert saved["num_beams"] == settings["num_beams"]
    assert saved["max_len_b"] == settings["max_len_b"] and saved["max_length"] == settings["max_len_b"] + 2
    assert saved["no_repeat_ngram_size"] == 3 and saved["min_len"] == 1 and saved["max_len_a"] == 0
    assert saved["lenpen"] == saved["length_penalty"] == settings["lenpen"]
    assert saved["fairseq_temperature"] == settings["temperature"]
    assert "temperature" not in saved  # transformers' temperature is for sampling only
    assert saved["text_token_range"] == ([4, 50263] if family == "en" else [4, 21131])
    loaded = GenerationConfig.from_pretrained(tmp_path)
    assert loaded.max_len_b == settings["max_len_b"]
    if variant == "ofa-huge":
        assert (saved["num_beams"], saved["lenpen"], saved["fairseq_temperature"]) == (10, 0.98, 0.98)
    if family == "cn":
        assert (saved["num_beams"], saved["max_len_b"], saved["max_length"]) == (8, 128, 130)


def test_greedy_generation_config_saves(tmp_path):
    build_generation_config({"num_beams": 1, "max_len_b": 20}).save_pretrained(tmp_path)
    assert GenerationConfig.from_pretrained(tmp_path).num_beams == 1


def test_build_generation_config_rejects_bad_settings():
    with pytest.raises(ValueError):
        build_generation_config({"beam": 5})
    with pytest.raises(ValueError):
        build_generation_config({"min_len": 20, "max_len_b": 16})
    with pytest.raises(ValueError):
        build_generation_config({"temperature": 0})


@pytest.mark.slow
def test_remote_code_folder_generates_without_ofaconv(converted, tmp_path):
    folder, _ = converted("ofa-cn-base")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForSeq2SeqLM\n"
        f"m = AutoModelForSeq2SeqLM.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
        "assert 'ofaconv' not in sys.modules\n"
        "out = m.generate(input_ids=torch.tensor([[0, 100, 2]]), patch_images=torch.zeros(1, 3, 128, 128), max_len_b=3)\n"
        "print(m.generation_config.num_beams, out.tolist())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    beams, rows = done.stdout.strip().splitlines()[-1].split(" ", 1)
    assert beams == "8" and json.loads(rows)[0][0] == 0
