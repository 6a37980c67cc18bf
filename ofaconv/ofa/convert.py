"""``ofaconv convert CKPT OUT/``: a fairseq OFA checkpoint becomes a complete Hugging Face folder.

Invariants:
- the source is opened memory-mapped and restricted (``ofaconv.ofa.checkpoint``); the optimizer state
  and EMA copy are never paged in;
- every source key is accounted for by the key map before any tensor is read;
- tensors are streamed one at a time into safetensors shards, cast per tensor;
- the folder is written through ``ofaconv.core.writer.OutputFolder``: assembled in a temporary
  sibling, every file in the report's manifest, renamed into place only when complete, so a failure
  leaves nothing behind (a failed *verification* keeps the folder, with the report saying which
  check failed, and exits non-zero); ``--force`` replaces only an earlier ofaconv output and never
  the checkpoint or a folder holding it.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import contextlib
import copy
import functools
import importlib.metadata
import sys
import tempfile
import threading
import types
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ofaconv import __version__
from ofaconv.core.digest import BackgroundFingerprint, BackgroundSha256
from ofaconv.core.errors import CheckpointError, OfaconvError
from ofaconv.core.keymap import KeyMap
from ofaconv.core.report import SCHEMA, is_weight_file
from ofaconv.core.writer import OutputFolder, check_output
from .modeling.settings_ofa import AUTO_MAP, CUSTOM_PIPELINES, generation_fields
from .tokenization import config_file_text, processing_files, read_vocabulary
from .variants import family_info, get_variant

# torch, transformers and the checkpoint reader are imported where used: the CLI starts hashing
# the source (the longest job of a conversion) before paying for those imports.
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # --dtype -> torch dtype name
DEFAULT_KEYMAP = "ofa/fairseq"
# Files copied next to the weights so the folder works with trust_remote_code and no ofaconv.
REMOTE_CODE_FILES = [
    "configuration_ofa.py",
    "settings_ofa.py",
    "buckets_ofa.py",
    "modeling_ofa.py",
    "generation_ofa.py",
    "image_processing_ofa.py",
    "processing_ofa.py",
    "tokenization_ofa.py",
    "pipeline_ofa.py",
]
# fairseq flags the model does not implement: refuse rather than convert something that differs.
# Every released checkpoint has the other value; the reference implements them, the model does not.
UNSUPPORTED_FLAGS = {
    "scale_resids": True,
    "encoder_prompt": True,
    "decoder_prompt": True,
    "cross_self_attention": True,
    "entangle_position_embedding": True,  # the encoder would add absolute positions to its inputs
    "sync_bn": True,  # the ResNet's BatchNorm eps would be 1e-3
    "freeze_resnet": True,  # FrozenBatchNorm2d: no num_batches_tracked
}
SUPPORTED_ACTIVATION = "gelu"


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    s = str(text).strip().upper()
    try:
        for unit in sorted(units, key=len, reverse=True):
            if s.endswith(unit):
                size = int(float(s[: -len(unit)]) * units[unit])
                break
        else:
            size = int(s)
    except ValueError:
        size = 0
    if size <= 0:
        raise OfaconvError(f"bad size {text!r} (expected e.g. 2GB, 500MB or a byte count)")
    return size


def check_supported(shape: dict, flags: dict, path=None) -> None:
    """Refuse what the transformers model does not implement (no transformers import: runs first)."""
    for flag, bad in UNSUPPORTED_FLAGS.items():
        if flags.get(flag) == bad or shape.get(flag) == bad:
            raise CheckpointError(f"flag {flag}={bad} is not supported by the transformers model", path=path)
    activation = flags.get("activation_fn") or SUPPORTED_ACTIVATION
    if activation != SUPPORTED_ACTIVATION:
        raise CheckpointError(f"flag activation_fn={activation} is not supported by the transformers model "
                              f"(only {SUPPORTED_ACTIVATION})", path=path)
    if shape["max_source_positions"] != shape["max_target_positions"]:
        raise CheckpointError("different source and target position table sizes are not supported", path=path)
    # Structural flags come from which keys exist; the rest from the checkpoint's arguments.
    if len({shape[k] for k in ("scale_attn", "scale_fc", "scale_heads")}) != 1:
        raise CheckpointError("mixed NormFormer flags (scale_attn/scale_fc/scale_heads) are not supported", path=path)
    if not shape["scale_attn"]:
        raise CheckpointError("checkpoints without NormFormer layers (scale_attn/scale_fc/scale_heads all False) "
                              "are not supported: every released OFA has them", path=path)


# What every converted config.json names besides the model's fields.
_CONFIG_CLASS_FIELDS = {
    "architectures": ["OFAForConditionalGeneration"],
    "auto_map": AUTO_MAP,
    "custom_pipelines": CUSTOM_PIPELINES,
}


def config_arguments(shape: dict, flags: dict) -> dict:
    """The ``OFAConfig`` arguments of a checkpoint: inferred shapes plus its non-shape flags
    (``check_supported`` first); every other field keeps the class default."""
    return dict(
        vocab_size=shape["vocab_size"],
        max_position_embeddings=shape["max_source_positions"],
        d_model=shape["d_model"],
        encoder_layers=shape["encoder_layers"],
        decoder_layers=shape["decoder_layers"],
        encoder_ffn_dim=shape["encoder_ffn_dim"],
        decoder_ffn_dim=shape["decoder_ffn_dim"],
        encoder_attention_heads=shape["encoder_attention_heads"],
        decoder_attention_heads=shape["decoder_attention_heads"],
        resnet_type=shape.get("resnet_type") or "custom",
        resnet_layers=list(shape["resnet_layers"]),
        token_bucket_size=shape["token_bucket_size"],
        image_bucket_size=shape["image_bucket_size"],
        normformer=shape["scale_attn"],
        attn_scale_factor=float(flags["attn_scale_factor"]),
        scale_embedding=not flags["no_scale_embedding"],
        encoder_normalize_before=shape["encoder_normalize_before"],
        decoder_normalize_before=shape["decoder_normalize_before"],
        layernorm_embedding=shape["layernorm_embedding"],
        patch_layernorm_embedding=shape["patch_layernorm_embedding"],
        code_layernorm_embedding=shape["code_layernorm_embedding"],
        add_type_embedding=shape["add_type_embedding"],
        entangle_position_embedding=bool(flags["entangle_position_embedding"]),
        disable_entangle=bool(flags["disable_entangle"]),
        interpolate_position=bool(flags["interpolate_position"]),
        orig_patch_image_size=int(flags["orig_patch_image_size"]),
        patch_image_size=int(flags["patch_image_size"]),
        code_image_size=int(flags.get("code_image_size", 128)),
    )


def build_config(shape: dict, flags: dict):
    """The ``OFAConfig`` of a checkpoint (imports transformers; ``config_json`` writes the same file
    without it)."""
    from .modeling import OFAConfig

    return OFAConfig(**config_arguments(shape, flags), **copy.deepcopy(_CONFIG_CLASS_FIELDS))


@functools.lru_cache(maxsize=None)
def _config_defaults() -> dict:
    # OFAConfig's keyword defaults, read from the source of configuration_ofa.py (the file the
    # folder ships): importing it would import transformers, most of a second of a conversion.
    source = resources.files("ofaconv.ofa.modeling").joinpath("configuration_ofa.py").read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == "OFAConfig":
            init = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
            names = [a.arg for a in init.args.args[-len(init.args.defaults):]]
            return {name: ast.literal_eval(value) for name, value in zip(names, init.args.defaults)}
    raise RuntimeError("configuration_ofa.py defines no OFAConfig")


@functools.lru_cache(maxsize=None)
def transformers_version() -> str:
    """The installed transformers' version, without importing it."""
    return importlib.metadata.version("transformers")


