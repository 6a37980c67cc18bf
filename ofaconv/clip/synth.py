"""Synthetic checkpoints in the exact layouts of the real releases (no weights can be downloaded).

* ``write_cnclip_pt``: a Chinese-CLIP training checkpoint (``{"epoch","step","name","state_dict"}``,
  ``module.``-prefixed keys) for every released architecture, RN50 included, micro or full size.
* ``write_legacy_bertclip``: a BertCLIP folder as ``Trainer.save_model`` wrote it with transformers
  4.18 (config ``model_type: clip`` + BERT ``text_config``, ``pytorch_model.bin`` with the persisted
  ``position_ids`` buffers, CLIP preprocessor, BERT tokenizer files).
* ``write_openai_clip`` / ``write_bert``: the two inputs of ``ofaconv clip init``.

Every tensor is perturbed (no LayerNorm is the identity, no bias is zero) so a wrong mapping of any
single key changes the outputs.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .architectures import clip_tables

__all__ = [
    "tiny_vocab",
    "write_vocab",
    "cnclip_state_dict",
    "write_cnclip_pt",
    "bertclip_geometry",
    "legacy_bertclip_state_dict",
    "write_legacy_bertclip",
    "write_openai_clip",
    "write_bert",
    "perturb_",
]


def save_safetensors(state: dict, path: Path) -> None:
    """As the real files were written: ``safetensors.torch.save_file`` with transformers' metadata."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})

_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_CJK = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所"
    "民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事"
    "平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程"
    "展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战"
    "先回则任取据处队南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单风切打白教"
    "速花带安场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且究观"
    "越织装影算低持音众书布复容儿须际商非验连断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府称太准精值号率族"
    "维划选标写存候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包火住调满县局照参红细引听该铁价严猫狗鸟鱼车船飞机公交"
    "绿蓝黄黑紫橙粉灰左右角块图片照一只坐停"
)


def tiny_vocab() -> list[str]:
    """A small BERT-Chinese-style vocab: specials, CJK characters, ASCII letters/digits and ## pieces."""
    words = list(_SPECIAL)
    seen = set(words)
    for ch in _CJK:
        if ch not in seen:
            seen.add(ch)
            words.append(ch)
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789":
        words.append(ch)
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789":
        words.append("##" + ch)
    words += list(",.!?;:'\"()-，。！？、")
    return words


def write_vocab(path: str | os.PathLike, words: list[str] | None = None) -> Path:
    path = Path(path)
    path.write_text("\n".join(words or tiny_vocab()) + "\n", encoding="utf-8")
    return path


