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
    assert {"structure", "tensors", "decoder_logits", "greedy", "beam5"} <= names
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
