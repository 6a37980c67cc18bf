"""The finished run as a model folder in the converted format, ready for ``caption`` and ``push``.

The folder holds the trained weights and config, the base folder's tokenizer / processor /
generation settings / modeling code (the prompt updated when the recipe changed it), a model
card, ``training_log.jsonl`` (loss and learning rate per logging step), and
``conversion_report.json`` with ``"kind": "finetune"``: the training run (recipe, steps, data
issues, cache, evaluation) and checks that the folder is what was trained:

- ``reload-logits``: the written folder, reloaded, gives the trained model's logits exactly;
- ``frozen-unchanged``: every frozen weight and every BatchNorm statistic equals the base model's;
- ``finite-weights``: no NaN or Inf anywhere.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ofaconv import __version__
from ofaconv.core.errors import OfaconvError
from ofaconv.core.report import REPORT_NAME, SCHEMA, load_report, weight_file_entries
from .base import BaseModel, carried_files, copy_modeling_code

__all__ = ["write_finetuned"]


def _versions() -> dict:
    import transformers

    return {
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "python": ".".join(map(str, sys.version_info[:3])),
    }


def _base_tensors(folder: Path) -> dict:
    from safetensors import safe_open

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                tensors[key] = (path, key)
    return tensors


@torch.no_grad()
def _frozen_check(model: torch.nn.Module, base_folder: Path) -> dict:
    from safetensors import safe_open

    located = _base_tensors(base_folder)
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    buffers = {name for name, _ in model.named_buffers()}
    state = model.state_dict()
    worst, compared, missing = 0.0, 0, []
    handles = {}
    for name in sorted((frozen | buffers) & set(state)):
        if name not in located:
            if name in buffers and name not in frozen:
                continue  # derived buffers are not stored
            missing.append(name)
            continue
        path, key = located[name]
        fh = handles.get(path) or handles.setdefault(path, safe_open(str(path), framework="pt"))
        reference = fh.get_tensor(key)
        current = state[name].detach().cpu()
        if reference.shape != current.shape:
            worst = float("inf")
        elif current.numel():
            worst = max(worst, float((current.double() - reference.double()).abs().max()))
        compared += 1
    missing = [m for m in missing if not any(m.startswith(t) for t in ("decoder.embed_tokens", "decoder.output_projection"))]
    return {
        "name": "frozen-unchanged",
        "passed": worst == 0.0 and not missing,
        "metric": "max_abs_diff",
        "value": worst,
        "gate": 0.0,
        "detail": f"{compared} frozen tensors and BatchNorm statistics compared with the base model"
        + (f"; not found in the base weights: {', '.join(missing[:3])}" if missing else ""),
    }


@torch.no_grad()
def _reload_check(model: torch.nn.Module, folder: Path, probe: dict) -> dict:
    from ofaconv.ofa.modeling import OFAForConditionalGeneration

    device = next(model.parameters()).device
    reloaded = OFAForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    was_training = model.training
    model.eval()
    inputs = {k: v.to(device) for k, v in probe.items()}
    try:
        expected = model(**inputs, use_cache=False).logits.float()
        got = reloaded(**inputs, use_cache=False).logits.float()
    finally:
        model.train(was_training)
    diff = float((expected - got).abs().max())
    return {
        "name": "reload-logits",
        "passed": diff == 0.0,
        "metric": "max_abs_diff",
        "value": diff,
        "gate": 0.0,
        "detail": "teacher-forced logits of the reloaded folder vs the trained model (fp32)",
    }


def _finite_check(model: torch.nn.Module) -> dict:
    bad = [name for name, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    return {
        "name": "finite-weights",
        "passed": not bad,
        "metric": "non_finite_tensors",
        "value": len(bad),
        "gate": 0,
        "detail": ("non-finite: " + ", ".join(bad[:3])) if bad else "every weight and buffer is finite",
    }


def _set_prompt(folder: Path, prompt: str) -> None:
    path = folder / "processor_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("prompt") != prompt:
        config["prompt"] = prompt
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _replace_folder(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / REPORT_NAME).is_file()):
            raise OfaconvError("output_dir exists and is not a model folder ofaconv wrote; refusing to replace it",
                               path=out_dir)
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
        out_dir.rename(trash / out_dir.name)
        tmp.rename(out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out_dir)


def write_finetuned(
    model: torch.nn.Module,
    base: BaseModel,
    out_dir: str | Path,
    *,
    prompt: str,
    probe: dict,
    training: dict,
    log_history: list,
    license: str = "apache-2.0",
) -> dict:
    """Write the folder (temp sibling, then rename) and return its report."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OfaconvError("output_dir exists and is not a folder", path=out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        for name in carried_files(base.folder):
            shutil.copy2(base.folder / name, tmp / name)
        copy_modeling_code(tmp)
        model.save_pretrained(tmp)
        _set_prompt(tmp, prompt)
        with open(tmp / "training_log.jsonl", "w", encoding="utf-8") as fh:
            for entry in log_history:
                fh.write(json.dumps(entry, sort_keys=True) + "\n")

        checks = [_reload_check(model, tmp, probe), _frozen_check(model, base.folder), _finite_check(model)]
        base_report = base.report or {}
        try:
            source_report = load_report(base.folder)
        except OfaconvError:
            source_report = {}
        source = {"file": base.folder.name}
        base_source = source_report.get("source") or {}
        if base_source.get("file"):
            source["converted_from"] = base_source.get("file")
        if source_report.get("kind") == "finetune":
            source["finetuned_from"] = (source_report.get("source") or {}).get("file")
        report = {
            "schema": SCHEMA,
            "kind": "finetune",
            "ofaconv_version": __version__,
            "source": source,
            "variant": base_report.get("variant"),
            "family": base.family,
            "flags": base_report.get("flags") or {},
            "dtype": "float32",
            "files": weight_file_entries(tmp),
            "training": training,
            "checks": checks,
            "passed": all(c["passed"] for c in checks),
            "versions": _versions(),
        }
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
        from ofaconv.hub.card import write_model_card

        write_model_card(tmp, license=license)
        _publishable_modes(tmp)
        _replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The card names the folder it describes; written again (atomically) under its final name.
    write_model_card(out_dir, license=license)
    _publishable_modes(out_dir)
    return report


def _publishable_modes(folder: Path) -> None:
    """mkdtemp/mkstemp create owner-only entries; a model folder is as readable as the umask allows."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)