def perturb_(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Fill every floating tensor with non-trivial values (in place): LN weights around 1, biases
    small but non-zero, matrices scaled by fan-in so deep stacks stay well conditioned."""
    g = torch.Generator().manual_seed(seed)
    for key in sorted(state):
        t = state[key]
        if not t.is_floating_point():
            continue
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
        name = key.rsplit(".", 1)[-1]
        is_norm = any(s in key for s in ("LayerNorm", "layer_norm", "layernorm", "layrnorm", "ln_", ".bn"))
        if key.endswith("logit_scale"):
            value = torch.tensor(math.log(100.0)) - 0.05 * noise.abs()
        elif "running_var" in key:
            value = 1.0 + 0.2 * noise.abs()
        elif is_norm and name == "weight":
            value = 1.0 + 0.1 * noise
        elif name == "bias" or "running_mean" in key:
            value = 0.05 * noise
        elif t.dim() >= 2 and "embedding" not in key:
            fan_in = t.shape[1] * (t[0, 0].numel() if t.dim() > 2 else 1)
            value = noise / math.sqrt(fan_in)
        elif "word_embeddings" in key or "token_embedding" in key:
            value = 0.5 * noise
        else:  # class / position / token-type embeddings: CLIP's width**-0.5 scale
            value = noise * t.shape[-1] ** -0.5
        state[key] = value.to(t.dtype).reshape(t.shape)
    return state


# -- Chinese-CLIP --------------------------------------------------------------------------------
def _arch_dims(arch: str, micro: bool) -> dict:
    table = clip_tables()["cnclip_architectures"]
    if arch not in table:
        raise ValueError(f"unknown Chinese-CLIP architecture {arch!r}; known: {', '.join(table)}")
    spec = table[arch]
    vision = dict(spec["vision"])
    text = dict(clip_tables()["cnclip_text_defaults"], **spec["text"])
    embed = spec["embed_dim"]
    if micro:
        vision.update(spec["micro"]["vision"])
        text.update(spec["micro"]["text"])
        embed = spec["micro"]["embed_dim"]
        text["vocab_size"] = len(tiny_vocab())
    return {"vision": vision, "text": text, "embed_dim": embed}


def _bert_keys(prefix: str, t: dict, *, pooler: bool) -> dict[str, tuple]:
    h, f = t["hidden_size"], t["intermediate_size"]
    keys = {
        f"{prefix}embeddings.word_embeddings.weight": (t["vocab_size"], h),
        f"{prefix}embeddings.position_embeddings.weight": (t["max_position_embeddings"], h),
        f"{prefix}embeddings.token_type_embeddings.weight": (t["type_vocab_size"], h),
        f"{prefix}embeddings.LayerNorm.weight": (h,),
        f"{prefix}embeddings.LayerNorm.bias": (h,),
    }
    for i in range(t["num_hidden_layers"]):
        lp = f"{prefix}encoder.layer.{i}"
        for name in ("query", "key", "value"):
            keys[f"{lp}.attention.self.{name}.weight"] = (h, h)
            keys[f"{lp}.attention.self.{name}.bias"] = (h,)
        keys.update({
            f"{lp}.attention.output.dense.weight": (h, h), f"{lp}.attention.output.dense.bias": (h,),
            f"{lp}.attention.output.LayerNorm.weight": (h,), f"{lp}.attention.output.LayerNorm.bias": (h,),
            f"{lp}.intermediate.dense.weight": (f, h), f"{lp}.intermediate.dense.bias": (f,),
            f"{lp}.output.dense.weight": (h, f), f"{lp}.output.dense.bias": (h,),
            f"{lp}.output.LayerNorm.weight": (h,), f"{lp}.output.LayerNorm.bias": (h,),
        })
    if pooler:
        keys[f"{prefix}pooler.dense.weight"] = (h, h)
        keys[f"{prefix}pooler.dense.bias"] = (h,)
    return keys


def _cn_vit_keys(v: dict, embed: int) -> dict[str, tuple]:
    w, p, r = v["width"], v["patch_size"], v["image_size"]
    keys = {
        "visual.class_embedding": (w,),
        "visual.positional_embedding": ((r // p) ** 2 + 1, w),
        "visual.proj": (w, embed),
        "visual.conv1.weight": (w, 3, p, p),
        "visual.ln_pre.weight": (w,), "visual.ln_pre.bias": (w,),
    }
    for i in range(v["layers"]):
        bp = f"visual.transformer.resblocks.{i}"
        keys.update({
            f"{bp}.attn.in_proj_weight": (3 * w, w), f"{bp}.attn.in_proj_bias": (3 * w,),
            f"{bp}.attn.out_proj.weight": (w, w), f"{bp}.attn.out_proj.bias": (w,),
            f"{bp}.ln_1.weight": (w,), f"{bp}.ln_1.bias": (w,),
            f"{bp}.mlp.c_fc.weight": (4 * w, w), f"{bp}.mlp.c_fc.bias": (4 * w,),
            f"{bp}.mlp.c_proj.weight": (w, 4 * w), f"{bp}.mlp.c_proj.bias": (w,),
            f"{bp}.ln_2.weight": (w,), f"{bp}.ln_2.bias": (w,),
        })
    keys["visual.ln_post.weight"] = (w,)
    keys["visual.ln_post.bias"] = (w,)
    return keys


def _bn(prefix: str, c: int) -> dict[str, tuple]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def _cn_resnet_keys(v: dict, embed: int) -> dict[str, tuple]:
    """ModifiedResNet (cn_clip/clip/model.py): 3-conv stem, Bottleneck layers, attention pool."""
    width = v["width"]
    keys = {"visual.conv1.weight": (width // 2, 3, 3, 3), **_bn("visual.bn1", width // 2),
            "visual.conv2.weight": (width // 2, width // 2, 3, 3), **_bn("visual.bn2", width // 2),
            "visual.conv3.weight": (width, width // 2, 3, 3), **_bn("visual.bn3", width)}
    inplanes = width
    for li, blocks in enumerate(v["layers"]):
        planes = width * 2**li
        stride = 1 if li == 0 else 2
        for b in range(blocks):
            bp = f"visual.layer{li + 1}.{b}"
            keys.update({f"{bp}.conv1.weight": (planes, inplanes, 1, 1), **_bn(f"{bp}.bn1", planes),
                         f"{bp}.conv2.weight": (planes, planes, 3, 3), **_bn(f"{bp}.bn2", planes),
                         f"{bp}.conv3.weight": (planes * 4, planes, 1, 1), **_bn(f"{bp}.bn3", planes * 4)})
            if b == 0 and (stride > 1 or inplanes != planes * 4):
                keys[f"{bp}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                keys.update(_bn(f"{bp}.downsample.1", planes * 4))
            inplanes = planes * 4
    dim = width * 32
    keys["visual.attnpool.positional_embedding"] = ((v["image_size"] // 32) ** 2 + 1, dim)
    for name, out in (("k_proj", dim), ("q_proj", dim), ("v_proj", dim), ("c_proj", embed)):
        keys[f"visual.attnpool.{name}.weight"] = (out, dim)
        keys[f"visual.attnpool.{name}.bias"] = (out,)
    return keys


def cnclip_state_dict(arch: str, *, micro: bool = True, seed: int = 0, pooler: bool = False,
                      vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """The state dict of cn_clip's ``CLIP`` (without ``module.``) for a released architecture.

    ``vocab_size`` overrides the word-embedding rows (micro towers with the real 21128 vocab)."""
    dims = _arch_dims(arch, micro)
    if vocab_size is not None:
        dims["text"]["vocab_size"] = vocab_size
    v, t, e = dims["vision"], dims["text"], dims["embed_dim"]
    shapes = {"logit_scale": ()}
    shapes.update(_cn_resnet_keys(v, e) if v["type"] == "resnet" else _cn_vit_keys(v, e))
    shapes.update(_bert_keys("bert.", t, pooler=pooler))
    shapes["text_projection"] = (t["hidden_size"], e)
    state = {k: torch.zeros(s, dtype=torch.long if k.endswith("num_batches_tracked") else torch.float32)
             for k, s in shapes.items()}
    return perturb_(state, seed)


def write_cnclip_pt(path: str | os.PathLike, arch: str, *, micro: bool = True, seed: int = 0,
                    pooler: bool = False, dtype: torch.dtype = torch.float32, name: str | None = None,
                    vocab_size: int | None = None) -> Path:
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / clip_tables()["cnclip_architectures"][arch]["file_name"]
    path.parent.mkdir(parents=True, exist_ok=True)
    state = cnclip_state_dict(arch, micro=micro, seed=seed, pooler=pooler, vocab_size=vocab_size)
    state = {f"module.{k}": (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    torch.save({"epoch": 7, "step": 40000, "name": name or f"train_{arch.lower()}", "state_dict": state}, path)
    return path


# -- BertCLIP ------------------------------------------------------------------------------------
def bertclip_geometry(size: str = "micro", vocab_size: int | None = None) -> dict:
    """(vision_config, text_config, projection_dim) dicts for a BertCLIP: 'micro' or 'base'
    (OpenAI ViT-B/32 + BERT-base, the released model's geometry)."""
    if size == "base":
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=32)
        text = dict(vocab_size=vocab_size or 21128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072)
        proj = 512
    elif size == "micro":
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      image_size=32, patch_size=16)
        text = dict(vocab_size=vocab_size or len(tiny_vocab()), hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=128)
        proj = 32
    else:
        raise ValueError(f"size must be 'micro' or 'base', got {size!r}")
    vision.update(model_type="clip_vision_model", hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3,
                  projection_dim=proj)
    text.update(model_type="bert", hidden_act="gelu", layer_norm_eps=1e-12, max_position_embeddings=512,
                type_vocab_size=2, pad_token_id=0, architectures=["BertForMaskedLM"], directionality="bidi")
    return {"vision": vision, "text": text, "projection_dim": proj}


