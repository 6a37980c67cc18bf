"""The shipped CLIP key maps on synthetic key sets: coverage, bit-exact round trips, fail-closed choice of layout."""

import pytest
import torch

from ofaconv.clip import synth
from ofaconv.clip.architectures import apply_map, load_map
from ofaconv.core.errors import KeyMapError


def cnclip():
    return synth.cnclip_state_dict("ViT-B-16")


def legacy():
    return synth.legacy_bertclip_state_dict(position_ids=False)


def vtde_file():
    return apply_map("clip/bertclip_to_vtde", legacy())


# (map, source state): maps that drop nothing, so the reverse plan restores the source exactly.
ROUND_TRIPS = {
    "clip/cnclip_to_chinese_clip": cnclip,
    "clip/bertclip_to_vtde": legacy,
    "clip/vtde_file": vtde_file,
}


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_round_trip_is_bit_exact(name):
    source = ROUND_TRIPS[name]()
    keymap = load_map(name)
    counts = keymap.infer_counts(source)
    assert counts and all(counts.values())
    out = keymap.plan(source, counts).materialize(source)
    assert keymap.infer_counts(out, reverse=True) == counts
    back = keymap.plan(out, counts, reverse=True).materialize(out)
    assert back.keys() == source.keys()
    assert all(torch.equal(back[k], source[k]) for k in source)


def test_cnclip_qkv_is_split_in_order():
    source = cnclip()
    out = apply_map("clip/cnclip_to_chinese_clip", source)
    fused = source["visual.transformer.resblocks.1.attn.in_proj_weight"]
    w = fused.shape[0] // 3
    for n, part in enumerate("qkv"):
        assert torch.equal(out[f"vision_model.encoder.layers.1.self_attn.{part}_proj.weight"], fused[n * w:(n + 1) * w])
    assert torch.equal(out["visual_projection.weight"], source["visual.proj"].t())


def test_towers_split_the_package_without_leftovers():
    state = vtde_file()
    vision, text = apply_map("clip/vtde_to_vision_tower", state), apply_map("clip/vtde_to_text_tower", state)
    assert set(vision) | {f"text_model.{k}" for k in text} | {"text_projection.weight", "logit_scale"} == \
        {k.replace("vision_model.vision_model.", "vision_model.") for k in state}


def test_the_one_fitting_layout_is_chosen():
    nested = vtde_file()
    flat = {k.replace("vision_model.vision_model.", "vision_model."): v for k, v in nested.items()}
    assert apply_map(("clip/vtde_file", "clip/vtde_module_to_file"), nested).keys() == nested.keys()
    assert apply_map(("clip/vtde_file", "clip/vtde_module_to_file"), flat).keys() == nested.keys()
    with pytest.raises(KeyMapError, match="follows none of the key maps clip/vtde_file, clip/vtde_module_to_file"):
        apply_map(("clip/vtde_file", "clip/vtde_module_to_file"), {**flat, "stray.weight": torch.zeros(1)}, path="x")


def test_unknown_key_and_misshaped_fused_weight_are_errors():
    source = cnclip()
    with pytest.raises(KeyMapError, match="keys not consumed by any rule: visual.extra"):
        apply_map("clip/cnclip_to_chinese_clip", {**source, "visual.extra": torch.zeros(1)}, path="m.pt")
    source["visual.transformer.resblocks.0.attn.in_proj_bias"] = torch.zeros(10)
    with pytest.raises(KeyMapError, match=r"m.pt: key 'visual.transformer.resblocks.0.attn.in_proj_bias': chunk"):
        apply_map("clip/cnclip_to_chinese_clip", source, path="m.pt")
