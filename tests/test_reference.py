"""The independent fairseq reference (ofaconv.reference) against the official OFA code."""

from __future__ import annotations

import argparse
import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ofaconv.core.errors import OfaconvError
from ofaconv.ofa.reference import FairseqReference, SequenceGenerator
from ofaconv.ofa.reference import forward as forward_module
from ofaconv.ofa.reference import generator as generator_module
from ofaconv.ofa.reference.forward import BOS, EOS, PAD, model_args_from_checkpoint

PERTURBED_FIXTURE = Path(__file__).parent / "data" / "reference_official_perturbed.pt"
TIED_EMBEDDINGS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                   "decoder.output_projection.weight")


def perturb_state_dict(state_dict, seed: int = 0) -> dict:
    """Deterministically move every float tensor off its initial value.

    The official micro checkpoint has identity LayerNorms/BatchNorms (init_bert_params), so a
    swapped or skipped norm is invisible on it. Here LayerNorm/BatchNorm weights and ``c_attn``
    go to 1 + 0.3 N(0,1), biases and running means get 0.1 N(0,1), running variances land in
    [0.5, 1.5); relative-position tables get 0.5 N(0,1) and the position-bias projections
    0.1 N(0,1) so that position mistakes move the logits well above the parity gate; every other
    tensor gets noise at half its own spread. The tied token embedding stays tied (fairseq loads
    the three aliases into one parameter).
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(state_dict):
        t = state_dict[key]
        if key in TIED_EMBEDDINGS[1:] or not t.is_floating_point() or key.endswith(".version"):
            out[key] = t.clone()
            continue
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
        if key.endswith("running_var"):
            new = 0.5 + torch.rand(t.shape, generator=gen, dtype=torch.float32)
        elif key.endswith(".c_attn") or (t.dim() == 1 and key.endswith(".weight")):
            new = 1 + 0.3 * noise
        elif key.endswith(".bias") or key.endswith("running_mean"):
            new = t + 0.1 * noise
        elif "rel_pos_table" in key:
            new = t + 0.5 * noise
        elif key.endswith(("pos_q_linear.weight", "pos_k_linear.weight")):
            new = t + 0.1 * noise
        else:
            spread = float(t.float().std()) if t.numel() > 1 else 0.0
            new = t + 0.5 * (spread or 0.02) * noise
        out[key] = new.to(t.dtype)
    for alias in TIED_EMBEDDINGS[1:]:
        if alias in out:
            out[alias] = out[TIED_EMBEDDINGS[0]]
    return out


def boost_special_tokens(state_dict, source_token: int) -> dict:
    """Make </s>, <unk> and <pad> compete with ``source_token`` (a token the model favours), so
    that generation exercises early EOS, min_len, length normalisation, the unk penalty and the
    pad ban. Rows 1-3 of the (tied) embedding become scaled copies of the source row."""
    state = dict(state_dict)
    embed = state[TIED_EMBEDDINGS[0]].clone()
    for token, scale in ((2, 1.0), (3, 1.03), (1, 1.05)):  # </s>, <unk>, <pad>
        embed[token] = embed[source_token] * scale
    for key in TIED_EMBEDDINGS:
        state[key] = embed
    return state


def load_official_checkpoint(path: Path) -> dict:
    """The gunzipped official checkpoint (conftest's ``official_micro``) as the trainer wrote it."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True, mmap=True)


# ---------------------------------------------------------------------------------------------
# fixtures

POST_LN_DROPPED = ("encoder.layer_norm.", "decoder.layer_norm.")


@pytest.fixture(scope="module", autouse=True)
def _flush_denormals():
    previous = torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(previous)


@pytest.fixture(scope="module")
def official(official_micro):
    return load_official_checkpoint(official_micro)


@pytest.fixture(scope="module")
def official_io(official_io_path):
    return torch.load(official_io_path, weights_only=True)


@pytest.fixture(scope="module")
def official_args(official):
    return model_args_from_checkpoint(official)


@pytest.fixture(scope="module")
def perturbed_state(official):
    return perturb_state_dict(official["model"], seed=0)


@pytest.fixture(scope="module")
def fixture_cases():
    return torch.load(PERTURBED_FIXTURE, weights_only=True)["cases"]


def case_state(name, perturbed_state, fixture_cases=None):
    if name == "post_ln":
        return {k: v for k, v in perturbed_state.items() if not k.startswith(POST_LN_DROPPED)}
    if name == "special_tokens":
        return boost_special_tokens(perturbed_state, fixture_cases[name]["source_token"])
    return perturbed_state


def case_inputs(case, official_io):
    inputs = dict(case["inputs"])
    images = official_io["inputs"]["patch_images"]
    if case["images"] == "official_avgpool2":
        images = F.avg_pool2d(images, 2)
    inputs["patch_images"] = images
    return inputs


def run_forward(reference, inputs):
    return reference.forward(inputs["input_ids"], inputs["patch_images"], inputs["patch_masks"],
                             inputs["decoder_input_ids"])


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# forward parity with the official code

def test_official_micro_logits(official, official_io):
    reference = FairseqReference.from_checkpoint(official)
    logits = run_forward(reference, official_io["inputs"])
    assert logits.shape == official_io["logits"].shape
    # measured 0.0 (bit-identical) in fp32 on CPU
    assert max_diff(logits, official_io["logits"]) <= 1e-5


CASES = ["perturbed", "special_tokens", "entangled", "padded", "interpolated", "post_ln"]


@pytest.mark.parametrize("name", CASES)
def test_official_perturbed_logits(name, fixture_cases, perturbed_state, official_io):
    """Every weight perturbed; official logits computed by the fairseq OFA code itself."""
    case = fixture_cases[name]
    reference = FairseqReference(case_state(name, perturbed_state, fixture_cases),
                                 case["model_args"])
    logits = run_forward(reference, case_inputs(case, official_io))
    assert max_diff(logits, case["logits"]) <= 1e-5  # measured 0.0 for every case


def test_official_perturbed_encoder_states(fixture_cases, perturbed_state, official_io):
    case = fixture_cases["perturbed"]
    inputs = case_inputs(case, official_io)
    reference = FairseqReference(perturbed_state, case["model_args"])
    enc = reference.encode(inputs["input_ids"], inputs["patch_images"], inputs["patch_masks"])
    assert max_diff(enc["encoder_out"], case["encoder_out"]) <= 1e-5  # measured 0.0


def test_perturbation_reaches_every_norm(official, perturbed_state):
    for key, value in official["model"].items():
        if value.is_floating_point() and not key.endswith(".version"):
            assert not torch.equal(value, perturbed_state[key]), key
    assert perturbed_state["decoder.output_projection.weight"] is \
        perturbed_state["encoder.embed_tokens.weight"]


def test_encode_decode_split(official, official_io):
    reference = FairseqReference.from_checkpoint(official)
    inputs = official_io["inputs"]
    enc = reference.encode(inputs["input_ids"], inputs["patch_images"], inputs["patch_masks"])
    n_patches = (inputs["patch_images"].shape[-1] // 16) ** 2
    length = n_patches + inputs["input_ids"].shape[1]
    assert enc["encoder_out"].shape == (2, length, reference.embed_dim)
    assert enc["padding_mask"].shape == (2, length)
    assert enc["position_embeddings"].shape == (2, length, reference.embed_dim)
    logits = reference.decode(inputs["decoder_input_ids"], enc)
    assert torch.equal(logits, run_forward(reference, inputs))
    # a contiguous batch-first copy (what another implementation would hand over) also works
    copied = {k: v.contiguous() for k, v in enc.items()}
    assert max_diff(reference.decode(inputs["decoder_input_ids"], copied), logits) <= 1e-6


def test_padding_masks(fixture_cases, perturbed_state, official_io):
    case = fixture_cases["padded"]
    inputs = case_inputs(case, official_io)
    reference = FairseqReference(perturbed_state, case["model_args"])
    enc = reference.encode(inputs["input_ids"], inputs["patch_images"], inputs["patch_masks"])
    n_patches = (inputs["patch_images"].shape[-1] // 16) ** 2
    mask = enc["padding_mask"]
    assert not mask[0].any()
    assert mask[1, :n_patches].all()  # patch_masks False: the whole image is padding
    text_pad = inputs["input_ids"][1].eq(PAD)
    assert torch.equal(mask[1, n_patches:], text_pad) and text_pad.any()
    # padded text rows are zeroed before the encoder and change nothing for the other row
    alone = reference.forward(inputs["input_ids"][:1], inputs["patch_images"][:1],
                              inputs["patch_masks"][:1], inputs["decoder_input_ids"][:1])
    assert max_diff(alone, run_forward(reference, inputs)[:1]) <= 1e-5


def test_missing_rp_buckets_are_recomputed(fixture_cases, perturbed_state, official_io):
    case = fixture_cases["perturbed"]
    stripped = {k: v for k, v in perturbed_state.items() if not k.endswith("_rp_bucket")}
    reference = FairseqReference(stripped, case["model_args"])
    logits = run_forward(reference, case_inputs(case, official_io))
    assert max_diff(logits, case["logits"]) <= 1e-5


def test_disable_entangle_flag_changes_logits(fixture_cases):
    assert max_diff(fixture_cases["entangled"]["logits"],
                    fixture_cases["perturbed"]["logits"]) > 1e-3


def test_interpolate_position_only_above_original_grid(fixture_cases, perturbed_state,
                                                       official_io):
    """At 128 px the 8x8 grid exceeds orig 64 px (4x4), so the embeddings are interpolated; at
    orig 256 px (16x16) the same flag leaves 128 px inputs alone."""
    case = fixture_cases["interpolated"]
    inputs = case_inputs(case, official_io)
    args = dict(case["model_args"])
    interpolated = run_forward(FairseqReference(perturbed_state, args), inputs)
    plain = run_forward(FairseqReference(perturbed_state, {**args, "interpolate_position": False}),
                        inputs)
    big_orig = run_forward(
        FairseqReference(perturbed_state, {**args, "orig_patch_image_size": 256}), inputs)
    assert max_diff(interpolated, plain) > 1e-3
    assert torch.equal(big_orig, plain)


def test_text_only_and_reduced_precision(official, official_io):
    inputs = official_io["inputs"]
    reference = FairseqReference.from_checkpoint(official)
    text_only = reference.forward(inputs["input_ids"], None, None, inputs["decoder_input_ids"])
    assert text_only.shape == official_io["logits"].shape
    assert reference.encode(inputs["input_ids"])["encoder_out"].shape[1] == \
        inputs["input_ids"].shape[1]
    half = FairseqReference.from_checkpoint(official, dtype=torch.bfloat16)
    logits = run_forward(half, inputs)
    assert logits.dtype == torch.bfloat16
    assert max_diff(logits.float(), official_io["logits"]) < 0.05


def test_freeze_flags_mark_embeddings_like_fairseq(official, official_args):
    state = official["model"]
    reference = FairseqReference(state, official_args)
    assert reference.sd["encoder.layers.0.fc1.weight"].requires_grad
    assert not reference.sd["encoder.embed_images.bn1.running_var"].requires_grad
    assert reference.sd["decoder.output_projection.weight"].requires_grad
    frozen = FairseqReference(state, {**official_args, "freeze_encoder_embedding": True})
    for key in TIED_EMBEDDINGS:
        assert not frozen.sd[key].requires_grad, key
    # the caller's tensors are never touched
    assert not any(v.requires_grad for v in state.values())


# ---------------------------------------------------------------------------------------------
# mutation tests: a wrong reference must move the logits by far more than the parity gate


class _SwappedLayerNorm(FairseqReference):
    def _layer_norm(self, x, prefix):
        weight, bias = self._p(prefix + ".weight"), self._p(prefix + ".bias")
        return F.layer_norm(x, weight.shape, bias, weight, 1e-5)


class _SkippedNormFormerLn(FairseqReference):
    def _layer_norm(self, x, prefix):
        if prefix.endswith(("attn_ln", "ffn_layernorm")):
            return x
        return super()._layer_norm(x, prefix)


class _NoHeadScale(FairseqReference):
    def _opt(self, key):
        return None if key.endswith(".c_attn") else super()._opt(key)


class _BatchNormWithoutStats(FairseqReference):
    def _batch_norm(self, x, prefix):
        return F.batch_norm(x, None, None, self._p(prefix + ".weight"), self._p(prefix + ".bias"),
                            training=True, eps=self.bn_eps)


def _scale_factor_1(ref):
    ref.scaling = ref.head_dim ** -0.5
    ref.pos_scaling = ref.head_dim ** -0.5


def _transposed_token_buckets(ref):
    ref.token_rp_bucket = {k: v.t().contiguous() for k, v in ref.token_rp_bucket.items()}


def _transposed_image_buckets(ref):
    ref.image_rp_bucket = ref.image_rp_bucket.t().contiguous()


def _set(attr, value):
    def mutate(ref):
        setattr(ref, attr, value)
    return mutate


def _set_arg(key, value):
    def mutate(ref):
        ref.args[key] = value
    return mutate


MUTATIONS = {
    # name: (fixture case, reference class, in-place mutation of the built reference)
    "layer_norm_weight_bias_swapped": ("perturbed", _SwappedLayerNorm, None),
    "normformer_ln_skipped": ("perturbed", _SkippedNormFormerLn, None),
    "head_scale_c_attn_ignored": ("perturbed", _NoHeadScale, None),
    "batch_norm_running_stats_ignored": ("perturbed", _BatchNormWithoutStats, None),
    "attn_scale_factor_1": ("perturbed", FairseqReference, _scale_factor_1),
    "token_buckets_transposed": ("perturbed", FairseqReference, _transposed_token_buckets),
    # the decoder averages over 256 patches, so this one is checked on the encoder states
    "image_buckets_transposed": ("perturbed", FairseqReference, _transposed_image_buckets),
    "entangle_flag_ignored": ("entangled", FairseqReference, _set("decoder_entangle", False)),
    "entangle_added_when_disabled": ("perturbed", FairseqReference,
                                     _set("decoder_entangle", True)),
    "interpolation_skipped": ("interpolated", FairseqReference,
                              _set_arg("interpolate_position", False)),
    "post_ln_run_as_pre_ln": ("post_ln", FairseqReference,
                              _set("encoder_normalize_before", True)),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_mutation_is_caught(name, fixture_cases, perturbed_state, official_io):
    case_name, cls, mutate = MUTATIONS[name]
    case = fixture_cases[case_name]
    reference = cls(case_state(case_name, perturbed_state, fixture_cases), case["model_args"])
    if mutate is not None:
        mutate(reference)
    inputs = case_inputs(case, official_io)
    logits = run_forward(reference, inputs)
    if name == "image_buckets_transposed":
        enc = reference.encode(inputs["input_ids"], inputs["patch_images"], inputs["patch_masks"])
        assert max_diff(enc["encoder_out"], case["encoder_out"]) > 1e-3
        assert max_diff(logits, case["logits"]) > 1e-5
    else:
        assert max_diff(logits, case["logits"]) > 1e-3


def test_mutation_ignored_padding_is_caught(fixture_cases, perturbed_state, official_io,
                                            monkeypatch):
    case = fixture_cases["padded"]
    inputs = case_inputs(case, official_io)
    reference = FairseqReference(perturbed_state, case["model_args"])
    no_image_mask = reference.forward(inputs["input_ids"], inputs["patch_images"], None,
                                      inputs["decoder_input_ids"])
    assert max_diff(no_image_mask, case["logits"]) > 1e-3
    monkeypatch.setattr(forward_module, "PAD", -1)  # text and target padding never detected
    assert max_diff(run_forward(reference, inputs), case["logits"]) > 1e-3


# ---------------------------------------------------------------------------------------------
# SequenceGenerator against the official fairseq SequenceGenerator

GENERATIONS = [(name, i) for name, counts in
               (("perturbed", 5), ("special_tokens", 4), ("entangled", 1), ("padded", 1),
                ("interpolated", 1))
               for i in range(counts)]


def generator_kwargs(settings: dict) -> dict:
    kwargs = dict(settings)
    kwargs["lenpen"] = kwargs.pop("len_penalty", 1.0)
    return kwargs


def assert_same_hypotheses(ours, official_hypos, atol=1e-4):
    assert len(ours) == len(official_hypos)
    for sent_ours, sent_official in zip(ours, official_hypos):
        assert len(sent_ours) == len(sent_official)
        for mine, theirs in zip(sent_ours, sent_official):
            assert mine["tokens"].tolist() == theirs["tokens"].tolist()
            assert math.isclose(mine["score"], theirs["score"], abs_tol=atol)
            assert max_diff(mine["positional_scores"], theirs["positional_scores"]) <= atol


@pytest.fixture(scope="module")
def case_reference(fixture_cases, perturbed_state):
    built = {}

    def get(name):
        if name not in built:
            built[name] = FairseqReference(case_state(name, perturbed_state, fixture_cases),
                                           fixture_cases[name]["model_args"])
        return built[name]
    return get


def generate(reference, inputs, **settings):
    return SequenceGenerator(reference, **settings).generate(
        inputs["input_ids"], inputs["patch_images"], inputs["patch_masks"])


@pytest.mark.parametrize("name,index", GENERATIONS)
def test_official_generation(name, index, fixture_cases, case_reference, official_io):
    """Tokens and ranking identical to the official generator, scores within 1e-4."""
    case = fixture_cases[name]
    expected = case["generations"][index]
    ours = generate(case_reference(name), case_inputs(case, official_io),
                    **generator_kwargs(expected["settings"]))
    assert_same_hypotheses(ours, expected["hypos"])


def _eos_start(monkeypatch):
    monkeypatch.setattr(generator_module, "BOS", EOS)


def _step0_expands_every_beam(monkeypatch):
    original = generator_module.beam_search_step

    def step_fn(step, lprobs, scores):
        if step == 0:
            return original(1, lprobs, torch.zeros(*lprobs.shape[:2], 1))
        return original(step, lprobs, scores)
    monkeypatch.setattr(generator_module, "beam_search_step", step_fn)


def _eos_finalized_from_all_candidates(monkeypatch):
    # fairseq finalizes EOS only among the first beam_size of the 2 * beam_size candidates;
    # here an EOS anywhere in the candidate list is moved up to be finalized
    original = generator_module.beam_search_step

    def step_fn(step, lprobs, scores):
        cand_scores, indices, beams = original(step, lprobs, scores)
        order = torch.argsort(indices.ne(EOS).long(), dim=1, stable=True)
        return cand_scores.gather(1, order), indices.gather(1, order), beams.gather(1, order)
    monkeypatch.setattr(generator_module, "beam_search_step", step_fn)


def _pad_allowed(monkeypatch):
    monkeypatch.setattr(generator_module, "PAD", -1)  # nothing banned as <pad>


def _saved_keys_not_reordered(monkeypatch):
    monkeypatch.setattr(FairseqReference, "reorder_incremental_state", staticmethod(lambda state, order: None))


GENERATOR_MUTATIONS = {
    # name: (fixture case, settings index, monkeypatch, settings override)
    "eos_as_start_token": ("perturbed", 0, _eos_start, {}),
    "step0_expands_every_beam": ("perturbed", 0, _step0_expands_every_beam, {}),
    "eos_finalized_from_all_candidates": ("special_tokens", 0,
                                          _eos_finalized_from_all_candidates, {}),
    "ngram_blocking_off": ("perturbed", 0, None, {"no_repeat_ngram_size": 0}),
    "no_length_normalisation": ("special_tokens", 0, None, {"normalize_scores": False}),
    "length_penalty_ignored": ("special_tokens", 1, None, {"lenpen": 1.0}),
    "temperature_ignored": ("perturbed", 3, None, {"temperature": 1.0}),
    "min_len_ignored": ("special_tokens", 1, None, {"min_len": 1}),
    "max_len_off_by_one": ("perturbed", 0, None, {"max_len_b": 15}),
    "constraint_range_ignored": ("perturbed", 3, None, {"constraint_range": None}),
    "unk_penalty_ignored": ("special_tokens", 1, None, {"unk_penalty": 0}),
    "pad_not_banned": ("special_tokens", 0, _pad_allowed, {}),
    "saved_keys_not_reordered_with_the_beams": ("perturbed", 0, _saved_keys_not_reordered, {}),
}


@pytest.mark.parametrize("name", sorted(GENERATOR_MUTATIONS))
def test_generator_mutation_is_caught(name, fixture_cases, case_reference, official_io,
                                      monkeypatch):
    case_name, index, patch, override = GENERATOR_MUTATIONS[name]
    case = fixture_cases[case_name]
    expected = case["generations"][index]
    if patch is not None:
        patch(monkeypatch)
    settings = {**generator_kwargs(expected["settings"]), **override}
    ours = generate(case_reference(case_name), case_inputs(case, official_io), **settings)
    with pytest.raises(AssertionError):
        assert_same_hypotheses(ours, expected["hypos"])


# ---------------------------------------------------------------------------------------------
# generator properties


def naive_greedy(reference, inputs, row, max_len, min_len):
    """Argmax decoding written the obvious way: one full forward per token."""
    encoder_out = reference.encode(inputs["input_ids"][row:row + 1],
                                   inputs["patch_images"][row:row + 1],
                                   inputs["patch_masks"][row:row + 1])
    tokens, total = [BOS], 0.0
    for step in range(max_len + 1):
        logits = reference.decode(torch.tensor([tokens]), encoder_out)[0, -1]
        lprobs = torch.log_softmax(logits.float(), dim=-1)
        lprobs[PAD] = -math.inf
        if step < min_len:
            lprobs[EOS] = -math.inf
        if step >= max_len:
            keep = lprobs[EOS].clone()
            lprobs[:] = -math.inf
            lprobs[EOS] = keep
        token = int(lprobs.argmax())
        total += float(lprobs[token])
        tokens.append(token)
        if token == EOS:
            break
    return tokens[1:], total / (len(tokens) - 1)


def test_greedy_equals_naive_argmax(case_reference, fixture_cases, official_io):
    inputs = case_inputs(fixture_cases["perturbed"], official_io)
    reference = case_reference("perturbed")
    ours = generate(reference, inputs, beam_size=1, max_len_b=6, min_len=2,
                    no_repeat_ngram_size=0)
    for row in range(2):
        tokens, score = naive_greedy(reference, inputs, row, max_len=6, min_len=2)
        assert len(ours[row]) == 1
        assert ours[row][0]["tokens"].tolist() == tokens
        assert math.isclose(ours[row][0]["score"], score, abs_tol=1e-5)


def test_incremental_decoding_equals_the_full_prefix(case_reference, fixture_cases, official_io):
    """Step by step with saved keys/values, each step's logits are the teacher-forced ones."""
    inputs = case_inputs(fixture_cases["padded"], official_io)
    reference = case_reference("padded")
    encoder_out = reference._encode(inputs["input_ids"], inputs["patch_images"], inputs["patch_masks"])
    tokens = torch.tensor([[BOS, 11, 12, 13, 14, 15], [BOS, 21, 22, 23, 24, 25]])
    with torch.no_grad():
        full = reference._decode(tokens, encoder_out)
        state = {}
        steps = [reference._decode(tokens[:, :t + 1], encoder_out, state) for t in range(tokens.shape[1])]
    assert all(s.shape == (2, 1, full.shape[-1]) for s in steps)
    assert max_diff(torch.cat(steps, dim=1), full) <= 1e-5


@pytest.mark.parametrize("beam", [5, 8])
def test_beam_hypotheses_are_well_formed(beam, case_reference, fixture_cases, official_io):
    inputs = case_inputs(fixture_cases["padded"], official_io)
    max_len, min_len, ngram = 7, 3, 2
    out = generate(case_reference("padded"), inputs, beam_size=beam, max_len_b=max_len,
                   min_len=min_len, no_repeat_ngram_size=ngram)
    assert len(out) == 2
    for hypos in out:
        assert len(hypos) == beam
        scores = [h["score"] for h in hypos]
        assert scores == sorted(scores, reverse=True)
        for h in hypos:
            tokens = h["tokens"].tolist()
            assert tokens[-1] == EOS and EOS not in tokens[:-1] and PAD not in tokens
            assert min_len + 1 <= len(tokens) <= max_len + 1
            assert h["positional_scores"].shape == (len(tokens),)
            assert math.isclose(h["score"], float(h["positional_scores"].sum()) / len(tokens),
                                rel_tol=1e-5)
            seq = [BOS] + tokens
            grams = [tuple(seq[i:i + ngram]) for i in range(len(seq) - ngram + 1)]
            assert len(grams) == len(set(grams)), tokens


def test_batch_equals_each_sentence_alone(case_reference, fixture_cases, official_io):
    inputs = case_inputs(fixture_cases["padded"], official_io)
    reference = case_reference("padded")
    batched = generate(reference, inputs, beam_size=3, max_len_b=8)
    for row in range(2):
        alone_inputs = {k: v[row:row + 1] for k, v in inputs.items()}
        alone = generate(reference, alone_inputs, beam_size=3, max_len_b=8)
        assert_same_hypotheses(alone, [batched[row]], atol=1e-5)


def test_max_len_a_scales_with_source_length(case_reference, fixture_cases, official_io):
    inputs = case_inputs(fixture_cases["perturbed"], official_io)
    out = generate(case_reference("perturbed"), inputs, beam_size=2, max_len_a=0.25, max_len_b=0,
                   min_len=3)
    limit = int(0.25 * inputs["input_ids"].shape[1])
    assert all(len(h["tokens"]) == limit + 1 for hypos in out for h in hypos)


# ---------------------------------------------------------------------------------------------
# errors and independence


def test_missing_key_is_named(official, official_args):
    state = dict(official["model"])
    del state["encoder.layers.1.attn_ln.bias"]
    reference = FairseqReference(state, official_args)
    with pytest.raises(OfaconvError, match=r"encoder\.layers\.1\.attn_ln\.bias"):
        reference.encode(torch.tensor([[0, 5, 2]]), torch.zeros(1, 3, 32, 32))


def test_flag_inconsistent_with_state_dict(official, official_args):
    with pytest.raises(OfaconvError, match="scale_attn"):
        FairseqReference(official["model"], {**official_args, "scale_attn": False})


@pytest.mark.parametrize("flag", ["encoder_prompt", "adapter", "cross_self_attention"])
def test_unsupported_features_refused(flag, official, official_args):
    with pytest.raises(OfaconvError, match=flag):
        FairseqReference(official["model"], {**official_args, flag: True})


def test_generator_rejects_bad_settings(official, official_args):
    reference = FairseqReference(official["model"], official_args)
    with pytest.raises(OfaconvError):
        SequenceGenerator(reference, temperature=0)
    with pytest.raises(OfaconvError):
        SequenceGenerator(reference, constraint_range="4")
    with pytest.raises(OfaconvError, match="min_len"):
        SequenceGenerator(reference, min_len=5, max_len_b=2).generate(
            torch.tensor([[0, 5, 2]]), torch.zeros(1, 3, 32, 32))


def test_reference_never_imports_the_converted_model():
    package = Path(forward_module.__file__).parent
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            for name in names:
                assert "modeling" not in name and "transformers" not in name, (path.name, name)