def _clip_vit_keys(prefix: str, v: dict) -> dict[str, tuple]:
    h, f, p, r = v["hidden_size"], v["intermediate_size"], v["patch_size"], v["image_size"]
    keys = {f"{prefix}embeddings.class_embedding": (h,),
            f"{prefix}embeddings.patch_embedding.weight": (h, 3, p, p),
            f"{prefix}embeddings.position_embedding.weight": ((r // p) ** 2 + 1, h),
            f"{prefix}pre_layrnorm.weight": (h,), f"{prefix}pre_layrnorm.bias": (h,)}
    for i in range(v["num_hidden_layers"]):
        lp = f"{prefix}encoder.layers.{i}"
        for name in ("q", "k", "v", "out"):
            keys[f"{lp}.self_attn.{name}_proj.weight"] = (h, h)
            keys[f"{lp}.self_attn.{name}_proj.bias"] = (h,)
        keys.update({f"{lp}.layer_norm1.weight": (h,), f"{lp}.layer_norm1.bias": (h,),
                     f"{lp}.mlp.fc1.weight": (f, h), f"{lp}.mlp.fc1.bias": (f,),
                     f"{lp}.mlp.fc2.weight": (h, f), f"{lp}.mlp.fc2.bias": (h,),
                     f"{lp}.layer_norm2.weight": (h,), f"{lp}.layer_norm2.bias": (h,)})
    keys[f"{prefix}post_layernorm.weight"] = (h,)
    keys[f"{prefix}post_layernorm.bias"] = (h,)
    return keys


def legacy_bertclip_state_dict(size: str = "micro", *, seed: int = 0, position_ids: bool = True) -> dict[str, torch.Tensor]:
    geo = bertclip_geometry(size)
    v, t, proj = geo["vision"], geo["text"], geo["projection_dim"]
    shapes = {"logit_scale": ()}
    shapes.update(_bert_keys("text_model.", t, pooler=True))
    shapes.update(_clip_vit_keys("vision_model.", v))
    shapes["visual_projection.weight"] = (proj, v["hidden_size"])
    shapes["text_projection.weight"] = (proj, t["hidden_size"])
    state = perturb_({k: torch.zeros(s) for k, s in shapes.items()}, seed)
    if position_ids:  # persisted by transformers 4.18
        state["text_model.embeddings.position_ids"] = torch.arange(t["max_position_embeddings"])[None]
        state["vision_model.embeddings.position_ids"] = torch.arange((v["image_size"] // v["patch_size"]) ** 2 + 1)[None]
    return state


def _clip_preprocessor(image_size: int, *, processor_class: str | None) -> dict:
    cfg = {"crop_size": image_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
           "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": clip_tables()["clip_image_mean"],
           "image_std": clip_tables()["clip_image_std"], "resample": 3, "size": image_size}
    if processor_class:
        cfg["processor_class"] = processor_class
    return cfg


def _write_bert_tokenizer_files(out: Path, vocab: list[str], max_length: int) -> None:
    write_vocab(out / "vocab.txt", vocab)
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"do_lower_case": True, "tokenize_chinese_chars": True, "model_max_length": max_length,
         "tokenizer_class": "BertTokenizer", "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
         "cls_token": "[CLS]", "mask_token": "[MASK]"}))


def write_legacy_bertclip(out: str | os.PathLike, size: str = "micro", *, seed: int = 0,
                          safetensors: bool = False, position_ids: bool = True) -> Path:
    """A BertCLIP folder as ``Trainer.save_model`` wrote it (transformers 4.18, clip.md §A.2/A.6)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    geo = bertclip_geometry(size)
    vocab = tiny_vocab() if size == "micro" else tiny_vocab() + [f"[unused{i}]" for i in range(21128 - len(tiny_vocab()))]
    geo["text"]["vocab_size"] = len(vocab)
    config = {"architectures": ["BertCLIPModel"], "model_type": "clip", "initializer_factor": 1.0,
              "logit_scale_init_value": 2.6592, "projection_dim": geo["projection_dim"],
              "text_config": geo["text"], "text_config_dict": None, "vision_config": geo["vision"],
              "vision_config_dict": None, "torch_dtype": "float32", "transformers_version": "4.18.0"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    state = legacy_bertclip_state_dict(size, seed=seed, position_ids=position_ids)
    if safetensors:
        save_safetensors(state, out / "model.safetensors")
    else:
        torch.save(state, out / "pytorch_model.bin")
    (out / "preprocessor_config.json").write_text(json.dumps(
        _clip_preprocessor(geo["vision"]["image_size"], processor_class="CLIPProcessor"), indent=2))
    _write_bert_tokenizer_files(out, vocab, max_length=512)
    return out


# -- inputs of `ofaconv clip init` -----------------------------------------------------------------
def write_openai_clip(out: str | os.PathLike, size: str = "micro", *, seed: int = 1,
                      residual_scale: float = 1.0) -> Path:
    """An OpenAI CLIP checkpoint folder (CLIPModel, 4.x key layout, CLIP text tower included).

    ``residual_scale`` < 1 shrinks the attention/MLP output projections of the vision tower, so
    its [CLS] output keeps a linearly readable trace of the pixels, as a trained tower does (a
    random deep tower scrambles it); the learning test uses it to stand in for real CLIP weights."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    v = bertclip_geometry(size)["vision"]
    proj = v["projection_dim"]
    th = 64 if size == "micro" else 512
    text = dict(hidden_size=th, intermediate_size=th * 2 if size == "micro" else 2048, num_hidden_layers=2 if size == "micro" else 12,
                num_attention_heads=2 if size == "micro" else 8, vocab_size=99 if size == "micro" else 49408,
                max_position_embeddings=77, model_type="clip_text_model", hidden_act="quick_gelu")
    shapes = {"logit_scale": (), "visual_projection.weight": (proj, v["hidden_size"]), "text_projection.weight": (proj, th),
              "text_model.embeddings.token_embedding.weight": (text["vocab_size"], th),
              "text_model.embeddings.position_embedding.weight": (77, th),
              "text_model.final_layer_norm.weight": (th,), "text_model.final_layer_norm.bias": (th,)}
    shapes.update(_clip_vit_keys("vision_model.", v))
    state = perturb_({k: torch.zeros(s) for k, s in shapes.items()}, seed)
    for key in state:
        if key.startswith("vision_model.encoder.") and key.endswith(("out_proj.weight", "fc2.weight")):
            state[key] = state[key] * residual_scale
    vision = {k: val for k, val in v.items() if k != "projection_dim"}
    config = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": proj,
              "logit_scale_init_value": 2.6592, "text_config": text, "vision_config": vision}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_safetensors(state, out / "model.safetensors")
    (out / "preprocessor_config.json").write_text(json.dumps(
        _clip_preprocessor(v["image_size"], processor_class="CLIPProcessor"), indent=2))
    return out


