"""Converted folders behave like native transformers models (issue 14, model side): pipelines,
transformers' generate arguments on top of the fairseq search, the default caption against the
official fairseq code, sdpa, torch.compile, stock tokenizers, dtype casting, and the CLIP zero-shot
pipeline.

Every model-side check runs in a clean interpreter (``python -S``, ofaconv not importable and not in
``sys.modules`` at the end, HF offline, stdin closed, ``input()`` recorded: an interactive
trust_remote_code prompt fails the run), one interpreter per group; this process only makes the
folders and compares what the clean one saved.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

EOS, PAD = 2, 1


@pytest.fixture(scope="module")
def en_folder(micro_converted):
    """An English (GPT-2 BPE) micro folder; the shared ``ofa_verified_folder`` is Chinese."""
    return micro_converted("ofa-tiny")[0]


_PREAMBLE = textwrap.dedent(
    """
    import builtins, sys
    sys.path.extend(sys.argv[1].split("|"))
    try:
        import ofaconv
    except ImportError:
        pass
    else:
        raise SystemExit("ofaconv is importable in the clean interpreter")

    PROMPTS = []  # transformers swallows what input() raises, so prompts are recorded and checked at the end

    def _no_prompt(*args, **kwargs):
        PROMPTS.append(str(args[:1])[:200])
        raise EOFError("no interactive prompts in this run")

    builtins.input = _no_prompt
    """
)
_POSTAMBLE = textwrap.dedent(
    """
    _loaded = sorted(m for m in sys.modules if m == "ofaconv" or m.startswith("ofaconv."))
    if _loaded:
        raise SystemExit(f"ofaconv was imported in the model process: {_loaded}")
    if PROMPTS:
        raise SystemExit(f"interactive prompt: {PROMPTS}")
    """
)


def run_clean(tmp_path: Path, script: str, *args, timeout: int = 900) -> dict:
    """Run ``script`` in an interpreter where ofaconv cannot be imported (and is not imported by the
    end), stdin closed and no interactive prompt allowed; return what it ``torch.save``d to
    ``sys.argv[2]``."""
    paths = sysconfig.get_paths()
    site = "|".join(dict.fromkeys([paths["purelib"], paths["platlib"]]))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    out = tmp_path / "result.pt"
    code = _PREAMBLE + textwrap.dedent(script) + _POSTAMBLE
    done = subprocess.run(
        [sys.executable, "-S", "-c", code, site, str(out), *map(str, args)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
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
from transformers import AutoTokenizer, PreTrainedTokenizerFast

out_path, folder, texts = sys.argv[2], sys.argv[3], sys.argv[4:]
loaders = {
    "PreTrainedTokenizerFast": lambda: PreTrainedTokenizerFast.from_pretrained(folder),
    "trust_remote_code=False": lambda: AutoTokenizer.from_pretrained(folder, trust_remote_code=False),
    "trust_remote_code=True": lambda: AutoTokenizer.from_pretrained(folder, trust_remote_code=True),
    "bare": lambda: AutoTokenizer.from_pretrained(folder),
}
result = {}
for name, load in loaders.items():
    PROMPTS.clear()
    tokenizer = load()
    ids = tokenizer(texts)["input_ids"]
    result[name] = {
        "class": f"{type(tokenizer).__module__}.{type(tokenizer).__name__}",
        "ids": ids,
        "decoded": [tokenizer.decode(row, skip_special_tokens=True) for row in ids],
        "prompts": list(PROMPTS),
    }
PROMPTS.clear()  # the bare call's own prompt is transformers' (see the test); nothing else may ask
torch.save(result, out_path)
"""


