"""``finetune(recipe)``: one LiT (or full) finetuning run from a recipe to a model folder.

Order of work: read the recipe; set up the Trainer arguments (this also joins the process group
under torchrun / accelerate launch); load or create the base model; read and check the data;
freeze; fill the encoder cache (each rank a share of the images); train with ``CaptionTrainer``;
evaluate; write the output folder on the main process.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from transformers import TrainerCallback, TrainingArguments

from ofaconv.core.errors import DataError, OfaconvError
from ofaconv.core.images import ImageDecodeError
from ofaconv.core.writer import check_output
from .base import BaseModel, init_random_folder, load_base
from .batching import CaptionCollator, CaptionDataset, CaptionSampler, global_batch_size, tokenize_targets
from .cache import EncoderCache, encoder_fingerprint
from .data import CaptionSet, DataIssues, load_split, split_holdout
from .engine import CaptionTrainer, EngineSetup, generate_captions
from .lit import apply_freezing
from .recipe import TRAINING_DEFAULTS, Recipe, cache_enabled, load_recipe

logger = logging.getLogger("ofaconv.ofa.finetune")

__all__ = ["finetune", "FinetuneResult", "training_arguments"]


@dataclass
class FinetuneResult:
    output_dir: Path
    metrics: dict
    report: dict | None
    epoch_seconds: list
    epoch_cpu_seconds: list


def _say(args: TrainingArguments, message: str) -> None:
    if args.process_index == 0:
        print(f"[ofaconv finetune] {message}", flush=True)


def training_arguments(recipe: Recipe) -> tuple[TrainingArguments, list[str]]:
    """``TrainingArguments`` from the recipe's ``training:`` section plus the engine's settings."""
    notes = []
    values = {**TRAINING_DEFAULTS, **recipe.training}
    if not torch.cuda.is_available():
        values.setdefault("dataloader_pin_memory", False)
        if not torch.backends.mps.is_available():
            # Without it, accelerate ignores a torchrun process group on CPU (gloo) and each rank trains alone.
            values.setdefault("use_cpu", True)
        if values.get("fp16"):
            values["fp16"] = False
            notes.append("fp16 mixed precision needs a GPU; training in fp32 on the CPU "
                         "(training.bf16=true is the CPU's mixed precision where it has bf16 instructions)")
    has_eval = recipe.data.eval is not None or recipe.data.eval_fraction > 0 or (
        recipe.data.synthetic is not None and recipe.data.synthetic.eval_images > 0
    )
    if not has_eval:
        if values.get("eval_strategy", "no") != "no":
            notes.append(f"no held-out data (data.eval is not set): training.eval_strategy "
                         f"{values['eval_strategy']!r} does not apply")
        values["eval_strategy"] = "no"
        values.pop("load_best_model_at_end", None)
    values.setdefault("eval_strategy", "epoch" if has_eval else "no")
    if values.get("eval_strategy") == "steps" and values.get("eval_steps") is None:
        values["eval_steps"] = values.get("save_steps")
    try:
        args = TrainingArguments(
            output_dir=str(recipe.resolved_checkpoint_dir()),
            label_names=["labels"],
            **values,
        )
    except (TypeError, ValueError) as exc:
        raise OfaconvError(f"invalid training settings: {' '.join(str(exc).split())}", path=recipe.source,
                           key="training") from None
    return args, notes


class _JsonlLog(TrainerCallback):
    """Append every log entry (loss, learning rate, eval metrics) to ``training_log.jsonl``."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({**logs, "step": state.global_step}, sort_keys=True) + "\n")


class _EpochTimer(TrainerCallback):
    """Wall and process CPU seconds of every epoch (CPU time resists a shared machine's noise)."""

    def __init__(self, wall: list, cpu: list):
        self.wall, self.cpu = wall, cpu
        self.start = None

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.start = (time.perf_counter(), time.process_time())

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.start is not None:
            self.wall.append(time.perf_counter() - self.start[0])
            self.cpu.append(time.process_time() - self.start[1])


def _image_loader(base: BaseModel, data: CaptionSet):
    image_processor = base.processor.image_processor

    def load(image_id: str) -> torch.Tensor:
        image = data.images.open(image_id)
        return image_processor(image, return_tensors="pt")["patch_images"][0]

    return load


