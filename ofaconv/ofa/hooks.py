"""What the core and the publisher ask of an OFA folder (protocol: :mod:`ofaconv.core.registry`)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["verify_folder", "card"]

TAGS = ("ofa", "ofaconv", "image-captioning")
_LANGUAGE = {"en": "en", "cn": "zh"}
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def verify_folder(folder, against=None, *, ema=None):
    from .verify import verify_folder as run

    return run(folder, against, ema=ema)


def export_onnx(folder, out, *, threads=None):
    """``ofaconv export onnx``: encoder.onnx + decoder.onnx and their parity rows (:mod:`ofaconv.ofa.onnx`)."""
    from .onnx import export_onnx as run

    return run(folder, out, threads=threads)


def card(folder, config: dict, report: dict | None) -> dict:
    """The OFA part of the model card: metadata, a description and both loading paths."""
    from ofaconv.core.errors import OfaconvError
    from .variants import family_from_vocab_size, family_info

    folder = Path(folder)
    if config.get("model_type") != "ofa":
        raise OfaconvError(f"model_type is {config.get('model_type')!r}, expected 'ofa'", path=folder / "config.json",
                           key="model_type")
    family = (report or {}).get("family") or family_from_vocab_size(config.get("vocab_size"))
    defaults = family_info(family) if family else None
    if (report or {}).get("format") == "onnx":
        return {
            "pipeline_tag": "image-to-text",
            "tags": [*TAGS, "onnx"],
            "language": _LANGUAGE.get(family),
            "library_name": "onnx",
            "description": _description(report, config) + " Exported as ONNX graphs (`encoder.onnx`, "
                           "`decoder.onnx` with past keys/values) by `ofaconv export onnx`; captions from "
                           "onnxruntime alone equal the PyTorch model's token for token (checked at export).",
            "usage": _ONNX_USAGE,
        }
    return {
        # transformers 5 runs image captioning as "image-text-to-text" ("image-to-text" is its alias)
        "pipeline_tag": "image-text-to-text",
        "tags": list(TAGS),
        "language": _LANGUAGE.get(family),
        "library_name": "transformers",
        "description": _description(report, config),
        "usage": _usage(folder, report, defaults),
        "details": [("Patch image size", f"`{config.get('patch_image_size', '?')}`")],
    }


def _description(report: dict | None, config: dict) -> str:
    arch = (
        f"{config.get('encoder_layers', '?')}+{config.get('decoder_layers', '?')} layers, "
        f"d_model {config.get('d_model', '?')}, {config.get('resnet_type', '?')} trunk"
    )
    if report is None:
        return f"OFA image-captioning model ({arch}) in Hugging Face transformers format."
    source = (report.get("source") or {}).get("file") or "an unnamed source"
    verb = {"finetune": "finetuned with ofaconv from", "upgrade": "upgraded by ofaconv from"}.get(
        report.get("kind"), "converted by ofaconv from the fairseq checkpoint"
    )
    return f"{report.get('variant') or 'OFA'} image-captioning model ({arch}), {verb} `{source}`."


def _usage(folder: Path, report: dict | None, defaults: dict | None) -> str:
    has_processor = any((folder / name).is_file() for name in _PROCESSOR_FILES)
    if has_processor:
        prompt = json.dumps(_prompt(report, defaults), ensure_ascii=False)
        remote = f"""\
import torch
from PIL import Image
from transformers import AutoModelForSeq2SeqLM, AutoProcessor

repo = "{{repo}}"
model = AutoModelForSeq2SeqLM.from_pretrained(repo, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)

image = Image.open("image.jpg").convert("RGB")
inputs = processor(images=image, return_tensors="pt")  # text defaults to the prompt {prompt}
with torch.no_grad():
    output = model.generate(**inputs{_generate_args(folder, defaults)})
print(processor.batch_decode(output, skip_special_tokens=True)[0])

# or, the same caption through a pipeline:
from transformers import pipeline

captioner = pipeline("image-text-to-text", model=repo, trust_remote_code=True)
print(captioner(image))"""
        native = """\
import ofaconv  # registers model_type "ofa" with the transformers Auto classes
from transformers import AutoModelForSeq2SeqLM, AutoProcessor

model = AutoModelForSeq2SeqLM.from_pretrained("{repo}").eval()
processor = AutoProcessor.from_pretrained("{repo}")"""
    else:
        note = ((report or {}).get("processing") or {}).get("reason") or "none was saved with the weights"
        remote = f"""\
from transformers import AutoModelForSeq2SeqLM

model = AutoModelForSeq2SeqLM.from_pretrained("{{repo}}", trust_remote_code=True).eval()
# No processor in this repo: {note}.
# Pass input_ids, patch_images and patch_masks to model.generate(...) yourself."""
        native = """\
import ofaconv  # registers model_type "ofa" with the transformers Auto classes
from transformers import AutoModelForSeq2SeqLM

model = AutoModelForSeq2SeqLM.from_pretrained("{repo}").eval()"""
    return (f"With plain transformers (the modeling code ships in this repository):\n\n```python\n{remote}\n```\n\n"
            "With `pip install ofaconv`, importing it registers the OFA classes, so no remote code runs:\n\n"
            f"```python\n{native}\n```")


def _prompt(report: dict | None, defaults: dict | None) -> str:
    """The caption prompt the saved processor uses by default."""
    from .variants import family_info

    processing = (report or {}).get("processing") or {}
    return processing.get("prompt") or (defaults or family_info("en"))["prompt"]


def _generate_args(folder: Path, defaults: dict | None) -> str:
    if (folder / "generation_config.json").is_file():
        return ""  # beam settings travel in generation_config.json
    gen = (defaults or {}).get("generation") or {}
    args = {"num_beams": gen.get("num_beams", 5), "max_new_tokens": gen.get("max_len_b", 20)}
    if gen.get("no_repeat_ngram_size"):
        args["no_repeat_ngram_size"] = gen["no_repeat_ngram_size"]
    return "".join(f", {k}={v}" for k, v in args.items())


_ONNX_USAGE = """\
```python
from huggingface_hub import snapshot_download
from ofaconv.ofa.onnx import OnnxCaptioner  # numpy + onnxruntime only; torch is not imported

folder = snapshot_download("{repo}")
ids = OnnxCaptioner(folder).caption_ids(["image.jpg"])  # the folder's fairseq search settings
# ids -> text with the folder's tokenizer, e.g. transformers.AutoTokenizer.from_pretrained(folder)
```"""
