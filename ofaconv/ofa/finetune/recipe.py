"""Finetuning recipes: YAML files with a fixed schema, ``base:`` inheritance and ``key=value`` overrides.

A recipe names the model to start from, the caption data, what is frozen, the encoder cache, the
batching strategy, evaluation settings, and a ``training:`` section that is passed to
``transformers.TrainingArguments`` as is (so every Trainer option works under its usual name).

Relative paths are relative to the working directory, except ``base:``, which is relative to the
recipe that names it. Unknown keys are errors (with the closest known key suggested), never
silently ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ofaconv.core.errors import OfaconvError

__all__ = ["Recipe", "RecipeError", "load_recipe", "apply_overrides", "SAMPLERS"]

SAMPLERS = ("random", "length", "image")
DATA_FORMATS = ("muge", "pairs")
CACHE_DTYPES = ("float32", "float16", "bfloat16")

# Trainer settings we choose differently from transformers' defaults; the recipe's own
# `training:` values win over these.
TRAINING_DEFAULTS = {
    "remove_unused_columns": False,
    "report_to": "none",
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 1000,
    "save_total_limit": 3,
    "ddp_find_unused_parameters": False,
    "dataloader_num_workers": 0,
    "lr_scheduler_type": "cosine",
}
# Settings the engine owns; a recipe cannot set them under `training:`.
TRAINING_RESERVED = {
    "output_dir": "set checkpoint_dir (checkpoints) or output_dir (final model) at the top level",
    "label_smoothing_factor": "set label_smoothing at the top level (fairseq's formula, pad ignored)",
    "remove_unused_columns": "the caption collator needs every column",
    "label_names": "the engine sets it",
    "train_sampling_strategy": "set sampler at the top level (random | length | image)",
    "group_by_length": "set sampler: length at the top level",
}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``5e-5`` as a string; recipes mean a float (as YAML 1.2 and JSON do)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


class RecipeError(OfaconvError):
    """A recipe file or override that does not follow the schema."""


@dataclass
class ModelInit:
    """Start from a random initialisation instead of a converted folder (tests, smoke runs)."""

    config: str | None = None  # a config.json-style file with an added "family" field
    variant: str | None = None  # or a variant of mappings/variants.yaml ...
    micro: bool = True  # ... at its micro size
    seed: int = 0


@dataclass
class SplitSpec:
    captions: str | None = None  # MUGE jsonl, or a CSV/JSONL of image,caption pairs
    images: str | None = None  # MUGE image TSV; for pairs: folder image paths are relative to


@dataclass
class SyntheticSpec:
    """Generate MUGE-format files of coloured shapes with Chinese captions (smoke runs, tests)."""

    train_images: int = 64
    eval_images: int = 16
    captions_per_image: int = 1
    image_size: int = 64
    seed: int = 0


@dataclass
class DataConfig:
    format: str = "muge"
    train: SplitSpec = field(default_factory=SplitSpec)
    eval: SplitSpec | None = None
    eval_fraction: float = 0.0  # hold out this share of the training images when eval is not given
    columns: dict = field(default_factory=dict)  # rename the expected columns / keys
    max_target_length: int = 100  # caption tokens kept, EOS included
    strip_punctuation: bool = True  # fairseq removes ASCII punctuation from training captions
    max_eval_images: int | None = 500  # images captioned per evaluation (None: all)
    synthetic: SyntheticSpec | None = None


@dataclass
class CacheConfig:
    enabled: Any = "auto"  # true | false | "auto" (on whenever the encoder output is fixed)
    # Default: <checkpoint_dir>/encoder-cache. Opening a cache deletes caches of other encoders
    # in the same folder, so concurrent runs on different models need different folders.
    dir: str | None = None
    dtype: str = "float32"
    batch_size: int = 32  # images per encoder forward while filling the cache


@dataclass
class Recipe:
    model: str | None = None  # converted or finetuned folder
    model_init: ModelInit | None = None
    output_dir: str | None = None  # final folder (same format as a converted one)
    checkpoint_dir: str | None = None  # Trainer checkpoints; default <output_dir>-checkpoints
    resume_from_checkpoint: Any = None  # path, or true for the latest in checkpoint_dir
    prompt: str | None = None  # default: fairseq's prompt for the model's family
    freeze_encoder: bool = True  # LiT: ResNet trunk and encoder frozen, kept in eval mode
    freeze_word_embed: bool = True  # the shared embedding (encoder, decoder, output projection)
    freeze_batchnorm: bool = True  # BatchNorm statistics never move, even in full finetuning
    label_smoothing: float = 0.0
    sampler: str = "random"  # random (the seed's) | length (bucketed) | image (captions of an image together)
    bucket_size: int = 64  # global batches per length bucket (sampler: length)
    # Exact savings (same loss and gradients); switched off only to measure them (bench/finetune.py).
    pad_free_logits: bool = True  # vocabulary logits only at target positions, not at padding
    share_encoder_rows: bool = True  # cross-attention keys/values once per image for all its captions in a batch
    data: DataConfig = field(default_factory=DataConfig)
    encoder_cache: CacheConfig = field(default_factory=CacheConfig)
    generation: dict = field(default_factory=dict)  # evaluation beam search; default: the family's
    training: dict = field(default_factory=dict)  # transformers.TrainingArguments fields
    source: str | None = None  # the recipe file (for messages and the report)

    # -- derived ------------------------------------------------------------------------------
    def resolved_checkpoint_dir(self) -> Path:
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir)
        return Path(f"{Path(self.output_dir).as_posix().rstrip('/')}-checkpoints")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source", None)
        return out


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError("recipe not found", path=path) from None
    except OSError as exc:
        raise RecipeError(f"cannot read recipe ({exc.strerror})", path=path) from None
    try:
        data = _yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"not valid YAML{where}: {getattr(exc, 'problem', exc)}", path=path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe is a mapping, found {type(data).__name__}", path=path)
    return data


def _deep_merge(base: dict, top: Mapping) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict) and key not in ("generation",):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_with_bases(path: Path, seen: tuple = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise RecipeError("recipe inherits from itself (base: cycle)", path=path)
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise RecipeError("'base' must be a path to another recipe", path=path, key="base")
    return _deep_merge(_load_with_bases((path.parent / base), seen + (path,)), data)


def load_recipe(
    recipe: str | os.PathLike | Mapping | Recipe,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    *,
    smoke: bool = False,
) -> Recipe:
    """Read a recipe (a YAML path, a mapping or a Recipe), apply overrides, validate.

    ``overrides``: ``["training.learning_rate=1e-4", ...]`` (values parsed as YAML) or a mapping of
    dotted keys. ``smoke``: lay the packaged smoke overlay (micro model, synthetic data, a few steps
    on CPU) over the recipe, the way ``ofaconv finetune RECIPE --smoke`` does.
    """
    if isinstance(recipe, Recipe):
        data, source = recipe.to_dict(), recipe.source
    elif isinstance(recipe, Mapping):
        data, source = copy.deepcopy(dict(recipe)), None
        data.pop("base", None)
    else:
        path = Path(recipe)
        data, source = _load_with_bases(path), str(path)
    if data.pop("smoke", False) or smoke:
        data = _deep_merge(data, smoke_overlay())
    data = apply_overrides(data, overrides)
    parsed = _build(Recipe, data, "")
    parsed.source = source
    validate(parsed)
    return parsed


def smoke_overlay() -> dict:
    """The packaged overlay that turns any recipe into a seconds-long CPU run."""
    from importlib.resources import files

    text = files("ofaconv.ofa.finetune").joinpath("smoke.yaml").read_text(encoding="utf-8")
    return _yaml(text) or {}


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise RecipeError(f"override {item!r} is not key=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key:
        raise RecipeError(f"override {item!r} has an empty key")
    try:
        value = _yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(data: dict, overrides: Sequence[str] | Mapping[str, Any]) -> dict:
    """Set dotted keys (``a.b.c=value``) in a recipe mapping, creating sections as needed."""
    data = copy.deepcopy(data)
    items = overrides.items() if isinstance(overrides, Mapping) else map(_parse_override, overrides)
    for key, value in items:
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {key!r}: {part!r} is not a section", key=key)
            node = child
        node[parts[-1]] = value
    return data


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------

_NESTED = {
    ("Recipe", "model_init"): ModelInit,
    ("Recipe", "data"): DataConfig,
    ("Recipe", "encoder_cache"): CacheConfig,
    ("DataConfig", "train"): SplitSpec,
    ("DataConfig", "eval"): SplitSpec,
    ("DataConfig", "synthetic"): SyntheticSpec,
}


def _build(cls, data: Any, prefix: str):
    if data is None and cls is not Recipe:
        return None
    if not isinstance(data, Mapping):
        raise RecipeError(f"'{prefix.rstrip('.')}' must be a mapping, found {type(data).__name__}", key=prefix.rstrip("."))
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            hint = difflib.get_close_matches(str(key), sorted(names), n=1)
            suggestion = f"; did you mean '{prefix}{hint[0]}'?" if hint else ""
            raise RecipeError(f"unknown recipe key '{prefix}{key}'{suggestion}", key=f"{prefix}{key}")
        nested = _NESTED.get((cls.__name__, key))
        kwargs[key] = _build(nested, value, f"{prefix}{key}.") if nested else value
    return cls(**kwargs)


def _expect(value, types, key: str, what: str):
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise RecipeError(f"expected {what}, found {value!r}", key=key)


def _as_tuple(types):
    return types if isinstance(types, tuple) else (types,)


def validate(recipe: Recipe) -> None:
    """Type and consistency checks that would otherwise fail deep inside a run."""
    if (recipe.model is None) == (recipe.model_init is None):
        raise RecipeError("give exactly one of 'model' (a converted folder) and 'model_init'", key="model")
    if recipe.model is not None:
        _expect(recipe.model, str, "model", "a folder path")
    if recipe.model_init is not None and (recipe.model_init.config is None) == (recipe.model_init.variant is None):
        raise RecipeError("model_init needs exactly one of 'config' and 'variant'", key="model_init")
    if not recipe.output_dir:
        raise RecipeError("'output_dir' (the final model folder) is required", key="output_dir")
    for key in ("freeze_encoder", "freeze_word_embed", "freeze_batchnorm", "pad_free_logits", "share_encoder_rows"):
        _expect(getattr(recipe, key), bool, key, "true or false")
    _expect(recipe.label_smoothing, (int, float), "label_smoothing", "a number in [0, 1)")
    if not 0.0 <= recipe.label_smoothing < 1.0:
        raise RecipeError(f"expected a number in [0, 1), found {recipe.label_smoothing}", key="label_smoothing")
    if recipe.sampler not in SAMPLERS:
        raise RecipeError(f"unknown sampler {recipe.sampler!r}; choose from {', '.join(SAMPLERS)}", key="sampler")
    _expect(recipe.bucket_size, int, "bucket_size", "a positive integer")
    if recipe.prompt is not None:
        _expect(recipe.prompt, str, "prompt", "a string")

    data = recipe.data
    if data.format not in DATA_FORMATS:
        raise RecipeError(f"unknown data format {data.format!r}; choose from {', '.join(DATA_FORMATS)}", key="data.format")
    if data.synthetic is None:
        if not data.train or not data.train.captions:
            raise RecipeError("the training captions file is required", key="data.train.captions")
        if data.format == "muge" and not data.train.images:
            raise RecipeError("MUGE data needs the image TSV", key="data.train.images")
        if data.eval is not None and data.eval.captions and data.format == "muge" and not data.eval.images:
            raise RecipeError("MUGE data needs the image TSV", key="data.eval.images")
    _expect(data.eval_fraction, (int, float), "data.eval_fraction", "a number in [0, 1)")
    if not 0.0 <= data.eval_fraction < 1.0:
        raise RecipeError(f"expected a number in [0, 1), found {data.eval_fraction}", key="data.eval_fraction")
    _expect(data.max_target_length, int, "data.max_target_length", "an integer >= 2")
    if data.max_target_length < 2:
        raise RecipeError("must be at least 2 (one token and EOS)", key="data.max_target_length")
    _expect(data.columns, dict, "data.columns", "a mapping of column names")

    cache = recipe.encoder_cache
    if cache.enabled not in (True, False, "auto"):
        raise RecipeError(f"expected true, false or auto, found {cache.enabled!r}", key="encoder_cache.enabled")
    if cache.dtype not in CACHE_DTYPES:
        raise RecipeError(f"choose from {', '.join(CACHE_DTYPES)}", key="encoder_cache.dtype")
    if cache.enabled is True:
        # The prompt's embeddings are part of the encoder output: if anything of the encoder
        # trains, yesterday's cache entries describe another model.
        if not recipe.freeze_encoder:
            raise RecipeError("the encoder cache needs freeze_encoder: true", key="encoder_cache.enabled")
        if not recipe.freeze_word_embed:
            raise RecipeError(
                "the encoder reads the shared word embedding for the prompt, so a trainable embedding "
                "changes its output; set freeze_word_embed: true or encoder_cache.enabled: false",
                key="encoder_cache.enabled",
            )

    _expect(recipe.generation, dict, "generation", "a mapping of generation settings")
    _expect(recipe.training, dict, "training", "a mapping of transformers.TrainingArguments fields")
    valid = {f.name for f in dataclasses.fields(_training_arguments_class())}
    for key in recipe.training:
        if key in TRAINING_RESERVED:
            raise RecipeError(f"not settable here: {TRAINING_RESERVED[key]}", key=f"training.{key}")
        if key not in valid:
            hint = difflib.get_close_matches(key, sorted(valid), n=1)
            suggestion = f"; did you mean 'training.{hint[0]}'?" if hint else ""
            raise RecipeError(f"not a transformers.TrainingArguments field{suggestion}", key=f"training.{key}")


def _training_arguments_class():
    from transformers import TrainingArguments

    return TrainingArguments


def cache_enabled(recipe: Recipe) -> bool:
    """Whether the run reads encoder outputs from the cache (``auto``: whenever they are fixed)."""
    if recipe.encoder_cache.enabled == "auto":
        return recipe.freeze_encoder and recipe.freeze_word_embed
    return bool(recipe.encoder_cache.enabled)
