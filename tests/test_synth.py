"""Synthetic checkpoints: exact fairseq trainer format (keys, order, shapes, buffers, ties, args),
perturbed values, determinism, options (layout, dtype, EMA, optimizer, flags) and the CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch

from ofaconv.ofa import variants
from ofaconv.core.loader import check_finite, load_torch
from ofaconv.ofa.checkpoint import (
    check_derived_buffers,
    detect_variant,
    infer_config,
    load_checkpoint,
    read_flags,
)
from ofaconv.cli import main as cli
from ofaconv.core.errors import OfaconvError
from ofaconv.ofa.synth import synthetic_checkpoint_dict, synthetic_key_spec, write_synthetic_checkpoint

KEY_LISTS = Path(__file__).resolve().parents[1] / "fixtures" / "keys"

# sha256 of the fairseq key lists ("name<TAB>shape<TAB>dtype" lines) measured on the real
# OFA code at full size (research/keys/fairseq_ofa_*.txt), so the test needs no shared files.
FULL_SIZE_KEYS = {
    "ofa-base": (967, "391901ecc097f5c4d5c4b2bdfd59abbaa1421ebc6b2a80078a726ca3665ce290"),
    "ofa-large": (1627, "86e466881b1984d78d1360d7aa3e6c17fd6574eaa39aa2ab991a940f80db50f0"),
    "ofa-huge": (1903, "c8d2b09f99da65754613983f3d8dc223aeb80c707133eaa3c2153cb45032e562"),
}
OFFICIAL_MICRO_KEYS = (299, "99e1f029db908cdf1873ae08f6b8e1388a600cfcad6d513781389ae0b7011821")


def _key_lines(spec) -> list[str]:
    return [
        f"{s.name}\t{','.join(map(str, s.shape))}\t{'int64' if s.is_integer else 'float32'}" for s in spec.values()
    ]


def _digest(lines) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _plain_load(path):
    return load_torch(path)[0]


@pytest.fixture(scope="session")
def micro_files(tmp_path_factory):
    """One micro checkpoint per variant (no optimizer state: keeps the suite fast)."""
    root = tmp_path_factory.mktemp("synth_micro")
    made = {}

    def get(variant):
        if variant not in made:
            made[variant] = write_synthetic_checkpoint(root / f"{variant}.pt", variant, optimizer_state=False)
        return made[variant]

    return get


# -- format -------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(FULL_SIZE_KEYS))
def test_full_size_keys_match_real_fairseq(variant):
    lines = _key_lines(synthetic_key_spec(variant, size="full"))
    count, digest = FULL_SIZE_KEYS[variant]
    assert len(lines) == count
    listing = KEY_LISTS / f"fairseq_{variant.replace('-', '_')}.txt"
    if listing.exists():  # readable diff when the research notes are at hand
        assert lines == listing.read_text().splitlines()
    assert _digest(lines) == digest


def test_cn_full_size_has_same_keys_with_cn_vocab():
    en = synthetic_key_spec("ofa-base", size="full")
    cn = synthetic_key_spec("ofa-cn-base", size="full")
    assert list(en) == list(cn)
    assert cn["encoder.embed_tokens.weight"].shape == (30325, 768)


def test_micro_matches_official_trainer_file(official_micro, tmp_path):
    """ofa-tiny micro with the official vocabulary size: same keys, order, shapes, dtypes,
    top-level layout and Namespace fields as the file the official code wrote."""
    lines = _key_lines(synthetic_key_spec("ofa-tiny", size="micro", vocab_size=1000))
    assert (len(lines), _digest(lines)) == OFFICIAL_MICRO_KEYS

    ours_path = write_synthetic_checkpoint(tmp_path / "tiny.pt", "ofa-tiny", vocab_size=1000, optimizer_state=False)
    ours, official = _plain_load(ours_path), _plain_load(official_micro)
    assert list(ours) == list(official)
    assert [(k, tuple(v.shape), v.dtype) for k, v in ours["model"].items()] == [
        (k, tuple(v.shape), v.dtype) for k, v in official["model"].items()
    ]
    for name in ("encoder.token_rp_bucket", "encoder.image_rp_bucket", "decoder.token_rp_bucket",
                 "decoder.image_rp_bucket", "decoder.image_position_idx", "encoder.version", "decoder.version"):
        assert torch.equal(ours["model"][name], official["model"][name]), name
    assert ours["args"] is None and isinstance(ours["cfg"]["model"], argparse.Namespace)
    assert set(vars(ours["cfg"]["model"])) == set(vars(official["cfg"]["model"]))
    for key in ("common", "model", "task", "criterion", "optimizer", "lr_scheduler"):
        assert key in ours["cfg"]
    assert set(official["cfg"]["task"]) <= set(ours["cfg"]["task"])
    assert ours["criterion"] is None and ours["task_state"] == {}
    assert set(official["optimizer_history"][0]) == set(ours["optimizer_history"][0])
    assert {"metrics", "previous_training_time"} <= set(ours["extra_state"])


@pytest.mark.parametrize("variant", variants.variant_names())
def test_micro_variant_roundtrip(variant, micro_files):
    ckpt = load_checkpoint(micro_files(variant))
    shape = variants.shape_config(variant, "micro")
    config = infer_config(ckpt.state_dict)
    flags = read_flags(ckpt)

    assert ckpt.layout == "cfg" and not ckpt.has_optimizer_state and not ckpt.has_ema
    assert detect_variant(config, flags) == (variant, shape["family"])
    assert config["vocab_size"] == shape["vocab_size"]
    assert (config["d_model"], config["encoder_ffn_dim"], config["encoder_layers"], config["decoder_layers"],
            config["encoder_attention_heads"], config["resnet_layers"]) == (
        shape["d_model"], shape["ffn_dim"], shape["encoder_layers"], shape["decoder_layers"], shape["heads"],
        shape["resnet_layers"])
    assert config["image_position_idx_length"] == 1026
    check_derived_buffers(ckpt.state_dict, config)
    assert flags["patch_image_size"] == shape["patch_image_size"]
    assert flags["interpolate_position"] is shape["interpolate_position"]
    assert flags["orig_patch_image_size"] == shape["orig_patch_image_size"]
    assert flags["bpe"] == shape["bpe"] and flags["task"] == "caption" and flags["disable_entangle"] is True
    assert flags["arch"] == shape["arch"]


@pytest.mark.parametrize("variant", ["ofa-base", "ofa-huge"])
def test_every_tensor_is_perturbed(variant, micro_files):
    sd = load_checkpoint(micro_files(variant)).state_dict
    embed = sd["encoder.embed_tokens.weight"]
    assert embed.data_ptr() == sd["decoder.embed_tokens.weight"].data_ptr() == sd["decoder.output_projection.weight"].data_ptr()
    assert torch.count_nonzero(embed[1]) == 0  # <pad> row stays zero, as in trained fairseq models
    check_finite(sd)
    for name, t in sd.items():
        if name.endswith((".version", "_rp_bucket", "image_position_idx", "num_batches_tracked")):
            continue
        assert t.numel() == 1 or t.std() > 0, name
        if name.endswith("c_attn") or (("layer_norm" in name or "layernorm" in name or "_ln." in name or ".bn" in name
                                         or "downsample.1" in name) and name.endswith(".weight")):
            assert not torch.allclose(t, torch.ones_like(t)), name
        if name.endswith("running_var"):
            assert (t > 0).all() and not torch.allclose(t, torch.ones_like(t)), name
        if name.endswith("running_mean") or name.endswith(".bias"):
            assert not torch.allclose(t, torch.zeros_like(t)), name
    assert int(sd["encoder.embed_images.bn1.num_batches_tracked"]) > 0
    # Activations stay sane: logits-like products of the tied embedding spread between tokens.
    hidden = torch.randn(4, embed.shape[1], generator=torch.Generator().manual_seed(0))
    logits = hidden @ embed.T
    assert 0.1 < float(logits.std()) < 5.0


def test_deterministic_and_seeded(tmp_path):
    kw = dict(vocab_size=1000, optimizer_state=False)
    a = write_synthetic_checkpoint(tmp_path / "a.pt", "ofa-large", seed=3, **kw)
    b = write_synthetic_checkpoint(tmp_path / "b.pt", "ofa-large", seed=3, **kw)
    assert a.read_bytes() == b.read_bytes()
    sa = load_checkpoint(a).state_dict
    other = synthetic_checkpoint_dict("ofa-large", seed=4, **kw)["model"]
    assert not torch.equal(sa["decoder.layers.2.fc1.weight"], other["decoder.layers.2.fc1.weight"])
    # Values depend on (seed, key) only: the legacy layout and fp16 carry the same weights.
    legacy = synthetic_checkpoint_dict("ofa-large", seed=3, layout_name="args", dtype=torch.float16, **kw)["model"]
    key = "encoder.layers.1.attn_ln.weight"
    assert torch.equal(legacy[key], sa[key].half())


# -- options ------------------------------------------------------------------------------------


def test_optimizer_state_is_real_looking_adam(tmp_path):
    path = write_synthetic_checkpoint(tmp_path / "opt.pt", "ofa-tiny", vocab_size=1000)
    raw = _plain_load(path)
    opt = raw["last_optimizer_state"]
    params = [s for s in synthetic_key_spec("ofa-tiny", vocab_size=1000).values() if s.tie is None and not s.is_buffer]
    assert len(opt["state"]) == len(params) == len(opt["param_groups"][0]["params"])
    for i, spec in enumerate(params):
        entry = opt["state"][i]
        assert entry["exp_avg"].shape == spec.shape and entry["exp_avg"].dtype == torch.float32
        assert (entry["exp_avg_sq"] > 0).all()
    assert {"lr", "betas", "eps", "weight_decay"} <= set(opt["param_groups"][0])
    weight_bytes = sum(t.numel() * t.element_size() for k, t in raw["model"].items()
                       if t.is_floating_point() and k != "decoder.embed_tokens.weight" and k != "decoder.output_projection.weight")
    moment_bytes = sum(e["exp_avg"].nbytes + e["exp_avg_sq"].nbytes for e in opt["state"].values())
    assert 1.9 < moment_bytes / weight_bytes < 2.1
    assert load_checkpoint(path).has_optimizer_state


def test_fp16(tmp_path):
    ckpt = load_checkpoint(write_synthetic_checkpoint(tmp_path / "h.pt", "ofa-medium", dtype=torch.float16,
                                                      optimizer_state=False, vocab_size=1000))
    sd = ckpt.state_dict
    assert sd["encoder.layers.0.fc1.weight"].dtype == torch.float16
    assert sd["encoder.embed_images.bn1.running_var"].dtype == torch.float16
    assert sd["encoder.token_rp_bucket"].dtype == torch.int64
    assert sd["encoder.embed_images.bn1.num_batches_tracked"].dtype == torch.int64
    assert infer_config(sd)["encoder_attention_heads"] == 2


def test_legacy_args_layout(tmp_path):
    path = write_synthetic_checkpoint(tmp_path / "legacy.pt", "ofa-cn-large", layout="args", optimizer_state=False)
    raw = _plain_load(path)
    assert "cfg" not in raw and isinstance(raw["args"], argparse.Namespace)
    ckpt = load_checkpoint(path)
    flags = read_flags(ckpt)
    assert ckpt.layout == "args"
    assert (flags["task"], flags["bpe"], flags["patch_image_size"]) == ("caption", "bert", 128)
    assert detect_variant(infer_config(ckpt.state_dict), flags) == ("ofa-cn-large", "cn")


def test_ema(tmp_path):
    path = write_synthetic_checkpoint(tmp_path / "ema.pt", "ofa-tiny", ema=True, optimizer_state=False, vocab_size=1000)
    plain, ema = load_checkpoint(path), load_checkpoint(path, ema=True)
    assert plain.has_ema and ema.from_ema and not plain.from_ema
    key = "decoder.layers.1.fc2.weight"
    diff = (plain.state_dict[key] - ema.state_dict[key]).abs().max()
    assert 0 < diff < 0.01
    assert torch.equal(plain.state_dict["encoder.token_rp_bucket"], ema.state_dict["encoder.token_rp_bucket"])
    e = ema.state_dict
    assert e["encoder.embed_tokens.weight"].data_ptr() == e["decoder.output_projection.weight"].data_ptr()
    infer_config(e)


def test_flag_overrides(tmp_path):
    flags = {"disable_entangle": False, "patch_image_size": 256, "attn_scale_factor": 4, "scale_attn": False,
             "max_src_length": 64}
    ckpt = load_checkpoint(write_synthetic_checkpoint(tmp_path / "f.pt", "ofa-tiny", flags=flags,
                                                      optimizer_state=False, vocab_size=1000))
    read = read_flags(ckpt)
    for name, value in flags.items():
        assert read[name] == value, name
    config = infer_config(ckpt.state_dict)
    assert config["scale_attn"] is False and config["scale_fc"] is True
    assert "encoder.layers.0.attn_ln.weight" not in ckpt.state_dict
    assert "decoder.layers.0.self_attn_ln.weight" not in ckpt.state_dict


def test_structural_flags_change_keys():
    spec = synthetic_key_spec("ofa-tiny", flags={"scale_heads": False, "freeze_resnet": True, "scale_resids": True,
                                                 "share_all_embeddings": False})
    names = list(spec)
    assert not any(n.endswith("c_attn") for n in names)
    assert not any(n.endswith("num_batches_tracked") for n in names)
    assert "encoder.layers.0.w_resid" in names
    assert spec["decoder.embed_tokens.weight"].tie is None
    assert spec["decoder.output_projection.weight"].tie == "decoder.embed_tokens.weight"


def test_unknown_flag_and_variant_are_one_line_errors(tmp_path):
    with pytest.raises(OfaconvError, match="unknown flag 'not_a_flag'"):
        write_synthetic_checkpoint(tmp_path / "x.pt", "ofa-tiny", flags={"not_a_flag": 1})
    with pytest.raises(OfaconvError, match="unknown OFA variant 'ofa-gigantic'"):
        write_synthetic_checkpoint(tmp_path / "x.pt", "ofa-gigantic")
    with pytest.raises(OfaconvError, match="does not exist"):
        write_synthetic_checkpoint(tmp_path / "missing" / "x.pt", "ofa-tiny")
    assert not list(tmp_path.iterdir())


# -- CLI ----------------------------------------------------------------------------------------


def test_cli_list(capsys):
    assert cli(["synth", "--list"]) == 0
    out = capsys.readouterr().out
    for name in variants.variant_names():
        assert name in out


def test_cli_write(tmp_path, capsys):
    out = tmp_path / "cli.pt"
    code = cli(["synth", "ofa-huge", str(out), "--no-optimizer", "--fp16", "--legacy-args", "--ema", "--seed", "5",
                "--vocab-size", "1000", "--set", "disable_entangle=false", "--set", "patch_image_size=160"])
    assert code == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    ckpt = load_checkpoint(out)
    flags = read_flags(ckpt)
    assert ckpt.layout == "args" and ckpt.has_ema and not ckpt.has_optimizer_state
    assert flags["disable_entangle"] is False and flags["patch_image_size"] == 160 and flags["interpolate_position"]
    assert ckpt.state_dict["encoder.layers.3.fc1.weight"].dtype == torch.float16
    json.dumps(flags)


@pytest.mark.parametrize("argv,message", [
    (["synth", "ofa-nope", "x.pt"], "unknown OFA variant"),
    (["synth", "ofa-tiny", "x.pt", "--set", "novalue"], "--set expects flag=value"),
    (["synth", "ofa-tiny"], "usage"),
])
def test_cli_errors(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ofaconv: error:") and message in err
    assert not list(tmp_path.iterdir())
