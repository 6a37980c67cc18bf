"""``conversion_report.json``: reading it, and checking it against the folder it describes.

A converted (or finetuned, or upgraded) model folder carries one report. The report is the proof
that the files in the folder are the ones that passed the parity checks: its manifest lists every
file the conversion wrote with its sha256 and size, and every check with its metric and gate. A
folder matches its report only when the regular files present (hidden entries and bytecode aside)
are exactly the manifest, byte for byte, and nothing in it is a symbolic link: an edited config or
remote code, a dropped-in file or a link out of the folder are all mismatches. It is acceptable for
publishing only when, in addition, the report records at least one check and every check passed.

Schema ``ofaconv/report@1`` (keys this module relies on are marked *)::

    schema*           "ofaconv/report@1"
    kind*             "conversion" | "finetune" | "upgrade"
    ofaconv_version   version that wrote the report
    source            {"file", "size", "layout", "fingerprint", "sha256"} of the checkpoint converted
                      from. "fingerprint" {"scheme", "sha256"} (OFA): the sha256 of exactly the bytes
                      the conversion read (the pickle record, then every converted tensor, those written
                      unchanged through the weight files' entries; scheme "ofaconv/state-sha256@2",
                      "@1" in older reports, "file-sha256" for files without a pickle record; see
                      core/digest.state_fingerprint): binding, and it skips the optimizer state (63%
                      of an OFA-Large trainer file), so it is the default. "sha256": the whole
                      file's, comparable with a published checksum; OFA records it only with
                      `convert --source-sha256` (older reports always have it). `verify --against`
                      recomputes whichever the report holds.
    variant, family   e.g. "ofa-cn-base", "cn" (either may be null)
    flags             checkpoint flags that shape the model (disable_entangle, patch_image_size, ...)
    keymap            {"file", "sha256"} of the key map used
    dtype             dtype of the written weights
    model_family      the registry family that wrote the folder ("ofa", "clip")
    files*            {relative path: {"sha256", "size"}} for every file written but the report
    checks*           [{"name", "passed", "metric", "value", "gate", "detail"[, "gate_reason"]}, ...];
                      "gate_reason" says why a numeric gate is what it is (0.0: same dtype and
                      device on both sides, bit-exact expected)
    passed*           true only if every check passed
    versions          {"torch", "transformers", "python"}
"""

from __future__ import annotations

import json
import os
import stat
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
    """Every regular file a model folder publishes, as sorted POSIX paths relative to ``folder``.

    Hidden entries (``.git``, ``.cache``, temp siblings named ``.*``) and Python bytecode are not
    part of a model folder. Links are never followed (see :func:`folder_links`).
    """
    return _scan(folder)[0]


def folder_links(folder: str | os.PathLike) -> list[str]:
    """The symbolic links (to files or directories) and other non-regular files in ``folder``.

    A link may lead out of the folder (a token file, a home directory): nothing ofaconv publishes
    or verifies is ever read through one.
    """
    return _scan(folder)[1]


def _scan(folder) -> tuple[list[str], list[str]]:
    root = Path(folder)
    files, odd = [], []
    for dirpath, dirnames, filenames in os.walk(root):  # a linked directory is listed, never entered
        base = Path(dirpath)
        entries = [(name, True) for name in dirnames] + [(name, False) for name in filenames]
        dirnames[:] = []
        for name, is_dir in entries:
            if name.startswith(".") or name == "__pycache__" or name.endswith(".pyc"):
                continue
            path = base / name
            mode = os.lstat(path).st_mode
            if is_dir and stat.S_ISDIR(mode):
                dirnames.append(name)
            elif stat.S_ISREG(mode):
                files.append(path.relative_to(root).as_posix())
            else:
                odd.append(path.relative_to(root).as_posix())
    return sorted(files), sorted(odd)


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
    except UnicodeDecodeError:
        raise OfaconvError("not UTF-8 text, so not a report ofaconv wrote; convert again", path=path) from None
    try:
        report = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OfaconvError(f"not valid JSON ({exc})", path=path) from None
    except RecursionError:
        raise OfaconvError("JSON nested too deeply, so not a report ofaconv wrote; convert again", path=path) from None
    if not isinstance(report, dict):
        raise OfaconvError(f"expected a JSON object, found {type(report).__name__}", path=path)
    return report


