"""Every recipe in training/ runs as shipped: the recipe file byte for byte, in a copy of the
repository layout its relative paths expect (``training/``, ``models/``, ``bertclip-init/``,
``data/``) holding tiny data in the documented formats, through the real command
(``ofaconv finetune`` / ``ofaconv clip train``, never ``--smoke``), shrunk only by overrides
that make it small (epochs, batch size, data-loader workers)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from ofaconv.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.name for p in (REPO / "training").glob("*.yaml"))

# What an override may change here: only how big the run is. Anything else would test another recipe.
SHRINKING = {"training.num_train_epochs", "training.per_device_train_batch_size", "training.per_device_eval_batch_size",
             "training.dataloader_num_workers", "training.warmup_steps", "training.logging_steps",
             "lit.encode_batch_size", "max_length", "output_dir", "encoder_cache.dir"}


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _layout(tmp_path: Path) -> Path:
    """``tmp_path`` laid out like the repository: the shipped recipes under ``training/``."""
    (tmp_path / "training").mkdir()
    for name in RECIPES:
        shutil.copyfile(REPO / "training" / name, tmp_path / "training" / name)
    return tmp_path / "training"


def _run(command: list[str], recipe: Path, overrides: dict, capsys) -> str:
    assert set(overrides) <= SHRINKING, set(overrides) - SHRINKING
    argv = [*command, str(recipe)]
    for key, value in overrides.items():
        argv += ["--override", f"{key}={value}"]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return captured.out


def _muge_split(folder: Path, name: str, count: int, seed: int) -> None:
    """MUGE's files: ``{name}.jsonl`` of {"image_id", "text": [...]} and ``{name}.tsv`` of id<TAB>base64."""
    from ofaconv.ofa.finetune.synthetic import write_shapes_split

    write_shapes_split(folder, name, count, image_size=48, captions_per_image=2, seed=seed, id_prefix=f"{seed}")


def test_every_shipped_recipe_has_a_run_here():
    assert set(RECIPES) == {"ofa_muge_lit.yaml", "ofa_smoke_cpu.yaml", "clip_bertclip_lit.yaml"}, (
        "a new recipe in training/ needs its as-shipped run in this file")


def test_ofa_muge_lit_runs_as_shipped_on_muge_files(tmp_path, ofa_verified_folder, capsys, monkeypatch):
    """The recipe's own set-up: a converted folder at models/ofa-cn-base, MUGE's IC_train/IC_valid
    files at data/MUGE/, and held-out evaluation every epoch (eval_strategy: epoch)."""
    monkeypatch.chdir(tmp_path)
    training = _layout(tmp_path)
    (tmp_path / "models").mkdir()
    shutil.copytree(ofa_verified_folder, tmp_path / "models" / "ofa-cn-base")
    _muge_split(tmp_path / "data" / "MUGE", "IC_train", 8, seed=0)
    _muge_split(tmp_path / "data" / "MUGE", "IC_valid", 3, seed=5)

    _run(["finetune"], training / "ofa_muge_lit.yaml",
         {"training.num_train_epochs": 1, "training.per_device_train_batch_size": 4,
          "training.dataloader_num_workers": 0}, capsys)

    out = tmp_path / "runs" / "ofa-cn-base-muge-lit"
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["passed"], report["checks"]
    run = report["training"]
    assert run["settings"]["training"]["eval_strategy"] == "epoch" and run["epochs"] == 1
    assert run["data"]["train_pairs"] == 16 and run["data"]["eval_images"] == 3
    assert run["global_steps"] == 4 and run["encoder"] == "cache"
    # The epoch-end evaluation ran inside training (the shipped eval_strategy), and its scores are the run's.
    log = [json.loads(line) for line in (tmp_path / "runs" / "ofa-cn-base-muge-lit-checkpoints"
                                         / "training_log.jsonl").read_text().splitlines()]
    evals = [entry for entry in log if "eval_loss" in entry]
    assert len(evals) == 1 and evals[0]["step"] == 4, evals
    assert {"eval_loss", "eval_bleu4", "eval_cider_d"} <= set(run["metrics"])


def test_ofa_smoke_recipe_runs_as_shipped(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    training = _layout(tmp_path)
    _run(["finetune"], training / "ofa_smoke_cpu.yaml",
         {"output_dir": tmp_path / "smoke", "encoder_cache.dir": tmp_path / "smoke-cache"}, capsys)
    report = json.loads((tmp_path / "smoke" / "conversion_report.json").read_text())
    assert report["passed"] and report["training"]["global_steps"] == 4


@pytest.fixture(scope="module")
def bertclip_init(tmp_path_factory):
    """The recipe header's first step, ``ofaconv clip init --vision CLIP/ --text BERT/ bertclip-init/``,
    on synthetic OpenAI-CLIP and BERT folders."""
    from ofaconv.clip import synth

    root = tmp_path_factory.mktemp("bertclip-init")
    vision, text = synth.write_openai_clip(root / "clip"), synth.write_bert(root / "bert")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(root / "hf_home"))
        assert main(["clip", "init", "--vision", str(vision), "--text", str(text), str(root / "init")]) == 0
    return root / "init"


def test_clip_bertclip_lit_runs_as_shipped_on_a_downloaded_csv(tmp_path, bertclip_init, capsys, monkeypatch):
    """bertclip-init/ next to training/, and what ``ofaconv clip download data/train.csv data/`` leaves:
    data/train.csv (text,url,filename) with the images under data/."""
    from ofaconv.clip import synth

    monkeypatch.chdir(tmp_path)
    training = _layout(tmp_path)
    shutil.copytree(bertclip_init, tmp_path / "bertclip-init")
    pairs = synth.write_caption_pairs(tmp_path / "data", per_class=2, seed=0, csv_name="train.csv")
    with open(pairs, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["text", "url", "filename"] and (tmp_path / "data" / rows[0]["filename"]).is_file()

    _run(["clip", "train"], training / "clip_bertclip_lit.yaml",
         {"training.num_train_epochs": 1, "training.per_device_train_batch_size": 8,
          "training.dataloader_num_workers": 0, "lit.encode_batch_size": 8, "max_length": 16}, capsys)

    out = tmp_path / "runs" / "bertclip-lit"
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["pairs"] == len(rows) == 16 and stats["bad_images"] == 0
    report = json.loads((out / "final" / "conversion_report.json").read_text())
    assert report["model_family"] == "clip" and report["passed"] and (out / "final" / "config.json").is_file()