def _synthetic_splits(recipe: Recipe, args: TrainingArguments):
    from .synthetic import write_shapes_split

    spec = recipe.data.synthetic
    folder = recipe.resolved_checkpoint_dir() / "synthetic-data"
    stamp = json.dumps(spec.__dict__, sort_keys=True)
    marker = folder / "spec.json"
    with args.main_process_first(desc="synthetic data"):
        # Written once per spec: rewriting would change the files' identity and the cache keys.
        if args.process_index == 0 and not (marker.is_file() and marker.read_text() == stamp):
            write_shapes_split(folder, "train", spec.train_images, image_size=spec.image_size,
                               captions_per_image=spec.captions_per_image, seed=spec.seed)
            if spec.eval_images:
                write_shapes_split(folder, "eval", spec.eval_images, image_size=spec.image_size,
                                   captions_per_image=spec.captions_per_image, seed=spec.seed + 7919)
            marker.write_text(stamp)
    train = (folder / "train.jsonl", folder / "train.tsv")
    evals = (folder / "eval.jsonl", folder / "eval.tsv") if spec.eval_images else None
    return train, evals


def _check_data_files(recipe: Recipe) -> None:
    """The data files exist, checked before the model is loaded (a missing one names its recipe key)."""
    data = recipe.data
    if data.synthetic is not None:
        return
    splits = [("data.train", data.train, "point it at the training data")]
    if data.eval is not None and data.eval.captions:
        splits.append(("data.eval", data.eval, "point it at the held-out data, or set data.eval: null to train "
                       "without held-out evaluation"))
    for key, spec, advice in splits:
        for name in ("captions", "images"):
            path = getattr(spec, name)
            if path is not None and not Path(path).exists():
                raise DataError(f"not found; {advice}", path=path, key=f"{key}.{name}")


def _load_data(recipe: Recipe, args: TrainingArguments, issues: DataIssues) -> tuple[CaptionSet, CaptionSet | None]:
    from .recipe import DataConfig, SplitSpec

    data_cfg: DataConfig = recipe.data
    train_spec, eval_spec = data_cfg.train, data_cfg.eval
    if data_cfg.synthetic is not None:
        (tj, tt), evals = _synthetic_splits(recipe, args)
        data_cfg = DataConfig(**{**data_cfg.__dict__, "format": "muge"})
        train_spec = SplitSpec(str(tj), str(tt))
        eval_spec = SplitSpec(str(evals[0]), str(evals[1])) if evals else None
    train = load_split(train_spec, data_cfg, issues, "train")
    evaluation = None
    if eval_spec is not None and eval_spec.captions:
        evaluation = load_split(eval_spec, data_cfg, issues, "eval")
    elif data_cfg.eval_fraction > 0:
        train, evaluation = split_holdout(train, data_cfg.eval_fraction, seed=args.seed)
    return train, evaluation


def _probe_batch(base: BaseModel, prompt_ids: torch.Tensor, target: list[int]) -> dict:
    size = base.image_size
    return {
        "input_ids": prompt_ids.unsqueeze(0),
        "patch_images": torch.zeros(1, 3, size, size),
        "patch_masks": torch.ones(1, dtype=torch.bool),
        "decoder_input_ids": torch.tensor([[base.model.config.decoder_start_token_id, *target[:-1]]]),
    }


def _image_settings(base: BaseModel) -> dict:
    ip = base.processor.image_processor
    return {"size": ip.size, "resample": ip.resample, "mean": list(ip.image_mean), "std": list(ip.image_std),
            "class": type(ip).__name__}


