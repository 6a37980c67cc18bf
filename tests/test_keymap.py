"""Key maps against the key lists of real checkpoints (fixtures/keys: name, shape, dtype only)."""

import hashlib
from pathlib import Path

import pytest
import torch

from ofaconv.core.errors import KeyMapError
from ofaconv.core.keymap import KeyMap, TensorMeta, collapse_keys, natural_key, read_key_list

KEYS = Path(__file__).resolve().parent.parent / "fixtures" / "keys"
COUNTS = {
    "micro": {"encoder_layers": 2, "decoder_layers": 2, "resnet_layers": [2, 2, 2]},
    "base": {"encoder_layers": 6, "decoder_layers": 6, "resnet_layers": [3, 4, 23]},
    "large": {"encoder_layers": 12, "decoder_layers": 12, "resnet_layers": [3, 8, 36]},
    "huge": {"encoder_layers": 24, "decoder_layers": 12, "resnet_layers": [3, 8, 36]},
}
MAPS = {"ofa/fairseq": "fairseq_ofa_{}.txt", "ofa/hf_port": "hf_port_ofa_{}.txt"}
BUFFERS = {f"{side}.{b}" for side in ("encoder", "decoder") for b in ("token_rp_bucket", "image_rp_bucket")}
BUFFERS.add("decoder.image_position_idx")
ALIASES = {"decoder.embed_tokens.weight", "decoder.output_projection.weight"}


def keys(kind: str, variant: str) -> dict[str, TensorMeta]:
    return read_key_list(KEYS / MAPS[kind].format(variant))


def tensors(metas: dict[str, TensorMeta]) -> dict[str, torch.Tensor]:
    """Distinct small tensors of the listed shapes (large int64 buffers left uninitialised)."""
    out = {}
    for n, (name, meta) in enumerate(metas.items()):
        dtype = getattr(torch, meta.dtype)
        out[name] = torch.empty(meta.shape, dtype=dtype) if name in BUFFERS else torch.full(meta.shape, n, dtype=dtype)
    for alias in ALIASES & out.keys():
        out[alias] = out["encoder.embed_tokens.weight"]
    return out


def write_map(tmp_path, body: str) -> KeyMap:
    path = tmp_path / "custom.yaml"
    path.write_text("schema: ofaconv/keymap@1\n" + body)
    return KeyMap.load(path)


# -- the shipped maps against real key lists ------------------------------------------------------


@pytest.mark.parametrize("variant", COUNTS)
@pytest.mark.parametrize("kind", MAPS)
def test_plan_gives_port_layout(kind, variant):
    source, port = keys(kind, variant), keys("ofa/hf_port", variant)
    plan = KeyMap.load(kind).plan(source, COUNTS[variant], expected_shapes={k: m.shape for k, m in port.items()})
    assert set(plan.targets) | set(plan.tied) == set(port) - BUFFERS
    assert set(plan.targets).isdisjoint(plan.tied)
    assert set(plan.derived) == BUFFERS and all(plan.derived[k] == k for k in BUFFERS)
    assert plan.tied == dict.fromkeys(sorted(ALIASES), "encoder.embed_tokens.weight")
    assert plan.tied_sources == dict.fromkeys(sorted(ALIASES), "encoder.embed_tokens.weight")
    assert plan.dropped == (["decoder.version", "encoder.version"] if kind == "ofa/fairseq" else [])
    assert all(source[src].dtype == port[tgt].dtype for tgt, src in plan.entries)
    assert plan.targets == sorted(plan.targets, key=natural_key)
    assert len(plan.entries) + len(plan.dropped) + len(plan.derived) + len(plan.tied_sources) == len(source)


@pytest.mark.parametrize("variant", COUNTS)
def test_both_maps_agree(variant):
    fairseq = KeyMap.load("ofa/fairseq").plan(keys("ofa/fairseq", variant), COUNTS[variant])
    port = KeyMap.load("ofa/hf_port").plan(keys("ofa/hf_port", variant), COUNTS[variant])
    assert fairseq.targets == port.targets
    assert (fairseq.tied, fairseq.derived) == (port.tied, port.derived)


