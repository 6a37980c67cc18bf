"""Encoder-output cache for LiT-tuning.

With the encoder frozen (in eval mode) and no image augmentation, the encoder output of an image
for the fixed prompt never changes: it is computed once per image and reused for every caption
and every epoch. Entries live in a ``FeatureCache`` (disk, safetensors, mmap) whose fingerprint
hashes the encoder's weights (the shared word embedding included: it embeds the prompt), the
prompt ids, the image preprocessing, the compute dtype and the modeling code, so any change to
those starts a fresh cache.

Per image the cache stores ``last_hidden_state`` [L, d] (fp32, or fp16/bf16 to halve the disk) and
``padding_mask`` [L]. ``position_embedding`` depends only on the image size and the prompt, not on
the pixels: it is stored once per cache, and every batch computed while filling the cache is
checked against it (``CacheError`` if an image ever disagrees).
"""

from __future__ import annotations

import hashlib
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import torch

from ofaconv.core.featcache import CacheError, FeatureCache, fingerprint
from .data import DataIssues, ImageDecodeError

logger = logging.getLogger(__name__)

__all__ = ["EncoderCache", "encoder_fingerprint"]

_POSITION_KEY = "__position_embedding__"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _modeling_digest() -> str:
    source = resources.files("ofaconv.ofa.modeling").joinpath("modeling_ofa.py").read_bytes()
    return hashlib.sha256(source).hexdigest()[:16]


def encoder_fingerprint(encoder: torch.nn.Module, *, prompt_ids: Sequence[int], image_settings: dict,
                        compute_dtype: str) -> str:
    """Hash of everything that determines an image's encoder output besides its pixels."""
    return fingerprint(
        encoder,
        prompt_ids=list(map(int, prompt_ids)),
        image=image_settings,
        compute_dtype=compute_dtype,
        modeling=_modeling_digest(),
    )


class EncoderCache:
    """``image key -> (last_hidden_state, padding_mask)`` plus the shared position embedding."""

    def __init__(self, root: str | os.PathLike, fp: str, *, dtype: str = "float32"):
        self.root = Path(root)
        self.fingerprint = fp
        self.states = FeatureCache(self.root, namespace="ofa-encoder-states", fingerprint=fp,
                                   dtype=_DTYPES[dtype], read_dtype=torch.float32)
        # Masks (bool) and the position embedding (fp32) are stored exactly as computed.
        self.aux = FeatureCache(self.root, namespace="ofa-encoder-aux", fingerprint=fp, dtype=None, read_dtype=None)
        self.dtype = dtype

    def __contains__(self, key: str) -> bool:
        return key in self.states and key in self.aux

    def missing(self, keys: Sequence[str]) -> list[str]:
        return [k for k in dict.fromkeys(keys) if k not in self]

    @property
    def position_embedding(self) -> torch.Tensor | None:
        if _POSITION_KEY not in self.aux:
            self.aux.refresh()
        if _POSITION_KEY not in self.aux:
            return None
        return self.aux.get(_POSITION_KEY)

    def refresh(self) -> None:
        self.states.refresh()
        self.aux.refresh()

    def get_many(self, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """([P, L, d] float32 states, [P, L] bool padding masks)."""
        return self.states.get_many(keys), self.aux.get_many(keys)

    def size_bytes(self) -> int:
        return self.states.size_bytes() + self.aux.size_bytes()

    @torch.no_grad()
    def fill(
        self,
        encoder: torch.nn.Module,
        items: Sequence[tuple[str, str]],
        load: Callable[[str], torch.Tensor],
        prompt_ids: torch.Tensor,
        *,
        batch_size: int = 32,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
        issues: DataIssues | None = None,
        progress: bool = False,
        num_workers: int = 0,
    ) -> dict:
        """Compute and store the entries of ``items`` = [(cache key, image id)] that are missing.

        ``load(image_id)`` returns the preprocessed image [3, S, S] or raises ``ImageDecodeError``
        (counted in ``issues``, skipped). Returns ``{"computed", "failed": [image ids], "seconds"}``.
        """
        import time

        from tqdm.auto import tqdm

        issues = issues if issues is not None else DataIssues()
        todo = [(k, i) for k, i in items if k not in self]
        encoder.eval()
        device = torch.device(device)
        start = time.perf_counter()
        failed: list[str] = []
        computed = 0
        loader = _ImageLoader(todo, load, batch_size, num_workers)
        bar = tqdm(total=len(todo), desc="encoder cache", unit="img", disable=not progress or not todo)
        reference = self.position_embedding
        for keys, pixels, bad in loader:
            for image_id, message in bad:
                failed.append(image_id)
                issues.add("undecodable_image", message)
            bar.update(len(bad))
            if not keys:
                continue
            pixels = pixels.to(device)
            ids = prompt_ids.to(device).unsqueeze(0).expand(len(keys), -1)
            ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else _null()
            with ctx:
                out = encoder(input_ids=ids, patch_images=pixels,
                              patch_masks=torch.ones(len(keys), dtype=torch.bool, device=device))
            pos = out.position_embedding.float().cpu()
            if reference is None:
                reference = pos[0].clone()
                self.aux.put(_POSITION_KEY, reference)
            if pos.shape[1:] != reference.shape or not torch.equal(pos, reference.expand_as(pos)):
                raise CacheError(
                    "encoder position embedding differs between images; the cache assumes it depends only on "
                    "the image size and the prompt", path=self.states.dir,
                )
            self.states.put_many(keys, out.last_hidden_state.float().cpu())
            self.aux.put_many(keys, out.padding_mask.cpu())
            computed += len(keys)
            bar.update(len(keys))
        bar.close()
        return {"computed": computed, "failed": failed, "seconds": time.perf_counter() - start}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _ImageLoader:
    """Batches of preprocessed images, decoded in DataLoader workers when asked."""

    def __init__(self, todo, load, batch_size, num_workers):
        self.todo, self.load, self.batch_size, self.num_workers = todo, load, batch_size, num_workers

    def __iter__(self):
        from torch.utils.data import DataLoader

        loader = DataLoader(
            _LoadDataset(self.todo, self.load), batch_size=self.batch_size, num_workers=self.num_workers,
            collate_fn=_collate_images,
        )
        yield from loader


class _LoadDataset(torch.utils.data.Dataset):
    def __init__(self, todo, load):
        self.todo, self.load = todo, load

    def __len__(self):
        return len(self.todo)

    def __getitem__(self, i):
        key, image_id = self.todo[i]
        try:
            return key, image_id, self.load(image_id), None
        except ImageDecodeError as exc:
            return key, image_id, None, exc.where


def _collate_images(batch):
    keys = [k for k, _, pixels, _ in batch if pixels is not None]
    pixels = [p for _, _, p, _ in batch if p is not None]
    bad = [(image_id, message) for _, image_id, p, message in batch if p is None]
    return keys, (torch.stack(pixels) if pixels else None), bad