def config_json(shape: dict, flags: dict, dtype: str = "float32", fields: dict | None = None) -> dict:
    """``config.json`` of a checkpoint exactly as ``build_config(...).save_pretrained`` writes it
    (tests/test_convert.py holds the two equal for every variant), without importing transformers.
    ``fields``: extra keys (``ofaconv upgrade``'s ``task``)."""
    values = {**_config_defaults(), **config_arguments(shape, flags)}
    values.update(copy.deepcopy(_CONFIG_CLASS_FIELDS), dtype=dtype, model_type="ofa",
                  transformers_version=transformers_version(), **(fields or {}))
    return dict(sorted(values.items()))


def generation_config_json(settings: dict, config: dict) -> dict:
    """``generation_config.json`` exactly as ``build_generation_config(settings, config).save_pretrained``
    writes it (tests/test_convert.py holds the two equal), without importing transformers."""
    hf, fairseq = generation_fields(settings, types.SimpleNamespace(**config))
    return dict(sorted({**hf, **fairseq, "transformers_version": transformers_version()}.items()))


def keymap_counts(shape: dict) -> dict:
    return {
        "encoder_layers": shape["encoder_layers"],
        "decoder_layers": shape["decoder_layers"],
        "resnet_layers": list(shape["resnet_layers"]),
    }


