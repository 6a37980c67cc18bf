"""The parity checker: a converted folder against the fairseq state dict it came from.

Levels (each a row of ``conversion_report.json``):
  structure       the folder loads with ``from_pretrained``: no missing/unexpected/mis-shaped keys
  tensors         every stored tensor is bit-identical to its source (or to the source cast)
  encoder_states  encoder output vs the independent fairseq reference (max-abs-diff <= gate)
  decoder_logits  teacher-forced logits vs the reference (max-abs-diff <= gate)
  greedy, beam<n> generated token ids vs the reference's own fairseq-style generator (exact):
                  greedy (also without the model's key/value cache) and the beam search the
                  folder is configured for (its ``num_beams``: 5 for English captions, 8 for
                  OFA-CN, 10 for OFA-Huge; 5 where the folder's default is greedy)

The gate is exact (0.0) wherever both sides compute in the same dtype on the same device, which
is how verification runs (fp32, CPU, the model's eager attention): a faithful port then repeats
fairseq's arithmetic bit for bit, and anything else is a porting mistake, however small (a final
LayerNorm with eps 1e-6 instead of 1e-5 moves the encoder states by ~2e-6). Only where the
arithmetic legitimately differs (reduced-precision outputs, another device's kernels) is there a
tolerance; each row names its gate and why (``gate_reason``).

The reference (``ofaconv.ofa.reference``) reads fairseq key names and never imports the model code.
Probe inputs are deterministic: two images and a batch of two prompts, the second right-padded.
The images are small (:func:`probe_image_size`): every weight of every layer takes part at any
resolution, the exact gate sees any difference, and the checks take seconds instead of minutes.
Each side encodes the probe once; the numeric checks and every generation reuse that encoding.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import threading
from pathlib import Path
from types import SimpleNamespace

import torch

from ofaconv.core.errors import OfaconvError, VerificationError
from .generation_parity import compare_hypotheses, model_hypotheses, reference_hypotheses
from ofaconv.core.writer import CASTS

# The fp32 gate where the two sides' arithmetic legitimately differs (another device's kernels);
# reduced-precision outputs get it scaled by their rounding step relative to fp32's.
FP32_TOLERANCE = 1e-5
PROBE_MAX_LEN_B = 4
# The model's uncached decoding re-runs the whole prefix (and re-projects the encoder output) for
# every hypothesis at every step, the dearest path by far; greedy compares it with the cached one
# (incremental decoding, the shrinking batch), while the beam reorders of the cache are proven by
# the cached beam searches matching the reference.
UNCACHED_MODES = ("greedy",)
# The probe's beam search where the folder's own default is greedy.
PROBE_BEAMS = 5
# An 8 x 8 patch grid runs every image weight and position path; a 480 px image (30 x 30) costs
# ~13x more per encoder pass and, under an exact gate, proves nothing more about the weights.
PROBE_IMAGE_SIZE = 128


def probe_image_size(config) -> int:
    """The probe's image side: :data:`PROBE_IMAGE_SIZE`, or one patch row above the pretraining grid
    where the checkpoint interpolates its image positions (only larger grids interpolate), never
    above the checkpoint's own resolution."""
    size = PROBE_IMAGE_SIZE
    if getattr(config, "interpolate_position", False):
        size = max(size, int(config.orig_patch_image_size) + 16)
    return min(size, int(config.patch_image_size))


def probe_inputs(config, folder: Path | None = None) -> dict:
    """Deterministic inputs: two images (:func:`probe_image_size`), two prompts (one padded)."""
    size = probe_image_size(config)
    gen = torch.Generator().manual_seed(1234)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    first = torch.stack([xx, yy, xx * yy])
    second = torch.stack([torch.sin(3 * xx), torch.cos(2 * yy), (xx + yy) / 2])
    noise = torch.rand(2, 3, size, size, generator=gen) * 0.2 - 0.1
    images = (torch.stack([first, second]) + noise).clamp(-1, 1)

    prompt_ids = None
    if folder is not None and (folder / "tokenizer.json").exists():
        # the folder's fast tokenizer, read by the tokenizers library itself: the same ids as
        # AutoTokenizer's, without importing transformers (the reference starts meanwhile)
        from tokenizers import Tokenizer

        prompt = _saved_prompt(folder)
        if prompt:
            prompt_ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(prompt).ids
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


