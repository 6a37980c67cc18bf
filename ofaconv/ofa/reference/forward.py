"""Independent fairseq OFA forward pass over a raw fairseq state dict.

This is the yardstick the converted transformers model is measured against, so it shares no code
with ``ofaconv.ofa.modeling``: it reads fairseq key names (``encoder.layers.0.attn_ln.weight``,
``decoder.layers.0.encoder_attn.q_proj.weight``, ...) and repeats the computation of OFA-Sys/OFA
``models/ofa/{unify_transformer,unify_transformer_layer,unify_multihead_attention,resnet}.py`` op
for op, in fairseq's T x B x C layout, with plain ``torch.nn.functional`` calls. Doing the same
torch ops on tensors of the same shape and layout is what makes fp32 CPU results bit-identical to
the official code.

Only inference is modelled (dropout, drop-path and layer-drop are identity in eval mode).
Features no released checkpoint uses (prompt tuning, adapters, a second image, ViT trunks,
image-code generation) are refused with an :class:`~ofaconv.errors.OfaconvError`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ofaconv.core.errors import OfaconvError

# fairseq Dictionary specials (identical for the English and Chinese OFA dictionaries).
BOS, PAD, EOS, UNK = 0, 1, 2, 3

# Defaults that fairseq's ``ofa_large_architecture`` fills in for flags a checkpoint's args lack
# (every released size delegates to it). Shape-carrying settings are read from the tensors.
ARCH_DEFAULTS: dict[str, Any] = {
    "encoder_normalize_before": True,
    "decoder_normalize_before": True,
    "no_scale_embedding": True,
    "layernorm_embedding": True,
    "patch_layernorm_embedding": True,
    "add_type_embedding": True,
    "attn_scale_factor": 2,
    "entangle_position_embedding": False,
    "disable_entangle": False,
    "sync_bn": False,
    "activation_fn": "gelu",
    "scale_attn": False,
    "scale_fc": False,
    "scale_heads": False,
    "scale_resids": False,
    "interpolate_position": False,
    "orig_patch_image_size": 256,
    "cross_self_attention": False,
    "encoder_prompt": False,
    "decoder_prompt": False,
    "adapter": False,
}

# Flags whose modules exist only when the flag is on: (flag, key that must then exist).
_FLAG_KEYS = (
    ("layernorm_embedding", "encoder.layernorm_embedding.weight"),
    ("patch_layernorm_embedding", "encoder.patch_layernorm_embedding.weight"),
    ("add_type_embedding", "encoder.type_embedding.weight"),
    ("encoder_normalize_before", "encoder.layer_norm.weight"),
    ("decoder_normalize_before", "decoder.layer_norm.weight"),
    ("scale_attn", "encoder.layers.0.attn_ln.weight"),
    ("scale_fc", "encoder.layers.0.ffn_layernorm.weight"),
    ("scale_heads", "encoder.layers.0.self_attn.c_attn"),
    ("scale_resids", "encoder.layers.0.w_resid"),
)

# fairseq buffers (never trainable); every other floating tensor is an nn.Parameter.
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked", "_rp_bucket",
                    "image_position_idx", ".version")

_UNSUPPORTED_FLAGS = ("encoder_prompt", "decoder_prompt", "adapter", "cross_self_attention")


def _gelu(x: Tensor) -> Tensor:
    return F.gelu(x.float()).type_as(x)


def _gelu_accurate(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": _gelu,
    "gelu_fast": _gelu_accurate,
    "gelu_accurate": _gelu_accurate,
    "tanh": torch.tanh,
    "linear": lambda x: x,
}


def model_args_from_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The model arguments of a loaded fairseq checkpoint dict, task arguments merged under them.

    OFA trainer files keep everything in ``cfg["model"]`` (an ``argparse.Namespace``) and the
    task settings in ``cfg["task"]``; older files keep one Namespace in ``args``. Model keys win
    because fairseq builds the model from the model arguments alone.
    """
    def as_dict(obj) -> dict[str, Any]:
        if obj is None:
            return {}
        if isinstance(obj, argparse.Namespace):
            return dict(vars(obj))
        if isinstance(obj, Mapping):
            return dict(obj)
        return {k: getattr(obj, k) for k in dir(obj) if not k.startswith("_")}

    cfg = checkpoint.get("cfg") or {}
    model = as_dict(cfg.get("model")) if isinstance(cfg, Mapping) else {}
    task = as_dict(cfg.get("task")) if isinstance(cfg, Mapping) else {}
    if not model:
        model = as_dict(checkpoint.get("args"))
    return {**task, **model}