def released_variant(shape: dict, flags: dict) -> tuple[str | None, str | None]:
    """(variant, family) whose tokenizer and defaults the folder gets; (None, None) for a released
    variant's layer shapes with another vocabulary."""
    from .checkpoint import detect_variant

    variant, family = detect_variant(shape, flags)
    if family is not None and shape["vocab_size"] != family_info(family)["vocab_size"]:
        return None, None
    return variant, family


def plan_conversion(keymap: str, state: dict, shape: dict, flags: dict, path):
    """(key map, plan) for ``state``, after refusing what the model does not implement.

    The shipped map's output is the model's key set (a test proves it for every variant); any other
    map is checked against the model itself, so a map that misses a key cannot write a folder that
    loads with randomly initialised weights.
    """
    check_supported(shape, flags, path)
    km = KeyMap.load(keymap)
    targets = None if keymap == DEFAULT_KEYMAP else model_state_shapes(shape, flags)
    return km, km.plan(state, keymap_counts(shape), source_path=path, expected_shapes=targets)


def model_state_shapes(shape: dict, flags: dict) -> dict[str, tuple[int, ...]]:
    """Every key of the transformers model's state dict with its shape (built on the meta device)."""
    import torch

    from .modeling.modeling_ofa import OFAForConditionalGeneration

    with torch.device("meta"):
        model = OFAForConditionalGeneration(build_config(shape, flags))
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def check_derived(plan, state: dict, shape: dict, flags: dict, path) -> list[dict]:
    """The rp-bucket tables and image_position_idx are recomputed by the model: compare once."""
    import torch

    from .modeling.buckets_ofa import (
        image_num_rel_dis,
        make_image_bucket_position,
        make_token_bucket_position,
        token_bucket_table_size,
    )
    from .reference.buckets import (
        FAIRSEQ_IMAGE_POSITION_TRAILING,
        RELEASED_IMAGE_POSITION_TRAILING,
        image_position_idx_length,
        make_image_position_idx,
    )

    token_buckets, image_buckets = shape["token_bucket_size"], shape["image_bucket_size"]
    code_image_size = int(flags.get("code_image_size") or 128)
    expected = {
        "token_rp_bucket": lambda: make_token_bucket_position(
            token_buckets, token_bucket_table_size(shape["max_source_positions"])),
        "image_rp_bucket": lambda: make_image_bucket_position(image_buckets, image_num_rel_dis(image_buckets)),
    }
    tables = {}  # each table is built once, for the encoder's and the decoder's copy
    results = []
    for target, source in plan.derived.items():
        tensor = state[source]
        name = target.rsplit(".", 1)[-1]
        if name == "image_position_idx":
            # 1026 in fairseq's current code, 1025 in released checkpoints (OFA#229), at code size 128.
            candidates = [make_image_position_idx(image_buckets, code_image_size,
                                                  length=image_position_idx_length(code_image_size, trailing))
                          for trailing in (RELEASED_IMAGE_POSITION_TRAILING, FAIRSEQ_IMAGE_POSITION_TRAILING)]
            ok = any(c.shape == tensor.shape and torch.equal(c, tensor) for c in candidates)
        else:
            if name not in tables:
                tables[name] = expected[name]()
            ok = torch.equal(tables[name].to(tensor.dtype), tensor)
        results.append({"key": source, "equal": ok})
        if not ok:
            raise CheckpointError("derived table differs from the one ofaconv recomputes", path=path, key=source)
    return results


