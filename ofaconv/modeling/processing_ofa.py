# Copyright 2025 the ofaconv authors. Licensed under the Apache License, Version 2.0.
"""Processor for OFA / OFA-CN captioning: image processor + tokenizer + the checkpoint's prompt.

`OFAProcessor(images)` gives the four encoder inputs `input_ids`, `attention_mask`,
`patch_images`, `patch_masks`, with the prompt fairseq used for the checkpoint when no text is
given; `batch_decode` turns generated ids into captions with the family's decoding rule.

This file is self-contained (transformers only) because converted model folders ship a copy of it
and name it in `auto_map`.
"""

from __future__ import annotations

import re

from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

# Characters around which a Chinese caption has no spaces: CJK symbols and punctuation, the CJK
# ideograph blocks that BERT splits into single characters, and full-width forms. Spaces between
# two other characters stay, so English words and numbers inside a Chinese caption keep theirs.
CJK_CHARACTERS = (
    "\u3000-\u303f"
    "\u3400-\u4dbf"
    "\u4e00-\u9fff"
    "\uf900-\ufaff"
    "\uff00-\uffef"
    "\U00020000-\U0002a6df"
    "\U0002a700-\U0002b73f"
    "\U0002b740-\U0002b81f"
    "\U0002b820-\U0002ceaf"
    "\U0002f800-\U0002fa1f"
)
_CJK_SPACES = re.compile(f"(?<=[{CJK_CHARACTERS}]) +| +(?=[{CJK_CHARACTERS}])")

# fairseq BertBPE.decode = convert_tokens_to_string + clean_up_tokenization (transformers 4.x).
_CLEAN_UP = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)

_IMAGE_KWARGS = ("size", "resample", "image_mean", "image_std")


def join_cjk_spaces(text: str) -> str:
    """Remove the spaces next to CJK characters: "红 色 的 iphone 13 手 机" -> "红色的iphone 13手机"."""
    return _CJK_SPACES.sub("", text)


def _as_id_list(ids) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    ids = list(ids)
    if ids and isinstance(ids[0], (list, tuple)):
        raise ValueError("decode_caption takes one sequence of ids; use decode_captions for a batch")
    return [int(i) for i in ids]


def caption_ids(tokenizer, ids) -> list[int]:
    """The caption's token ids: drop the decoder start / padding, stop at the first `</s>`."""
    ids = _as_id_list(ids)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    start = 0
    while start < len(ids) and ids[start] in (bos, eos, pad):
        start += 1
    caption = []
    for token_id in ids[start:]:
        if token_id == eos:
            break
        if token_id not in (bos, pad):
            caption.append(token_id)
    return caption


def decode_caption(tokenizer, ids, family: str) -> str:
    """One caption from generated ids, as fairseq OFA decodes it.

    English: GPT-2 byte-level decode, stripped. Chinese: BERT WordPiece joining and clean-up (what
    fairseq's BertBPE.decode does), then the spaces next to CJK characters are removed.
    """
    caption = caption_ids(tokenizer, ids)
    if family == "en":
        return tokenizer.decode(caption, skip_special_tokens=False, clean_up_tokenization_spaces=False).strip()
    if family == "cn":
        text = " ".join(tokenizer.convert_ids_to_tokens(caption)).replace(" ##", "").strip()
        for old, new in _CLEAN_UP:
            text = text.replace(old, new)
        return join_cjk_spaces(text).strip()
    raise ValueError(f"unknown OFA family {family!r}; expected 'en' or 'cn'")


def decode_captions(tokenizer, sequences, family: str) -> list[str]:
    """`decode_caption` for each row of a batch (e.g. the output of `generate`)."""
    if hasattr(sequences, "tolist"):
        sequences = sequences.tolist()
    if sequences and not isinstance(sequences[0], (list, tuple)):
        sequences = [sequences]
    return [decode_caption(tokenizer, row, family) for row in sequences]


def infer_family(tokenizer) -> str:
    """"cn" for a WordPiece (BERT) tokenizer, "en" for GPT-2 byte-level BPE."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = type(getattr(backend, "model", None)).__name__
    return "cn" if model == "WordPiece" else "en"


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


def register_processing(config_class=None) -> None:
    """Register the image processor and processor with AutoImageProcessor / AutoProcessor.

    `config_class` defaults to the config class registered for model_type "ofa" with AutoConfig.
    """
    from transformers import AutoImageProcessor, AutoProcessor
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .image_processing_ofa import OFAImageProcessor

    if config_class is None:
        if "ofa" not in CONFIG_MAPPING:
            raise ValueError("register the OFA config with AutoConfig (model_type 'ofa') before register_processing()")
        config_class = CONFIG_MAPPING["ofa"]
    AutoImageProcessor.register(
        config_class, image_processor_classes={"pil": OFAImageProcessor, "torchvision": OFAImageProcessor}, exist_ok=True
    )
    AutoProcessor.register(config_class, OFAProcessor, exist_ok=True)


__all__ = [
    "CJK_CHARACTERS",
    "OFAProcessor",
    "caption_ids",
    "decode_caption",
    "decode_captions",
    "infer_family",
    "join_cjk_spaces",
    "register_processing",
]
