"""OFA (fairseq OFA-Sys) on transformers 5.

Self-contained (imports only torch and transformers, plus its sibling files):
ofaconv copies it into every converted folder for ``trust_remote_code=True``.

Parameter names are those of the existing OFA transformers ports (OFA-Sys, OFA-Compress,
OFA-Chinese, ModelScope), so their checkpoints load here and ours load there. The computation
follows fairseq's ``unify_transformer.py`` operation by operation, so that an fp32 forward on CPU
reproduces fairseq bit for bit. Relative-position bucket tables are derived, never stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import ModelOutput, Seq2SeqLMOutput, Seq2SeqModelOutput

from .buckets_ofa import (
    image_num_rel_dis,
    make_image_bucket_position,
    make_token_bucket_position,
    token_bucket_table_size,
)
from .configuration_ofa import OFAConfig
from .generation_ofa import ofa_generate

# ---------------------------------------------------------------------------------------------
# Relative position buckets (tables in buckets_ofa.py)
# ---------------------------------------------------------------------------------------------

_BUCKET_CACHE: dict = {}


def _cached_buckets(kind: str, bucket_size: int, extra: int, device: torch.device) -> torch.Tensor:
    key = (kind, bucket_size, extra, str(device))
    table = _BUCKET_CACHE.get(key)
    if table is None:
        # Cached across calls, so never an inference-mode tensor (autograd would refuse it later).
        with torch.inference_mode(False):
            if kind == "token":
                table = make_token_bucket_position(bucket_size, extra)
            else:
                table = make_image_bucket_position(bucket_size, extra)
            table = _BUCKET_CACHE[key] = table.to(device)
    return table


# ---------------------------------------------------------------------------------------------
# Outputs and cache
# ---------------------------------------------------------------------------------------------


@dataclass
class OFAEncoderOutput(ModelOutput):
    """Encoder states plus what the decoder needs besides them.

    ``padding_mask`` is True at padded positions (text pads, and all patches of an image whose
    ``patch_masks`` entry is False); ``position_embedding`` is the encoder's normalised absolute
    position embedding, which the decoder's cross-attention bias reads.
    """

    last_hidden_state: Optional[torch.FloatTensor] = None
    padding_mask: Optional[torch.BoolTensor] = None
    position_embedding: Optional[torch.FloatTensor] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


class OFADecoderCache:
    """Per-layer key/value cache: self-attention grows by one step at a time, cross-attention
    keys/values are computed once from the encoder output. Tensors are [batch*heads, len, hd]."""

    def __init__(self, num_layers: int):
        self.self_kv: list = [None] * num_layers
        self.cross_kv: list = [None] * num_layers
        # Encoder positions through cross_pos_k_linear, [batch, heads, src_len, hd]: static like cross_kv.
        self.cross_pos_key = None

    def get_seq_length(self) -> int:
        return 0 if self.self_kv[0] is None else self.self_kv[0][0].shape[1]

    def reorder(self, batch_index: torch.Tensor, num_heads: int) -> None:
        """Select rows of the batch (beam reordering); ``batch_index`` indexes the batch dim."""
        flat = (batch_index[:, None] * num_heads + torch.arange(num_heads, device=batch_index.device)).reshape(-1)
        for store in (self.self_kv, self.cross_kv):
            for i, kv in enumerate(store):
                if kv is not None:
                    store[i] = (kv[0].index_select(0, flat), kv[1].index_select(0, flat))
        if self.cross_pos_key is not None:
            self.cross_pos_key = self.cross_pos_key.index_select(0, batch_index)


# ---------------------------------------------------------------------------------------------
# ResNet trunk (layer1..layer3 of a Bottleneck ResNet; fairseq OFA resnet.py)
# ---------------------------------------------------------------------------------------------


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    # One draw per sample, as fairseq does (the old HF port dropped per position instead).
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
    random_tensor.floor_()
    return x.div(keep_prob) * random_tensor


class OFADropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class OFABottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, drop_path_rate=0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = OFADropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = identity + self.drop_path(out)
        return self.relu(out)


class OFAResNet(nn.Module):
    def __init__(self, layers, drop_path_rate=0.0):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0], drop_path_rate=drop_path_rate)
        self.layer2 = self._make_layer(128, layers[1], stride=2, drop_path_rate=drop_path_rate)
        self.layer3 = self._make_layer(256, layers[2], stride=2, drop_path_rate=drop_path_rate)

    def _make_layer(self, planes, blocks, stride=1, drop_path_rate=0.0):
        downsample = None
        if stride != 1 or self.inplanes != planes * OFABottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * OFABottleneck.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * OFABottleneck.expansion),
            )
        layers = [OFABottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * OFABottleneck.expansion
        rates = [x.item() for x in torch.linspace(0, drop_path_rate, blocks, device="cpu")]
        for i in range(1, blocks):
            layers.append(OFABottleneck(self.inplanes, planes, drop_path_rate=rates[i]))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


# ---------------------------------------------------------------------------------------------
# Attention and layers
# ---------------------------------------------------------------------------------------------


class OFAAttention(nn.Module):
    """fairseq OFA multi-head attention: scaled by (head_dim * attn_scale_factor) ** -0.5, an
    additive position bias, softmax in fp32, NormFormer head scales ``c_attn``.

    ``config._attn_implementation`` picks the kernel: ``"eager"`` is fairseq's arithmetic operation
    by operation (bit-exact on CPU fp32, what ofaconv's parity checks use); ``"sdpa"`` hands the
    same additive bias to ``scaled_dot_product_attention`` (equal within float rounding). A call
    that asks for the attention weights runs eager, as sdpa cannot return them.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, scale_factor=2.0, scale_heads=True, config=None):
        super().__init__()
        self.config = config
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.scaling = float(self.head_dim * scale_factor) ** -0.5
        self.dropout = dropout
        self.c_attn = nn.Parameter(torch.ones(num_heads)) if scale_heads else None
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq_len, _ = x.shape
        return x.view(bsz, seq_len, self.num_heads, self.head_dim).transpose(1, 2).reshape(
            bsz * self.num_heads, seq_len, self.head_dim
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: Optional[torch.Tensor] = None,
        attn_bias: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
        past_key_value: Optional[tuple] = None,
        is_cross_attention: bool = False,
        output_attentions: bool = False,
    ):
        bsz, tgt_len, embed_dim = hidden_states.shape
        q = self._heads(self.q_proj(hidden_states) * self.scaling)
        if is_cross_attention and past_key_value is not None:
            k, v = past_key_value
        else:
            source = hidden_states if key_value_states is None else key_value_states
            k = self._heads(self.k_proj(source))
            v = self._heads(self.v_proj(source))
            if past_key_value is not None:  # growing self-attention cache
                k = torch.cat([past_key_value[0], k], dim=1)
                v = torch.cat([past_key_value[1], v], dim=1)
        src_len = k.shape[1]

        if not output_attentions and getattr(self.config, "_attn_implementation", "eager") == "sdpa":
            attn = self._sdpa(q, k, v, attn_bias, attn_mask, key_padding_mask, bsz, tgt_len, src_len)
            return self.out_proj(attn.reshape(bsz, tgt_len, embed_dim)), None, (k, v)

        attn_weights = torch.bmm(q, k.transpose(1, 2))
        if attn_bias is not None:
            attn_weights += attn_bias
        if attn_mask is not None:
            attn_weights += attn_mask.unsqueeze(0)
        if key_padding_mask is not None:
            attn_weights = attn_weights.view(bsz, self.num_heads, tgt_len, src_len)
            attn_weights = attn_weights.masked_fill(key_padding_mask[:, None, None, :].to(torch.bool), float("-inf"))
            attn_weights = attn_weights.view(bsz * self.num_heads, tgt_len, src_len)
        attn_probs = F.softmax(attn_weights.float(), dim=-1).type_as(attn_weights)
        probs = F.dropout(attn_probs, p=self.dropout, training=self.training)
        attn = torch.bmm(probs, v)
        attn = attn.view(bsz, self.num_heads, tgt_len, self.head_dim).transpose(1, 2)
        if self.c_attn is not None:
            attn = attn * self.c_attn[:, None]
        attn = self.out_proj(attn.reshape(bsz, tgt_len, embed_dim))
        weights = attn_probs.view(bsz, self.num_heads, tgt_len, src_len) if output_attentions else None
        return attn, weights, (k, v)

    def _sdpa(self, q, k, v, attn_bias, attn_mask, key_padding_mask, bsz, tgt_len, src_len):
        """The eager arithmetic through ``scaled_dot_product_attention``: one additive float mask
        (position bias + causal mask + -inf at padded keys); ``q`` is already scaled."""
        shape = (bsz, self.num_heads, -1, self.head_dim)
        if attn_bias is None:
            mask = q.new_zeros(bsz, 1, tgt_len, src_len)
        else:
            mask = attn_bias.view(bsz, self.num_heads, tgt_len, src_len)
        if attn_mask is not None:
            mask = mask + attn_mask
        if key_padding_mask is not None:
            mask = mask.masked_fill(key_padding_mask[:, None, None, :].to(torch.bool), float("-inf"))
        attn = F.scaled_dot_product_attention(
            q.view(shape), k.view(shape), v.view(shape), attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0, scale=1.0,
        )
        attn = attn.transpose(1, 2)
        if self.c_attn is not None:
            attn = attn * self.c_attn[:, None]
        return attn


