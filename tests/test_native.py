"""Converted folders behave like native transformers models (issue 14, model side): pipelines,
transformers' generate arguments on top of the fairseq search, sdpa, torch.compile, stock
tokenizers, dtype casting, and the CLIP zero-shot pipeline.

What the issue asks of a folder "without ofaconv" runs in a clean interpreter (``python -S``, no
ofaconv importable, HF offline); model-side behaviour that needs no such isolation runs here.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from ofaconv.ofa.modeling import OFAForConditionalGeneration

EOS, PAD = 2, 1


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def en_folder(micro_converted):
    """An English (GPT-2 BPE) micro folder; the shared ``ofa_verified_folder`` is Chinese."""
    return micro_converted("ofa-tiny")[0]


def _images():
    from PIL import Image

    return [Image.new("RGB", (97, 61), (200, 30, 40)), Image.new("RGB", (40, 90), (10, 160, 60))]


def run_clean(tmp_path: Path, script: str, *args) -> dict:
    """Run ``script`` in an interpreter where ofaconv cannot be imported (and ``input()`` fails, so
    an interactive trust_remote_code prompt is an error); return what it ``torch.save``d."""
    preamble = textwrap.dedent(
        """
        import builtins, sys
        sys.path.extend(sys.argv[1].split("|"))
        try:
            import ofaconv
        except ImportError:
            pass
        else:
            raise SystemExit("ofaconv is importable in the clean interpreter")

        def _no_prompt(*args, **kwargs):
            raise AssertionError(f"interactive prompt: {args[:1]}")

        builtins.input = _no_prompt
        """
    )
    paths = sysconfig.get_paths()
    site = "|".join(dict.fromkeys([paths["purelib"], paths["platlib"]]))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    out = tmp_path / "result.pt"
    done = subprocess.run(
        [sys.executable, "-S", "-c", preamble + textwrap.dedent(script), site, str(out), *map(str, args)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out, weights_only=False)


# ---------------------------------------------------------------------------------------------
# A folder in a clean interpreter: pipelines, a silent generate, the stock tokenizer
# ---------------------------------------------------------------------------------------------

_OFA_CLEAN = """
import logging, warnings
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
from transformers.utils import logging as hf_logging

out_path, folder = sys.argv[2:4]
images = [Image.new("RGB", (97, 61), (200, 30, 40)), Image.new("RGB", (40, 90), (10, 160, 60))]
result = {}
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)

records = []

class Keep(logging.Handler):
    def emit(self, record):
        records.append(f"{record.name}: {record.msg}")

keep, loggers = Keep(level=logging.WARNING), (hf_logging.get_logger(), logging.getLogger())
for logger in loggers:
    logger.addHandler(keep)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    generated = model.generate(**processor(images=images))
for logger in loggers:
    logger.removeHandler(keep)
result["plain_generate_noise"] = [str(w.message) for w in caught] + records
result["batch_captions"] = processor.batch_decode(generated, skip_special_tokens=True)
result["single_caption"] = processor.batch_decode(model.generate(**processor(images=images[:1])),
                                                  skip_special_tokens=True)
result["prompt"] = processor.prompt

for task in ("image-text-to-text", "image-to-text"):
    pipe = pipeline(task, model=folder, trust_remote_code=True)
    result[task] = {
        "class": type(pipe).__name__,
        "single": pipe(images[0]),
        "batch": pipe(images),
        "full_text": pipe(images[0], return_full_text=True),
        "objects": pipeline(task, model=model, processor=processor)(
            images[0], text=processor.prompt, return_full_text=False),
    }
torch.save(result, out_path)
"""


@pytest.fixture(scope="module")
def clean_ofa(en_folder, tmp_path_factory):
    return run_clean(tmp_path_factory.mktemp("clean-ofa"), _OFA_CLEAN, en_folder)


@pytest.mark.parametrize("task", ["image-text-to-text", "image-to-text"])
def test_pipeline_from_folder_equals_generate_and_decode(clean_ofa, task):
    got = clean_ofa[task]
    assert got["class"] == "OFAImageTextToTextPipeline"
    prompt = clean_ofa["prompt"]
    assert got["single"] == [{"input_text": prompt, "generated_text": clean_ofa["single_caption"][0]}]
    assert [r["generated_text"] for r in got["batch"]] == clean_ofa["batch_captions"]
    assert got["full_text"][0]["generated_text"] == prompt + clean_ofa["single_caption"][0]


@pytest.mark.parametrize("task", ["image-text-to-text", "image-to-text"])
def test_pipeline_from_objects_equals_generate_and_decode(clean_ofa, task):
    # transformers' own pipeline class: the prompt is passed as text, and return_full_text=False
    # keeps it out of the answer (docs/captioning.md)
    assert [r["generated_text"] for r in clean_ofa[task]["objects"]] == clean_ofa["single_caption"]


def test_plain_generate_is_silent(clean_ofa):
    assert clean_ofa["plain_generate_noise"] == []


_TOKENIZER_CLEAN = """
import torch
from transformers import AutoTokenizer

