"""Import BertCLIP and Chinese-CLIP checkpoints into ofaconv's CLIP package format.

* legacy BertCLIP folder (``model_type: clip`` with a BERT ``text_config``) -> VisionTextDualEncoderModel
* Chinese-CLIP ``.pt`` (ViT-B/16, L/14, L/14@336, H/14) -> ChineseCLIPModel
* an ofaconv / transformers VTDE or ChineseCLIPModel folder -> re-written (normalised layout)

Every conversion writes through ``ofaconv.core.writer.OutputFolder`` (a temp sibling), loads the
result back with stock classes, optionally verifies parity against a plain-maths reference computed
from the SOURCE weights (the ``checks`` of ``conversion_report.json``), and only then renames the
folder into place.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from transformers import (
    BertConfig,
    BertTokenizer,
    ChineseCLIPConfig,
    ChineseCLIPImageProcessorPil,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    VisionTextDualEncoderConfig,
)

from ofaconv.core.errors import CheckpointError, OfaconvError, VerificationError
from . import reference as ref
from ofaconv.core.loader import check_finite, read_config, read_folder_state_dict
from ofaconv.core.digest import BackgroundSha256
from ofaconv.core.writer import OutputFolder
from .checkpoint import load_cnclip_pt
from .architectures import apply_map, clip_tables
from .package import TEXT_TOWER_META, ClipPackage, check_package, clip_report, text_length, write_package

__all__ = [
    "detect_source",
    "load_package",
    "convert",
    "resolve_cnclip_arch",
    "default_vocab_path",
    "verify_package_dir",
    "parity_checks",
    "reference_source",
    "PARITY_GATE",
]

PARITY_GATE = 1e-5

_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "num_channels", "hidden_act", "layer_norm_eps", "attention_dropout",
                "initializer_range", "initializer_factor")
_BERT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
              "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id")


# -- detection ---------------------------------------------------------------------------------
def detect_source(src: str | os.PathLike) -> str:
    """One of 'cnclip_pt', 'legacy_bertclip', 'vtde', 'chinese_clip'; raises on anything else."""
    src = Path(src)
    if src.is_file():
        if src.suffix in (".pt", ".pth", ".ckpt"):
            return "cnclip_pt"
        raise CheckpointError("expected a Chinese-CLIP .pt file or a model folder", path=src)
    if not src.is_dir():
        raise CheckpointError("no such file or folder", path=src)
    cfg = read_config(src)
    model_type = cfg.get("model_type")
    text_type = (cfg.get("text_config") or {}).get("model_type")
    if model_type == "vision-text-dual-encoder":
        if text_type != "bert" or (cfg.get("vision_config") or {}).get("model_type") not in ("clip_vision_model", "clip"):
            raise CheckpointError("only CLIP-vision + BERT dual encoders are supported", path=src / "config.json",
                                  key="text_config.model_type")
        return "vtde"
    if model_type == "chinese_clip":
        return "chinese_clip"
    if model_type == "clip" and (text_type == "bert" or "BertCLIPModel" in (cfg.get("architectures") or [])):
        return "legacy_bertclip"
    if model_type == "clip":
        raise CheckpointError("a CLIPModel with a CLIP text tower, not BertCLIP; use it with `ofaconv clip init "
                              "--vision`", path=src / "config.json", key="text_config.model_type")
    raise CheckpointError(f"unknown CLIP layout (model_type {model_type!r})", path=src / "config.json", key="model_type")


# -- shared pieces -----------------------------------------------------------------------------
def default_vocab_path() -> Path | None:
    """The BERT-Chinese vocab shipped in ofaconv/data (21128 lines), if present."""
    from importlib import resources

    try:
        data = Path(str(resources.files("ofaconv.data")))
    except ModuleNotFoundError:
        return None
    for cand in [data / "vocab.txt", *sorted(data.glob("*vocab*.txt")), *sorted(data.glob("*/vocab.txt"))]:
        if cand.is_file():
            return cand
    return None


def _tokenizer_from_vocab(vocab: Path, vocab_size: int, max_length: int, where) -> BertTokenizer:
    # "\n" only: bert-base-chinese has entries containing U+2028, which str.splitlines() splits.
    lines = vocab.read_text(encoding="utf-8").removesuffix("\n").split("\n")
    if len(lines) != vocab_size:
        raise CheckpointError(f"vocab has {len(lines)} entries but the word embedding has {vocab_size} rows; pass "
                              "--vocab with the model's vocab.txt", path=vocab, key="word_embeddings")
    # transformers 5 names this argument `vocab`; `vocab_file=` would be ignored silently.
    tok = BertTokenizer(vocab=str(vocab), do_lower_case=True, model_max_length=max_length)
    if len(tok) != vocab_size:
        raise CheckpointError(f"tokenizer built from the vocab has {len(tok)} entries, expected {vocab_size}", path=vocab)
    return tok


def _clip_processor_from_dict(cfg: dict, image_size: int) -> CLIPImageProcessorPil:
    def edge(v, default):
        if isinstance(v, dict):
            return v.get("shortest_edge", v.get("height", default))
        return v if isinstance(v, int) else default

    size = edge(cfg.get("size"), image_size)
    crop = edge(cfg.get("crop_size"), image_size)
    mean = cfg.get("image_mean", clip_tables()["clip_image_mean"])
    std = cfg.get("image_std", clip_tables()["clip_image_std"])
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop},
                                 do_center_crop=cfg.get("do_center_crop", True), resample=cfg.get("resample", 3),
                                 image_mean=mean, image_std=std, do_resize=True, do_normalize=True, do_rescale=True,
                                 do_convert_rgb=True)


def squash_processor(image_size: int) -> ChineseCLIPImageProcessorPil:
    m = clip_tables()
    return ChineseCLIPImageProcessorPil(size={"height": image_size, "width": image_size},
                                        crop_size={"height": image_size, "width": image_size}, do_center_crop=False,
                                        resample=3, image_mean=m["clip_image_mean"], image_std=m["clip_image_std"],
                                        do_resize=True, do_normalize=True, do_rescale=True, do_convert_rgb=True)


def _pick(cfg: dict, keys) -> dict:
    return {k: cfg[k] for k in keys if k in cfg and cfg[k] is not None}


def vtde_config(vision: dict, text: dict, projection_dim: int, logit_scale_init_value: float,
                where=None) -> VisionTextDualEncoderConfig:
    if text.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError("only absolute BERT position embeddings are supported", path=where,
                              key="text_config.position_embedding_type")
    vision_cfg = CLIPVisionConfig(**_pick(vision, _VISION_KEYS), projection_dim=projection_dim)
    text_cfg = BertConfig(**_pick(text, _BERT_KEYS))
    return VisionTextDualEncoderConfig.from_vision_text_configs(
        vision_cfg, text_cfg, projection_dim=projection_dim, logit_scale_init_value=logit_scale_init_value)


# -- legacy BertCLIP -------------------------------------------------------------------------------
def _legacy_bertclip_package(src: Path, *, max_length: int | None) -> ClipPackage:
    cfg = read_config(src)
    for part in ("vision_config", "text_config"):
        if not isinstance(cfg.get(part), dict):
            raise CheckpointError(f"missing {part}", path=src / "config.json", key=part)
    source_state = read_folder_state_dict(src)
    check_finite(source_state, path=src)
    state = apply_map("clip/bertclip_to_vtde", source_state, path=src)
    proj = cfg.get("projection_dim", 512)
    config = vtde_config(cfg["vision_config"], cfg["text_config"], proj, cfg.get("logit_scale_init_value", 2.6592),
                         where=src / "config.json")
    pp_path = src / "preprocessor_config.json"
    pp = json.loads(pp_path.read_text()) if pp_path.is_file() else {}
    image_processor = _clip_processor_from_dict(pp, config.vision_config.image_size)
    tokenizer = _load_tokenizer(src, config.text_config.vocab_size)
    return ClipPackage(kind="vtde", config=config, state=state, image_processor=image_processor, tokenizer=tokenizer,
                       max_length=text_length(config, max_length, clip_tables()["bertclip_max_length"],
                                              src / "config.json"),
                       extra={"source": str(src), "source_format": "legacy_bertclip"}), source_state


def _load_tokenizer(src: Path, vocab_size: int) -> BertTokenizer:
    if (src / "tokenizer.json").is_file() or (src / "vocab.txt").is_file():
        try:
            tok = BertTokenizer.from_pretrained(str(src))
        except Exception as exc:
            raise CheckpointError(f"unreadable tokenizer files: {exc}", path=src) from exc
        if len(tok) > vocab_size:
            raise CheckpointError(f"tokenizer has {len(tok)} entries, the embedding only {vocab_size}", path=src,
                                  key="vocab_size")
        return tok
    raise CheckpointError("no tokenizer files (vocab.txt or tokenizer.json)", path=src)


# -- Chinese-CLIP .pt ------------------------------------------------------------------------------
_ARCH_TOKENS = {"rn50": "RN50", "vit-b-16": "ViT-B-16", "vit-l-14-336": "ViT-L-14-336", "vit-l-14": "ViT-L-14",
                "vit-h-14": "ViT-H-14"}


def _arch_from_name(name: str) -> str | None:
    low = name.lower().replace("_", "-").replace("/", "-").replace("@", "-")
    for token in sorted(_ARCH_TOKENS, key=len, reverse=True):
        if token in low:
            return _ARCH_TOKENS[token]
    return None


def _vit_geometry(state: dict) -> tuple[int, int, int, int] | None:
    """(width, layers, patch size, image size) of a cn_clip ViT state, None for anything else."""
    if "visual.conv1.weight" not in state or "visual.positional_embedding" not in state:
        return None
    conv = state["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    layers = _layer_count(state, "visual.transformer.resblocks.")
    return width, layers, patch, patch * math.isqrt(state["visual.positional_embedding"].shape[0] - 1)


def _arch_by_geometry(state: dict, table: dict) -> tuple[str, str] | None:
    """(architecture, "full-size" or "micro") whose vision geometry the weights have exactly."""
    geometry = _vit_geometry(state)
    if geometry is None:
        return None
    for name, spec in table.items():
        if spec["vision"]["type"] != "vit":
            continue
        for size, v in (("full-size", spec["vision"]), ("micro", {**spec["vision"], **spec["micro"]["vision"]})):
            if (v["width"], v["layers"], v["patch_size"], v["image_size"]) == geometry:
                return name, size
    return None


def resolve_cnclip_arch(state: dict, *, arch: str | None, path: Path, meta: dict) -> tuple[str, str]:
    """(architecture, how it was found). Heads cannot be read from shapes (ViT-H has 80-wide heads), so
    they come from the architecture, named by --arch, the file name or the checkpoint's name. A name that
    contradicts the weights is refused: ViT-H weights labelled L/14 would get 64-wide heads, and the
    reference, run with the same head count, could not notice."""
    table = clip_tables()["cnclip_architectures"]
    named = None
    if arch:
        canon = _arch_from_name(arch) or (arch if arch in table else None)
        if canon is None:
            raise OfaconvError(f"unknown --arch {arch!r}; known: {', '.join(table)}")
        named = canon, "--arch"
    else:
        for source, name in (("file name", path.name), ("checkpoint name", str(meta.get("name", "")))):
            found = _arch_from_name(name)
            if found:
                named = found, source
                break
    by_shape = _arch_by_geometry(state, table)
    if named and by_shape and named[0] != by_shape[0]:
        width, layers, patch, size = _vit_geometry(state)
        raise CheckpointError(f"{named[1]} says {named[0]} but the weights have {by_shape[0]}'s {by_shape[1]} "
                              f"geometry (width {width}, {layers} layers, patch {patch}, {size} px); pass --arch "
                              f"{by_shape[0]} if that is what it is", path=path)
    if named:
        return named
    if by_shape and by_shape[1] == "full-size":
        return by_shape[0], "full-size geometry"
    raise CheckpointError("cannot tell the architecture (attention heads are not recorded in the weights); pass "
                          f"--arch one of {', '.join(table)}", path=path)


def _layer_count(state: dict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state for m in [pat.match(k)] if m})


def cnclip_config(state: dict, arch: str, path: Path) -> tuple[ChineseCLIPConfig, int, int]:
    """Derive the HF config from shapes (clip.md §B.5); heads from the architecture table."""
    spec = clip_tables()["cnclip_architectures"][arch]
    defaults = clip_tables()["cnclip_text_defaults"]
    need = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", "text_projection",
            "bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
            "bert.embeddings.token_type_embeddings.weight", "bert.encoder.layer.0.intermediate.dense.weight",
            "visual.transformer.resblocks.0.mlp.c_fc.weight", "logit_scale"]
    for key in need:
        if key not in state:
            raise CheckpointError("missing key", path=path, key=key)
    conv = state["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = state["visual.positional_embedding"].shape[0] - 1
    side = math.isqrt(grid)
    if side * side != grid:
        raise CheckpointError(f"positional embedding has {grid + 1} rows, not a square grid + 1", path=path,
                              key="visual.positional_embedding")
    head_width = spec["vision"]["head_width"]
    if width % head_width:
        raise CheckpointError(f"vision width {width} is not a multiple of {arch}'s head width {head_width}; wrong "
                              "--arch?", path=path, key="visual.conv1.weight")
    vocab, hidden = state["bert.embeddings.word_embeddings.weight"].shape
    text_head_width = spec["text"]["head_width"]
    if hidden % text_head_width:
        raise CheckpointError(f"text width {hidden} is not a multiple of {text_head_width}", path=path,
                              key="bert.embeddings.word_embeddings.weight")
    embed = state["visual.proj"].shape[1]
    if state["text_projection"].shape != (hidden, embed):
        raise CheckpointError(f"shape {list(state['text_projection'].shape)} does not match [{hidden}, {embed}]",
                              path=path, key="text_projection")
    vision = dict(hidden_size=width, patch_size=patch, image_size=patch * side,
                  intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  num_hidden_layers=_layer_count(state, "visual.transformer.resblocks."),
                  num_attention_heads=width // head_width, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                  projection_dim=embed)
    text = dict(vocab_size=vocab, hidden_size=hidden,
                max_position_embeddings=state["bert.embeddings.position_embeddings.weight"].shape[0],
                type_vocab_size=state["bert.embeddings.token_type_embeddings.weight"].shape[0],
                num_hidden_layers=_layer_count(state, "bert.encoder.layer."),
                intermediate_size=state["bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
                num_attention_heads=hidden // text_head_width, hidden_act=defaults["hidden_act"],
                layer_norm_eps=defaults["layer_norm_eps"], pad_token_id=0)
    config = ChineseCLIPConfig(text_config=text, vision_config=vision, projection_dim=embed,
                               logit_scale_init_value=2.6592)
    return config, vision["num_attention_heads"], text["num_attention_heads"]


def _cnclip_package(src: Path, *, arch: str | None, vocab: str | None, max_length: int | None):
    meta, state = load_cnclip_pt(src)
    check_finite(state, path=src)
    if any(k.startswith(("visual.attnpool.", "visual.layer1.")) for k in state):
        raise CheckpointError("RN50 (ModifiedResNet image tower) has no transformers class (ChineseCLIPModel is "
                              "ViT-only); use cn_clip for RN50", path=src, key="visual.attnpool")
    if any(".Wqkv." in k or ".attention.self.out_proj." in k for k in state):
        state = apply_map("clip/cnclip_flash_attention_to_standard", state, path=src)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    arch, how = resolve_cnclip_arch(state, arch=arch, path=src, meta=meta)
    config, vheads, theads = cnclip_config(state, arch, src)
    hf_state = apply_map("clip/cnclip_to_chinese_clip", state, path=src)
    pooler = _checkpoint_pooler({k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.pooler.")},
                                config.text_config.hidden_size, src)
    vocab_path = Path(vocab) if vocab else default_vocab_path()
    if vocab_path is None or not vocab_path.is_file():
        raise CheckpointError("Chinese-CLIP checkpoints carry no vocab; pass --vocab PATH/vocab.txt", path=src)
    length = text_length(config, max_length, clip_tables()["cnclip_context_length"], src)
    tokenizer = _tokenizer_from_vocab(vocab_path, config.text_config.vocab_size, length, src)
    pkg = ClipPackage(kind="chinese_clip", config=config, state=hf_state,
                      image_processor=squash_processor(config.vision_config.image_size), tokenizer=tokenizer,
                      max_length=length,
                      extra={"source": str(src), "source_format": "cnclip_pt", "arch": arch, "arch_from": how,
                             "epoch": meta.get("epoch"), "step": meta.get("step")},
                      text_pooler=pooler)
    return pkg, state, (vheads, theads)


def _checkpoint_pooler(pooler: dict, hidden: int, path: Path) -> dict | None:
    """The BERT pooler a Chinese-CLIP checkpoint may still carry from its BERT initialisation. cn_clip
    never runs it, but text_tower/ keeps it so that BertModel users get the original pooler_output."""
    if not pooler:
        return None
    shapes = {"pooler.dense.weight": (hidden, hidden), "pooler.dense.bias": (hidden,)}
    for key, shape in shapes.items():
        if key not in pooler:
            raise CheckpointError("incomplete BERT pooler", path=path, key=f"bert.{key}")
        if tuple(pooler[key].shape) != shape:
            raise CheckpointError(f"shape {list(pooler[key].shape)}, expected {list(shape)}", path=path,
                                  key=f"bert.{key}")
    return {k: pooler[k] for k in shapes}


def _package_text_pooler(src: Path, hidden: int) -> dict | None:
    """Re-converting an ofaconv Chinese-CLIP package: the checkpoint pooler lives in text_tower/ only."""
    meta_path, weights = src / "text_tower" / TEXT_TOWER_META, src / "text_tower" / "model.safetensors"
    if not (meta_path.is_file() and weights.is_file()):
        return None
    if json.loads(meta_path.read_text()).get("pooler") != "checkpoint":
        return None
    with safe_open(str(weights), "pt") as f:
        pooler = {k: f.get_tensor(k) for k in f.keys() if k.startswith("pooler.")}
    return _checkpoint_pooler(pooler, hidden, weights)


# -- existing HF folders -------------------------------------------------------------------------
def _hf_folder_package(src: Path, kind: str, *, max_length: int | None) -> ClipPackage:
    cfg = read_config(src)
    state = read_folder_state_dict(src)
    check_finite(state, path=src)
    meta_path = src / "ofaconv_clip.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    pp_path = src / "preprocessor_config.json"
    pp = json.loads(pp_path.read_text()) if pp_path.is_file() else {}
    if kind == "vtde":
        config = vtde_config(cfg["vision_config"], cfg["text_config"], cfg.get("projection_dim", 512),
                             cfg.get("logit_scale_init_value", 2.6592), where=src / "config.json")
        state = apply_map(("clip/vtde_file", "clip/vtde_module_to_file"), state, path=src)
        image_processor = _clip_processor_from_dict(pp, config.vision_config.image_size)
        length = text_length(config, max_length, meta.get("max_length") or clip_tables()["bertclip_max_length"],
                             src / "config.json")
    else:
        config = ChineseCLIPConfig.from_pretrained(str(src))
        state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
        size = pp.get("size", {}).get("height", config.vision_config.image_size) if isinstance(pp.get("size"), dict) \
            else config.vision_config.image_size
        image_processor = squash_processor(size)
        length = text_length(config, max_length, meta.get("max_length") or clip_tables()["cnclip_context_length"],
                             src / "config.json")
    tokenizer = _load_tokenizer(src, config.text_config.vocab_size)
    pooler = _package_text_pooler(src, config.text_config.hidden_size) if kind == "chinese_clip" else None
    return ClipPackage(kind=kind, config=config, state=state, image_processor=image_processor, tokenizer=tokenizer,
                       max_length=length, extra={k: v for k, v in meta.items() if k not in ("kind", "text_pooling",
                                                                                          "max_length")},
                       text_pooler=pooler)


def load_package(src: str | os.PathLike, *, arch: str | None = None, vocab: str | None = None,
                 max_length: int | None = None) -> tuple[ClipPackage, str, dict | None, tuple | None]:
    """(package, source format, source state for the reference or None, (vision, text) heads)."""
    src = Path(src)
    fmt = detect_source(src)
    if fmt == "cnclip_pt":
        pkg, source_state, heads = _cnclip_package(src, arch=arch, vocab=vocab, max_length=max_length)
        return pkg, fmt, source_state, heads
    if fmt == "legacy_bertclip":
        pkg, source_state = _legacy_bertclip_package(src, max_length=max_length)
        return pkg, fmt, source_state, (pkg.config.vision_config.num_attention_heads,
                                        pkg.config.text_config.num_attention_heads)
    return _hf_folder_package(src, fmt, max_length=max_length), fmt, None, None


# -- verification ----------------------------------------------------------------------------------
def probe_images(n: int = 3, seed: int = 0) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    sizes = [(61, 47), (40, 72), (33, 33), (80, 50)]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        out.append(Image.fromarray(arr, "RGB"))
    return out


PROBE_TEXTS = ["一只猫坐在车上", "公交车停在路边 bus 2", "红色的花" * 40, "狗"]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def verify_package_dir(out: Path, pkg: ClipPackage, source_format: str, source_state: dict, heads: tuple,
                       models: dict) -> list[dict]:
    """Compare the written folder (root model, towers, processor, tokenizer, sentence-transformers
    layout) with the reference forward of the source weights: one report check row per output.
    Raises VerificationError above the gate."""
    checks = _parity_rows(*parity_diffs(out, pkg, source_format, source_state, heads, models))
    failed = [c for c in checks if not c["passed"]]
    if failed:
        raise VerificationError("parity above the gate {:g}: {}".format(
            PARITY_GATE, ", ".join(f"{c['name']} max |diff| {c['value']:.3g}" for c in failed)), path=out)
    return checks


def _parity_rows(diffs: dict[str, float], logits_diff: float) -> list[dict]:
    details = {"logits_over_exp_logit_scale": "image-text logits divided by exp(logit_scale), the cosine scale; "
                                              f"ungated max |diff| of the logits themselves {logits_diff:.6g}"}
    return [{"name": name, "passed": value <= PARITY_GATE, "metric": "max_abs_diff", "value": value,
             "gate": PARITY_GATE, "detail": details.get(name, "vs the reference forward of the source weights")}
            for name, value in diffs.items()]


def source_entry(src: Path, sha256: str) -> dict:
    """The report's ``source``: a checkpoint file, or the weights file of a model folder."""
    return {"file": src.name, "sha256": sha256, "size": src.stat().st_size}


