"""``ofaconv export onnx``: the graphs of both families reproduce PyTorch within 1e-4 at batch 1 and
3, an OFA caption from onnxruntime alone equals ``model.generate``'s token for token at beam 1 and
5, and bad input is a one-line error that leaves no output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ofaconv.cli import main
from ofaconv.core import export as core_export
from ofaconv.core.report import REPORT_NAME

GATE = 1e-4


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _export(folder: Path, out: Path) -> dict:
    assert main(["export", "onnx", str(folder), str(out), "--threads", "1"]) == 0
    return json.loads((out / REPORT_NAME).read_text())


def _session(path: Path):
    return core_export.inference_session(path, threads=1)


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    """Plain colours and noise of several sizes: the micro model's captions differ between them."""
    rng = np.random.default_rng(seed)
    images = [Image.new("RGB", (40, 30), (250, 10, 10)), Image.new("RGB", (64, 64), (10, 10, 240))]
    while len(images) < n:
        images.append(Image.fromarray(rng.integers(0, 256, (48 + 8 * len(images), 56, 3), dtype=np.uint8)))
    return images[:n]


# -- OFA --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ofa(tmp_path_factory, micro_converted):
    folder, _ = micro_converted("ofa-tiny")
    out = tmp_path_factory.mktemp("onnx-ofa") / "onnx"
    return folder, out, _export(folder, out)


@pytest.fixture(scope="module")
def ofa_model(ofa):
    from transformers import AutoModelForSeq2SeqLM, AutoProcessor

    folder = ofa[0]
    return AutoModelForSeq2SeqLM.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def test_ofa_report_records_the_parity_measured_at_export(ofa):
    _, out, report = ofa
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == {"encoder_batch1", "encoder_batch3", "decoder_batch1", "decoder_batch3",
                           "caption_beam1", "caption_beam5"}
    assert all(c["passed"] for c in checks.values()) and report["passed"]
    assert all(checks[f"{g}_batch{b}"]["value"] <= GATE for g in ("encoder", "decoder") for b in (1, 3))
    assert checks["caption_beam1"]["value"] == checks["caption_beam5"]["value"] == 0
    assert report["format"] == "onnx" and report["model_family"] == "ofa" and report["variant"] == "ofa-tiny"
    assert {"encoder.onnx", "decoder.onnx", "onnx_generation.json", "tokenizer.json", "config.json"} <= set(report["files"])
    assert report["graphs"]["encoder.onnx"]["inputs"] == ["input_ids", "patch_images", "patch_masks"]
    assert report["graphs"]["encoder.onnx"]["outputs"][0] == "last_hidden_state"
    # the manifest is the folder: ofaconv verify's first check passes on it
    from ofaconv.core.verify import manifest_check

    assert manifest_check(out)[0]["passed"]


@pytest.mark.parametrize("rows", [1, 3])
def test_ofa_encoder_graph_matches_pytorch(ofa, ofa_model, rows):
    _, out, _ = ofa
    model, processor = ofa_model
    # questions of other lengths than the prompt the graph was traced with, so one is padded
    texts = [" what is the red car on the road doing in this picture?", " what does the image describe?", " a"]
    inputs = processor(images=_images(rows), text=texts[:rows], return_tensors="pt")
    masks = inputs["patch_masks"].clone()
    if rows > 1:
        masks[1] = False  # a masked image: its patches are padding
    with torch.no_grad():
        expected = model.get_encoder()(input_ids=inputs["input_ids"], patch_images=inputs["patch_images"],
                                       patch_masks=masks)
    got = _session(out / "encoder.onnx").run(None, {"input_ids": inputs["input_ids"].numpy(),
                                                    "patch_images": inputs["patch_images"].numpy(),
                                                    "patch_masks": masks.numpy()})
    assert np.abs(got[0] - expected.last_hidden_state.numpy()).max() <= GATE
    assert (got[1] == expected.padding_mask.numpy()).all()


@pytest.mark.parametrize("beams", [1, 5])
def test_ofa_onnx_caption_equals_pytorch_caption(ofa, ofa_model, beams):
    from ofaconv.ofa.onnx import OnnxCaptioner

    _, out, _ = ofa
    model, processor = ofa_model
    images = _images(4)
    inputs = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**inputs, num_beams=beams).numpy()
    captioner = OnnxCaptioner(out, threads=1)
    got = captioner.caption_ids(images, num_beams=beams)  # pixels and prompt from the export, not the processor
    assert got.shape == expected.shape and (got == expected).all()
    assert len({tuple(row) for row in expected.tolist()}) > 1  # the captions depend on the image


