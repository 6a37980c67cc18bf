"""Proof that finetuning learns: a micro OFA-CN from random init (fixtures/micro_cn_config.json),
LiT-tuned with the encoder cache on synthetic coloured shapes captioned in Chinese ("红色的圆形"),
captions held-out images exactly. CI budget: under 3 minutes on 2 CPU cores."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from ofaconv.ofa.finetune import finetune
from ofaconv.ofa.finetune.synthetic import COLORS, SHAPES, draw_shape

pytestmark = pytest.mark.slow  # minutes of training: the slow tier, which .ci/run runs

REPO = Path(__file__).resolve().parents[1]


# The bar is 90% exact match (chance: 1/12). The recipe is chosen to clear it with margin on
# every seed tried (0.94-0.98 over seeds 0-2): float reduction order differs between CPUs, and so
# does the trajectory; a recipe that only just clears the bar on one machine fails on another.
SEED = 0


def test_lit_learns_to_caption_held_out_shapes(tmp_path):
    torch.set_flush_denormal(True)
    recipe = {
        "model_init": {"config": str(REPO / "fixtures" / "micro_cn_config.json"), "seed": SEED},
        "output_dir": str(tmp_path / "shapes-captioner"),
        "freeze_encoder": True,
        "freeze_word_embed": True,
        "sampler": "image",
        "data": {
            # 12 colour x shape classes, two phrasings per image ("红色的圆形", "一个红色的圆形").
            "synthetic": {"train_images": 720, "eval_images": 48, "captions_per_image": 2, "image_size": 96},
            "max_eval_images": 48,
        },
        "generation": {"num_beams": 1, "max_len_b": 10},
        "training": {
            "per_device_train_batch_size": 8,
            "learning_rate": 1e-3,
            "num_train_epochs": 8,
            "warmup_steps": 20,
            "weight_decay": 0.0,
            "logging_steps": 50,
            "save_strategy": "no",
            "eval_strategy": "no",
            "disable_tqdm": True,
            "seed": SEED,
        },
    }
    result = finetune(recipe)
    assert result.report["training"]["encoder"] == "cache"
    assert result.report["passed"]
    assert result.metrics["eval_num_images"] == 48
    assert result.metrics["eval_exact_match"] >= 0.9, result.metrics

    # The written folder captions new images through the processor and fairseq-exact generate.
    import ofaconv  # noqa: F401
    from transformers import AutoModelForSeq2SeqLM, AutoProcessor

    model = AutoModelForSeq2SeqLM.from_pretrained(result.output_dir).eval()
    processor = AutoProcessor.from_pretrained(result.output_dir)
    rng = random.Random(123)
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    images = [draw_shape(c, s, 96, rng) for c, s in pairs]
    captions = processor.batch_decode(model.generate(**processor(images=images), num_beams=1, max_len_b=10))
    hits = sum(cap.endswith(f"{c}的{s}") for cap, (c, s) in zip(captions, pairs))
    assert hits >= 10, list(zip(pairs, captions))