def test_fairseq_renames_are_the_known_seven():
    plan = KeyMap.load("ofa/fairseq").plan(keys("ofa/fairseq", "micro"), COUNTS["micro"])
    renamed = {src.split(".")[3]: tgt.split(".")[3] for tgt, src in plan.entries if src != tgt}
    assert renamed == {
        "attn_ln": "self_attn_mid_layer_norm",
        "self_attn_ln": "self_attn_mid_layer_norm",
        "cross_attn_ln": "cross_attn_mid_layer_norm",
        "ffn_layernorm": "ffn_layer_norm",
        "encoder_attn": "cross_attn",
        "encoder_attn_layer_norm": "cross_attn_layer_norm",
    }
    assert ("decoder.layers.1.cross_attn.c_attn", "decoder.layers.1.encoder_attn.c_attn") in plan.entries
    assert ("encoder.layers.0.self_attn_mid_layer_norm.weight", "encoder.layers.0.attn_ln.weight") in plan.entries


@pytest.mark.parametrize("kind", MAPS)
def test_round_trip_is_identity(kind):
    source = tensors(keys(kind, "micro"))
    keymap, counts = KeyMap.load(kind), COUNTS["micro"]
    forward = keymap.plan(source, counts)
    ours = forward.rename(source)  # what the writer stores: aliases once, no buffers
    back_plan = keymap.plan(ours, counts, reverse=True)
    back = back_plan.rename(ours)
    for alias, canonical in back_plan.tied.items():
        back[alias] = back[canonical]
    assert set(back) == set(source) - set(forward.dropped) - set(forward.derived.values())
    assert all(torch.equal(back[k], source[k]) for k in back)
    assert back_plan.dropped == forward.dropped and not back_plan.derived and not back_plan.tied_sources


def test_reverse_plan_checks_buffers_and_aliases_when_present():
    port = tensors(keys("ofa/hf_port", "micro"))
    plan = KeyMap.load("ofa/fairseq").plan(port, COUNTS["micro"], reverse=True)
    assert plan.derived["decoder.image_position_idx"] == "decoder.image_position_idx"
    assert plan.tied_sources == dict.fromkeys(sorted(ALIASES), "encoder.embed_tokens.weight")
    assert ("decoder.layers.0.encoder_attn.c_attn", "decoder.layers.0.cross_attn.c_attn") in plan.entries


def test_natural_order_and_plan_is_deterministic():
    source = keys("ofa/fairseq", "large")
    one = KeyMap.load("ofa/fairseq").plan(source, COUNTS["large"])
    two = KeyMap.load("ofa/fairseq").plan(dict(reversed(list(source.items()))), COUNTS["large"])
    assert one.entries == two.entries
    layers = [t for t in one.targets if t.startswith("encoder.layers.") and t.endswith("fc1.weight")]
    assert layers[:3] == [f"encoder.layers.{i}.fc1.weight" for i in range(3)]
    assert layers.index("encoder.layers.10.fc1.weight") == 10


def test_shipped_maps_and_hash():
    assert {"ofa/fairseq", "ofa/hf_port"} <= set(KeyMap.available())
    keymap = KeyMap.load("ofa/fairseq")
    assert keymap.name == "ofa/fairseq"
    assert keymap.sha256 == hashlib.sha256(Path(keymap.path).read_bytes()).hexdigest()
    assert KeyMap.load(keymap.path).sha256 == keymap.sha256


# -- optional entries -----------------------------------------------------------------------------


def test_fairseq_version_keys_are_optional():
    source = {k: m for k, m in keys("ofa/fairseq", "micro").items() if not k.endswith(".version")}
    plan = KeyMap.load("ofa/fairseq").plan(source, COUNTS["micro"])
    assert plan.dropped == []


def test_port_without_buffers_or_aliases():
    port = {k: m for k, m in keys("ofa/hf_port", "micro").items() if k not in BUFFERS | ALIASES}
    plan = KeyMap.load("ofa/hf_port").plan(port, COUNTS["micro"])
    assert plan.derived == {} and plan.tied_sources == {}
    assert set(plan.tied) == ALIASES  # the model still ties them


