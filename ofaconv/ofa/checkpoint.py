"""Reading fairseq OFA checkpoints safely, and what can be learnt from them.

Invariants:
- Files are read by ``ofaconv.core.loader`` (restricted unpickler, allow-list, mmap); only the
  state dict that will be converted is checked (``check_tensors``), so tensors that are never read
  (``last_optimizer_state``, ``extra_state["ema"]`` unless asked for) are never paged in.
- Shapes come from the state dict (``infer_config``), behaviour flags from the training
  arguments (``read_flags``); neither trusts the ``arch`` string (OFA-Sys/OFA#77).
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import layout
from . import variants
from ofaconv.core.errors import CheckpointError

if TYPE_CHECKING:  # torch loads with the first checkpoint read: `ofaconv inspect --help` needs none of it
    import torch


class StateDict(dict):
    """A plain dict of fairseq names -> tensors that remembers its file, so that errors raised
    about it (infer_config, validate_state_dict) name the file even when the caller passes no path."""

    def __init__(self, items, source_path=None):
        super().__init__(items)
        self.source_path = source_path


def _source(state_dict, path):
    return path if path is not None else getattr(state_dict, "source_path", None)


@dataclass
class FairseqCheckpoint:
    """A loaded fairseq OFA checkpoint: the model tensors (memory-mapped) and the training arguments."""

    path: Path
    state_dict: dict[str, torch.Tensor]  # fairseq names -> tensors, as stored (no casts)
    model_args: dict  # vars(cfg["model"]) or vars(args): raw, may contain machine paths
    task_args: dict  # cfg["task"], or the same dict as model_args for the legacy layout
    layout: str  # "cfg" (args None, cfg dict) or "args" (legacy top-level Namespace)
    has_optimizer_state: bool
    has_ema: bool
    from_ema: bool = False  # state_dict is extra_state["ema"]
    mmapped: bool = True  # False only for legacy (torch < 1.6) files
    common_args: dict = field(default_factory=dict)  # cfg["common"] (fp16, seed, ...)

    def flags(self) -> dict:
        return read_flags(self)

    def config(self, *, validate: bool = True) -> dict:
        return infer_config(self.state_dict, path=self.path, validate=validate)


# --------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(path, *, ema: bool = False) -> FairseqCheckpoint:
    """Open a fairseq OFA checkpoint with ofaconv's safe loader (``ofaconv.core.loader``), memory-mapped.

    With ``ema=True`` the state dict is ``extra_state["ema"]`` (fairseq ``--store-ema``).
    Raises ``CheckpointError`` naming the file (and key) for anything that is not a readable,
    safe fairseq OFA checkpoint. Legacy (torch < 1.6, non-zip) files load without mmap
    (``mmapped`` False); released OFA checkpoints are zip files.
    """
    from ofaconv.core.loader import load_torch

    path = Path(path)
    obj, mmapped = load_torch(path)
    return _from_loaded(obj, path, ema=ema, mmapped=mmapped)


def _as_dict(value) -> dict:
    if isinstance(value, argparse.Namespace):
        return dict(vars(value))
    if isinstance(value, Mapping):
        return dict(value)
    return {}


def _from_loaded(obj, path: Path, *, ema: bool, mmapped: bool) -> FairseqCheckpoint:
    import torch

    from ofaconv.core.loader import check_tensors

    if not isinstance(obj, Mapping):
        raise CheckpointError(f"not a fairseq checkpoint: the file holds a {type(obj).__name__}, not a dict", path=path)
    if "model" not in obj:
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            first = next(iter(obj))
            raise CheckpointError(
                f"a bare tensor dict ({len(obj)} tensors, first {first!r}), not a fairseq OFA checkpoint "
                "(expected 'model' with 'cfg' or 'args')",
                path=path,
            )
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise CheckpointError(f"not a fairseq checkpoint: no 'model' entry (top-level keys: {keys})", path=path, key="model")

    cfg, args = obj.get("cfg"), obj.get("args")
    if isinstance(cfg, Mapping) and cfg.get("model") is not None:
        layout_name = "cfg"
        model_args = _as_dict(cfg["model"])
        task_args = _as_dict(cfg.get("task"))
        common_args = _as_dict(cfg.get("common"))
    elif isinstance(args, argparse.Namespace):
        layout_name = "args"
        model_args = _as_dict(args)
        task_args = model_args
        common_args = model_args
    else:
        raise CheckpointError(
            "no training arguments: neither cfg['model'] nor a top-level args Namespace "
            "(ofaconv needs them for disable_entangle, patch_image_size, ...)",
            path=path,
            key="cfg",
        )
    if not model_args:
        raise CheckpointError("the model arguments are empty or not a Namespace/dict", path=path, key="cfg.model")

    extra_state = obj.get("extra_state")
    has_ema = isinstance(extra_state, Mapping) and isinstance(extra_state.get("ema"), Mapping)
    if ema:
        if not has_ema:
            raise CheckpointError(
                "no EMA weights in this checkpoint (trained without --store-ema)", path=path, key="extra_state.ema"
            )
        state_dict, where = extra_state["ema"], "extra_state.ema"
    else:
        state_dict, where = obj["model"], "model"
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"is a {type(state_dict).__name__}, expected a dict of tensors", path=path, key=where)
    check_tensors(state_dict, path=path, prefix=f"{where}.")
    if not any(k.startswith("encoder.embed_images.") for k in state_dict) or not any(k.startswith("decoder.") for k in state_dict):
        sample = ", ".join(list(state_dict)[:3])
        raise CheckpointError(
            f"not an OFA checkpoint: no ResNet image trunk (encoder.embed_images.*) or no decoder (keys start: {sample})",
            path=path,
            key=where,
        )

    return FairseqCheckpoint(
        path=path,
        state_dict=StateDict(state_dict, path),
        model_args=model_args,
        task_args=task_args,
        layout=layout_name,
        has_optimizer_state=bool(obj.get("last_optimizer_state")),
        has_ema=has_ema,
        from_ema=ema,
        mmapped=mmapped,
        common_args=common_args,
    )


# --------------------------------------------------------------------------------------------
# Flags (non-shape behaviour), with fairseq's defaults when the checkpoint lacks them

# Model arguments: default = what fairseq's ofa_*_architecture (or argparse) gives when absent.
MODEL_FLAGS = {
    "arch": None,
    "disable_entangle": False,
    "entangle_position_embedding": False,
    "attn_scale_factor": 2,
    "no_scale_embedding": True,
    "interpolate_position": False,
    "orig_patch_image_size": 256,
    "encoder_normalize_before": True,
    "decoder_normalize_before": True,
    "layernorm_embedding": True,
    "patch_layernorm_embedding": True,
    "code_layernorm_embedding": True,
    "add_type_embedding": True,
    "scale_attn": False,
    "scale_fc": False,
    "scale_heads": False,
    "scale_resids": False,
    "share_all_embeddings": True,
    "share_decoder_input_output_embed": True,
    "activation_fn": "gelu",
    "token_bucket_size": 256,
    "image_bucket_size": 42,
    "code_image_size": 128,
    "max_source_positions": 1024,
    "max_target_positions": 1024,
    "resnet_type": None,
    "sync_bn": False,
    "freeze_resnet": False,
    "encoder_prompt": False,
    "decoder_prompt": False,
    "cross_self_attention": False,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "encoder_drop_path_rate": 0.0,
    "decoder_drop_path_rate": 0.0,
    "resnet_drop_path_rate": 0.0,
}

# Task arguments: default = OFAConfig / CaptionConfig field defaults.
TASK_FLAGS = {
    "task": None,
    "patch_image_size": 480,
    "max_src_length": 128,
    "max_tgt_length": 30,
    "bpe": "gpt2",
    "imagenet_default_mean_and_std": False,
    "num_bins": 1000,
    "code_dict_size": 8192,
    "constraint_range": None,
    "eval_args": "{}",
}

# Flags looked up in the task arguments first, then the model Namespace (which carries every CLI arg).
_TASK_FIRST = {"patch_image_size"}

# Image sizes: the image is resized to S x S and the ResNet trunk makes one patch per 16 pixels;
# image positions (the absolute embedding and the relative-position buckets) index an
# image_bucket_size-square grid of patches, so S / 16 may not exceed image_bucket_size (42 in every
# released checkpoint: at most 672 px). OFA uses 256, 384, 480 and 512.
PATCH_PIXELS = 16


def check_image_size(value, *, image_bucket_size: int = 42, path=None, key=None) -> int:
    """``value`` as an image size OFA can encode (a multiple of 16 from 16 to 16 x image_bucket_size),
    else a one-line ``CheckpointError`` naming ``path`` (a file, or the option) and ``key``."""
    largest = PATCH_PIXELS * int(image_bucket_size)
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral or not PATCH_PIXELS <= value <= largest or value % PATCH_PIXELS:
        raise CheckpointError(
            f"{value!r} is not an image size OFA can encode; use a multiple of {PATCH_PIXELS} from {PATCH_PIXELS} "
            f"to {largest} ({PATCH_PIXELS} px per patch, at most image_bucket_size {image_bucket_size} patches a "
            "side; OFA uses 256, 384, 480 or 512)", path=path, key=key)
    return int(value)


def read_flags(ckpt: FairseqCheckpoint) -> dict:
    """The behaviour flags of a checkpoint as a JSON-serialisable dict (never machine paths).

    ``"_defaulted"`` lists the flags the checkpoint did not carry (fairseq's default was used).
    """
    model, task = ckpt.model_args, ckpt.task_args
    flags: dict = {}
    defaulted: list[str] = []

    def lookup(name, sources, default):
        for source in sources:
            if name in source and source[name] is not None:
                return _jsonable(source[name])
        defaulted.append(name)
        return default

    for name, default in MODEL_FLAGS.items():
        if name == "arch":
            sources = [{"arch": model.get("arch") or model.get("_name")}]
        elif name == "orig_patch_image_size":
            sources = [model, task]
        else:
            sources = [model]
        flags[name] = lookup(name, sources, default)
    for name, default in TASK_FLAGS.items():
        if name == "task":
            value = task.get("_name") if ckpt.layout == "cfg" else task.get("task")
            sources = [{"task": value}]
        elif name in _TASK_FIRST:
            sources = [task, model]
        else:
            sources = [task]
        flags[name] = lookup(name, sources, default)
    flags["fp16"] = lookup("fp16", [ckpt.common_args], False)
    flags["_defaulted"] = defaulted
    bucket = flags["image_bucket_size"]
    if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1:
        bucket = MODEL_FLAGS["image_bucket_size"]
    for name in ("patch_image_size", "orig_patch_image_size"):
        check_image_size(flags[name], image_bucket_size=bucket, path=ckpt.path, key=name)
    return flags


def _jsonable(value):
    import torch

    if hasattr(value, "item") and not isinstance(value, torch.Tensor) and getattr(value, "ndim", 1) == 0:
        value = value.item()  # numpy scalar
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


# --------------------------------------------------------------------------------------------
# Shapes inferred from the state dict (ofa.md §A.4)


def _layer_count(state_dict: Mapping, prefix: str, path) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    if not indices:
        return 0
    for i in range(max(indices) + 1):
        if i not in indices:
            raise CheckpointError(
                f"layer {i} is missing while layer {max(indices)} exists", path=path, key=f"{prefix}{i}"
            )
    return max(indices) + 1


def _need(state_dict: Mapping, key: str, ndim: int, path) -> torch.Tensor:
    if key not in state_dict:
        raise CheckpointError("missing from the state dict (needed to infer the model shape)", path=path, key=key)
    tensor = state_dict[key]
    if tensor.dim() != ndim:
        raise CheckpointError(f"has {tensor.dim()} dimensions {list(tensor.shape)}, expected {ndim}", path=path, key=key)
    return tensor


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
        and a.shape == b.shape
        and a.stride() == b.stride()
    )


def infer_config(state_dict: Mapping, *, path=None, validate: bool = True) -> dict:
    """Model shape and structure from a fairseq OFA state dict; reads shapes only, never data.

    Returns vocab_size, d_model, encoder/decoder_ffn_dim, encoder/decoder_attention_heads,
    encoder/decoder_layers, token/image_bucket_size, max_source/target_positions,
    image_position_idx_length, resnet_layers, resnet_type, and the structural flags of
    ``layout.STRUCTURAL_FLAGS`` (NormFormer pieces etc., from key presence). With ``validate``
    the state dict must then match ``layout.expected_keys`` exactly.
    """
    sd = state_dict
    path = _source(state_dict, path)
    embed = _need(sd, "encoder.embed_tokens.weight", 2, path)
    vocab_size, d_model = embed.shape
    encoder_layers = _layer_count(sd, "encoder.layers.", path)
    decoder_layers = _layer_count(sd, "decoder.layers.", path)
    if encoder_layers == 0:
        raise CheckpointError("no encoder layers", path=path, key="encoder.layers.0")
    if decoder_layers == 0:
        raise CheckpointError("no decoder layers", path=path, key="decoder.layers.0")

    def ffn(side):
        fc1 = _need(sd, f"{side}.layers.0.fc1.weight", 2, path)
        if fc1.shape[1] != d_model:
            raise CheckpointError(f"has shape {list(fc1.shape)}, expected [*, {d_model}] (d_model)", path=path, key=f"{side}.layers.0.fc1.weight")
        return fc1.shape[0]

    def heads(side):
        key = f"{side}.token_rel_pos_table_list.0.weight"
        n = _need(sd, key, 2, path).shape[1]
        c_attn = sd.get(f"{side}.layers.0.self_attn.c_attn")
        if c_attn is not None and tuple(c_attn.shape) != (n,):
            raise CheckpointError(f"has shape {list(c_attn.shape)}, but {key} gives {n} heads", path=path, key=f"{side}.layers.0.self_attn.c_attn")
        if n == 0 or d_model % n:
            raise CheckpointError(f"{n} heads do not divide d_model {d_model}", path=path, key=key)
        return n

    token_rows = _need(sd, "encoder.token_rel_pos_table_list.0.weight", 2, path).shape[0]
    if token_rows % 2 == 0:
        raise CheckpointError(f"has {token_rows} rows, expected 2 * token_bucket_size - 1 (odd)", path=path, key="encoder.token_rel_pos_table_list.0.weight")
    image_pos_rows = _need(sd, "encoder.embed_image_positions.weight", 2, path).shape[0]
    image_bucket_size = math.isqrt(image_pos_rows - 1)
    if image_bucket_size * image_bucket_size + 1 != image_pos_rows:
        raise CheckpointError(f"has {image_pos_rows} rows, expected image_bucket_size^2 + 1", path=path, key="encoder.embed_image_positions.weight")

    resnet = []
    for stage in ("layer1", "layer2", "layer3"):
        blocks = _layer_count(sd, f"encoder.embed_images.{stage}.", path)
        if blocks == 0:
            raise CheckpointError("no blocks in this ResNet stage (ViT-based OFA is not supported)", path=path, key=f"encoder.embed_images.{stage}.0")
        resnet.append(blocks)

    idx = sd.get("decoder.image_position_idx")
    tied = "decoder.embed_tokens.weight" in sd and _same_storage(embed, sd["decoder.embed_tokens.weight"])
    dec_embed = sd.get("decoder.embed_tokens.weight")
    out_proj = sd.get("decoder.output_projection.weight")
    tied_output = dec_embed is not None and out_proj is not None and _same_storage(dec_embed, out_proj)

    config = {
        "vocab_size": int(vocab_size),
        "d_model": int(d_model),
        "encoder_ffn_dim": int(ffn("encoder")),
        "decoder_ffn_dim": int(ffn("decoder")),
        "encoder_attention_heads": int(heads("encoder")),
        "decoder_attention_heads": int(heads("decoder")),
        "encoder_layers": encoder_layers,
        "decoder_layers": decoder_layers,
        "token_bucket_size": int((token_rows + 1) // 2),
        "image_bucket_size": int(image_bucket_size),
        "max_source_positions": int(_need(sd, "encoder.embed_positions.weight", 2, path).shape[0] - 2),
        "max_target_positions": int(_need(sd, "decoder.embed_positions.weight", 2, path).shape[0] - 2),
        "image_position_idx_length": int(idx.numel()) if idx is not None else None,
        "resnet_layers": resnet,
        "resnet_type": variants.resnet_type_for_layers(resnet),
        "layernorm_embedding": "encoder.layernorm_embedding.weight" in sd,
        "patch_layernorm_embedding": "encoder.patch_layernorm_embedding.weight" in sd,
        "code_layernorm_embedding": "decoder.code_layernorm_embedding.weight" in sd,
        "add_type_embedding": "encoder.type_embedding.weight" in sd,
        "encoder_normalize_before": "encoder.layer_norm.weight" in sd,
        "decoder_normalize_before": "decoder.layer_norm.weight" in sd,
        "scale_attn": "encoder.layers.0.attn_ln.weight" in sd,
        "scale_fc": "encoder.layers.0.ffn_layernorm.weight" in sd,
        "scale_heads": "encoder.layers.0.self_attn.c_attn" in sd,
        "scale_resids": "encoder.layers.0.w_resid" in sd,
        "share_all_embeddings": tied,
        "share_decoder_input_output_embed": tied_output,
        "bn_tracks_batches": "encoder.embed_images.bn1.num_batches_tracked" in sd,
    }
    if validate:
        validate_state_dict(sd, config, path=path)
    return config


def validate_state_dict(state_dict: Mapping, config: dict, *, path=None, allow_extra_prefixes: tuple[str, ...] = ()) -> None:
    """Every expected key present with its shape and dtype class, and no other key.

    Raises one ``CheckpointError`` naming the first offending key (and how many more there are).
    """
    import torch

    from .reference import buckets

    path = _source(state_dict, path)
    spec_config = dict(config)
    if spec_config.get("image_position_idx_length") is None:
        spec_config["image_position_idx_length"] = buckets.FAIRSEQ_IMAGE_POSITION_IDX_LENGTH
    expected = layout.expected_keys(spec_config)
    missing = [k for k in expected if k not in state_dict]
    if missing:
        more = f" ({len(missing) - 1} more keys missing)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing from the state dict{more}", path=path, key=missing[0])
    bad = []
    for name, spec in expected.items():
        tensor = state_dict[name]
        if tuple(tensor.shape) != spec.shape:
            bad.append((name, f"has shape {list(tensor.shape)}, expected {list(spec.shape)}"))
        elif spec.is_integer and tensor.dtype != torch.int64:
            bad.append((name, f"has dtype {tensor.dtype}, expected torch.int64"))
        elif not spec.is_integer and not tensor.is_floating_point():
            bad.append((name, f"has dtype {tensor.dtype}, expected a floating-point tensor"))
    if bad:
        more = f" ({len(bad) - 1} more mis-shaped keys)" if len(bad) > 1 else ""
        raise CheckpointError(bad[0][1] + more, path=path, key=bad[0][0])
    extra = [k for k in state_dict if k not in expected and not k.startswith(tuple(allow_extra_prefixes))]
    if extra:
        more = f" ({len(extra) - 1} more unexpected keys)" if len(extra) > 1 else ""
        raise CheckpointError(f"unexpected key for an OFA model of this shape{more}", path=path, key=extra[0])


def check_derived_buffers(state_dict: Mapping, config: dict, *, path=None) -> None:
    """The stored rp-bucket tables equal fairseq's recomputation (they are recomputed, never copied)."""
    import torch

    from .reference import buckets

    path = _source(state_dict, path)
    token = buckets.make_token_bucket_position(config["token_bucket_size"])
    image = buckets.make_image_bucket_position(config["image_bucket_size"])
    for side in ("encoder", "decoder"):
        for name, expected in ((f"{side}.token_rp_bucket", token), (f"{side}.image_rp_bucket", image)):
            if name in state_dict and not torch.equal(state_dict[name], expected):
                raise CheckpointError("differs from fairseq's recomputed table", path=path, key=name)


# --------------------------------------------------------------------------------------------
# Variant detection


def detect_variant(config: dict, flags: dict | None = None) -> tuple[str | None, str | None]:
    """(variant name, family) for an inferred config; (None, None) when nothing matches.

    The family comes from the vocabulary size (59457 en, 30325 cn), else the ``bpe`` flag. A
    variant matches at full size or at its micro size (same d_model, ffn, layers, heads, ResNet
    blocks).
    """
    flags = flags or {}
    fam = variants.family_from_vocab_size(config.get("vocab_size")) or variants.family_from_bpe(flags.get("bpe"))
    for name in variants.variant_names():
        if fam is not None and variants.family(name) != fam:
            continue
        for size in variants.SIZES:
            if _matches(config, variants.shape_config(name, size)):
                return name, variants.family(name)
    return None, None


def _matches(config: dict, shape: dict) -> bool:
    return (
        config.get("d_model") == shape["d_model"]
        and config.get("encoder_ffn_dim") == shape["ffn_dim"]
        and config.get("decoder_ffn_dim") == shape["ffn_dim"]
        and config.get("encoder_layers") == shape["encoder_layers"]
        and config.get("decoder_layers") == shape["decoder_layers"]
        and config.get("encoder_attention_heads") == shape["heads"]
        and config.get("decoder_attention_heads") == shape["heads"]
        and list(config.get("resnet_layers") or []) == shape["resnet_layers"]
    )



_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_DONTNEED = 4


def release_pages(tensor: torch.Tensor) -> None:
    """Drop the resident pages of a tensor memory-mapped from a checkpoint (Linux, read-only use).

    Pages of a private file mapping that were only read are dropped and would be read again from
    the file if touched, so this is safe; it keeps peak RSS near one tensor instead of growing with
    every tensor already converted.
    """
    if not sys.platform.startswith("linux") or tensor.numel() == 0:
        return
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    first = -(-start // _PAGE) * _PAGE
    last = end // _PAGE * _PAGE
    if last > first:
        _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


_LIBC = None
