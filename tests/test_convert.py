"""convert + verify on every variant family's micro fixture, the official micro checkpoint,
golden outputs, bad inputs, and mutation tests proving the parity checker bites."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from ofaconv.cli import main as cli
from ofaconv.core.errors import OfaconvError
from ofaconv.ofa.convert import convert_checkpoint
from badfiles import write_bad_checkpoint
from ofaconv.ofa.synth import write_synthetic_checkpoint
from ofaconv.ofa.variants import variant_names

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MAPPINGS = Path(__file__).resolve().parents[1] / "mappings"


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synth")


@pytest.fixture(scope="session")
def micro_checkpoint(synth_dir):
    made = {}

    def get(variant: str) -> Path:
        if variant not in made:
            path = synth_dir / f"{variant}.pt"
            write_synthetic_checkpoint(path, variant, size="micro", seed=0)
            made[variant] = path
        return made[variant]

    return get


@pytest.fixture(scope="session")
def converted(micro_checkpoint, tmp_path_factory):
    done = {}

    def get(variant: str):
        if variant not in done:
            out = tmp_path_factory.mktemp("conv") / variant
            done[variant] = convert_checkpoint(micro_checkpoint(variant), out, verify=True)
        return done[variant]

    return get


@pytest.mark.parametrize("variant", variant_names())
def test_convert_verify_every_variant(variant, converted):
    result = converted(variant)
    checks = {c["name"]: c for c in result.report["checks"]}
    assert result.passed, [c for c in result.report["checks"] if not c["passed"]]
    # greedy, and the beam search the folder is configured for (OFA-CN's 8, OFA-Huge's 10, else 5)
    beams = json.loads((result.out_dir / "generation_config.json").read_text())["num_beams"]
    assert beams == {"ofa-huge": 10, "ofa-cn-base": 8, "ofa-cn-large": 8}.get(variant, 5)
    assert [c["name"] for c in result.report["checks"]] == [
        "structure", "tensors", "encoder_states", "decoder_logits", "greedy", f"beam{beams}"]
    assert all(c["passed"] for c in checks.values()), checks
    # A faithful fp32 port is bit-exact on CPU, and the gate says so.
    for name in ("encoder_states", "decoder_logits"):
        assert checks[name]["value"] == 0.0 and checks[name]["gate"] == 0.0, checks[name]
    out = result.out_dir
    for name in ("config.json", "model.safetensors", "generation_config.json", "README.md",
                 "conversion_report.json", "modeling_ofa.py", "configuration_ofa.py",
                 "preprocessor_config.json", "tokenizer_config.json"):
        assert (out / name).exists(), name
    assert result.report["variant"] == variant


@pytest.mark.parametrize("saved,beams", [({"num_beams": 8}, 8), ({"num_beams": 10}, 10), ({"num_beams": 1}, 5),
                                         ({"num_beams": "8"}, 5), ({"num_beams": True}, 5), ({}, 5), (None, 5)])
def test_probe_searches_are_greedy_and_the_folders_own_beam_size(saved, beams, tmp_path):
    from ofaconv.ofa.verify import probe_searches

    if saved is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(saved))
    assert probe_searches(tmp_path)[1] == {"greedy": 1, f"beam{beams}": beams}


@pytest.mark.parametrize("variant", variant_names())
def test_config_files_are_what_the_classes_write(variant, converted, micro_checkpoint, tmp_path):
    """convert writes config.json and generation_config.json without importing transformers: they
    must be byte-identical to OFAConfig's and GenerationConfig's own save_pretrained output."""
    import ofaconv.ofa.convert as conv
    from ofaconv.ofa.checkpoint import infer_config, load_checkpoint, read_flags
    from ofaconv.ofa.tokenization import config_file_text
    from ofaconv.ofa.modeling.configuration_ofa import build_generation_config
    from ofaconv.ofa.variants import family_info, get_variant

    ckpt = load_checkpoint(micro_checkpoint(variant))
    shape, flags = infer_config(ckpt.state_dict), read_flags(ckpt)
    config = conv.build_config(shape, flags)
    config.dtype = torch.bfloat16
    config.task = {"name": "caption", "prompt": "图片描述了什么内容?"}
    config.save_pretrained(tmp_path)
    ours = config_file_text(conv.config_json(shape, flags, "bfloat16", {"task": config.task}))
    assert ours.encode() == (tmp_path / "config.json").read_bytes()
    folder = converted(variant).out_dir
    del config.task
    config.dtype = torch.float32
    config.save_pretrained(tmp_path)
    assert (folder / "config.json").read_bytes() == (tmp_path / "config.json").read_bytes()

    family = converted(variant).report["family"]
    settings = {**family_info(family)["generation"], **get_variant(variant).get("generation", {})}
    build_generation_config(settings, config).save_pretrained(tmp_path)
    assert (folder / "generation_config.json").read_bytes() == (tmp_path / "generation_config.json").read_bytes()
    greedy = {"num_beams": 1, "max_len_b": 20, "temperature": 0.7, "text_token_range": [4, 40]}
    build_generation_config(greedy, config).save_pretrained(tmp_path)
    ours = config_file_text(conv.generation_config_json(greedy, json.loads((folder / "config.json").read_text())))
    assert ours.encode() == (tmp_path / "generation_config.json").read_bytes()


def test_golden_outputs(converted):
    """Logit slices and greedy ids of each micro fixture are pinned, so a drift that hits the
    model and the reference alike is still caught."""
    from ofaconv.ofa.verify import load_converted, probe_inputs

    golden = json.loads((FIXTURES / "golden.json").read_text())
    for variant in variant_names():
        model, _ = load_converted(converted(variant).out_dir)
        inputs = probe_inputs(model.config, converted(variant).out_dir)
        with torch.no_grad():
            logits = model(**inputs).logits
            ids = model.generate(
                input_ids=inputs["input_ids"], patch_images=inputs["patch_images"], patch_masks=inputs["patch_masks"],
                num_beams=1, max_len_b=8, no_repeat_ngram_size=3,
            )
        expected = golden[variant]
        got = logits[:, :, :8].reshape(-1).tolist()
        assert max(abs(a - b) for a, b in zip(got, expected["logits_slice"])) <= 1e-5, variant
        assert ids.tolist() == expected["greedy_ids"], variant


def test_official_micro_reproduces_official_logits(official_micro_converted, official_io_path):
    """The session's official conversion passed --verify (the fixture asserts it) and its logits are the
    official code's."""
    from ofaconv.ofa.verify import load_converted

    model, _ = load_converted(official_micro_converted)
    io = torch.load(official_io_path)
    with torch.no_grad():
        logits = model(**io["inputs"]).logits
    assert (logits - io["logits"]).abs().max().item() <= 1e-5