def written_unchanged(plan, state: dict, dtype: str) -> dict[str, str]:
    """Source key -> output name of every tensor a conversion at ``dtype`` writes byte for byte (the
    writer's ``output_dtype`` is the source's): the fingerprint names these, the weight files'
    sha256 covers them."""
    import torch

    from ofaconv.core.writer import output_dtype

    cast = getattr(torch, DTYPES[dtype])
    return {key: target for target, key in plan.entries if output_dtype(state[key].dtype, cast) == state[key].dtype}


def weight_entries(files: dict) -> dict:
    """The manifest entries the fingerprint ends with: the weight files'."""
    return {name: entry for name, entry in files.items() if is_weight_file(name)}


def check_tied(plan, state: dict, path) -> None:
    import torch

    for alias, canonical in plan.tied_sources.items():
        a, c = state[alias], state[canonical]
        if a.shape == c.shape and a.dtype == c.dtype and a.stride() == c.stride() and a.data_ptr() == c.data_ptr():
            continue  # one storage, as torch.save writes a tied parameter: nothing to read
        if a.shape != c.shape or not torch.equal(a, c):
            raise CheckpointError(f"tied alias differs from '{canonical}'", path=path, key=alias)


@dataclass
class ConversionResult:
    out_dir: Path
    report: dict
    passed: bool
    lines: list[str] = field(default_factory=list)


def copy_remote_code(folder: OutputFolder) -> None:
    """The modeling files of this ofaconv, for ``trust_remote_code`` users."""
    package = resources.files("ofaconv.ofa.modeling")
    for name in REMOTE_CODE_FILES:
        source = package / name
        if source.is_file():
            folder.write_bytes(name, source.read_bytes())


def _versions() -> dict:
    import torch

    return {
        "ofaconv": __version__,
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers_version(),
        "python": ".".join(map(str, sys.version_info[:3])),
    }


def _write_generation_config(folder: OutputFolder, family: str | None, variant: str | None, config: dict,
                              settings: dict | None = None) -> None:
    if settings is None:  # the family's fairseq defaults, with the variant's overrides
        settings = dict(family_info(family)["generation"]) if family else {}
        if variant:
            settings.update(get_variant(variant).get("generation", {}))
    folder.write_text("generation_config.json", config_file_text(generation_config_json(settings, config)))


def convert_checkpoint(
    src,
    out_dir,
    *,
    force: bool = False,
    ema: bool = False,
    source_sha256=False,
    **options,
) -> ConversionResult:
    """Convert the fairseq checkpoint ``src`` into the folder ``out_dir`` (see ``convert_loaded``).

    ``source_sha256``: also record the sha256 of the whole file (for comparing with a published
    checksum): True, or a ``BackgroundSha256`` of it already running (the CLI starts it first thing).
    """
    check_output(out_dir, force=force, protect=[src])
    if source_sha256 is True:
        source_sha256 = BackgroundSha256(src)
    try:
        from .checkpoint import load_checkpoint

        ckpt = load_checkpoint(src, ema=ema)
    except BaseException:
        if source_sha256:
            source_sha256.cancel()
        raise
    return convert_loaded(ckpt, out_dir, force=force, source_sha256=source_sha256, **options)