def _check(name, passed, *, metric=None, value=None, gate=None, detail="", gate_reason=None):
    row = {"name": name, "passed": bool(passed), "detail": detail}
    if metric is not None:
        row.update(metric=metric, value=value, gate=gate)
    if gate_reason is not None:
        row["gate_reason"] = gate_reason
    return row


@contextlib.contextmanager
def imports_in_background():
    """Import the model code (transformers' model machinery, seconds) on a daemon thread for the
    duration of the block: a caller that will verify a folder it is still writing overlaps that
    import with the weights' I/O instead of following it. The block must not touch transformers
    (its lazy module is not safe to import from two threads at once); leaving it waits for the
    import. A failure is left to the real import to report."""

    def load():
        with contextlib.suppress(Exception):
            from transformers.utils import logging  # noqa: F401

            from .modeling import modeling_ofa  # noqa: F401
            from .reference import forward  # noqa: F401

    thread = threading.Thread(target=load, name="ofaconv-import", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()


def load_converted(folder: Path):
    """Load the folder with the package's class, in fp32 with eager attention (fairseq's arithmetic
    operation by operation); loading problems become a failed check."""
    from transformers.utils import logging as hf_logging

    from .modeling import OFAForConditionalGeneration

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = OFAForConditionalGeneration.from_pretrained(
            folder, output_loading_info=True, dtype=torch.float32, attn_implementation="eager"
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


def tensors_check(folder: Path, model, state: dict, plan, dtype: str):
    """Every stored tensor is the source tensor (cast to the folder's dtype), bit for bit.

    Names, dtypes and shapes come from the safetensors headers; the values from ``model``, which
    ``from_pretrained`` just loaded from those files (fp32: an fp16/bf16 file is upcast, exactly), so
    the weights are not read from disk a second time. The structure check has already shown that
    every stored tensor is loaded into exactly one parameter or buffer.
    """
    from safetensors import safe_open

    cast = CASTS[dtype]
    sources = dict(plan.entries)
    loaded = model.state_dict()
    stored, bad = set(), []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                stored.add(key)
                if key not in sources:
                    continue
                header = f.get_slice(key)
                expected = state[sources[key]]
                if expected.is_floating_point():
                    expected = expected.to(cast)  # an fp16 source written at fp32 is upcast, exactly
                tensor = loaded.get(key)
                if (header.get_dtype() != _SAFETENSORS_DTYPES.get(expected.dtype) or list(header.get_shape()) !=
                        list(expected.shape) or tensor is None or not torch.equal(tensor, expected.to(tensor.dtype))):
                    bad.append(key)
    missing = [target for target, _ in plan.entries if target not in stored]
    extra = sorted(stored - set(plan.targets))
    passed = not (bad or missing or extra)
    detail = f"{len(plan.entries)} tensors bit-exact" if passed else (
        f"differ: {bad[:5]}; missing: {missing[:5]}; extra: {extra[:5]}"
    )
    return _check("tensors", passed, metric="mismatched", value=len(bad) + len(missing) + len(extra), gate=0,
                  detail=detail)


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


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


def parity_gate(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, str]:
    """(gate, reason) for the max-abs-diff between the model's output and the reference's."""
    if ours.dtype == theirs.dtype and ours.device == theirs.device:
        dtype = str(ours.dtype).removeprefix("torch.")
        return 0.0, f"same dtype ({dtype}) and device ({ours.device.type}): bit-exact expected"
    coarsest = max(ours.dtype, theirs.dtype, key=lambda d: torch.finfo(d).eps)
    gate = FP32_TOLERANCE * torch.finfo(coarsest).eps / torch.finfo(torch.float32).eps
    return gate, (f"model {str(ours.dtype).removeprefix('torch.')} on {ours.device.type} vs reference "
                  f"{str(theirs.dtype).removeprefix('torch.')} on {theirs.device.type}: {FP32_TOLERANCE:g}, "
                  f"scaled by {str(coarsest).removeprefix('torch.')}'s rounding step relative to float32's")


def _compare(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    value = _max_abs(ours, theirs)
    gate, reason = parity_gate(ours, theirs)
    return _check(name, value <= gate, metric="max_abs_diff", value=value, gate=gate,
                  detail=f"shape {list(ours.shape)}", gate_reason=reason)


def reference_outputs(reference, inputs: dict) -> dict:
    """The reference's fairseq-layout encoding of ``inputs`` and its teacher-forced logits."""
    with torch.no_grad():
        encoded = reference._encode(inputs["input_ids"], inputs["patch_images"], inputs["patch_masks"])
        return {"encoded": encoded, "logits": reference._decode(inputs["decoder_input_ids"], encoded)}


def model_outputs(model, inputs: dict) -> dict:
    """The model's encoding of ``inputs`` (reused by the generation checks) and its teacher-forced
    logits: :func:`reference_outputs`' counterpart."""
    with torch.no_grad():
        encoded = model.get_encoder()(
            input_ids=inputs["input_ids"], patch_images=inputs["patch_images"], patch_masks=inputs["patch_masks"]
        )
        return {"encoded": encoded,
                "logits": model(decoder_input_ids=inputs["decoder_input_ids"], encoder_outputs=encoded).logits}


def numeric_checks(ours: dict, theirs: dict) -> list[dict]:
    """The encoder_states and decoder_logits rows: :func:`model_outputs` against
    :func:`reference_outputs`."""
    return [_compare("encoder_states", ours["encoded"].last_hidden_state,
                     theirs["encoded"]["encoder_out"].transpose(0, 1)),
            _compare("decoder_logits", ours["logits"], theirs["logits"])]


def generation_checks(model, inputs: dict, settings: dict, modes: dict, encoded, expected) -> list[dict]:
    """The ``modes``' token ids (:func:`probe_searches`) vs the reference generator's, and uncached =
    cached for :data:`UNCACHED_MODES`. ``encoded``: the model's encoding of ``inputs``, reused
    instead of encoding again; ``expected``: a future of
    :func:`~ofaconv.ofa.generation_parity.reference_hypotheses`, still running meanwhile."""
    ours = model_hypotheses(model, inputs, settings, modes, check_cache=UNCACHED_MODES, encoder_outputs=encoded)
    report = compare_hypotheses(ours, expected.result())
    rows = []
    for mode in modes:
        entry = report["modes"][mode]
        misses = [m for m in report["mismatches"] if m["mode"] == mode]
        detail = f"{entry['identical']}/{entry['total']} identical top hypotheses"
        if "cache_identical" in entry:
            detail += f", cached = uncached {entry['cache_identical']}/{entry['total']}"
        detail += f", lenpen {settings['lenpen']}, temperature {settings['temperature']}"
        if misses:
            detail += f"; first difference: {misses[0]}"
        rows.append(_check(mode, not misses, metric="identical", value=entry["identical"], gate=entry["total"],
                           detail=detail))
    return rows


def probe_searches(folder: Path) -> tuple[dict, dict[str, int]]:
    """The probe searches, from the folder's ``generation_config.json``: their knobs
    (:data:`PROBE_MAX_LEN_B`, the folder's own length penalty and temperature: OFA-Huge's recipe is
    0.98 / 0.98) and ``{name: beam size}``: greedy, and the beam search the folder asks for
    (:data:`PROBE_BEAMS` where that is greedy or unreadable). Every beam size runs the same search
    code; the folder's own is the one its users run."""
    saved = _read_json(folder / "generation_config.json")
    settings = {"max_len_b": PROBE_MAX_LEN_B, "lenpen": float(saved.get("lenpen") or 1.0),
                "temperature": float(saved.get("fairseq_temperature") or 1.0)}
    beams = saved.get("num_beams")
    beams = beams if type(beams) is int and beams > 1 else PROBE_BEAMS
    return settings, {"greedy": 1, f"beam{beams}": beams}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def default_plan(ckpt):
    """The shipped key map's plan for ``ckpt`` (a loaded ``FairseqCheckpoint``)."""
    from .checkpoint import infer_config
    from .convert import DEFAULT_KEYMAP, keymap_counts
    from ofaconv.core.keymap import KeyMap

    state = ckpt.state_dict
    return KeyMap.load(DEFAULT_KEYMAP).plan(state, keymap_counts(infer_config(state)), source_path=ckpt.path)


def run_checks(folder: Path, ckpt, *, plan=None, dtype: str = "fp32", generation: bool = True) -> list[dict]:
    """All levels for a folder converted from ``ckpt`` (a loaded ``FairseqCheckpoint``).

    The reference needs nothing from the model: its outputs and searches, then the tensors check,
    run on a worker thread while the model loads and runs (torch releases the GIL: two cores, each
    single-threaded, see :func:`_one_thread`).
    """
    from .checkpoint import read_flags

    folder = Path(folder)
    state = ckpt.state_dict
    plan = plan if plan is not None else default_plan(ckpt)
    with _one_thread(), concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ofaconv-reference") as pool:
        flags = read_flags(ckpt)
        # The probe's size follows the source's own image-position settings, not the folder's: a
        # folder that lost interpolate_position must still be probed where the source interpolates.
        probe = {**_read_json(folder / "config.json"),
                 **{k: flags[k] for k in ("interpolate_position", "orig_patch_image_size", "patch_image_size")}}
        inputs = probe_inputs(SimpleNamespace(**probe), folder)
        settings, modes = probe_searches(folder)
        reference = _reference(state, ckpt, flags, dtype)
        theirs = pool.submit(reference_outputs, reference, inputs)
        expected = pool.submit(lambda: reference_hypotheses(reference, inputs, settings, modes,
                                                            encoder_out=theirs.result()["encoded"]))
        try:
            model, row = structure_check(folder)
        except Exception as exc:  # noqa: BLE001 - any loading failure is the finding
            expected.cancel()
            return [_check("structure", False, detail=f"{type(exc).__name__}: {exc}")]
        # queued behind the reference's searches, it evens out the two threads' work
        tensors = pool.submit(tensors_check, folder, model, state, plan, dtype)
        ours = model_outputs(model, inputs)
        rows = numeric_checks(ours, theirs.result())
        if not generation:
            expected.cancel()
        elif all(r["passed"] for r in rows):
            rows += generation_checks(model, inputs, settings, modes, ours["encoded"], expected)
        else:  # token ids cannot agree when the logits do not; do not spend time proving it
            expected.cancel()
            rows += [_check(name, False, detail="not run: an earlier check failed") for name in modes]
        return [row, tensors.result(), *rows]


@contextlib.contextmanager
def _one_thread():
    # The probes are small (a hundred rows per matmul, one token per decoding step): a second
    # intra-op thread saves little, and on a loaded machine its spin-waiting costs 2-3x the work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def verify_folder(folder, against=None, *, ema: bool | None = None) -> tuple[list[dict], bool]:
    """``ofaconv verify``: structure and a probe forward; with ``against`` the full parity check.

    With ``against``, the folder's ``conversion_report.json`` (if it has one) supplies the dtype and
    whether the EMA weights were converted (``ema=None``), gains a ``source`` check (``against`` has
    the fingerprint, and the whole-file sha256 if one was recorded, of the converted file) and is
    rewritten with these checks.
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
        from ofaconv.core.digest import Background, BackgroundSha256

        ckpt = load_checkpoint(against, ema=ema)
        plan = default_plan(ckpt)
        source = (report or {}).get("source") or {}
        # the digests the report recorded, recomputed on worker threads while the checks run
        digests = {}
        if isinstance(source.get("fingerprint"), dict):
            digests["fingerprint"] = Background(source_fingerprint, folder, ckpt, plan, dtype,
                                                source["fingerprint"].get("scheme"), report.get("files") or {})
        if source.get("sha256"):
            digests["sha256"] = BackgroundSha256(against)
        try:
            checks = run_checks(folder, ckpt, plan=plan, dtype=dtype)
        except BaseException:
            for digest in digests.values():
                digest.cancel()
            raise
        if report is not None:
            checks.insert(0, _source_check(source, Path(against), {k: d.result() for k, d in digests.items()}))
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
    return checks, all(c["passed"] for c in checks)


def source_fingerprint(folder: Path, ckpt, plan, dtype: str, scheme, files: dict, *, stop=None) -> dict:
    """The fingerprint of ``ckpt`` in the report's ``scheme``, finished with the manifest's weight
    files (``files``: the report's manifest, which the ``manifest`` check holds the folder to).

    The current scheme names, rather than hashes, the tensors a conversion writes unchanged: those
    are compared with the folder's byte for byte here, and the first that differs is returned as
    ``{"differs": [source key, output name]}``.
    """
    from safetensors import safe_open

    from .checkpoint import release_pages
    from .convert import weight_entries, written_unchanged
    from ofaconv.core.digest import FINGERPRINT_SCHEME, LEGACY_SCHEME, check_stop, state_fingerprint

    state = ckpt.state_dict
    if scheme == LEGACY_SCHEME:
        return state_fingerprint(ckpt.path, state, stop=stop, scheme=LEGACY_SCHEME)
    written = written_unchanged(plan, state, dtype)
    targets = {target: key for key, target in written.items()}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for target in f.keys():
                check_stop(stop, ckpt.path)
                if target not in targets:
                    continue
                key = targets.pop(target)
                ours, theirs = f.get_tensor(target), state[key]
                same = ours.dtype == theirs.dtype and ours.shape == theirs.shape and torch.equal(
                    ours.reshape(-1).view(torch.uint8), theirs.contiguous().reshape(-1).view(torch.uint8))
                if ckpt.mmapped:
                    release_pages(theirs)
                if not same:
                    return {"differs": [key, target]}
    if targets:
        target = sorted(targets)[0]
        return {"differs": [targets[target], target]}
    return state_fingerprint(ckpt.path, state, written=written, files=weight_entries(files), stop=stop,
                             scheme=FINGERPRINT_SCHEME)


def _source_check(source: dict, against: Path, actual: dict) -> dict:
    """``actual``: the digests of ``against`` that the report's ``source`` records (``fingerprint``
    as ``{"scheme", "sha256"}``, ``sha256`` of the whole file)."""
    if not actual:
        return _check("source", True, detail=f"report records no source digest; {against.name} not compared")
    differs = (actual.get("fingerprint") or {}).get("differs")
    if differs:
        return _check("source", False, detail=f"{against.name}'s {differs[0]} is not the folder's {differs[1]}, "
                                               "byte for byte")
    for name, value in actual.items():
        recorded = source[name]
        if value != recorded:
            shown = (value["sha256"], recorded.get("sha256", "?")) if name == "fingerprint" else (value, recorded)
            return _check("source", False, detail=f"{against.name} {name} {str(shown[0])[:12]} is not the "
                                                   f"converted file's {str(shown[1])[:12]}")
    return _check("source", True, detail=f"{against.name} is the converted file ({' and '.join(actual)} match)")
