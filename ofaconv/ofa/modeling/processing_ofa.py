# Copyright 2025 the ofaconv authors. Licensed under the Apache License, Version 2.0.
"""Processor for OFA / OFA-CN captioning: image processor + tokenizer + the checkpoint's prompt.

`OFAProcessor(images)` gives the four encoder inputs `input_ids`, `attention_mask`,
`patch_images`, `patch_masks`, with the prompt fairseq used for the checkpoint when no text is
given; `batch_decode` turns generated ids into captions with the family's decoding rule.

This file is self-contained (transformers and its sibling `tokenization_ofa.py` only) because
converted model folders ship a copy of it and name it in `auto_map`.
"""

from __future__ import annotations

from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .tokenization_ofa import decode_caption, decode_captions, infer_family

_IMAGE_KWARGS = ("size", "resample", "image_mean", "image_std")


class OFAProcessor(ProcessorMixin):
    r"""
    Wraps an [`OFAImageProcessor`] and the OFA tokenizer of the checkpoint's family.

    Args:
        image_processor ([`OFAImageProcessor`]):
        tokenizer ([`PreTrainedTokenizerFast`]):
        prompt (`str`, *optional*):
            Text used when `__call__` gets images but no text: the caption prompt of the checkpoint
            (fairseq: `" what does the image describe?"` for English, `"图片描述了什么内容?"` for
            Chinese).
        family (`str`, *optional*):
            `"en"` or `"cn"`; selects the caption decoding rule. Inferred from the tokenizer when
            not given.
    """

    def __init__(self, image_processor=None, tokenizer=None, prompt: str | None = None, family: str | None = None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)
        self.prompt = prompt
        self.family = family if family is not None else infer_family(tokenizer)
        if self.family not in ("en", "cn"):
            raise ValueError(f"family must be 'en' or 'cn', got {self.family!r}")

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Tokenize `text` (default: the prompt, once per image) and preprocess `images`.

        Returns `input_ids`, `attention_mask` and, when images are given, `patch_images`,
        `patch_masks`. Keyword arguments named like image-processor options (`size`, `resample`,
        `image_mean`, `image_std`) go to the image processor, the others to the tokenizer.
        """
        if images is None and text is None:
            raise ValueError("OFAProcessor needs images, text, or both")
        image_kwargs = {k: kwargs.pop(k) for k in _IMAGE_KWARGS if k in kwargs}
        data = {}
        num_images = None
        if images is not None:
            image_inputs = self.image_processor(images, return_tensors=return_tensors, **image_kwargs)
            num_images = len(image_inputs["patch_images"])
            data.update(image_inputs)
        if text is None:
            if self.prompt is None:
                raise ValueError("no text given and this processor has no prompt configured")
            text = [self.prompt] * num_images
        elif isinstance(text, str):
            if num_images is not None and num_images > 1:
                text = [text] * num_images
        elif num_images is not None and len(text) != num_images:
            raise ValueError(f"got {len(text)} texts for {num_images} images")
        text_inputs = self.tokenizer(
            text,
            return_tensors=return_tensors,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            **kwargs,
        )
        data = {**text_inputs, **data}
        return BatchFeature(data=data, tensor_type=return_tensors)

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        """Captions from generated ids (special tokens dropped, the family's spacing rule applied)."""
        return decode_captions(self.tokenizer, sequences, self.family)

    def decode(self, ids, **kwargs) -> str:
        """One caption from generated ids; see `batch_decode`."""
        return decode_caption(self.tokenizer, ids, self.family)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        return self.batch_decode(generated_outputs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "patch_images", "patch_masks"]


__all__ = ["OFAProcessor"]