@pytest.mark.parametrize("family", ["en", "cn"])
def test_stock_tokenizer_loads_without_remote_code(family, en_folder, ofa_verified_folder, tmp_path):
    """The stock class, or AutoTokenizer with trust_remote_code given either way, loads the folder's
    tokenizer with no prompt and no code of the folder. A bare ``AutoTokenizer.from_pretrained(out)``
    gets the same stock tokenizer, but transformers 5 resolves the model config first and asks
    ``[y/N]`` (15 s timeout) because config.json's auto_map names the remote-code OFAConfig, which
    ``AutoModel*.from_pretrained(out, trust_remote_code=True)`` needs: no folder layout avoids that
    question (docs/captioning.md)."""
    from ofaconv.ofa.tokenization import build_tokenizer

    folder = en_folder if family == "en" else ofa_verified_folder
    texts = [" what does the image describe?", "a man riding a horse, 13 times!", "图片描述了什么内容?红色的iphone 13手机"]
    result = run_clean(tmp_path, _TOKENIZER_CLEAN, folder, *texts)
    ours = build_tokenizer(family)
    expected_ids = ours(texts)["input_ids"]
    for name, got in result.items():
        assert got["class"].startswith("transformers."), (name, got["class"])  # a stock class, no remote code
        assert got["ids"] == expected_ids, name
        assert got["decoded"] == [ours.decode(row, skip_special_tokens=True) for row in expected_ids], name
        if name != "bare":
            assert got["prompts"] == [], name


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
# transformers' generate arguments on top of the fairseq search; sdpa, torch.compile, dtype
# ---------------------------------------------------------------------------------------------

