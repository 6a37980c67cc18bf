"""Tiny random-weight ModelScope OFA task folders and the inputs the task parity fixture runs on.

``fixtures/make_modelscope_tasks.py`` writes these folders, runs ModelScope's own preprocessors and
``OfaForAllTasks`` on them (in the ModelScope virtualenv) and records what they produce in
``fixtures/modelscope_tasks.json``; ``tests/test_predict.py`` writes the same folders again (same
seeds, same bytes of weights: the fixture records their sha256), converts them with ofaconv and
compares ``ofaconv predict`` with the recording.

A folder is what ModelScope publishes for a finetuned OFA task: ``configuration.json`` (the
ModelScope task and the ``model`` section the preprocessors and the generator read), the port's
``config.json``, ``pytorch_model.bin`` in the port's key names and the vocabulary (``vocab.json`` +
``merges.txt`` for English, ``vocab.txt`` for Chinese). The weights are ofaconv's micro synthetic
checkpoints renamed to the port layout.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

VARIANTS = {"en": "ofa-tiny", "cn": "ofa-cn-base"}

# One entry per case: the ModelScope task, the model language, what configuration.json's ``model``
# section says, and the texts each image is asked about (None: the task takes no text).
CASES = {
    "caption_en": {
        "task": "image-captioning", "language": "en",
        "model": {"patch_image_size": 128, "beam_search": {"beam_size": 2, "max_len_b": 6, "min_len": 1,
                                                            "no_repeat_ngram_size": 3}},
        "texts": [None],
    },
    "vqa_en": {
        "task": "visual-question-answering", "language": "en",
        "model": {"patch_image_size": 128, "beam_search": {"beam_size": 2, "max_len_b": 5, "min_len": 1,
                                                            "no_repeat_ngram_size": 3}},
        "texts": ["What color is the car", "how many dogs are there?"],
    },
    "vqa_answers_en": {
        "task": "visual-question-answering", "language": "en",
        "model": {"patch_image_size": 128, "answer2label": "ans2label.json",
                  "beam_search": {"beam_size": 2, "max_len_b": 6, "min_len": 1, "no_repeat_ngram_size": 3}},
        "answers": ["yes", "no", "red", "two", "a dog", "blue sky", "three cats"],
        "texts": ["What color is the car", "is it raining?"],
    },
    "grounding_en": {
        "task": "visual-grounding", "language": "en",
        "model": {"patch_image_size": 128, "max_image_size": 128, "num_bins": 1000,
                  "beam_search": {"beam_size": 2, "max_len_a": 0, "max_len_b": 4, "min_len": 4,
                                  "no_repeat_ngram_size": 3, "constraint_range": "58457,59457"}},
        "texts": ["a blue turtle-like pokemon with round head", "the man on the left"],
    },
    "grounding_cn": {
        "task": "visual-grounding", "language": "zh",
        "model": {"patch_image_size": 128, "max_image_size": 160, "num_bins": 1000,
                  "prompt": " 这段文字\" {} \"描述的是哪个区域？",
                  "beam_search": {"beam_size": 2, "max_len_a": 0, "max_len_b": 4, "min_len": 4,
                                  "no_repeat_ngram_size": 3, "constraint_range": "29325,30325"}},
        "texts": ["一个圆头的蓝色宝可梦"],
    },
    "matching_en": {
        "task": "visual-entailment", "language": "en",
        "model": {"patch_image_size": 128, "answer2label": "ans2label.json", "gen_type": "traverse",
                  "prompt_type": "prev_output", "beam_search": {"beam_size": 2, "max_len_b": 4}},
        "answers": ["no", "yes", "maybe"],
        "texts": ["there are two birds.", "A man rides a horse"],
    },
    "ocr_cn": {
        "task": "ocr-recognition", "language": "zh",
        "model": {"patch_image_size": 128, "beam_search": {"beam_size": 2, "max_len_b": 8, "min_len": 1,
                                                            "no_repeat_ngram_size": 3}},
        "texts": [None],
    },
}

# (name, width, height, seed): square, wide and tall images, so resizing and padding rules show.
IMAGES = [("square", 96, 96, 1), ("wide", 200, 60, 2), ("tall", 50, 150, 3)]


def family(case: dict) -> str:
    return "en" if case["language"] == "en" else "cn"


def write_images(folder: Path) -> dict[str, Path]:
    """Noise images with a smooth gradient (so resampling filters matter), as PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, width, height, seed in IMAGES:
        rng = np.random.default_rng(seed)
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
        noise = rng.integers(-60, 61, size=(height, width, 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        path = folder / f"{name}.png"
        path.write_bytes(buffer.getvalue())
        paths[name] = path
    return paths


def _port_state(variant: str, seed: int) -> tuple[dict, dict]:
    """The micro synthetic checkpoint of ``variant`` in the port's (ModelScope's) key names, and its shape."""
    import torch

    from ofaconv.core.keymap import KeyMap
    from ofaconv.ofa.checkpoint import infer_config
    from ofaconv.ofa.convert import keymap_counts
    from ofaconv.ofa.reference.buckets import make_image_position_idx
    from ofaconv.ofa.synth import synthetic_checkpoint_dict

    ckpt = synthetic_checkpoint_dict(variant, size="micro", seed=seed, optimizer_state=False)
    source = ckpt["model"]
    shape = infer_config(source)
    plan = KeyMap.load("ofa/fairseq").plan(source, keymap_counts(shape))
    state = {target: source[name].clone().contiguous() for target, name in plan.entries}
    for name in ("encoder.token_rp_bucket", "encoder.image_rp_bucket", "decoder.token_rp_bucket",
                 "decoder.image_rp_bucket"):
        state[name] = source[name].clone()
    state["decoder.image_position_idx"] = make_image_position_idx(42, length=1025)
    state["decoder.embed_tokens.weight"] = state["encoder.embed_tokens.weight"]
    state["decoder.output_projection.weight"] = state["encoder.embed_tokens.weight"]
    for tensor in state.values():
        assert isinstance(tensor, torch.Tensor)
    return state, shape


def _port_config(shape: dict, patch_image_size: int) -> dict:
    return {
        "architectures": ["OFAModel"], "model_type": "ofa", "vocab_size": shape["vocab_size"],
        "d_model": shape["d_model"], "encoder_layers": shape["encoder_layers"],
        "decoder_layers": shape["decoder_layers"], "encoder_ffn_dim": shape["encoder_ffn_dim"],
        "decoder_ffn_dim": shape["decoder_ffn_dim"], "encoder_attention_heads": shape["encoder_attention_heads"],
        "decoder_attention_heads": shape["decoder_attention_heads"], "max_position_embeddings": 1024,
        "resnet_type": "resnet18", "normformer": True, "attn_scale_factor": 2.0, "token_bucket_size": 256,
        "image_bucket_size": 42, "add_type_embedding": True, "share_decoder_input_output_embed": True,
        "entangle_position_embedding": False, "scale_embedding": False, "pad_token_id": 1, "bos_token_id": 0,
        "eos_token_id": 2, "decoder_start_token_id": 0, "forced_eos_token_id": 2, "use_ofasys": False,
        "disable_entangle": True, "interpolate_position": False, "orig_patch_image_size": patch_image_size,
        "patch_image_size": patch_image_size, "dropout": 0.0, "transformers_version": "4.57.6",
    }


def _write_vocab(folder: Path, fam: str) -> None:
    from ofaconv.ofa.tokenization import build_tokenizer, vocab_layout

    tokenizer = build_tokenizer(fam)
    layout = vocab_layout(fam)
    ids = {token: index for token, index in tokenizer.get_vocab().items() if index <= layout.mask_id}
    if fam == "en":
        from importlib.resources import files

        (folder / "vocab.json").write_text(json.dumps(ids, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_bytes(files("ofaconv.data").joinpath("gpt2_merges.txt").read_bytes())
    else:
        ordered = sorted(ids, key=ids.get)
        assert [ids[t] for t in ordered] == list(range(len(ordered)))
        (folder / "vocab.txt").write_text("".join(f"{t}\n" for t in ordered), encoding="utf-8")


def write_modelscope_folder(folder: Path, name: str, *, seed: int = 7) -> Path:
    """The ModelScope folder of case ``name`` (random weights from ``seed``)."""
    import torch

    case = CASES[name]
    fam = family(case)
    folder.mkdir(parents=True, exist_ok=True)
    state, shape = _port_state(VARIANTS[fam], seed)
    torch.save(state, folder / "pytorch_model.bin")
    size = case["model"]["patch_image_size"]
    (folder / "config.json").write_text(json.dumps(_port_config(shape, size), indent=2))
    model = {"type": "ofa", "language": case["language"], **case["model"]}
    configuration = {"framework": "pytorch", "task": case["task"], "model": model,
                     "pipeline": {"type": case["task"]}, "preprocessor": {}}
    (folder / "configuration.json").write_text(json.dumps(configuration, indent=2, ensure_ascii=False),
                                               encoding="utf-8")
    if "answers" in case:
        answers = {answer: index for index, answer in enumerate(case["answers"])}
        (folder / "ans2label.json").write_text(json.dumps(answers, ensure_ascii=False), encoding="utf-8")
    _write_vocab(folder, fam)
    return folder


def weights_sha256(folder: Path) -> str:
    return hashlib.sha256((folder / "pytorch_model.bin").read_bytes()).hexdigest()