class FairseqReference:
    """fairseq OFA in eval mode, computed functionally from a fairseq state dict.

    Args:
        state_dict: fairseq ``state["model"]`` (no prefix), tensors looked up by fairseq names.
        model_args: the checkpoint's model arguments as a dict (task arguments may be merged in,
            see :func:`model_args_from_checkpoint`). Missing flags take the values fairseq's
            ``ofa_large_architecture`` would give them.
        dtype: floating dtype to run in (fp32 for parity; softmax and GELU run in fp32 as in
            fairseq whatever the dtype).
    """

    def __init__(self, state_dict: Mapping[str, Tensor], model_args: Mapping[str, Any], *,
                 dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        given = {k: v for k, v in dict(model_args).items() if v is not None}
        self.args = {**ARCH_DEFAULTS, **given}
        self.sd: dict[str, Tensor] = self._as_parameters(state_dict)
        for flag in _UNSUPPORTED_FLAGS:
            if self.args.get(flag):
                raise OfaconvError(f"fairseq flag '{flag}' is not supported by the reference")
        for flag, key in _FLAG_KEYS:
            if flag in given and bool(given[flag]) != (key in self.sd):
                raise OfaconvError(
                    f"model args say {flag}={given[flag]} but the state dict "
                    f"{'lacks' if given[flag] else 'has'} it", key=key)

        embed = self._p("encoder.embed_tokens.weight")
        self.vocab_size, self.embed_dim = embed.shape
        self.num_heads = self._p("encoder.token_rel_pos_table_list.0.weight").shape[1]
        self.head_dim = self.embed_dim // self.num_heads
        self.encoder_layers = self._count("encoder.layers.")
        self.decoder_layers = self._count("decoder.layers.")
        self.resnet_blocks = [self._count(f"encoder.embed_images.layer{i}.") for i in (1, 2, 3)]
        if "encoder.embed_images.conv1.weight" not in self.sd:
            raise OfaconvError("only ResNet image trunks are supported",
                               key="encoder.embed_images.conv1.weight")
        self.token_bucket_size = (self._p("encoder.token_rel_pos_table_list.0.weight").shape[0]
                                  + 1) // 2
        self.image_bucket_size = math.isqrt(self._p("encoder.embed_image_positions.weight")
                                            .shape[0] - 1)
        self.max_positions = self._p("encoder.embed_positions.weight").shape[0] - 2

        self.embed_scale = 1.0 if self.args["no_scale_embedding"] else math.sqrt(self.embed_dim)
        self.attn_scale_factor = self.args["attn_scale_factor"]
        self.scaling = float(self.head_dim * self.attn_scale_factor) ** -0.5
        self.pos_scaling = float(
            self.embed_dim / self.num_heads * self.attn_scale_factor) ** -0.5
        self.bn_eps = 1e-3 if self.args["sync_bn"] else 1e-5
        activation = self.args["activation_fn"] or "relu"
        if activation not in _ACTIVATIONS:
            raise OfaconvError(f"unknown activation_fn '{activation}'")
        self.activation_fn = _ACTIVATIONS[activation]
        self.encoder_normalize_before = bool(self.args["encoder_normalize_before"])
        self.decoder_normalize_before = bool(self.args["decoder_normalize_before"])
        # fairseq tests ``entangle_position_embedding is not None``; the flag is a bool, so the
        # decoder adds target positions to the token embeddings whenever disable_entangle is off.
        self.decoder_entangle = not self.args["disable_entangle"]
        self.encoder_entangle = bool(self.args["entangle_position_embedding"])

        self.token_rp_bucket = {side: self._rp_bucket(side, "token") for side in ("encoder",
                                                                               "decoder")}
        self.image_rp_bucket = self._rp_bucket("encoder", "image")

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any], *,
                        dtype: torch.dtype = torch.float32) -> "FairseqReference":
        """Build from a loaded fairseq checkpoint dict (``torch.load`` result)."""
        if "model" not in checkpoint:
            raise OfaconvError("not a fairseq checkpoint (no 'model' entry)", key="model")
        return cls(checkpoint["model"], model_args_from_checkpoint(checkpoint), dtype=dtype)

    # ----------------------------------------------------------------------------------------
    # state dict access

    def _as_parameters(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Detached copies-by-reference of the state dict, flagged like fairseq's modules.

        ``F.linear`` on a non-contiguous 3-D input takes a different (bitwise different) matmul
        path depending on whether the weight requires grad, even under ``no_grad``. fairseq's
        weights are ``nn.Parameter``s (requires_grad=True) except buffers and the embeddings its
        ``build_model`` freezes, so the same flags are set here for bit-identical results.
        """
        frozen: set[str] = set()
        share_all = bool(self.args.get("share_all_embeddings", True))
        share_out = bool(self.args.get("share_decoder_input_output_embed", True))
        freeze_enc = bool(self.args.get("freeze_encoder_embedding"))
        freeze_dec = bool(self.args.get("freeze_decoder_embedding"))
        decoder_embeds = ["decoder.embed_tokens.weight"]
        if share_out:
            decoder_embeds.append("decoder.output_projection.weight")
        if freeze_enc or (share_all and freeze_dec):
            frozen.add("encoder.embed_tokens.weight")
        if freeze_dec or (share_all and freeze_enc):
            frozen.update(decoder_embeds)

        params = {}
        for key, value in state_dict.items():
            tensor = value.detach()
            if tensor.is_floating_point():
                tensor = tensor.to(self.dtype)
                if not key.endswith(_BUFFER_SUFFIXES) and key not in frozen:
                    tensor.requires_grad_(True)
            params[key] = tensor
        return params

    def _p(self, key: str) -> Tensor:
        try:
            return self.sd[key]
        except KeyError:
            raise OfaconvError("missing from the fairseq state dict", key=key) from None

    def _opt(self, key: str) -> Tensor | None:
        return self.sd.get(key)

    def _count(self, prefix: str) -> int:
        indices = {int(k[len(prefix):].split(".", 1)[0]) for k in self.sd if k.startswith(prefix)}
        if not indices:
            raise OfaconvError("no layers in the fairseq state dict", key=prefix + "0")
        if indices != set(range(len(indices))):
            raise OfaconvError("layer indices are not contiguous", key=prefix + "*")
        return len(indices)

    def _rp_bucket(self, side: str, kind: str) -> Tensor:
        # fairseq loads these buffers from the checkpoint, so the checkpoint's own tables win;
        # they are recomputed only for state dicts that dropped them.
        key = f"{side}.{kind}_rp_bucket"
        if key in self.sd:
            return self.sd[key]
        from ofaconv.ofa.reference import buckets

        if kind == "token":
            # fairseq always builds the 1024 x 1024 table, whatever max_source_positions is
            return buckets.make_token_bucket_position(self.token_bucket_size)
        num_rel = (2 * self.image_bucket_size - 1) ** 2 + 3
        return buckets.make_image_bucket_position(self.image_bucket_size, num_rel)

    # ----------------------------------------------------------------------------------------
    # primitives (fairseq modules as functions of a key prefix)

    def _linear(self, x: Tensor, prefix: str) -> Tensor:
        return F.linear(x, self._p(prefix + ".weight"), self._opt(prefix + ".bias"))

    def _layer_norm(self, x: Tensor, prefix: str) -> Tensor:
        weight = self._p(prefix + ".weight")
        return F.layer_norm(x, weight.shape, weight, self._p(prefix + ".bias"), 1e-5)

    def _batch_norm(self, x: Tensor, prefix: str) -> Tensor:
        return F.batch_norm(
            x, self._p(prefix + ".running_mean"), self._p(prefix + ".running_var"),
            self._p(prefix + ".weight"), self._p(prefix + ".bias"),
            training=False, momentum=0.1, eps=self.bn_eps)

    def _embedding(self, ids: Tensor, prefix: str) -> Tensor:
        return F.embedding(ids, self._p(prefix + ".weight"))

    # ----------------------------------------------------------------------------------------
    # ResNet trunk (models/ofa/resnet.py; layer4 and fc are not built by OFA)

    def _bottleneck(self, x: Tensor, prefix: str, stride: int) -> Tensor:
        identity = x
        out = F.conv2d(x, self._p(prefix + ".conv1.weight"))
        out = F.relu(self._batch_norm(out, prefix + ".bn1"))
        out = F.conv2d(out, self._p(prefix + ".conv2.weight"), stride=stride, padding=1)
        out = F.relu(self._batch_norm(out, prefix + ".bn2"))
        out = F.conv2d(out, self._p(prefix + ".conv3.weight"))
        out = self._batch_norm(out, prefix + ".bn3")
        if prefix + ".downsample.0.weight" in self.sd:
            identity = F.conv2d(x, self._p(prefix + ".downsample.0.weight"), stride=stride)
            identity = self._batch_norm(identity, prefix + ".downsample.1")
        return F.relu(identity + out)

    def _resnet(self, images: Tensor) -> Tensor:
        prefix = "encoder.embed_images"
        x = F.conv2d(images, self._p(prefix + ".conv1.weight"), stride=2, padding=3)
        x = F.relu(self._batch_norm(x, prefix + ".bn1"))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        for layer, blocks in enumerate(self.resnet_blocks, start=1):
            for block in range(blocks):
                stride = 2 if layer > 1 and block == 0 else 1
                x = self._bottleneck(x, f"{prefix}.layer{layer}.{block}", stride)
        return x

    # ----------------------------------------------------------------------------------------
    # attention (models/ofa/unify_multihead_attention.py, the non-fused path OFA always takes)

    def _attention(self, prefix: str, query: Tensor, key: Tensor, *, attn_bias: Tensor,
                   key_padding_mask: Tensor | None = None,
                   attn_mask: Tensor | None = None,
                   incremental_state: dict[str, Tensor] | None = None,
                   static_kv: bool = False) -> Tensor:
        """With ``incremental_state`` (fairseq's saved ``prev_key``/``prev_value``, B x H x S x
        hd, under ``prefix``): self-attention appends this step's keys and values to the saved
        ones; encoder attention (``static_kv``) projects the encoder output once and reuses it."""
        tgt_len, bsz, embed_dim = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        saved_key, saved_value = prefix + ".prev_key", prefix + ".prev_value"
        reuse = incremental_state is not None and static_kv and saved_key in incremental_state
        q = self._linear(query, prefix + ".q_proj")
        k = v = None
        if not reuse:
            k = self._linear(key, prefix + ".k_proj")
            v = self._linear(key, prefix + ".v_proj")
        q *= self.scaling

        q = q.contiguous().view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        if not reuse:
            k = k.contiguous().view(-1, bsz * heads, head_dim).transpose(0, 1)
            v = v.contiguous().view(-1, bsz * heads, head_dim).transpose(0, 1)
        if incremental_state is not None:
            if saved_key in incremental_state:
                prev_k = incremental_state[saved_key].view(bsz * heads, -1, head_dim)
                prev_v = incremental_state[saved_value].view(bsz * heads, -1, head_dim)
                k, v = (prev_k, prev_v) if static_kv else (torch.cat([prev_k, k], dim=1),
                                                           torch.cat([prev_v, v], dim=1))
            incremental_state[saved_key] = k.view(bsz, heads, -1, head_dim)
            incremental_state[saved_value] = v.view(bsz, heads, -1, head_dim)
        src_len = k.size(1)

        attn_weights = torch.bmm(q, k.transpose(1, 2))
        attn_weights[:, :, -src_len:] += attn_bias[:, :, -src_len:]
        if attn_mask is not None:
            attn_weights += attn_mask.unsqueeze(0)
        if key_padding_mask is not None:
            attn_weights = attn_weights.view(bsz, heads, tgt_len, src_len)
            attn_weights = attn_weights.masked_fill(
                key_padding_mask.unsqueeze(1).unsqueeze(2).to(torch.bool), float("-inf"))
            attn_weights = attn_weights.view(bsz * heads, tgt_len, src_len)
        attn_probs = F.softmax(attn_weights, dim=-1, dtype=torch.float32).type_as(attn_weights)

        attn = torch.bmm(attn_probs, v)
        attn = attn.transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim)
        c_attn = self._opt(prefix + ".c_attn")
        if c_attn is not None:
            attn = attn.view(tgt_len, bsz, heads, head_dim)
            attn = torch.einsum("tbhd,h->tbhd", attn, c_attn)
            attn = attn.reshape(tgt_len, bsz, embed_dim)
        return self._linear(attn, prefix + ".out_proj")

    def _feed_forward(self, x: Tensor, residual: Tensor, prefix: str) -> Tensor:
        x = self.activation_fn(self._linear(x, prefix + ".fc1"))
        if prefix + ".ffn_layernorm.weight" in self.sd:
            x = self._layer_norm(x, prefix + ".ffn_layernorm")
        x = self._linear(x, prefix + ".fc2")
        w_resid = self._opt(prefix + ".w_resid")
        if w_resid is not None:
            residual = torch.mul(w_resid, residual)
        return residual + x

    # ----------------------------------------------------------------------------------------
    # encoder (TransformerEncoder.forward_scriptable)

    def _image_info(self, patch_images: Tensor):
        image_embed = self._resnet(patch_images)
        h, w = image_embed.shape[-2:]
        num_patches = h * w
        bucket = self.image_bucket_size
        if h > bucket or w > bucket:
            raise OfaconvError(
                f"image grid {h}x{w} exceeds the {bucket}x{bucket} position grid "
                f"(images up to {16 * bucket} px)")
        image_padding_mask = patch_images.new_zeros((patch_images.size(0), num_patches)).bool()
        position_idx = (torch.arange(w).unsqueeze(0).expand(h, w)
                        + torch.arange(h).unsqueeze(1) * bucket + 1)
        position_idx = position_idx.view(-1).to(patch_images.device)
        position_ids = position_idx[None, :].expand(patch_images.size(0), num_patches)
        image_embed = image_embed.flatten(2).transpose(1, 2)

        orig_hw = int(self.args["orig_patch_image_size"]) // 16
        if self.args["interpolate_position"] and num_patches > orig_hw * orig_hw:
            old_ids = (torch.arange(orig_hw).unsqueeze(0).expand(orig_hw, orig_hw)
                       + torch.arange(orig_hw).unsqueeze(1) * bucket + 1).to(patch_images.device)
            old_pos = self._embedding(old_ids, "encoder.embed_image_positions")
            old_pos = old_pos.reshape(1, orig_hw, orig_hw, -1).permute(0, 3, 1, 2)
            image_pos_embed = F.interpolate(old_pos, size=(h, w), mode="bilinear")
            image_pos_embed = image_pos_embed.permute(0, 2, 3, 1).reshape(1, num_patches, -1)
            image_pos_embed = image_pos_embed.expand(patch_images.size(0), -1, -1)
        else:
            image_pos_embed = self._embedding(position_ids, "encoder.embed_image_positions")
        return image_embed, num_patches, image_padding_mask, position_ids, image_pos_embed

    def _embed_source(self, src_tokens: Tensor, image_embed: Tensor | None, pos_embed: Tensor,
                      image_pos_embed: Tensor | None) -> Tensor:
        x = self.embed_scale * self._embedding(src_tokens, "encoder.embed_tokens")
        if self.encoder_entangle:
            x += pos_embed
        if "encoder.type_embedding.weight" in self.sd:
            x += self._embedding(src_tokens.new_zeros(x.size()[:2]), "encoder.type_embedding")
        if "encoder.layernorm_embedding.weight" in self.sd:
            x = self._layer_norm(x, "encoder.layernorm_embedding")
        if image_embed is not None:
            image_x = self.embed_scale * self._linear(image_embed, "encoder.image_proj")
            if self.encoder_entangle:
                image_x += image_pos_embed
            if "encoder.type_embedding.weight" in self.sd:
                image_x += self._embedding(src_tokens.new_ones(image_x.size()[:2]),
                                           "encoder.type_embedding")
            if "encoder.patch_layernorm_embedding.weight" in self.sd:
                image_x = self._layer_norm(image_x, "encoder.patch_layernorm_embedding")
            x = torch.cat([image_x, x], dim=1)
        return x

    def _token_rel_pos_bias(self, side: str, seq_len: int, idx: int) -> Tensor:
        rp_bucket = self.token_rp_bucket[side][:seq_len, :seq_len]
        values = self._embedding(rp_bucket, f"{side}.token_rel_pos_table_list.{idx}")
        return values.permute([2, 0, 1])

    def _image_rel_pos_bias(self, position_ids: Tensor, idx: int) -> Tensor:
        bsz, seq_len = position_ids.shape
        size = self.image_rp_bucket.size(1)
        rp_bucket = self.image_rp_bucket.unsqueeze(0).expand(bsz, size, size).gather(
            1, position_ids[:, :, None].expand(bsz, seq_len, size)
        ).gather(2, position_ids[:, None, :].expand(bsz, seq_len, seq_len))
        values = self._embedding(rp_bucket, f"encoder.image_rel_pos_table_list.{idx}")
        return values.permute(0, 3, 1, 2)

    def _encoder_layer(self, x: Tensor, idx: int, padding_mask: Tensor | None,
                       attn_bias: Tensor) -> Tensor:
        prefix = f"encoder.layers.{idx}"
        pre = self.encoder_normalize_before
        residual = x
        if pre:
            x = self._layer_norm(x, prefix + ".self_attn_layer_norm")
        x = self._attention(prefix + ".self_attn", x, x, attn_bias=attn_bias,
                            key_padding_mask=padding_mask)
        if prefix + ".attn_ln.weight" in self.sd:
            x = self._layer_norm(x, prefix + ".attn_ln")
        x = residual + x
        if not pre:
            x = self._layer_norm(x, prefix + ".self_attn_layer_norm")

        residual = x
        if pre:
            x = self._layer_norm(x, prefix + ".final_layer_norm")
        x = self._feed_forward(x, residual, prefix)
        if not pre:
            x = self._layer_norm(x, prefix + ".final_layer_norm")
        return x

    def _encode(self, src_tokens: Tensor, patch_images: Tensor | None,
                patch_masks: Tensor | None) -> dict[str, Tensor]:
        """fairseq-layout encoder output: encoder_out T x B x C, masks and positions B x T."""
        image_embed = image_pos_embed = position_ids = None
        num_patches = 0
        if patch_images is not None:
            patch_images = patch_images.to(self.dtype)
            (image_embed, num_patches, image_padding_mask, position_ids,
             image_pos_embed) = self._image_info(patch_images)
            if patch_masks is None:
                patch_masks = torch.ones(patch_images.size(0), dtype=torch.bool)
            image_padding_mask[~patch_masks.to(torch.bool)] = True

        padding_mask = src_tokens.eq(PAD)
        if patch_images is not None:
            padding_mask = torch.cat([image_padding_mask, padding_mask], dim=1)
        has_pads = bool(padding_mask.any())

        bsz, src_len = src_tokens.shape
        positions = torch.arange(src_len, device=src_tokens.device).expand(bsz, src_len)
        pos_embed = self._embedding(positions.contiguous(), "encoder.embed_positions")
        x = self._embed_source(src_tokens, image_embed, pos_embed, image_pos_embed)
        if has_pads:
            x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))
        x = x.transpose(0, 1)

        pos_embed = self._layer_norm(pos_embed, "encoder.pos_ln")
        if patch_images is not None:
            image_pos_embed = self._layer_norm(image_pos_embed, "encoder.image_pos_ln")
            pos_embed = torch.cat([image_pos_embed, pos_embed], dim=1)
        heads = self.num_heads
        pos_q = self._linear(pos_embed, "encoder.pos_q_linear").view(
            pos_embed.size(0), pos_embed.size(1), heads, -1).transpose(1, 2) * self.pos_scaling
        pos_k = self._linear(pos_embed, "encoder.pos_k_linear").view(
            pos_embed.size(0), pos_embed.size(1), heads, -1).transpose(1, 2)
        abs_pos_bias = torch.matmul(pos_q, pos_k.transpose(2, 3))

        total_len = x.size(0)
        for idx in range(self.encoder_layers):
            attn_bias = abs_pos_bias.clone()
            token_bias = self._token_rel_pos_bias("encoder", src_len, idx)
            attn_bias[:, :, -src_len:, -src_len:] += (
                token_bias.unsqueeze(0).expand(bsz, -1, -1, -1).contiguous())
            if patch_images is not None:
                attn_bias[:, :, :num_patches, :num_patches] += self._image_rel_pos_bias(
                    position_ids, idx)
            attn_bias = attn_bias.reshape(-1, total_len, total_len)
            x = self._encoder_layer(x, idx, padding_mask if has_pads else None, attn_bias)

        if "encoder.layer_norm.weight" in self.sd:
            x = self._layer_norm(x, "encoder.layer_norm")
        return {"encoder_out": x, "padding_mask": padding_mask, "position_embeddings": pos_embed}

    # ----------------------------------------------------------------------------------------
    # decoder (TransformerDecoder.extract_features_scriptable, no code masks)

    def _decoder_pos_bias(self, tgt_pos_embed: Tensor, src_pos_embed: Tensor | None) -> Tensor:
        bsz, tgt_len = tgt_pos_embed.shape[:2]
        heads = self.num_heads
        tgt_pos_embed = self._layer_norm(tgt_pos_embed, "decoder.pos_ln")
        kind, keys = ("cross", src_pos_embed) if src_pos_embed is not None else (
            "self", tgt_pos_embed)
        pos_q = self._linear(tgt_pos_embed, f"decoder.{kind}_pos_q_linear").view(
            bsz, tgt_len, heads, -1).transpose(1, 2) * self.pos_scaling
        pos_k = self._linear(keys, f"decoder.{kind}_pos_k_linear").view(
            bsz, keys.size(1), heads, -1).transpose(1, 2)
        return torch.matmul(pos_q, pos_k.transpose(2, 3))

    def _decoder_layer(self, x: Tensor, idx: int, enc: Tensor, enc_padding_mask: Tensor,
                       self_attn_mask: Tensor | None, self_padding_mask: Tensor | None,
                       self_attn_bias: Tensor, cross_attn_bias: Tensor,
                       incremental_state: dict[str, Tensor] | None) -> Tensor:
        prefix = f"decoder.layers.{idx}"
        pre = self.decoder_normalize_before
        residual = x
        if pre:
            x = self._layer_norm(x, prefix + ".self_attn_layer_norm")
        x = self._attention(prefix + ".self_attn", x, x, attn_bias=self_attn_bias,
                            key_padding_mask=self_padding_mask, attn_mask=self_attn_mask,
                            incremental_state=incremental_state)
        if prefix + ".self_attn_ln.weight" in self.sd:
            x = self._layer_norm(x, prefix + ".self_attn_ln")
        x = residual + x
        if not pre:
            x = self._layer_norm(x, prefix + ".self_attn_layer_norm")

        residual = x
        if pre:
            x = self._layer_norm(x, prefix + ".encoder_attn_layer_norm")
        x = self._attention(prefix + ".encoder_attn", x, enc, attn_bias=cross_attn_bias,
                            key_padding_mask=enc_padding_mask, incremental_state=incremental_state,
                            static_kv=True)
        if prefix + ".cross_attn_ln.weight" in self.sd:
            x = self._layer_norm(x, prefix + ".cross_attn_ln")
        x = residual + x
        if not pre:
            x = self._layer_norm(x, prefix + ".encoder_attn_layer_norm")

        residual = x
        if pre:
            x = self._layer_norm(x, prefix + ".final_layer_norm")
        x = self._feed_forward(x, residual, prefix)
        if not pre:
            x = self._layer_norm(x, prefix + ".final_layer_norm")
        return x

    def _decode(self, prev_output_tokens: Tensor, encoder_out: Mapping[str, Tensor],
                incremental_state: dict[str, Tensor] | None = None) -> Tensor:
        """Logits [B, T, V] from the fairseq-layout encoder output of :meth:`_encode`.

        With ``incremental_state`` (a dict the caller keeps across steps and reorders with the
        beams, every entry batch-first) this is fairseq's incremental decoding: positions and
        position biases still come from the whole prefix ``prev_output_tokens``, but only its
        last token is embedded and run through the layers, against the keys and values saved by
        the earlier steps; the logits are [B, 1, V].
        """
        enc = encoder_out["encoder_out"]
        enc_padding_mask = encoder_out["padding_mask"]
        bsz, tgt_len = prev_output_tokens.shape
        if tgt_len > self.token_rp_bucket["decoder"].size(0):
            raise OfaconvError(f"target length {tgt_len} exceeds the "
                               f"{self.token_rp_bucket['decoder'].size(0)} decoder positions")
        positions = torch.arange(tgt_len, device=prev_output_tokens.device).expand(bsz, tgt_len)
        tgt_pos_embed = self._embedding(positions.contiguous(), "decoder.embed_positions")

        self_abs_pos_bias = self._decoder_pos_bias(tgt_pos_embed, None)
        cross_abs_pos_bias = self._decoder_pos_bias(tgt_pos_embed,
                                                    encoder_out["position_embeddings"])
        cross_abs_pos_bias = cross_abs_pos_bias.reshape(-1, *cross_abs_pos_bias.size()[-2:])

        incremental = incremental_state is not None
        new_tokens = prev_output_tokens
        if incremental:
            new_tokens = prev_output_tokens[:, -1:]
            cross_abs_pos_bias = cross_abs_pos_bias[:, -1:, :]
            tgt_pos_embed = tgt_pos_embed[:, -1:, :]
        x = self.embed_scale * self._embedding(new_tokens, "decoder.embed_tokens")
        if self.decoder_entangle:
            x += tgt_pos_embed
        if "decoder.layernorm_embedding.weight" in self.sd:
            x = self._layer_norm(x, "decoder.layernorm_embedding")
        x = x.transpose(0, 1)

        # Incrementally, fairseq keeps the padding mask of the earlier steps' keys in its saved
        # state and appends the newest token's: every <pad> of the whole prefix is masked.
        self_padding_mask = None
        if prev_output_tokens.eq(PAD).any():
            self_padding_mask = prev_output_tokens.eq(PAD)

        for idx in range(self.decoder_layers):
            future_mask = None
            if not incremental:
                future_mask = torch.triu(torch.full([tgt_len, tgt_len], float("-inf")), 1).to(x)
            self_attn_bias = self_abs_pos_bias.clone()
            self_attn_bias += self._token_rel_pos_bias("decoder", tgt_len, idx).contiguous() \
                .unsqueeze(0)
            self_attn_bias = self_attn_bias.reshape(-1, *self_attn_bias.size()[-2:])
            if incremental:
                self_attn_bias = self_attn_bias[:, -1:, :]
            x = self._decoder_layer(x, idx, enc, enc_padding_mask, future_mask,
                                    self_padding_mask, self_attn_bias, cross_abs_pos_bias,
                                    incremental_state)

        if "decoder.layer_norm.weight" in self.sd:
            x = self._layer_norm(x, "decoder.layer_norm")
        x = x.transpose(0, 1)
        out_key = ("decoder.output_projection.weight"
                   if "decoder.output_projection.weight" in self.sd
                   else "decoder.embed_tokens.weight")
        return F.linear(x, self._p(out_key))

    @staticmethod
    def reorder_incremental_state(state: dict[str, Tensor], new_order: Tensor) -> None:
        """fairseq ``reorder_incremental_state``: the saved self-attention keys and values follow
        their hypotheses; the encoder attention's, the same for every beam of a sentence, move
        only when finished sentences leave the batch."""
        for name, saved in state.items():
            if ".encoder_attn." in name and saved.size(0) == new_order.size(0):
                continue
            state[name] = saved.index_select(0, new_order)

    # ----------------------------------------------------------------------------------------
    # public API (batch-first)

    @torch.no_grad()
    def encode(self, src_tokens: Tensor, patch_images: Tensor | None = None,
               patch_masks: Tensor | None = None) -> dict[str, Tensor]:
        """Encoder states, batch first.

        Returns ``encoder_out`` [B, L, d], ``padding_mask`` [B, L] (True = padding; image
        positions first, then text) and ``position_embeddings`` [B, L, d] (the normalised
        absolute positions the decoder's cross-attention bias is built from).
        """
        out = self._encode(src_tokens, patch_images, patch_masks)
        return {**out, "encoder_out": out["encoder_out"].transpose(0, 1)}

    @torch.no_grad()
    def decode(self, prev_output_tokens: Tensor, encoder_out: Mapping[str, Tensor]) -> Tensor:
        """Teacher-forced logits [B, T, V] given :meth:`encode`'s batch-first output."""
        fairseq_out = {**encoder_out, "encoder_out": encoder_out["encoder_out"].transpose(0, 1)}
        return self._decode(prev_output_tokens, fairseq_out)

    @torch.no_grad()
    def forward(self, src_tokens: Tensor, patch_images: Tensor | None,
                patch_masks: Tensor | None, prev_output_tokens: Tensor) -> Tensor:
        """Logits [B, T, V] of the whole model (fairseq ``OFAModel.forward`` in eval mode)."""
        return self._decode(prev_output_tokens,
                            self._encode(src_tokens, patch_images, patch_masks))

    __call__ = forward
