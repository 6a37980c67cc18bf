"""``conversion_report.json``: reading it, and checking it against the folder it describes.

A converted (or finetuned, or upgraded) model folder carries one report. The report is the proof
that the weights in the folder are the ones that passed the parity checks: it lists every weight
file (and shard index) with its sha256 and size, and every check with its metric and gate. A
folder is acceptable for publishing only when the report exists, follows the schema, records at
least one check, every check passed, and the listed files are exactly the weight files present,
byte for byte.

Schema ``ofaconv/report@1`` (keys this module relies on are marked *)::

    schema*           "ofaconv/report@1"
    kind*             "conversion" | "finetune" | "upgrade"
    ofaconv_version   version that wrote the report
    source            {"file", "sha256", "size", "layout"} of the checkpoint converted from
    variant, family   e.g. "ofa-cn-base", "cn" (either may be null)
    flags             checkpoint flags that shape the model (disable_entangle, patch_image_size, ...)
    keymap            {"file", "sha256"} of the key map used
    dtype             dtype of the written weights
    files*            {relative path: {"sha256", "size"}} for every weight file and index
    checks*           [{"name", "passed", "metric", "value", "gate", "detail"}, ...]
    passed*           true only if every check passed
    versions          {"torch", "transformers", "python"}
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from .digest import file_sha256
from .errors import OfaconvError

REPORT_NAME = "conversion_report.json"
SCHEMA = "ofaconv/report@1"
KINDS = ("conversion", "finetune", "upgrade")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")


def file_entry(path: str | os.PathLike) -> dict:
    """The report's entry for one file: ``{"sha256": ..., "size": ...}``."""
    return {"sha256": file_sha256(path), "size": os.path.getsize(path)}


def is_weight_file(name: str) -> bool:
    """Whether a file holds weights (or indexes shards of them) and so must be in the report."""
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(INDEX_SUFFIXES)


def folder_files(folder: str | os.PathLike) -> list[str]:
    """Every file a model folder publishes, as sorted POSIX paths relative to ``folder``.

    Hidden entries (``.git``, ``.cache``, temp siblings named ``.*``) and Python bytecode are not
    part of a model folder.
    """
    root = Path(folder)
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for name in filenames:
            if name.startswith(".") or name.endswith(".pyc"):
                continue
            found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(found)


def weight_files(folder: str | os.PathLike) -> list[str]:
    """The weight files (and shard indexes) in ``folder``, relative and sorted."""
    return [name for name in folder_files(folder) if is_weight_file(name.rsplit("/", 1)[-1])]


def weight_file_entries(folder: str | os.PathLike) -> dict[str, dict]:
    """The report's ``files`` section for ``folder``: every weight file with sha256 and size."""
    root = Path(folder)
    return {name: file_entry(root / name) for name in weight_files(root)}


def load_report(folder: str | os.PathLike) -> dict:
    """Read ``conversion_report.json`` from ``folder``; a one-line error if absent or not JSON."""
    path = Path(folder) / REPORT_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OfaconvError("missing: the folder has no conversion report", path=path) from None
    try:
        report = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OfaconvError(f"not valid JSON ({exc})", path=path) from None
    if not isinstance(report, dict):
        raise OfaconvError(f"expected a JSON object, found {type(report).__name__}", path=path)
    return report


def validate_report(
    folder: str | os.PathLike, *, digests: Mapping[str, tuple[str, int]] | None = None
) -> list[str]:
    """Reasons why ``folder`` is not backed by a passing report; empty when it is.

    ``digests`` maps relative paths to ``(sha256 hex, size)`` already computed by the caller
    (``push`` hashes every file once for the upload); files not in it are hashed here.
    """
    root = Path(folder)
    try:
        report = load_report(root)
    except OfaconvError as exc:
        return [str(exc)]

    reasons = []
    if report.get("schema") != SCHEMA:
        reasons.append(f"{REPORT_NAME}: schema is {report.get('schema')!r}, expected {SCHEMA!r}")
        return reasons
    if report.get("kind") not in KINDS:
        reasons.append(f"{REPORT_NAME}: kind is {report.get('kind')!r}, expected one of {', '.join(KINDS)}")

    reasons += _check_results(report)
    reasons += _check_files(root, report.get("files"), digests or {})
    return reasons


def _check_results(report: dict) -> list[str]:
    checks = report.get("checks")
    if not isinstance(checks, list) or not all(isinstance(c, dict) for c in checks):
        return [f"{REPORT_NAME}: 'checks' must be a list of objects"]
    if not checks:
        return [f"{REPORT_NAME}: no checks recorded (the conversion was not verified; run it with --verify)"]
    reasons = [f"{REPORT_NAME}: check {describe_check(c)} failed" for c in checks if c.get("passed") is not True]
    if report.get("passed") is not True and not reasons:
        reasons.append(f"{REPORT_NAME}: 'passed' is {report.get('passed')!r} although every check passed")
    return reasons


def _check_files(root: Path, listed, digests: Mapping[str, tuple[str, int]]) -> list[str]:
    if not isinstance(listed, dict):
        return [f"{REPORT_NAME}: 'files' must map file names to {{sha256, size}}"]
    reasons = []
    present = set(weight_files(root))
    if not listed and not present:
        reasons.append(f"{REPORT_NAME}: lists no weight files and the folder has none")
    for name in sorted(present - set(listed)):
        reasons.append(f"{name}: weight file present but not listed in {REPORT_NAME}")
    for name, entry in sorted(listed.items()):
        path = root / name
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            reasons.append(f"{REPORT_NAME}: key 'files.{name}': expected {{sha256, size}}")
        elif not path.is_file():
            reasons.append(f"{name}: listed in {REPORT_NAME} but missing from the folder")
        else:
            sha256, size = digests.get(name) or (None, path.stat().st_size)
            if size != entry.get("size"):
                reasons.append(f"{name}: size {size} differs from {entry.get('size')} in {REPORT_NAME}")
                continue
            sha256 = sha256 or file_sha256(path)
            if sha256 != entry["sha256"].lower():
                reasons.append(
                    f"{name}: sha256 {sha256[:12]}… differs from {entry['sha256'][:12]}… in {REPORT_NAME}"
                )
    return reasons


def describe_check(check: dict) -> str:
    """``'name' (metric value vs gate gate)`` for messages and the model card."""
    text = repr(check.get("name", "?"))
    metric, value, gate = check.get("metric"), check.get("value"), check.get("gate")
    if value is not None:
        text += f" ({metric or 'value'} {format_number(value)}"
        text += f", gate {format_number(gate)})" if gate is not None else ")"
    return text


def format_number(value) -> str:
    """Compact rendering of a metric: exact zeros stay ``0``, floats get 3 significant digits."""
    if isinstance(value, (bool, int)) or not isinstance(value, float):
        return str(value)
    if value == 0:
        return "0"
    return f"{value:.3g}"


def human_size(size) -> str:
    """``104 B``, ``117.7 MiB``: sizes in messages, the dry run and the card."""
    if not isinstance(size, int):
        return "?"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"