def _layer_norm_or_none(enabled: bool, dim: int):
    return nn.LayerNorm(dim) if enabled else None


class OFALayerBase(nn.Module):
    """Residual sublayers shared by encoder and decoder layers: pre-LN (or post-LN) with
    NormFormer's mid LayerNorms after attention and inside the feed-forward block."""

    def _init_feed_forward(self, config: OFAConfig, ffn_dim: int, normalize_before: bool, drop_path_rate: float):
        d = config.d_model
        self.dropout = config.dropout
        self.activation_dropout = config.activation_dropout
        self.normalize_before = normalize_before
        self.fc1 = nn.Linear(d, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d)
        self.ffn_layer_norm = _layer_norm_or_none(config.normformer, ffn_dim)
        self.final_layer_norm = nn.LayerNorm(d)
        self.drop_path = OFADropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()

    def _residual(self, residual, hidden_states, norm):
        hidden_states = F.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = residual + self.drop_path(hidden_states)
        return hidden_states if self.normalize_before else norm(hidden_states)

    def _attention_block(self, hidden_states, attention, norm, mid_norm, **kwargs):
        residual = hidden_states
        if self.normalize_before:
            hidden_states = norm(hidden_states)
        hidden_states, weights, kv = attention(hidden_states, **kwargs)
        if mid_norm is not None:
            hidden_states = mid_norm(hidden_states)
        return self._residual(residual, hidden_states, norm), weights, kv

    def _feed_forward_block(self, hidden_states):
        residual = hidden_states
        if self.normalize_before:
            hidden_states = self.final_layer_norm(hidden_states)
        hidden_states = _gelu(self.fc1(hidden_states))
        hidden_states = F.dropout(hidden_states, p=self.activation_dropout, training=self.training)
        if self.ffn_layer_norm is not None:
            hidden_states = self.ffn_layer_norm(hidden_states)
        hidden_states = self.fc2(hidden_states)
        return self._residual(residual, hidden_states, self.final_layer_norm)


