"""Safe loading, flags, config inference, variant detection and bad inputs; rp buckets bit-exact
against the official micro checkpoint; the optimizer state is never paged in."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ofaconv.ofa import variants
from ofaconv.ofa.checkpoint import (
    check_derived_buffers,
    detect_variant,
    infer_config,
    load_checkpoint,
    read_flags,
    validate_state_dict,
)
from ofaconv.core.errors import CheckpointError, OfaconvError
from ofaconv.ofa.reference import buckets
from ofaconv.core.loader import check_finite, load_torch
from ofaconv.ofa.synth import write_synthetic_checkpoint

from badfiles import write_bad_checkpoint

@pytest.fixture(scope="session")
def base_file(tmp_path_factory):
    """A small good checkpoint (ofa-tiny micro, vocab 1000) the bad inputs derive from."""
    path = tmp_path_factory.mktemp("good") / "tiny.pt"
    return write_synthetic_checkpoint(path, "ofa-tiny", vocab_size=1000)


# -- rp buckets ---------------------------------------------------------------------------------


def test_buckets_bit_exact_against_official(official_micro):
    sd = load_checkpoint(official_micro).state_dict
    token = buckets.make_token_bucket_position(256)
    image = buckets.make_image_bucket_position(42, buckets.image_num_relative_distance(42))
    for side in ("encoder", "decoder"):
        assert sd[f"{side}.token_rp_bucket"].dtype == token.dtype == torch.int64
        assert torch.equal(sd[f"{side}.token_rp_bucket"], token)
        assert torch.equal(sd[f"{side}.image_rp_bucket"], image)
    assert torch.equal(sd["decoder.image_position_idx"], buckets.make_image_position_idx())


def test_token_buckets_ignore_default_dtype():
    """The reference tables and the model's own (buckets_ofa, shipped as remote code) alike."""
    from ofaconv.ofa.modeling import buckets_ofa

    expected = buckets.make_token_bucket_position(256)
    assert torch.equal(buckets_ofa.make_token_bucket_position(256), expected)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert torch.equal(buckets.make_token_bucket_position(256), expected)
        assert torch.equal(buckets_ofa.make_token_bucket_position(256), expected)
    finally:
        torch.set_default_dtype(old)
    assert int(expected.min()) == 0 and int(expected.max()) == 510


def test_image_position_idx_lengths():
    fairseq = buckets.make_image_position_idx(42, 128)
    released = buckets.make_image_position_idx(42, 128, length=buckets.RELEASED_IMAGE_POSITION_IDX_LENGTH)
    assert fairseq.shape == (1026,) and released.shape == (1025,)
    assert torch.equal(fairseq[:1025], released)
    assert fairseq[:3].tolist() == [0, 1, 2] and int(fairseq[17]) == 43  # second row of the 16-grid
    assert int(fairseq[-1]) == 1024
    with pytest.raises(ValueError):
        buckets.make_image_position_idx(42, 128, length=100)


# -- the official micro -------------------------------------------------------------------------


def test_official_micro(official_micro):
    ckpt = load_checkpoint(official_micro)
    assert ckpt.layout == "cfg" and ckpt.mmapped
    assert not ckpt.has_optimizer_state and not ckpt.has_ema
    flags = read_flags(ckpt)
    json.dumps(flags)
    expected = {"arch": "ofa_tiny", "task": "caption", "disable_entangle": True, "entangle_position_embedding": False,
                "attn_scale_factor": 2, "no_scale_embedding": True, "interpolate_position": False,
                "orig_patch_image_size": 256, "patch_image_size": 256, "max_src_length": 80, "max_tgt_length": 20,
                "bpe": "gpt2", "scale_attn": True, "scale_heads": True, "activation_fn": "gelu", "fp16": True,
                "token_bucket_size": 256, "image_bucket_size": 42}
    assert {k: flags[k] for k in expected} == expected
    assert "interpolate_position" in flags["_defaulted"] and "bpe" in flags["_defaulted"]
    assert "disable_entangle" not in flags["_defaulted"]

    config = infer_config(ckpt.state_dict)
    assert config == {
        "vocab_size": 1000, "d_model": 64, "encoder_ffn_dim": 256, "decoder_ffn_dim": 256,
        "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_layers": 2, "decoder_layers": 2,
        "token_bucket_size": 256, "image_bucket_size": 42, "max_source_positions": 1024,
        "max_target_positions": 1024, "image_position_idx_length": 1026, "resnet_layers": [2, 2, 2],
        "resnet_type": "resnet18", "layernorm_embedding": True, "patch_layernorm_embedding": True,
        "code_layernorm_embedding": True, "add_type_embedding": True, "encoder_normalize_before": True,
        "decoder_normalize_before": True, "scale_attn": True, "scale_fc": True, "scale_heads": True,
        "scale_resids": False, "share_all_embeddings": True, "share_decoder_input_output_embed": True,
        "bn_tracks_batches": True,
    }
    check_derived_buffers(ckpt.state_dict, config)
    # vocab 1000 names no family; the (defaulted) gpt2 bpe does.
    assert detect_variant(config, flags) == ("ofa-tiny", "en")


