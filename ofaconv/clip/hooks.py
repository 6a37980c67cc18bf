"""What the core and the publisher ask of a CLIP folder (protocol: :mod:`ofaconv.core.registry`).

A CLIP package folder holds the dual encoder at its root and each tower as a standalone model in
``vision_tower/`` and ``text_tower/``; the root's report (and manifest) covers all three, and a
tower folder can be verified and published on its own.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["verify_folder", "card"]

ROOT_TYPES = {"vision-text-dual-encoder": "vtde", "chinese_clip": "chinese_clip"}
TOWER_TYPES = {"clip_vision_model": "vision_tower", "bert": "text_tower"}
_CLASSES = {"vtde": "VisionTextDualEncoderModel", "chinese_clip": "ChineseCLIPModel"}
_PROCESSORS = {"vtde": "VisionTextDualEncoderProcessor", "chinese_clip": "ChineseCLIPProcessor"}
_LABELS = '["一只猫", "一只狗", "一辆公交车"]'


def _config(folder: Path) -> dict:
    from ofaconv.core.errors import OfaconvError

    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OfaconvError(f"unreadable config ({exc}); convert again", path=path) from None
    if not isinstance(config, dict) or config.get("model_type") not in {**ROOT_TYPES, **TOWER_TYPES}:
        found = config.get("model_type") if isinstance(config, dict) else None
        raise OfaconvError(f"model_type {found!r} is not a CLIP package, vision tower or text tower", path=path,
                           key="model_type")
    return config


def _meta(folder: Path) -> dict:
    path = folder / "ofaconv_clip.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _row(name, passed, *, detail="", metric=None, value=None, gate=None) -> dict:
    row = {"name": name, "passed": bool(passed), "detail": detail}
    if metric is not None:
        row.update(metric=metric, value=value, gate=gate)
    return row


# -- verify ------------------------------------------------------------------------------------
def verify_folder(folder, against=None, *, ema=None):
    """``ofaconv verify``: every folder of the package loads with stock transformers classes and a
    probe runs; with ``against``, the tensors and the full parity check against that source (the
    report's checks are rewritten with them)."""
    from ofaconv.core.errors import OfaconvError

    folder = Path(folder)
    if ema:
        raise OfaconvError("--ema applies to OFA checkpoints only", path=folder)
    config = _config(folder)
    if config["model_type"] in TOWER_TYPES:
        if against is not None:
            raise OfaconvError(f"--against checks a whole package: run it on {folder.parent}", path=folder)
        checks = _tower_checks(folder, TOWER_TYPES[config["model_type"]])
    elif against is None:
        checks = _package_checks(folder, ROOT_TYPES[config["model_type"]])
    else:
        checks = _against_checks(folder, Path(against))
    return checks, all(c["passed"] for c in checks)


def export_onnx(folder, out, *, threads=None):
    """``ofaconv export onnx``: vision.onnx + text.onnx and their parity rows (:mod:`ofaconv.clip.onnx`)."""
    from .onnx import export_onnx as run

    return run(folder, out, threads=threads)


def _load(cls, folder: Path):
    """(model, None), or (None, why) when the folder does not load cleanly with ``cls``."""
    from .package import load_strict

    try:
        return load_strict(cls, folder), None
    except Exception as exc:  # noqa: BLE001 - any loading failure is the finding
        return None, f"{folder.name}/: {type(exc).__name__}: {' '.join(str(exc).split())}"


def _probe():
    from .convert import PROBE_TEXTS, probe_images

    return probe_images(), PROBE_TEXTS


def _package_checks(folder: Path, kind: str) -> list[dict]:
    import torch
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer, BertModel, CLIPVisionModelWithProjection
    from safetensors.torch import load_file

    from .convert import PARITY_GATE
    from .package import TEXT_TOWER_META
    from .towers import ClipTowers, sentence_transformers_encode

    models, problems = {}, []
    for name, cls, where in (("root", getattr(transformers, _CLASSES[kind]), folder),
                             ("vision_tower", CLIPVisionModelWithProjection, folder / "vision_tower"),
                             ("text_tower", BertModel, folder / "text_tower")):
        models[name], why = _load(cls, where)
        if why:
            problems.append(why)
    if problems:
        return [_row("structure", False, detail="; ".join(problems))]
    checks = [_row("structure", True, detail=f"{_CLASSES[kind]}, vision_tower/ and text_tower/ load with stock "
                                             "classes, no missing, unexpected or mismatched keys")]
    tokenizer = AutoTokenizer.from_pretrained(folder)  # saved with the package's training length
    towers = ClipTowers(models["root"], AutoImageProcessor.from_pretrained(folder), tokenizer, kind=kind,
                        max_length=tokenizer.model_max_length, path=folder)
    images, texts = _probe()
    pixels = towers.preprocess_images(images)
    batch = towers.tokenize(texts, padding="max_length")
    with torch.no_grad():
        img = towers.encode_pixels(pixels, normalize=False)
        txt = towers.encode_token_batch(batch, normalize=False)
        finite = bool(torch.isfinite(img).all() and torch.isfinite(txt).all())
        checks.append(_row("probe_forward", finite, detail=f"image features {list(img.shape)}, text features "
                                                           f"{list(txt.shape)}, finite={finite}"))
        vision = models["vision_tower"](pixel_values=pixels).image_embeds
        text_meta = json.loads((folder / "text_tower" / TEXT_TOWER_META).read_text(encoding="utf-8"))
        out = models["text_tower"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        pooled = out.pooler_output if text_meta.get("pooling") == "pooler" else out.last_hidden_state[:, 0]
        projection = load_file(str(folder / "text_tower" / "text_projection.safetensors"))["weight"]
        st = sentence_transformers_encode(folder / "text_tower", batch["input_ids"], batch["attention_mask"],
                                          models["text_tower"])
    for name, got, want in (("vision_tower", vision, img), ("text_tower", pooled @ projection.t(), txt),
                            ("text_tower_sentence_transformers", st, txt / txt.norm(dim=-1, keepdim=True))):
        value = float((got.double() - want.double()).abs().max()) if got.shape == want.shape else float("inf")
        checks.append(_row(name, value <= PARITY_GATE, metric="max_abs_diff", value=value, gate=PARITY_GATE,
                           detail=f"{name}/ vs the package's own embedding on the probe"))
    return checks


def _tower_checks(folder: Path, tower: str) -> list[dict]:
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, BertModel, CLIPVisionModelWithProjection

    from .towers import sentence_transformers_encode

    cls = CLIPVisionModelWithProjection if tower == "vision_tower" else BertModel
    model, why = _load(cls, folder)
    if why:
        return [_row("structure", False, detail=why)]
    checks = [_row("structure", True, detail=f"{cls.__name__} loads cleanly")]
    images, texts = _probe()
    with torch.no_grad():
        if tower == "vision_tower":
            pixels = AutoImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
            out = model(pixel_values=pixels).image_embeds
        else:
            batch = AutoTokenizer.from_pretrained(folder)(texts, padding=True, truncation=True, return_tensors="pt")
            out = sentence_transformers_encode(folder, batch["input_ids"], batch["attention_mask"], model)
    finite = bool(torch.isfinite(out).all())
    checks.append(_row("probe_forward", finite, detail=f"embeddings {list(out.shape)} finite={finite}"))
    return checks


def _against_checks(folder: Path, against: Path) -> list[dict]:
    from ofaconv.core.errors import VerificationError
    from ofaconv.core.report import REPORT_NAME, load_report

    from .convert import load_package, parity_checks, reference_source, source_weights
    from .package import check_package

    report = load_report(folder)
    meta = _meta(folder)
    vocab = folder / "vocab.txt"
    pkg, fmt, state, heads = load_package(against, arch=meta.get("arch"), max_length=meta.get("max_length"),
                                          vocab=str(vocab) if vocab.is_file() else None)
    fmt, state, heads = reference_source(pkg, fmt, state, heads)
    checks = [_source_check(report, source_weights(against))]
    try:
        models = check_package(pkg, folder)
    except VerificationError as exc:
        checks.append(_row("tensors", False, detail=str(exc)))
    else:
        checks.append(_row("tensors", True, detail=f"{_CLASSES[pkg.kind]}, vision_tower/ and text_tower/ load with "
                                                   f"stock classes and hold the source's tensors exactly"))
        checks += parity_checks(folder, pkg, fmt, state, heads, models)
    report["checks"] = checks
    report["passed"] = all(c["passed"] for c in checks)
    path = folder / REPORT_NAME
    partial = path.with_name(f".{REPORT_NAME}.partial")
    partial.write_text(json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    partial.replace(path)
    return checks


def _source_check(report: dict, against: Path) -> dict:
    from ofaconv.core.digest import file_sha256

    recorded = (report.get("source") or {}).get("sha256")
    actual = file_sha256(against)
    if not recorded:
        return _row("source", True, detail=f"report names no source hash; {against.name} sha256 {actual[:12]}")
    same = actual == recorded
    return _row("source", same, detail=f"{against.name} is the converted file" if same else
                f"{against.name} sha256 {actual[:12]} is not the converted file's {recorded[:12]}")


# -- card --------------------------------------------------------------------------------------
def card(folder, config: dict, report: dict | None) -> dict:
    """The CLIP part of the model card: the package root is a zero-shot image classifier, its
    ``vision_tower/`` an image feature extractor, its ``text_tower/`` a sentence embedder."""
    folder = Path(folder)
    model_type = config.get("model_type")
    if model_type not in {**ROOT_TYPES, **TOWER_TYPES}:
        _config(folder)  # the one-line refusal naming config.json
    source = ((report or {}).get("source") or {}).get("file")
    origin = f", converted by ofaconv from `{source}`" if source else ""
    if model_type in ROOT_TYPES and (report or {}).get("format") == "onnx":
        return {
            "pipeline_tag": "zero-shot-image-classification",
            "tags": ["clip", "onnx", "ofaconv"],
            "language": "zh",
            "library_name": "onnx",
            "description": ("A Chinese CLIP dual encoder exported by `ofaconv export onnx`: `vision.onnx` "
                            "(`pixel_values` -> `image_embeds`) and `text.onnx` (`input_ids`, `attention_mask` -> "
                            f"`text_embeds`), L2-normalised, equal to the PyTorch towers within 1e-4{origin}."),
            "usage": _ONNX_USAGE,
        }
    if model_type in ROOT_TYPES:
        kind = ROOT_TYPES[model_type]
        v, t = config.get("vision_config") or {}, config.get("text_config") or {}
        name = "Chinese-CLIP" if kind == "chinese_clip" else "BertCLIP"
        return {
            "pipeline_tag": "zero-shot-image-classification",
            "tags": ["clip", "chinese-clip" if kind == "chinese_clip" else "bertclip", "ofaconv"],
            "language": "zh",
            "library_name": "transformers",
            "description": (
                f"{name} image-text dual encoder (ViT {v.get('num_hidden_layers', '?')} layers x "
                f"{v.get('hidden_size', '?')}, BERT {t.get('num_hidden_layers', '?')} layers x "
                f"{t.get('hidden_size', '?')}, embedding {config.get('projection_dim', '?')}) as a stock transformers "
                f"`{_CLASSES[kind]}`{origin}. `vision_tower/` and `text_tower/` hold each tower as a standalone "
                "model whose embeddings equal the dual encoder's."),
            "usage": _root_usage(kind),
        }
    tower = TOWER_TYPES[model_type]
    if tower == "vision_tower":
        return {
            "pipeline_tag": "image-feature-extraction",
            "tags": ["clip", "vision", "ofaconv"],
            "language": "zh",
            "library_name": "transformers",
            "description": ("The vision tower of a Chinese CLIP dual encoder as a stock "
                            f"`CLIPVisionModelWithProjection`{origin}: its `image_embeds` are the CLIP image "
                            "embeddings, in the space of the matching text tower's."),
            "usage": _VISION_USAGE,
        }
    return {
        "pipeline_tag": "feature-extraction",
        "tags": ["clip", "bert", "sentence-transformers", "sentence-similarity", "ofaconv"],
        "language": "zh",
        "library_name": "sentence-transformers",
        "description": ("The text tower of a Chinese CLIP dual encoder as a stock `BertModel` with its projection "
                        f"(`text_projection.safetensors`) and a sentence-transformers layout{origin}: the "
                        "embeddings are the CLIP text embeddings, in the space of the matching vision tower's."),
        "usage": _TEXT_USAGE,
    }


def _root_usage(kind: str) -> str:
    return f"""\
```python
import torch
from PIL import Image
from transformers import {_CLASSES[kind]}, {_PROCESSORS[kind]}

model = {_CLASSES[kind]}.from_pretrained("{{repo}}").eval()
processor = {_PROCESSORS[kind]}.from_pretrained("{{repo}}")

image = Image.open("image.jpg").convert("RGB")
labels = {_LABELS}
inputs = processor(text=labels, images=image, return_tensors="pt", padding=True)
with torch.no_grad():
    probs = model(**inputs).logits_per_image.softmax(dim=-1)
print(dict(zip(labels, probs[0].tolist())))
```"""


_VISION_USAGE = """\
```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

model = CLIPVisionModelWithProjection.from_pretrained("{repo}").eval()
processor = AutoImageProcessor.from_pretrained("{repo}")

image = Image.open("image.jpg").convert("RGB")
with torch.no_grad():
    embedding = model(**processor(images=image, return_tensors="pt")).image_embeds
print(embedding.shape)
```"""

_TEXT_USAGE = f"""\
```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{{repo}}")
embeddings = model.encode({_LABELS})  # normalised CLIP text embeddings
print(embeddings.shape)
```"""


_ONNX_USAGE = """\
```python
import json
import numpy as np
import onnxruntime as ort
from huggingface_hub import snapshot_download

folder = snapshot_download("{repo}")
vision = ort.InferenceSession(f"{folder}/vision.onnx")
text = ort.InferenceSession(f"{folder}/text.onnx")
scale = np.exp(json.load(open(f"{folder}/onnx_clip.json"))["logit_scale"])
# pixel_values from the folder's preprocessor_config.json, input_ids/attention_mask from its tokenizer:
# image = vision.run(None, {"pixel_values": pixel_values})[0]
# texts = text.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]
# logits_per_image = scale * image @ texts.T
```"""