class OFAEncoderLayer(OFALayerBase):
    def __init__(self, config: OFAConfig, drop_path_rate: float = 0.0):
        super().__init__()
        d = config.d_model
        self.self_attn = OFAAttention(
            d, config.encoder_attention_heads, config.attention_dropout, config.attn_scale_factor, config.normformer,
            config=config,
        )
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.self_attn_mid_layer_norm = _layer_norm_or_none(config.normformer, d)
        self._init_feed_forward(config, config.encoder_ffn_dim, config.encoder_normalize_before, drop_path_rate)

    def forward(self, hidden_states, attn_bias, key_padding_mask, output_attentions=False):
        hidden_states, weights, _ = self._attention_block(
            hidden_states, self.self_attn, self.self_attn_layer_norm, self.self_attn_mid_layer_norm,
            attn_bias=attn_bias, key_padding_mask=key_padding_mask, output_attentions=output_attentions,
        )
        return self._feed_forward_block(hidden_states), weights


class OFADecoderLayer(OFALayerBase):
    def __init__(self, config: OFAConfig, drop_path_rate: float = 0.0):
        super().__init__()
        d = config.d_model
        heads = config.decoder_attention_heads
        self.self_attn = OFAAttention(d, heads, config.attention_dropout, config.attn_scale_factor, config.normformer,
                                      config=config)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.self_attn_mid_layer_norm = _layer_norm_or_none(config.normformer, d)
        self.cross_attn = OFAAttention(d, heads, config.attention_dropout, config.attn_scale_factor, config.normformer,
                                       config=config)
        self.cross_attn_layer_norm = nn.LayerNorm(d)
        self.cross_attn_mid_layer_norm = _layer_norm_or_none(config.normformer, d)
        self._init_feed_forward(config, config.decoder_ffn_dim, config.decoder_normalize_before, drop_path_rate)

    def forward(
        self,
        hidden_states,
        encoder_hidden_states,
        encoder_padding_mask,
        self_attn_bias,
        cross_attn_bias,
        self_attn_mask=None,
        self_attn_padding_mask=None,
        past_self_kv=None,
        past_cross_kv=None,
        output_attentions=False,
    ):
        hidden_states, self_weights, self_kv = self._attention_block(
            hidden_states, self.self_attn, self.self_attn_layer_norm, self.self_attn_mid_layer_norm,
            attn_bias=self_attn_bias, attn_mask=self_attn_mask, key_padding_mask=self_attn_padding_mask,
            past_key_value=past_self_kv, output_attentions=output_attentions,
        )
        hidden_states, cross_weights, cross_kv = self._attention_block(
            hidden_states, self.cross_attn, self.cross_attn_layer_norm, self.cross_attn_mid_layer_norm,
            key_value_states=encoder_hidden_states, attn_bias=cross_attn_bias, key_padding_mask=encoder_padding_mask,
            past_key_value=past_cross_kv, is_cross_attention=True, output_attentions=output_attentions,
        )
        return self._feed_forward_block(hidden_states), self_kv, cross_kv, self_weights, cross_weights


