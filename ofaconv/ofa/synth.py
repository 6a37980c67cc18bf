"""Synthetic fairseq OFA checkpoints in the exact trainer format.

``write_synthetic_checkpoint`` writes, for any variant of ``mappings/variants.yaml`` at micro or
full size, what OFA's fairseq trainer writes: ``args``/``cfg`` (an ``argparse.Namespace`` holding
the model arguments), ``model`` with every key of ``mappings/fairseq_layout.yaml`` in fairseq's
order (buffers, rp-bucket tables, BatchNorm statistics, the three embedding aliases sharing one
storage), ``criterion``, ``optimizer_history``, ``task_state``, ``extra_state`` (meters, numpy
``best``, optional EMA) and optionally an Adam ``last_optimizer_state``.

Every tensor is perturbed (no LayerNorm/BatchNorm is the identity, no ``c_attn`` is all ones) so
that a swapped or dropped mapping changes the outputs. Values are a pure function of (seed, key):
the same weights whatever the layout, dtype or optimizer options. No model is built: tensors are
generated straight into the checkpoint dict, so peak memory is about the file size.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from . import layout
from . import variants
from ofaconv.core.errors import OfaconvError
from ofaconv.core.writer import atomic_file

if TYPE_CHECKING:  # torch loads when a checkpoint is made, not for `ofaconv synth --help`
    import torch

# Widths below this get linear weights scaled up by sqrt(768 / fan_in), so that micro models
# have the per-layer gain of OFA-Base (std 0.02 at width 768) and attention is not uniform.
_REFERENCE_WIDTH = 768

# The task arguments of an OFA caption run (tasks/mm_tasks/caption.py CaptionConfig); the paths
# are the kind of machine paths real files carry, so consumers can be tested for not leaking them.
_TASK_ARGS = {
    "_name": "caption",
    "data": "/home/ofa/dataset/caption_data/caption_stage1_train.tsv,/home/ofa/dataset/caption_data/caption_val.tsv",
    "selected_cols": "0,4,2",
    "bpe": None,  # per family
    "bpe_dir": "/home/ofa/OFA/utils/BPE",
    "max_source_positions": 1024,
    "max_target_positions": 1024,
    "max_src_length": 80,
    "max_tgt_length": 20,
    "code_dict_size": 8192,
    "patch_image_size": None,  # per variant
    "orig_patch_image_size": 256,
    "num_bins": 1000,
    "imagenet_default_mean_and_std": False,
    "constraint_range": None,
    "eval_bleu": False,
    "eval_cider": True,
    "eval_args": '{"beam":5,"max_len_b":16,"no_repeat_ngram_size":3}',
    "eval_print_samples": False,
    "eval_cider_cached_tokens": "/home/ofa/dataset/caption_data/cider_cached_tokens/coco-valid-words.p",
    "scst": False,
    "scst_args": "{}",
}


# --------------------------------------------------------------------------------------------
# Arguments


def _model_namespace(shape: dict, vocab_size: int, task: dict) -> dict:
    """The model Namespace fields of the official micro checkpoint, with this variant's values."""
    d, ffn = shape["d_model"], shape["ffn_dim"]
    fields = {
        "bitfit": False, "no_token_positional_embeddings": False, "no_cross_attention": False,
        "cross_self_attention": False, "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0,
        "encoder_layers_to_keep": None, "decoder_layers_to_keep": None, "quant_noise_pq": 0,
        "quant_noise_pq_block_size": 8, "quant_noise_scalar": 0, "min_params_to_wrap": 100000000,
        "encoder_normalize_before": True, "decoder_normalize_before": True,
        "share_decoder_input_output_embed": True, "share_all_embeddings": True,
        "layernorm_embedding": True, "patch_layernorm_embedding": True, "code_layernorm_embedding": True,
        "add_type_embedding": True, "scale_attn": True, "scale_fc": True, "scale_heads": True,
        "disable_entangle": True, "dropout": 0.1, "attention_dropout": 0.0, "resnet_drop_path_rate": 0.0,
        "encoder_drop_path_rate": 0.1, "decoder_drop_path_rate": 0.1,
        "encoder_embed_dim": d, "encoder_ffn_embed_dim": ffn, "encoder_layers": shape["encoder_layers"],
        "encoder_attention_heads": shape["heads"], "decoder_layers": shape["decoder_layers"],
        "decoder_attention_heads": shape["heads"], "resnet_type": shape["resnet_type"], "arch": shape["arch"],
        "patch_image_size": task["patch_image_size"], "orig_patch_image_size": task["orig_patch_image_size"],
        "encoder_embed_path": None, "encoder_learned_pos": True, "decoder_embed_path": None,
        "decoder_embed_dim": d, "decoder_ffn_embed_dim": ffn, "decoder_learned_pos": True,
        "relu_dropout": 0.0, "max_target_positions": 1024, "max_source_positions": 1024,
        "adaptive_softmax_cutoff": None, "adaptive_softmax_dropout": 0, "decoder_output_dim": d,
        "decoder_input_dim": d, "no_scale_embedding": True, "activation_fn": "gelu",
        "pooler_activation_fn": "tanh", "pooler_dropout": 0.0, "pooler_classifier": "mlp",
        "token_bucket_size": 256, "image_bucket_size": 42, "freeze_encoder_embedding": False,
        "freeze_decoder_embedding": False, "attn_scale_factor": 2, "code_image_size": 128,
        "entangle_position_embedding": False, "sync_bn": False, "scale_resids": False,
        "activation_dropout": 0.0, "adaptive_input": False, "encoder_prompt": False,
        "encoder_prompt_length": 100, "encoder_prompt_type": "prefix", "encoder_prompt_projection": False,
        "encoder_prompt_dim": 128, "decoder_prompt": False, "decoder_prompt_length": 100,
        "decoder_prompt_type": "prefix", "decoder_prompt_projection": False, "decoder_prompt_dim": 128,
        "tie_adaptive_weights": False, "checkpoint_activations": False, "offload_activations": False,
        "vocab_size": vocab_size, "_name": shape["arch"],
    }
    # fairseq's model arguments use argparse.SUPPRESS: --interpolate-position only exists when passed.
    if shape["interpolate_position"]:
        fields["interpolate_position"] = True
    return fields


