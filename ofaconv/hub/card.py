"""The model card (``README.md``) of a converted folder, for any model family.

The card is built from ``config.json``, the conversion report and what the folder's family says
about itself (its hooks module's ``card(folder, config, report)``: pipeline tag, tags, language,
library, title, description, usage snippet; see :mod:`ofaconv.core.registry`). This module never
imports a family. Metadata goes through ``ModelCardData`` and the body through
``ModelCard.from_template`` so the YAML block is always well formed. Nothing here talks to the
network: ``ModelCard.validate()`` and ``push_to_hub`` post to huggingface.co, so the card is
written to disk and uploaded with the weights instead.

A card ofaconv wrote carries ``CARD_MARKER`` and is part of the folder's manifest; ``ofaconv push``
rebuilds it for the target repo (so the usage snippet names it), keeping its license, base model
and extra tags. A subfolder published alone (a CLIP package's ``vision_tower/``) has no card on
disk: push builds one from the subfolder's config and the parent's report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ofaconv import __version__
from ofaconv.core import registry
from ofaconv.core.errors import OfaconvError
from ofaconv.core.writer import atomic_file
from ofaconv.core.report import (
    REPORT_NAME,
    covering_report,
    describe_check,
    format_number,
    human_size,
    manifest_part,
)

if TYPE_CHECKING:  # huggingface_hub loads with the first card (half a second of `ofaconv --help` otherwise)
    from huggingface_hub import ModelCard

CARD_NAME = "README.md"
DEFAULT_LICENSE = "apache-2.0"
CARD_MARKER = "<!-- ofaconv:generated-card"
REPO_PLACEHOLDER = "{repo}"  # in a family's usage snippet: the repo id, or LOCAL_REPO before a push
LOCAL_REPO = "path/to/converted-folder"

_TEMPLATE = """\
---
{{ card_data }}
---

{{ marker }} v{{ ofaconv_version }}. `ofaconv push` rebuilds it for the target repo from {{ report_name }}, whose manifest covers this file: edit the card on the Hub after pushing. -->

# {{ title }}

{{ description }}

## Usage

{{ usage }}

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
Files:

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
    report: dict | None = None,
) -> ModelCard:
    """Card for the converted ``folder`` from its ``config.json``, its report and its family.

    ``report`` is the report to describe (a conversion passes the one it is about to write);
    by default the folder's own, or for a subfolder the parent's that covers it. ``repo_id`` is
    the Hub repo the snippet loads from (``ofaconv push`` passes it); without it the snippet names
    a placeholder path. A folder without a report still gets a card, one that says the weights
    were not verified.
    """
    from huggingface_hub import ModelCard, ModelCardData

    root = Path(folder)
    config = _load_config(root)
    prefix = ""
    if report is None:
        try:
            report, prefix = covering_report(root)
        except OfaconvError:
            report = None
    family = _family(root.parent if prefix else root, report)
    info = family.load_hooks().card(root, config, report)
    tags = list(dict.fromkeys([*info.get("tags", ()), *extra_tags]))
    card_data = ModelCardData(
        language=info.get("language"),
        license=license,
        library_name=info.get("library_name", "transformers"),
        pipeline_tag=info.get("pipeline_tag"),
        tags=tags,
        base_model=base_model,
    )
    description = info.get("description") or ""
    if report is None:
        description += f" **Not verified:** the folder had no {REPORT_NAME}."
    return ModelCard.from_template(
        card_data,
        template_str=_TEMPLATE,
        marker=CARD_MARKER,
        ofaconv_version=__version__,
        report_name=REPORT_NAME,
        title=repo_id.split("/")[-1] if repo_id else info.get("title") or _default_title(report, root),
        description=description.strip(),
        usage=(info.get("usage") or "").strip().replace(REPO_PLACEHOLDER, repo_id or LOCAL_REPO),
        verdict=_verdict(report),
        checks=_check_rows(report),
        source_rows=_source_rows(report) + [(label, value) for label, value in info.get("details", ())],
        flags=[
            (k, _cell(json.dumps(v, ensure_ascii=False)))
            for k, v in sorted(((report or {}).get("flags") or {}).items())
            if not k.startswith("_")  # bookkeeping of the flag reader, not checkpoint flags
        ],
        files=[
            (name, human_size(entry.get("size")), entry.get("sha256"))
            for name, entry in sorted(manifest_part(report or {}, prefix).items())
            if isinstance(entry, dict)
        ],
    )