def _gelu(x: torch.Tensor) -> torch.Tensor:
    # fairseq computes the exact (erf) GELU in fp32 and casts back.
    return F.gelu(x.float()).type_as(x)


def _pos_bias(q_linear, k_linear, q_pos, k_pos, num_heads, scaling):
    """TUPE-style absolute position bias: [B, H, Tq, Tk]."""
    bsz, q_len, _ = q_pos.shape
    k_len = k_pos.shape[1]
    q = q_linear(q_pos).view(bsz, q_len, num_heads, -1).transpose(1, 2) * scaling
    k = k_linear(k_pos).view(bsz, k_len, num_heads, -1).transpose(1, 2)
    return torch.matmul(q, k.transpose(2, 3))


# ---------------------------------------------------------------------------------------------
# Pre-trained model base
# ---------------------------------------------------------------------------------------------


class OFAPreTrainedModel(PreTrainedModel):
    config_class = OFAConfig
    config: OFAConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _no_split_modules = ["OFAEncoderLayer", "OFADecoderLayer"]
    # Old ports stored derived tables and fairseq bookkeeping; we derive the tables instead.
    _keys_to_ignore_on_load_unexpected = [
        r"(en|de)coder\.(token|image)_rp_bucket",
        r"decoder\.image_position_idx",
        r"(en|de)coder\.version",
    ]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            module.weight.fill_(1.0)
            module.bias.zero_()
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
                module.num_batches_tracked.zero_()
        elif isinstance(module, OFAAttention) and module.c_attn is not None:
            module.c_attn.fill_(1.0)
        if isinstance(module, OFAStack):
            for table in list(module.token_rel_pos_table_list) + list(module.image_rel_pos_table_list):
                table.weight.zero_()


# ---------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------


class OFAStack(OFAPreTrainedModel):
    """What the encoder and decoder share: token embeddings, absolute positions and their
    LayerNorms, and per-layer relative-position tables."""

    def _init_stack(self, config: OFAConfig, num_heads: int, num_layers: int, embed_tokens):
        d = config.d_model
        self.num_heads = num_heads
        self.dropout = config.dropout
        self.padding_idx = config.pad_token_id
        self.embed_scale = math.sqrt(d) if config.scale_embedding else 1.0
        self.embed_tokens = embed_tokens if embed_tokens is not None else nn.Embedding(config.vocab_size, d, config.pad_token_id)
        self.layernorm_embedding = _layer_norm_or_none(config.layernorm_embedding, d)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + 2, d)
        self.embed_image_positions = nn.Embedding(config.image_bucket_size**2 + 1, d)
        self.pos_ln = nn.LayerNorm(d)
        self.image_pos_ln = nn.LayerNorm(d)
        self.pos_scaling = float(d / num_heads * config.attn_scale_factor) ** -0.5
        self.token_rel_pos_table_list = nn.ModuleList(
            [nn.Embedding(2 * config.token_bucket_size - 1, num_heads) for _ in range(num_layers)]
        )
        self.image_rel_pos_table_list = nn.ModuleList(
            [nn.Embedding(image_num_rel_dis(config.image_bucket_size), num_heads) for _ in range(num_layers)]
        )

    def token_rp_bucket(self, device) -> torch.Tensor:
        size = token_bucket_table_size(self.config.max_position_embeddings)
        return _cached_buckets("token", self.config.token_bucket_size, size, device)

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value