def _fill_cache(recipe, args, base, prompt_ids, splits, issues) -> tuple[EncoderCache, dict]:
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    device = args.device
    autocast = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else None
    fp = encoder_fingerprint(base.model.get_encoder(), prompt_ids=prompt_ids.tolist(),
                             image_settings=_image_settings(base),
                             compute_dtype=str(autocast or torch.float32))
    root = Path(recipe.encoder_cache.dir) if recipe.encoder_cache.dir else recipe.resolved_checkpoint_dir() / "encoder-cache"
    with args.main_process_first(desc="encoder cache"):
        cache = EncoderCache(root, fp, dtype=recipe.encoder_cache.dtype)
    encoder = base.model.get_encoder().to(device)
    stats = {"dir": str(cache.states.dir.parent.parent), "fingerprint": fp, "dtype": recipe.encoder_cache.dtype,
             "computed": 0, "seconds": 0.0}
    failed: dict[str, set] = {}
    for data in splits:
        items = [(data.images.cache_key(i), i) for i in data.image_ids]
        share = items[state.process_index :: state.num_processes]
        local = DataIssues()
        result = cache.fill(encoder, share, _image_loader(base, data), prompt_ids,
                            batch_size=recipe.encoder_cache.batch_size, device=device, autocast_dtype=autocast,
                            issues=local, progress=state.is_main_process and not args.disable_tqdm,
                            num_workers=args.dataloader_num_workers)
        stats["computed"] += result["computed"]
        stats["seconds"] += result["seconds"]
        parts = gather_object([(result["failed"], local.as_dict())]) if state.num_processes > 1 else [
            (result["failed"], local.as_dict())]
        failed[data.name] = set()
        for ids, part in parts:
            failed[data.name].update(ids)
            issues.merge(part)
    state.wait_for_everyone()
    cache.refresh()
    stats["size_bytes"] = cache.size_bytes()
    stats["failed"] = {k: sorted(v) for k, v in failed.items()}
    return cache, stats


