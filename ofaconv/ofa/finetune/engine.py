"""The training engine: a ``transformers.Trainer`` that knows how OFA captions are trained.

Everything the Trainer already does is kept (mixed precision, warmup + cosine schedule, gradient
accumulation and clipping, checkpoints with exact resume, DDP under ``torchrun`` /
``accelerate launch``, progress bar, logging callbacks). What changes:

- the loss (``compute_loss``): pad-free token cross-entropy normalised over the whole accumulated
  and distributed batch, with the encoder output taken from the cache, from a no-grad encoder
  pass over each distinct image of the batch (frozen encoder), or from the full model (full
  finetuning);
- the order of examples (``_get_train_sampler``): ``CaptionSampler``;
- evaluation (``evaluate``): token-weighted loss on the held-out pairs plus BLEU-4 / CIDEr-D /
  exact match of captions generated with the fairseq-exact beam search (``generate_captions``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from .data import DataIssues
from .lit import caption_loss, logits_at_targets, shared_encoder_rows
from .metrics import caption_metrics

logger = logging.getLogger(__name__)

__all__ = ["CaptionTrainer", "EngineSetup", "generate_captions"]


def generate_captions(model, encoder_outputs, prompt_ids: torch.Tensor, tokenizer, family: str,
                      generation: dict) -> list[str]:
    """Captions from encoder outputs with the model's fairseq-exact search (one place to switch)."""
    from ofaconv.ofa.modeling.tokenization_ofa import decode_captions

    bsz = encoder_outputs.last_hidden_state.shape[0]
    input_ids = prompt_ids.to(encoder_outputs.last_hidden_state.device).unsqueeze(0).expand(bsz, -1)
    sequences = model.generate(input_ids=input_ids, encoder_outputs=encoder_outputs, **generation)
    return decode_captions(tokenizer, sequences, family)


@dataclass
class EngineSetup:
    """What the engine needs besides the Trainer's own arguments."""

    sampler: torch.utils.data.Sampler
    prompt_ids: torch.Tensor  # [S] the encoder prompt
    encoder_mode: str  # "cache" | "frozen" | "full"
    label_smoothing: float = 0.0
    share_encoder_rows: bool = True
    pad_free_logits: bool = True
    position_embedding: torch.Tensor | None = None  # [L, d] (cache mode)
    eval_dataset: torch.utils.data.Dataset | None = None
    eval_collator: Callable | None = None
    caption_eval: Callable | None = None  # (trainer, model) -> {image id: caption} on this rank's share
    references: dict = field(default_factory=dict)
    family: str = "cn"
    data_issues: DataIssues = field(default_factory=DataIssues)
    epoch_seconds: list = field(default_factory=list)
    epoch_cpu_seconds: list = field(default_factory=list)