def convert_loaded(
    ckpt,
    out_dir,
    *,
    force: bool = False,
    dtype: str = "fp32",
    max_shard_size="2GB",
    keymap: str = DEFAULT_KEYMAP,
    tokenizer: str | None = None,
    prompt: str | None = None,
    verify: bool = False,
    license: str = "apache-2.0",
    progress: bool = False,
    kind: str = "conversion",
    source_sha256=False,
    protect=(),
    family: str | None = None,
    generation: dict | None = None,
    image_stats: tuple[list, list] | None = None,
    config_fields: dict | None = None,
) -> ConversionResult:
    """Write the folder for an already opened checkpoint (fairseq names, ``FairseqCheckpoint``).

    ``source_sha256``: also record the whole source file's sha256: True, or a ``BackgroundSha256``
    of it the caller started. The report always records the source's fingerprint.
    ``protect``: inputs besides ``ckpt.path`` that the output must not replace (an upgraded folder).
    What a source other than a fairseq checkpoint says about itself (``ofaconv upgrade``):
    ``family`` (tokenizer family where the shapes match no released variant), ``generation`` (its
    own generation settings instead of the family's), ``image_stats`` ((mean, std) of its image
    preprocessing), ``config_fields`` (extra config.json keys, e.g. ``task``).
    """
    if source_sha256 is True:
        source_sha256 = BackgroundSha256(ckpt.path)
    try:
        return _convert(ckpt, out_dir, source_sha256=source_sha256, force=force, dtype=dtype,
                        max_shard_size=max_shard_size, keymap=keymap, tokenizer=tokenizer, prompt=prompt,
                        verify=verify, license=license, progress=progress, kind=kind, protect=protect,
                        family=family, generation=generation, image_stats=image_stats,
                        config_fields=config_fields)
    except BaseException:
        if source_sha256:
            source_sha256.cancel()
        raise


