"""Key-map ops (transpose, chunk, concat) and includes: round trips, inverses, shape and ambiguity errors."""

import pytest
import torch

from ofaconv.core.errors import KeyMapError
from ofaconv.core.keymap import OPS, KeyMap

FUSED = """
convert:
  - {from: 'blocks.{i:n}.in_proj', op: chunk,
     to: ['layers.{i}.q.weight', 'layers.{i}.k.weight', 'layers.{i}.v.weight']}
  - {from: proj, to: head.weight, op: transpose}
  - {from: [a.weight, b.weight], to: ab.weight, op: concat}
keep: [scale]
"""


def write_map(tmp_path, body: str, name: str = "custom") -> KeyMap:
    path = tmp_path / f"{name}.yaml"
    path.write_text("schema: ofaconv/keymap@1\n" + body)
    return KeyMap.load(path)


def error(fn, *args, **kwargs) -> KeyMapError:
    with pytest.raises(KeyMapError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return info.value


def fused_state(n=2, width=4):
    g = torch.Generator().manual_seed(0)
    state = {f"blocks.{i}.in_proj": torch.randn(3 * width, width, generator=g) for i in range(n)}
    state.update(proj=torch.randn(width, 6, generator=g), scale=torch.tensor(4.6),
                 **{"a.weight": torch.randn(2, width, generator=g), "b.weight": torch.randn(2, width, generator=g)})
    return state


def test_ops_declare_each_others_inverse():
    for name, op in OPS.items():
        assert OPS[op.inverse].inverse == name


def test_forward_applies_ops_and_reverse_round_trips_bit_exact(tmp_path):
    keymap, state = write_map(tmp_path, FUSED), fused_state()
    plan = keymap.plan(state, {"n": 2})
    out = plan.materialize(state)
    assert list(out) == plan.targets
    assert torch.equal(out["layers.1.k.weight"], state["blocks.1.in_proj"][4:8])
    assert torch.equal(out["head.weight"], state["proj"].t()) and out["head.weight"].is_contiguous()
    assert torch.equal(out["ab.weight"], torch.cat([state["a.weight"], state["b.weight"]]))
    assert out["scale"] is state["scale"]  # renames are not copied

    back_plan = keymap.plan(out, {"n": 2}, reverse=True)
    assert {c.op for c in back_plan.converted} == {"concat", "transpose", "chunk"}
    back = back_plan.materialize(out)
    assert back.keys() == state.keys()
    for key in state:
        assert back[key].dtype == state[key].dtype and torch.equal(back[key], state[key]), key


def test_plans_are_lazy(tmp_path):
    keymap = write_map(tmp_path, FUSED)
    meta = {k: torch.empty(v.shape, device="meta") for k, v in fused_state().items()}
    plan = keymap.plan(meta, {"n": 2})  # planning needs shapes only
    state = fused_state()
    calls = []
    real = OPS["chunk"].apply
    OPS["chunk"] = OPS["chunk"]._replace(apply=lambda t, n: calls.append(1) or real(t, n))
    try:
        thunks = plan.thunks(state)
        assert not calls and list(thunks) == plan.targets
        assert torch.equal(thunks["layers.0.v.weight"](), state["blocks.0.in_proj"][8:])
        assert calls == [1]
    finally:
        OPS["chunk"] = OPS["chunk"]._replace(apply=real)


def test_rename_refuses_a_plan_with_ops(tmp_path):
    plan = write_map(tmp_path, FUSED).plan(fused_state(), {"n": 2})
    assert "use Plan.materialize" in str(error(plan.rename, fused_state()))


def test_summary_names_the_ops(tmp_path):
    lines = write_map(tmp_path, FUSED).plan(fused_state(), {"n": 2}).summary_lines()
    assert "  chunk    blocks.{0,1}.in_proj -> layers.{0,1}.q.weight, layers.{0,1}.k.weight, layers.{0,1}.v.weight" in lines
    assert "  concat   a.weight, b.weight -> ab.weight" in lines
    assert "2 input keys" not in lines[0] and "6 tensors" not in lines[0]


@pytest.mark.parametrize("key, shape, message", [
    ("proj", (4, 6, 1), "transpose needs a 2-D tensor, got shape (4, 6, 1)"),
    ("blocks.1.in_proj", (10, 4), "chunk: dim 0 of shape (10, 4) does not split into 3 equal parts"),
    ("a.weight", (2, 5), "concat needs equal shapes, got (2, 5), (2, 4)"),
])
def test_shape_errors_name_the_key(tmp_path, key, shape, message):
    state = fused_state()
    state[key] = torch.zeros(shape)
    exc = error(write_map(tmp_path, FUSED).plan, state, {"n": 2}, source_path="ckpt.pt")
    assert exc.key == key and message in str(exc) and str(exc).startswith("ckpt.pt: key")


def test_expected_shapes_are_checked_after_the_op(tmp_path):
    keymap, state = write_map(tmp_path, FUSED), fused_state()
    want = {k: tuple(v.shape) for k, v in keymap.plan(state, {"n": 2}).materialize(state).items()}
    keymap.plan(state, {"n": 2}, expected_shapes=want)
    want["layers.1.q.weight"] = (3, 4)
    exc = error(keymap.plan, state, {"n": 2}, expected_shapes=want)
    assert exc.key == "blocks.1.in_proj" and "(3, 4) expected for 'layers.1.q.weight' after its op" in str(exc)


def test_ops_in_reverse_check_the_inverse_shapes(tmp_path):
    keymap, state = write_map(tmp_path, FUSED), fused_state()
    out = keymap.plan(state, {"n": 2}).materialize(state)
    out["layers.0.k.weight"] = torch.zeros(4, 5)
    exc = error(keymap.plan, out, {"n": 2}, reverse=True)
    assert exc.key == "layers.0.q.weight" and "concat" in str(exc)


def test_partial_group_is_missing(tmp_path):
    state = fused_state()
    del state["b.weight"]
    exc = error(write_map(tmp_path, FUSED).plan, state, {"n": 2})
    assert "1 expected keys missing: b.weight" in str(exc)


@pytest.mark.parametrize("body, message", [
    ("keep: [ab.weight]\nconvert: [{from: [a, b], to: ab.weight, op: concat}]\n", "both produce 'ab.weight'"),
    ("keep: [a]\nconvert: [{from: a, to: [x, y], op: chunk}]\n", "ambiguous rule: claimed by both"),
    ("convert: [{from: 'w.{i:n}', to: 'x.{i}', op: transpose}, {from: w.1, to: y, op: transpose}]\n",
     "ambiguous rule: claimed by both"),
])
def test_ambiguity_is_an_error(tmp_path, body, message):
    state = {k: torch.zeros(2, 2) for k in ("a", "b", "ab.weight", "w.0", "w.1")}
    assert message in str(error(write_map(tmp_path, body).plan, state, {"n": 2}))


@pytest.mark.parametrize("entry, message", [
    ("{from: a, to: b, op: reshape}", "unknown op 'reshape'"),
    ("{from: a, to: [b, c], op: transpose}", "op transpose cannot map 1 sources to 2 targets"),
    ("{from: a, to: b, op: chunk}", "op chunk cannot map 1 sources to 1 targets"),
    ("{from: [a, b], to: [c, d], op: concat}", "op concat cannot map 2 sources to 2 targets"),
    ("{from: a, to: [b, b], op: chunk}", "listed twice"),
    ("{from: a, to: b}", "want fields from, to, op"),
    ("{from: 'a.{i:n}', to: ['b.{i}', 'c'], op: chunk}", "'c' leaves out placeholder 'i'"),
    ("{from: ['a.{i:n}', 'b.{j}'], to: 'c.{i}', op: concat}", "may only refer to placeholders"),
])
def test_malformed_convert_entries(tmp_path, entry, message):
    assert message in str(error(write_map, tmp_path, f"convert: [{entry}]\n"))


def test_dead_op_rule_and_optional_group(tmp_path):
    body = "keep: [k]\nconvert: [{from: [a, b], to: ab, op: concat, optional: OPT}]\n"
    assert "dead rule (matches no key): convert concat" in str(error(write_map(tmp_path, body.replace("OPT", "false")).plan, {"k": 0}, {}))
    plan = write_map(tmp_path, body.replace("OPT", "true")).plan({"k": torch.zeros(1)}, {})
    assert plan.targets == ["k"]


def test_include_with_prefixes_and_drop(tmp_path):
    write_map(tmp_path, FUSED, name="inner")
    outer = write_map(tmp_path, """
include:
  - {map: inner, from_prefix: 'visual.', to_prefix: 'vision.'}
  - {map: inner, from_prefix: 'old.', drop: true, optional: true}
keep: [logit_scale]
""")
    state = {f"visual.{k}": v for k, v in fused_state().items()} | {"logit_scale": torch.tensor(1.0)}
    plan = outer.plan(state, {"n": 2})
    assert "vision.layers.1.v.weight" in plan.targets and "vision.head.weight" in plan.targets
    state["old.proj"] = torch.zeros(3)
    assert outer.plan(state, {"n": 2}).dropped == ["old.proj"]  # optional drops: each key on its own
    state["unknown"] = torch.zeros(3)
    assert "keys not consumed by any rule: unknown" in str(error(outer.plan, state, {"n": 2}))
    del state["unknown"]
    state.update({f"old.{k}": v for k, v in fused_state().items()})
    assert "old.blocks.1.in_proj" in outer.plan(state, {"n": 2}).dropped
    assert outer.sha256 != KeyMap.load(tmp_path / "inner.yaml").sha256


def test_infer_counts(tmp_path):
    keymap = write_map(tmp_path, FUSED)
    state = fused_state(n=3)
    assert keymap.infer_counts(state) == {"n": 3}
    out = keymap.plan(state, {"n": 3}).materialize(state)
    assert keymap.infer_counts(out, reverse=True) == {"n": 3}
    assert keymap.infer_counts({}) == {"n": 0}
