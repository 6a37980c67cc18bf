"""Write a CLIP package folder (clip.md §C.2/C.3) and check it by loading it back.

    <out>/                 VisionTextDualEncoderModel (BertCLIP family) or ChineseCLIPModel
      config.json, model.safetensors (vision keys NESTED for VTDE), preprocessor_config.json
      (4.x processor layout), tokenizer files (model_max_length set)
      vision_tower/        CLIPVisionModelWithProjection + image processor
      text_tower/          BertModel (+ text_projection.safetensors) and, in the same folder, a
                           sentence-transformers layout whose encode() gives the CLIP text embedding.
                           Chinese-CLIP has no pooler, but a stock BertModel builds one: the tower
                           carries the checkpoint's own ``bert.pooler`` or an identity pooler, so it
                           loads without missing keys; its CLIP embedding never reads the pooler.

Packages are written through ``ofaconv.core.writer.OutputFolder`` (every file in the manifest of
``conversion_report.json``, whose ``checks`` hold what was verified). After writing, every folder is
loaded with the stock classes; a missing, unexpected or mis-shaped key, or any tensor that differs
from the in-memory model, is an error.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    ChineseCLIPConfig,
    ChineseCLIPModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
)
from transformers.utils import logging as hf_logging

from ofaconv import __version__
from ofaconv.core.errors import CheckpointError, VerificationError
from ofaconv.core.report import SCHEMA
from ofaconv.core.writer import OutputFolder
from .architectures import apply_map

__all__ = [
    "ClipPackage",
    "write_package",
    "check_package",
    "module_state_to_file",
    "file_state_to_module",
    "TEXT_TOWER_META",
    "text_tower_state",
    "clip_report",
    "reload_check",
    "text_length",
]

TEXT_TOWER_META = "text_tower.json"
_KINDS = {"vtde": "VisionTextDualEncoderProcessor", "chinese_clip": "ChineseCLIPProcessor"}


@dataclass
class ClipPackage:
    """Everything a package folder holds, in memory. ``state`` uses the FILE key layout."""

    kind: str  # "vtde" (BertCLIP family: BERT pooler) or "chinese_clip" (raw [CLS])
    config: VisionTextDualEncoderConfig | ChineseCLIPConfig
    state: dict[str, torch.Tensor]
    image_processor: object
    tokenizer: BertTokenizer
    max_length: int
    extra: dict = field(default_factory=dict)  # provenance written to ofaconv_clip.json
    # chinese_clip only: the source's BERT pooler ({"pooler.dense.weight", "pooler.dense.bias"}),
    # which ChineseCLIPModel has no place for; text_tower/ keeps it for BertModel users.
    text_pooler: dict[str, torch.Tensor] | None = None

    @property
    def text_pooling(self) -> str:
        return "pooler" if self.kind == "vtde" else "cls"

    def build_model(self):
        cls = VisionTextDualEncoderModel if self.kind == "vtde" else ChineseCLIPModel
        model = cls(self.config)
        module_state = file_state_to_module(self.state, model)
        result = model.load_state_dict(module_state, strict=False)
        # transformers may register non-persistent buffers (position_ids) that files never hold
        missing = [k for k in result.missing_keys if not k.endswith(("position_ids", "token_type_ids"))]
        if missing or result.unexpected_keys:
            key = (missing or result.unexpected_keys)[0]
            raise VerificationError(
                f"state does not fit {cls.__name__}: {len(missing)} missing, {len(result.unexpected_keys)} unexpected",
                key=key)
        return model.eval()


def text_length(config, requested: int | None, default: int, where) -> int:
    """The package's text length: ``requested`` (``--max-length``, a recipe's ``max_length``), else
    ``default`` cut to the text position table, so a text tower trained with fewer positions than
    the family default (BertCLIP 100) is used at its table's length instead of failing on it."""
    table = config.text_config.max_position_embeddings
    if requested is None:
        return min(default, table)
    if not 2 <= requested <= table:
        raise CheckpointError(f"text length {requested} must be between 2 ([CLS] + [SEP]) and the text position "
                              f"table's {table} rows; pass a --max-length in that range", path=where,
                              key="text_config.max_position_embeddings")
    return requested


def _is_nested(model) -> bool:
    return any(k.startswith("vision_model.vision_model.") for k in model.state_dict())