def test_optional_rename_absent_is_reported(tmp_path):
    keymap = write_map(tmp_path, "keep: ['a.{i:n}.w']\nrename:\n  - {from: 'old.{i:n}', to: 'new.{i}', optional: true}\n")
    plan = keymap.plan({"a.0.w": 0, "a.1.w": 0}, {"n": 2})
    assert plan.absent == [("new.0", "old.0"), ("new.1", "old.1")]
    assert any("absent   old.{0,1}" in line for line in plan.summary_lines())


# -- every error names the key --------------------------------------------------------------------


def error(fn, *args, **kwargs) -> KeyMapError:
    with pytest.raises(KeyMapError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize("kind", MAPS)
def test_missing_key(kind):
    source = keys(kind, "base")
    del source["encoder.layers.3.fc1.weight"]
    exc = error(KeyMap.load(kind).plan, source, COUNTS["base"], source_path="ckpt.pt")
    assert exc.key == "encoder.layers.3.fc1.weight"
    assert str(exc).startswith("ckpt.pt: key 'encoder.layers.3.fc1.weight': ")
    assert "1 expected keys missing: encoder.layers.3.fc1.weight" in str(exc)


@pytest.mark.parametrize("kind", MAPS)
def test_extra_key(kind):
    source = keys(kind, "base")
    source["classification_heads.vqa.dense.weight"] = TensorMeta((4, 4), "float32")
    exc = error(KeyMap.load(kind).plan, source, COUNTS["base"], source_path="ckpt.pt")
    assert exc.key == "classification_heads.vqa.dense.weight"
    assert "1 keys not consumed by any rule: classification_heads.vqa.dense.weight" in str(exc)


def test_wrong_counts_show_up_as_extra_and_missing_keys_collapsed():
    exc = error(KeyMap.load("ofa/fairseq").plan, keys("ofa/fairseq", "huge"), COUNTS["large"])
    assert "encoder.layers.{12..23}.fc1.weight" in str(exc)
    exc = error(KeyMap.load("ofa/fairseq").plan, keys("ofa/fairseq", "large"), COUNTS["huge"])
    assert "expected keys missing: " in str(exc) and "encoder.layers.{12..23}.fc1.weight" in str(exc)


def test_ambiguous_rule(tmp_path):
    keymap = write_map(tmp_path, "keep: ['a.{i:n}.w']\nrename: [{from: 'a.1.w', to: 'b.1.w'}]\n")
    exc = error(keymap.plan, {"a.0.w": 0, "a.1.w": 0}, {"n": 2})
    assert exc.key == "a.1.w" and "ambiguous rule" in str(exc) and "'a.{i:n}.w'" in str(exc)


def test_two_rules_producing_one_target(tmp_path):
    keymap = write_map(tmp_path, "keep: [b]\nrename: [{from: a, to: b}]\n")
    exc = error(keymap.plan, {"a": 0, "b": 0}, {})
    assert "ambiguous rule" in str(exc) and "both produce 'b'" in str(exc)


def test_dead_rule(tmp_path):
    source = {k: m for k, m in keys("ofa/fairseq", "micro").items() if ".attn_ln." not in k}
    exc = error(KeyMap.load("ofa/fairseq").plan, source, COUNTS["micro"])
    assert "dead rule (matches no key): rename 'encoder.layers.{i:encoder_layers}.attn_ln.{t:weight|bias}'" in str(exc)
    assert "expected keys missing" not in str(exc)  # the dead rule's keys are not listed twice
    keymap = write_map(tmp_path, "keep: [a, 'b.{i:n}']\n")
    assert "dead rule (matches no key): rename 'b.{i:n}'" in str(error(keymap.plan, {"a": 0}, {"n": 2}))


def test_mis_shaped_key():
    source, port = keys("ofa/fairseq", "micro"), keys("ofa/hf_port", "micro")
    port["decoder.layers.1.cross_attn.q_proj.weight"] = TensorMeta((64, 32), "float32")
    shapes = {k: m.shape for k, m in port.items()}
    exc = error(KeyMap.load("ofa/fairseq").plan, source, COUNTS["micro"], expected_shapes=shapes, source_path="ckpt.pt")
    assert exc.key == "decoder.layers.1.encoder_attn.q_proj.weight"
    assert "shape (64, 64) does not match (64, 32) expected for 'decoder.layers.1.cross_attn.q_proj.weight'" in str(exc)
    exc = error(KeyMap.load("ofa/fairseq").plan, source, COUNTS["micro"], expected_shapes=lambda k: shapes.get(k))
    assert exc.key == "decoder.layers.1.encoder_attn.q_proj.weight"


def test_tied_alias_of_another_shape():
    source = keys("ofa/fairseq", "micro")
    source["decoder.output_projection.weight"] = TensorMeta((999, 64), "float32")
    exc = error(KeyMap.load("ofa/fairseq").plan, source, COUNTS["micro"])
    assert exc.key == "decoder.output_projection.weight" and "(999, 64)" in str(exc) and "(1000, 64)" in str(exc)


def test_model_coverage_both_ways():
    source, port = keys("ofa/fairseq", "micro"), keys("ofa/hf_port", "micro")
    shapes = {k: m.shape for k, m in port.items()}
    shapes["encoder.layers.0.w_resid"] = (64,)
    exc = error(KeyMap.load("ofa/fairseq").plan, source, COUNTS["micro"], expected_shapes=shapes)
    assert exc.key == "encoder.layers.0.w_resid" and "1 model keys not produced" in str(exc)
    del shapes["encoder.layers.0.w_resid"], shapes["encoder.layers.1.fc2.bias"]
    exc = error(KeyMap.load("ofa/fairseq").plan, source, COUNTS["micro"], expected_shapes=shapes)
    assert exc.key == "encoder.layers.1.fc2.bias" and "produced keys the model lacks" in str(exc)


@pytest.mark.parametrize(
    "body, message",
    [
        ("keep: [a]\nrenames: []\n", "unknown field 'renames'"),
        ("keep: [{key: a, optinal: true}]\n", "unknown field 'optinal' in keep[0]"),
        ("rename: [{from: a}]\n", "rename[0] lacks field 'to'"),
        ("keep: [{key: a, optional: 'yes'}]\n", "keep[0]: field 'optional' must be true or false"),
        ("tied: [decoder.x]\n", "tied[0] must be a mapping with fields alias, canonical, optional"),
        ("keep: a\n", "field 'keep' must be a list"),
        ("keep: ['a.{i}']\n", "placeholder 'i' in 'a.{i}' must be typed exactly once"),
        ("keep: ['a.{i:n}.{i:n}']\n", "placeholder 'i' in 'a.{i:n}.{i:n}' must be typed exactly once"),
        ("keep: ['a.{i:x y}']\n", "bad placeholder '{i:x y}'"),
        ("keep: ['a.{i:n[j]}']\n", "bad placeholder '{i:n[j]}'"),
        ("keep: ['a.{p:q||k}']\n", "bad placeholder '{p:q||k}'"),
        ("rename: [{from: 'a.{i:n}', to: 'b.{j}'}]\n", "'b.{j}' may only refer to placeholders of 'a.{i:n}'"),
        ("rename: [{from: 'a.{i:n}', to: 'b.{i:n}'}]\n", "'b.{i:n}' may only refer to placeholders"),
        ("rename: [{from: 'a.{i:n}.{t:w|b}', to: 'b.{i}'}]\n", "'b.{i}' leaves out placeholder 't'"),
        ("keep: [a\n", "not valid YAML"),
        ("description: [1]\n", "field 'description' must be a string"),
    ],
)
def test_bad_yaml_field(tmp_path, body, message):
    exc = error(write_map, tmp_path, body)
    assert message in str(exc) and str(exc).startswith(str(tmp_path / "custom.yaml"))


def test_bad_schema_and_unknown_map(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("schema: ofaconv/keymap@0\nkeep: [a]\n")
    assert "field 'schema' must be 'ofaconv/keymap@1'" in str(error(KeyMap.load, path))
    assert "shipped: " in str(error(KeyMap.load, "ofa_nonexistent")) and "ofa/fairseq" in str(error(KeyMap.load, "x"))


@pytest.mark.parametrize(
    "counts, message",
    [
        ({}, "count 'n' was not given"),
        ({"n": 2, "blocks": 3}, "count 'blocks' must be a list with an entry per 's'"),
        ({"n": -1, "blocks": [1]}, "count 'n' must be a non-negative integer"),
        ({"n": 1, "blocks": [1, "x"]}, "count 'blocks' must be a non-negative integer"),
    ],
)
def test_bad_counts(tmp_path, counts, message):
    keymap = write_map(tmp_path, "keep: ['a.{i:n}', 'layer{s:1..blocks}.{k:blocks[s]}']\n")
    assert message in str(error(keymap.plan, {}, counts))


def test_staged_placeholders_expand_per_stage(tmp_path):
    keymap = write_map(tmp_path, "keep: ['layer{s:1..blocks}.{k:blocks[s]}.{t:w|b}']\n")
    source = {f"layer{s}.{k}.{t}": 0 for s, n in zip((1, 2, 3), (1, 3, 2)) for k in range(n) for t in "wb"}
    assert len(keymap.plan(source, {"blocks": [1, 3, 2]}).entries) == 12
    exc = error(keymap.plan, source, {"blocks": [1, 2, 2]})
    assert exc.key == "layer2.2.b"


# -- collapsed reporting --------------------------------------------------------------------------


def test_collapse_keys():
    assert collapse_keys(f"encoder.layers.{i}.fc1.weight" for i in range(12)) == ["encoder.layers.{0..11}.fc1.weight"]
    assert collapse_keys(["a.0.x", "a.2.x", "a.4.x", "a.5.x", "a.6.x", "b", "a.1.y"]) == [
        "a.{0,2,4..6}.x",
        "a.1.y",
        "b",
    ]
    # blocks per stage differ: never claims layer3.{0..3} exists for every stage
    stages = [f"layer.{s}.{k}.w" for s, n in ((1, 3), (2, 4), (3, 4)) for k in range(n)]
    assert collapse_keys(stages) == ["layer.1.{0..2}.w", "layer.{2,3}.{0..3}.w"]
    assert collapse_keys(["x.1.y.1", "x.2.y.2"]) == ["x.1.y.1", "x.2.y.2"]


def test_summary_lines_collapse_layers():
    plan = KeyMap.load("ofa/fairseq").plan(keys("ofa/fairseq", "large"), COUNTS["large"])
    lines = plan.summary_lines()
    assert lines[0].startswith("key map ofa/fairseq, sha256 ") and "1627 input keys -> 1618 tensors" in lines[0]
    assert "  rename   decoder.layers.{0..11}.encoder_attn.q_proj.weight -> decoder.layers.{0..11}.cross_attn.q_proj.weight" in lines
    assert f"  keep     {sum(s == t for t, s in plan.entries)} keys unchanged" in lines
    assert "  tied     decoder.output_projection.weight = encoder.embed_tokens.weight" in lines
    assert "  drop     encoder.version" in lines
    assert len(lines) < 40
    verbose = plan.summary_lines(verbose=True)
    assert "  keep     encoder.embed_images.layer3.{0..35}.conv2.weight" in verbose
    assert "  keep     encoder.embed_images.layer1.{0..2}.conv2.weight" in verbose


def test_error_listing_is_collapsed_and_bounded():
    source = {k: m for k, m in keys("ofa/fairseq", "huge").items() if not k.endswith(("fc1.weight", "fc2.bias"))}
    exc = error(KeyMap.load("ofa/fairseq").plan, source, COUNTS["huge"])
    assert "72 expected keys missing: " in str(exc)
    for shown in ("encoder.layers.{0..23}.fc1.weight", "decoder.layers.{0..11}.fc2.bias"):
        assert shown in str(exc)
    junk = {f"junk{i}.{j}": 0 for i in range(30) for j in range(3)}
    exc = error(KeyMap.load("ofa/fairseq").plan, {**keys("ofa/fairseq", "micro"), **junk}, COUNTS["micro"])
    assert "90 keys not consumed" in str(exc) and "(and 18 more)" in str(exc) and "junk0.{0..2}" in str(exc)