def source_weights(src: Path) -> Path:
    """The file that identifies a source: itself, or a folder's weights (or shard index)."""
    if src.is_file():
        return src
    for name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                 "pytorch_model.bin"):
        if (src / name).is_file():
            return src / name
    raise CheckpointError("no model.safetensors or pytorch_model.bin", path=src)


def parity_checks(out: Path, pkg: ClipPackage, source_format: str, source_state: dict, heads: tuple,
                  models: dict) -> list[dict]:
    """The parity comparisons of ``verify_package_dir`` as report check rows (one per quantity),
    failed rows included instead of raised."""
    try:
        return _parity_rows(*parity_diffs(out, pkg, source_format, source_state, heads, models))
    except VerificationError as exc:  # the tokenizer disagrees: no number to report
        return [{"name": "tokenizer", "passed": False, "detail": str(exc)}]


def parity_diffs(out: Path, pkg: ClipPackage, source_format: str, source_state: dict, heads: tuple,
                 models: dict) -> tuple[dict[str, float], float]:
    """Max |diff| of every output of the written folder vs the reference, and the ungated logits diff."""
    from .towers import ClipTowers, sentence_transformers_encode

    vheads, theads = heads
    report: dict[str, float] = {}
    towers = ClipTowers.from_pretrained(out)
    towers.model = models["root"]  # the stock-class load of the folder, not our own
    images = probe_images()
    m = clip_tables()
    mean, std = m["clip_image_mean"], m["clip_image_std"]
    if pkg.kind == "chinese_clip":
        size = pkg.config.vision_config.image_size
        ref_pixels = torch.stack([ref.squash_preprocess(im, size, mean, std) for im in images])
    else:
        ip = pkg.image_processor
        ref_pixels = torch.stack([ref.clip_crop_preprocess(im, ip.size["shortest_edge"], ip.crop_size["height"],
                                                           ip.image_mean, ip.image_std) for im in images])
    pixels = towers.preprocess_images(images)
    report["pixel_values"] = _max_diff(pixels, ref_pixels)

    tok = towers.tokenizer
    ref_ids = [ref.cnclip_token_ids(tok, t, pkg.max_length) for t in PROBE_TEXTS]
    batch = towers.tokenize(PROBE_TEXTS, padding="max_length")
    if batch["input_ids"].tolist() != ref_ids:
        raise VerificationError(f"tokenizer output differs from [CLS] + pieces[:{pkg.max_length - 2}] + [SEP] + pad",
                                path=out / "tokenizer.json")
    ids = torch.tensor(ref_ids)
    mask = (ids != tok.pad_token_id).long()

    with torch.no_grad():
        s = source_state
        if source_format == "cnclip_pt":
            ref_img = ref.cnclip_encode_image(s, ref_pixels, heads=vheads)
            ref_txt = ref.cnclip_encode_text(s, ids, heads=theads, pad_id=tok.pad_token_id)
            scale = s["logit_scale"]
        else:
            ref_img = ref.bertclip_encode_image(s, ref_pixels, heads=vheads,
                                                eps=pkg.config.vision_config.layer_norm_eps)
            ref_txt = ref.bertclip_encode_text(s, ids, mask, heads=theads, eps=pkg.config.text_config.layer_norm_eps)
            scale = s["logit_scale"]
        ref_per_image, _ = ref.clip_logits(ref_img, ref_txt, scale)

        img = towers.encode_pixels(ref_pixels, normalize=False)
        txt = towers.encode_token_batch({"input_ids": ids, "attention_mask": mask}, normalize=False)
        report["image_features"] = _max_diff(img, ref_img)
        report["text_features"] = _max_diff(txt, ref_txt)
        per_image, _ = ref.clip_logits(img, txt, towers.model.logit_scale.detach())
        # logits are exp(logit_scale) x cosine; on the cosine scale the gate means the same at any temperature
        logits_diff = _max_diff(per_image, ref_per_image)
        report["logits_over_exp_logit_scale"] = logits_diff / float(scale.exp())

        vt = models["vision_tower"](pixel_values=ref_pixels).image_embeds
        report["vision_tower"] = _max_diff(vt, ref_img)
        tt_model = models["text_tower"]
        out_t = tt_model(input_ids=ids, attention_mask=mask)
        pooled = out_t.pooler_output if pkg.kind == "vtde" else out_t.last_hidden_state[:, 0]
        from safetensors.torch import load_file

        w = load_file(str(out / "text_tower" / "text_projection.safetensors"))["weight"]
        report["text_tower"] = _max_diff(pooled @ w.t(), ref_txt)
        st = sentence_transformers_encode(out / "text_tower", ids, mask, tt_model)
        report["text_tower_sentence_transformers"] = _max_diff(st, ref_txt / ref_txt.norm(dim=-1, keepdim=True))
    return report, logits_diff


