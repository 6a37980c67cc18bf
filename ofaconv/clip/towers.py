"""Runtime access to a CLIP package: load, pre-process, embed images and texts.

``ClipTowers.from_pretrained(path)`` accepts an ofaconv package folder (VTDE or ChineseCLIPModel),
any transformers VTDE / ChineseCLIPModel folder, a legacy BertCLIP folder or a Chinese-CLIP ``.pt``
(the last two are converted in memory). Text is truncated explicitly at the model's training
length (BertCLIP 100, Chinese-CLIP 52) and always sent with its attention mask; features are
unwrapped from the ``BaseModelOutputWithPooling`` that transformers 5 returns.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
from PIL import Image
from safetensors.torch import load_file

from ofaconv.core.errors import DataError, OfaconvError
from ofaconv.core.featcache import fingerprint
from ofaconv.core.images import ImageInput, open_image

__all__ = ["ClipTowers", "load_image", "sentence_transformers_encode"]

logger = logging.getLogger("ofaconv.clip")


def load_image(item) -> Image.Image:
    """A PIL RGB image from a PIL image, a path, raw bytes or an ``ImageInput``; ``ImageDecodeError``
    names the file."""
    return item.open() if isinstance(item, ImageInput) else open_image(item)


def _unwrap(out):
    return getattr(out, "pooler_output", out)


class ClipTowers:
    def __init__(self, model, image_processor, tokenizer, *, kind: str, max_length: int, path=None):
        self.model = model.eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.kind = kind
        self.max_length = max_length
        self.path = path
        self.last_truncated = 0

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, max_length: int | None = None,
                        arch: str | None = None, vocab: str | None = None) -> "ClipTowers":
        from .convert import load_package

        pkg, _, _, _ = load_package(path, arch=arch, vocab=vocab, max_length=max_length)
        model = pkg.build_model().to(device=device, dtype=dtype)
        return cls(model, pkg.image_processor, pkg.tokenizer, kind=pkg.kind, max_length=pkg.max_length, path=path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach())

    @property
    def vision_model(self):
        return self.model.vision_model

    def image_fingerprint(self, include_projection: bool = False) -> str:
        """Fingerprint of everything that decides an image embedding (weights + pre-processing)."""
        parts = dict(self.model.vision_model.state_dict())
        if include_projection:
            parts.update({f"visual_projection.{k}": v for k, v in self.model.visual_projection.state_dict().items()})
        return fingerprint(parts, processor=self.image_processor.to_dict(), projected=include_projection,
                           dtype=str(next(self.model.parameters()).dtype))

    # -- pre-processing ----------------------------------------------------------------------------
    def preprocess_images(self, images: Sequence) -> torch.Tensor:
        pil = [load_image(im) for im in images]
        return self.image_processor(images=pil, return_tensors="pt")["pixel_values"]

    def tokenize(self, texts: Sequence[str], *, padding="longest", max_length: int | None = None) -> dict:
        length = max_length or self.max_length
        texts = [str(t) for t in texts]
        if not texts:
            self.last_truncated = 0
            empty = torch.zeros(0, 0, dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty.clone()}
        # One encode pass: a truncated text also yields overflow rows, which count the truncation
        # and are dropped. Kept rows are exactly the plain truncated batch (a truncated row is
        # max_length long, so the padding length is the same).
        batch = self.tokenizer(texts, max_length=length, truncation=True, padding=padding, return_tensors="pt",
                               return_token_type_ids=False, return_overflowing_tokens=True)
        rows = batch.pop("overflow_to_sample_mapping", None)
        if rows is None:  # a tokenizer without overflow rows: probe one token further
            probe = self.tokenizer(texts, max_length=length + 1, truncation=True)["input_ids"]
            self.last_truncated = sum(len(ids) > length for ids in probe)
        else:
            first = torch.ones(len(rows), dtype=torch.bool)
            first[1:] = rows[1:] != rows[:-1]
            batch = {k: v[first] for k, v in batch.items()}
            self.last_truncated = int((torch.bincount(rows) > 1).sum())
        if self.last_truncated:
            logger.info("truncated %d of %d texts to %d tokens", self.last_truncated, len(texts), length)
        return dict(batch)

    # -- embedding ---------------------------------------------------------------------------------
    def pool_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Post-LayerNorm [CLS] of the vision tower (before visual_projection)."""
        return _unwrap(self.model.vision_model(pixel_values=pixel_values.to(self.device, self._dtype)))

    @property
    def _dtype(self):
        return next(self.model.parameters()).dtype

    # inference_mode skips autograd's version/view bookkeeping; the clone outside it hands back
    # ordinary tensors, which callers may still use as constants in a graph.
    def encode_pixels(self, pixel_values: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        with torch.inference_mode():
            feats = _unwrap(self.model.get_image_features(pixel_values=pixel_values.to(self.device, self._dtype)))
            if normalize:
                feats = torch.nn.functional.normalize(feats, dim=-1)
        return feats.clone()

    def encode_token_batch(self, batch: dict, *, normalize: bool = True) -> torch.Tensor:
        with torch.inference_mode():
            feats = _unwrap(self.model.get_text_features(
                input_ids=batch["input_ids"].to(self.device), attention_mask=batch["attention_mask"].to(self.device)))
            if normalize:
                feats = torch.nn.functional.normalize(feats, dim=-1)
        return feats.clone()

    def encode_images(self, images: Iterable, *, batch_size: int = 64, normalize: bool = True) -> torch.Tensor:
        out, chunk = [], []
        for im in images:
            chunk.append(im)
            if len(chunk) == batch_size:
                out.append(self.encode_pixels(self.preprocess_images(chunk), normalize=normalize).float().cpu())
                chunk = []
        if chunk:
            out.append(self.encode_pixels(self.preprocess_images(chunk), normalize=normalize).float().cpu())
        if len(out) == 1:
            return out[0]
        return torch.cat(out) if out else torch.empty(0, self.model.config.projection_dim)

    def encode_readable_images(self, items: Sequence, *, load=load_image, batch_size: int = 64,
                               normalize: bool = True) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
        """Embed the items that ``load`` can decode, a batch at a time; an unreadable one is skipped.

        Returns (features of the readable items, their indices in ``items``, (where, reason) of each
        skipped one): batch commands report those and go on.
        """
        out, kept, failed = [], [], []
        for start in range(0, len(items), batch_size):
            images = []
            for i in range(start, min(start + batch_size, len(items))):
                try:
                    images.append(load(items[i]))
                except DataError as exc:  # ImageDecodeError: one image; DataError: a TSV row
                    failed.append((str(exc.path if exc.path is not None else items[i]), exc.detail))
                    continue
                kept.append(i)
            if images:
                out.append(self.encode_pixels(self.preprocess_images(images), normalize=normalize).float().cpu())
        feats = torch.cat(out) if out else torch.empty(0, self.model.config.projection_dim)
        return feats, kept, failed

    def encode_texts(self, texts: Sequence[str], *, batch_size: int = 64, normalize: bool = True,
                     max_length: int | None = None) -> torch.Tensor:
        """Texts are sorted by length so each batch pads only to its own longest member."""
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.model.config.projection_dim)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        feats = [None] * len(texts)
        truncated = 0
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            batch = self.tokenize([texts[i] for i in idx], max_length=max_length)
            truncated += self.last_truncated
            emb = self.encode_token_batch(batch, normalize=normalize).float().cpu()
            for j, i in enumerate(idx):
                feats[i] = emb[j]
        self.last_truncated = truncated
        return torch.stack(feats)