out_path, texts = sys.argv[2], sys.argv[4:]
result = {}
for trust in (False, True):
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[3], trust_remote_code=trust)
    ids = tokenizer(texts)["input_ids"]
    result[trust] = {
        "class": f"{type(tokenizer).__module__}.{type(tokenizer).__name__}",
        "ids": ids,
        "decoded": [tokenizer.decode(row, skip_special_tokens=True) for row in ids],
    }
torch.save(result, out_path)
"""


@pytest.mark.parametrize("family", ["en", "cn"])
def test_stock_tokenizer_loads_without_remote_code(family, en_folder, ofa_verified_folder, tmp_path):
    from ofaconv.ofa.tokenization import build_tokenizer

    folder = en_folder if family == "en" else ofa_verified_folder
    texts = [" what does the image describe?", "a man riding a horse, 13 times!", "图片描述了什么内容?红色的iphone 13手机"]
    result = run_clean(tmp_path, _TOKENIZER_CLEAN, folder, *texts)
    ours = build_tokenizer(family)
    expected_ids = ours(texts)["input_ids"]
    for trust in (False, True):
        got = result[trust]
        assert got["class"].startswith("transformers."), got["class"]  # a stock class, no remote code
        assert got["ids"] == expected_ids
        assert got["decoded"] == [ours.decode(row, skip_special_tokens=True) for row in expected_ids]


# ---------------------------------------------------------------------------------------------
# CLIP folders in the zero-shot pipeline
# ---------------------------------------------------------------------------------------------

_ZERO_SHOT_CLEAN = """
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline

out_path, folder = sys.argv[2:4]
labels = ["猫", "一只狗", "red car"]
image = Image.new("RGB", (97, 61), (200, 30, 40))
pipe = pipeline("zero-shot-image-classification", model=folder)
ranked = pipe(image, candidate_labels=labels, hypothesis_template="{}")
model, processor = AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
with torch.no_grad():
    probs = model(**processor(text=labels, images=image, return_tensors="pt", padding=True)).logits_per_image
torch.save({"class": type(pipe.model).__name__, "pipeline": {r["label"]: r["score"] for r in ranked},
            "direct": dict(zip(labels, probs.softmax(-1)[0].tolist()))}, out_path)
"""


@pytest.mark.parametrize("kind, architecture", [("bertclip", "VisionTextDualEncoderModel"),
                                                ("cnclip", "ChineseCLIPModel")])
def test_clip_folder_in_zero_shot_pipeline(kind, architecture, request, tmp_path):
    folder = request.getfixturevalue(f"{kind}_verified_folder")
    result = run_clean(tmp_path, _ZERO_SHOT_CLEAN, folder)
    assert result["class"] == architecture
    assert result["pipeline"].keys() == result["direct"].keys()
    for label, score in result["direct"].items():
        assert math.isclose(result["pipeline"][label], score, rel_tol=1e-5, abs_tol=1e-7), label


# ---------------------------------------------------------------------------------------------
# transformers' generate arguments on top of the fairseq search
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tiny(en_folder):
    from transformers import AutoProcessor

    model = OFAForConditionalGeneration.from_pretrained(en_folder, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(en_folder)
    return model, dict(processor(images=_images()))


class Ban(LogitsProcessor):
    """Bans one token and records the shapes transformers' processors are promised."""

    def __init__(self, token):
        self.token, self.calls = token, []

    def __call__(self, input_ids, scores):
        self.calls.append((tuple(input_ids.shape), tuple(scores.shape)))
        scores[:, self.token] = -math.inf
        return scores


def _first_tokens(sequences) -> set[int]:
    return set(sequences[:, 1].tolist())