def _apply_flags(model: dict, task: dict, common: dict, flags: dict) -> None:
    for name, value in flags.items():
        known = False
        if name == "task":
            task["_name"], known = value, True
        if name in common:
            common[name], known = value, True
        if name in task:
            task[name], known = value, True
        if name in model or name in ("interpolate_position", "freeze_resnet"):
            model[name], known = value, True
        if not known:
            raise OfaconvError(f"unknown flag {name!r} for a synthetic checkpoint (not a model, task or common argument)")


def _layout_config(model: dict, vocab_size: int, resnet_layers: list[int]) -> dict:
    from .reference import buckets

    config = {
        "vocab_size": vocab_size,
        "d_model": model["encoder_embed_dim"],
        "encoder_ffn_dim": model["encoder_ffn_embed_dim"],
        "decoder_ffn_dim": model["decoder_ffn_embed_dim"],
        "encoder_attention_heads": model["encoder_attention_heads"],
        "decoder_attention_heads": model["decoder_attention_heads"],
        "encoder_layers": model["encoder_layers"],
        "decoder_layers": model["decoder_layers"],
        "token_bucket_size": model["token_bucket_size"],
        "image_bucket_size": model["image_bucket_size"],
        "max_source_positions": model["max_source_positions"],
        "max_target_positions": model["max_target_positions"],
        "image_position_idx_length": buckets.image_position_idx_length(model["code_image_size"]),
        "code_image_size": model["code_image_size"],
        "resnet_layers": resnet_layers,
        "bn_tracks_batches": not model.get("freeze_resnet", False),
    }
    for name in layout.STRUCTURAL_FLAGS:
        if name in model:
            config[name] = bool(model[name])
    if model["encoder_embed_dim"] != model["decoder_embed_dim"]:
        raise OfaconvError("encoder and decoder embed dims must match (shared embeddings)")
    return config


# --------------------------------------------------------------------------------------------
# Tensors


