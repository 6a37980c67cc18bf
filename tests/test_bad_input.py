"""Every OFA and core command on bad input (``convert``, ``inspect``, ``verify``, ``synth``, ``caption``,
``upgrade``, ``finetune``, ``push`` and the top-level parser): the right non-zero exit, no traceback,
exactly one ``ofaconv: error:`` line naming the input (file, file:line, file and key, or the
option), no other tools' wording, and nothing left where output would go (no folder, no hidden temp
sibling, no lock file; an existing file or folder unchanged). The CLIP subcommands have their own
table in test_bad_input_clip.py.

The harness (tests/badinput.py) runs most cases through ``ofaconv.cli.main`` in this process; those
where a crash, an abort or a closed pipe is the risk run ``python -m ofaconv`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from badfiles import write_bad_checkpoint
from badinput import Case, b64_png, check, cli_env, png, write_json
from ofaconv.cli import main
from ofaconv.ofa.synth import write_synthetic_checkpoint

DEEP = 100_000  # nesting that exceeds Python's recursion limit in json and PyYAML
# A folder no process may write into, even as root (sysfs refuses new entries).
UNWRITABLE = "/sys"


_png, _json = png, write_json


def _b64(color) -> str:
    return b64_png(color, urlsafe=True)


class Inputs:
    """Bad (and a few good) inputs for every command, written once under ``root``."""

    def __init__(self, root: Path, folder: Path, clip_folder: Path):
        self.root, self.folder, self.clip = root, folder, clip_folder
        self.out = root / "out"  # never created by a passing case
        self.missing = root / "missing"
        self.user_dir = root / "user_dir"  # a folder ofaconv did not write
        self.user_dir.mkdir()
        (self.user_dir / "notes.txt").write_text("mine")
        self.user_file = root / "notes.jsonl"
        self.user_file.write_text("my own notes, not captions\n")
        self.fifo = root / "fifo"  # not a regular file (like a device): never replaced
        os.mkfifo(self.fifo)
        # -- catalog runs (caption): list files, an unfinished run of other inputs beside an output
        self.list_latin1 = root / "latin1_list.txt"
        self.list_latin1.write_bytes("caf\xe9.png\n".encode("latin-1"))
        self.other_run = root / ".other.jsonl.ofaconv-run"
        self.other_run.mkdir()
        (self.other_run / "run.json").write_text(json.dumps({"schema": "ofaconv/catalog-run@1", "command": "caption",
                                                             "inputs": {"count": 0, "sha256": "0"}}))
        # -- checkpoints
        self.ckpt = write_synthetic_checkpoint(root / "good.pt", "ofa-tiny", vocab_size=1000, optimizer_state=False)
        self.bad = {kind: write_bad_checkpoint(root / f"{kind}.pt", kind, base=self.ckpt)
                    for kind in ("empty", "random_bytes", "truncated", "zip_not_torch", "malicious_pickle", "not_ofa",
                                 "nan_weight", "missing_key", "misshaped_key", "expanded_weight", "no_model")}
        self.marker = self.bad["malicious_pickle"].marker
        self.popen = root / "popen.pt"
        torch.save({"model": _Popen(), "args": None}, self.popen)
        self.size = {value: write_synthetic_checkpoint(root / f"size{value}.pt", "ofa-tiny", vocab_size=1000,
                                                       optimizer_state=False, flags={"patch_image_size": value})
                     for value in (0, 250, 100_000_000)}
        self.keymap_deep = root / "deep.yaml"
        self.keymap_deep.write_text("[" * DEEP + "]" * DEEP)
        self.keymap_bad = root / "bad.yaml"
        self.keymap_bad.write_text("entries: [unclosed\n")
        # -- model folders
        self.empty_dir = root / "empty_dir"
        self.empty_dir.mkdir()
        self.bert = _json(root / "bert" / "config.json", {"model_type": "bert"}).parent
        self.deep_config = root / "deep_config"
        self.deep_config.mkdir()
        (self.deep_config / "config.json").write_text("[" * DEEP + "]" * DEEP)
        self.bad_config = root / "bad_config"
        self.bad_config.mkdir()
        (self.bad_config / "config.json").write_text("{oops")
        self.size0_folder = root / "size0_folder"
        self.size0_folder.mkdir()
        shutil.copy(folder / "config.json", self.size0_folder)
        processor = json.loads((folder / "preprocessor_config.json").read_text())
        _json(self.size0_folder / "preprocessor_config.json", {**processor, "size": {"height": 0, "width": 0}})
        self.latin1_report = root / "latin1_report"
        self.latin1_report.mkdir()
        shutil.copy(folder / "config.json", self.latin1_report)
        (self.latin1_report / "conversion_report.json").write_bytes('{"note": "caf\xe9"}'.encode("latin-1"))
        self.deep_report = root / "deep_report"
        self.deep_report.mkdir()
        (self.deep_report / "conversion_report.json").write_text("[" * DEEP + "]" * DEEP)
        self.edited = root / "edited"
        shutil.copytree(folder, self.edited)
        weights = self.edited / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
        # -- old-port folders
        self.port_size0 = _json(root / "port_size0" / "config.json", {"model_type": "ofa", "patch_image_size": 0}).parent
        self.port_no_weights = _json(root / "port_empty" / "config.json", {"model_type": "ofa"}).parent
        self.port_bad_type = _json(root / "port_bad_type" / "config.json",
                                   {"model_type": "ofa", "max_position_embeddings": "many"}).parent
        self.port_flag_string = _json(root / "port_flag_string" / "config.json",
                                      {"model_type": "ofa", "interpolate_position": "yes"}).parent
        self.port_vit = _json(root / "port_vit" / "config.json", {"model_type": "ofa", "use_ofasys": True}).parent
        # ModelScope folders (config.json + configuration.json, no weights: the settings fail first)
        self.ms = {}
        for name, configuration in {
            "task": {"task": "image-classification"},
            "no_task": {"model": {"type": "ofa"}},
            "beam_key": {"task": "image-captioning", "model": {"beam_search": {"beam": 5}}},
            "beam_type": {"task": "image-captioning", "model": {"beam_search": {"beam_size": "5"}}},
            "beam_switch": {"task": "image-captioning", "model": {"beam_search": {"match_source_len": True}}},
            "beam_lengths": {"task": "image-captioning", "model": {"beam_search": {"min_len": 9, "max_len_b": 4}}},
            "language": {"task": "ocr-recognition", "model": {"language": "fr"}},
            "size": {"task": "image-captioning", "model": {"patch_image_size": 500}},
            "prompt": {"task": "image-captioning", "model": {"prompt": ["a"]}},
            "answers": {"task": "visual-question-answering", "model": {"answer2label": "ans2label.json"}},
            "speech": {"task": "ocr-recognition", "model": {"multimodal_type": "mmspeech"}},
        }.items():
            folder = _json(root / f"ms_{name}" / "config.json", {"model_type": "ofa"}).parent
            _json(folder / "configuration.json", configuration)
            self.ms[name] = folder
        # -- images
        self.good = _png(root / "good.png")
        self.broken = root / "broken.png"
        self.broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
        # -- MUGE data and recipes
        data = root / "muge"
        data.mkdir()
        self.captions = data / "IC_train.jsonl"
        self.captions.write_text("".join(json.dumps({"image_id": f"i{k}", "text": ["红色的圆形"]}, ensure_ascii=False)
                                         + "\n" for k in range(2)), encoding="utf-8")
        self.tsv = data / "IC_train.tsv"
        self.tsv.write_text("".join(f"i{k}\t{_b64('red')}\n" for k in range(2)))
        self.huge = data / "huge.jsonl"
        with open(self.huge, "w", encoding="utf-8") as fh:
            fh.write(json.dumps({"image_id": "i0", "text": ["红色的圆形"]}, ensure_ascii=False) + "\n")
            fh.write('{"image_id": "i1", "text": ["' + "红" * 35_000_000 + '"]}\n')  # a 100 MB line
        self.not_objects = data / "lists.jsonl"
        self.not_objects.write_text('["i0", "红色的圆形"]\n')
        self.latin1 = data / "latin1.jsonl"
        self.latin1.write_bytes('{"image_id": "i0", "text": ["caf\xe9"]}\n'.encode("latin-1"))
        self.two_texts = data / "two_texts.txt"
        self.two_texts.write_text("what is it?\nwhere is it?\n")
        self.tsv_no_tab = data / "notab.tsv"
        self.tsv_no_tab.write_text("just text, no tab\n")
        self.recipe_missing = root / "missing.yaml"
        self.recipe_bad_yaml = root / "bad_yaml.yaml"
        self.recipe_bad_yaml.write_text("model: [unclosed\n")
        self.recipe_deep = root / "deep_recipe.yaml"
        self.recipe_deep.write_text("model: " + "[" * DEEP + "]" * DEEP + "\n")
        self.recipe = self._recipe("good")
        self.recipe_unknown = self._recipe("unknown", extra={"freeze_encodr": True})
        self.recipe_lr = self._recipe("lr", training={"learning_rate": "fast"})
        self.recipe_no_eval_files = self._recipe("no_eval", eval={"captions": "muge/IC_valid.jsonl",
                                                                  "images": "muge/IC_valid.tsv"})
        self.recipe_huge = self._recipe("huge", captions="muge/huge.jsonl")
        self.recipe_lists = self._recipe("lists", captions="muge/lists.jsonl")
        self.recipe_latin1 = self._recipe("latin1", captions="muge/latin1.jsonl")
        self.recipe_no_tab = self._recipe("no_tab", images="muge/notab.tsv")
        self.recipe_clip_model = self._recipe("clip_model", model=str(clip_folder))
        self.recipe_no_model = self._recipe("no_model", model="no-such-model")
        self.recipe_into_model = self._recipe("into_model", output=str(self.folder))
        self.recipe_into_user_dir = self._recipe("into_user_dir", output=str(self.user_dir))

    def _recipe(self, name: str, *, model=None, output="out", captions="muge/IC_train.jsonl",
                images="muge/IC_train.tsv", eval=None, training=None, extra=None) -> Path:
        recipe = {"model": model or str(self.folder), "output_dir": output,
                  "data": {"format": "muge", "train": {"captions": captions, "images": images}, "eval": eval},
                  "training": {"num_train_epochs": 1, "per_device_train_batch_size": 2, **(training or {})},
                  **(extra or {})}
        return _json(self.root / f"{name}.yaml", recipe)


class _Popen:
    """Pickles as a call of subprocess.Popen (protocol 2 writes it as commands.Popen)."""

    def __reduce__(self):
        return (subprocess.Popen, (["true"],))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, ofa_verified_folder, bertclip_verified_folder):
    return Inputs(tmp_path_factory.mktemp("bad_ofa"), ofa_verified_folder, bertclip_verified_folder)


def _ft(recipe: str, *extra):
    return lambda i: ["finetune", str(getattr(i, recipe)), *extra]


def _predict(*extra, folder="folder"):
    return lambda i: ["predict", str(getattr(i, folder)), str(i.good), "--out", str(i.out), "--no-progress",
                      *[str(e(i)) if callable(e) else e for e in extra]]


def _caption(*extra, folder="folder"):
    return lambda i: ["caption", str(getattr(i, folder)), str(i.good), *[str(e(i)) if callable(e) else e
                                                                         for e in extra]]


CASES = [
    # -- the top-level parser
    Case("top-unknown-command", lambda i: ["frobnicate"], lambda i: "'frobnicate'"),
    Case("top-unknown-option", lambda i: ["--frobnicate"], lambda i: "--frobnicate"),
    Case("top-missing-arguments", lambda i: ["convert"], lambda i: "checkpoint, out"),
    Case("top-bad-choice", lambda i: ["convert", str(i.ckpt), str(i.out), "--dtype", "fp8"], lambda i: "'fp8'",
         lambda i: i.out),
    Case("top-not-an-integer", lambda i: ["synth", "ofa-tiny", str(i.out), "--seed", "x"], lambda i: "'x'",
         lambda i: i.out),
    # -- convert
    Case("convert-missing-checkpoint", lambda i: ["convert", str(i.missing / "x.pt"), str(i.out)],
         lambda i: str(i.missing / "x.pt"), lambda i: i.out),
    *[Case(f"convert-{kind.replace('_', '-')}", (lambda k: lambda i: ["convert", str(i.bad[k].path), str(i.out)])(kind),
           (lambda k: lambda i: (str(i.bad[k].path), f"{i.bad[k].key}'" if i.bad[k].key else ""))(kind),
           lambda i: i.out, subprocess=kind == "malicious_pickle")
      for kind in ("empty", "random_bytes", "truncated", "zip_not_torch", "malicious_pickle", "not_ofa", "nan_weight",
                   "missing_key", "misshaped_key", "expanded_weight", "no_model")],
    Case("convert-popen-pickle", lambda i: ["convert", str(i.popen), str(i.out)],
         lambda i: f"{i.popen}: refusing to unpickle: the file needs globals outside the allow-list: subprocess.Popen",
         lambda i: i.out),
    Case("convert-a-directory", lambda i: ["convert", str(i.empty_dir), str(i.out)], lambda i: str(i.empty_dir),
         lambda i: i.out),
    Case("convert-patch-image-size-0", lambda i: ["convert", str(i.size[0]), str(i.out)],
         lambda i: f"{i.size[0]}: key 'patch_image_size'", lambda i: i.out),
    Case("convert-patch-image-size-1e8", lambda i: ["convert", str(i.size[100_000_000]), str(i.out)],
         lambda i: f"{i.size[100_000_000]}: key 'patch_image_size'", lambda i: i.out),
    Case("convert-into-a-user-folder", lambda i: ["convert", str(i.ckpt), str(i.user_dir), "--force"],
         lambda i: str(i.user_dir), lambda i: i.user_dir),
    Case("convert-over-its-checkpoint", lambda i: ["convert", str(i.ckpt), str(i.ckpt), "--force"],
         lambda i: str(i.ckpt), lambda i: i.ckpt),
    Case("convert-unwritable-output", lambda i: ["convert", str(i.ckpt), f"{UNWRITABLE}/ofaconv-out"],
         lambda i: f"{UNWRITABLE}/ofaconv-out"),
    Case("convert-keymap-missing", lambda i: ["convert", str(i.ckpt), str(i.out), "--keymap", str(i.missing / "k.yaml")],
         lambda i: str(i.missing / "k.yaml"), lambda i: i.out),
    Case("convert-keymap-not-yaml", lambda i: ["convert", str(i.ckpt), str(i.out), "--keymap", str(i.keymap_bad)],
         lambda i: str(i.keymap_bad), lambda i: i.out),
    Case("convert-keymap-nested-too-deeply", lambda i: ["convert", str(i.ckpt), str(i.out), "--keymap",
                                                        str(i.keymap_deep)],
         lambda i: str(i.keymap_deep), lambda i: i.out),
    Case("convert-bad-shard-size", lambda i: ["convert", str(i.ckpt), str(i.out), "--max-shard-size", "12 parsecs"],
         lambda i: "12 parsecs", lambda i: i.out),
    Case("convert-unknown-synth-variant", lambda i: ["convert", "synth:ofa-nope", str(i.out)], lambda i: "ofa-nope",
         lambda i: i.out),
    # -- inspect
    Case("inspect-missing-checkpoint", lambda i: ["inspect", str(i.missing / "x.pt")], lambda i: str(i.missing / "x.pt")),
    Case("inspect-random-bytes", lambda i: ["inspect", str(i.bad["random_bytes"].path)],
         lambda i: str(i.bad["random_bytes"].path)),
    Case("inspect-malicious-pickle", lambda i: ["inspect", str(i.bad["malicious_pickle"].path), "--json"],
         lambda i: str(i.bad["malicious_pickle"].path), subprocess=True),
    Case("inspect-patch-image-size-250", lambda i: ["inspect", str(i.size[250])],
         lambda i: f"{i.size[250]}: key 'patch_image_size'"),
    Case("inspect-not-ofa", lambda i: ["inspect", str(i.bad["not_ofa"].path)], lambda i: str(i.bad["not_ofa"].path)),
    # -- verify
    Case("verify-missing-folder", lambda i: ["verify", str(i.missing)], lambda i: str(i.missing)),
    # a folder ofaconv did not write (or that was edited since) fails verification: exit 3
    Case("verify-not-a-model-folder", lambda i: ["verify", str(i.empty_dir)],
         lambda i: f"{i.empty_dir}: verification failed (manifest", code=3),
    Case("verify-report-nested-too-deeply", lambda i: ["verify", str(i.deep_report)],
         lambda i: str(i.deep_report / "conversion_report.json"), code=3),
    Case("verify-report-not-utf8", lambda i: ["verify", str(i.latin1_report)],
         lambda i: str(i.latin1_report / "conversion_report.json"), code=3),
    Case("verify-edited-weights", lambda i: ["verify", str(i.edited)], lambda i: (str(i.edited), "model.safetensors"),
         code=3),
    Case("verify-against-missing-checkpoint", lambda i: ["verify", str(i.folder), "--against", str(i.missing / "x.pt")],
         lambda i: str(i.missing / "x.pt")),
    # -- synth
    Case("synth-unknown-variant", lambda i: ["synth", "ofa-nope", str(i.out)], lambda i: "ofa-nope", lambda i: i.out),
    Case("synth-set-without-value", lambda i: ["synth", "ofa-tiny", str(i.out), "--set", "novalue"],
         lambda i: "novalue", lambda i: i.out),
    Case("synth-unknown-flag", lambda i: ["synth", "ofa-tiny", str(i.out), "--set", "no_such_flag=1"],
         lambda i: "no_such_flag", lambda i: i.out),
    Case("synth-over-a-user-file", lambda i: ["synth", "ofa-tiny", str(i.user_file)], lambda i: str(i.user_file),
         lambda i: i.user_file),
    Case("synth-under-a-file", lambda i: ["synth", "ofa-tiny", str(i.good / "x.pt")], lambda i: str(i.good),
         lambda i: i.good),
    # -- caption
    Case("caption-missing-folder", _caption("--out", lambda i: i.out, folder="missing"), lambda i: str(i.missing),
         lambda i: i.out),
    Case("caption-a-clip-folder", _caption("--out", lambda i: i.out, folder="clip"),
         lambda i: f"{i.clip / 'config.json'}: key 'model_type'", lambda i: i.out),
    Case("caption-a-bert-folder", _caption("--out", lambda i: i.out, folder="bert"),
         lambda i: str(i.bert / "config.json"), lambda i: i.out),
    Case("caption-config-nested-too-deeply", _caption("--out", lambda i: i.out, folder="deep_config"),
         lambda i: str(i.deep_config / "config.json"), lambda i: i.out),
    Case("caption-image-size-0", _caption("--out", lambda i: i.out, folder="size0_folder"),
         lambda i: f"{i.size0_folder / 'preprocessor_config.json'}: key 'size'", lambda i: i.out),
    Case("caption-cuda-without-a-gpu", _caption("--out", lambda i: i.out, "--device", "cuda"), lambda i: "--device cuda",
         lambda i: i.out, no_gpu=True),
    Case("caption-not-a-device", _caption("--out", lambda i: i.out, "--device", "banana"), lambda i: "'banana'",
         lambda i: i.out),
    Case("caption-zero-beams", _caption("--out", lambda i: i.out, "--beams", "0"), lambda i: "--beams", lambda i: i.out),
    Case("caption-missing-tsv", _caption("--out", lambda i: i.out, "--tsv", lambda i: i.missing / "t.tsv"),
         lambda i: str(i.missing / "t.tsv"), lambda i: i.out),
    Case("caption-output-folder-missing", _caption("--out", lambda i: i.missing / "c.jsonl"), lambda i: str(i.missing),
         lambda i: i.missing),
    Case("caption-output-is-a-pipe", _caption("--out", lambda i: i.fifo), lambda i: str(i.fifo), lambda i: i.fifo),
    Case("caption-output-is-an-input", _caption("--out", lambda i: i.good), lambda i: str(i.good), lambda i: i.good),
    Case("caption-over-a-user-file", _caption("--out", lambda i: i.user_file), lambda i: str(i.user_file),
         lambda i: i.user_file),
    Case("caption-into-the-model-folder", _caption("--out", lambda i: i.folder / "c.jsonl"),
         lambda i: str(i.folder / "c.jsonl"), lambda i: i.folder),
    Case("caption-unwritable-output", _caption("--out", f"{UNWRITABLE}/ofaconv-captions.jsonl"),
         lambda i: f"{UNWRITABLE}/ofaconv-captions.jsonl", code=1),
    Case("caption-a-broken-image", lambda i: ["caption", str(i.folder), str(i.good), str(i.broken), "--out",
                                              str(i.root / "partial.jsonl"), "--max-len", "2", "--no-progress"],
         lambda i: str(i.broken), partial=True),
    Case("caption-missing-list", _caption("--out", lambda i: i.out, "--list", lambda i: i.missing / "l.txt"),
         lambda i: str(i.missing / "l.txt"), lambda i: i.out),
    Case("caption-list-not-utf8", _caption("--out", lambda i: i.out, "--list", lambda i: i.list_latin1),
         lambda i: f"{i.list_latin1}:1", lambda i: i.out),
    Case("caption-zero-chunk-size", _caption("--out", lambda i: i.out, "--chunk-size", "0"), lambda i: "--chunk-size",
         lambda i: i.out),
    Case("caption-negative-workers", _caption("--out", lambda i: i.out, "--workers", "-1"), lambda i: "--workers",
         lambda i: i.out),
    Case("caption-over-an-unfinished-run-of-other-inputs", _caption("--out", lambda i: i.root / "other.jsonl"),
         lambda i: (str(i.other_run), "--restart"), lambda i: i.other_run),
    # -- predict
    Case("predict-unknown-task", _predict("--task", "detect"), lambda i: "'detect'", lambda i: i.out),
    Case("predict-grounding-without-text", _predict("--task", "grounding"), lambda i: "--text", lambda i: i.out),
    Case("predict-text-for-ocr", _predict("--task", "ocr", "--text", "hello"), lambda i: "--text", lambda i: i.out),
    Case("predict-answers-unreadable", _predict("--task", "vqa", "--text", "what?", "--answers",
                                                lambda i: i.missing / "answers.txt"),
         lambda i: str(i.missing / "answers.txt"), lambda i: i.out),
    Case("predict-answers-not-utf8", _predict("--task", "vqa", "--text", "what?", "--answers", lambda i: i.latin1),
         lambda i: str(i.latin1), lambda i: i.out),
    Case("predict-texts-count-mismatch", _predict("--task", "vqa", "--texts", lambda i: i.two_texts),
         lambda i: str(i.two_texts), lambda i: i.out),
    Case("predict-a-clip-folder", _predict(folder="clip"), lambda i: str(i.clip), lambda i: i.out),
    Case("predict-over-a-user-file", lambda i: ["predict", str(i.folder), str(i.good), "--out", str(i.user_file)],
         lambda i: str(i.user_file), lambda i: i.user_file),
    Case("predict-a-broken-image", lambda i: ["predict", str(i.folder), str(i.good), str(i.broken), "--out",
                                              str(i.root / "partial-predict.jsonl"), "--max-len", "2", "--no-progress"],
         lambda i: str(i.broken), partial=True),
    # -- upgrade
    Case("upgrade-missing-folder", lambda i: ["upgrade", str(i.missing), str(i.out)], lambda i: str(i.missing),
         lambda i: i.out),
    Case("upgrade-not-an-ofa-port", lambda i: ["upgrade", str(i.bert), str(i.out)],
         lambda i: f"{i.bert / 'config.json'}: key 'model_type'", lambda i: i.out),
    Case("upgrade-config-not-json", lambda i: ["upgrade", str(i.bad_config), str(i.out)],
         lambda i: str(i.bad_config / "config.json"), lambda i: i.out),
    Case("upgrade-config-nested-too-deeply", lambda i: ["upgrade", str(i.deep_config), str(i.out)],
         lambda i: str(i.deep_config / "config.json"), lambda i: i.out),
    Case("upgrade-config-wrong-type", lambda i: ["upgrade", str(i.port_bad_type), str(i.out)],
         lambda i: str(i.port_bad_type / "config.json"), lambda i: i.out),
    Case("upgrade-patch-image-size-0", lambda i: ["upgrade", str(i.port_size0), str(i.out)],
         lambda i: f"{i.port_size0 / 'config.json'}: key 'patch_image_size'", lambda i: i.out),
    Case("upgrade-image-size-0", lambda i: ["upgrade", str(i.port_no_weights), str(i.out), "--image-size", "0"],
         lambda i: "--image-size", lambda i: i.out),
    Case("upgrade-image-size-1e8", lambda i: ["upgrade", str(i.port_no_weights), str(i.out), "--image-size",
                                              "100000000"], lambda i: "--image-size", lambda i: i.out),
    Case("upgrade-no-weights", lambda i: ["upgrade", str(i.port_no_weights), str(i.out)],
         lambda i: str(i.port_no_weights), lambda i: i.out),
    Case("upgrade-port-flag-not-a-bool", lambda i: ["upgrade", str(i.port_flag_string), str(i.out)],
         lambda i: f"{i.port_flag_string / 'config.json'}: key 'interpolate_position'", lambda i: i.out),
    Case("upgrade-port-feature-not-implemented", lambda i: ["upgrade", str(i.port_vit), str(i.out)],
         lambda i: f"{i.port_vit / 'config.json'}: key 'use_ofasys'", lambda i: i.out),
    *(Case(f"upgrade-modelscope-{name}", (lambda n: lambda i: ["upgrade", str(i.ms[n]), str(i.out)])(name),
           (lambda n, k: lambda i: f"{i.ms[n] / 'configuration.json'}: key '{k}'")(name, key), lambda i: i.out)
      for name, key in [("task", "task"), ("no_task", "task"), ("beam_key", "model.beam_search.beam"),
                        ("beam_type", "model.beam_search.beam_size"),
                        ("beam_switch", "model.beam_search.match_source_len"),
                        ("beam_lengths", "model.beam_search"), ("language", "model.language"),
                        ("size", "model.patch_image_size"), ("prompt", "model.prompt"),
                        ("answers", "model.answer2label"), ("speech", "model.multimodal_type")]),
    Case("upgrade-into-its-source", lambda i: ["upgrade", str(i.port_no_weights), str(i.port_no_weights), "--force"],
         lambda i: str(i.port_no_weights), lambda i: i.port_no_weights),
    # -- finetune (output_dir "out" is relative to the recipe: i.out)
    Case("finetune-missing-recipe", lambda i: ["finetune", str(i.recipe_missing)], lambda i: str(i.recipe_missing)),
    Case("finetune-recipe-not-yaml", _ft("recipe_bad_yaml"), lambda i: str(i.recipe_bad_yaml)),
    Case("finetune-recipe-nested-too-deeply", _ft("recipe_deep"), lambda i: str(i.recipe_deep)),
    Case("finetune-unknown-key", _ft("recipe_unknown"), lambda i: f"{i.recipe_unknown}: key 'freeze_encodr'",
         lambda i: i.out),
    Case("finetune-wrong-type", _ft("recipe_lr"), lambda i: f"{i.recipe_lr}: key 'training.learning_rate'",
         lambda i: i.out),
    Case("finetune-override-without-value", _ft("recipe", "--override", "training.seed"), lambda i: "training.seed",
         lambda i: i.out),
    Case("finetune-bad-trainer-setting", _ft("recipe", "--override", "training.lr_scheduler_type=sometimes"),
         lambda i: f"{i.recipe}: key 'training'", lambda i: i.out),
    Case("finetune-eval-files-missing", _ft("recipe_no_eval_files"),
         lambda i: f"{i.root / 'muge' / 'IC_valid.jsonl'}: key 'data.eval.captions'", lambda i: i.out),
    Case("finetune-train-captions-missing", _ft("recipe", "-o", "data.train.captions=nowhere.jsonl"),
         lambda i: "nowhere.jsonl: key 'data.train.captions'", lambda i: i.out),
    Case("finetune-a-100mb-caption-line", _ft("recipe_huge"), lambda i: f"{i.huge}:2", lambda i: i.out,
         subprocess=True),
    Case("finetune-captions-not-objects", _ft("recipe_lists"), lambda i: str(i.not_objects), lambda i: i.out),
    Case("finetune-captions-not-utf8", _ft("recipe_latin1"), lambda i: f"{i.latin1}: line 1 is not UTF-8",
         lambda i: i.out),
    Case("finetune-images-not-a-tsv", _ft("recipe_no_tab"), lambda i: str(i.tsv_no_tab), lambda i: i.out),
    Case("finetune-model-is-a-clip-folder", _ft("recipe_clip_model"), lambda i: f"{i.clip / 'config.json'}",
         lambda i: i.out),
    Case("finetune-model-missing", _ft("recipe_no_model"), lambda i: str(i.root / "no-such-model"), lambda i: i.out),
    Case("finetune-into-the-model-folder", _ft("recipe_into_model"), lambda i: str(i.folder), lambda i: i.folder),
    Case("finetune-into-a-user-folder", _ft("recipe_into_user_dir"), lambda i: str(i.user_dir), lambda i: i.user_dir),
    # -- push (no network: each case fails before any upload)
    Case("push-missing-folder", lambda i: ["push", str(i.missing), "someone/model", "--dry-run"],
         lambda i: str(i.missing)),
    Case("push-bad-repo-id", lambda i: ["push", str(i.folder), "not a repo id!", "--dry-run"],
         lambda i: "not a repo id!"),
    Case("push-not-a-model-folder", lambda i: ["push", str(i.empty_dir), "someone/model", "--dry-run"],
         lambda i: str(i.empty_dir)),
    Case("push-edited-weights", lambda i: ["push", str(i.edited), "someone/model", "--dry-run", "--allow-unverified"],
         lambda i: "model.safetensors"),
    Case("push-report-not-utf8", lambda i: ["push", str(i.latin1_report), "someone/model", "--dry-run"],
         lambda i: str(i.latin1_report / "conversion_report.json")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, inputs, capfd, monkeypatch):
    monkeypatch.chdir(inputs.root)
    check(case, inputs, capfd, monkeypatch)


def test_the_table_covers_every_ofa_and_core_command():
    from ofaconv.cli import CORE_COMMANDS
    from ofaconv.core import registry

    commands = set(registry.family("ofa").commands) | (set(CORE_COMMANDS) - {"export"})
    covered = {c.id.split("-")[0] for c in CASES}
    assert commands | {"top"} <= covered, commands - covered
    assert len(CASES) >= 40


# -- options before, between and after positionals --------------------------------------------

PARSES = [
    ("synth ofa-cn-base --full OUT.pt", {"variant": "ofa-cn-base", "output": "OUT.pt", "full": True}),
    ("synth --seed 3 ofa-tiny OUT.pt --no-optimizer", {"variant": "ofa-tiny", "output": "OUT.pt", "seed": 3,
                                                       "no_optimizer": True}),
    ("synth --list", {"list": True, "variant": None}),
    ("convert CKPT --verify OUT --dtype fp16", {"checkpoint": "CKPT", "out": "OUT", "verify": True, "dtype": "fp16"}),
    ("inspect CKPT --json", {"checkpoint": "CKPT", "json": True}),
    ("verify FOLDER --json --against CKPT", {"folder": "FOLDER", "json": True, "against": "CKPT"}),
    ("caption FOLDER --out c.jsonl a.jpg b.jpg", {"folder": "FOLDER", "out": "c.jsonl", "images": ["a.jpg", "b.jpg"]}),
    ("predict FOLDER a.jpg --task vqa --text q --out o.jsonl b.jpg",
     {"folder": "FOLDER", "images": ["a.jpg", "b.jpg"], "task": "vqa", "text": "q", "out": "o.jsonl"}),
    ("caption FOLDER a.jpg --beams 2 b.jpg --out -", {"images": ["a.jpg", "b.jpg"], "beams": 2, "out": "-"}),
    ("upgrade OLD --image-size 480 OUT", {"old_folder": "OLD", "out": "OUT", "image_size": 480}),
    ("finetune R.yaml --smoke -o a=1", {"recipe": "R.yaml", "smoke": True, "override": ["a=1"]}),
    ("finetune -o a=1 R.yaml --resume", {"recipe": "R.yaml", "resume": True, "override": ["a=1"]}),
    ("push FOLDER --private someone/model --dry-run", {"folder": Path("FOLDER"), "repo_id": "someone/model",
                                                       "private": True, "dry_run": True}),
    ("export onnx FOLDER --force OUT", {"folder": Path("FOLDER"), "out": Path("OUT"), "force": True}),
]


@pytest.mark.parametrize("argv, expected", PARSES, ids=[p[0] for p in PARSES])
def test_options_may_come_before_between_or_after_positionals(argv, expected):
    from ofaconv.cli import build_parser

    args = build_parser().parse_args(argv.split())
    assert {k: getattr(args, k) for k in expected} == expected


def test_the_parse_table_covers_every_ofa_and_core_command():
    from ofaconv.cli import CORE_COMMANDS
    from ofaconv.core import registry

    assert set(registry.family("ofa").commands) | set(CORE_COMMANDS) == {p[0].split()[0] for p in PARSES}


def test_synth_with_options_after_the_positionals_writes_the_file(tmp_path, capsys):
    out = tmp_path / "tiny.pt"
    assert main(["synth", "ofa-tiny", str(out), "--no-optimizer", "--vocab-size", "1000"]) == 0
    assert out.is_file() and not [p for p in tmp_path.iterdir() if p != out]


# -- crashes outside Python's control: a closed pipe, a full disk ------------------------------


def _caption_argv(inputs, n: int) -> list[str]:
    return [sys.executable, "-m", "ofaconv", "caption", str(inputs.folder), *[str(inputs.good)] * n, "--out", "-",
            "--no-progress", "--batch-size", "1", "--max-len", "2"]


def test_caption_into_a_pipe_closed_early_exits_quietly(inputs):
    """``ofaconv caption ... | head -1``: the reader goes away after the first record."""
    proc = subprocess.Popen(_caption_argv(inputs, 40), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert json.loads(first)["image"] == str(inputs.good)
    assert err.strip() == "", err


def test_caption_onto_a_full_disk_is_one_line(inputs):
    with open("/dev/full", "w") as full:
        proc = subprocess.run(_caption_argv(inputs, 2), stdout=full, stderr=subprocess.PIPE, text=True, env=cli_env(),
                              timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("ofaconv: error: <stdout>: No space left on device"), lines[0]