def test_logits_processor_sees_every_beam_of_the_batch(tiny):
    model, inputs = tiny
    default = model.generate(**inputs, num_beams=3, max_len_b=6)
    banned = next(iter(_first_tokens(default)))
    ban = Ban(banned)
    out = model.generate(**inputs, num_beams=3, max_len_b=6, logits_processor=LogitsProcessorList([ban]))
    assert banned not in out.tolist()[0] + out.tolist()[1]
    vocab = model.config.vocab_size
    assert [c[1] for c in ban.calls] == [(2 * 3, vocab)] * len(ban.calls)
    assert [c[0] for c in ban.calls] == [(6, step + 1) for step in range(len(ban.calls))]
    # bad_words_ids is the same ban through transformers' own processor
    assert torch.equal(model.generate(**inputs, num_beams=3, max_len_b=6, bad_words_ids=[[banned]]), out)


def test_repetition_penalty_is_transformers_processor_on_the_search(tiny):
    model, inputs = tiny
    default = model.generate(**inputs, num_beams=3, max_len_b=10)
    penalised = model.generate(**inputs, num_beams=3, max_len_b=10, repetition_penalty=3.0)
    manual = model.generate(**inputs, num_beams=3, max_len_b=10,
                            logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(3.0)]))
    assert torch.equal(penalised, manual)

    def repeats(sequences):
        return sum(len(row) - len(set(row)) for row in sequences[:, 1:].tolist())

    assert repeats(penalised) < repeats(default)  # the micro model loves repeating itself


class StopAfter(StoppingCriteria):
    def __init__(self, tokens):
        self.tokens = tokens

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] > self.tokens, dtype=torch.bool)


@pytest.mark.parametrize("beams", [1, 4])
def test_stopping_criteria_end_hypotheses(tiny, beams):
    model, inputs = tiny
    out = model.generate(**inputs, num_beams=beams, max_len_b=10, num_return_sequences=beams,
                         stopping_criteria=StoppingCriteriaList([StopAfter(3)]), return_dict_in_generate=True)
    assert out.sequences.shape[1] == 1 + 3
    assert any(EOS not in row for row in out.sequences.tolist())  # ended by the criterion, not by EOS


def test_scores_and_beam_indices_give_transition_scores(tiny):
    model, inputs = tiny
    out = model.generate(**inputs, num_beams=4, num_return_sequences=3, max_len_b=6, return_dict_in_generate=True,
                         output_scores=True, output_logits=True, lenpen=1.0)
    assert out.sequences.shape[0] == 6 and out.beam_indices.shape == (6, out.sequences.shape[1] - 1)
    assert len(out.scores) == len(out.logits) and out.scores[0].shape == (2 * 4, model.config.vocab_size)
    transition = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices)
    assert torch.allclose(transition, out.token_scores[:, : transition.shape[1]], atol=1e-5)
    lengths = (out.beam_indices >= 0).sum(-1)
    assert torch.allclose(transition.sum(-1) / lengths, out.sequences_scores, atol=1e-5)
    # the plain call returns the same sequences
    plain = model.generate(**inputs, num_beams=4, num_return_sequences=3, max_len_b=6)
    assert torch.equal(plain, out.sequences)


def test_attentions_and_hidden_states_per_step(tiny):
    model, inputs = tiny
    out = model.generate(**inputs, num_beams=2, max_len_b=4, return_dict_in_generate=True, output_attentions=True,
                         output_hidden_states=True)
    steps = len(out.decoder_attentions)
    assert steps == len(out.cross_attentions) == len(out.decoder_hidden_states) >= 1
    assert len(out.decoder_attentions[0]) == model.config.decoder_layers
    assert out.decoder_attentions[0][0].shape[:2] == (2 * 2, model.config.decoder_attention_heads)
    assert len(out.encoder_attentions) == model.config.encoder_layers
    assert len(out.decoder_hidden_states[0]) == model.config.decoder_layers + 1


class Collect(BaseStreamer):
    def __init__(self):
        self.tokens, self.ended = [], False

    def put(self, value):
        self.tokens += value.reshape(-1).tolist()

    def end(self):
        self.ended = True


def test_streamer_greedy_and_sampling(tiny):
    model, inputs = tiny
    one = {k: v[:1] for k, v in inputs.items()}
    streamer = Collect()
    out = model.generate(**one, num_beams=1, max_len_b=6, streamer=streamer)
    assert streamer.ended and streamer.tokens == out[0].tolist()
    torch.manual_seed(0)
    streamer = Collect()
    sampled = model.generate(**one, do_sample=True, top_k=20, max_new_tokens=5, streamer=streamer)
    assert streamer.ended and streamer.tokens == sampled[0].tolist()


