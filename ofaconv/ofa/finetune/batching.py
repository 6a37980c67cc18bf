"""Training examples, their order (samplers) and batches (collators).

An example is one (image, caption) pair, already tokenized: the decoder input is
``<s> + bpe(" " + caption)`` and the target ``bpe(" " + caption) + </s>`` (fairseq's caption
task), truncated to ``max_target_length`` tokens. Batches pad targets with -100 (ignored by the
loss) and decoder inputs with ``<pad>``, to the longest caption of the batch.

A batch carries each of its images once (``image_index`` maps rows to images): either cached
encoder states or preprocessed pixels. Images that fail to decode are dropped from the batch and
reported with it; a batch whose every image failed becomes one fully ignored row, so every rank
still runs a step.

Samplers order examples identically whatever the number of processes, so a run on N processes
sees the same global batches as a run on one with N times the batch:

- ``random``: a fresh permutation of the pairs every epoch (the seed's order);
- ``length``: permutation, then captions of similar length grouped into the same global batch
  (less padding);
- ``image``: all captions of an image consecutive, images permuted; the decoder then projects
  each image's encoder states once per batch (``lit.shared_encoder_rows``).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from .data import CaptionSet, DataIssues, ImageDecodeError

__all__ = ["tokenize_targets", "CaptionDataset", "CaptionSampler", "CaptionCollator"]

IGNORE_INDEX = -100


def tokenize_targets(tokenizer, captions: Sequence[str], max_length: int, eos_id: int, chunk: int = 4096) -> list[list[int]]:
    """``bpe(" " + caption)[: max_length - 1] + [eos]`` for every caption."""
    out: list[list[int]] = []
    for start in range(0, len(captions), chunk):
        batch = [" " + c for c in captions[start : start + chunk]]
        ids = tokenizer(batch, add_special_tokens=False, truncation=True, max_length=max_length - 1)["input_ids"]
        out.extend(list(x[: max_length - 1]) + [eos_id] for x in ids)
    return out


class CaptionDataset(Dataset):
    """Pair i -> ``{"image": image index, "target": token ids}``."""

    def __init__(self, data: CaptionSet, targets: list[list[int]]):
        if len(targets) != len(data):
            raise ValueError(f"{len(targets)} targets for {len(data)} pairs")
        self.data = data
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.data.pair_images[i], "target": self.targets[i]}

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.targets]


class CaptionSampler(Sampler):
    """Example order per epoch, deterministic in (seed, epoch) and independent of the world size."""

    def __init__(
        self,
        lengths: Sequence[int],
        pair_images: Sequence[int],
        *,
        strategy: str = "random",
        global_batch_size: int = 1,
        bucket_batches: int = 64,
        seed: int = 0,
    ):
        self.lengths = list(lengths)
        self.pair_images = list(pair_images)
        self.strategy = strategy
        self.global_batch_size = max(1, int(global_batch_size))
        self.bucket_batches = max(1, int(bucket_batches))
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(self.order(self.epoch))

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.lengths)
        if self.strategy == "random":
            return torch.randperm(n, generator=g).tolist()
        if self.strategy == "length":
            perm = torch.randperm(n, generator=g).tolist()
            size = self.global_batch_size * self.bucket_batches
            batches = []
            for start in range(0, n, size):
                bucket = sorted(perm[start : start + size], key=lambda i: -self.lengths[i])
                batches += [bucket[k : k + self.global_batch_size] for k in range(0, len(bucket), self.global_batch_size)]
            # Keep the short final batch last; shuffle the full ones.
            full = [b for b in batches if len(b) == self.global_batch_size]
            rest = [b for b in batches if len(b) != self.global_batch_size]
            shuffled = [full[i] for i in torch.randperm(len(full), generator=g).tolist()]
            return [i for b in shuffled + rest for i in b]
        if self.strategy == "image":
            groups: dict[int, list[int]] = {}
            for i in torch.randperm(n, generator=g).tolist():
                groups.setdefault(self.pair_images[i], []).append(i)
            keys = list(groups)
            return [i for k in torch.randperm(len(keys), generator=g).tolist() for i in groups[keys[k]]]
        raise ValueError(f"unknown sampler strategy {self.strategy!r}")


class CaptionCollator:
    """Pads targets and attaches each distinct image of the batch once.

    ``image_source``: ``"cache"`` (``cache_lookup(image ids) -> (states, masks)``) or ``"pixels"``
    (``load_image(image id) -> [3, S, S]``, may raise ``ImageDecodeError``).
    """

    def __init__(
        self,
        data: CaptionSet,
        *,
        pad_id: int,
        bos_id: int,
        image_source: str,
        cache_lookup: Callable | None = None,
        load_image: Callable | None = None,
        dummy_shape: tuple | None = None,
    ):
        self.data = data
        self.pad_id = pad_id
        self.bos_id = bos_id
        self.image_source = image_source
        self.cache_lookup = cache_lookup
        self.load_image = load_image
        self.dummy_shape = dummy_shape  # [L, d] for the cache, [3, S, S] for pixels

    def __call__(self, items: list[dict]) -> dict:
        issues = DataIssues()
        unique: dict[int, int] = {}
        order: list[int] = []
        for item in items:
            if item["image"] not in unique:
                unique[item["image"]] = len(order)
                order.append(item["image"])
        image_ids = [self.data.image_ids[i] for i in order]
        batch: dict = {}
        keep_images = list(range(len(order)))
        if self.image_source == "cache":
            states, masks = self.cache_lookup(image_ids)
            batch["encoder_hidden_states"], batch["encoder_padding_mask"] = states, masks
        else:
            pixels, keep_images = [], []
            for n, image_id in enumerate(image_ids):
                try:
                    pixels.append(self.load_image(image_id))
                    keep_images.append(n)
                except ImageDecodeError as exc:
                    issues.add("undecodable_image", exc.where)
            if pixels:
                batch["patch_images"] = torch.stack(pixels)
        renumber = {old: new for new, old in enumerate(keep_images)}
        rows = [(renumber[unique[item["image"]]], item["target"]) for item in items if unique[item["image"]] in renumber]
        if not rows:  # every image failed: one ignored row keeps all ranks in step
            rows = [(0, [IGNORE_INDEX])]
            if self.image_source == "cache":
                batch["encoder_hidden_states"] = torch.zeros((1, *self.dummy_shape))
                batch["encoder_padding_mask"] = torch.zeros((1, self.dummy_shape[0]), dtype=torch.bool)
            else:
                batch["patch_images"] = torch.zeros((1, *self.dummy_shape))
        length = max(len(t) for _, t in rows)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        decoder_input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        for r, (_, target) in enumerate(rows):
            if target == [IGNORE_INDEX]:
                decoder_input_ids[r, 0] = self.bos_id
                continue
            labels[r, : len(target)] = torch.tensor(target)
            decoder_input_ids[r, 0] = self.bos_id
            decoder_input_ids[r, 1 : len(target)] = torch.tensor(target[:-1])
        batch["labels"] = labels
        batch["decoder_input_ids"] = decoder_input_ids
        batch["image_index"] = torch.tensor([r for r, _ in rows], dtype=torch.long)
        if issues.total():
            batch["data_issues"] = issues.as_dict()
        return batch


def global_batch_size(args) -> int:
    """Examples per optimizer step over all processes."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)


def steps_per_epoch(num_examples: int, args) -> int:
    return math.ceil(num_examples / global_batch_size(args))
