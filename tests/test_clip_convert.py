"""CLIP import paths: Chinese-CLIP .pt (every released architecture) and legacy BertCLIP folders.

Parity is against plain-maths references run on the SOURCE weights; mutation tests prove that a
broken mapping, a missing attention mask or a wrong head count makes the gate fail.
"""

import contextlib
import hashlib
import json
import logging
import pickle

import importlib
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer

from ofaconv.clip import synth
from ofaconv.clip import architectures as keymap
from ofaconv.clip.convert import convert, detect_source
from ofaconv.clip.export import export_bert
from ofaconv.core.errors import CheckpointError, KeyMapError, VerificationError
from ofaconv.core.report import validate_report
from ofaconv.core.keymap import KeyMap

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


def _diffs(report) -> dict:
    """The parity checks of a conversion report: name -> max |diff| (each gated at 1e-5)."""
    assert all(c["passed"] and c["gate"] == 1e-5 and c["metric"] == "max_abs_diff" for c in report["checks"])
    return {c["name"]: c["value"] for c in report["checks"]}


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
    diffs = _diffs(report)
    assert max(diffs.values()) <= 1e-5 and "logits_over_exp_logit_scale" in diffs
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
    # text_tower/ works around transformers #32280: BertModel keys without prefix; the checkpoint has no
    # pooler, so the tower's is the identity (unused by the CLIP embedding) and BertModel misses nothing
    tower = load_file(str(out / "text_tower" / "model.safetensors"))
    assert not any(k.startswith("text_model.") for k in tower)
    hidden = spec["micro"]["text"]["hidden_size"]
    assert torch.equal(tower["pooler.dense.weight"], torch.eye(hidden))
    assert not tower["pooler.dense.bias"].any()
    meta = json.loads((out / "text_tower" / "text_tower.json").read_text())
    assert (meta["pooling"], meta["pooler"], meta["pooler_in_clip_embedding"]) == ("cls", "identity", False)
    assert json.loads((out / "conversion_report.json").read_text()) == report and not (out / "parity.json").exists()
    assert report["model_family"] == "clip" and report["kind"] == "conversion" and report["passed"]
    assert report["source"]["file"] == src.name and report["source"]["size"] == src.stat().st_size
    assert validate_report(out) == [] and not list(tmp_path.glob(".out*"))


def test_vit_h_needs_its_80_wide_heads(tmp_path, vocab):
    src = synth.write_cnclip_pt(tmp_path / "anonymous.pt", "ViT-H-14", name="run1")
    with pytest.raises(CheckpointError, match="--arch"):
        convert(src, tmp_path / "out", vocab=str(vocab))
    with pytest.raises(CheckpointError, match="--arch says ViT-B-16 but the weights have ViT-H-14's micro"):
        convert(src, tmp_path / "out", vocab=str(vocab), arch="ViT-B-16")
    report = convert(src, tmp_path / "out", vocab=str(vocab), arch="vit-h-14")
    assert report["arch"] == "ViT-H-14" and report["arch_from"] == "--arch"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vision_config"]["num_attention_heads"] == 2


def test_full_size_geometry_identifies_the_architecture():
    shapes = {"visual.conv1.weight": torch.empty(1280, 3, 14, 14), "visual.positional_embedding": torch.empty(257, 1),
              **{f"visual.transformer.resblocks.{i}.attn.in_proj_weight": torch.empty(0) for i in range(32)}}
    arch, how = convert_mod.resolve_cnclip_arch(shapes, arch=None, path=Path("x.pt"), meta={})
    assert (arch, how) == ("ViT-H-14", "full-size geometry")


def test_micro_geometries_tell_the_architectures_apart():
    table = keymap.clip_tables()["cnclip_architectures"]
    geometries = {convert_mod._vit_geometry(synth.cnclip_state_dict(arch)) for arch in VIT_ARCHS}
    assert len(geometries) == len(VIT_ARCHS)
    full = {(v["width"], v["layers"], v["patch_size"], v["image_size"])
            for v in (table[arch]["vision"] for arch in VIT_ARCHS)}
    assert len(full) == len(VIT_ARCHS) and not full & geometries


@pytest.mark.parametrize("weights,label,how", [
    ("ViT-H-14", "ViT-L-14", "file name"),
    ("ViT-H-14", "ViT-B-16", "checkpoint name"),
    ("ViT-H-14", "ViT-L-14", "--arch"),
    ("ViT-L-14", "ViT-H-14", "--arch"),
    ("ViT-L-14-336", "ViT-L-14", "file name"),
    ("ViT-B-16", "ViT-L-14", "file name"),
    ("ViT-L-14", "ViT-B-16", "--arch"),
])
def test_an_architecture_name_that_contradicts_the_weights_is_refused(tmp_path, vocab, weights, label, how):
    # A ViT-H labelled L/14 would get 64-wide heads (not 80) and pass a reference run with the same
    # wrong head count: the name must agree with the geometry the weights have.
    if how == "file name":
        src = synth.write_cnclip_pt(tmp_path / keymap.clip_tables()["cnclip_architectures"][label]["file_name"],
                                    weights)
        kwargs = {}
    else:
        src = synth.write_cnclip_pt(tmp_path / "run.pt", weights, name=label if how == "checkpoint name" else "run")
        kwargs = {"arch": label} if how == "--arch" else {}
    with pytest.raises(CheckpointError) as info:
        convert(src, tmp_path / "out", vocab=str(vocab), **kwargs)
    message = str(info.value)
    assert message.startswith(str(src)) and len(message.splitlines()) == 1
    assert f"{how} says {label} but the weights have {weights}'s micro geometry" in message
    assert not (tmp_path / "out").exists()