def _generator(seed: int, name: str) -> torch.Generator:
    import torch

    return torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63))


def _width_scaled_std(fan_in: int) -> float:
    return 0.02 * max(1.0, (_REFERENCE_WIDTH / fan_in) ** 0.5)


def _fill(out: torch.Tensor, spec: layout.KeySpec, seed: int, tables: dict) -> torch.Tensor:
    """Fill ``out`` (any float dtype) with the values of ``spec.name`` for ``seed``."""
    import torch

    kind, shape = spec.kind, spec.shape
    if spec.is_integer or kind == "version":
        value = {
            "version": lambda: torch.tensor([3.0]),
            "token_rp_bucket": lambda: tables["token"],
            "image_rp_bucket": lambda: tables["image"],
            "image_position_idx": lambda: tables["position_idx"],
            "bn_count": lambda: torch.tensor(20000 + zlib.crc32(spec.name.encode()) % 10000),
        }[kind]()
        return out.copy_(value.reshape(shape))
    g = _generator(seed, spec.name)
    work = out if out.dtype == torch.float32 else torch.empty(shape, dtype=torch.float32)
    if kind == "token_embedding":
        # Also the output projection: width-scaled so that micro logits spread like OFA-Base's.
        work.normal_(0.0, _width_scaled_std(shape[1]), generator=g)
        work[1] = 0.0  # <pad> row: padding_idx gets no gradient, so it stays at its zero init
    elif kind == "embedding":
        work.normal_(0.0, 0.02, generator=g)
    elif kind == "linear":
        work.normal_(0.0, _width_scaled_std(shape[1]), generator=g)
    elif kind in ("bias", "bn_bias"):
        work.normal_(0.0, 0.02, generator=g)
    elif kind in ("ln_weight", "c_attn", "w_resid"):
        work.normal_(1.0, 0.1, generator=g)
    elif kind == "ln_bias":
        work.normal_(0.0, 0.05, generator=g)
    elif kind == "rel_pos":
        work.normal_(0.0, 0.05, generator=g)
    elif kind == "conv":
        fan_in = shape[1] * shape[2] * shape[3]
        work.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=g)
    elif kind == "bn_weight":
        if spec.name.endswith("bn3.weight"):
            work.uniform_(0.1, 0.3, generator=g)  # residual branch ends small, as trained ResNets do
        else:
            work.normal_(1.0, 0.1, generator=g)
    elif kind == "bn_mean":
        work.normal_(0.0, 0.1, generator=g)
    elif kind == "bn_var":
        work.uniform_(0.5, 2.0, generator=g)
    else:
        raise OfaconvError(f"no synthetic values for kind {kind!r} (key {spec.name})")
    if work is not out:
        out.copy_(work)
    return out


def _bucket_tables(config: dict) -> dict:
    return _cached_tables(config["token_bucket_size"], config["image_bucket_size"], config["image_position_idx_length"],
                          config["code_image_size"])


@functools.lru_cache(maxsize=4)
def _cached_tables(token_bucket_size: int, image_bucket_size: int, position_idx_length: int, code_image_size: int) -> dict:
    # Read-only templates: _fill copies them into each checkpoint's own storages.
    from .reference import buckets

    return {
        "token": buckets.make_token_bucket_position(token_bucket_size),
        "image": buckets.make_image_bucket_position(image_bucket_size),
        "position_idx": buckets.make_image_position_idx(image_bucket_size, code_image_size, length=position_idx_length),
    }


def _state_dict(specs: dict, seed: int, dtype: torch.dtype, tables: dict) -> OrderedDict:
    import torch

    state = OrderedDict()
    for name, spec in specs.items():
        if spec.tie is not None:
            state[name] = state[spec.tie]
            continue
        tensor_dtype = torch.int64 if spec.is_integer else dtype
        state[name] = _fill(torch.empty(spec.shape, dtype=tensor_dtype), spec, seed, tables)
    return state


