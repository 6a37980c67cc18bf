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
import sys
from pathlib import Path

import torch

from ofaconv import __version__
from ofaconv.core.errors import OfaconvError
from ofaconv.core.report import SCHEMA, load_report
from ofaconv.core.writer import OutputFolder
from ..convert import copy_remote_code
from .base import BaseModel, carried_files, save_model

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


def _set_prompt(folder: OutputFolder, prompt: str) -> None:
    path = folder.path / "processor_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("prompt") != prompt:
        config["prompt"] = prompt
        folder.write_text(path.name, json.dumps(config, indent=2, ensure_ascii=False) + "\n")


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
    """Write the folder (through ``OutputFolder``: it replaces only an earlier ofaconv output, never
    the base model's folder) and return its report."""
    with OutputFolder(out_dir, force=True, protect=[base.folder]) as folder:
        for name in carried_files(base.folder):
            folder.write_bytes(name, (base.folder / name).read_bytes())
        copy_remote_code(folder)
        save_model(model, folder)
        _set_prompt(folder, prompt)
        folder.write_text("training_log.jsonl", "".join(json.dumps(e, sort_keys=True) + "\n" for e in log_history))

        checks = [_reload_check(model, folder.path, probe), _frozen_check(model, base.folder), _finite_check(model)]
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
            "model_family": "ofa",
            "ofaconv_version": __version__,
            "source": source,
            "variant": base_report.get("variant"),
            "family": base.family,
            "flags": base_report.get("flags") or {},
            "dtype": "float32",
            "training": training,
            "checks": checks,
            "passed": all(c["passed"] for c in checks),
            "versions": _versions(),
        }
        return folder.commit(report, card={"license": license})