def _convert(
    ckpt,
    out_dir,
    *,
    source_sha256,
    force: bool,
    dtype: str,
    max_shard_size,
    keymap: str,
    tokenizer: str | None,
    prompt: str | None,
    verify: bool,
    license: str,
    progress: bool,
    kind: str,
    protect,
    family: str | None = None,
    generation: dict | None = None,
    image_stats: tuple[list, list] | None = None,
    config_fields: dict | None = None,
) -> ConversionResult:
    import torch

    from .checkpoint import infer_config, read_flags, release_pages
    from ofaconv.core.writer import write_shards

    src, out_dir = Path(ckpt.path), Path(out_dir)
    if dtype not in DTYPES:
        raise OfaconvError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    ema = ckpt.from_ema
    state = ckpt.state_dict
    shape = infer_config(state)
    flags = read_flags(ckpt)
    variant, detected = released_variant(shape, flags)
    family = family or detected
    km, plan = plan_conversion(keymap, state, shape, flags, src)
    check_tied(plan, state, src)
    if ckpt.mmapped:
        for key in [*plan.tied_sources, *plan.tied_sources.values()]:
            release_pages(state[key])

    # The fingerprint hashes exactly the bytes converted (never the optimizer state) that the weight
    # files' sha256 does not already cover, on a worker thread beside everything else.
    fingerprint = BackgroundFingerprint(src, state, written=written_unchanged(plan, state, dtype),
                                        release=release_pages if ckpt.mmapped else None)
    with fingerprint, OutputFolder(out_dir, force=force, protect=[src, *protect]) as folder, _Aside() as aside:
        tmp = folder.path
        target_dtype = getattr(torch, DTYPES[dtype])
        config = config_json(shape, flags, DTYPES[dtype], config_fields)
        # What the weights do not need runs beside them on a worker thread (0.6 s of a real-size
        # conversion, where the main thread's writes leave the second core room): the derived tables'
        # check and the processing files (the tokenizer). Either failing stops the write. A bad
        # --tokenizer is refused before any weight is written: its vocabulary is read here.
        vocabulary = read_vocabulary(family, tokenizer) if family is not None else None
        derived_check = aside.submit(_check_derived, plan, state, shape, flags, src, ckpt.mmapped)
        processing = aside.submit(_processing_files, family, config["patch_image_size"], vocabulary, prompt,
                                  image_stats)
        folder.write_text("config.json", config_file_text(config))
        copy_remote_code(folder)
        _write_generation_config(folder, family, variant, config, generation)

        sources = dict(plan.entries)
        items = [
            (target, tuple(state[key].shape), state[key].dtype, functools.partial(state.__getitem__, key))
            for target, key in plan.entries
        ]
        if verify:
            from .verify import imports_in_background

            overlap = imports_in_background()
        else:
            overlap = contextlib.nullcontext()
        # The writer refuses NaN/Inf (and fp16 overflow) per tensor, naming the source key.
        with overlap, aside.failures():
            written = write_shards(
                tmp, items, max_shard_size=parse_size(max_shard_size), dtype=target_dtype,
                source_path=src, progress=progress, stop=aside.failed,
                written=(lambda name: release_pages(state[sources[name]])) if ckpt.mmapped else None,
            )
        for name, data in processing.result().items():
            folder.write_bytes(name, data)
        derived = derived_check.result()
        processing_note = _processing_note(family, config["patch_image_size"], prompt, image_stats)
        folder.add_entries(written.files)

        report = {
            "schema": SCHEMA,
            "kind": kind,
            "model_family": "ofa",
            "ofaconv_version": __version__,
            "source": {"file": src.name, "fingerprint": fingerprint.result(weight_entries(folder.files)),
                       "size": src.stat().st_size,
                       "layout": ckpt.layout, "ema": ema, **({"sha256": source_sha256.result()} if source_sha256 else {})},
            "variant": variant,
            "family": family,
            "flags": flags,
            "config": {k: shape[k] for k in sorted(shape)},
            "keymap": {"name": km.name, "file": Path(km.path).name, "sha256": km.sha256},
            "dtype": {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype],
            "processing": processing_note,
            "derived_checked": [d["key"] for d in derived],
            "checks": [],
            "passed": True,
            "versions": _versions(),
        }
        lines = []
        if verify:
            from .verify import run_checks

            checks = run_checks(tmp, ckpt, plan=plan, dtype=dtype)
            report["checks"] = checks
            report["passed"] = all(c["passed"] for c in checks)
            from ofaconv.core.verify import format_checks

            lines = format_checks(checks)
        report = folder.commit(report, card={"license": license})
    return ConversionResult(out_dir, report, report["passed"], lines)


def _check_derived(plan, state: dict, shape: dict, flags: dict, path, mmapped: bool) -> list[dict]:
    results = check_derived(plan, state, shape, flags, path)
    if mmapped:
        from .checkpoint import release_pages

        for key in plan.derived.values():
            release_pages(state[key])
    return results


def _processing_files(family, image_size: int, vocabulary, prompt, image_stats=None) -> dict[str, bytes]:
    if family is None:
        return {}
    mean, std = image_stats if image_stats is not None else (None, None)
    return processing_files(family, image_size, prompt=prompt, image_mean=mean, image_std=std, vocabulary=vocabulary)


def _processing_note(family, image_size: int, prompt, image_stats=None) -> dict:
    if family is None:
        return {"saved": False, "reason": "vocabulary matches no OFA family; no tokenizer or processor written"}
    note = {"saved": True, "family": family, "image_size": image_size,
            "prompt": prompt if prompt is not None else family_info(family)["prompt"]}
    if image_stats is not None:
        mean, std = image_stats
        note.update(image_mean=list(mean), image_std=list(std))
    return note


