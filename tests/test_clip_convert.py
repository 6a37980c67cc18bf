"""CLIP import paths: Chinese-CLIP .pt (every released architecture) and legacy BertCLIP folders.

Parity is against plain-maths references run on the SOURCE weights; mutation tests prove that a
broken mapping, a missing attention mask or a wrong head count makes the gate fail.
"""

import json
import pickle

import importlib
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoTokenizer

from ofaconv.clip import synth
from ofaconv.clip import keymap
from ofaconv.clip.convert import convert, detect_source
from ofaconv.errors import CheckpointError, KeyMapError, VerificationError
from ofaconv.keymap import KeyMap

convert_mod = importlib.import_module("ofaconv.clip.convert")  # the package re-exports a function named convert

VIT_ARCHS = ["ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14"]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return synth.write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt")


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    return synth.write_legacy_bertclip(tmp_path_factory.mktemp("legacy") / "bertclip")


def _keys(path):
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def test_cnclip_with_the_shipped_bert_chinese_vocab(tmp_path):
    # The real vocab has entries containing U+2028: counted by "\n", it has exactly 21128 lines.
    src = synth.write_cnclip_pt(tmp_path / "src", "ViT-B-16", vocab_size=21128)
    report = convert(src, tmp_path / "out")
    assert report["arch"] == "ViT-B-16"
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert len(tok) == 21128 and tok.convert_ids_to_tokens(101) == "[CLS]"
    assert tok("一只猫")["input_ids"] == [101, 671, 1372, 4344, 102]


@pytest.mark.parametrize("arch", VIT_ARCHS)
def test_cnclip_every_vit_converts_and_verifies(tmp_path, vocab, arch):
    src = synth.write_cnclip_pt(tmp_path / "src", arch)
    report = convert(src, tmp_path / "out", vocab=str(vocab))
    assert report["arch"] == arch and report["arch_from"] == "file name"
    diffs = report["parity"]["max_abs_diff"]
    assert max(v for k, v in diffs.items() if k != "logits") <= 1e-5
    out = tmp_path / "out"
    cfg = json.loads((out / "config.json").read_text())
    spec = keymap.clip_tables()["cnclip_architectures"][arch]
    micro = spec["micro"]["vision"]
    assert cfg["model_type"] == "chinese_clip"
    assert cfg["vision_config"]["num_attention_heads"] == micro["width"] // spec["vision"]["head_width"]
    assert cfg["vision_config"]["image_size"] == micro["image_size"]
    pp = json.loads((out / "preprocessor_config.json").read_text())
    assert pp["do_center_crop"] is False and pp["size"] == {"height": micro["image_size"], "width": micro["image_size"]}
    assert pp["processor_class"] == "ChineseCLIPProcessor" and not (out / "processor_config.json").exists()
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 52
    # text_tower/ works around transformers #32280: BertModel keys without prefix, no pooler
    assert not any(k.startswith(("text_model.", "pooler.")) for k in _keys(out / "text_tower" / "model.safetensors"))
    assert (out / "parity.json").is_file() and not list(tmp_path.glob(".out.*"))


def test_vit_h_needs_its_80_wide_heads(tmp_path, vocab):
    src = synth.write_cnclip_pt(tmp_path / "anonymous.pt", "ViT-H-14", name="run1")
    with pytest.raises(CheckpointError, match="--arch"):
        convert(src, tmp_path / "out", vocab=str(vocab))
    with pytest.raises(CheckpointError, match="head width 64"):  # 160 wide: not ViT-B's 64-wide heads
        convert(src, tmp_path / "out", vocab=str(vocab), arch="ViT-B-16")
    report = convert(src, tmp_path / "out", vocab=str(vocab), arch="vit-h-14")
    assert report["arch"] == "ViT-H-14" and report["arch_from"] == "--arch"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vision_config"]["num_attention_heads"] == 2


def test_full_size_geometry_identifies_the_architecture():
    shapes = {"visual.conv1.weight": torch.empty(1280, 3, 14, 14), "visual.positional_embedding": torch.empty(257, 1),
              **{f"visual.transformer.resblocks.{i}.attn.in_proj_weight": torch.empty(0) for i in range(32)}}
    arch, how = convert_mod.resolve_cnclip_arch(shapes, arch=None, path=Path("x.pt"), meta={})
    assert (arch, how) == ("ViT-H-14", "full-size geometry")


def test_rn50_is_refused_with_a_clear_message(tmp_path, vocab):
    src = synth.write_cnclip_pt(tmp_path, "RN50")
    with pytest.raises(CheckpointError, match="RN50.*no transformers class"):
        convert(src, tmp_path / "out", vocab=str(vocab))
    assert not (tmp_path / "out").exists()


