"""``ofaconv clip train RECIPE.yaml``: LiT-tuning of a CLIP package on the Hugging Face Trainer.

The image tower is locked (optionally its projection too); the loss is CLIP's symmetric
cross-entropy over in-batch negatives, with an optional clamp of ``logit_scale`` after each step.
Because the locked tower is a pure function of the image, its pooled output is computed once per
image into a ``FeatureCache`` keyed by image id + a fingerprint of the tower weights and image
pre-processing, and every epoch reads it from disk instead of decoding and encoding images.
``torchrun`` / ``accelerate launch`` work unchanged: each rank fills its share of the cache on its
training device (images decoded by ``dataloader_num_workers`` workers), the ranks' decode failures
are gathered into ``data_stats.json``, then all train. The final model is written as a CLIP package
(``<output_dir>/final``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ofaconv.core.errors import OfaconvError
from ofaconv.core.featcache import FeatureCache
from ofaconv.core.recipe import RecipeError, check_fields, load, path_field
from ofaconv.core.digest import file_sha256
from ofaconv.core.writer import OutputFolder
from .convert import load_package, source_entry, source_weights
from .data import DataStats, ImageStore, Pair, filter_decodable, read_pairs
from .package import ClipPackage, check_package, clip_report, module_state_to_file, reload_check, write_package
from .towers import ClipTowers, _unwrap

__all__ = ["ClipRecipe", "LiTModel", "load_recipe", "train", "precompute_image_features", "PairDataset", "PairCollator"]

logger = logging.getLogger("ofaconv.clip")

@dataclass(kw_only=True)
class PairFiles:
    """BertCLIP ``csv`` (+ ``image_root``, default the CSV's folder) or Chinese-CLIP ``texts`` + ``images``."""

    csv: str | None = path_field()
    image_root: str | None = path_field()
    texts: str | None = path_field()
    images: str | None = path_field()


@dataclass(kw_only=True)
class TrainData:
    train: PairFiles


@dataclass(kw_only=True)
class LiT:
    lock_image: bool = True
    lock_image_head: bool = False
    clamp_logit_scale: float | None = None
    cache_image_features: bool = True
    cache_dir: str | None = path_field()  # default: <output_dir>/feature_cache
    cache_dtype: Literal["float16", "fp16", "bfloat16", "float32", "fp32"] = "float16"
    encode_batch_size: int = 64


@dataclass(kw_only=True)
class ClipRecipe:
    """``ofaconv clip train`` recipe; ``training:`` is passed to ``transformers.TrainingArguments``."""

    model: str = path_field(dataclasses.MISSING)
    output_dir: str = path_field(dataclasses.MISSING)
    data: TrainData
    max_length: int | None = None
    lit: LiT = field(default_factory=LiT)
    training: dict = field(default_factory=dict)


# The trainer settings train() owns.
TRAINING_RESERVED = {"output_dir": "set output_dir at the top level",
                     "remove_unused_columns": "the pair collator needs every column"}


def _validate(recipe: ClipRecipe) -> None:
    files = recipe.data.train
    if not files.csv and not (files.texts and files.images):
        raise RecipeError("give 'csv' (+ 'image_root') or 'texts' + 'images'", key="data.train")
    if recipe.lit.cache_image_features and not recipe.lit.lock_image:
        raise RecipeError("cache_image_features needs lock_image: true (an unlocked tower changes every step)",
                          key="lit.cache_image_features")
    from transformers import TrainingArguments

    check_fields(recipe.training, TrainingArguments, "training", reserved=TRAINING_RESERVED)


def load_recipe(recipe: str | os.PathLike | Mapping | ClipRecipe,
                overrides: Sequence[str] | Mapping[str, Any] = ()) -> ClipRecipe:
    """Read a recipe (YAML path, mapping or ClipRecipe) with ``key.path=value`` overrides, checked."""
    return load(ClipRecipe, recipe, overrides, validate=_validate)


class LiTModel(nn.Module):
    """Wraps a VTDE / ChineseCLIPModel; ``image_embeds`` are the locked tower's pooled outputs."""

    def __init__(self, clip_model, *, lock_image: bool = True, lock_image_head: bool = False):
        super().__init__()
        self.clip = clip_model
        self.lock_image = lock_image
        if lock_image:
            self.clip.vision_model.requires_grad_(False)
        if lock_image_head:
            self.clip.visual_projection.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.lock_image:  # a locked tower stays in eval mode (no dropout)
            self.clip.vision_model.eval()
        return self

    def forward(self, input_ids, attention_mask, pixel_values=None, image_embeds=None, return_loss=True):
        if image_embeds is None:
            if pixel_values is None:
                raise ValueError("LiTModel needs pixel_values or image_embeds")
            with torch.set_grad_enabled(not self.lock_image and torch.is_grad_enabled()):
                image_embeds = _unwrap(self.clip.vision_model(pixel_values=pixel_values))
        dtype = self.clip.visual_projection.weight.dtype
        img = F.normalize(self.clip.visual_projection(image_embeds.to(dtype)), dim=-1)
        txt = F.normalize(_unwrap(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)), dim=-1)
        logits_per_text = self.clip.logit_scale.exp() * txt @ img.t()
        out = {"logits_per_text": logits_per_text}
        if return_loss:
            labels = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
            out["loss"] = (F.cross_entropy(logits_per_text, labels) + F.cross_entropy(logits_per_text.t(), labels)) / 2
        return out


