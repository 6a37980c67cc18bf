"""Folders published for the old OFA ports: verify them as they are, upgrade them to ours."""

from __future__ import annotations

import json

import pytest
import torch

from ofaconv.ofa.checkpoint import infer_config, load_checkpoint
from ofaconv.cli import main as cli
from ofaconv.ofa.convert import keymap_counts
from ofaconv.core.keymap import KeyMap
from ofaconv.ofa.reference.buckets import make_image_position_idx
from ofaconv.ofa.synth import write_synthetic_checkpoint


@pytest.fixture(scope="module", params=["pytorch_model.bin", "model.safetensors"])
def old_port_folder(request, tmp_path_factory):
    """What OFA-Chinese / OFA-Sys published: pytorch_model.bin (or, re-saved, safetensors) in port
    names with persistent rp-bucket tables and a 1025-long image_position_idx, and the ports' config.json."""
    root = tmp_path_factory.mktemp("oldport")
    src = root / "src.pt"
    write_synthetic_checkpoint(src, "ofa-cn-base", size="micro", seed=5)
    ckpt = load_checkpoint(src)
    shape = infer_config(ckpt.state_dict)
    plan = KeyMap.load("ofa/fairseq").plan(ckpt.state_dict, keymap_counts(shape))
    state = {target: ckpt.state_dict[source].clone() for target, source in plan.entries}
    for name in ("encoder.token_rp_bucket", "encoder.image_rp_bucket", "decoder.token_rp_bucket",
                 "decoder.image_rp_bucket"):
        state[name] = ckpt.state_dict[name].clone()
    state["decoder.image_position_idx"] = make_image_position_idx(42, length=1025)
    state["decoder.embed_tokens.weight"] = state["encoder.embed_tokens.weight"]
    state["decoder.output_projection.weight"] = state["encoder.embed_tokens.weight"]
    folder = root / "ofa-cn-base-old"
    folder.mkdir()
    if request.param == "pytorch_model.bin":
        torch.save(state, folder / request.param)
    else:  # safetensors stores no aliases: each tied copy is its own tensor
        from safetensors.torch import save_file

        save_file({k: v.clone().contiguous() for k, v in state.items()}, str(folder / request.param),
                  metadata={"format": "pt"})
    config = {
        "architectures": ["OFAModel"], "model_type": "ofa", "vocab_size": shape["vocab_size"],
        "d_model": shape["d_model"], "encoder_layers": shape["encoder_layers"],
        "decoder_layers": shape["decoder_layers"], "encoder_ffn_dim": shape["encoder_ffn_dim"],
        "decoder_ffn_dim": shape["decoder_ffn_dim"], "encoder_attention_heads": shape["encoder_attention_heads"],
        "decoder_attention_heads": shape["decoder_attention_heads"], "max_position_embeddings": 1024,
        "resnet_type": "resnet18", "normformer": True, "attn_scale_factor": 2.0, "token_bucket_size": 256,
        "image_bucket_size": 42, "add_type_embedding": True, "share_decoder_input_output_embed": True,
        "entangle_position_embedding": False, "scale_embedding": False, "pad_token_id": 1, "bos_token_id": 0,
        "eos_token_id": 2, "decoder_start_token_id": 0, "transformers_version": "4.20.0",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def test_verify_refuses_old_port_folder_as_is(old_port_folder, capsys):
    # No manifest, so nothing proves its files are the converted ones: verify fails (exit 3) and
    # says what to do; `ofaconv upgrade` is the way in.
    assert cli(["verify", str(old_port_folder)]) == 3
    out = capsys.readouterr().out
    assert "manifest" in out and "FAIL" in out and "written by ofaconv" in out


def test_upgrade_old_port_folder(old_port_folder, tmp_path):
    out = tmp_path / "new"
    assert cli(["upgrade", str(old_port_folder), str(out), "--image-size", "128", "--verify"]) == 0
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["kind"] == "upgrade" and report["passed"] and report["family"] == "cn"
    names = {c["name"] for c in report["checks"]}
    assert {"structure", "tensors", "decoder_logits", "greedy", "beam8"} <= names  # OFA-CN's beam size
    for name in ("model.safetensors", "preprocessor_config.json", "tokenizer.json", "README.md"):
        assert (out / name).exists()
    assert json.loads((out / "preprocessor_config.json").read_text())["size"] == {"height": 128, "width": 128}
    assert cli(["verify", str(out)]) == 0


def test_upgrade_refuses_non_ofa_folder(tmp_path, capsys):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert cli(["upgrade", str(folder), str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert "model_type" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# ModelScope folders: the folder's own settings, and parity with ModelScope itself
# (fixtures/modelscope_upgrade.json, written by fixtures/make_modelscope_upgrade.py in the
# ModelScope virtualenv; tests/modelscope_upgrade.py builds the same folder again)

import hashlib  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import modelscope_upgrade  # noqa: E402

MS_CASE = "caption_cn_interpolated"
MS_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "modelscope_upgrade.json"


def _sha(tensor) -> str:
    return hashlib.sha256(tensor.detach().float().numpy().astype(np.float32).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def modelscope_reference():
    return json.loads(MS_FIXTURE.read_text(encoding="utf-8"))["cases"][MS_CASE]


@pytest.fixture(scope="module")
def modelscope_folder(tmp_path_factory, modelscope_reference):
    root = tmp_path_factory.mktemp("modelscope")
    folder = modelscope_upgrade.write_upgrade_folder(root / MS_CASE, MS_CASE)
    # the same weights ModelScope ran: otherwise the comparisons below compare nothing
    assert modelscope_upgrade.weights_sha256(folder) == modelscope_reference["weights_sha256"]
    return folder, modelscope_upgrade.write_images(root / "images")


@pytest.fixture(scope="module")
def modelscope_upgraded(modelscope_folder, tmp_path_factory):
    folder, _ = modelscope_folder
    out = tmp_path_factory.mktemp("ms-upgraded") / "out"
    assert cli(["upgrade", str(folder), str(out), "--verify"]) == 0
    return out


def _load(out):
    from transformers import AutoProcessor

    from ofaconv.ofa.modeling import OFAForConditionalGeneration

    model = OFAForConditionalGeneration.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    return model.eval(), AutoProcessor.from_pretrained(out)


def test_modelscope_folder_settings_are_carried(modelscope_upgraded):
    out = modelscope_upgraded
    config = json.loads((out / "config.json").read_text())
    # configuration.json's task and prompt; config.json's interpolation with ModelScope's default grid
    assert config["task"] == "caption" and config["task_prompt"] == "图片描述了什么?"
    assert config["task_settings"]["modelscope_task"] == "image-captioning"
    assert config["interpolate_position"] is True and config["orig_patch_image_size"] == 224
    assert config["patch_image_size"] == 256
    generation = json.loads((out / "generation_config.json").read_text())
    assert {k: generation[k] for k in ("num_beams", "max_len_b", "min_len", "no_repeat_ngram_size", "lenpen")} == \
        {"num_beams": 3, "max_len_b": 7, "min_len": 2, "no_repeat_ngram_size": 2, "lenpen": 0.9}
    processor = json.loads((out / "processor_config.json").read_text())
    assert processor["prompt"] == "图片描述了什么?"
    assert processor["image_processor"]["image_mean"] == [0.485, 0.456, 0.406]
    assert processor["image_processor"]["image_std"] == [0.229, 0.224, 0.225]
    assert processor["image_processor"]["size"] == {"height": 256, "width": 256}
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["passed"] and report["flags"]["interpolate_position"] is True


def test_modelscope_inputs_encoder_and_logits_equal_modelscope(modelscope_folder, modelscope_upgraded,
                                                                modelscope_reference):
    """Preprocessed image and prompt tokens of the upgraded folder are ModelScope's bit for bit, its
    encoder output and teacher-forced logits are ModelScope's (256 px on a 224 px pretraining grid:
    interpolated positions). The recording was made on another machine, whose BLAS kernels may
    round the last bits differently (on an AVX-512/AMX Xeon the logits move by ~5e-7): the numbers
    get the cross-machine gate, 1e-5, the arithmetic-free parts and the argmax stay exact."""
    from PIL import Image

    _, images = modelscope_folder
    model, processor = _load(modelscope_upgraded)
    for record in modelscope_reference["records"]:
        pixels = processor.image_processor(Image.open(images[record["image"]]), return_tensors="pt")["patch_images"]
        assert _sha(pixels[0]) == record["patch_image"]["sha256"]
        ids = processor.tokenizer([processor.prompt], return_tensors="pt")["input_ids"]
        assert ids[0].tolist() == record["input_ids"]
        tokens = torch.tensor(record["tokens"])
        decoder_input_ids = torch.cat([torch.tensor([0]), tokens[:-1]])[None]
        masks = torch.tensor([True])
        with torch.no_grad():
            encoded = model.get_encoder()(input_ids=ids, patch_images=pixels, patch_masks=masks)
            logits = model(input_ids=ids, patch_images=pixels, patch_masks=masks,
                           decoder_input_ids=decoder_input_ids).logits[0]
        shown = torch.tensor(record["logits"]["first"])
        assert (logits[:, :shown.shape[1]] - shown).abs().max().item() <= 1e-5
        assert logits.argmax(-1).tolist() == record["logits"]["argmax"]
        assert list(encoded.last_hidden_state[0].shape) == record["encoder"]["shape"]
        hidden = encoded.last_hidden_state[0].double()
        assert abs(hidden.sum().item() - record["encoder"]["sum"]) <= 1e-5 * hidden.numel()
        assert abs(logits.double().sum().item() - record["logits"]["sum"]) <= 1e-5 * logits.numel()
        assert max(abs(a - b) for a, b in zip(logits.logsumexp(-1).tolist(), record["logits"]["logsumexp"])) <= 1e-5


def test_modelscope_caption_without_flags_equals_modelscope(modelscope_folder, modelscope_upgraded,
                                                            modelscope_reference, tmp_path):
    """`ofaconv caption` with no flags: ModelScope's tokens (its beam 3, max_len_b 7, min_len 2,
    no_repeat_ngram_size 2, len_penalty 0.9 from configuration.json, not the family's beam 8 / 128)."""
    from PIL import Image

    from ofaconv.ofa.tokenization import decode_caption

    _, images = modelscope_folder
    captions = tmp_path / "captions.jsonl"
    names = [images[r["image"]] for r in modelscope_reference["records"]]
    assert cli(["caption", str(modelscope_upgraded), *map(str, names), "--out", str(captions), "--no-progress"]) == 0
    got = [json.loads(line) for line in captions.read_text(encoding="utf-8").splitlines()]
    model, processor = _load(modelscope_upgraded)
    for record, line in zip(modelscope_reference["records"], got):
        assert line["caption"] == decode_caption(processor.tokenizer, [0, *record["tokens"]], "cn")
        assert line["score"] == pytest.approx(record["score"], abs=1e-5)
        inputs = processor(images=Image.open(images[record["image"]]), return_tensors="pt")
        with torch.no_grad():
            sequences = model.generate(**inputs)
        assert sequences[0].tolist() == [0, *record["tokens"]]


def test_interpolation_lost_in_the_converted_config_fails_verify(modelscope_folder, monkeypatch, tmp_path):
    """Mutation: the converted config.json says interpolate_position false while the source says
    true. The reference reads the source's settings (and probes above its 224 px grid), so --verify
    fails instead of checking the translation against itself."""
    import ofaconv.ofa.convert as convert

    config_arguments = convert.config_arguments

    def lossy(shape, flags):
        return {**config_arguments(shape, flags), "interpolate_position": False}

    monkeypatch.setattr(convert, "config_arguments", lossy)
    folder, _ = modelscope_folder
    out = tmp_path / "lossy"
    assert cli(["upgrade", str(folder), str(out), "--verify"]) == 3
    report = json.loads((out / "conversion_report.json").read_text())
    failed = {c["name"] for c in report["checks"] if not c["passed"]}
    assert {"encoder_states", "decoder_logits"} <= failed


def test_interpolation_lost_on_the_way_in_differs_from_modelscope(modelscope_folder, modelscope_reference,
                                                                  monkeypatch, tmp_path):
    """The old bug: the flag forced off while reading the port, for both the converted folder and
    the reference. --verify cannot see that (both sides agree); ModelScope's own logits do."""
    from PIL import Image

    import ofaconv.ofa.upgrade as upgrade

    port_arguments = upgrade.port_arguments
    monkeypatch.setattr(upgrade, "port_arguments", lambda *a, **k: {**port_arguments(*a, **k),
                                                                    "interpolate_position": False})
    folder, images = modelscope_folder
    out = tmp_path / "forced-off"
    assert cli(["upgrade", str(folder), str(out)]) == 0
    model, processor = _load(out)
    record = modelscope_reference["records"][0]
    pixels = processor.image_processor(Image.open(images[record["image"]]), return_tensors="pt")["patch_images"]
    ids = processor.tokenizer([processor.prompt], return_tensors="pt")["input_ids"]
    decoder_input_ids = torch.cat([torch.tensor([0]), torch.tensor(record["tokens"])[:-1]])[None]
    with torch.no_grad():
        logits = model(input_ids=ids, patch_images=pixels, patch_masks=torch.tensor([True]),
                       decoder_input_ids=decoder_input_ids).logits[0]
    # bit-exact with the flag read (test above); ~1e-4 off here without it
    assert (logits.logsumexp(-1) - torch.tensor(record["logits"]["logsumexp"])).abs().max().item() > 1e-5


# --------------------------------------------------------------------------------------------
# Tokenizer when the variant cannot be told: the folder's own vocabulary, or a clear answer


def _unknown_variant_folder(root: Path, *, vocab_lines=None, extra_rows: int = 0) -> Path:
    """A port folder whose shapes match no released OFA (one decoder layer): the micro ofa-cn-base
    weights without decoder layer 1, optionally with ``extra_rows`` more embedding rows and a
    vocab.txt of ``vocab_lines``."""
    import modelscope_tasks

    state, shape = modelscope_tasks._port_state("ofa-cn-base", 3)
    state = {k: v for k, v in state.items() if not k.startswith("decoder.layers.1.") and
             not k.endswith("_rel_pos_table_list.1.weight") or k.startswith("encoder.")}
    if extra_rows:
        embed = torch.cat([state["encoder.embed_tokens.weight"], torch.randn(extra_rows, shape["d_model"])])
        for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight"):
            state[name] = embed
    root.mkdir(parents=True)
    torch.save(state, root / "pytorch_model.bin")
    config = modelscope_tasks._port_config(shape, 128)
    config.update(decoder_layers=1, vocab_size=shape["vocab_size"] + extra_rows)
    (root / "config.json").write_text(json.dumps(config))
    if vocab_lines is not None:
        (root / "vocab.txt").write_text("".join(f"{line}\n" for line in vocab_lines), encoding="utf-8")
    return root


def _ofa_chinese_vocab() -> list[str]:
    from ofaconv.ofa.tokenization import read_vocabulary

    return ["<s>", "<pad>", "</s>", "<unk>", *read_vocabulary("cn")[0], "<mask>"]


def test_unknown_variant_uses_the_folders_own_vocabulary(tmp_path, capsys):
    folder = _unknown_variant_folder(tmp_path / "old", vocab_lines=_ofa_chinese_vocab())
    out = tmp_path / "new"
    assert cli(["upgrade", str(folder), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "variant unknown: its shapes match no released OFA, family cn" in printed
    assert "tokenizer from the folder's vocab.txt" in printed
    for name in ("tokenizer.json", "preprocessor_config.json", "processor_config.json"):
        assert (out / name).exists()
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["variant"] is None and report["family"] == "cn" and report["processing"]["saved"]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["num_beams"] == 8  # OFA-CN's fairseq settings, from the family


def test_unknown_variant_without_vocabulary_files_gets_the_shipped_one(tmp_path, capsys):
    folder = _unknown_variant_folder(tmp_path / "old")
    assert cli(["upgrade", str(folder), str(tmp_path / "new")]) == 0
    assert "ofaconv's shipped cn vocabulary (the folder carries none)" in capsys.readouterr().out
    assert (tmp_path / "new" / "tokenizer.json").exists()


def test_a_vocabulary_that_does_not_fit_names_the_file_and_the_option(tmp_path, capsys):
    folder = _unknown_variant_folder(tmp_path / "old", vocab_lines=_ofa_chinese_vocab()[:-100])
    out = tmp_path / "new"
    assert cli(["upgrade", str(folder), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{folder / 'vocab.txt'}" in err and "--tokenizer" in err
    assert not out.exists()
    good = tmp_path / "vocab"
    good.mkdir()
    (good / "vocab.txt").write_text("".join(f"{line}\n" for line in _ofa_chinese_vocab()), encoding="utf-8")
    assert cli(["upgrade", str(folder), str(out), "--tokenizer", str(good)]) == 0
    assert f"tokenizer from {good}" in capsys.readouterr().out
    assert (out / "tokenizer.json").exists()


def test_an_embedding_no_vocabulary_fits_says_what_is_missing(tmp_path, capsys):
    folder = _unknown_variant_folder(tmp_path / "old", vocab_lines=_ofa_chinese_vocab(), extra_rows=2)
    out = tmp_path / "new"
    assert cli(["upgrade", str(folder), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no tokenizer or processor written: the embedding has 30327 rows" in printed
    assert "en 59457, cn 30325" in printed and "it carries vocab.txt" in printed
    assert (out / "model.safetensors").exists() and not (out / "tokenizer.json").exists()


@pytest.mark.parametrize("config, expected", [
    ({}, {"disable_entangle": True, "entangle_position_embedding": False, "interpolate_position": False,
          "orig_patch_image_size": 224, "no_scale_embedding": True, "scale_attn": True, "attn_scale_factor": 2.0}),
    # the ports add target positions in the decoder only for entangle_position_embedding ...
    ({"entangle_position_embedding": True}, {"disable_entangle": False, "entangle_position_embedding": False}),
    # ... unless ModelScope's disable_entangle is also on
    ({"entangle_position_embedding": True, "disable_entangle": True}, {"disable_entangle": True}),
    ({"interpolate_position": True, "orig_patch_image_size": 256}, {"interpolate_position": True,
                                                                    "orig_patch_image_size": 256}),
    ({"normformer": False, "scale_embedding": True, "attn_scale_factor": 1},
     {"scale_attn": False, "scale_fc": False, "scale_heads": False, "no_scale_embedding": False,
      "attn_scale_factor": 1.0}),
])
def test_port_config_rules(config, expected):
    from ofaconv.ofa.upgrade import port_arguments

    args = port_arguments({"model_type": "ofa", **config})
    assert {k: args[k] for k in expected} == expected