def finetune(
    recipe: str | os.PathLike | Mapping | Recipe,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    *,
    smoke: bool = False,
) -> FinetuneResult:
    """Run a recipe; returns the output folder, final metrics and the report written there."""
    started = time.perf_counter()
    recipe = load_recipe(recipe, overrides, smoke=smoke)
    args, notes = training_arguments(recipe)
    _check_data_files(recipe)
    # The output is written at the end; a folder it may not replace is refused before hours of training.
    check_output(recipe.output_dir, force=True, protect=[recipe.model], busy=args.process_index == 0)
    from transformers import set_seed

    set_seed(args.seed)
    for note in notes:
        _say(args, note)
    checkpoint_dir = recipe.resolved_checkpoint_dir()

    # -- data (read first: a data error is found in seconds, before the model is loaded) ---------
    issues = DataIssues()
    train_data, eval_data = _load_data(recipe, args, issues)

    # -- model ------------------------------------------------------------------------------
    if recipe.model_init is not None:
        with args.main_process_first(desc="random init"):
            folder = init_random_folder(recipe.model_init, checkpoint_dir / "base-model")
    else:
        folder = Path(recipe.model)
    base = load_base(folder)
    tokenizer = base.tokenizer
    prompt = recipe.prompt if recipe.prompt is not None else (getattr(base.processor, "prompt", None) or "")
    if not prompt:
        from ofaconv.ofa.variants import family_info

        prompt = family_info(base.family)["prompt"]
    prompt_ids = torch.tensor(tokenizer(prompt)["input_ids"], dtype=torch.long)
    _say(args, f"model {folder} ({base.family}), prompt {prompt!r}")

    eos = base.model.config.eos_token_id
    max_len = recipe.data.max_target_length

    # -- freezing -----------------------------------------------------------------------------
    model = base.model
    first_target = tokenize_targets(tokenizer, train_data.captions[:1], max_len, eos)[0]
    probe = _probe_batch(base, prompt_ids, first_target)
    freeze = apply_freezing(
        model, freeze_encoder=recipe.freeze_encoder, freeze_word_embed=recipe.freeze_word_embed,
        freeze_batchnorm=recipe.freeze_batchnorm,
        probe=lambda m: m(**probe, use_cache=False).logits.float().sum(),
    )
    _say(args, f"{freeze.trainable:,} trainable parameters, {freeze.frozen:,} frozen"
               + (f" ({len(freeze.unused)} tensors unused by captioning)" if freeze.unused else ""))

    # -- encoder outputs ----------------------------------------------------------------------
    use_cache = cache_enabled(recipe)
    mode = "cache" if use_cache else ("frozen" if recipe.freeze_encoder and recipe.freeze_word_embed else "full")
    cache, cache_stats = None, None
    if use_cache:
        splits = [train_data] + ([eval_data] if eval_data is not None else [])
        cache, cache_stats = _fill_cache(recipe, args, base, prompt_ids, splits, issues)
        _say(args, f"encoder cache: {cache_stats['computed']} images computed in {cache_stats['seconds']:.1f}s, "
                   f"{cache_stats['size_bytes'] / 2**20:.1f} MiB at {cache_stats['dir']}")
        train_failed = set(cache_stats["failed"].get("train", ()))
        if train_failed:
            train_data = train_data.select_images([i for i in train_data.image_ids if i not in train_failed])
        if eval_data is not None and cache_stats["failed"].get("eval"):
            bad = set(cache_stats["failed"]["eval"])
            eval_data = eval_data.select_images([i for i in eval_data.image_ids if i not in bad])
    model.to(args.device)

    # -- datasets -----------------------------------------------------------------------------
    train_targets = tokenize_targets(tokenizer, train_data.captions, max_len, eos)
    train_set = CaptionDataset(train_data, train_targets)
    pad, bos = base.model.config.pad_token_id, base.model.config.decoder_start_token_id

    def collator_for(data: CaptionSet) -> CaptionCollator:
        if use_cache:
            keys = {i: data.images.cache_key(i) for i in data.image_ids}
            pos = cache.position_embedding
            return CaptionCollator(data, pad_id=pad, bos_id=bos, image_source="cache",
                                   cache_lookup=lambda ids: cache.get_many([keys[i] for i in ids]),
                                   dummy_shape=tuple(pos.shape))
        size = base.image_size
        return CaptionCollator(data, pad_id=pad, bos_id=bos, image_source="pixels",
                               load_image=_image_loader(base, data), dummy_shape=(3, size, size))

    sampler = CaptionSampler(
        train_set.lengths, train_data.pair_images, strategy=recipe.sampler, global_batch_size=global_batch_size(args),
        bucket_batches=recipe.bucket_size, seed=args.seed,
    )
    eval_set = eval_collator = None
    references = {}
    caption_eval = None
    if eval_data is not None and len(eval_data):
        eval_set = CaptionDataset(eval_data, tokenize_targets(tokenizer, eval_data.captions, max_len, eos))
        eval_collator = collator_for(eval_data)
        references = eval_data.references()
        caption_eval = _caption_evaluator(recipe, base, eval_data, cache, prompt_ids)
    elif args.eval_strategy != "no":
        raise DataError(
            "no held-out image/caption pair is left to evaluate on (every held-out image was skipped, or "
            "data.eval_fraction holds out none); fix the held-out data, or set data.eval: null to train without "
            "evaluation", path=recipe.source, key="data.eval")

    setup = EngineSetup(
        sampler=sampler,
        prompt_ids=prompt_ids,
        encoder_mode=mode,
        label_smoothing=float(recipe.label_smoothing),
        share_encoder_rows=recipe.share_encoder_rows,
        pad_free_logits=recipe.pad_free_logits,
        position_embedding=cache.position_embedding if use_cache else None,
        eval_dataset=eval_set,
        eval_collator=eval_collator,
        caption_eval=caption_eval,
        references=references,
        family=base.family,
    )
    trainer = CaptionTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        data_collator=collator_for(train_data),
        processing_class=None,
        setup=setup,
        callbacks=[_JsonlLog(checkpoint_dir / "training_log.jsonl"), _EpochTimer(setup.epoch_seconds, setup.epoch_cpu_seconds)],
    )
    _say(args, f"{len(train_set)} training pairs over {len(train_data.image_ids)} images"
               + (f", {len(eval_set)} held-out pairs" if eval_set is not None else "")
               + f"; encoder: {mode}; sampler: {recipe.sampler}; global batch {global_batch_size(args)}")

    resume = recipe.resume_from_checkpoint
    if resume is True:
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None
        if resume is None:
            _say(args, "no checkpoint to resume from; starting fresh")
    train_output = trainer.train(resume_from_checkpoint=resume or None)
    metrics = dict(train_output.metrics)
    if eval_set is not None:
        # An eval_strategy that already evaluated the final weights (epoch end = training end) is not
        # repeated: at MUGE size one evaluation is minutes of beam search.
        last = next((entry for entry in reversed(trainer.state.log_history) if "eval_loss" in entry), None)
        if last is not None and last.get("step") == trainer.state.global_step:
            metrics.update({k: v for k, v in last.items() if k.startswith("eval_")})
        else:
            metrics.update(trainer.evaluate())

    # -- data issues from every rank ------------------------------------------------------------
    all_issues = DataIssues()
    all_issues.merge(issues)
    if args.world_size > 1:
        from accelerate.utils import gather_object

        for part in gather_object([setup.data_issues.as_dict()]):
            all_issues.merge(part)
    else:
        all_issues.merge(setup.data_issues)
    for line in all_issues.summary():
        _say(args, line)

    report = None
    if args.process_index == 0:
        from .output import write_finetuned

        training = {
            "recipe": recipe.source,
            "settings": recipe.to_dict(),
            "base_model": str(folder),
            "prompt": prompt,
            "encoder": mode,
            "encoder_cache": cache_stats,
            "freezing": freeze.as_dict(),
            "data": {
                "train_pairs": len(train_set),
                "train_images": len(train_data.image_ids),
                "eval_pairs": len(eval_set) if eval_set is not None else 0,
                "eval_images": len(eval_data.image_ids) if eval_data is not None else 0,
                "skipped": all_issues.as_dict(),
            },
            "global_batch_size": global_batch_size(args),
            "world_size": args.world_size,
            "global_steps": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "epoch_seconds": setup.epoch_seconds,
            "epoch_cpu_seconds": setup.epoch_cpu_seconds,
            "metrics": metrics,
            "wall_seconds": round(time.perf_counter() - started, 2),
        }
        # Without the mixed-precision wrapper: the reload check compares fp32 logits with fp32 logits.
        unwrapped = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        report = write_finetuned(unwrapped, base, recipe.output_dir, prompt=prompt, probe=probe, training=training,
                                 log_history=trainer.state.log_history)
        verdict = "all checks passed" if report["passed"] else "CHECKS FAILED: " + ", ".join(
            c["name"] for c in report["checks"] if not c["passed"])
        _say(args, f"wrote {recipe.output_dir} ({verdict})")
    trainer.accelerator.wait_for_everyone()
    return FinetuneResult(Path(recipe.output_dir), metrics, report, setup.epoch_seconds, setup.epoch_cpu_seconds)