def test_full_size_vit_h_labelled_l14_is_refused():
    shapes = {"visual.conv1.weight": torch.empty(1280, 3, 14, 14), "visual.positional_embedding": torch.empty(257, 1),
              **{f"visual.transformer.resblocks.{i}.attn.in_proj_weight": torch.empty(0) for i in range(32)}}
    for arch, path in (("ViT-L-14", Path("x.pt")), (None, Path("clip_cn_vit-b-16.pt"))):
        with pytest.raises(CheckpointError, match=r"weights have ViT-H-14's full-size geometry \(width 1280"):
            convert_mod.resolve_cnclip_arch(shapes, arch=arch, path=path, meta={})
    assert convert_mod.resolve_cnclip_arch(shapes, arch="vit-h-14", path=Path("clip_cn_vit-l-14.pt"), meta={}) == \
        ("ViT-H-14", "--arch")


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
    assert _diffs(report)["text_features"] <= 1e-5
    # cn_clip never runs the pooler; text_tower/ keeps the checkpoint's for BertModel users, also when
    # the package itself is converted again
    for out in (tmp_path / "out", tmp_path / "again"):
        if out.name == "again":
            convert(tmp_path / "out", out)
        tower = load_file(str(out / "text_tower" / "model.safetensors"))
        assert torch.equal(tower["pooler.dense.weight"], state["bert.pooler.dense.weight"])
        assert torch.equal(tower["pooler.dense.bias"], state["bert.pooler.dense.bias"])
        assert json.loads((out / "text_tower" / "text_tower.json").read_text())["pooler"] == "checkpoint"


@pytest.mark.parametrize("safetensors,position_ids", [(False, True), (True, False)])
def test_legacy_bertclip_to_canonical_vtde(tmp_path, safetensors, position_ids):
    src = synth.write_legacy_bertclip(tmp_path / "src", safetensors=safetensors, position_ids=position_ids)
    assert detect_source(src) == "legacy_bertclip"
    report = convert(src, tmp_path / "out")
    assert max(_diffs(report).values()) <= 1e-5
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