_GENERATE_CLEAN = """
import logging, math, warnings
import torch
from PIL import Image
from transformers import (AutoModelForSeq2SeqLM, AutoProcessor, LogitsProcessor, LogitsProcessorList,
                          RepetitionPenaltyLogitsProcessor, StoppingCriteria, StoppingCriteriaList)
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

out_path, folder = sys.argv[2:4]
EOS, PAD = 2, 1
torch.set_num_threads(1)
images = [Image.new("RGB", (97, 61), (200, 30, 40)), Image.new("RGB", (40, 90), (10, 160, 60))]
model = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32,
                                              attn_implementation="eager").eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
inputs = dict(processor(images=images))
vocab = model.config.vocab_size
r = {"class": type(model).__module__ + "." + type(model).__name__, "vocab": vocab,
     "decoder_layers": model.config.decoder_layers, "encoder_layers": model.config.encoder_layers,
     "decoder_heads": model.config.decoder_attention_heads}


class Ban(LogitsProcessor):
    def __init__(self, token):
        self.token, self.calls = token, []

    def __call__(self, input_ids, scores):
        self.calls.append((tuple(input_ids.shape), tuple(scores.shape)))
        scores[:, self.token] = -math.inf
        return scores


# logits processors see every beam of the batch; bad_words_ids is the same ban
default = model.generate(**inputs, num_beams=3, max_len_b=6)
banned = sorted(set(default[:, 1].tolist()))[0]
ban = Ban(banned)
out = model.generate(**inputs, num_beams=3, max_len_b=6, logits_processor=LogitsProcessorList([ban]))
r["ban"] = {"banned": banned, "out": out, "calls": ban.calls,
            "bad_words": model.generate(**inputs, num_beams=3, max_len_b=6, bad_words_ids=[[banned]])}

# repetition_penalty is transformers' processor on the search
r["repetition"] = {
    "default": model.generate(**inputs, num_beams=3, max_len_b=10),
    "penalised": model.generate(**inputs, num_beams=3, max_len_b=10, repetition_penalty=3.0),
    "manual": model.generate(**inputs, num_beams=3, max_len_b=10,
                             logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(3.0)])),
}


class StopAfter(StoppingCriteria):
    def __init__(self, tokens):
        self.tokens = tokens

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] > self.tokens, dtype=torch.bool)


r["stopping"] = {beams: model.generate(**inputs, num_beams=beams, max_len_b=10, num_return_sequences=beams,
                                       stopping_criteria=StoppingCriteriaList([StopAfter(3)]),
                                       return_dict_in_generate=True).sequences
                 for beams in (1, 4)}

# output_scores / return_dict_in_generate with beam indices
out = model.generate(**inputs, num_beams=4, num_return_sequences=3, max_len_b=6, return_dict_in_generate=True,
                     output_scores=True, output_logits=True, lenpen=1.0)
r["scores"] = {"sequences": out.sequences, "beam_indices": out.beam_indices, "n_scores": len(out.scores),
               "n_logits": len(out.logits), "score_shape": tuple(out.scores[0].shape),
               "transition": model.compute_transition_scores(out.sequences, out.scores, out.beam_indices),
               "token_scores": out.token_scores, "sequences_scores": out.sequences_scores,
               "plain": model.generate(**inputs, num_beams=4, num_return_sequences=3, max_len_b=6)}

# attentions and hidden states per step
out = model.generate(**inputs, num_beams=2, max_len_b=4, return_dict_in_generate=True, output_attentions=True,
                     output_hidden_states=True)
r["attentions"] = {"steps": len(out.decoder_attentions), "cross": len(out.cross_attentions),
                   "hidden": len(out.decoder_hidden_states), "layers": len(out.decoder_attentions[0]),
                   "shape": tuple(out.decoder_attentions[0][0].shape[:2]), "encoder": len(out.encoder_attentions),
                   "hidden_layers": len(out.decoder_hidden_states[0])}


class Collect(BaseStreamer):
    def __init__(self):
        self.tokens, self.ended = [], False

    def put(self, value):
        self.tokens += value.reshape(-1).tolist()

    def end(self):
        self.ended = True


one = {k: v[:1] for k, v in inputs.items()}
greedy_streamer = Collect()
greedy = model.generate(**one, num_beams=1, max_len_b=6, streamer=greedy_streamer)
torch.manual_seed(0)
sample_streamer = Collect()
sampled = model.generate(**one, do_sample=True, top_k=20, max_new_tokens=5, streamer=sample_streamer)
r["streamer"] = {"greedy": (greedy_streamer.ended, greedy_streamer.tokens, greedy[0].tolist()),
                 "sampling": (sample_streamer.ended, sample_streamer.tokens, sampled[0].tolist())}

r["num_return_sequences"] = {"beam": model.generate(**inputs, num_beams=4, num_return_sequences=3, max_len_b=5).shape[0]}
torch.manual_seed(0)
r["num_return_sequences"]["sampling"] = model.generate(**inputs, do_sample=True, num_return_sequences=2,
                                                       max_new_tokens=4).shape[0]


class Logs(logging.Handler):
    # transformers' loggers do not propagate to the root logger: listen on both
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(str(record.msg))

    def __enter__(self):
        self.loggers = [logging.getLogger(), hf_logging.get_logger()]
        for logger in self.loggers:
            logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        for logger in self.loggers:
            logger.removeHandler(self)


with Logs() as logs:
    plain = model.generate(**inputs, num_beams=3, max_len_b=5, lenpen=1.0, min_len=1)
quiet = list(logs.messages)
with Logs() as logs:
    conflicting = model.generate(**inputs, num_beams=3, max_len_b=5, lenpen=1.0, length_penalty=0.3, min_len=1,
                                 min_new_tokens=3, early_stopping=False)
r["conflicts"] = {"quiet": quiet, "messages": logs.messages, "same": torch.equal(plain, conflicting)}
with warnings.catch_warnings(record=True) as caught, Logs() as logs:
    warnings.simplefilter("always")
    model.generate(**inputs)
    model.generate(**inputs, do_sample=True, max_new_tokens=4)
r["plain_noise"] = [str(w.message) for w in caught] + logs.messages

# sdpa: the default, and within 1e-5 of eager (logits, encoder states, attention weights, generate)
r["default_attention"] = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True).config._attn_implementation
sdpa = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="sdpa").eval()
ids = inputs["input_ids"].clone()
ids[1, -3:] = PAD  # a padded prompt
probe = {**inputs, "input_ids": ids, "attention_mask": ids.ne(PAD).long(),
         "decoder_input_ids": torch.tensor([[0, 50, 60, 70, 80]] * 2)}
with torch.no_grad():
    a, b = model(**probe), sdpa(**probe)
    weights = sdpa(**probe, output_attentions=True)  # sdpa cannot return weights: that call runs eager
    reference = model(**probe, output_attentions=True)
r["sdpa"] = {
    "logits": (a.logits - b.logits).abs().max().item(),
    "encoder": (a.encoder_last_hidden_state - b.encoder_last_hidden_state).abs().max().item(),
    "weights": [None if x is None else (x - y).abs().max().item()
                for x, y in zip(weights.cross_attentions + weights.decoder_attentions,
                                reference.cross_attentions + reference.decoder_attentions)],
    "generate": torch.equal(sdpa.generate(**inputs, num_beams=3, max_len_b=6),
                            model.generate(**inputs, num_beams=3, max_len_b=6)),
}

# torch.compile of the decoder step (dynamo tracing; tests/test_native.py has the inductor run, slow)
expected = model.generate(**inputs, num_beams=2, max_len_b=3)
torch._dynamo.reset()
model.decoder.forward = torch.compile(model.decoder.forward, backend="eager")
r["compiled_eager"] = torch.equal(model.generate(**inputs, num_beams=2, max_len_b=3), expected)
del model.decoder.forward
torch._dynamo.reset()

# a bf16 model takes the processor's fp32 pixels
bf16 = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).eval()
with torch.no_grad():
    logits = bf16(**inputs, decoder_input_ids=torch.zeros(2, 1, dtype=torch.long)).logits
bf16_out = bf16.generate(**inputs, num_beams=2, max_len_b=4)
r["bf16"] = {"pixels": inputs["patch_images"].dtype, "logits": logits.dtype, "finite": bool(torch.isfinite(logits).all()),
             "generated": bf16_out}
torch.save(r, out_path)
"""