def test_cli_convert_and_verify(micro_checkpoint, tmp_path, capsys):
    src = micro_checkpoint("ofa-cn-base")
    out = tmp_path / "out"
    assert cli(["convert", str(src), str(out), "--verify"]) == 0
    assert "decoder_logits" in capsys.readouterr().out
    assert cli(["convert", str(src), str(out)]) != 0  # exists: refused without --force
    assert "--force" in capsys.readouterr().err
    assert cli(["verify", str(out), "--against", str(src)]) == 0
    assert cli(["verify", str(out)]) == 0
    assert cli(["inspect", str(src)]) == 0
    assert "ofa-cn-base" in capsys.readouterr().out


def test_fp16_and_sharding_are_deterministic(micro_checkpoint, tmp_path):
    src = micro_checkpoint("ofa-tiny")
    a = convert_checkpoint(src, tmp_path / "a", dtype="fp16", max_shard_size="2MB", verify=True)
    convert_checkpoint(src, tmp_path / "b", dtype="fp16", max_shard_size="2MB")
    assert a.passed
    assert (tmp_path / "a" / "model.safetensors.index.json").exists()
    shards = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert len(shards) > 1
    for name in shards + ["model.safetensors.index.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


BAD_INPUTS = ["truncated", "random_bytes", "malicious_pickle", "not_ofa", "nan_weight", "missing_key",
              "extra_key", "misshaped_key", "wrong_derived_table"]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_one_line_error_and_no_output(kind, micro_checkpoint, tmp_path, capsys):
    bad = tmp_path / f"{kind}.pt"
    write_bad_checkpoint(bad, kind, base=micro_checkpoint("ofa-tiny"))
    out = tmp_path / "out"
    code = cli(["convert", str(bad), str(out)])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and err.startswith("ofaconv: error:"), err
    assert str(bad) in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "temporary output left behind"


def test_bad_tokenizer_source_fails_before_any_weight_is_written(micro_checkpoint, tmp_path, capsys, monkeypatch):
    import ofaconv.core.writer

    def no_write(*args, **kwargs):
        raise AssertionError("weights written before the tokenizer source was checked")

    monkeypatch.setattr(ofaconv.core.writer, "write_shards", no_write)
    out = tmp_path / "out"
    code = cli(["convert", str(micro_checkpoint("ofa-tiny")), str(out), "--tokenizer", str(tmp_path / "no-such-folder")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "no-such-folder" in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_work_beside_the_weights_that_fails_stops_the_write(micro_checkpoint, tmp_path, capsys, monkeypatch):
    """The processing files and the derived tables' check run on a worker thread beside the weights:
    when one fails, the write stops at its next tensor and the run ends with that error, one line,
    and no output."""
    import ofaconv.core.writer
    import ofaconv.ofa.convert as conv

    def broken(*args):
        raise OfaconvError("tokenizer.json: cannot be built; check the vocabulary")

    real, stopped = ofaconv.core.writer.write_shards, []

    def write_after_the_failure(*args, stop, **kwargs):
        assert stop.wait(10), "the worker's failure did not signal the write"
        try:
            return real(*args, stop=stop, **kwargs)
        except concurrent.futures.CancelledError:
            stopped.append(True)  # at its first tensor, not after writing them all
            raise

    monkeypatch.setattr(conv, "_processing_files", broken)
    monkeypatch.setattr(ofaconv.core.writer, "write_shards", write_after_the_failure)
    out = tmp_path / "out"
    code = cli(["convert", str(micro_checkpoint("ofa-tiny")), str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and stopped and err == "ofaconv: error: tokenizer.json: cannot be built; check the vocabulary"
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# -- mutation tests: a deliberately broken mapping or flag must make --verify fail -------------

def _mutated_keymap(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load((MAPPINGS / "ofa" / "fairseq.yaml").read_text())
    edit(data)
    path = tmp_path / "mutated.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    return path


def _swap_keep(data, old, new):
    data["keep"] = [e.replace(old, new) if isinstance(e, str) else e for e in data["keep"]]


def _rename_rule(data, src, dst):
    data.setdefault("rename", []).append({"from": src, "to": dst})


MUTATIONS = {
    "swapped_q_k": lambda d: (
        _replace_keep(d, "encoder.layers.{i:encoder_layers}.self_attn.{p:q_proj|k_proj|v_proj|out_proj}.{t:weight|bias}",
                      ["encoder.layers.{i:encoder_layers}.self_attn.{p:v_proj|out_proj}.{t:weight|bias}"]),
        _rename_rule(d, "encoder.layers.{i:encoder_layers}.self_attn.q_proj.{t:weight|bias}", "encoder.layers.{i}.self_attn.k_proj.{t}"),
        _rename_rule(d, "encoder.layers.{i:encoder_layers}.self_attn.k_proj.{t:weight|bias}", "encoder.layers.{i}.self_attn.q_proj.{t}"),
    ),
    "swapped_layernorm_weight_bias": lambda d: (
        _replace_keep(d, "encoder.{m:layernorm_embedding|patch_layernorm_embedding|pos_ln|image_pos_ln|layer_norm}.{t:weight|bias}",
                      ["encoder.{m:patch_layernorm_embedding|pos_ln|image_pos_ln|layer_norm}.{t:weight|bias}"]),
        _rename_rule(d, "encoder.layernorm_embedding.weight", "encoder.layernorm_embedding.bias"),
        _rename_rule(d, "encoder.layernorm_embedding.bias", "encoder.layernorm_embedding.weight"),
    ),
    "wrong_layer_index": lambda d: (
        _replace_keep(d, "decoder.layers.{i:decoder_layers}.{m:self_attn_layer_norm|final_layer_norm|fc1|fc2}.{t:weight|bias}",
                      ["decoder.layers.{i:decoder_layers}.{m:self_attn_layer_norm|final_layer_norm}.{t:weight|bias}",
                       "decoder.layers.{i:decoder_layers}.fc2.{t:weight|bias}"]),
        _rename_rule(d, "decoder.layers.0.fc1.{t:weight|bias}", "decoder.layers.1.fc1.{t}"),
        _rename_rule(d, "decoder.layers.1.fc1.{t:weight|bias}", "decoder.layers.0.fc1.{t}"),
        _rename_rule(d, "decoder.layers.2.fc1.{t:weight|bias}", "decoder.layers.2.fc1.{t}"),
    ),
    "swapped_cross_and_self_mid_layer_norm": lambda d: _swap_renames(
        d, "decoder.layers.{i}.self_attn_mid_layer_norm.{t}", "decoder.layers.{i}.cross_attn_mid_layer_norm.{t}"),
    "dropped_normformer_layer_norm": lambda d: (
        _drop_rename(d, "encoder.layers.{i:encoder_layers}.attn_ln.{t:weight|bias}"),
    ),
    "swapped_self_and_cross_attention": lambda d: (
        _replace_keep(d, "decoder.layers.{i:decoder_layers}.self_attn.{p:q_proj|k_proj|v_proj|out_proj}.{t:weight|bias}", []),
        _set_rename_to(d, "decoder.layers.{i:decoder_layers}.encoder_attn.{p:q_proj|k_proj|v_proj|out_proj}.{t:weight|bias}",
                       "decoder.layers.{i}.self_attn.{p}.{t}"),
        _rename_rule(d, "decoder.layers.{i:decoder_layers}.self_attn.{p:q_proj|k_proj|v_proj|out_proj}.{t:weight|bias}",
                     "decoder.layers.{i}.cross_attn.{p}.{t}"),
    ),
    "swapped_head_scales": lambda d: (
        _replace_keep(d, "decoder.layers.{i:decoder_layers}.self_attn.c_attn", []),
        _set_rename_to(d, "decoder.layers.{i:decoder_layers}.encoder_attn.c_attn", "decoder.layers.{i}.self_attn.c_attn"),
        _rename_rule(d, "decoder.layers.{i:decoder_layers}.self_attn.c_attn", "decoder.layers.{i}.cross_attn.c_attn"),
    ),
    "swapped_position_bias_projections": lambda d: (
        _replace_keep(d, "decoder.{m:self_pos_q_linear|self_pos_k_linear|cross_pos_q_linear|cross_pos_k_linear}.{t:weight|bias}",
                      ["decoder.{m:self_pos_q_linear|self_pos_k_linear}.{t:weight|bias}"]),
        _rename_rule(d, "decoder.cross_pos_q_linear.{t:weight|bias}", "decoder.cross_pos_k_linear.{t}"),
        _rename_rule(d, "decoder.cross_pos_k_linear.{t:weight|bias}", "decoder.cross_pos_q_linear.{t}"),
    ),
    "swapped_rel_pos_tables_between_layers": lambda d: (
        _replace_keep(d, "encoder.{m:token_rel_pos_table_list|image_rel_pos_table_list}.{i:encoder_layers}.weight",
                      ["encoder.image_rel_pos_table_list.{i:encoder_layers}.weight"]),
        _rename_rule(d, "encoder.token_rel_pos_table_list.0.weight", "encoder.token_rel_pos_table_list.1.weight"),
        _rename_rule(d, "encoder.token_rel_pos_table_list.1.weight", "encoder.token_rel_pos_table_list.0.weight"),
    ),
    "swapped_batchnorm_statistics": lambda d: (
        _replace_keep(d, "encoder.embed_images.bn1.{b:weight|bias|running_mean|running_var|num_batches_tracked}",
                      ["encoder.embed_images.bn1.{b:weight|bias|num_batches_tracked}"]),
        _rename_rule(d, "encoder.embed_images.bn1.running_mean", "encoder.embed_images.bn1.running_var"),
        _rename_rule(d, "encoder.embed_images.bn1.running_var", "encoder.embed_images.bn1.running_mean"),
    ),
}


def _replace_keep(data, template, replacements):
    index = data["keep"].index(template)
    data["keep"][index:index + 1] = replacements


def _set_rename_to(data, source, target):
    for rule in data["rename"]:
        if rule["from"] == source:
            rule["to"] = target
            return
    raise KeyError(source)


def _drop_rename(data, source):
    data["rename"] = [r for r in data["rename"] if r["from"] != source]
    data["drop"].append({"key": source})


def _swap_renames(data, a, b):
    for rule in data["rename"]:
        if rule["to"] == a:
            rule["to"] = b
        elif rule["to"] == b:
            rule["to"] = a


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_mutated_keymap_fails_verification(mutation, micro_checkpoint, tmp_path, monkeypatch):
    import ofaconv.ofa.convert as conv

    # The parity checker alone must catch every fault: the plan-time check of a custom map against
    # the model's key set (which refuses the dropped-key faults earlier) is switched off here.
    monkeypatch.setattr(conv, "model_state_shapes", lambda shape, flags: None)
    keymap = _mutated_keymap(tmp_path, MUTATIONS[mutation])
    src = micro_checkpoint("ofa-large")  # 2 encoder / 3 decoder layers: index swaps are visible
    result = convert_checkpoint(src, tmp_path / "out", keymap=str(keymap), verify=True)
    failed = [c["name"] for c in result.report["checks"] if not c["passed"]]
    assert not result.passed and failed, f"{mutation} went unnoticed"
    assert {"encoder_states", "decoder_logits", "structure"} & set(failed)


def test_custom_keymap_missing_a_model_key_is_refused_before_writing(micro_checkpoint, tmp_path, capsys):
    keymap = _mutated_keymap(tmp_path, MUTATIONS["dropped_normformer_layer_norm"])
    src = micro_checkpoint("ofa-large")
    out = tmp_path / "out"
    assert cli(["convert", str(src), str(out), "--keymap", str(keymap)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "self_attn_mid_layer_norm" in err and str(src) in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    assert cli(["inspect", str(src), "--keymap", str(keymap)]) != 0


@pytest.mark.parametrize("flag,value", [("attn_scale_factor", 1.0), ("disable_entangle", True),
                                        ("interpolate_position", False)])
def test_wrong_config_flag_fails_verification(flag, value, micro_checkpoint, tmp_path, monkeypatch):
    """A converter that ignores a checkpoint flag (head scale, entangle, interpolation) is caught."""
    import ofaconv.ofa.convert as conv

    variant = "ofa-huge" if flag == "interpolate_position" else "ofa-tiny"
    src = tmp_path / "src.pt"
    overrides = {"disable_entangle": False} if flag == "disable_entangle" else {}
    write_synthetic_checkpoint(src, variant, size="micro", seed=1, flags=overrides)
    real = conv.config_arguments

    def broken(shape, flags):
        return {**real(shape, flags), flag: value}

    monkeypatch.setattr(conv, "config_arguments", broken)
    result = convert_checkpoint(src, tmp_path / "out", verify=True)
    assert not result.passed, f"ignoring {flag} went unnoticed"


def _after_init(cls, edit):
    original = cls.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        edit(self)

    return cls, "__init__", init


def _subtle_model_mutations():
    from ofaconv.ofa.modeling import modeling_ofa as m

    return {
        # fairseq's LayerNorm eps is 1e-5; a port with 1e-6 is wrong, but only by ~1e-6
        "encoder_final_layer_norm_eps_1e-6": ("encoder_states", _after_init(
            m.OFAEncoder, lambda enc: setattr(enc.layer_norm, "eps", 1e-6))),
        "decoder_final_layer_norm_eps_1e-6": ("decoder_logits", _after_init(
            m.OFADecoder, lambda dec: setattr(dec.layer_norm, "eps", 1e-6))),
        "attention_logits_scaled_by_1.00001": ("encoder_states", _after_init(
            m.OFAAttention, lambda attn: setattr(attn, "scaling", attn.scaling * 1.00001))),
    }


@pytest.mark.parametrize("mutation", ["encoder_final_layer_norm_eps_1e-6", "decoder_final_layer_norm_eps_1e-6",
                                      "attention_logits_scaled_by_1.00001"])
def test_subtly_wrong_model_code_fails_verification(mutation, micro_checkpoint, tmp_path, monkeypatch):
    """Porting mistakes that move the outputs by less than 1e-5 (a tolerance would pass them)
    fail the exact gate: in fp32 on one CPU a faithful port reproduces the reference bit for bit."""
    check, patch = _subtle_model_mutations()[mutation]
    monkeypatch.setattr(*patch)
    result = convert_checkpoint(micro_checkpoint("ofa-large"), tmp_path / "out", verify=True)
    rows = {c["name"]: c for c in result.report["checks"]}
    assert not result.passed and not rows[check]["passed"], f"{mutation} went unnoticed"
    assert 0 < rows[check]["value"] < 1e-5 and rows[check]["gate"] == 0.0
    assert rows[check]["gate_reason"] == "same dtype (float32) and device (cpu): bit-exact expected"


@pytest.mark.parametrize("flags,message", [
    ({"encoder_prompt": True}, "encoder_prompt=True is not supported"),
    ({"cross_self_attention": True}, "cross_self_attention=True is not supported"),
    ({"entangle_position_embedding": True}, "entangle_position_embedding=True is not supported"),
    ({"sync_bn": True}, "sync_bn=True is not supported"),
    ({"freeze_resnet": True}, "freeze_resnet=True is not supported"),
    ({"activation_fn": "relu"}, "activation_fn=relu is not supported"),
    ({"scale_attn": False, "scale_fc": False, "scale_heads": False}, "without NormFormer layers"),
])
def test_unsupported_flags_are_refused_by_convert_and_inspect(flags, message, tmp_path, capsys):
    src = tmp_path / "prompted.pt"
    write_synthetic_checkpoint(src, "ofa-tiny", size="micro", seed=3, flags=flags)
    for command in (["convert", str(src), str(tmp_path / "out")], ["inspect", str(src)]):
        assert cli(command) != 0
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err and str(src) in err, err
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["prompted.pt"]


CHECKPOINT_CASES = {
    "ema": ({"ema": True}, {"ema": True}),
    "fp16_source": ({"dtype": torch.float16}, {}),
    "legacy_args_layout": ({"layout": "args"}, {}),
    "bf16_output": ({}, {"dtype": "bf16"}),
    "512_positions": ({"flags": {"max_source_positions": 512, "max_target_positions": 512}}, {}),
    "code_image_size_256": ({"flags": {"code_image_size": 256}}, {}),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_convert_and_verify_end_to_end(case, tmp_path):
    synth_options, convert_options = CHECKPOINT_CASES[case]
    src = write_synthetic_checkpoint(tmp_path / "src.pt", "ofa-tiny", size="micro", seed=4, **synth_options)
    result = convert_checkpoint(src, tmp_path / "out", verify=True, **convert_options)
    assert result.passed, [c for c in result.report["checks"] if not c["passed"]]
    written = {"bf16_output": "BF16"}.get(case, "F32")  # an fp16 source is written at the asked fp32
    header = _safetensors_header(tmp_path / "out" / "model.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__" and "num_batches" not in k} == {written}
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert report["source"]["fingerprint"]["scheme"] == "ofaconv/state-sha256@2"
    assert "sha256" not in report["source"]  # the whole file (optimizer state too) only when asked
    assert report["source"]["fingerprint"]["sha256"] in (tmp_path / "out" / "README.md").read_text()
    assert report["source"]["ema"] is bool(convert_options.get("ema"))
    assert report["keymap"]["name"] == "ofa/fairseq" and report["versions"]["transformers"]


def _safetensors_header(path):
    data = path.read_bytes()
    return json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])


def test_verify_against_reads_the_report_and_rewrites_it(tmp_path, capsys):
    src = write_synthetic_checkpoint(tmp_path / "src.pt", "ofa-tiny", size="micro", seed=5, ema=True)
    out = tmp_path / "out"
    assert convert_checkpoint(src, out, ema=True).passed
    # --ema comes from the report: without it the EMA weights would be compared with the model's
    assert cli(["verify", str(out), "--against", str(src)]) == 0
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["passed"] and report["checks"][0]["name"] == "source" and report["checks"][0]["passed"]
    other = write_synthetic_checkpoint(tmp_path / "other.pt", "ofa-tiny", size="micro", seed=6, ema=True)
    capsys.readouterr()
    assert cli(["verify", str(out), "--against", str(other)]) == 3
    report = json.loads((out / "conversion_report.json").read_text())
    failed = {c["name"] for c in report["checks"] if not c["passed"]}
    assert not report["passed"] and {"source", "tensors"} <= failed


def _set_first_element(path: Path, tensor: torch.Tensor, value: float) -> None:
    """Overwrite, in the file itself, the first element of ``tensor``'s bytes (found by its first
    64): the pickle record stays as it was, only the tensor's bytes change."""
    data = bytearray(path.read_bytes())
    first = tensor.contiguous().reshape(-1).view(torch.uint8)[:64].numpy().tobytes()
    at = data.find(first)
    assert at > 0 and data.find(first, at + 1) < 0
    data[at : at + 4] = torch.tensor([value], dtype=torch.float32).view(torch.uint8).numpy().tobytes()
    path.write_bytes(bytes(data))


def test_verify_against_binds_the_written_bytes_not_just_their_values(micro_checkpoint, tmp_path, capsys):
    """The fingerprint names each tensor written unchanged and leaves its bytes to the weight files'
    sha256; verify --against compares those tensors with the folder's byte for byte. A source that
    differs from the converted one only by -0.0 for 0.0 in one weight (equal values: the tensors
    check passes) is refused by the source check."""
    from ofaconv.ofa.checkpoint import load_checkpoint

    src = tmp_path / "src.pt"
    src.write_bytes(micro_checkpoint("ofa-tiny").read_bytes())
    key = "encoder.layers.0.fc1.weight"
    _set_first_element(src, load_checkpoint(src).state_dict[key], 0.0)
    assert load_checkpoint(src).state_dict[key].reshape(-1)[0].item() == 0.0
    out = tmp_path / "out"
    assert convert_checkpoint(src, out).passed
    assert cli(["verify", str(out), "--against", str(src)]) == 0
    negative = tmp_path / "negative.pt"
    negative.write_bytes(src.read_bytes())
    _set_first_element(negative, load_checkpoint(negative).state_dict[key], -0.0)
    assert torch.signbit(load_checkpoint(negative).state_dict[key].reshape(-1)[0])
    capsys.readouterr()
    assert cli(["verify", str(out), "--against", str(negative)]) == 3
    checks = {c["name"]: c for c in json.loads((out / "conversion_report.json").read_text())["checks"]}
    assert checks["tensors"]["passed"] and not checks["source"]["passed"]
    assert key in checks["source"]["detail"] and "byte for byte" in checks["source"]["detail"]


def test_verify_against_a_cast_conversion_hashes_the_cast_tensors(micro_checkpoint, tmp_path, capsys):
    """At bf16 no floating tensor is written unchanged: the fingerprint hashes their source bytes, so
    verify --against still tells the converted checkpoint from another one."""
    src = micro_checkpoint("ofa-tiny")
    out = tmp_path / "out"
    assert convert_checkpoint(src, out, dtype="bf16").passed
    assert cli(["verify", str(out), "--against", str(src)]) == 0
    other = write_synthetic_checkpoint(tmp_path / "other.pt", "ofa-tiny", size="micro", seed=12)
    capsys.readouterr()
    assert cli(["verify", str(out), "--against", str(other)]) == 3
    source = json.loads((out / "conversion_report.json").read_text())["checks"][0]
    assert source["name"] == "source" and not source["passed"]


def test_verify_against_recomputes_a_first_scheme_fingerprint(micro_checkpoint, tmp_path, capsys):
    """Reports written before the @2 scheme hashed every converted tensor: verify --against still
    recomputes those (and refuses another checkpoint by them)."""
    from ofaconv.core.digest import LEGACY_SCHEME, state_fingerprint
    from ofaconv.ofa.checkpoint import load_checkpoint

    src = micro_checkpoint("ofa-tiny")
    out = tmp_path / "out"
    assert convert_checkpoint(src, out).passed
    report_path = out / "conversion_report.json"
    report = json.loads(report_path.read_text())
    report["source"]["fingerprint"] = state_fingerprint(src, load_checkpoint(src).state_dict, scheme=LEGACY_SCHEME)
    report_path.write_text(json.dumps(report))
    assert cli(["verify", str(out), "--against", str(src)]) == 0
    other = write_synthetic_checkpoint(tmp_path / "other.pt", "ofa-tiny", size="micro", seed=11)
    capsys.readouterr()
    assert cli(["verify", str(out), "--against", str(other)]) == 3
    source = json.loads(report_path.read_text())["checks"][0]
    assert source["name"] == "source" and not source["passed"] and "fingerprint" in source["detail"]


def test_source_sha256_records_the_whole_file_and_verify_checks_both(micro_checkpoint, tmp_path, capsys):
    src = micro_checkpoint("ofa-cn-base")
    out = tmp_path / "out"
    assert cli(["convert", str(src), str(out), "--source-sha256"]) == 0
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["source"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert cli(["verify", str(out), "--against", str(src)]) == 0
    row = json.loads((out / "conversion_report.json").read_text())["checks"][0]
    assert row["name"] == "source" and row["passed"] and "fingerprint and sha256 match" in row["detail"]


def test_failed_verification_exits_3_and_keeps_the_folder_with_its_report(micro_checkpoint, tmp_path, monkeypatch,
                                                                          capsys):
    import ofaconv.ofa.convert as conv

    monkeypatch.setattr(conv, "model_state_shapes", lambda shape, flags: None)
    keymap = _mutated_keymap(tmp_path, MUTATIONS["swapped_q_k"])
    out = tmp_path / "out"
    assert cli(["convert", str(micro_checkpoint("ofa-large")), str(out), "--keymap", str(keymap), "--verify"]) == 3
    report = json.loads((out / "conversion_report.json").read_text())
    failed = [c["name"] for c in report["checks"] if not c["passed"]]
    assert not report["passed"] and "encoder_states" in failed
    assert "FAIL" in capsys.readouterr().out


def test_bad_max_shard_size_is_one_line(micro_checkpoint, tmp_path, capsys):
    assert cli(["convert", str(micro_checkpoint("ofa-tiny")), str(tmp_path / "out"), "--max-shard-size", "2 gigs"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "2 gigs" in err and not (tmp_path / "out").exists()


def test_disable_entangle_false_is_implemented(tmp_path):
    src = tmp_path / "entangled.pt"
    write_synthetic_checkpoint(src, "ofa-cn-base", size="micro", seed=2, flags={"disable_entangle": False})
    result = convert_checkpoint(src, tmp_path / "out", verify=True)
    assert result.passed, result.report["checks"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["disable_entangle"] is False


@pytest.mark.parametrize("variant", variant_names())
def test_shipped_keymap_produces_exactly_the_model_keys(variant, micro_checkpoint):
    """convert skips the meta-model key check for the shipped map: this is why that is safe.
    Also proves the model builds on the meta device (transformers 5 / accelerate empty init)."""
    from ofaconv.ofa.checkpoint import infer_config, load_checkpoint, read_flags
    from ofaconv.ofa.convert import DEFAULT_KEYMAP, keymap_counts, model_state_shapes
    from ofaconv.core.keymap import KeyMap

    ckpt = load_checkpoint(micro_checkpoint(variant))
    shape = infer_config(ckpt.state_dict)
    targets = model_state_shapes(shape, read_flags(ckpt))
    # a mapping of expected shapes is also the complete key set: any key missing either way raises
    plan = KeyMap.load(DEFAULT_KEYMAP).plan(ckpt.state_dict, keymap_counts(shape), expected_shapes=targets)
    assert set(plan.targets) | set(plan.tied) == set(targets)