def test_pooler_keys_and_flash_attention_names_are_accepted(tmp_path, vocab):
    state = synth.cnclip_state_dict("ViT-B-16", pooler=True)
    flash = {}
    for k, v in state.items():
        if k.endswith("attn.in_proj_weight"):
            k = k.replace("in_proj_weight", "Wqkv.weight")
        elif k.endswith("attn.in_proj_bias"):
            k = k.replace("in_proj_bias", "Wqkv.bias")
        flash[k] = v
    for i in range(2):
        p = f"bert.encoder.layer.{i}.attention"
        for part in ("weight", "bias"):
            flash[f"{p}.self.Wqkv.{part}"] = torch.cat([flash.pop(f"{p}.self.{n}.{part}") for n in ("query", "key", "value")])
            flash[f"{p}.self.out_proj.{part}"] = flash.pop(f"{p}.output.dense.{part}")
    path = tmp_path / "clip_cn_vit-b-16.pt"
    torch.save({"epoch": 1, "step": 2, "name": "x", "state_dict": {f"module.{k}": v for k, v in flash.items()}}, path)
    report = convert(path, tmp_path / "out", vocab=str(vocab))
    assert report["parity"]["max_abs_diff"]["text_features"] <= 1e-5


@pytest.mark.parametrize("safetensors,position_ids", [(False, True), (True, False)])
def test_legacy_bertclip_to_canonical_vtde(tmp_path, safetensors, position_ids):
    src = synth.write_legacy_bertclip(tmp_path / "src", safetensors=safetensors, position_ids=position_ids)
    assert detect_source(src) == "legacy_bertclip"
    report = convert(src, tmp_path / "out")
    assert max(v for k, v in report["parity"]["max_abs_diff"].items() if k != "logits") <= 1e-5
    out = tmp_path / "out"
    cfg = json.loads((out / "config.json").read_text())
    # clip.md §C.3: the layout that loads on transformers 4.40, 4.57 and 5.x
    assert cfg["model_type"] == "vision-text-dual-encoder"
    assert cfg["architectures"] == ["VisionTextDualEncoderModel"]
    assert cfg["text_config"]["model_type"] == "bert" and cfg["vision_config"]["model_type"] == "clip_vision_model"
    assert cfg["vision_config"]["projection_dim"] == cfg["projection_dim"]
    keys = _keys(out / "model.safetensors")
    vision = [k for k in keys if k.startswith("vision_model.")]
    assert vision and all(k.startswith("vision_model.vision_model.") for k in vision)
    assert "text_model.pooler.dense.weight" in keys and not any(k.endswith("position_ids") for k in keys)
    pp = json.loads((out / "preprocessor_config.json").read_text())
    assert pp["processor_class"] == "VisionTextDualEncoderProcessor" and pp["do_center_crop"] is True
    assert not (out / "processor_config.json").exists() and (out / "vocab.txt").is_file()
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 100
    vt = json.loads((out / "vision_tower" / "config.json").read_text())
    assert vt["architectures"] == ["CLIPVisionModelWithProjection"]
    assert _keys(out / "vision_tower" / "model.safetensors") >= {"visual_projection.weight"}
    modules = json.loads((out / "text_tower" / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Dense", "Dense", "Normalize"]


def test_towers_load_with_stock_classes_and_no_warnings(tmp_path, legacy, caplog):
    from transformers import AutoModel, AutoProcessor, BertModel, CLIPVisionModelWithProjection

    convert(legacy, tmp_path / "out", verify=False)
    out = tmp_path / "out"
    for cls, folder in ((AutoModel, out), (CLIPVisionModelWithProjection, out / "vision_tower"),
                        (BertModel, out / "text_tower")):
        _, info = cls.from_pretrained(str(folder), output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (folder, info)
    assert type(AutoProcessor.from_pretrained(str(out))).__name__ == "VisionTextDualEncoderProcessor"
    assert not [r for r in caplog.records if "newly initialized" in r.getMessage() or "not used" in r.getMessage()]


def test_reconverting_a_package_is_stable(tmp_path, legacy):
    convert(legacy, tmp_path / "a")
    report = convert(tmp_path / "a", tmp_path / "b")
    assert report["source_format"] == "legacy_bertclip" and report["parity"]["max_abs_diff"]["logits"] < 1e-4


# -- mutation tests: each deliberate break must trip the gate -------------------------------------
def _patched_map(monkeypatch, tmp_path, name, edit):
    data = yaml.safe_load(Path(keymap.load_map(name).path).read_text())
    edit(data)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    patched, real = KeyMap.load(path), keymap.load_map
    monkeypatch.setattr(keymap, "load_map", lambda n: patched if n == name else real(n))


def test_mutation_qkv_order(tmp_path, vocab, monkeypatch):
    def swap(data):
        for rule in data["convert"]:
            if rule["op"] == "chunk":
                rule["to"][0], rule["to"][1] = rule["to"][1], rule["to"][0]
    _patched_map(monkeypatch, tmp_path, "cnclip_to_chinese_clip", swap)
    src = synth.write_cnclip_pt(tmp_path, "ViT-B-16")
    with pytest.raises(VerificationError, match="image_features"):
        convert(src, tmp_path / "out", vocab=str(vocab))
    assert not (tmp_path / "out").exists()


def test_mutation_missing_attention_mask(tmp_path, vocab, monkeypatch):
    from ofaconv.clip.towers import ClipTowers

    real = ClipTowers.encode_token_batch
    monkeypatch.setattr(ClipTowers, "encode_token_batch",
                        lambda self, batch, normalize=True: real(self, {"input_ids": batch["input_ids"],
                                                                        "attention_mask": torch.ones_like(batch["input_ids"])},
                                                               normalize=normalize))
    src = synth.write_cnclip_pt(tmp_path, "ViT-B-16")
    with pytest.raises(VerificationError, match="text_features"):
        convert(src, tmp_path / "out", vocab=str(vocab))


def test_mutation_wrong_head_width(tmp_path, vocab, monkeypatch):
    def narrow(maps_arch):
        pass
    maps = json.loads(json.dumps(keymap.clip_tables()))
    maps["cnclip_architectures"]["ViT-B-16"]["vision"]["head_width"] = 32  # 4 heads instead of 2
    monkeypatch.setattr(convert_mod, "clip_tables", lambda: maps)
    src = synth.write_cnclip_pt(tmp_path, "ViT-B-16")
    real_ref = convert_mod.ref.cnclip_encode_image
    monkeypatch.setattr(convert_mod.ref, "cnclip_encode_image",
                        lambda s, px, heads: real_ref(s, px, heads=2))  # the reference keeps cn_clip's true heads
    with pytest.raises(VerificationError, match="image_features"):
        convert(src, tmp_path / "out", vocab=str(vocab))


def test_mutation_bertclip_pooler_ignored(tmp_path, legacy, monkeypatch):
    from ofaconv.clip import reference

    real = reference.bert_forward
    monkeypatch.setattr(reference, "bert_forward", lambda *a, **k: (lambda h, p: (h, h[:, 0] if p is not None else None))(*real(*a, **k)))
    with pytest.raises(VerificationError, match="text_features"):
        convert(legacy, tmp_path / "out")


# -- bad input -------------------------------------------------------------------------------------
class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_bad_inputs_get_one_line_errors(tmp_path, vocab):
    trunc = tmp_path / "clip_cn_vit-b-16.pt"
    good = synth.write_cnclip_pt(tmp_path / "g", "ViT-B-16")
    trunc.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="clip_cn_vit-b-16.pt"):
        convert(trunc, tmp_path / "o1", vocab=str(vocab))
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"state_dict": {"x": Evil()}}))
    with pytest.raises(CheckpointError, match="refused to unpickle|not a readable"):
        convert(evil, tmp_path / "o2", vocab=str(vocab))
    state = synth.cnclip_state_dict("ViT-B-16")
    state["visual.ln_pre.weight"][0] = float("nan")
    nan = tmp_path / "nan" / "clip_cn_vit-b-16.pt"
    nan.parent.mkdir()
    torch.save({"state_dict": state}, nan)
    with pytest.raises(CheckpointError, match="visual.ln_pre.weight.*NaN"):
        convert(nan, tmp_path / "o3", vocab=str(vocab))
    state = synth.cnclip_state_dict("ViT-B-16")
    state["visual.extra_thing"] = torch.ones(2)
    extra = tmp_path / "extra" / "clip_cn_vit-b-16.pt"
    extra.parent.mkdir()
    torch.save({"state_dict": state}, extra)
    with pytest.raises(KeyMapError, match="visual.extra_thing"):
        convert(extra, tmp_path / "o4", vocab=str(vocab))
    with pytest.raises(CheckpointError, match="vocab has"):
        short = tmp_path / "short.txt"
        short.write_text("[PAD]\n[UNK]\n")
        convert(good, tmp_path / "o5", vocab=str(short))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("o", ".o"))]


def test_plain_clip_and_unknown_layouts_are_rejected(tmp_path):
    clip = synth.write_openai_clip(tmp_path / "clip")
    with pytest.raises(CheckpointError, match="clip init"):
        detect_source(clip)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(CheckpointError, match="model_type"):
        detect_source(tmp_path / "x")


def test_cli_convert_prints_parity_and_fails_cleanly(tmp_path, legacy, capsys):
    from ofaconv.cli import main

    assert main(["clip", "convert", str(legacy), str(tmp_path / "out")]) == 0
    assert "text_tower_sentence_transformers" in capsys.readouterr().out
    assert main(["clip", "convert", str(legacy), str(tmp_path / "out")]) == 2  # exists, no --overwrite
    err = capsys.readouterr().err
    assert err.startswith("ofaconv: error:") and len(err.strip().splitlines()) == 1
