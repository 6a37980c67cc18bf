# Copyright 2025 the ofaconv authors. Licensed under the Apache License, Version 2.0.
"""Caption decoding of OFA / OFA-CN: generated ids to text, as fairseq's BPE decoders do.

Plain Python (no transformers import), shipped next to `processing_ofa.py` in converted folders.
"""

from __future__ import annotations

import re

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