class _Aside:
    """Tasks on one worker thread beside the main thread's work; ``failed`` is set as soon as one
    raises, and ``failures()`` turns the ``CancelledError`` of work stopped by it into that error."""

    def __init__(self):
        self.failed = threading.Event()
        self._futures: list[concurrent.futures.Future] = []

    def __enter__(self) -> "_Aside":
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ofaconv-aside")
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, function, *args) -> concurrent.futures.Future:
        future = self._pool.submit(function, *args)
        future.add_done_callback(self._done)
        self._futures.append(future)
        return future

    def _done(self, future: concurrent.futures.Future) -> None:
        if not future.cancelled() and future.exception() is not None:
            self.failed.set()

    @contextlib.contextmanager
    def failures(self):
        try:
            yield
        except concurrent.futures.CancelledError:
            for future in self._futures:
                if future.done() and not future.cancelled() and future.exception() is not None:
                    raise future.exception() from None
            raise


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a fairseq OFA checkpoint to a Hugging Face folder")
    p.add_argument("checkpoint", help="fairseq OFA checkpoint (.pt), or synth:VARIANT for a built-in micro one")
    p.add_argument("out", help="output folder (created; refused if it exists unless --force)")
    p.add_argument("--verify", action="store_true", help="run the parity checker and fail on any mismatch")
    p.add_argument("--force", action="store_true",
                   help="replace an earlier ofaconv output folder (never a folder holding other files)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weight dtype on disk (cast per tensor)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    p.add_argument("--ema", action="store_true", help="convert the EMA weights stored in extra_state")
    p.add_argument("--keymap", default=DEFAULT_KEYMAP, help="key map name in mappings/ or a YAML path")
    p.add_argument("--tokenizer", help="folder or Hub id with the English vocabulary files (default: shipped)")
    p.add_argument("--prompt", help="caption prompt saved in the processor (default: fairseq's)")
    p.add_argument("--license", default="apache-2.0", help="license in the model card")
    p.add_argument("--source-sha256", action=argparse.BooleanOptionalAction, default=False,
                   help="also record the sha256 of the whole source file, to compare with a published checksum "
                        "(reads the optimizer state too; the report always fingerprints the bytes converted)")
    p.set_defaults(func=_run)


SYNTH_PREFIX = "synth:"


def _run(args) -> int:
    source = args.checkpoint
    check_output(args.out, force=args.force, protect=[None if source.startswith(SYNTH_PREFIX) else source])
    source_sha256 = args.source_sha256
    if source_sha256 and not source.startswith(SYNTH_PREFIX) and Path(source).is_file():
        source_sha256 = BackgroundSha256(source)  # before torch is even imported
    if source.startswith(SYNTH_PREFIX):
        # The embedded default: a micro synthetic checkpoint of a released variant, in the exact
        # trainer format, written to a temporary file and converted like any other.
        from .synth import write_synthetic_checkpoint

        variant = source[len(SYNTH_PREFIX):]
        tmpdir = tempfile.TemporaryDirectory(prefix="ofaconv-synth-")
        source = Path(tmpdir.name) / f"{variant}-micro.pt"
        write_synthetic_checkpoint(source, variant, size="micro")
        print(f"synthesized {variant} (micro, trainer format) at {source}")
    result = convert_checkpoint(
        source,
        args.out,
        force=args.force,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        ema=args.ema,
        keymap=args.keymap,
        tokenizer=args.tokenizer,
        prompt=args.prompt,
        verify=args.verify,
        license=args.license,
        progress=sys.stderr.isatty(),
        source_sha256=source_sha256,
    )
    report = result.report
    weights = [name for name in report["files"] if is_weight_file(name)]
    print(f"wrote {result.out_dir} (variant {report['variant'] or 'unknown'}, {report['dtype']}, "
          f"{len(weights)} weight file(s))")
    for line in result.lines:
        print(line)
    if not result.passed:
        failed = ", ".join(c["name"] for c in report["checks"] if not c["passed"])
        print(f"ofaconv: error: verification failed ({failed}); see {result.out_dir}/conversion_report.json",
              file=sys.stderr)
        return 3
    return 0