def _caption_evaluator(recipe: Recipe, base: BaseModel, data: CaptionSet, cache, prompt_ids):
    """Captions for (this rank's share of) the first ``max_eval_images`` held-out images."""
    from ofaconv.ofa.modeling import OFAEncoderOutput

    limit = recipe.data.max_eval_images
    image_ids = data.image_ids if limit is None else data.image_ids[:limit]
    load = _image_loader(base, data)

    def evaluate(trainer: CaptionTrainer, model) -> dict:
        share = image_ids[trainer.args.process_index :: trainer.args.world_size]
        batch_size = trainer.args.per_device_eval_batch_size
        device = trainer.args.device
        out: dict = {}
        for start in range(0, len(share), batch_size):
            ids = share[start : start + batch_size]
            if cache is not None:
                states, masks = cache.get_many([data.images.cache_key(i) for i in ids])
                pos = cache.position_embedding
                encoder_outputs = OFAEncoderOutput(
                    last_hidden_state=states.to(device), padding_mask=masks.to(device),
                    position_embedding=pos.to(device).unsqueeze(0).expand(len(ids), -1, -1).contiguous(),
                )
            else:
                pixels, kept = [], []
                for image_id in ids:
                    try:
                        pixels.append(load(image_id))
                        kept.append(image_id)
                    except ImageDecodeError:
                        continue
                if not kept:
                    continue
                ids = kept
                pixels = torch.stack(pixels).to(device)
                prompt = prompt_ids.to(device).unsqueeze(0).expand(len(ids), -1)
                with trainer.accelerator.autocast():
                    encoder_outputs = model.get_encoder()(
                        input_ids=prompt, patch_images=pixels,
                        patch_masks=torch.ones(len(ids), dtype=torch.bool, device=device))
            with trainer.accelerator.autocast():
                captions = generate_captions(model, encoder_outputs, prompt_ids, base.tokenizer, base.family,
                                             dict(recipe.generation))
            out.update(zip(ids, captions))
        return out

    return evaluate