class CaptionTrainer(Trainer):
    def __init__(self, *args, setup: EngineSetup, **kwargs):
        # evaluate() reads the held-out pairs from ``setup``; the Trainer is told of them too, since it
        # refuses an eval_strategy other than "no" without an eval_dataset.
        kwargs.setdefault("eval_dataset", setup.eval_dataset)
        super().__init__(*args, **kwargs)
        self.setup = setup
        # compute_loss normalises by the token count of the accumulated (and gathered) batch.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True

    # -- data ---------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        return self.setup.sampler

    def floating_point_ops(self, inputs) -> int:
        return 0

    # -- loss ---------------------------------------------------------------------------------
    def _encoder_outputs(self, model, inputs: dict):
        """Encoder outputs for every row of the batch, or None when the model must run its encoder."""
        from ofaconv.ofa.modeling import OFAEncoderOutput

        index = inputs["image_index"]
        if self.setup.encoder_mode == "cache":
            states = inputs["encoder_hidden_states"]
            mask = inputs["encoder_padding_mask"]
            pos = self.setup.position_embedding.to(states.device, states.dtype)
            return OFAEncoderOutput(
                last_hidden_state=states.index_select(0, index),
                padding_mask=mask.index_select(0, index),
                position_embedding=pos.unsqueeze(0).expand(index.numel(), -1, -1),
            )
        if self.setup.encoder_mode == "frozen":
            pixels = inputs["patch_images"]
            encoder = self.accelerator.unwrap_model(model).get_encoder()
            prompt = self.setup.prompt_ids.to(pixels.device).unsqueeze(0).expand(pixels.shape[0], -1)
            with torch.no_grad(), self.accelerator.autocast():
                out = encoder(input_ids=prompt, patch_images=pixels,
                              patch_masks=torch.ones(pixels.shape[0], dtype=torch.bool, device=pixels.device))
            return OFAEncoderOutput(
                last_hidden_state=out.last_hidden_state.index_select(0, index),
                padding_mask=out.padding_mask.index_select(0, index),
                position_embedding=out.position_embedding.index_select(0, index),
            )
        return None

    def caption_forward(self, model, inputs: dict):
        """(summed loss, summed NLL, target tokens) of a collated batch."""
        index = inputs["image_index"]
        labels = inputs["labels"]
        decoder_input_ids = inputs["decoder_input_ids"]
        encoder_outputs = self._encoder_outputs(model, inputs)
        unwrapped = self.accelerator.unwrap_model(model)
        with contextlib.ExitStack() as stack:
            if self.setup.pad_free_logits:
                stack.enter_context(logits_at_targets(unwrapped, labels.ne(-100)))
            if encoder_outputs is None:
                pixels = inputs["patch_images"].index_select(0, index)
                prompt = self.setup.prompt_ids.to(pixels.device).unsqueeze(0).expand(index.numel(), -1)
                out = model(input_ids=prompt, patch_images=pixels,
                            patch_masks=torch.ones(index.numel(), dtype=torch.bool, device=pixels.device),
                            decoder_input_ids=decoder_input_ids, use_cache=False)
            else:
                if self.setup.share_encoder_rows:
                    num_images = int(index.max().item()) + 1 if index.numel() else 0
                    stack.enter_context(shared_encoder_rows(unwrapped, index, num_images))
                out = model(decoder_input_ids=decoder_input_ids, encoder_outputs=encoder_outputs, use_cache=False)
        return caption_loss(out.logits, labels, label_smoothing=self.setup.label_smoothing)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        issues = inputs.pop("data_issues", None)
        if issues:
            self.setup.data_issues.merge(issues)
        loss_sum, _, count = self.caption_forward(model, inputs)
        denominator = num_items_in_batch if num_items_in_batch is not None else count
        if torch.is_tensor(denominator):
            denominator = denominator.to(loss_sum.device).clamp(min=1)
        else:
            denominator = max(int(denominator), 1)
        loss = loss_sum / denominator
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # DDP averages gradients over ranks; the denominator already counts every rank's tokens.
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    # -- evaluation ---------------------------------------------------------------------------
    def _rank_share(self, n: int) -> list[int]:
        return list(range(self.args.process_index, n, self.args.world_size))

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        start = time.perf_counter()
        model = self.model_wrapped if self.model_wrapped is not None else self.model
        was_training = model.training
        model.eval()
        metrics: dict = {}
        device = self.args.device
        if self.setup.eval_dataset is not None and len(self.setup.eval_dataset):
            subset = torch.utils.data.Subset(self.setup.eval_dataset, self._rank_share(len(self.setup.eval_dataset)))
            loader = DataLoader(subset, batch_size=self.args.per_device_eval_batch_size,
                                collate_fn=self.setup.eval_collator, num_workers=self.args.dataloader_num_workers)
            totals = torch.zeros(2, dtype=torch.float64, device=device)
            unwrapped = self.accelerator.unwrap_model(model)
            for batch in loader:
                batch.pop("data_issues", None)
                batch = self._prepare_inputs(batch)
                with self.accelerator.autocast():
                    _, nll, count = self.caption_forward(unwrapped, batch)
                totals += torch.stack([nll.double(), count.double()])
            if self.args.world_size > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            metrics[f"{metric_key_prefix}_loss"] = float(totals[0] / totals[1].clamp(min=1))
        if self.setup.caption_eval is not None:
            predictions = self.setup.caption_eval(self, self.accelerator.unwrap_model(model))
            if self.args.world_size > 1:
                from accelerate.utils import gather_object

                merged: dict = {}
                for part in gather_object([predictions]):
                    merged.update(part)
                predictions = merged
            if predictions:
                scores = caption_metrics(predictions, self.setup.references, self.setup.family)
                metrics.update({f"{metric_key_prefix}_{k}": v for k, v in scores.items()})
                self._last_predictions = predictions
        metrics[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - start, 4)
        model.train(was_training)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