class PairDataset(Dataset):
    def __init__(self, pairs: list[Pair], store: ImageStore, image_processor=None, cache: FeatureCache | None = None):
        self.pairs, self.store, self.image_processor, self.cache = pairs, store, image_processor, cache

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        pair = self.pairs[i]
        if self.cache is not None:
            return {"text": pair.text, "image_embeds": self.cache.get(pair.image_id)}
        image = self.store.load(pair.image_id)
        return {"text": pair.text,
                "pixel_values": self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]}


@dataclass
class PairCollator:
    tokenizer: object
    max_length: int

    def __call__(self, items):
        batch = self.tokenizer([it["text"] for it in items], max_length=self.max_length, truncation=True,
                               padding="longest", return_tensors="pt", return_token_type_ids=False)
        out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        key = "image_embeds" if "image_embeds" in items[0] else "pixel_values"
        out[key] = torch.stack([it[key] for it in items])
        return out


def _cache_dtype(name):
    return {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
            "float32": None, "fp32": None}[str(name)]


def open_image_cache(towers: ClipTowers, cache_dir: Path, dtype) -> FeatureCache:
    return FeatureCache(cache_dir, namespace="clip-image-pooled", fingerprint=towers.image_fingerprint(),
                        dtype=_cache_dtype(dtype))


class _DecodedImages(Dataset):
    """``(image id, pixel values, None)`` or ``(image id, None, reason)``: decoded in DataLoader workers."""

    def __init__(self, image_ids: list[str], store: ImageStore, image_processor):
        self.image_ids, self.store, self.image_processor = image_ids, store, image_processor

    def __len__(self):
        return len(self.image_ids)

    def __getitem__(self, i):
        image_id = self.image_ids[i]
        try:
            image = self.store.load(image_id)
            pixels = self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        except Exception as exc:  # a corrupt image is counted and skipped, never fatal
            return image_id, None, type(exc).__name__
        return image_id, pixels, None


def _collate_decoded(items):
    ids = [image_id for image_id, pixels, _ in items if pixels is not None]
    pixels = torch.stack([pixels for _, pixels, _ in items if pixels is not None]) if ids else None
    failed = [(image_id, reason) for image_id, pixels, reason in items if pixels is None]
    return ids, pixels, failed


def precompute_image_features(towers: ClipTowers, store: ImageStore, image_ids: list[str], cache: FeatureCache, *,
                              batch_size: int = 64, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                              stats: DataStats | None = None) -> set[str]:
    """Encode the uncached images of this rank's share on the towers' device; returns the ids that failed to decode.

    Images are decoded and pre-processed by ``num_workers`` DataLoader workers (0: in this process).
    """
    # The share is cut before looking at the cache: ranks get here at different times, and shares of
    # "what is still missing" would shift under the shards other ranks have already written.
    todo = cache.missing(list(dict.fromkeys(image_ids))[rank::world_size])
    bad: set[str] = set()
    if not todo:
        return bad
    loader = DataLoader(_DecodedImages(todo, store, towers.image_processor), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate_decoded)
    for ids, pixels, failed in loader:
        for image_id, reason in failed:
            bad.add(image_id)
            if stats is not None:
                stats.bad("bad_images", f"{image_id} ({reason})")
        if ids:
            with torch.no_grad():
                cache.put_many(ids, towers.pool_images(pixels).float().cpu())
    return bad


def _merge_rank_failures(parts: list[tuple[list[str], dict]], stats: DataStats) -> set[str]:
    """Fold every rank's ``(failed ids, fill stats)`` into ``stats``; returns all failed ids."""
    bad: set[str] = set()
    for ids, part in parts:
        bad.update(ids)
        stats.merge(part)
    return bad


def _build_trainer_args(recipe: ClipRecipe, output_dir: Path):
    from transformers import TrainingArguments

    args = dict(recipe.training)
    args.setdefault("report_to", "none")
    args.setdefault("save_strategy", "no")
    args["remove_unused_columns"] = False
    args["output_dir"] = str(output_dir)
    try:
        return TrainingArguments(**args)
    except (TypeError, ValueError) as exc:
        raise OfaconvError(f"bad training arguments: {exc}", key="training") from exc