def covering_report(folder: str | os.PathLike) -> tuple[dict, str]:
    """The report that covers ``folder`` and the prefix of ``folder``'s files in its manifest.

    A folder's own report covers it (prefix ``""``). A subfolder a conversion wrote without a report
    of its own (a CLIP package's ``vision_tower/``) is covered by its parent's, under ``"NAME/"``, so
    it can be verified and published alone against the part of the parent's manifest it holds.
    """
    root = Path(folder)
    if not (root / REPORT_NAME).exists() and (root.parent / REPORT_NAME).is_file():
        parent = load_report(root.parent)
        prefix = f"{root.resolve().name}/"
        files = parent.get("files")
        if isinstance(files, dict) and any(isinstance(k, str) and k.startswith(prefix) for k in files):
            return parent, prefix
    return load_report(root), ""


def manifest_part(report: dict, prefix: str) -> dict:
    """The manifest entries under ``prefix``, relative to it."""
    return {name[len(prefix):]: entry for name, entry in (report.get("files") or {}).items()
            if isinstance(name, str) and name.startswith(prefix)}


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
    reasons = schema_problems(report)
    if reasons:
        return reasons
    return check_problems(report) + manifest_problems(root, report["files"], digests=digests)


def schema_problems(report: dict) -> list[str]:
    """Why ``report`` is not an ofaconv report whose manifest can be trusted; empty when it is."""
    if report.get("schema") != SCHEMA:
        return [f"{REPORT_NAME}: schema is {report.get('schema')!r}, expected {SCHEMA!r}"]
    reasons = []
    if report.get("kind") not in KINDS:
        reasons.append(f"{REPORT_NAME}: kind is {report.get('kind')!r}, expected one of {', '.join(KINDS)}")
    files = report.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("size"), int)
        for e in files.values()
    ):
        reasons.append(f"{REPORT_NAME}: key 'files' must map file names to {{sha256, size}}")
    elif not files:
        reasons.append(f"{REPORT_NAME}: the manifest ('files') is empty")
    return reasons


def check_problems(report: dict) -> list[str]:
    """Why the report's checks do not vouch for the folder (none recorded, one failed); empty if they do."""
    checks = report.get("checks")
    if not isinstance(checks, list) or not all(isinstance(c, dict) for c in checks):
        return [f"{REPORT_NAME}: 'checks' must be a list of objects"]
    if not checks:
        return [f"{REPORT_NAME}: no checks recorded (the conversion was not verified; run it with --verify)"]
    reasons = [f"{REPORT_NAME}: check {describe_check(c)} failed" for c in checks if c.get("passed") is not True]
    if report.get("passed") is not True and not reasons:
        reasons.append(f"{REPORT_NAME}: 'passed' is {report.get('passed')!r} although every check passed")
    return reasons


def manifest_problems(
    folder: str | os.PathLike, files: Mapping[str, dict], *, digests: Mapping[str, tuple[str, int]] | None = None
) -> list[str]:
    """Why the regular files in ``folder`` are not exactly the manifest ``files``, byte for byte.

    ``files`` maps paths relative to ``folder`` to ``{"sha256", "size"}`` (the report's own file
    is never in it). Every link or other non-regular entry is a problem. A listed name that is not
    a plain relative path inside the folder (``..``, absolute, hidden) is never found, so it can
    only be reported missing, never read.
    """
    root = Path(folder)
    present, odd = _scan(root)
    present = set(present) - {REPORT_NAME}
    digests = digests or {}
    reasons = [f"{name}: a symbolic link (or other non-regular file); ofaconv never reads or publishes "
               "through links: replace it with the file it points to or remove it" for name in odd]
    for name in sorted(present - set(files)):
        reasons.append(f"{name}: present but not written by the conversion (not in the manifest of "
                       f"{REPORT_NAME}); remove it, or convert again")
    for name, entry in sorted(files.items()):
        if name not in present:
            reasons.append(f"{name}: listed in {REPORT_NAME} but missing from the folder")
            continue
        sha256, size = digests.get(name) or (None, (root / name).stat().st_size)
        if size != entry.get("size"):
            reasons.append(f"{name}: size {size} differs from {entry.get('size')} in {REPORT_NAME}")
            continue
        sha256 = sha256 or file_sha256(root / name)
        if sha256 != str(entry.get("sha256")).lower():
            reasons.append(f"{name}: sha256 {sha256[:12]}… differs from {str(entry.get('sha256'))[:12]}… in {REPORT_NAME}")
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
