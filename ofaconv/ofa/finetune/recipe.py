"""Finetuning recipes: the schema and defaults of ``ofaconv finetune`` recipes.

A recipe names the model to start from, the caption data, what is frozen, the encoder cache, the
batching strategy, evaluation settings, and a ``training:`` section that is passed to
``transformers.TrainingArguments`` as is (so every Trainer option works under its usual name).

Reading (YAML 1.2 numbers and booleans, ``base:``, ``--override key=value``, paths relative to the
recipe file, unknown keys and wrong types as one-line errors) is ``ofaconv.core.recipe``'s.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from ofaconv.core.recipe import RecipeError, RecipeSource, check_fields, path_field, read_yaml

__all__ = ["Recipe", "RecipeError", "load_recipe", "SAMPLERS"]

Sampler = Literal["random", "length", "image"]
SAMPLERS = typing.get_args(Sampler)

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


@dataclass
class ModelInit:
    """Start from a random initialisation instead of a converted folder (tests, smoke runs)."""

    config: str | None = path_field()  # a config.json-style file with an added "family" field
    variant: str | None = None  # or a variant of mappings/variants.yaml ...
    micro: bool = True  # ... at its micro size
    seed: int = 0


@dataclass
class SplitSpec:
    captions: str | None = path_field()  # MUGE jsonl, or a CSV/JSONL of image,caption pairs
    images: str | None = path_field()  # MUGE image TSV; for pairs: folder image paths are relative to


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
    format: Literal["muge", "pairs"] = "muge"
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
    enabled: bool | Literal["auto"] = "auto"  # "auto": on whenever the encoder output is fixed
    # Default: <checkpoint_dir>/encoder-cache. Opening a cache deletes caches of other encoders
    # in the same folder, so concurrent runs on different models need different folders.
    dir: str | None = path_field()
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_size: int = 32  # images per encoder forward while filling the cache


@dataclass
class Recipe:
    model: str | None = path_field()  # converted or finetuned folder
    model_init: ModelInit | None = None
    output_dir: str | None = path_field()  # final folder (same format as a converted one)
    checkpoint_dir: str | None = path_field()  # Trainer checkpoints; default <output_dir>-checkpoints
    resume_from_checkpoint: str | bool | None = path_field()  # path, or true for the latest in checkpoint_dir
    prompt: str | None = None  # default: fairseq's prompt for the model's family
    freeze_encoder: bool = True  # LiT: ResNet trunk and encoder frozen, kept in eval mode
    freeze_word_embed: bool = True  # the shared embedding (encoder, decoder, output projection)
    freeze_batchnorm: bool = True  # BatchNorm statistics never move, even in full finetuning
    label_smoothing: float = 0.0
    sampler: Sampler = "random"  # random (the seed's) | length (bucketed) | image (captions of an image together)
    bucket_size: int = 64  # global batches per length bucket (sampler: length)
    # Exact savings (same loss and gradients); switched off only to measure them (bench/finetune.py).
    pad_free_logits: bool = True  # vocabulary logits only at target positions, not at padding
    share_encoder_rows: bool = True  # cross-attention keys/values once per image for all its captions in a batch
    data: DataConfig = field(default_factory=DataConfig)
    encoder_cache: CacheConfig = field(default_factory=CacheConfig)
    # Evaluation beam search (default: the family's); replaced as a whole, never merged with a base's.
    generation: dict = field(default_factory=dict, metadata={"merge": False})
    training: dict = field(default_factory=dict)  # transformers.TrainingArguments fields
    source: str | None = field(default=None, metadata={"internal": True})  # the recipe file (messages, report)

    # -- derived ------------------------------------------------------------------------------
    def resolved_checkpoint_dir(self) -> Path:
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir)
        return Path(f"{Path(self.output_dir).as_posix().rstrip('/')}-checkpoints")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source", None)
        return out


def load_recipe(
    recipe: str | os.PathLike | Mapping | Recipe,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    *,
    smoke: bool = False,
) -> Recipe:
    """Read a recipe (a YAML path, a mapping or a Recipe), apply overrides, validate.

    ``overrides``: ``["training.learning_rate=1e-4", ...]`` or a mapping of dotted keys. ``smoke``:
    lay the packaged smoke overlay (micro model, synthetic data, a few steps on CPU) over the
    recipe, the way ``ofaconv finetune RECIPE --smoke`` does.
    """
    source = RecipeSource.open(Recipe, recipe)
    if source.pop("smoke", False) or smoke:
        source.merge(smoke_overlay(), _SMOKE)
    source.override(overrides)
    parsed = source.build(validate)
    parsed.source = None if source.top is None else str(source.top)
    return parsed


_SMOKE = files("ofaconv.ofa.finetune").joinpath("smoke.yaml")


def smoke_overlay() -> dict:
    """The packaged overlay that turns any recipe into a seconds-long CPU run (paths: working directory)."""
    return read_yaml(_SMOKE.read_text(encoding="utf-8")) or {}


def validate(recipe: Recipe) -> None:
    """Consistency checks that would otherwise fail deep inside a run (types are the schema's)."""
    if (recipe.model is None) == (recipe.model_init is None):
        raise RecipeError("give exactly one of 'model' (a converted folder) and 'model_init'", key="model")
    if recipe.model_init is not None and (recipe.model_init.config is None) == (recipe.model_init.variant is None):
        raise RecipeError("model_init needs exactly one of 'config' and 'variant'", key="model_init")
    if not recipe.output_dir:
        raise RecipeError("'output_dir' (the final model folder) is required", key="output_dir")
    if not 0.0 <= recipe.label_smoothing < 1.0:
        raise RecipeError(f"expected a number in [0, 1), found {recipe.label_smoothing}", key="label_smoothing")

    data = recipe.data
    if data.synthetic is None:
        if not data.train or not data.train.captions:
            raise RecipeError("the training captions file is required", key="data.train.captions")
        if data.format == "muge" and not data.train.images:
            raise RecipeError("MUGE data needs the image TSV", key="data.train.images")
        if data.eval is not None and data.eval.captions and data.format == "muge" and not data.eval.images:
            raise RecipeError("MUGE data needs the image TSV", key="data.eval.images")
    if not 0.0 <= data.eval_fraction < 1.0:
        raise RecipeError(f"expected a number in [0, 1), found {data.eval_fraction}", key="data.eval_fraction")
    if data.max_target_length < 2:
        raise RecipeError("must be at least 2 (one token and EOS)", key="data.max_target_length")

    if recipe.encoder_cache.enabled is True:
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

    from transformers import TrainingArguments

    check_fields(recipe.training, TrainingArguments, "training", reserved=TRAINING_RESERVED)


def cache_enabled(recipe: Recipe) -> bool:
    """Whether the run reads encoder outputs from the cache (``auto``: whenever they are fixed)."""
    if recipe.encoder_cache.enabled == "auto":
        return recipe.freeze_encoder and recipe.freeze_word_embed
    return bool(recipe.encoder_cache.enabled)