def _clamp_callback(limit: float):
    from transformers import TrainerCallback

    class ClampLogitScale(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            target = getattr(model, "module", model)
            with torch.no_grad():
                target.clip.logit_scale.clamp_(0, limit)

    return ClampLogitScale()


def export_package(base: ClipPackage, clip_model, out: Path, *, source: Path, training: dict) -> None:
    """The trained model as a package folder (replacing an earlier one ofaconv wrote there)."""
    pkg = copy.copy(base)
    state = {k: v.detach().float().cpu() for k, v in clip_model.state_dict().items()
             if not k.endswith(("position_ids", "token_type_ids"))}
    pkg.state = module_state_to_file(state, clip_model)
    with OutputFolder(out, force=True, protect=[source]) as folder:
        write_package(pkg, folder)
        checks = [reload_check(check_package(pkg, folder.path))]
        weights = source_weights(source)
        folder.commit(clip_report(pkg, kind="finetune", source=source_entry(weights, file_sha256(weights)),
                                  checks=checks, training=training))


def train(recipe: ClipRecipe, *, resume: str | bool | None = None, callbacks: list | None = None) -> dict:
    """Run a loaded recipe; ``callbacks``: extra ``TrainerCallback`` objects (progress, timing)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from transformers import Trainer, set_seed

    lit = recipe.lit
    pairs, store, stats = read_pairs(dataclasses.asdict(recipe.data.train))  # bad data fails before any set-up
    set_seed(int(recipe.training.get("seed", 42)))
    output_dir = Path(recipe.output_dir)
    args = _build_trainer_args(recipe, output_dir)
    # The training arguments set up the process state (use_cpu, backend); a PartialState made
    # before them sees a single process on a CPU-only torchrun.
    device = args.device
    state = PartialState()
    pkg, _, _, _ = load_package(recipe.model, max_length=recipe.max_length)
    clip_model = pkg.build_model()
    towers = ClipTowers(clip_model, pkg.image_processor, pkg.tokenizer, kind=pkg.kind, max_length=pkg.max_length)
    max_length = int(recipe.max_length or pkg.max_length)

    cache = None
    if lit.cache_image_features:
        cache = open_image_cache(towers, Path(lit.cache_dir or output_dir / "feature_cache"), lit.cache_dtype)
        unique = list(dict.fromkeys(p.image_id for p in pairs))
        # Encode where the model will train; the Trainer would move it there anyway.
        clip_model.to(device)
        fill_stats = DataStats()
        failed = precompute_image_features(towers, store, unique, cache, batch_size=lit.encode_batch_size,
                                           rank=state.process_index, world_size=state.num_processes,
                                           num_workers=args.dataloader_num_workers, stats=fill_stats)
        # Returns once every rank has finished its share, so all shards are on disk.
        bad = _merge_rank_failures(gather_object([(sorted(failed), fill_stats.to_dict())]), stats)
        cache.refresh()
        lost = [i for i in unique if i not in cache and i not in bad]
        if lost:
            raise OfaconvError(f"{len(lost)} image features written by other ranks are not visible here "
                               f"(e.g. {lost[0]}); lit.cache_dir must be on a filesystem all ranks share",
                               path=cache.dir)
        pairs = [p for p in pairs if p.image_id not in bad]
        stats.pairs = len(pairs)
    else:
        pairs = filter_decodable(pairs, store, stats)
    if not pairs:
        raise OfaconvError(f"no usable training pairs ({json.dumps(stats.to_dict())})")
    logger.info("training pairs: %s", stats.to_dict())

    model = LiTModel(clip_model, lock_image=lit.lock_image, lock_image_head=lit.lock_image_head)
    dataset = PairDataset(pairs, store, pkg.image_processor, cache)
    callbacks = list(callbacks or [])
    if lit.clamp_logit_scale is not None:
        callbacks.append(_clamp_callback(lit.clamp_logit_scale))
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=PairCollator(pkg.tokenizer, max_length), callbacks=callbacks)
    result = trainer.train(resume_from_checkpoint=resume)
    final = output_dir / "final"
    if state.is_main_process:
        pkg.max_length = max_length
        pkg.extra = {**pkg.extra, "trained_with": "ofaconv clip train (LiT)"}
        export_package(pkg, clip_model, final, source=Path(recipe.model),
                       training={"steps": result.global_step, "train_loss": result.training_loss,
                                 "data": stats.to_dict()})
        (output_dir / "data_stats.json").write_text(json.dumps(stats.to_dict(), indent=2) + "\n")
    state.wait_for_everyone()
    return {"output": str(final), "train_loss": result.training_loss, "steps": result.global_step,
            "data": stats.to_dict(), "cached": cache is not None}