def test_ofa_caption_runs_with_onnxruntime_alone(ofa, ofa_model, tmp_path):
    # A process that never imports torch or transformers captions as model.generate does.
    _, out, _ = ofa
    model, processor = ofa_model
    images = _images(2)
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    with torch.no_grad():
        expected = model.generate(**processor(images=images, return_tensors="pt")).tolist()
    script = (
        "import json, sys\n"
        "from ofaconv.ofa.onnx import OnnxCaptioner\n"
        f"ids = OnnxCaptioner({str(out)!r}, threads=1).caption_ids([{str(tmp_path / '0.png')!r}, "
        f"{str(tmp_path / '1.png')!r}])\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported torch'\n"
        "print(json.dumps(ids.tolist()))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == expected


# -- CLIP -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["bertclip", "chinese-clip"])
def clip(request, tmp_path_factory):
    from ofaconv.clip import synth
    from ofaconv.clip.convert import convert

    root = tmp_path_factory.mktemp(f"onnx-{request.param}")
    if request.param == "bertclip":
        src = synth.write_legacy_bertclip(root / "src")
        convert(src, root / "hf")
    else:
        src = synth.write_cnclip_pt(root / "src", "ViT-B-16")
        convert(src, root / "hf", vocab=str(synth.write_vocab(root / "vocab.txt")))
    return root / "hf", root / "onnx", _export(root / "hf", root / "onnx")


@pytest.mark.parametrize("rows", [1, 3])
def test_clip_graphs_match_the_towers(clip, rows):
    from transformers import AutoTokenizer

    from ofaconv.clip.towers import ClipTowers

    folder, out, report = clip
    assert report["passed"] and {c["name"] for c in report["checks"]} == {
        "vision_batch1", "vision_batch3", "text_batch1", "text_batch3"}
    towers = ClipTowers.from_pretrained(folder)
    images = _images(rows)
    texts = ["一只猫坐在车上", "红色的花" * 40, "狗"][:rows]  # different lengths, one truncated
    # tokens from the tokenizer copied into OUT, pixels from its preprocessor_config.json through the
    # PIL processor the package uses (transformers' default torchvision one resizes differently)
    processor = type(towers.image_processor).from_pretrained(out)
    pixels = processor(images=images, return_tensors="np")["pixel_values"]
    tokens = AutoTokenizer.from_pretrained(out)(texts, padding=True, truncation=True, return_tensors="np")
    image_embeds = _session(out / "vision.onnx").run(None, {"pixel_values": pixels})[0]
    text_embeds = _session(out / "text.onnx").run(None, {"input_ids": tokens["input_ids"],
                                                         "attention_mask": tokens["attention_mask"]})[0]
    assert np.abs(image_embeds - towers.encode_images(images).numpy()).max() <= GATE
    assert np.abs(text_embeds - towers.encode_texts(texts).numpy()).max() <= GATE
    settings = json.loads((out / "onnx_clip.json").read_text())
    assert settings["normalized"] and abs(settings["logit_scale"] - towers.logit_scale) < 1e-6


# -- bad input --------------------------------------------------------------------------------------
def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("ofaconv: error: ") and "\n" not in err and "Traceback" not in err
    return err


def _no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp sibling


def test_folder_of_no_family_is_refused(tmp_path, capsys):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["export", "onnx", str(folder), str(tmp_path / "out")]) == 2
    assert "belongs to no ofaconv family" in _one_line_error(capsys)
    _no_output(tmp_path / "out")
    assert main(["export", "onnx", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "not a directory" in _one_line_error(capsys)


def test_corrupt_folder_is_refused_before_anything_is_written(ofa, tmp_path, capsys):
    folder = tmp_path / "hf"
    shutil.copytree(ofa[0], folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["export", "onnx", str(folder), str(tmp_path / "out")]) == 2
    err = _one_line_error(capsys)
    assert str(folder) in err and "model.safetensors" in err and "sha256" in err
    _no_output(tmp_path / "out")
    (folder / "config.json").write_text("{not json")
    assert main(["export", "onnx", str(folder), str(tmp_path / "out")]) == 2
    assert "config.json" in _one_line_error(capsys)
    _no_output(tmp_path / "out")


def test_existing_output_is_kept(ofa, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("not ofaconv's")
    assert main(["export", "onnx", str(ofa[0]), str(out)]) == 2
    assert "--force" in _one_line_error(capsys)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("clip", ["bertclip"], indirect=True)
def test_a_graph_over_its_gate_writes_nothing(clip, tmp_path, monkeypatch, capsys):
    real = core_export.parity_row
    monkeypatch.setattr(core_export, "parity_row", lambda name, value, **kw: real(name, value + 1.0, **kw))
    assert main(["export", "onnx", str(clip[0]), str(tmp_path / "out"), "--threads", "1"]) == 3
    assert "differ from PyTorch" in _one_line_error(capsys)
    _no_output(tmp_path / "out")


def test_exported_folders_verify_and_carry_an_onnx_card(ofa, clip, tmp_path, capsys):
    from ofaconv.cli import main

    for _, out, _ in (ofa, clip):
        assert main(["verify", str(out)]) == 0
        shown = capsys.readouterr().out
        assert "graph" in shown and "export parity" in shown
        card = (out / "README.md").read_text(encoding="utf-8")
        assert "library_name: onnx" in card and "onnx" in card and "from_pretrained(repo, trust_remote_code" not in card
    edited = tmp_path / "edited"
    shutil.copytree(clip[1], edited)
    graph = edited / "text.onnx"
    graph.write_bytes(graph.read_bytes()[:-16])
    assert main(["verify", str(edited)]) == 3
    assert "manifest" in capsys.readouterr().out