def test_flags_never_carry_machine_paths(base_file):
    flags = read_flags(load_checkpoint(base_file))
    for value in flags.values():
        if isinstance(value, str):
            assert "/" not in value, value
    assert load_checkpoint(base_file).task_args["bpe_dir"].startswith("/")  # the raw args do carry them


# -- bad inputs ---------------------------------------------------------------------------------

LOAD_TIME = ["empty", "random_bytes", "truncated", "zip_not_torch", "malicious_pickle", "malicious_legacy", "not_ofa",
             "no_model",
             "no_args", "text_only_fairseq", "expanded_weight"]
SHAPE_TIME = ["missing_key", "missing_layer", "extra_key", "misshaped_key"]


@pytest.mark.parametrize("kind", LOAD_TIME)
def test_unloadable_inputs_name_the_file(kind, base_file, tmp_path):
    bad = write_bad_checkpoint(tmp_path / f"{kind}.pt", kind, base=base_file)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad.path)
    message = str(info.value)
    assert str(bad.path) in message and "\n" not in message
    assert info.value.path == bad.path
    if bad.marker is not None:
        assert not bad.marker.exists()


@pytest.mark.parametrize("kind", SHAPE_TIME)
def test_key_level_inputs_name_file_and_key(kind, base_file, tmp_path):
    bad = write_bad_checkpoint(tmp_path / f"{kind}.pt", kind, base=base_file)
    ckpt = load_checkpoint(bad.path)
    with pytest.raises(CheckpointError) as info:
        infer_config(ckpt.state_dict)  # the state dict remembers its file
    message = str(info.value)
    assert str(bad.path) in message and bad.key in message and "\n" not in message


@pytest.mark.parametrize("kind", ["nan_weight", "inf_weight"])
def test_non_finite_weight_named(kind, base_file, tmp_path):
    bad = write_bad_checkpoint(tmp_path / f"{kind}.pt", kind, base=base_file)
    ckpt = load_checkpoint(bad.path)
    infer_config(ckpt.state_dict)  # shapes are fine
    with pytest.raises(CheckpointError) as info:
        check_finite(ckpt.state_dict, path=ckpt.path)
    assert info.value.key == bad.key and str(bad.path) in str(info.value)


@pytest.mark.parametrize("kind", ["malicious_pickle", "malicious_legacy"])
def test_malicious_pickle_payload_never_runs(kind, tmp_path):
    """The payload is real (an unsafe unpickle in a child process runs it), and ofaconv refuses it."""
    armed = write_bad_checkpoint(tmp_path / "armed.pt", kind, marker=tmp_path / "armed-ran")
    code = f"import torch; torch.load({str(armed.path)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, timeout=120)
    assert armed.marker.exists(), "control: the payload should run under an unsafe load"

    bad = write_bad_checkpoint(tmp_path / "evil.pt", kind, marker=tmp_path / "evil-ran")
    with pytest.raises(CheckpointError, match=r"exec\b") as info:
        load_checkpoint(bad.path)
    assert "refusing to unpickle" in str(info.value) and "never falls back" in str(info.value)
    assert not bad.marker.exists()