def write_bert(out: str | os.PathLike, size: str = "micro", *, seed: int = 2, vocab: list[str] | None = None) -> Path:
    """A BERT checkpoint folder in the BertForMaskedLM layout (``bert.`` prefix, ``cls.`` head)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = vocab or tiny_vocab()
    t = dict(bertclip_geometry(size)["text"], vocab_size=len(vocab))
    shapes = _bert_keys("bert.", t, pooler=True)
    h = t["hidden_size"]
    shapes.update({"cls.predictions.bias": (len(vocab),), "cls.predictions.transform.dense.weight": (h, h),
                   "cls.predictions.transform.dense.bias": (h,), "cls.predictions.transform.LayerNorm.weight": (h,),
                   "cls.predictions.transform.LayerNorm.bias": (h,)})
    state = perturb_({k: torch.zeros(s) for k, s in shapes.items()}, seed)
    (out / "config.json").write_text(json.dumps(t, indent=2))
    save_safetensors(state, out / "model.safetensors")
    _write_bert_tokenizer_files(out, vocab, max_length=512)
    return out


# -- synthetic image-caption pairs (learning test, benchmark) ---------------------------------------
COLORS = {"红": (220, 30, 30), "绿": (30, 180, 60), "蓝": (40, 60, 220), "黄": (230, 210, 40),
          "紫": (150, 50, 180), "橙": (240, 140, 20), "黑": (15, 15, 15), "白": (245, 245, 245)}
PLACES = {"左上角": (0, 0), "右上角": (1, 0), "左下角": (0, 1), "右下角": (1, 1)}


def caption_classes(places: bool = False) -> list[tuple[str, tuple, tuple | None]]:
    if not places:
        return [(f"一个{name}色的方块", rgb, None) for name, rgb in COLORS.items()]
    return [(f"{place}有一个{name}色的方块", rgb, cell) for name, rgb in COLORS.items() for place, cell in PLACES.items()]


def write_caption_pairs(out: str | os.PathLike, *, per_class: int = 4, image_size: int = 32, seed: int = 0,
                        csv_name: str = "pairs.csv", prefix: str = "img", places: bool = False) -> Path:
    """A BertCLIP CSV (``text,url,filename``) of caption classes: 8 colours (x 4 quadrants with
    ``places``); each image draws the coloured square at a jittered size/position on a noisy grey
    background (without ``places`` the square covers most of the image)."""
    import csv

    import numpy as np
    from PIL import Image

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for c, (caption, rgb, cell) in enumerate(caption_classes(places)):
        for k in range(per_class):
            arr = rng.integers(90, 150, (image_size, image_size, 3)).astype(np.uint8)
            if cell is None:
                side = int(rng.integers(image_size * 3 // 4, image_size + 1))
                x0, y0 = (int(rng.integers(0, image_size - side + 1)) for _ in range(2))
            else:
                half = image_size // 2
                side = int(rng.integers(half * 5 // 8, half))
                x0 = cell[0] * half + int(rng.integers(0, half - side + 1))
                y0 = cell[1] * half + int(rng.integers(0, half - side + 1))
            arr[y0 : y0 + side, x0 : x0 + side] = np.clip(np.array(rgb) + rng.integers(-15, 16, 3), 0, 255)
            name = f"{prefix}_{c:02d}_{k}.png"
            Image.fromarray(arr, "RGB").save(out / "images" / name)
            rows.append({"text": caption, "url": f"http://127.0.0.1/{name}", "filename": f"images/{name}"})
    with open(out / csv_name, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "url", "filename"])
        writer.writeheader()
        writer.writerows(rows)
    return out / csv_name
