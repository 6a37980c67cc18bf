"""The parity checker: a converted folder against the fairseq state dict it came from.

Levels (each a row of ``conversion_report.json``):
  structure       the folder loads with ``from_pretrained``: no missing/unexpected/mis-shaped keys
  tensors         every stored tensor is bit-identical to its source (or to the source cast)
  encoder_states  encoder output vs the independent fairseq reference (fp32 max-abs-diff <= 1e-5)
  decoder_logits  teacher-forced logits vs the reference (fp32 max-abs-diff <= 1e-5)
  greedy, beam5, beam8
                  generated token ids vs the reference's own fairseq-style generator (exact)

The reference (``ofaconv.ofa.reference``) reads fairseq key names and never imports the model code.
Probe inputs are deterministic: two images and a batch of two prompts, the second right-padded.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from ofaconv.core.errors import OfaconvError, VerificationError
from .generation_parity import MODES, compare_generation
from ofaconv.core.writer import CASTS

LOGIT_GATE = 1e-5
PROBE_MAX_LEN_B = 8



def probe_inputs(config, folder: Path | None = None) -> dict:
    """Deterministic inputs: two images of the checkpoint's resolution, two prompts (one padded)."""
    size = int(config.patch_image_size)
    gen = torch.Generator().manual_seed(1234)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    first = torch.stack([xx, yy, xx * yy])
    second = torch.stack([torch.sin(3 * xx), torch.cos(2 * yy), (xx + yy) / 2])
    noise = torch.rand(2, 3, size, size, generator=gen) * 0.2 - 0.1
    images = (torch.stack([first, second]) + noise).clamp(-1, 1)

    prompt_ids = None
    if folder is not None and (folder / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        prompt = _saved_prompt(folder)
        if prompt:
            prompt_ids = tokenizer(prompt)["input_ids"]
    if prompt_ids is None:
        high = min(int(config.vocab_size), 1000)
        prompt_ids = [0] + torch.randint(4, high, (10,), generator=gen).tolist() + [2]
    short = prompt_ids[: max(3, len(prompt_ids) // 2)] + [2]
    pad = config.pad_token_id
    input_ids = torch.tensor([prompt_ids, short + [pad] * (len(prompt_ids) - len(short))])
    high = min(int(config.vocab_size), 1000)
    decoder_input_ids = torch.cat(
        [torch.zeros(2, 1, dtype=torch.long), torch.randint(4, high, (2, 6), generator=gen)], dim=1
    )
    return {
        "input_ids": input_ids,
        "patch_images": images,
        "patch_masks": torch.tensor([True, True]),
        "decoder_input_ids": decoder_input_ids,
    }


def _saved_prompt(folder: Path) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = folder / name
        if path.exists():
            prompt = json.loads(path.read_text()).get("prompt")
            if prompt:
                return prompt
    return None


def _check(name, passed, *, metric=None, value=None, gate=None, detail=""):
    row = {"name": name, "passed": bool(passed), "detail": detail}
    if metric is not None:
        row.update(metric=metric, value=value, gate=gate)
    return row


def load_converted(folder: Path):
    """Load the folder with the package's class; loading problems become a failed check."""
    from transformers.utils import logging as hf_logging

    from .modeling import OFAForConditionalGeneration

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = OFAForConditionalGeneration.from_pretrained(
            folder, output_loading_info=True, dtype=torch.float32
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval(), info


def structure_check(folder: Path):
    model, info = load_converted(folder)
    problems = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    detail = "; ".join(f"{k}: {', '.join(map(str, v[:5]))}" for k, v in problems.items()) or "loads cleanly"
    return model, _check("structure", not problems, detail=detail)


def tensors_check(folder: Path, state: dict, plan, dtype: str):
    from safetensors import safe_open

    cast = CASTS[dtype]
    stored = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                stored[key] = (path, key)
    bad, missing = [], []
    for target, source in plan.entries:
        if target not in stored:
            missing.append(target)
            continue
        path, key = stored[target]
        with safe_open(str(path), framework="pt") as f:
            tensor = f.get_tensor(key)
        expected = state[source]
        if expected.is_floating_point():
            expected = expected.to(cast)  # an fp16 source written at fp32 is upcast, exactly
        if tensor.dtype != expected.dtype or tensor.shape != expected.shape or not torch.equal(tensor, expected):
            bad.append(target)
    extra = sorted(set(stored) - set(plan.targets))
    passed = not (bad or missing or extra)
    detail = f"{len(plan.entries)} tensors bit-exact" if passed else (
        f"differ: {bad[:5]}; missing: {missing[:5]}; extra: {extra[:5]}"
    )
    return _check("tensors", passed, metric="mismatched", value=len(bad) + len(missing) + len(extra), gate=0,
                  detail=detail)


def _reference(state: dict, ckpt, flags: dict, dtype: str):
    from .reference.forward import FairseqReference

    # The folder holds cast weights: the reference sees the same rounding, in fp32 (an fp16 source
    # is computed in fp32 from its exact values, as the converted fp32 folder is).
    cast = CASTS[dtype]
    state = {k: (v.to(cast).float() if v.is_floating_point() else v) for k, v in state.items()}
    args = {**ckpt.task_args, **ckpt.model_args, **flags}
    return FairseqReference(state, args)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    diff = (a.float() - b.float()).abs()
    return float(diff.max()) if diff.numel() else 0.0


def numeric_checks(model, reference, inputs: dict) -> list[dict]:
    rows = []
    with torch.no_grad():
        enc = model.get_encoder()(
            input_ids=inputs["input_ids"], patch_images=inputs["patch_images"], patch_masks=inputs["patch_masks"]
        )
        ref_enc = reference.encode(inputs["input_ids"], inputs["patch_images"], inputs["patch_masks"])
        value = _max_abs(enc.last_hidden_state, ref_enc["encoder_out"])
        rows.append(_check("encoder_states", value <= LOGIT_GATE, metric="max_abs_diff", value=value,
                           gate=LOGIT_GATE, detail=f"shape {list(enc.last_hidden_state.shape)}"))
        logits = model(**inputs).logits
        ref_logits = reference.decode(inputs["decoder_input_ids"], ref_enc)
        value = _max_abs(logits, ref_logits)
        rows.append(_check("decoder_logits", value <= LOGIT_GATE, metric="max_abs_diff", value=value,
                           gate=LOGIT_GATE, detail=f"shape {list(logits.shape)}"))
    return rows


def generation_checks(model, reference, inputs: dict) -> list[dict]:
    """Greedy, beam 5 and beam 8 token ids vs the reference generator (cached and uncached), with
    the folder's own length penalty and temperature (OFA-Huge's recipe is 0.98 / 0.98)."""
    saved = model.generation_config
    settings = {
        "max_len_b": PROBE_MAX_LEN_B,
        "lenpen": float(getattr(saved, "lenpen", 1.0) or 1.0),
        "temperature": float(getattr(saved, "fairseq_temperature", 1.0) or 1.0),
    }
    report = compare_generation(model, reference, inputs, settings)
    rows = []
    for mode in MODES:
        entry = report["modes"][mode]
        misses = [m for m in report["mismatches"] if m["mode"] == mode]
        detail = (f"{entry['identical']}/{entry['total']} identical top hypotheses, cached = uncached "
                  f"{entry.get('cache_identical', entry['total'])}/{entry['total']}, lenpen {settings['lenpen']}, "
                  f"temperature {settings['temperature']}")
        if misses:
            detail += f"; first difference: {misses[0]}"
        rows.append(_check(mode, not misses, metric="identical", value=entry["identical"], gate=entry["total"],
                           detail=detail))
    return rows


def run_checks(folder: Path, ckpt, *, plan=None, dtype: str = "fp32", generation: bool = True) -> list[dict]:
    """All levels for a folder converted from ``ckpt`` (a loaded ``FairseqCheckpoint``)."""
    from .checkpoint import infer_config, read_flags
    from .convert import DEFAULT_KEYMAP, keymap_counts
    from ofaconv.core.keymap import KeyMap

    folder = Path(folder)
    state = ckpt.state_dict
    flags = read_flags(ckpt)
    if plan is None:
        plan = KeyMap.load(DEFAULT_KEYMAP).plan(state, keymap_counts(infer_config(state)), source_path=ckpt.path)
    checks = []
    try:
        model, row = structure_check(folder)
    except Exception as exc:  # noqa: BLE001 - any loading failure is the finding
        return [_check("structure", False, detail=f"{type(exc).__name__}: {exc}")]
    checks.append(row)
    checks.append(tensors_check(folder, state, plan, dtype))
    reference = _reference(state, ckpt, flags, dtype)
    inputs = probe_inputs(model.config, folder)
    checks += numeric_checks(model, reference, inputs)
    if generation:
        if all(c["passed"] for c in checks):
            checks += generation_checks(model, reference, inputs)
        else:  # token ids cannot agree when the logits do not; do not spend minutes proving it
            checks += [_check(name, False, detail="not run: an earlier check failed") for name in MODES]
    return checks


def verify_folder(folder, against=None, *, ema: bool | None = None) -> tuple[list[dict], bool]:
    """``ofaconv verify``: structure and a probe forward; with ``against`` the full parity check.

    With ``against``, the folder's ``conversion_report.json`` (if it has one) supplies the dtype and
    whether the EMA weights were converted (``ema=None``), gains a ``source`` check (the checkpoint
    is the file the report names, by sha256) and is rewritten with these checks.
    """
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise OfaconvError("not a model folder (no config.json)", path=folder)
    report_path = folder / "conversion_report.json"
    report = None
    if report_path.exists():
        try:
            report = json.loads(report_path.read_text())
        except (OSError, ValueError) as exc:
            raise VerificationError(f"unreadable report: {exc}", path=report_path) from None
    dtype = "fp32"
    if report is not None:
        dtype = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(report.get("dtype", "float32"), "fp32")
    if ema is None:
        ema = bool(report is not None and (report.get("source") or {}).get("ema"))
    if against is not None:
        from .checkpoint import load_checkpoint
        from ofaconv.core.digest import BackgroundSha256

        # hashed on a worker thread while the checks run (hashlib releases the GIL)
        source_hash = BackgroundSha256(against) if report is not None else None
        try:
            checks = run_checks(folder, load_checkpoint(against, ema=ema), dtype=dtype)
        except BaseException:
            if source_hash is not None:
                source_hash.cancel()
            raise
        if report is not None:
            checks.insert(0, _source_check(report, Path(against), source_hash.result()))
            report["checks"] = checks
            report["passed"] = all(c["passed"] for c in checks)
            partial = report_path.with_name(f".{report_path.name}.partial")
            partial.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
            partial.replace(report_path)
    else:
        checks = []
        try:
            model, row = structure_check(folder)
        except Exception as exc:  # noqa: BLE001
            raise VerificationError(f"does not load: {type(exc).__name__}: {exc}", path=folder) from None
        checks.append(row)
        inputs = probe_inputs(model.config, folder)
        with torch.no_grad():
            logits = model(**inputs).logits
        finite = bool(torch.isfinite(logits).all())
        checks.append(_check("probe_forward", finite, detail=f"logits {list(logits.shape)} finite={finite}"))
        if report is not None:
            from ofaconv.core.report import validate_report

            reasons = validate_report(folder)
            checks.append(_check("report", not reasons, detail="; ".join(reasons) or "hashes match the report"))
    return checks, all(c["passed"] for c in checks)


def _source_check(report: dict, against: Path, actual: str) -> dict:
    recorded = (report.get("source") or {}).get("sha256")
    if recorded is None:
        return _check("source", True, detail=f"report names no source hash; {against.name} sha256 {actual[:12]}")
    same = actual == recorded
    detail = f"{against.name} is the converted file" if same else (
        f"{against.name} sha256 {actual[:12]} is not the converted file's {recorded[:12]}")
    return _check("source", same, detail=detail)
