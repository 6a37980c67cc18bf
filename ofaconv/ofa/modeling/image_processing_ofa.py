# Copyright 2025 the ofaconv authors. Licensed under the Apache License, Version 2.0.
"""Image processor for OFA / OFA-CN.

Reproduces fairseq OFA's caption preprocessing exactly:

    Compose([lambda im: im.convert("RGB"),
             Resize((S, S), interpolation=BICUBIC),      # PIL bicubic, no crop, aspect not kept
             ToTensor(),                                 # uint8 / 255
             Normalize(mean=[0.5] * 3, std=[0.5] * 3)])  # -> [-1, 1]

and returns `patch_images` [B, 3, S, S] plus `patch_masks` [B] (all True), the two image inputs of
the OFA encoder. S is the checkpoint's `patch_image_size`.

This file is self-contained (numpy, PIL, transformers) because converted model folders ship a copy
of it and name it in `auto_map`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

try:  # inside ofaconv, unreadable images raise the project's one-line error type
    from ofaconv.core.errors import OfaconvError as _ErrorBase
except ImportError:  # a converted folder's copy runs without ofaconv
    _ErrorBase = ValueError


class OFAImageError(_ErrorBase):
    """An input image that cannot be read or converted; the message names the file."""

    exit_code = 2

    def __init__(self, message: str, *, path=None):
        Exception.__init__(self, f"{path}: {message}" if path is not None else message)
        self.path = path
        self.key = None


OFA_IMAGE_MEAN = (0.5, 0.5, 0.5)
OFA_IMAGE_STD = (0.5, 0.5, 0.5)


class OFAImageProcessor(BaseImageProcessor):
    r"""
    Resizes images to `size` with PIL bicubic (no crop), scales to [0, 1] and normalizes with
    `image_mean` / `image_std`, exactly as fairseq OFA does.

    Args:
        size (`dict[str, int]` or `int`, *optional*, defaults to `{"height": 480, "width": 480}`):
            Output size; OFA checkpoints use square sizes (`patch_image_size`).
        resample (`int`, *optional*, defaults to `PIL.Image.BICUBIC`):
            PIL resampling filter.
        image_mean (`list[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`):
        image_std (`list[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`):
            Per-channel normalization (fairseq's captioning default; ImageNet statistics are off).

    Inputs may be PIL images, paths, encoded image bytes, or uint8 arrays / tensors (HWC or CHW).
    """

    model_input_names = ["patch_images", "patch_masks"]

    def __init__(
        self,
        size: dict[str, int] | int | None = None,
        resample: int = Image.BICUBIC,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.size = _size_dict(size if size is not None else 480)
        self.resample = int(resample)
        self.image_mean = [float(v) for v in (image_mean if image_mean is not None else OFA_IMAGE_MEAN)]
        self.image_std = [float(v) for v in (image_std if image_std is not None else OFA_IMAGE_STD)]

    def preprocess(
        self,
        images,
        size: dict[str, int] | int | None = None,
        resample: int | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Preprocess one image or a list of images into `patch_images` and `patch_masks`."""
        if kwargs:
            raise TypeError(f"OFAImageProcessor got unexpected arguments: {', '.join(sorted(kwargs))}")
        size = _size_dict(size) if size is not None else self.size
        resample = int(resample) if resample is not None else self.resample
        mean = np.asarray(image_mean if image_mean is not None else self.image_mean, dtype=np.float32)
        std = np.asarray(image_std if image_std is not None else self.image_std, dtype=np.float32)

        images = _as_list(images)
        if not images:
            raise OFAImageError("no images given")
        pixels = []
        for index, image in enumerate(images):
            pil = load_image(image, index)
            resized = pil.resize((size["width"], size["height"]), resample=resample)
            # ToTensor divides by 255 (not multiply by 1/255); Normalize subtracts then divides.
            array = np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / 255
            # contiguous channels-first, as ToTensor gives: a channels-last layout takes another
            # convolution kernel and moves the encoder output by ~1e-6
            pixels.append(np.ascontiguousarray((array - mean[:, None, None]) / std[:, None, None]))
        data = {
            "patch_images": np.stack(pixels).astype(np.float32, copy=False),
            "patch_masks": np.ones(len(pixels), dtype=bool),
        }
        return BatchFeature(data=data, tensor_type=return_tensors)

    def to_dict(self):
        output = super().to_dict()
        for key in ("_processor_class", "_valid_kwargs_names", "_valid_processor_keys"):
            output.pop(key, None)
        return output


def load_image(image, index: int = 0) -> Image.Image:
    """Open / convert one input to an RGB PIL image (fairseq: `image.convert("RGB")`)."""
    name = f"image #{index}"
    try:
        if isinstance(image, (str, os.PathLike)):
            name = os.fspath(image)
            if not os.path.isfile(name):
                raise OFAImageError("no such image file", path=name)
            with Image.open(name) as opened:
                opened.load()
                return opened.convert("RGB")
        if isinstance(image, (bytes, bytearray, memoryview)):
            name = f"<image bytes #{index}>"
            with Image.open(io.BytesIO(bytes(image))) as opened:
                opened.load()
                return opened.convert("RGB")
        if isinstance(image, Image.Image):
            name = getattr(image, "filename", None) or name
            image.load()
            return image.convert("RGB")
        return _array_to_image(image, name)
    except OFAImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise OFAImageError(f"cannot read image ({type(exc).__name__}: {exc})", path=name) from None


def _array_to_image(image, name: str) -> Image.Image:
    if hasattr(image, "detach") and hasattr(image, "cpu"):  # torch.Tensor, without importing torch
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise OFAImageError(
            f"unsupported image type {type(image).__name__}; pass a PIL image, a path, bytes or a uint8 array",
            path=name,
        )
    if image.dtype != np.uint8:
        raise OFAImageError(
            f"pixel arrays must be uint8 (got {image.dtype}); OFA resizes 8-bit images with PIL", path=name
        )
    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
        image = image.transpose(1, 2, 0)  # CHW -> HWC
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
        raise OFAImageError(f"cannot interpret an array of shape {tuple(image.shape)} as an image", path=name)
    return Image.fromarray(np.ascontiguousarray(image)).convert("RGB")


def _as_list(images) -> list:
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if hasattr(images, "ndim") and hasattr(images, "detach") and images.ndim == 4:
        return list(images)
    return [images]


def _size_dict(size) -> dict[str, int]:
    if isinstance(size, int):
        return {"height": size, "width": size}
    if isinstance(size, dict) and {"height", "width"} <= set(size):
        return {"height": int(size["height"]), "width": int(size["width"])}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    raise ValueError(f"size must be an int or {{'height': H, 'width': W}}, got {size!r}")


__all__ = ["OFAImageProcessor", "OFAImageError", "load_image"]