def _ema_state_dict(state: OrderedDict, specs: dict, seed: int) -> OrderedDict:
    """EMA weights: the model's plus a small deterministic offset (buffers copied)."""
    import torch

    ema = OrderedDict()
    for name, spec in specs.items():
        if spec.tie is not None:
            ema[name] = ema[spec.tie]
            continue
        src = state[name]
        out = src.clone()
        if not spec.is_buffer:
            noise = torch.empty(spec.shape, dtype=torch.float32).normal_(0.0, 1e-3, generator=_generator(seed, "ema." + name))
            out.add_(noise.to(src.dtype))
        ema[name] = out
    return ema


def _optimizer_state(specs: dict, seed: int, fp16: bool) -> dict:
    """fairseq Adam state: fp32 exp_avg / exp_avg_sq per parameter (tied ones once, buffers none)."""
    import torch

    params = [spec for spec in specs.values() if spec.tie is None and not spec.is_buffer]
    state = {}
    for i, spec in enumerate(params):
        # uniform_ is cheaper than normal_ and nobody reads these values (converters must not).
        exp_avg = torch.empty(spec.shape).uniform_(-2e-4, 2e-4, generator=_generator(seed, "exp_avg." + spec.name))
        exp_avg_sq = torch.empty(spec.shape).uniform_(1e-10, 1e-7, generator=_generator(seed, "exp_avg_sq." + spec.name))
        state[i] = {"step": 12000, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    optimizer = {
        "state": state,
        "param_groups": [
            {"lr": 7.5e-06, "betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0.01, "amsgrad": False,
             "params": list(range(len(params)))}
        ],
    }
    if fp16:
        optimizer["loss_scale"] = 128.0
    return optimizer


def _metrics() -> OrderedDict:
    """fairseq metrics.state_dict(): aggregator -> [(priority, key, meter class, meter state)]."""
    def avg(val, count, rnd=3):
        return {"val": val, "sum": val * count, "count": count, "round": rnd}

    return OrderedDict(
        default=[(1000, "wall", "StopwatchMeter", {"sum": 8123.4, "n": 1, "round": 0})],
        train=[
            (0, "loss", "AverageMeter", avg(2.417, 1024)),
            (10, "nll_loss", "AverageMeter", avg(1.802, 1024)),
            (50, "ntokens", "AverageMeter", avg(1530.0, 1024)),
            (1000, "wps", "TimeMeter", {"init": 0.0, "n": 1566720.0, "round": 1}),
        ],
        valid=[(0, "loss", "AverageMeter", avg(2.391, 64)), (20, "cider", "AverageMeter", avg(1.2845, 64))],
    )


def _optimizer_history(fp16: bool) -> list:
    import numpy as np

    return [
        {
            "criterion_name": "AdjustLabelSmoothedCrossEntropyCriterion",
            "optimizer_name": "FP16Optimizer" if fp16 else "FairseqAdam",
            "lr_scheduler_state": {"best": np.float64(1.2845)},
            "num_updates": 12000,
        }
    ]


def _extra_state(ema_state) -> dict:
    import numpy as np

    extra = {
        "metrics": _metrics(),
        "previous_training_time": 8123.4,
        "train_iterator": {"version": 2, "epoch": 3, "iterations_in_epoch": 2000, "shuffle": True},
        "val_loss": 2.391,
        "best": np.float64(1.2845),  # CIDEr from numpy: a numpy scalar, as in OFA caption runs
    }
    if ema_state is not None:
        extra["ema"] = ema_state
    return extra


def _cfg(model_ns: argparse.Namespace, task: dict, common: dict, size_name: str, ema: bool) -> dict:
    return {
        "_name": None,
        "common": common,
        "checkpoint": {
            "_name": None,
            "save_dir": f"/home/ofa/OFA/run_scripts/caption/stage1_checkpoints/{size_name}",
            "restore_file": f"/home/ofa/OFA/checkpoints/{size_name}.pt",
            "best_checkpoint_metric": "cider",
            "maximize_best_checkpoint_metric": True,
            "no_save_optimizer_state": False,
        },
        "model": model_ns,
        "task": task,
        "criterion": {"_name": "adjust_label_smoothed_cross_entropy", "label_smoothing": 0.1, "report_accuracy": True},
        "optimizer": {"_name": "adam", "adam_betas": "(0.9,0.999)", "adam_eps": 1e-08, "weight_decay": 0.01, "lr": [1e-05]},
        "lr_scheduler": {"_name": "polynomial_decay", "warmup_ratio": 0.06, "end_learning_rate": 2e-07, "total_num_update": 30000},
        "bpe": None,
        "tokenizer": None,
        "ema": {"_name": None, "store_ema": ema, "ema_decay": 0.9999},
    }


def _arguments(variant: str, size: str, vocab_size: int | None, flags: dict | None):
    """(model Namespace fields, task dict, common dict, layout config) of a synthetic checkpoint."""
    shape = variants.shape_config(variant, size)
    vocab = int(vocab_size or shape["vocab_size"])
    task = dict(_TASK_ARGS, bpe=shape["bpe"], patch_image_size=shape["patch_image_size"],
                orig_patch_image_size=shape["orig_patch_image_size"])
    model = _model_namespace(shape, vocab, task)
    common = {"_name": None, "fp16": True, "seed": 7, "log_format": "simple", "tensorboard_logdir": None}
    _apply_flags(model, task, common, dict(flags or {}))
    return model, task, common, _layout_config(model, vocab, shape["resnet_layers"])


# --------------------------------------------------------------------------------------------
# Public API


def synthetic_key_spec(variant: str, *, size: str = "micro", flags: dict | None = None,
                       vocab_size: int | None = None) -> dict[str, layout.KeySpec]:
    """The state-dict keys (names, shapes, kinds, ties) a synthetic checkpoint would have; no tensors."""
    return layout.expected_keys(_arguments(variant, size, vocab_size, flags)[3])


def synthetic_checkpoint_dict(
    variant: str,
    *,
    size: str = "micro",
    seed: int = 0,
    optimizer_state: bool = True,
    layout_name: str = "cfg",
    dtype: torch.dtype | None = None,
    ema: bool = False,
    flags: dict | None = None,
    vocab_size: int | None = None,
) -> dict:
    """The checkpoint object ``write_synthetic_checkpoint`` saves (in memory); ``dtype`` defaults to fp32."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if layout_name not in ("cfg", "args"):
        raise OfaconvError(f"unknown layout {layout_name!r} (expected 'cfg' or 'args')")
    if not dtype.is_floating_point:
        raise OfaconvError(f"dtype must be floating point, got {dtype}")
    model, task, common, config = _arguments(variant, size, vocab_size, flags)
    specs = layout.expected_keys(config)
    state = _state_dict(specs, seed, dtype, _bucket_tables(config))
    ema_state = _ema_state_dict(state, specs, seed) if ema else None
    fp16 = bool(common["fp16"])
    size_name = f"{variant}-{size}"
    if layout_name == "cfg":
        ckpt = {
            "args": None,
            "cfg": _cfg(argparse.Namespace(**model), task, common, size_name, ema),
            "model": state,
            "criterion": None,
            "optimizer_history": _optimizer_history(fp16),
            "task_state": {},
            "extra_state": _extra_state(ema_state),
        }
    else:
        # fairseq before the hydra config: one Namespace with every argument, no cfg.
        args = {**{k: v for k, v in task.items() if k != "_name"}, **model}
        args.update(task=task["_name"], fp16=fp16, seed=common["seed"], criterion="adjust_label_smoothed_cross_entropy",
                    optimizer="adam", lr_scheduler="polynomial_decay", save_dir=f"/home/ofa/checkpoints/{size_name}")
        ckpt = {
            "args": argparse.Namespace(**args),
            "model": state,
            "optimizer_history": _optimizer_history(fp16),
            "extra_state": _extra_state(ema_state),
        }
    if optimizer_state:
        ckpt["last_optimizer_state"] = _optimizer_state(specs, seed, fp16)
    return ckpt


def write_synthetic_checkpoint(
    path,
    variant: str,
    *,
    size: str = "micro",
    seed: int = 0,
    optimizer_state: bool = True,
    layout: str = "cfg",
    dtype: torch.dtype | None = None,
    ema: bool = False,
    flags: dict | None = None,
    vocab_size: int | None = None,
) -> Path:
    """Write a synthetic checkpoint of ``variant`` in OFA's fairseq trainer format; returns the path.

    ``size`` "micro" (the variant's micro fixture, family vocabulary) or "full" (real dims; for
    benchmarks). ``layout`` "cfg" (args None + cfg dict, current fairseq) or "args" (legacy
    top-level Namespace). ``flags`` override model/task/common arguments (e.g.
    ``{"disable_entangle": False}``); structural ones (``scale_attn``...) change the keys.
    ``dtype``: of the float tensors (default fp32).
    The file is written to a temporary sibling and renamed into place.
    """
    import torch

    path = Path(path)
    if not path.parent.is_dir():
        raise OfaconvError("output directory does not exist", path=path.parent)
    ckpt = synthetic_checkpoint_dict(
        variant, size=size, seed=seed, optimizer_state=optimizer_state, layout_name=layout, dtype=dtype, ema=ema,
        flags=flags, vocab_size=vocab_size,
    )
    # fairseq saves through a file object, which names the zip's root folder "archive" (a path
    # would name it after the temporary file, making the bytes non-deterministic).
    with atomic_file(path) as f:
        torch.save(ckpt, f)
    return path


# --------------------------------------------------------------------------------------------
# CLI


def _parse_set(items: list[str]) -> dict:
    import yaml

    flags = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise OfaconvError(f"--set expects flag=value, got {item!r}")
        flags[name.strip()] = yaml.safe_load(value)
    return flags


def _run(args) -> int:
    if args.list:
        for name in variants.variant_names():
            full, micro = variants.shape_config(name, "full"), variants.shape_config(name, "micro")
            print(
                f"{name:14s} {full['family']}  full: d{full['d_model']} {full['encoder_layers']}+{full['decoder_layers']} "
                f"layers {full['heads']} heads {full['resnet_type']}  micro: d{micro['d_model']} "
                f"{micro['encoder_layers']}+{micro['decoder_layers']} layers {micro['heads']} heads {micro['resnet_type']}"
            )
        return 0
    if not args.variant or not args.output:
        raise OfaconvError("usage: ofaconv synth VARIANT OUT.pt (or ofaconv synth --list)")
    variants.get_variant(args.variant)
    if os.path.lexists(args.output):
        raise OfaconvError("exists; synth writes only new files (remove it or choose another name)", path=args.output)
    import torch

    start = time.perf_counter()
    out = write_synthetic_checkpoint(
        args.output,
        args.variant,
        size="full" if args.full else "micro",
        seed=args.seed,
        optimizer_state=not args.no_optimizer,
        layout="args" if args.legacy_args else "cfg",
        dtype=torch.float16 if args.fp16 else torch.float32,
        ema=args.ema,
        flags=_parse_set(args.set),
        vocab_size=args.vocab_size,
    )
    size = out.stat().st_size
    print(f"wrote {out} ({size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "synth",
        help="write a synthetic fairseq OFA checkpoint (exact trainer format, perturbed weights)",
        description="Write a synthetic fairseq OFA checkpoint in the exact trainer format for a variant of "
        "mappings/variants.yaml, at its micro size (default) or full size.",
    )
    p.add_argument("variant", nargs="?", help="variant name (see --list)")
    p.add_argument("output", nargs="?", help="output .pt path")
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    p.add_argument("--full", action="store_true", help="real dimensions (large files; for benchmarks)")
    p.add_argument("--no-optimizer", action="store_true", help="omit last_optimizer_state")
    p.add_argument("--legacy-args", action="store_true", help="old fairseq layout: top-level args Namespace, no cfg")
    p.add_argument("--fp16", action="store_true", help="store floating tensors in fp16")
    p.add_argument("--ema", action="store_true", help="add EMA weights in extra_state['ema']")
    p.add_argument("--seed", type=int, default=0, help="seed for the weights (default 0)")
    p.add_argument("--vocab-size", type=int, default=None, help="override the family's vocabulary size")
    p.add_argument("--set", action="append", metavar="FLAG=VALUE", help="override a model/task argument (repeatable)")
    p.set_defaults(func=_run)