def convert(src: str | os.PathLike, out: str | os.PathLike, *, verify: bool = True, arch: str | None = None,
            vocab: str | None = None, max_length: int | None = None, force: bool = False) -> dict:
    """Convert ``src`` into the package folder ``out``; returns its ``conversion_report.json``."""
    src = Path(src)
    with OutputFolder(out, force=force, protect=[src]) as folder:
        pkg, fmt, source_state, heads = load_package(src, arch=arch, vocab=vocab, max_length=max_length)
        weights = source_weights(src)
        sha256 = BackgroundSha256(weights)  # beside the writing and the checks
        try:
            if verify:
                fmt, source_state, heads = reference_source(pkg, fmt, source_state, heads)
            write_package(pkg, folder)
            models = check_package(pkg, folder.path)
            checks = verify_package_dir(folder.path, pkg, fmt, source_state, heads, models) if verify else []
            source = {**source_entry(weights, sha256.result()), **({"folder": src.name} if src.is_dir() else {})}
        except BaseException:
            sha256.cancel()
            raise
        return folder.commit(clip_report(pkg, kind="conversion", source=source, checks=checks, source_format=fmt))


def reference_source(pkg: ClipPackage, fmt: str, source_state: dict | None, heads: tuple | None):
    """(format, state, heads) the reference runs on: the source's own, or for an HF folder source
    its weights in the source naming."""
    if source_state is not None:
        return fmt, source_state, heads
    source_state, heads = _reference_state_from_package(pkg)
    return ("legacy_bertclip" if pkg.kind == "vtde" else "cnclip_pt"), source_state, heads