def module_state_to_file(state: dict, model) -> dict:
    """VTDE modules built by transformers >= 5.6 have flat vision keys; files are nested."""
    if isinstance(model, VisionTextDualEncoderModel):
        return apply_map(("clip/vtde_file", "clip/vtde_module_to_file"), state)
    return dict(state)


def file_state_to_module(state: dict, model) -> dict:
    if isinstance(model, VisionTextDualEncoderModel) and not _is_nested(model):
        return {("vision_model." + k[len("vision_model.vision_model."):] if k.startswith("vision_model.vision_model.") else k): v
                for k, v in state.items()}
    return dict(state)


# -- writing -----------------------------------------------------------------------------------
# Paths are relative to the OutputFolder: "" is the package root, "text_tower" a subfolder.
def _at(base: str, name: str) -> str:
    return f"{base}/{name}" if base else name


def _save_tokenizer(tokenizer: BertTokenizer, folder: OutputFolder, base: str, max_length: int) -> None:
    tokenizer.model_max_length = max_length
    with folder.recording():
        tokenizer.save_pretrained(str(folder.path / base))
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    # vocab.txt and special_tokens_map.json let transformers 4.x build its slow/fast BERT tokenizer
    folder.write_text(_at(base, "vocab.txt"), "".join(f"{tok}\n" for tok, _ in vocab))
    special = {n: getattr(tokenizer, n) for n in ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")}
    folder.write_text(_at(base, "special_tokens_map.json"), json.dumps(special, indent=2))


def _save_image_processor(image_processor, folder: OutputFolder, base: str, processor_class: str | None) -> None:
    cfg = image_processor.to_dict()
    cfg.pop("processor_class", None)
    if processor_class:
        cfg["processor_class"] = processor_class
    folder.write_text(_at(base, "preprocessor_config.json"), json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _write_json(folder: OutputFolder, name: str, obj) -> None:
    folder.write_text(name, json.dumps(obj, indent=2) + "\n")


def _save_config(config, folder: OutputFolder, base: str) -> None:
    with folder.recording():
        config.save_pretrained(str(folder.path / base))


def _vision_tower_config(pkg: ClipPackage) -> CLIPVisionConfig:
    vc = pkg.config.vision_config.to_dict()
    vc.pop("model_type", None)
    vc.update(projection_dim=pkg.config.projection_dim, architectures=["CLIPVisionModelWithProjection"])
    return CLIPVisionConfig(**vc)


def _text_tower_config(pkg: ClipPackage) -> BertConfig:
    tc = pkg.config.text_config.to_dict()
    tc.pop("model_type", None)
    tc["architectures"] = ["BertModel"]
    return BertConfig(**tc)


def _write_sentence_transformers(pkg: ClipPackage, folder: OutputFolder, base: str, hidden: int,
                                 projection: torch.Tensor | None, pooler: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Transformer -> Pooling(cls) -> [Dense(pooler, tanh)] -> Dense(projection) -> Normalize."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    _write_json(folder, _at(base, "1_Pooling/config.json"), {
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False, "include_prompt": True})
    dense = []
    if pooler is not None:
        dense.append(("tanh", pooler[0], pooler[1], "torch.nn.modules.activation.Tanh"))
    if projection is not None:
        dense.append(("projection", projection, None, "torch.nn.modules.linear.Identity"))
    for weight_name, weight, bias, act in dense:
        idx = len(modules)
        dense_dir = f"{idx}_Dense"
        _write_json(folder, _at(base, f"{dense_dir}/config.json"), {
            "in_features": weight.shape[1], "out_features": weight.shape[0], "bias": bias is not None,
            "activation_function": act})
        tensors = {"linear.weight": weight}
        if bias is not None:
            tensors["linear.bias"] = bias
        folder.write_tensors(_at(base, f"{dense_dir}/model.safetensors"), tensors)
        modules.append({"idx": idx, "name": str(idx), "path": dense_dir, "type": "sentence_transformers.models.Dense"})
    idx = len(modules)
    (folder.path / base / f"{idx}_Normalize").mkdir()  # Normalize has no files: an empty folder
    modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_Normalize", "type": "sentence_transformers.models.Normalize"})
    _write_json(folder, _at(base, "modules.json"), modules)
    _write_json(folder, _at(base, "sentence_bert_config.json"), {"max_seq_length": pkg.max_length, "do_lower_case": False})
    _write_json(folder, _at(base, "config_sentence_transformers.json"), {
        "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine",
        "__version__": {"sentence_transformers": "3.0.0"}})


def write_package(pkg: ClipPackage, folder: OutputFolder) -> None:
    """Write root, vision_tower/ and text_tower/ into an open ``OutputFolder``."""
    processor_class = _KINDS[pkg.kind]
    pkg.config.architectures = ["VisionTextDualEncoderModel" if pkg.kind == "vtde" else "ChineseCLIPModel"]
    _save_config(pkg.config, folder, "")
    folder.write_tensors("model.safetensors", pkg.state)
    _save_image_processor(pkg.image_processor, folder, "", processor_class)
    _save_tokenizer(pkg.tokenizer, folder, "", pkg.max_length)
    _write_json(folder, "ofaconv_clip.json", {"kind": pkg.kind, "text_pooling": pkg.text_pooling,
                                              "max_length": pkg.max_length, **pkg.extra})

    write_vision_tower(pkg, folder, "vision_tower")
    write_text_tower(pkg, folder, "text_tower")


def write_vision_tower(pkg: ClipPackage, folder: OutputFolder, base: str) -> None:
    (folder.path / base).mkdir(parents=True, exist_ok=True)
    _save_config(_vision_tower_config(pkg), folder, base)
    vmap = "clip/vtde_to_vision_tower" if pkg.kind == "vtde" else "clip/chinese_clip_to_vision_tower"
    folder.write_tensors(_at(base, "model.safetensors"), apply_map(vmap, pkg.state))
    _save_image_processor(pkg.image_processor, folder, base, None)


def text_tower_state(pkg: ClipPackage) -> dict[str, torch.Tensor]:
    """The BertModel state of text_tower/, pooler included, so that a plain
    ``BertModel.from_pretrained`` (or AutoModel, sentence-transformers) reports no missing key."""
    if pkg.kind == "vtde":
        return apply_map("clip/vtde_to_text_tower", pkg.state)
    state = apply_map("clip/chinese_clip_to_text_tower", pkg.state)
    if pkg.text_pooler is not None:
        state.update(pkg.text_pooler)
    else:
        # Identity dense layer: pooler_output = tanh([CLS]), deterministic and documented as unused.
        hidden, dtype = pkg.config.text_config.hidden_size, state["embeddings.word_embeddings.weight"].dtype
        state["pooler.dense.weight"] = torch.eye(hidden, dtype=dtype)
        state["pooler.dense.bias"] = torch.zeros(hidden, dtype=dtype)
    return state


def write_text_tower(pkg: ClipPackage, folder: OutputFolder, base: str, *, with_projection: bool = True) -> None:
    """BertModel folder + tokenizer (+ text_projection.safetensors) + sentence-transformers files, at
    ``base`` in ``folder`` ("" for a folder of its own)."""
    (folder.path / base).mkdir(parents=True, exist_ok=True)
    _save_config(_text_tower_config(pkg), folder, base)
    text_state = text_tower_state(pkg)
    folder.write_tensors(_at(base, "model.safetensors"), text_state)
    projection = pkg.state["text_projection.weight"] if with_projection else None
    if with_projection:
        folder.write_tensors(_at(base, "text_projection.safetensors"), {"weight": projection})
    _save_tokenizer(pkg.tokenizer, folder, base, pkg.max_length)
    if pkg.kind == "vtde":
        pooled, pooler = "BertModel.from_pretrained(dir).pooler_output", "bert"
    else:
        pooled = "BertModel.from_pretrained(dir).last_hidden_state[:, 0]"
        pooler = "checkpoint" if pkg.text_pooler is not None else "identity"
    _write_json(folder, _at(base, TEXT_TOWER_META), {
        "pooling": pkg.text_pooling, "pooler": pooler, "pooler_in_clip_embedding": pkg.kind == "vtde",
        "projection": "text_projection.safetensors" if with_projection else None,
        "embedding_dim": projection.shape[0] if with_projection else pkg.config.text_config.hidden_size,
        "max_length": pkg.max_length,
        "usage": f"{pooled} @ W.T" if with_projection else pooled})
    dense_pooler = (text_state["pooler.dense.weight"], text_state["pooler.dense.bias"]) if pkg.kind == "vtde" else None
    _write_sentence_transformers(pkg, folder, base, pkg.config.text_config.hidden_size, projection, dense_pooler)


def clip_report(pkg: ClipPackage, *, kind: str, source: dict, checks: list[dict], **fields) -> dict:
    """``conversion_report.json`` of a CLIP package (schema: ``ofaconv.core.report``); ``fields`` and
    the package's provenance (``pkg.extra``) are added where they do not shadow a schema key."""
    import transformers

    report = {
        "schema": SCHEMA,
        "kind": kind,
        "model_family": "clip",
        "ofaconv_version": __version__,
        "source": source,
        "package": pkg.kind,
        "max_length": pkg.max_length,
        "checks": checks,
        "passed": all(c["passed"] for c in checks),
        "versions": {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
                     "python": ".".join(map(str, sys.version_info[:3]))},
    }
    for key, value in {**pkg.extra, **fields}.items():
        report.setdefault(key, value)
    return report


def reload_check(loaded: dict) -> dict:
    """The check row of ``check_package`` (which raises on any difference)."""
    notes = "; ".join(loaded.get("notes") or [])
    return {"name": "reload", "passed": True, "metric": "max_abs_diff", "value": 0.0, "gate": 0.0,
            "detail": "every folder reloaded with the stock classes equals the written state"
                      + (f" ({notes})" if notes else "")}


# -- checking ----------------------------------------------------------------------------------
class _CaptureWarnings(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load_strict(cls, folder: Path, **kwargs):
    """``cls.from_pretrained`` that turns missing / unexpected / mismatched keys and any loading
    warning into a VerificationError naming the folder and the first offending key."""
    handler = _CaptureWarnings()
    root = hf_logging.get_logger("transformers")
    root.addHandler(handler)
    try:
        model, info = cls.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    finally:
        root.removeHandler(handler)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        entries = [e for e in info.get(kind, []) if not str(e).endswith(("position_ids",))]
        if entries:
            first = entries[0][0] if isinstance(entries[0], tuple) else entries[0]
            raise VerificationError(f"{cls.__name__} reports {len(entries)} {kind.replace('_', ' ')}", path=folder,
                                    key=first)
    bad = [m for m in handler.messages if any(s in m for s in ("newly initialized", "not used", "not initialized",
                                                                  "MISSING", "UNEXPECTED", "MISMATCH"))]
    if bad:
        raise VerificationError(f"{cls.__name__} warned while loading: {bad[0].splitlines()[0]}", path=folder)
    return model.eval()


# ChineseCLIPModel._init_weights (transformers 5.x) zeroes the [PAD] row of the word embedding even
# when the checkpoint provides it (the row slice escapes the "already loaded" marker). Only padded
# positions read that row and the attention mask hides them, so it is tolerated, and only there.
_PAD_ROW_ZEROED = "text_model.embeddings.word_embeddings.weight"


def _compare_states(expected: dict, got: dict, where: Path, *, pad_id: int | None = None) -> list[str]:
    notes = []
    missing = sorted(set(expected) - set(got))
    if missing:
        raise VerificationError("key missing after reload", path=where, key=missing[0])
    for key, tensor in expected.items():
        other = got[key].to(tensor.dtype)
        if other.shape == tensor.shape and torch.equal(other, tensor):
            continue
        if key == _PAD_ROW_ZEROED and pad_id is not None and other.shape == tensor.shape:
            rows = (other != tensor).any(dim=1).nonzero().flatten().tolist()
            if rows == [pad_id] and not other[pad_id].any():
                notes.append(f"{key}: row {pad_id} ([PAD]) zeroed by transformers on load; masked positions only")
                continue
        raise VerificationError("tensor differs from the in-memory model after reload", path=where, key=key)
    return notes


def check_package(pkg: ClipPackage, out: Path) -> dict:
    """Load every folder of a written package with stock classes and compare it with ``pkg``."""
    out = Path(out)
    cls = VisionTextDualEncoderModel if pkg.kind == "vtde" else ChineseCLIPModel
    root = load_strict(cls, out)
    notes = _compare_states(pkg.state, module_state_to_file(root.state_dict(), root), out,
                            pad_id=pkg.config.text_config.pad_token_id if pkg.kind == "chinese_clip" else None)

    vision = load_strict(CLIPVisionModelWithProjection, out / "vision_tower")
    vmap = "clip/vtde_to_vision_tower" if pkg.kind == "vtde" else "clip/chinese_clip_to_vision_tower"
    _compare_states(apply_map(vmap, pkg.state), vision.state_dict(), out / "vision_tower")

    # loaded exactly as a user would: no add_pooling_layer=False hiding a missing pooler
    text = load_strict(BertModel, out / "text_tower")
    _compare_states(text_tower_state(pkg), text.state_dict(), out / "text_tower")
    return {"root": root, "vision_tower": vision, "text_tower": text, "notes": notes}