def test_a_text_position_table_shorter_than_100_sets_the_text_length(tmp_path):
    # A BertCLIP trained with 16 text positions: converting used to run the reference at the default
    # 100 tokens and die in its forward (RuntimeError). The package takes the table's length instead.
    from safetensors.torch import save_file

    src = synth.write_legacy_bertclip(tmp_path / "src", safetensors=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = 16
    (src / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(src / "model.safetensors"))
    state["text_model.embeddings.position_embeddings.weight"] = state["text_model.embeddings.position_embeddings.weight"][:16]
    state["text_model.embeddings.position_ids"] = state["text_model.embeddings.position_ids"][:, :16]
    save_file(state, str(src / "model.safetensors"))
    report = convert(src, tmp_path / "out")
    assert max(_diffs(report).values()) <= 1e-5
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["model_max_length"] == 16
    assert json.loads((tmp_path / "out" / "ofaconv_clip.json").read_text())["max_length"] == 16
    # asking for more than the table holds is one line naming the key
    with pytest.raises(CheckpointError, match="key 'text_config.max_position_embeddings'.*16 rows"):
        convert(src, tmp_path / "out2", max_length=40)
    assert not (tmp_path / "out2").exists()


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _logged_warnings():
    """Warnings logged by transformers (its logger does not propagate to pytest's caplog) and by
    sentence-transformers."""
    handler = _Collect()
    loggers = [logging.getLogger(name) for name in ("transformers", "sentence_transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


@pytest.mark.parametrize("source", ["legacy", "cnclip"])
def test_towers_load_with_stock_classes_and_no_warnings(tmp_path, legacy, vocab, source):
    # Every folder loads as a user would load it: no add_pooling_layer=False, and no LOAD REPORT.
    import sentence_transformers as st
    from transformers import AutoModel, AutoProcessor, BertModel, CLIPVisionModelWithProjection

    src = legacy if source == "legacy" else synth.write_cnclip_pt(tmp_path / "src", "ViT-B-16")
    out, bert = tmp_path / "out", tmp_path / "bert"
    convert(src, out, verify=False, vocab=str(vocab))
    export_bert(src, bert, vocab=str(vocab))
    with _logged_warnings() as warned:
        for cls, folder in ((AutoModel, out), (CLIPVisionModelWithProjection, out / "vision_tower"),
                            (BertModel, out / "text_tower"), (AutoModel, out / "text_tower"), (BertModel, bert),
                            (AutoModel, bert)):
            _, info = cls.from_pretrained(str(folder), output_loading_info=True)
            assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (folder, info)
        for folder in (out / "text_tower", bert):
            st.SentenceTransformer(str(folder), device="cpu")
        processor = AutoProcessor.from_pretrained(str(out))
    assert warned == []
    expected = "VisionTextDualEncoderProcessor" if source == "legacy" else "ChineseCLIPProcessor"
    assert type(processor).__name__ == expected


def test_reconverting_a_package_is_stable(tmp_path, legacy):
    convert(legacy, tmp_path / "a")
    report = convert(tmp_path / "a", tmp_path / "b")
    assert report["source_format"] == "legacy_bertclip"
    assert _diffs(report)["logits_over_exp_logit_scale"] <= 1e-5


# -- mutation tests: each deliberate break must trip the gate -------------------------------------
def _patched_map(monkeypatch, tmp_path, name, edit):
    data = yaml.safe_load(Path(keymap.load_map(name).path).read_text())
    edit(data)
    path = tmp_path / f"{name.split('/')[-1]}.yaml"
    path.write_text(yaml.safe_dump(data))
    patched, real = KeyMap.load(path), keymap.load_map
    monkeypatch.setattr(keymap, "load_map", lambda n: patched if n == name else real(n))


def test_mutation_qkv_order(tmp_path, vocab, monkeypatch):
    def swap(data):
        for rule in data["convert"]:
            if rule["op"] == "chunk":
                rule["to"][0], rule["to"][1] = rule["to"][1], rule["to"][0]
    _patched_map(monkeypatch, tmp_path, "clip/cnclip_to_chinese_clip", swap)
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


@pytest.mark.parametrize("source", ["legacy", "cnclip"])
def test_mutation_perturbed_projection_fails_the_logits_gate(tmp_path, legacy, vocab, monkeypatch, source):
    # The gate is 1e-5 on logits / exp(logit_scale), the cosine scale, whatever the temperature.
    real = convert_mod.write_package

    def perturbed(pkg, out):
        w = pkg.state["text_projection.weight"]
        noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
        pkg.state["text_projection.weight"] = w + 1e-3 * noise
        real(pkg, out)

    monkeypatch.setattr(convert_mod, "write_package", perturbed)
    src = legacy if source == "legacy" else synth.write_cnclip_pt(tmp_path, "ViT-B-16")
    with pytest.raises(VerificationError, match=r"logits_over_exp_logit_scale max \|diff\| [0-9.e-]+"):
        convert(src, tmp_path / "out", vocab=str(vocab))
    assert not (tmp_path / "out").exists()


def test_report_gates_the_logits_on_the_cosine_scale(tmp_path, legacy):
    convert(legacy, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    diffs = _diffs(report)
    assert max(diffs.values()) <= 1e-5
    scale = float(load_file(str(tmp_path / "out" / "model.safetensors"))["logit_scale"].exp())
    logits, = (c for c in report["checks"] if c["name"] == "logits_over_exp_logit_scale")
    ungated = float(logits["detail"].rsplit(" ", 1)[1])
    assert ungated == pytest.approx(diffs["logits_over_exp_logit_scale"] * scale, rel=1e-5)


def test_every_file_of_a_package_is_in_its_manifest(tmp_path, legacy):
    out = tmp_path / "out"
    report = convert(legacy, out)
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"conversion_report.json"}
    assert set(report["files"]) == files
    assert {"README.md", "vision_tower/model.safetensors", "text_tower/text_projection.safetensors",
            "text_tower/3_Dense/model.safetensors", "text_tower/tokenizer.json"} <= files
    for name, entry in report["files"].items():
        data = (out / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}, name
    assert validate_report(out) == []


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
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):  # a bare pickle is never unpickled
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
    assert main(["clip", "convert", str(legacy), str(tmp_path / "out")]) == 2  # exists, no --force
    err = capsys.readouterr().err
    assert err.startswith("ofaconv: error:") and len(err.strip().splitlines()) == 1 and "--force" in err
    assert main(["clip", "convert", str(legacy), str(tmp_path / "out"), "--force", "--no-verify"]) == 0
    with pytest.raises(SystemExit):
        main(["clip", "convert", str(legacy), str(tmp_path / "out"), "--overwrite"])
    capsys.readouterr()
    # --force never replaces the source: here OUT is the legacy folder itself, or its parent
    for out in (legacy, legacy.parent):
        assert main(["clip", "convert", str(legacy), str(out), "--force"]) == 2
        assert "input" in capsys.readouterr().err
    assert (legacy / "config.json").is_file()
