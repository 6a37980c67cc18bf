"""``ofaconv upgrade OLD_FOLDER OUT/``: a folder published for the old OFA ports (OFA-Sys HF port,
OFA-Compress, OFA-Chinese, ModelScope: ``pytorch_model.bin`` or safetensors with persistent
rp-bucket tables) becomes an ofaconv folder (safetensors, processor, card, report).

The port's weights are checked against ``mappings/ofa_hf_port.yaml`` (every key accounted for,
derived tables equal to ours), then renamed back to fairseq names with ``ofa_fairseq.yaml`` in
reverse, so the same converter and the same independent fairseq reference verify the result.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .checkpoint import FairseqCheckpoint, check_image_size
from ofaconv.core.errors import OfaconvError
from ofaconv.core.keymap import KeyMap
from ofaconv.core.loader import load_safetensors, load_state_dict_file, read_sharded

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def load_port_weights(folder: Path) -> tuple[dict, Path]:
    """The port's state dict (single file or sharded index) and the file that identifies it."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.exists():
            continue
        if name.endswith(".index.json"):
            return read_sharded(path), path
        return (load_safetensors(path) if name.endswith(".safetensors") else load_state_dict_file(path)), path
    raise OfaconvError(f"no weights found (looked for {', '.join(WEIGHT_FILES)})", path=folder)


def port_model_args(old: dict, image_size: int | None, config_path=None) -> dict:
    """fairseq-style arguments equivalent to an old port's config.json.

    The old ports never add target positions to decoder token embeddings (disable_entangle) and
    have no image-position interpolation, so those are fixed by what the ports compute.
    """
    bucket = old.get("image_bucket_size", 42)
    bucket = bucket if isinstance(bucket, int) and not isinstance(bucket, bool) and bucket > 0 else 42
    if image_size is not None:
        size = check_image_size(image_size, image_bucket_size=bucket, path="--image-size")
    else:
        size = check_image_size(old.get("patch_image_size", 256), image_bucket_size=bucket, path=config_path,
                                key="patch_image_size")
    normformer = bool(old.get("normformer", True))
    return {
        "scale_attn": normformer,
        "scale_fc": normformer,
        "scale_heads": normformer,
        **{name: bool(old.get(name, True)) for name in (
            "encoder_normalize_before", "decoder_normalize_before", "layernorm_embedding",
            "patch_layernorm_embedding", "code_layernorm_embedding", "add_type_embedding",
            "share_decoder_input_output_embed")},
        "share_all_embeddings": True,
        "max_source_positions": int(old.get("max_position_embeddings", 1024)),
        "max_target_positions": int(old.get("max_position_embeddings", 1024)),
        "resnet_type": old.get("resnet_type"),
        "attn_scale_factor": float(old.get("attn_scale_factor", 2.0)),
        "no_scale_embedding": not old.get("scale_embedding", False),
        "disable_entangle": True,
        "entangle_position_embedding": bool(old.get("entangle_position_embedding", False)),
        "interpolate_position": False,
        "orig_patch_image_size": int(old.get("orig_patch_image_size", 256)),
        "patch_image_size": int(size),
        "token_bucket_size": int(old.get("token_bucket_size", 256)),
        "image_bucket_size": int(old.get("image_bucket_size", 42)),
        "code_image_size": int(old.get("code_image_size", 128)),
        "arch": old.get("_name_or_path") or "hf-port",
    }


def open_port_folder(folder, *, image_size: int | None = None) -> FairseqCheckpoint:
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise OfaconvError("not a model folder (no config.json)", path=folder)
    try:
        old = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, or nested too deeply
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise OfaconvError(f"not valid JSON ({detail}); restore the folder's config.json", path=config_path) from None
    except OSError as exc:
        raise OfaconvError(f"cannot read config.json ({exc.strerror})", path=config_path) from None
    if not isinstance(old, dict):
        raise OfaconvError(f"not a JSON object but {type(old).__name__}", path=config_path)
    if old.get("model_type") != "ofa":
        raise OfaconvError(f"model_type is {old.get('model_type')!r}, not 'ofa': not a folder of an old OFA port",
                           path=config_path, key="model_type")
    try:
        args = port_model_args(old, image_size, config_path)
    except (TypeError, ValueError) as exc:
        raise OfaconvError(f"a setting has the wrong type ({exc}); restore the folder's config.json",
                           path=config_path) from None
    state, weights = load_port_weights(folder)
    from .modeling.configuration_ofa import RESNET_LAYERS

    resnet = old.get("resnet_layers") or RESNET_LAYERS.get(old.get("resnet_type", "resnet101"))
    counts = {
        "encoder_layers": int(old.get("encoder_layers", 4)),
        "decoder_layers": int(old.get("decoder_layers", 4)),
        "resnet_layers": list(resnet),
    }
    KeyMap.load("ofa/hf_port").plan(state, counts, source_path=weights)  # fail closed on the port layout
    back = KeyMap.load("ofa/fairseq").plan(state, counts, source_path=weights, reverse=True)
    fairseq_state = {fairseq: state[port] for fairseq, port in back.entries}
    for name in list(back.derived):  # buffers keep their names in both layouts
        if name in state:
            fairseq_state[name] = state[name]
    for name in back.dropped:  # fairseq bookkeeping the ports never stored (version = 3)
        fairseq_state[name] = torch.tensor([3.0])
    embed = fairseq_state["encoder.embed_tokens.weight"]
    for alias in ("decoder.embed_tokens.weight", "decoder.output_projection.weight"):
        fairseq_state[alias] = state.get(alias, embed)
    return FairseqCheckpoint(
        path=weights,
        state_dict=fairseq_state,
        model_args=args,
        task_args={"patch_image_size": args["patch_image_size"]},
        layout="hf-port",
        has_optimizer_state=False,
        has_ema=False,
    )


def upgrade_folder(old_folder, out_dir, *, image_size: int | None = None, **options):
    from ofaconv.core.writer import check_output

    from .convert import convert_loaded

    check_output(out_dir, force=options.get("force", False), protect=[old_folder])
    ckpt = open_port_folder(old_folder, image_size=image_size)
    return convert_loaded(ckpt, out_dir, kind="upgrade", protect=[old_folder], **options)


def add_parser(sub) -> None:
    p = sub.add_parser("upgrade", help="turn a folder made for the old OFA ports into an ofaconv folder")
    p.add_argument("old_folder", help="OFA-Sys / OFA-Chinese / ModelScope style folder (pytorch_model.bin)")
    p.add_argument("out")
    p.add_argument("--image-size", type=int, help="processor resolution (default: config, else 256)")
    p.add_argument("--verify", action="store_true", help="run the parity checker on the result")
    p.add_argument("--force", action="store_true")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--tokenizer", help="vocabulary files (default: shipped)")
    p.add_argument("--prompt")
    p.set_defaults(func=_run)


def _run(args) -> int:
    result = upgrade_folder(
        args.old_folder, args.out, image_size=args.image_size, verify=args.verify, force=args.force,
        dtype=args.dtype, tokenizer=args.tokenizer, prompt=args.prompt,
    )
    print(f"wrote {result.out_dir} (variant {result.report['variant'] or 'unknown'})")
    for line in result.lines:
        print(line)
    if not result.passed:
        failed = ", ".join(c["name"] for c in result.report["checks"] if not c["passed"])
        print(f"ofaconv: error: verification failed ({failed}); see {result.out_dir}/conversion_report.json",
              file=sys.stderr)
        return 3
    return 0