def sentence_transformers_encode(folder: Path, input_ids, attention_mask, transformer=None) -> torch.Tensor:
    """Run the sentence-transformers module chain of a text_tower/ folder from its files alone
    (what ``SentenceTransformer(folder).encode`` does), for checking without the package."""
    folder = Path(folder)
    modules = json.loads((folder / "modules.json").read_text())
    if transformer is None:
        from transformers import AutoModel

        transformer = AutoModel.from_pretrained(str(folder))
    x = None
    acts = {"torch.nn.modules.activation.Tanh": torch.tanh, "torch.nn.modules.linear.Identity": lambda t: t}
    for mod in modules:
        kind = mod["type"].rsplit(".", 1)[-1]
        path = folder / mod["path"]
        if kind == "Transformer":
            hidden = transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        elif kind == "Pooling":
            cfg = json.loads((path / "config.json").read_text())
            if not cfg.get("pooling_mode_cls_token"):
                raise OfaconvError("only CLS pooling is produced by ofaconv", path=path)
            x = hidden[:, 0]
        elif kind == "Dense":
            cfg = json.loads((path / "config.json").read_text())
            w = load_file(str(path / "model.safetensors"))
            x = torch.nn.functional.linear(x, w["linear.weight"], w.get("linear.bias") if cfg["bias"] else None)
            x = acts[cfg["activation_function"]](x)
        elif kind == "Normalize":
            x = torch.nn.functional.normalize(x, dim=-1)
        else:
            raise OfaconvError(f"unexpected module type {mod['type']}", path=folder / "modules.json")
    return x