def test_global_outside_allow_list_is_listed(tmp_path):
    path = tmp_path / "date.pt"
    torch.save({"model": {}, "args": None, "when": datetime.date(2022, 1, 1)}, path)
    with pytest.raises(CheckpointError, match="datetime.date"):
        load_checkpoint(path)


def test_numpy_objects_are_data(base_file, tmp_path):
    """numpy scalars / dtypes / arrays (fairseq meters, CIDEr 'best') load; the synthetic file has them."""
    raw, _ = load_torch(base_file)
    assert isinstance(raw["extra_state"]["best"], np.floating)
    raw["extra_state"]["val_array"] = np.arange(3, dtype=np.float32)
    raw["extra_state"]["dtype"] = np.dtype("int64")
    path = tmp_path / "numpy.pt"
    torch.save(raw, path)
    assert load_checkpoint(path).has_optimizer_state


def test_legacy_torch_format_loads_without_mmap(base_file, tmp_path):
    legacy = write_bad_checkpoint(tmp_path / "legacy.pt", "legacy_torch_format", base=base_file)
    with open(legacy.path, "rb") as f:
        assert f.read(2) == b"\x80\x02"
    ckpt = load_checkpoint(legacy.path)
    assert not ckpt.mmapped
    assert detect_variant(infer_config(ckpt.state_dict), read_flags(ckpt)) == ("ofa-tiny", "en")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_ema_requested_but_absent(base_file):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(base_file, ema=True)
    assert info.value.key == "extra_state.ema" and str(base_file) in str(info.value)


# -- config inference -----------------------------------------------------------------------------


def _state(base_file) -> dict:
    return dict(load_checkpoint(base_file).state_dict)


def test_layer_gap_is_named(base_file):
    sd = {k: v for k, v in _state(base_file).items() if not k.startswith("encoder.layers.0.")}
    with pytest.raises(CheckpointError, match="layer 0 is missing while layer 1 exists") as info:
        infer_config(sd, path="x.pt")
    assert info.value.key == "encoder.layers.0" and info.value.path == "x.pt"


def test_heads_must_divide_d_model(base_file):
    sd = _state(base_file)
    sd["encoder.token_rel_pos_table_list.0.weight"] = torch.zeros(511, 5)
    sd["encoder.layers.0.self_attn.c_attn"] = torch.ones(5)
    with pytest.raises(CheckpointError, match="5 heads do not divide d_model 64"):
        infer_config(sd)


def test_heads_must_agree_with_c_attn(base_file):
    sd = _state(base_file)
    sd["encoder.layers.0.self_attn.c_attn"] = torch.ones(8)
    with pytest.raises(CheckpointError, match="c_attn"):
        infer_config(sd)


def test_vit_trunk_is_refused(base_file):
    sd = {k: v for k, v in _state(base_file).items() if ".layer3." not in k}
    with pytest.raises(CheckpointError, match="ViT"):
        infer_config(sd)


