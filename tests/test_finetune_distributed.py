"""Two CPU processes (torchrun, gloo) give the same loss curve as one process with the same global
batch: same examples per step, loss normalised by the tokens of the whole distributed batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # two torchrun processes: the slow tier, which .ci/run runs

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(folder: Path) -> dict:
    entries = [json.loads(line) for line in (folder / "training_log.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in entries if "loss" in e}


def test_two_processes_match_one(tmp_path):
    config = json.loads((REPO / "fixtures" / "micro_cn_config.json").read_text())
    config["patch_image_size"] = 32
    (tmp_path / "micro32.json").write_text(json.dumps(config))
    recipe = {
        "model_init": {"config": str(tmp_path / "micro32.json")},
        "output_dir": str(tmp_path / "one"),
        "sampler": "image",
        "encoder_cache": {"dir": str(tmp_path / "cache")},
        "data": {"synthetic": {"train_images": 8, "eval_images": 4, "captions_per_image": 2, "image_size": 32},
                 "max_eval_images": 4},
        "generation": {"num_beams": 1, "max_len_b": 4},
        "training": {"per_device_train_batch_size": 8, "learning_rate": 1e-3, "max_steps": 4, "logging_steps": 1,
                     "warmup_steps": 1, "save_strategy": "no", "eval_strategy": "no", "disable_tqdm": True, "seed": 0},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), "-m", "ofaconv", "finetune", str(path),
        "--override", "training.per_device_train_batch_size=4",
        "--override", f"output_dir={tmp_path / 'two'}",
        "--override", f"checkpoint_dir={tmp_path / 'two-checkpoints'}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")

    from ofaconv.ofa.finetune import finetune

    one = finetune(path)
    two = json.loads((tmp_path / "two" / "conversion_report.json").read_text())
    assert two["training"]["world_size"] == 2 and two["training"]["global_batch_size"] == 8
    assert two["passed"]
    single, double = _losses(one.output_dir), _losses(tmp_path / "two")
    assert sorted(single) == sorted(double) == [1, 2, 3, 4]
    for step in single:
        assert double[step] == pytest.approx(single[step], rel=1e-4), (step, single, double)
    metrics = two["training"]["metrics"]
    assert metrics["eval_loss"] == pytest.approx(one.metrics["eval_loss"], rel=1e-4)
    assert metrics["eval_num_images"] == 4