def write_model_card(folder: str | os.PathLike, **kwargs) -> Path:
    """Build the card (arguments as ``build_model_card``) and write ``folder/README.md`` atomically,
    with the permissions the umask gives any other output file."""
    root = Path(folder)
    text = str(build_model_card(root, **kwargs))
    path = root / CARD_NAME
    with atomic_file(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
    return path


def card_for_repo(folder: str | os.PathLike, repo_id: str) -> ModelCard | None:
    """The card to publish ``folder`` as ``repo_id``, or None to upload its ``README.md`` as is.

    A card ofaconv wrote is rebuilt for ``repo_id`` keeping its license, base model and extra tags;
    a folder without a card (a subfolder published alone) gets one built with what the parent's
    card chose, if it has one; a card without the marker is uploaded as it is.
    """
    root = Path(folder)
    path = root / CARD_NAME
    if path.is_file():
        if CARD_MARKER not in path.read_text(encoding="utf-8", errors="replace"):
            return None
        meta = card_metadata(root)
        return build_model_card(root, license=meta.get("license") or DEFAULT_LICENSE,
                                base_model=meta.get("base_model"), extra_tags=meta.get("tags") or [],
                                repo_id=repo_id)
    parent = root.parent / CARD_NAME
    meta = {}
    if parent.is_file() and CARD_MARKER in parent.read_text(encoding="utf-8", errors="replace"):
        meta = card_metadata(root.parent)
    return build_model_card(root, license=meta.get("license") or DEFAULT_LICENSE,
                            base_model=meta.get("base_model"), repo_id=repo_id)


def card_metadata(folder: str | os.PathLike) -> dict:
    """The YAML metadata of ``folder/README.md`` (empty if it has none)."""
    from huggingface_hub.repocard import metadata_load

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
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OfaconvError(f"not valid JSON ({exc})", path=path) from None
    if not isinstance(config, dict):
        raise OfaconvError(f"expected a JSON object, found {type(config).__name__}", path=path)
    return config


def _family(home: Path, report: dict | None) -> registry.Family:
    name = (report or {}).get("model_family")
    return registry.family(name) if isinstance(name, str) else registry.family_of_folder(home)


def _default_title(report: dict | None, root: Path) -> str:
    # The converter writes the card inside a temporary sibling, so the folder name is not the
    # model's name; the variant or the checkpoint's file name is.
    report = report or {}
    source = (report.get("source") or {}).get("file")
    return report.get("variant") or (Path(source).stem if source else None) or root.resolve().name


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


def _source_rows(report: dict | None) -> list[tuple[str, str]]:
    report = report or {}
    source = report.get("source") or {}
    rows = []
    if source.get("file"):
        rows.append(("Checkpoint", f"`{source['file']}`"))
    if source.get("sha256"):
        rows.append(("sha256", f"`{source['sha256']}`"))
    fingerprint = source.get("fingerprint") or {}
    if fingerprint.get("sha256"):  # of the bytes converted (ofaconv.core.digest.state_fingerprint)
        rows.append(("Fingerprint", f"`{fingerprint['sha256']}` ({fingerprint.get('scheme', '?')})"))
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
    versions = report.get("versions") or {}
    tools = [f"ofaconv {report['ofaconv_version']}"] if report.get("ofaconv_version") else []
    tools += [f"{name} {versions[name]}" for name in ("torch", "transformers", "python") if versions.get(name)]
    if tools:
        rows.append(("Written with", ", ".join(tools)))
    return rows


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")