@pytest.fixture(scope="module")
def gen(en_folder, tmp_path_factory):
    """What the clean interpreter measured on the English micro folder (stock Auto classes + remote code)."""
    return run_clean(tmp_path_factory.mktemp("clean-generate"), _GENERATE_CLEAN, en_folder)


def test_the_model_is_the_folders_remote_code(gen):
    assert gen["class"].endswith("modeling_ofa.OFAForConditionalGeneration")
    assert not gen["class"].startswith("ofaconv")


def test_logits_processor_sees_every_beam_of_the_batch(gen):
    ban = gen["ban"]
    assert ban["banned"] not in ban["out"].tolist()[0] + ban["out"].tolist()[1]
    assert [c[1] for c in ban["calls"]] == [(2 * 3, gen["vocab"])] * len(ban["calls"])
    assert [c[0] for c in ban["calls"]] == [(6, step + 1) for step in range(len(ban["calls"]))]
    assert torch.equal(ban["bad_words"], ban["out"])  # bad_words_ids: the same ban through transformers' processor


def test_repetition_penalty_is_transformers_processor_on_the_search(gen):
    rep = gen["repetition"]
    assert torch.equal(rep["penalised"], rep["manual"])

    def repeats(sequences):
        return sum(len(row) - len(set(row)) for row in sequences[:, 1:].tolist())

    assert repeats(rep["penalised"]) < repeats(rep["default"])  # the micro model loves repeating itself


@pytest.mark.parametrize("beams", [1, 4])
def test_stopping_criteria_end_hypotheses(gen, beams):
    sequences = gen["stopping"][beams]
    assert sequences.shape[1] == 1 + 3
    assert any(EOS not in row for row in sequences.tolist())  # ended by the criterion, not by EOS


def test_scores_and_beam_indices_give_transition_scores(gen):
    out = gen["scores"]
    assert out["sequences"].shape[0] == 6 and out["beam_indices"].shape == (6, out["sequences"].shape[1] - 1)
    assert out["n_scores"] == out["n_logits"] and out["score_shape"] == (2 * 4, gen["vocab"])
    transition = out["transition"]
    assert torch.allclose(transition, out["token_scores"][:, : transition.shape[1]], atol=1e-5)
    lengths = (out["beam_indices"] >= 0).sum(-1)
    assert torch.allclose(transition.sum(-1) / lengths, out["sequences_scores"], atol=1e-5)
    assert torch.equal(out["plain"], out["sequences"])  # the plain call returns the same sequences