def _reference_state_from_package(pkg: ClipPackage) -> tuple[dict, tuple]:
    """Re-converting an HF folder: the reference runs on its weights in the source naming."""
    if pkg.kind == "vtde":
        state = {("vision_model." + k[len("vision_model.vision_model."):] if k.startswith("vision_model.vision_model.")
                  else k): v for k, v in pkg.state.items()}
        return state, (pkg.config.vision_config.num_attention_heads, pkg.config.text_config.num_attention_heads)
    inverse = {}
    for k, v in pkg.state.items():
        if k.startswith("text_model."):
            inverse["bert." + k[len("text_model."):]] = v
    s = pkg.state
    inverse["visual.conv1.weight"] = s["vision_model.embeddings.patch_embedding.weight"]
    inverse["visual.class_embedding"] = s["vision_model.embeddings.class_embedding"]
    inverse["visual.positional_embedding"] = s["vision_model.embeddings.position_embedding.weight"]
    for part in ("weight", "bias"):
        inverse[f"visual.ln_pre.{part}"] = s[f"vision_model.pre_layrnorm.{part}"]
        inverse[f"visual.ln_post.{part}"] = s[f"vision_model.post_layernorm.{part}"]
    for i in range(pkg.config.vision_config.num_hidden_layers):
        lp, bp = f"vision_model.encoder.layers.{i}", f"visual.transformer.resblocks.{i}"
        for part in ("weight", "bias"):
            inverse[f"{bp}.attn.in_proj_{part}"] = torch.cat([s[f"{lp}.self_attn.{n}_proj.{part}"] for n in "qkv"])
            inverse[f"{bp}.attn.out_proj.{part}"] = s[f"{lp}.self_attn.out_proj.{part}"]
            inverse[f"{bp}.ln_1.{part}"] = s[f"{lp}.layer_norm1.{part}"]
            inverse[f"{bp}.ln_2.{part}"] = s[f"{lp}.layer_norm2.{part}"]
            inverse[f"{bp}.mlp.c_fc.{part}"] = s[f"{lp}.mlp.fc1.{part}"]
            inverse[f"{bp}.mlp.c_proj.{part}"] = s[f"{lp}.mlp.fc2.{part}"]
    inverse["visual.proj"] = s["visual_projection.weight"].t()
    inverse["text_projection"] = s["text_projection.weight"].t()
    inverse["logit_scale"] = s["logit_scale"]
    return inverse, (pkg.config.vision_config.num_attention_heads, pkg.config.text_config.num_attention_heads)
