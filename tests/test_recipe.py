"""One recipe system for both families: YAML 1.2 numbers and booleans, ``base:``, ``--override``,
paths relative to the recipe file, and one-line errors naming the file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ofaconv.cli import main
from ofaconv.clip.train import load_recipe as load_clip_recipe
from ofaconv.core.errors import OfaconvError
from ofaconv.ofa.finetune.recipe import load_recipe as load_ofa_recipe

OFA = {"model": "models/m", "output_dir": "runs/out",
       "data": {"train": {"captions": "data/c.jsonl", "images": "data/i.tsv"}},
       "training": {"learning_rate": 1e-4}}
CLIP = {"model": "bertclip-init", "output_dir": "runs/lit", "data": {"train": {"csv": "data/train.csv"}},
        "training": {"per_device_train_batch_size": 8}}


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def _dump(data: dict) -> str:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


def _one_line_naming(exc: pytest.ExceptionInfo, path: Path, key: str) -> str:
    text = str(exc.value)
    assert "\n" not in text and str(path) in text and f"key '{key}'" in text, text
    return text


# -- YAML 1.2 numbers and booleans ---------------------------------------------------------------


def test_clip_recipe_reads_exponent_floats(tmp_path):
    path = _write(tmp_path, "lr.yaml", _dump(CLIP).replace("per_device_train_batch_size: 8",
                                                             "per_device_train_batch_size: 8\n  learning_rate: 5e-5"))
    recipe = load_clip_recipe(path)
    assert recipe.training["learning_rate"] == 5e-5 and isinstance(recipe.training["learning_rate"], float)


@pytest.mark.parametrize("family", ["ofa", "clip"])
def test_override_no_is_the_string_no(tmp_path, family):
    load, data = (load_ofa_recipe, OFA) if family == "ofa" else (load_clip_recipe, CLIP)
    path = _write(tmp_path, "r.yaml", _dump(data))
    recipe = load(path, ["training.eval_strategy=no", "training.weight_decay=1e-3", "training.fp16=false"])
    assert recipe.training["eval_strategy"] == "no"
    assert recipe.training["weight_decay"] == 1e-3 and recipe.training["fp16"] is False


def test_yes_on_off_are_strings_so_a_boolean_key_says_so(tmp_path):
    path = _write(tmp_path, "r.yaml", _dump(OFA) + "freeze_encoder: yes\n")
    with pytest.raises(OfaconvError) as exc:
        load_ofa_recipe(path)
    assert "expected true or false, found 'yes'" in _one_line_naming(exc, path, "freeze_encoder")


# -- unknown keys and wrong types ----------------------------------------------------------------


@pytest.mark.parametrize(
    "family, extra, key, message",
    [
        ("ofa", "freeze_encodr: true\n", "freeze_encodr", "did you mean 'freeze_encoder'"),
        ("ofa", "encoder_cache: {dirr: x}\n", "encoder_cache.dirr", "did you mean 'encoder_cache.dir'"),
        ("ofa", "label_smoothing: lots\n", "label_smoothing", "expected a number, found 'lots'"),
        ("ofa", "data: {max_target_length: 2.5}\n", "data.max_target_length", "expected an integer"),
        ("ofa", "sampler: sorted\n", "sampler", "expected 'random' or 'length' or 'image'"),
        ("clip", "lit: {lock_images: true}\n", "lit.lock_images", "did you mean 'lit.lock_image'"),
        ("clip", "lit: {encode_batch_size: big}\n", "lit.encode_batch_size", "expected an integer, found 'big'"),
        ("clip", "max_length: [1]\n", "max_length", "expected an integer or null"),
        ("clip", "shuffle: true\n", "shuffle", "unknown recipe key"),
    ],
)
def test_schema_errors_name_file_and_key(tmp_path, family, extra, key, message):
    path = _write(tmp_path, "r.yaml", _dump(OFA if family == "ofa" else CLIP) + extra)
    with pytest.raises(OfaconvError) as exc:
        (load_ofa_recipe if family == "ofa" else load_clip_recipe)(path)
    assert message in _one_line_naming(exc, path, key)


@pytest.mark.parametrize("family", ["ofa", "clip"])
def test_training_arguments_are_type_checked(tmp_path, family):
    data = OFA if family == "ofa" else CLIP
    path = _write(tmp_path, "r.yaml", _dump({**data, "training": {"learning_rate": "fast"}}))
    with pytest.raises(OfaconvError) as exc:
        (load_ofa_recipe if family == "ofa" else load_clip_recipe)(path)
    assert "expected a number, found 'fast'" in _one_line_naming(exc, path, "training.learning_rate")


def test_error_in_a_base_recipe_names_the_base_file(tmp_path):
    base = _write(tmp_path / "shared", "base.yaml", _dump(OFA) + "bucket_sise: 3\n")
    child = _write(tmp_path / "runs", "child.yaml", "base: ../shared/base.yaml\nlabel_smoothing: 0.1\n")
    with pytest.raises(OfaconvError) as exc:
        load_ofa_recipe(child)
    _one_line_naming(exc, base, "bucket_sise")


def test_override_errors_name_the_recipe_and_the_flag(tmp_path):
    path = _write(tmp_path, "r.yaml", _dump(CLIP))
    with pytest.raises(OfaconvError) as exc:
        load_clip_recipe(path, ["lit.lock_image=maybe"])
    text = _one_line_naming(exc, path, "lit.lock_image")
    assert "expected true or false" in text and "--override" in text


def test_missing_required_key(tmp_path):
    path = _write(tmp_path, "r.yaml", "model: m\ndata: {train: {csv: a.csv}}\n")
    with pytest.raises(OfaconvError) as exc:
        load_clip_recipe(path)
    _one_line_naming(exc, path, "output_dir")


# -- paths ---------------------------------------------------------------------------------------


def test_paths_are_relative_to_the_recipe_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "recipes"
    ofa = load_ofa_recipe(_write(folder, "ofa.yaml", _dump(OFA)), ["checkpoint_dir=ckpt"])
    assert Path(ofa.model) == folder / "models/m" and Path(ofa.data.train.images) == folder / "data/i.tsv"
    assert Path(ofa.output_dir) == folder / "runs/out"
    assert ofa.checkpoint_dir == "ckpt"  # overrides: relative to the working directory
    clip = load_clip_recipe(_write(folder, "clip.yaml", _dump(CLIP)))
    assert Path(clip.model) == folder / "bertclip-init" and Path(clip.data.train.csv) == folder / "data/train.csv"
    # a base recipe's paths stay relative to the base
    child = load_ofa_recipe(_write(tmp_path / "elsewhere", "child.yaml", "base: ../recipes/ofa.yaml\n"))
    assert Path(child.model) == folder / "models/m"


# -- the command line: the same flag for the same meaning --------------------------------------


@pytest.mark.parametrize("command", [["finetune"], ["clip", "train"]])
def test_cli_override_flag(tmp_path, capsys, command):
    path = _write(tmp_path, "r.yaml", _dump(OFA if command == ["finetune"] else CLIP))
    rc = main([*command, str(path), "--override", "training.learning_rate=fast"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("ofaconv: error:") and "training.learning_rate" in err[-1]
    assert str(path) in err[-1]