def test_attentions_and_hidden_states_per_step(gen):
    a = gen["attentions"]
    assert a["steps"] == a["cross"] == a["hidden"] >= 1
    assert a["layers"] == gen["decoder_layers"] and a["shape"] == (2 * 2, gen["decoder_heads"])
    assert a["encoder"] == gen["encoder_layers"] and a["hidden_layers"] == gen["decoder_layers"] + 1


@pytest.mark.parametrize("mode", ["greedy", "sampling"])
def test_streamer(gen, mode):
    ended, streamed, returned = gen["streamer"][mode]
    assert ended and streamed == returned


def test_num_return_sequences(gen):
    assert gen["num_return_sequences"] == {"beam": 6, "sampling": 4}


def test_conflicting_arguments_log_one_line(gen):
    c = gen["conflicts"]
    assert c["quiet"] == [] and len(c["messages"]) == 1
    message = c["messages"][0]
    assert "lenpen=1.0 wins over length_penalty=0.3" in message and "min_len=1 wins over min_new_tokens=3" in message
    assert "early_stopping" in message and "\n" not in message
    assert c["same"]  # fairseq's knobs won


def test_no_warning_on_plain_generate(gen):
    assert gen["plain_noise"] == []


def test_sdpa_matches_eager_and_is_the_default(gen):
    assert gen["default_attention"] == "sdpa"
    sdpa = gen["sdpa"]
    assert sdpa["logits"] <= 1e-5 and sdpa["encoder"] <= 1e-5
    assert sdpa["weights"] and all(w is not None and w <= 1e-5 for w in sdpa["weights"])
    assert sdpa["generate"]


def test_compiled_decoder_step(gen):
    assert gen["compiled_eager"]


def test_bf16_model_takes_fp32_pixels(gen):
    b = gen["bf16"]
    assert b["pixels"] == torch.float32 and b["logits"] == torch.bfloat16 and b["finite"]
    assert b["generated"].shape[0] == 2 and (b["generated"][:, 0] == 0).all()


_INDUCTOR_CLEAN = """
import torch
from PIL import Image
from transformers import AutoModelForSeq2SeqLM, AutoProcessor

out_path, folder = sys.argv[2:4]
images = [Image.new("RGB", (97, 61), (200, 30, 40)), Image.new("RGB", (40, 90), (10, 160, 60))]
model = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True).eval()
inputs = dict(AutoProcessor.from_pretrained(folder, trust_remote_code=True)(images=images))
expected = {beams: model.generate(**inputs, num_beams=beams, max_len_b=4) for beams in (1, 3)}
model.decoder.forward = torch.compile(model.decoder.forward)  # the default backend (inductor)
got = {beams: model.generate(**inputs, num_beams=beams, max_len_b=4) for beams in (1, 3)}
torch.save({"expected": expected, "got": got}, out_path)
"""


@pytest.mark.slow
def test_inductor_compiled_decoder_step(en_folder, tmp_path):
    """``torch.compile`` with its default backend (C++ code generation, a minute or more on CPU) of the
    decoder step that generate runs at every token: same captions, greedy and beam."""
    result = run_clean(tmp_path, _INDUCTOR_CLEAN, en_folder, timeout=1800)
    for beams, expected in result["expected"].items():
        assert torch.equal(result["got"][beams], expected), beams


# ---------------------------------------------------------------------------------------------
# The default caption against the official fairseq code
# ---------------------------------------------------------------------------------------------

_FAIRSEQ_CLEAN = """
import torch
from transformers import AutoModelForSeq2SeqLM

out_path, folder, cases_path = sys.argv[2:5]
cases = torch.load(cases_path, weights_only=True)
model = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True).eval()  # as a user loads it
result = {"class": type(model).__module__ + "." + type(model).__name__, "runs": []}
for run in cases:
    out = model.generate(**run["inputs"], **run["kwargs"], return_dict_in_generate=True, output_scores=True)
    result["runs"].append({"sequences": out.sequences, "scores": out.sequences_scores})
torch.save(result, out_path)
"""

