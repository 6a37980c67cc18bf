"""The model card (``README.md``) of a converted folder, built from ``config.json`` and the report.

Metadata goes through ``ModelCardData`` and the body through ``ModelCard.from_template`` so the
YAML block is always well formed. Nothing here talks to the network: ``ModelCard.validate()`` and
``push_to_hub`` post to huggingface.co, so the card is written to disk and uploaded with the
weights instead.

A card ofaconv wrote carries ``CARD_MARKER``; ``ofaconv push`` rebuilds such a card for the target
repo (so the usage snippet names it and the parity table matches the report being uploaded) and
leaves a card without the marker, i.e. one the user took over, exactly as it is.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard import metadata_load

from ofaconv import __version__
from ofaconv.core.errors import OfaconvError
from ofaconv.ofa.variants import family_from_vocab_size, family_info
from ofaconv.core.report import REPORT_NAME, describe_check, format_number, human_size, load_report

CARD_NAME = "README.md"
DEFAULT_LICENSE = "apache-2.0"
DEFAULT_TAGS = ("ofa", "ofaconv", "image-captioning")
CARD_MARKER = "<!-- ofaconv:generated-card"
_LANGUAGE = {"en": "en", "cn": "zh"}
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")

_TEMPLATE = """\
---
{{ card_data }}
---

{{ marker }} v{{ ofaconv_version }}. `ofaconv push` rebuilds it from {{ report_name }}; delete this line to keep your edits. -->

# {{ title }}

{{ summary }}

## Usage

With plain transformers (the modeling code ships in this repository):

```python
{%- if has_processor %}
import torch
from PIL import Image
from transformers import AutoModelForSeq2SeqLM, AutoProcessor

repo = "{{ repo }}"
model = AutoModelForSeq2SeqLM.from_pretrained(repo, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)

image = Image.open("image.jpg").convert("RGB")
inputs = processor(images=image, return_tensors="pt")  # text defaults to the prompt {{ prompt }}
with torch.no_grad():
    output = model.generate(**inputs{{ generate_args }})
print(processor.batch_decode(output, skip_special_tokens=True)[0])
{%- else %}
from transformers import AutoModelForSeq2SeqLM

model = AutoModelForSeq2SeqLM.from_pretrained("{{ repo }}", trust_remote_code=True).eval()
# No processor in this repo: {{ processor_note }}.
# Pass input_ids, patch_images and patch_masks to model.generate(...) yourself.
{%- endif %}
```

With `pip install ofaconv`, importing it registers the OFA classes, so no remote code runs:

```python
import ofaconv  # registers model_type "ofa" with the transformers Auto classes
from transformers import AutoModelForSeq2SeqLM{% if has_processor %}, AutoProcessor{% endif %}

model = AutoModelForSeq2SeqLM.from_pretrained("{{ repo }}").eval()
{%- if has_processor %}
processor = AutoProcessor.from_pretrained("{{ repo }}")
{%- endif %}
```

## Parity with the source checkpoint

{{ verdict }}
{% if checks %}
| Check | Metric | Value | Gate | Result | Detail |
|---|---|---|---|---|---|
{%- for c in checks %}
| {{ c.name }} | {{ c.metric }} | {{ c.value }} | {{ c.gate }} | {{ c.result }} | {{ c.detail }} |
{%- endfor %}
{% endif %}
## Source
{% for label, value in source_rows %}
- {{ label }}: {{ value }}
{%- endfor %}
{% if flags %}
<details>
<summary>Checkpoint flags ({{ flags | length }})</summary>

| Flag | Value |
|---|---|
{%- for name, value in flags %}
| `{{ name }}` | `{{ value }}` |
{%- endfor %}

</details>
{% endif %}
{%- if files %}
Weight files:

| File | Size | sha256 |
|---|---|---|
{%- for name, size, sha in files %}
| `{{ name }}` | {{ size }} | `{{ sha }}` |
{%- endfor %}
{% endif %}"""


def build_model_card(
    folder: str | os.PathLike,
    *,
    license: str = DEFAULT_LICENSE,
    base_model: str | list[str] | None = None,
    extra_tags=(),
    repo_id: str | None = None,
) -> ModelCard:
    """Card for the converted ``folder`` from its ``config.json`` and ``conversion_report.json``.

    ``repo_id`` is the Hub repo the snippet loads from (``ofaconv push`` passes it); without it the
    snippet names a placeholder path. A folder without a report still gets a card, one that says
    the weights were not verified.
    """
    root = Path(folder)
    config = _load_config(root)
    try:
        report = load_report(root)
    except OfaconvError:
        report = None
    family = (report or {}).get("family") or family_from_vocab_size(config.get("vocab_size"))
    family_defaults = family_info(family) if family else None

    card_data = ModelCardData(
        language=_LANGUAGE.get(family),
        license=license,
        library_name="transformers",
        pipeline_tag="image-to-text",
        tags=[*DEFAULT_TAGS, *extra_tags],
        base_model=base_model,
    )
    return ModelCard.from_template(
        card_data,
        template_str=_TEMPLATE,
        marker=CARD_MARKER,
        ofaconv_version=__version__,
        report_name=REPORT_NAME,
        title=repo_id.split("/")[-1] if repo_id else _default_title(report, root),
        summary=_summary(report, config),
        repo=repo_id or "path/to/converted-folder",
        has_processor=any((root / name).is_file() for name in _PROCESSOR_FILES),
        processor_note=((report or {}).get("processing") or {}).get("reason") or "none was saved with the weights",
        prompt=json.dumps(_prompt(report, family_defaults), ensure_ascii=False),
        generate_args=_generate_args(root, family_defaults),
        verdict=_verdict(report),
        checks=_check_rows(report),
        source_rows=_source_rows(report, config),
        flags=[
            (k, _cell(json.dumps(v, ensure_ascii=False)))
            for k, v in sorted(((report or {}).get("flags") or {}).items())
            if not k.startswith("_")  # bookkeeping of the flag reader, not checkpoint flags
        ],
        files=[
            (name, human_size(entry.get("size")), entry.get("sha256"))
            for name, entry in sorted(((report or {}).get("files") or {}).items())
            if isinstance(entry, dict)
        ],
    )


def write_model_card(folder: str | os.PathLike, **kwargs) -> Path:
    """Build the card (arguments as ``build_model_card``) and write ``folder/README.md`` atomically."""
    root = Path(folder)
    text = str(build_model_card(root, **kwargs))
    path = root / CARD_NAME
    fd, tmp = tempfile.mkstemp(prefix=f".{CARD_NAME}.", suffix=".tmp", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def card_for_repo(folder: str | os.PathLike, repo_id: str) -> ModelCard | None:
    """The card to publish ``folder`` as ``repo_id``, or None to upload its ``README.md`` as is.

    A missing card is built with the defaults; a card ofaconv wrote is rebuilt for ``repo_id``
    keeping its license, base model and extra tags; a card without the marker is the user's.
    """
    root = Path(folder)
    path = root / CARD_NAME
    if not path.is_file():
        return build_model_card(root, repo_id=repo_id)
    if CARD_MARKER not in path.read_text(encoding="utf-8", errors="replace"):
        return None
    meta = card_metadata(root)
    tags = meta.get("tags") or []
    return build_model_card(
        root,
        license=meta.get("license") or DEFAULT_LICENSE,
        base_model=meta.get("base_model"),
        extra_tags=[t for t in tags if t not in DEFAULT_TAGS],
        repo_id=repo_id,
    )


def card_metadata(folder: str | os.PathLike) -> dict:
    """The YAML metadata of ``folder/README.md`` (empty if it has none)."""
    path = Path(folder) / CARD_NAME
    try:
        return metadata_load(path) or {}
    except (yaml.YAMLError, ValueError) as exc:
        raise OfaconvError(f"card metadata is not valid YAML ({_one_line(str(exc))})", path=path) from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _load_config(root: Path) -> dict:
    path = root / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OfaconvError("missing: not a converted model folder", path=path) from None
    except json.JSONDecodeError as exc:
        raise OfaconvError(f"not valid JSON ({exc})", path=path) from None
    if not isinstance(config, dict) or config.get("model_type") != "ofa":
        found = config.get("model_type") if isinstance(config, dict) else None
        raise OfaconvError(f"model_type is {found!r}, expected 'ofa'", path=path, key="model_type")
    return config


def _default_title(report: dict | None, root: Path) -> str:
    # The converter writes the card inside a temporary sibling, so the folder name is not the
    # model's name; the variant or the checkpoint's file name is.
    report = report or {}
    source = (report.get("source") or {}).get("file")
    return report.get("variant") or (Path(source).stem if source else None) or root.resolve().name


def _prompt(report: dict | None, family: dict | None) -> str:
    """The caption prompt the saved processor uses by default."""
    processing = (report or {}).get("processing") or {}
    return processing.get("prompt") or (family or family_info("en"))["prompt"]


def _generate_args(root: Path, family: dict | None) -> str:
    if (root / "generation_config.json").is_file():
        return ""  # beam settings travel in generation_config.json
    gen = (family or {}).get("generation") or {}
    args = {"num_beams": gen.get("num_beams", 5), "max_new_tokens": gen.get("max_len_b", 20)}
    if gen.get("no_repeat_ngram_size"):
        args["no_repeat_ngram_size"] = gen["no_repeat_ngram_size"]
    return "".join(f", {k}={v}" for k, v in args.items())


def _summary(report: dict | None, config: dict) -> str:
    arch = (
        f"{config.get('encoder_layers', '?')}+{config.get('decoder_layers', '?')} layers, "
        f"d_model {config.get('d_model', '?')}, {config.get('resnet_type', '?')} trunk"
    )
    if report is None:
        return (
            f"OFA image-captioning model ({arch}) in Hugging Face transformers format. "
            f"**Not verified:** the folder had no {REPORT_NAME}."
        )
    source = (report.get("source") or {}).get("file") or "an unnamed source"
    verb = {"finetune": "finetuned with ofaconv from", "upgrade": "upgraded by ofaconv from"}.get(
        report.get("kind"), "converted by ofaconv from the fairseq checkpoint"
    )
    name = report.get("variant") or "OFA"
    return f"{name} image-captioning model ({arch}), {verb} `{source}`."


def _verdict(report: dict | None) -> str:
    if report is None:
        return f"No {REPORT_NAME} was found: these weights were not checked against their source."
    checks = [c for c in report.get("checks") or [] if isinstance(c, dict)]
    if not checks:
        return "The conversion was not verified: the report records no checks."
    failed = [describe_check(c) for c in checks if c.get("passed") is not True]
    if failed:
        return f"**{len(failed)} of {len(checks)} checks failed:** " + "; ".join(failed) + "."
    dtype = report.get("dtype")
    where = f" ({dtype} on CPU)" if dtype else ""
    return f"All {len(checks)} checks passed{where}, recorded in `{REPORT_NAME}`:"


def _check_rows(report: dict | None) -> list[dict]:
    rows = []
    for check in (report or {}).get("checks") or []:
        if not isinstance(check, dict):
            continue
        rows.append(
            {
                "name": _cell(check.get("name", "?")),
                "metric": _cell(check.get("metric") or ""),
                "value": _cell(format_number(check.get("value")) if check.get("value") is not None else ""),
                "gate": _cell(format_number(check.get("gate")) if check.get("gate") is not None else ""),
                "result": "passed" if check.get("passed") is True else "**failed**",
                "detail": _cell(check.get("detail") or ""),
            }
        )
    return rows


def _source_rows(report: dict | None, config: dict) -> list[tuple[str, str]]:
    report = report or {}
    source = report.get("source") or {}
    rows = []
    if source.get("file"):
        rows.append(("Checkpoint", f"`{source['file']}`"))
    if source.get("sha256"):
        rows.append(("sha256", f"`{source['sha256']}`"))
    if source.get("size") is not None:
        rows.append(("Size", human_size(source["size"])))
    if source.get("layout"):
        rows.append(("Layout", f"`{source['layout']}`"))
    if report.get("variant"):
        rows.append(("Variant", f"`{report['variant']}`"))
    if report.get("family"):
        rows.append(("Family", f"`{report['family']}`"))
    keymap = report.get("keymap") or {}
    if keymap.get("file"):
        sha = f" (sha256 `{keymap['sha256']}`)" if keymap.get("sha256") else ""
        rows.append(("Key map", f"`{keymap['file']}`{sha}"))
    if report.get("dtype"):
        rows.append(("Weights dtype", f"`{report['dtype']}`"))
    rows.append(("Patch image size", f"`{config.get('patch_image_size', '?')}`"))
    versions = report.get("versions") or {}
    tools = [f"ofaconv {report['ofaconv_version']}"] if report.get("ofaconv_version") else []
    tools += [f"{name} {versions[name]}" for name in ("torch", "transformers", "python") if versions.get(name)]
    if tools:
        rows.append(("Written with", ", ".join(tools)))
    return rows


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")