class OFAEncoder(OFAStack):
    def __init__(self, config: OFAConfig, embed_tokens: Optional[nn.Embedding] = None):
        super().__init__(config)
        d = config.d_model
        self._init_stack(config, config.encoder_attention_heads, config.encoder_layers, embed_tokens)
        self.type_embedding = nn.Embedding(2, d) if config.add_type_embedding else None
        self.embed_images = OFAResNet(config.resnet_layers, drop_path_rate=config.resnet_drop_path_rate)
        self.image_proj = nn.Linear(1024, d)
        self.patch_layernorm_embedding = _layer_norm_or_none(config.patch_layernorm_embedding, d)
        self.pos_q_linear = nn.Linear(d, d)
        self.pos_k_linear = nn.Linear(d, d)
        rates = [x.item() for x in torch.linspace(0, config.encoder_drop_path_rate, config.encoder_layers, device="cpu")]
        self.layers = nn.ModuleList([OFAEncoderLayer(config, rates[i]) for i in range(config.encoder_layers)])
        self.layer_norm = _layer_norm_or_none(config.encoder_normalize_before, d)
        self.post_init()

    def image_rp_bucket(self, device) -> torch.Tensor:
        bucket = self.config.image_bucket_size
        return _cached_buckets("image", bucket, image_num_rel_dis(bucket), device)

    def _image_inputs(self, patch_images: torch.Tensor):
        image_embed = self.embed_images(patch_images)
        h, w = image_embed.shape[-2:]
        num_patches = h * w
        bsz = patch_images.shape[0]
        device = patch_images.device
        bucket = self.config.image_bucket_size
        position_idx = torch.arange(w).unsqueeze(0).expand(h, w) + torch.arange(h).unsqueeze(1) * bucket + 1
        position_ids = position_idx.view(-1).to(device)[None, :].expand(bsz, num_patches)
        image_embed = image_embed.flatten(2).transpose(1, 2)
        orig_hw = self.config.orig_patch_image_size // 16
        if self.config.interpolate_position and num_patches > orig_hw * orig_hw:
            # OFA-Huge: image position embeddings learned on a smaller grid, resized bilinearly.
            old_ids = torch.arange(orig_hw).unsqueeze(0).expand(orig_hw, orig_hw) + torch.arange(orig_hw).unsqueeze(1) * bucket + 1
            old_embed = self.embed_image_positions(old_ids.to(device))
            old_embed = old_embed.reshape(1, orig_hw, orig_hw, -1).permute(0, 3, 1, 2)
            image_pos_embed = F.interpolate(old_embed, size=(h, w), mode="bilinear")
            image_pos_embed = image_pos_embed.permute(0, 2, 3, 1).reshape(1, num_patches, -1).expand(bsz, -1, -1)
        else:
            image_pos_embed = self.embed_image_positions(position_ids)
        return image_embed, num_patches, position_ids, image_pos_embed

    def _image_rel_bias(self, position_ids, idx):
        bsz, seq_len = position_ids.shape
        table = self.image_rp_bucket(position_ids.device)
        size = table.size(1)
        rp_bucket = (
            table.unsqueeze(0)
            .expand(bsz, size, size)
            .gather(1, position_ids[:, :, None].expand(bsz, seq_len, size))
            .gather(2, position_ids[:, None, :].expand(bsz, seq_len, seq_len))
        )
        return F.embedding(rp_bucket, self.image_rel_pos_table_list[idx].weight).permute(0, 3, 1, 2)

    def _token_rel_bias(self, bsz, seq_len, idx, device):
        rp_bucket = self.token_rp_bucket(device)[:seq_len, :seq_len]
        values = F.embedding(rp_bucket, self.token_rel_pos_table_list[idx].weight)
        return values.unsqueeze(0).expand(bsz, -1, -1, -1).permute([0, 3, 1, 2])

    def forward(
        self,
        input_ids: torch.LongTensor,
        patch_images: Optional[torch.Tensor] = None,
        patch_masks: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        **kwargs,
    ) -> OFAEncoderOutput:
        bsz, src_len = input_ids.shape
        device = input_ids.device
        if attention_mask is not None:
            text_padding = ~attention_mask.to(torch.bool)
        else:
            text_padding = input_ids.eq(self.padding_idx)

        x = self.embed_scale * self.embed_tokens(input_ids)
        if self.type_embedding is not None:
            x = x + self.type_embedding(input_ids.new_zeros(x.shape[:2]))
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = F.dropout(x, p=self.dropout, training=self.training)

        padding_mask = text_padding
        num_patches = 0
        if patch_images is not None:
            # processors give fp32 pixels; a bf16/fp16 model casts them, as stock vision models do
            patch_images = patch_images.to(self.embed_images.conv1.weight.dtype)
            image_embed, num_patches, image_position_ids, image_pos_embed = self._image_inputs(patch_images)
            image_padding = torch.zeros(bsz, num_patches, dtype=torch.bool, device=device)
            if patch_masks is not None:
                image_padding[~patch_masks.to(torch.bool)] = True
            image_x = self.embed_scale * self.image_proj(image_embed)
            if self.type_embedding is not None:
                image_x = image_x + self.type_embedding(input_ids.new_ones(image_x.shape[:2]))
            if self.patch_layernorm_embedding is not None:
                image_x = self.patch_layernorm_embedding(image_x)
            image_x = F.dropout(image_x, p=self.dropout, training=self.training)
            x = torch.cat([image_x, x], dim=1)
            padding_mask = torch.cat([image_padding, text_padding], dim=1)

        has_pads = bool(padding_mask.any())
        if has_pads:
            x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))

        pos_embed = self.pos_ln(self.embed_positions(torch.arange(src_len, device=device)[None, :].expand(bsz, src_len)))
        if patch_images is not None:
            pos_embed = torch.cat([self.image_pos_ln(image_pos_embed), pos_embed], dim=1)
        abs_pos_bias = _pos_bias(self.pos_q_linear, self.pos_k_linear, pos_embed, pos_embed, self.num_heads, self.pos_scaling)

        all_hidden_states = (x,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        total_len = x.shape[1]
        for idx, layer in enumerate(self.layers):
            bias = abs_pos_bias.clone()
            bias[:, :, -src_len:, -src_len:] += self._token_rel_bias(bsz, src_len, idx, device)
            if patch_images is not None:
                bias[:, :, :num_patches, :num_patches] += self._image_rel_bias(image_position_ids, idx)
            bias = bias.reshape(-1, total_len, total_len)
            x, weights = layer(x, bias, padding_mask if has_pads else None, output_attentions)
            if output_hidden_states:
                all_hidden_states += (x,)
            if output_attentions:
                all_attentions += (weights,)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return OFAEncoderOutput(
            last_hidden_state=x,
            padding_mask=padding_mask,
            position_embedding=pos_embed,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )


# ---------------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------------


class OFADecoder(OFAStack):
    def __init__(self, config: OFAConfig, embed_tokens: Optional[nn.Embedding] = None):
        super().__init__(config)
        d = config.d_model
        self._init_stack(config, config.decoder_attention_heads, config.decoder_layers, embed_tokens)
        # Used only when generating image codes; kept so every released weight has a home.
        self.code_layernorm_embedding = _layer_norm_or_none(config.code_layernorm_embedding, d)
        self.self_pos_q_linear = nn.Linear(d, d)
        self.self_pos_k_linear = nn.Linear(d, d)
        self.cross_pos_q_linear = nn.Linear(d, d)
        self.cross_pos_k_linear = nn.Linear(d, d)
        rates = [x.item() for x in torch.linspace(0, config.decoder_drop_path_rate, config.decoder_layers, device="cpu")]
        self.layers = nn.ModuleList([OFADecoderLayer(config, rates[i]) for i in range(config.decoder_layers)])
        self.layer_norm = _layer_norm_or_none(config.decoder_normalize_before, d)
        self.output_projection = nn.Linear(d, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor,
        encoder_hidden_states: torch.Tensor,
        encoder_padding_mask: Optional[torch.Tensor],
        encoder_position_embedding: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[OFADecoderCache] = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ):
        """``input_ids`` are the new tokens only when ``past_key_values`` holds earlier steps;
        positions and relative buckets always use the true absolute index."""
        bsz, new_len = input_ids.shape
        device = input_ids.device
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        total_len = past_len + new_len
        if use_cache and past_key_values is None:
            past_key_values = OFADecoderCache(len(self.layers))

        tgt_pos_embed = self.embed_positions(torch.arange(total_len, device=device)[None, :].expand(bsz, total_len))
        tgt_pos_normed = self.pos_ln(tgt_pos_embed)
        self_abs_pos_bias = _pos_bias(
            self.self_pos_q_linear, self.self_pos_k_linear, tgt_pos_normed, tgt_pos_normed, self.num_heads, self.pos_scaling
        )
        cross_pos_key = past_key_values.cross_pos_key if past_key_values is not None else None
        if cross_pos_key is None:
            src_len = encoder_position_embedding.shape[1]
            cross_pos_key = self.cross_pos_k_linear(encoder_position_embedding)
            cross_pos_key = cross_pos_key.view(bsz, src_len, self.num_heads, -1).transpose(1, 2)
            if past_key_values is not None:
                past_key_values.cross_pos_key = cross_pos_key
        cross_pos_query = self.cross_pos_q_linear(tgt_pos_normed[:, past_len:, :])
        cross_pos_query = cross_pos_query.view(bsz, new_len, self.num_heads, -1).transpose(1, 2) * self.pos_scaling
        cross_abs_pos_bias = torch.matmul(cross_pos_query, cross_pos_key.transpose(2, 3))
        cross_abs_pos_bias = cross_abs_pos_bias.reshape(-1, new_len, cross_abs_pos_bias.shape[-1])

        x = self.embed_scale * self.embed_tokens(input_ids)
        if not self.config.disable_entangle:
            # fairseq adds the raw target positions whenever disable_entangle is False.
            x = x + tgt_pos_embed[:, past_len:, :]
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = F.dropout(x, p=self.dropout, training=self.training)

        if attention_mask is not None:
            self_padding = ~attention_mask.to(torch.bool)
            self_padding = self_padding if bool(self_padding.any()) else None
        else:
            self_padding = input_ids.eq(self.padding_idx) if bool(input_ids.eq(self.padding_idx).any()) else None
        if self_padding is not None and past_len > 0 and self_padding.shape[1] != total_len:
            self_padding = torch.cat([self_padding.new_zeros(bsz, past_len), self_padding], dim=1)

        causal_mask = None
        if new_len > 1:
            causal_mask = torch.triu(
                torch.full((new_len, total_len), float("-inf"), device=device, dtype=x.dtype), past_len + 1
            )

        rp_bucket = self.token_rp_bucket(device)[past_len:total_len, :total_len]
        all_hidden_states = (x,) if output_hidden_states else None
        all_self_attns = () if output_attentions else None
        all_cross_attns = () if output_attentions else None
        for idx, layer in enumerate(self.layers):
            rel = F.embedding(rp_bucket, self.token_rel_pos_table_list[idx].weight).permute([2, 0, 1])
            self_bias = self_abs_pos_bias[:, :, past_len:, :].clone()
            self_bias += rel.unsqueeze(0)
            self_bias = self_bias.reshape(-1, new_len, total_len)
            x, self_kv, cross_kv, self_w, cross_w = layer(
                x,
                encoder_hidden_states,
                encoder_padding_mask,
                self_bias,
                cross_abs_pos_bias,
                self_attn_mask=causal_mask,
                self_attn_padding_mask=self_padding,
                past_self_kv=past_key_values.self_kv[idx] if past_key_values is not None else None,
                past_cross_kv=past_key_values.cross_kv[idx] if past_key_values is not None else None,
                output_attentions=output_attentions,
            )
            if use_cache:
                past_key_values.self_kv[idx] = self_kv
                past_key_values.cross_kv[idx] = cross_kv
            if output_hidden_states:
                all_hidden_states += (x,)
            if output_attentions:
                all_self_attns += (self_w,)
                all_cross_attns += (cross_w,)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return x, (past_key_values if use_cache else None), all_hidden_states, all_self_attns, all_cross_attns


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class OFAModel(OFAPreTrainedModel):
    """Encoder-decoder without the vocabulary projection (``last_hidden_state`` = decoder
    features). Keys are ``encoder.*`` / ``decoder.*`` with no prefix, as in every OFA port."""

    _tied_weights_keys = {
        "decoder.embed_tokens.weight": "encoder.embed_tokens.weight",
        "decoder.output_projection.weight": "encoder.embed_tokens.weight",
    }

    def __init__(self, config: OFAConfig):
        super().__init__(config)
        shared = nn.Embedding(config.vocab_size, config.d_model, config.pad_token_id)
        self.encoder = OFAEncoder(config, shared)
        self.decoder = OFADecoder(config, shared)
        self.post_init()

    def get_input_embeddings(self):
        return self.encoder.embed_tokens

    def set_input_embeddings(self, value):
        self.encoder.embed_tokens = value
        self.decoder.embed_tokens = value

    def get_output_embeddings(self):
        return self.decoder.output_projection

    def set_output_embeddings(self, new_embeddings):
        self.decoder.output_projection = new_embeddings

    def get_encoder(self, *args, **kwargs):
        return self.encoder

    def get_decoder(self, *args, **kwargs):
        return self.decoder

    def _encode_and_decode(
        self,
        input_ids,
        patch_images,
        patch_masks,
        decoder_input_ids,
        attention_mask,
        decoder_attention_mask,
        encoder_outputs,
        past_key_values,
        use_cache,
        output_attentions,
        output_hidden_states,
    ):
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids,
                patch_images=patch_images,
                patch_masks=patch_masks,
                attention_mask=attention_mask,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
            )
        elif isinstance(encoder_outputs, (tuple, list)):
            encoder_outputs = OFAEncoderOutput(*encoder_outputs)
        features, cache, dec_hidden, dec_self, dec_cross = self.decoder(
            decoder_input_ids,
            encoder_outputs.last_hidden_state,
            encoder_outputs.padding_mask,
            encoder_outputs.position_embedding,
            attention_mask=decoder_attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        return encoder_outputs, features, cache, dec_hidden, dec_self, dec_cross

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        patch_images: Optional[torch.Tensor] = None,
        patch_masks: Optional[torch.Tensor] = None,
        decoder_input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        decoder_attention_mask: Optional[torch.Tensor] = None,
        encoder_outputs=None,
        cache: Optional[OFADecoderCache] = None,
        use_cache: Optional[bool] = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        **kwargs,
    ) -> Seq2SeqModelOutput:
        """``cache`` (transformers 5's name; ``past_key_values`` is accepted too) holds the decoder
        keys/values of earlier steps; the output's ``cache`` is the updated one when ``use_cache``."""
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        encoder_outputs, features, cache, dec_hidden, dec_self, dec_cross = self._encode_and_decode(
            input_ids, patch_images, patch_masks, decoder_input_ids, attention_mask, decoder_attention_mask,
            encoder_outputs, cache, bool(use_cache), output_attentions, output_hidden_states,
        )
        return Seq2SeqModelOutput(
            last_hidden_state=features,
            cache=cache,
            decoder_hidden_states=dec_hidden,
            decoder_attentions=dec_self,
            cross_attentions=dec_cross,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    shifted = labels.new_zeros(labels.shape)
    shifted[:, 1:] = labels[:, :-1].clone()
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


class OFAForConditionalGeneration(OFAModel, GenerationMixin):
    """OFA with its tied vocabulary projection; ``logits`` are what fairseq's decoder returns."""

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        patch_images: Optional[torch.Tensor] = None,
        patch_masks: Optional[torch.Tensor] = None,
        decoder_input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        decoder_attention_mask: Optional[torch.Tensor] = None,
        encoder_outputs=None,
        cache: Optional[OFADecoderCache] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        if labels is not None and decoder_input_ids is None:
            decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)
        encoder_outputs, features, cache, dec_hidden, dec_self, dec_cross = self._encode_and_decode(
            input_ids, patch_images, patch_masks, decoder_input_ids, attention_mask, decoder_attention_mask,
            encoder_outputs, cache, bool(use_cache), output_attentions, output_hidden_states,
        )
        logits = self.decoder.output_projection(features)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=cache,
            decoder_hidden_states=dec_hidden,
            decoder_attentions=dec_self,
            cross_attentions=dec_cross,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )

    @torch.no_grad()
    def generate(self, inputs=None, generation_config=None, **kwargs):
        """Caption / decode as fairseq's SequenceGenerator does (see ``generation_ofa.py``).

        Greedy and beam search (``do_sample=False``) run fairseq's beam search with the key/value
        cache and return token ids ``[batch * num_return_sequences, T]`` (``0 ... 2``, right-padded
        with 1), or with ``return_dict_in_generate=True`` an ``OFAGenerateOutput`` (``sequences``,
        ``sequences_scores`` = fairseq's normalised scores, ``token_scores``, ``beam_indices``, and
        ``scores`` / ``logits`` / attentions / hidden states when asked). fairseq's knobs
        (``max_len_a``, ``max_len_b``, ``min_len``, ``lenpen``, ``fairseq_temperature``,
        ``constraint_range``, ``text_only``, ...) come from ``generation_config`` or kwargs; HF names
        map onto them (``max_new_tokens`` = ``max_len_b + 1``, ``length_penalty``, ``temperature``).
        transformers' arguments (``logits_processor``, ``stopping_criteria``, ``repetition_penalty``,
        ``bad_words_ids``, ``streamer`` at one beam, ...) apply on top of the search.
        ``do_sample=True`` runs transformers' sampling, recomputing the full prefix each step.
        """
        return ofa_generate(self, inputs, generation_config, **kwargs)