# fairseq SequenceGenerator settings -> generate arguments (the folder's fairseq-named knobs)
_KWARGS = {"beam_size": "num_beams", "max_len_a": "max_len_a", "max_len_b": "max_len_b", "min_len": "min_len",
           "no_repeat_ngram_size": "no_repeat_ngram_size", "len_penalty": "lenpen", "temperature": "fairseq_temperature",
           "unk_penalty": "unk_penalty", "constraint_range": "constraint_range", "normalize_scores": "normalize_scores"}
# the folder's generation_config.json: the default caption settings of the official micro model
_DEFAULTS = {"beam_size": 5, "max_len_a": 0, "max_len_b": 16, "min_len": 1, "no_repeat_ngram_size": 3}


@pytest.fixture(scope="module")
def fairseq_runs(official_micro, official_io_path, tmp_path_factory):
    """The official micro checkpoint with every weight perturbed (tests/test_reference.py), converted;
    the generations the official fairseq code made of it (tests/data/reference_official_perturbed.pt)
    run in the clean interpreter: with no generate argument where the official settings are the
    folder's defaults, with the fairseq knobs as generate arguments otherwise."""
    import torch.nn.functional as F

    from ofaconv.ofa.convert import convert_checkpoint
    from test_reference import PERTURBED_FIXTURE, load_official_checkpoint, perturb_state_dict

    root = tmp_path_factory.mktemp("fairseq-default")
    ckpt = dict(load_official_checkpoint(official_micro))
    ckpt["model"] = perturb_state_dict(ckpt["model"], seed=0)
    torch.save(ckpt, root / "perturbed.pt")
    folder = convert_checkpoint(root / "perturbed.pt", root / "out").out_dir
    official_images = torch.load(official_io_path, weights_only=True)["inputs"]["patch_images"]
    fixture = torch.load(PERTURBED_FIXTURE, weights_only=True)["cases"]
    runs, expected = [], []
    for name in ("perturbed", "padded", "interpolated"):  # the cases made from this one state dict
        case = fixture[name]
        images = F.avg_pool2d(official_images, 2) if case["images"] == "official_avgpool2" else official_images
        inputs = {"input_ids": case["inputs"]["input_ids"], "patch_images": images,
                  "patch_masks": case["inputs"]["patch_masks"]}
        for generation in case["generations"]:
            settings = generation["settings"]
            kwargs = {} if settings == _DEFAULTS else {_KWARGS[k]: v for k, v in settings.items()}
            runs.append({"inputs": inputs, "kwargs": kwargs})
            expected.append((name, settings, generation["hypos"]))
    torch.save(runs, root / "runs.pt")
    result = run_clean(root, _FAIRSEQ_CLEAN, folder, root / "runs.pt")
    return result, expected


def test_default_caption_is_the_official_fairseq_caption(fairseq_runs):
    """Token for token (and the score within 1e-4) the top hypothesis of the official fairseq
    SequenceGenerator, for the folder's default settings (no generate argument) and the others."""
    result, expected = fairseq_runs
    assert not result["class"].startswith("ofaconv")
    defaults = 0
    for got, (name, settings, hypos) in zip(result["runs"], expected):
        defaults += settings == _DEFAULTS
        for row, scores, sentence in zip(got["sequences"].tolist(), got["scores"].tolist(), hypos):
            tokens = row[1:]  # after <s>; right-padded with <pad>
            tokens = tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens
            assert tokens == sentence[0]["tokens"].tolist(), (name, settings)
            assert math.isclose(scores, sentence[0]["score"], abs_tol=1e-4), (name, settings)
    assert len(result["runs"]) == len(expected) == 7 and defaults == 2  # perturbed and padded at beam 5