def test_validate_allows_declared_extras(base_file):
    sd = _state(base_file)
    config = infer_config(sd)
    sd["classification_heads.vqa.dense.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointError, match="unexpected key"):
        validate_state_dict(sd, config)
    validate_state_dict(sd, config, allow_extra_prefixes=("classification_heads.",))


def test_wrong_dtype_class_is_named(base_file):
    sd = _state(base_file)
    sd["encoder.token_rp_bucket"] = sd["encoder.token_rp_bucket"].float()
    with pytest.raises(CheckpointError, match="int64") as info:
        infer_config(sd)
    assert info.value.key == "encoder.token_rp_bucket"


def test_untied_embeddings_are_reported(base_file):
    sd = _state(base_file)
    sd["decoder.embed_tokens.weight"] = sd["decoder.embed_tokens.weight"].clone()
    sd["decoder.output_projection.weight"] = sd["decoder.embed_tokens.weight"]
    config = infer_config(sd)
    assert config["share_all_embeddings"] is False and config["share_decoder_input_output_embed"] is True


def test_derived_buffer_mismatch_is_named(base_file):
    sd = _state(base_file)
    config = infer_config(sd)
    sd["decoder.token_rp_bucket"] = sd["decoder.token_rp_bucket"].clone()
    sd["decoder.token_rp_bucket"][0, 5] += 1
    with pytest.raises(CheckpointError) as info:
        check_derived_buffers(sd, config)
    assert info.value.key == "decoder.token_rp_bucket"


# -- variant detection ----------------------------------------------------------------------------


def _config_from_shape(shape: dict) -> dict:
    return {"vocab_size": shape["vocab_size"], "d_model": shape["d_model"], "encoder_ffn_dim": shape["ffn_dim"],
            "decoder_ffn_dim": shape["ffn_dim"], "encoder_layers": shape["encoder_layers"],
            "decoder_layers": shape["decoder_layers"], "encoder_attention_heads": shape["heads"],
            "decoder_attention_heads": shape["heads"], "resnet_layers": shape["resnet_layers"]}


@pytest.mark.parametrize("variant", variants.variant_names())
@pytest.mark.parametrize("size", variants.SIZES)
def test_detect_variant_every_size(variant, size):
    shape = variants.shape_config(variant, size)
    assert detect_variant(_config_from_shape(shape), {"bpe": shape["bpe"]}) == (variant, shape["family"])


def test_detect_variant_unknown_and_family_by_bpe():
    shape = variants.shape_config("ofa-base", "full")
    odd = dict(_config_from_shape(shape), decoder_layers=5)
    assert detect_variant(odd, {"bpe": "gpt2"}) == (None, None)
    cn = dict(_config_from_shape(variants.shape_config("ofa-cn-base", "micro")), vocab_size=1234)
    assert detect_variant(cn, {"bpe": "bert"}) == ("ofa-cn-base", "cn")
    assert detect_variant(cn, {"bpe": "gpt2"}) == ("ofa-tiny", "en")  # same micro dims, other family


def test_variants_table():
    names = variants.variant_names()
    assert {"ofa-tiny", "ofa-medium", "ofa-base", "ofa-large", "ofa-huge", "ofa-cn-base", "ofa-cn-large"} <= set(names)
    assert variants.family("ofa-cn-large") == "cn" and variants.family_info("en")["vocab_size"] == 59457
    assert variants.resnet_type_for_layers([3, 4, 6]) == "resnet50"
    assert variants.resnet_type_for_layers([1, 1, 1]) is None
    huge = variants.shape_config("ofa-huge", "full")
    assert (huge["encoder_layers"], huge["decoder_layers"], huge["interpolate_position"]) == (24, 12, True)
    assert variants.generation_defaults("ofa-huge")["num_beams"] == 10
    with pytest.raises(OfaconvError, match="unknown OFA variant"):
        variants.get_variant("ofa-xl")
    with pytest.raises(OfaconvError, match="unknown size"):
        variants.shape_config("ofa-base", "medium")
    variants.load_variants()["variants"].clear()  # a copy: the table itself is untouched
    assert variants.variant_names() == names


# -- memory mapping -------------------------------------------------------------------------------

def _mapped_rss(path: Path) -> int:
    """Bytes of ``path`` resident in this process's mappings (from /proc/self/smaps)."""
    target, total, inside = os.path.realpath(path), 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:
                inside = line.rstrip().endswith(target)
            elif inside and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_optimizer_and_ema_pages_are_never_read(tmp_path):
    """Reading every model tensor pages in the model's bytes of the file and nothing of the Adam
    moments or the EMA copy (together ~2x the model here)."""
    path = write_synthetic_checkpoint(tmp_path / "big.pt", "ofa-tiny", vocab_size=100_000, ema=True)
    ckpt = load_checkpoint(path)
    assert ckpt.has_optimizer_state and ckpt.has_ema
    assert _mapped_rss(path) < 4 << 20
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ckpt.state_dict.values()}
    state_bytes = sum(storages.values())
    for tensor in ckpt.state_dict.values():
        tensor.sum()  # what a converter does: read every model tensor
    assert _mapped_rss(path) <= state_bytes + (4 << 20)
    assert path.stat().st_size > 2.5 * state_bytes
