"""Plain-maths forwards of the source models, computed straight from their own state dicts.

These never touch a transformers model class: they are the yardstick a converted folder is
checked against (features and logits, fp32). Chinese-CLIP's ViT runs through torch's
``multi_head_attention_forward`` on the fused ``in_proj`` weights, exactly as cn_clip's
``nn.MultiheadAttention`` does; BertCLIP's ViT is CLIP's (separate q/k/v, quick_gelu).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "bert_forward",
    "cnclip_encode_image",
    "cnclip_encode_text",
    "bertclip_encode_image",
    "bertclip_encode_text",
    "clip_logits",
    "squash_preprocess",
    "clip_crop_preprocess",
    "cnclip_token_ids",
]

State = Mapping[str, torch.Tensor]


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def _linear(s: State, prefix: str, x):
    return F.linear(x, s[f"{prefix}.weight"], s.get(f"{prefix}.bias"))


def _ln(s: State, prefix: str, x, eps: float):
    return F.layer_norm(x, x.shape[-1:], s[f"{prefix}.weight"], s[f"{prefix}.bias"], eps)


def bert_forward(s: State, prefix: str, input_ids, attention_mask, *, heads: int, eps: float = 1e-12, pooler: bool):
    """BERT encoder: returns (last_hidden_state, tanh pooler output or None). ``prefix`` ends with '.'."""
    p = prefix
    seq = input_ids.shape[1]
    x = (
        F.embedding(input_ids, s[f"{p}embeddings.word_embeddings.weight"])
        + s[f"{p}embeddings.position_embeddings.weight"][:seq][None]
        + s[f"{p}embeddings.token_type_embeddings.weight"][0][None, None]
    )
    x = _ln(s, f"{p}embeddings.LayerNorm", x, eps)
    bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
    b, n, h = x.shape
    d = h // heads
    i = 0
    while f"{p}encoder.layer.{i}.attention.self.query.weight" in s:
        lp = f"{p}encoder.layer.{i}"
        q, k, v = (
            _linear(s, f"{lp}.attention.self.{name}", x).view(b, n, heads, d).transpose(1, 2)
            for name in ("query", "key", "value")
        )
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1)
        ctx = (att @ v).transpose(1, 2).reshape(b, n, h)
        x = _ln(s, f"{lp}.attention.output.LayerNorm", _linear(s, f"{lp}.attention.output.dense", ctx) + x, eps)
        inner = F.gelu(_linear(s, f"{lp}.intermediate.dense", x))
        x = _ln(s, f"{lp}.output.LayerNorm", _linear(s, f"{lp}.output.dense", inner) + x, eps)
        i += 1
    pooled = torch.tanh(_linear(s, f"{p}pooler.dense", x[:, 0])) if pooler else None
    return x, pooled


# -- Chinese-CLIP (cn_clip/clip/model.py) --------------------------------------------------------
def cnclip_encode_image(s: State, pixel_values, *, heads: int):
    x = F.conv2d(pixel_values, s["visual.conv1.weight"], stride=s["visual.conv1.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = s["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + s["visual.positional_embedding"]
    x = _ln(s, "visual.ln_pre", x, 1e-5).transpose(0, 1)  # LND, as nn.MultiheadAttention wants
    width = x.shape[-1]
    i = 0
    while f"visual.transformer.resblocks.{i}.attn.in_proj_weight" in s:
        bp = f"visual.transformer.resblocks.{i}"
        y = _ln(s, f"{bp}.ln_1", x, 1e-5)
        att, _ = F.multi_head_attention_forward(
            y, y, y, width, heads,
            s[f"{bp}.attn.in_proj_weight"], s[f"{bp}.attn.in_proj_bias"],
            None, None, False, 0.0,
            s[f"{bp}.attn.out_proj.weight"], s[f"{bp}.attn.out_proj.bias"],
            training=False, need_weights=False,
        )
        x = x + att
        y = _ln(s, f"{bp}.ln_2", x, 1e-5)
        x = x + _linear(s, f"{bp}.mlp.c_proj", _quick_gelu(_linear(s, f"{bp}.mlp.c_fc", y)))
        i += 1
    x = _ln(s, "visual.ln_post", x[0], 1e-5)
    return x @ s["visual.proj"]


def cnclip_encode_text(s: State, input_ids, *, heads: int, pad_id: int = 0):
    mask = input_ids.ne(pad_id).long()
    hidden, _ = bert_forward(s, "bert.", input_ids, mask, heads=heads, pooler=False)
    return hidden[:, 0] @ s["text_projection"]


# -- BertCLIP (yangjianxin1/CLIP-Chinese component/model.py) --------------------------------------
def bertclip_encode_image(s: State, pixel_values, *, heads: int, eps: float = 1e-5, prefix: str = "vision_model."):
    p = prefix
    w = s[f"{p}embeddings.patch_embedding.weight"]
    x = F.conv2d(pixel_values, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    cls = s[f"{p}embeddings.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + s[f"{p}embeddings.position_embedding.weight"][None]
    x = _ln(s, f"{p}pre_layrnorm", x, eps)
    b, n, h = x.shape
    d = h // heads
    i = 0
    while f"{p}encoder.layers.{i}.self_attn.q_proj.weight" in s:
        lp = f"{p}encoder.layers.{i}"
        y = _ln(s, f"{lp}.layer_norm1", x, eps)
        q, k, v = (
            _linear(s, f"{lp}.self_attn.{name}_proj", y).view(b, n, heads, d).transpose(1, 2)
            for name in ("q", "k", "v")
        )
        att = torch.softmax((q * d**-0.5) @ k.transpose(-1, -2), dim=-1)
        x = x + _linear(s, f"{lp}.self_attn.out_proj", (att @ v).transpose(1, 2).reshape(b, n, h))
        y = _ln(s, f"{lp}.layer_norm2", x, eps)
        x = x + _linear(s, f"{lp}.mlp.fc2", _quick_gelu(_linear(s, f"{lp}.mlp.fc1", y)))
        i += 1
    pooled = _ln(s, f"{p}post_layernorm", x[:, 0], eps)
    return F.linear(pooled, s["visual_projection.weight"])


def bertclip_encode_text(s: State, input_ids, attention_mask, *, heads: int, eps: float = 1e-12):
    _, pooled = bert_forward(s, "text_model.", input_ids, attention_mask, heads=heads, eps=eps, pooler=True)
    return F.linear(pooled, s["text_projection.weight"])


def clip_logits(image_features, text_features, logit_scale):
    """(logits_per_image, logits_per_text) from unnormalised features, as both sources compute them."""
    img = image_features / image_features.norm(dim=-1, keepdim=True)
    txt = text_features / text_features.norm(dim=-1, keepdim=True)
    per_image = logit_scale.exp() * img @ txt.t()
    return per_image, per_image.t()


# -- pre-processing --------------------------------------------------------------------------------
def _to_tensor(img: Image.Image, mean, std):
    arr = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (arr - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def squash_preprocess(img: Image.Image, size: int, mean, std):
    """cn_clip's transform: Resize((R, R), BICUBIC) without crop, ToTensor, Normalize."""
    return _to_tensor(img.convert("RGB").resize((size, size), Image.BICUBIC), mean, std)


def clip_crop_preprocess(img: Image.Image, size: int, crop: int, mean, std):
    """OpenAI CLIP's transform: shortest edge -> size (BICUBIC), centre crop, ToTensor, Normalize."""
    img = img.convert("RGB")
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    nw, nh = (size, new_long) if w <= h else (new_long, size)
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - crop) // 2, (nh - crop) // 2
    return _to_tensor(img.crop((left, top, left + crop, top + crop)), mean, std)


def cnclip_token_ids(tokenizer, text: str, context_length: int = 52) -> list[int]:
    """cn_clip.clip.tokenize: [CLS] + wordpieces[:context-2] + [SEP], zero-padded to the context."""
    pieces = tokenizer(text, add_special_tokens=False, truncation=True, max_length=context_length - 2)["input_ids"]
    ids = [tokenizer.cls_token_id, *pieces, tokenizer.sep_token_id]
    return ids + [tokenizer.pad_token_id] * (context_length - len(ids))