def test_num_return_sequences(tiny):
    model, inputs = tiny
    assert model.generate(**inputs, num_beams=4, num_return_sequences=3, max_len_b=5).shape[0] == 6
    torch.manual_seed(0)
    assert model.generate(**inputs, do_sample=True, num_return_sequences=2, max_new_tokens=4).shape[0] == 4


class _Logs(logging.Handler):
    """Warnings logged anywhere: transformers' loggers do not propagate to the root logger."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(str(record.msg))

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.loggers = [logging.getLogger(), hf_logging.get_logger()]
        for logger in self.loggers:
            logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        for logger in self.loggers:
            logger.removeHandler(self)


def test_conflicting_arguments_log_one_line(tiny):
    model, inputs = tiny
    with _Logs() as logs:
        plain = model.generate(**inputs, num_beams=3, max_len_b=5, lenpen=1.0, min_len=1)
    assert logs.messages == []
    with _Logs() as logs:
        out = model.generate(**inputs, num_beams=3, max_len_b=5, lenpen=1.0, length_penalty=0.3, min_len=1,
                             min_new_tokens=3, early_stopping=False)
    assert len(logs.messages) == 1
    message = logs.messages[0]
    assert "lenpen=1.0 wins over length_penalty=0.3" in message and "min_len=1 wins over min_new_tokens=3" in message
    assert "early_stopping" in message and "\n" not in message
    assert torch.equal(out, plain)  # fairseq's knobs won


def test_no_warning_on_plain_generate(tiny):
    import warnings

    model, inputs = tiny
    with warnings.catch_warnings(record=True) as caught, _Logs() as logs:
        warnings.simplefilter("always")
        model.generate(**inputs)
        model.generate(**inputs, do_sample=True, max_new_tokens=4)
    assert [str(w.message) for w in caught] == [] and logs.messages == []


# ---------------------------------------------------------------------------------------------
# sdpa, torch.compile, dtype
# ---------------------------------------------------------------------------------------------


def _probe(model, inputs):
    ids = inputs["input_ids"].clone()
    ids[1, -3:] = PAD  # a padded prompt
    return {**inputs, "input_ids": ids, "attention_mask": ids.ne(PAD).long(),
            "decoder_input_ids": torch.tensor([[0, 50, 60, 70, 80]] * 2)}


def test_sdpa_matches_eager_and_is_the_default(en_folder, tiny):
    eager, inputs = tiny
    assert OFAForConditionalGeneration.from_pretrained(en_folder).config._attn_implementation == "sdpa"
    sdpa = OFAForConditionalGeneration.from_pretrained(en_folder, attn_implementation="sdpa").eval()
    probe = _probe(eager, inputs)
    with torch.no_grad():
        a, b = eager(**probe), sdpa(**probe)
        assert (a.logits - b.logits).abs().max() <= 1e-5
        assert (a.encoder_last_hidden_state - b.encoder_last_hidden_state).abs().max() <= 1e-5
        # attention weights: sdpa cannot return them, that call runs eager
        weights = sdpa(**probe, output_attentions=True)
        reference = eager(**probe, output_attentions=True)
    for x, y in zip(weights.cross_attentions + weights.decoder_attentions,
                    reference.cross_attentions + reference.decoder_attentions):
        assert x is not None and (x - y).abs().max() <= 1e-5
    assert torch.equal(sdpa.generate(**inputs, num_beams=3, max_len_b=6), eager.generate(**inputs, num_beams=3, max_len_b=6))


def test_compiled_decoder_step(tiny):
    model, inputs = tiny
    expected = model.generate(**inputs, num_beams=2, max_len_b=3)
    torch._dynamo.reset()
    model.decoder.forward = torch.compile(model.decoder.forward, backend="eager")
    try:
        assert torch.equal(model.generate(**inputs, num_beams=2, max_len_b=3), expected)
    finally:
        del model.decoder.forward
        torch._dynamo.reset()


def test_bf16_model_takes_fp32_pixels(en_folder):
    from transformers import AutoProcessor

    model = OFAForConditionalGeneration.from_pretrained(en_folder, dtype=torch.bfloat16).eval()
    inputs = AutoProcessor.from_pretrained(en_folder)(images=_images())
    assert inputs["patch_images"].dtype == torch.float32
    with torch.no_grad():
        logits = model(**inputs, decoder_input_ids=torch.zeros(2, 1, dtype=torch.long)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    out = model.generate(**inputs, num_beams=2, max_len_b=4)
    assert out.shape[0] == 2 and (out[:, 0] == 0).all()
