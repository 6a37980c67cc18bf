"""Plain-Python settings of an OFA folder: token ids, ``auto_map``, the custom pipelines and fairseq's
generation settings as ``generation_config.json`` fields.

Self-contained and free of transformers on purpose: ``configuration_ofa.py`` builds its classes from
these, and ofaconv writes ``config.json`` and ``generation_config.json`` from them without importing
transformers (most of a second of every conversion). Copied into converted folders with the rest of
the remote code.
"""

from typing import Any, Optional

BOS, PAD, EOS, UNK = 0, 1, 2, 3
# OFA appends <mask>, 8192 <code_*> and 1000 <bin_*> symbols after the text vocabulary.
_NON_TEXT_TAIL = 1 + 8192 + 1000

# fairseq SequenceGenerator defaults for the knobs a generation config may lack.
FAIRSEQ_DEFAULTS: dict[str, Any] = {
    "max_len_a": 0,
    "min_len": 1,
    "lenpen": 1.0,
    "normalize_scores": True,
    "unk_penalty": 0.0,
    "fairseq_temperature": 1.0,
    "constraint_range": None,
}

# config.json: what trust_remote_code loads from a converted folder (transformers 5 builds the
# "image-text-to-text" pipeline, and its "image-to-text" alias, through AutoModelForImageTextToText).
AUTO_MAP = {
    "AutoConfig": "configuration_ofa.OFAConfig",
    "AutoModel": "modeling_ofa.OFAModel",
    "AutoModelForSeq2SeqLM": "modeling_ofa.OFAForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_ofa.OFAForConditionalGeneration",
}
# config.json: pipeline(task, model=folder, trust_remote_code=True) answers with the caption alone.
CUSTOM_PIPELINES = {
    task: {"impl": "pipeline_ofa.OFAImageTextToTextPipeline", "pt": ["AutoModelForImageTextToText"], "type": "multimodal"}
    for task in ("image-text-to-text", "image-to-text")
}

_GENERATION_SETTINGS = {"num_beams", "max_len_a", "max_len_b", "min_len", "no_repeat_ngram_size", "lenpen",
                        "temperature", "normalize_scores", "unk_penalty", "constraint_range", "text_token_range"}


def default_text_token_range(vocab_size: int) -> Optional[list[int]]:
    """Inclusive [first, last] text ids of an OFA vocabulary (EN 4..50263, CN 4..21131)."""
    last = vocab_size - _NON_TEXT_TAIL - 1
    return [4, last] if last >= 4 else None


def generation_fields(settings: dict, model_config=None) -> tuple[dict, dict]:
    """(``GenerationConfig`` arguments, fairseq fields set on it afterwards) of a converted folder,
    from a family's generation settings.

    ``settings`` uses fairseq's names as in ``mappings/variants.yaml`` (``num_beams``,
    ``max_len_a``, ``max_len_b``, ``min_len``, ``no_repeat_ngram_size``, ``lenpen``,
    ``temperature``, optionally ``normalize_scores``, ``unk_penalty``, ``constraint_range``,
    ``text_token_range``). The HF fields are set to the equivalent values (``max_length`` counts
    the start token and the forced EOS: ``max_len_b=16`` gives ``max_length=18``). ``model_config``:
    anything with the config's token ids and ``vocab_size`` as attributes.
    """
    unknown = sorted(set(settings) - _GENERATION_SETTINGS)
    if unknown:
        raise ValueError(f"unknown generation settings: {', '.join(unknown)}")
    s = {**FAIRSEQ_DEFAULTS, "num_beams": 5, "max_len_b": 16, "no_repeat_ngram_size": 3, **settings}
    if "temperature" in s:
        s["fairseq_temperature"] = s.pop("temperature")
    num_beams = int(s["num_beams"])
    max_len_b = int(s["max_len_b"])
    min_len = int(s["min_len"])
    if num_beams < 1 or max_len_b < 1 or min_len < 0 or min_len > max_len_b:
        raise ValueError(f"invalid generation settings: num_beams={num_beams} max_len_b={max_len_b} min_len={min_len}")
    if float(s["fairseq_temperature"]) <= 0:
        raise ValueError("temperature must be greater than 0")

    ids = {
        "decoder_start_token_id": getattr(model_config, "decoder_start_token_id", BOS),
        "bos_token_id": getattr(model_config, "bos_token_id", BOS),
        "eos_token_id": getattr(model_config, "eos_token_id", EOS),
        "pad_token_id": getattr(model_config, "pad_token_id", PAD),
    }
    hf = dict(
        **ids,
        forced_eos_token_id=ids["eos_token_id"],
        num_beams=num_beams,
        max_length=max_len_b + 2,
        min_length=min_len + 1,
        no_repeat_ngram_size=int(s["no_repeat_ngram_size"]),
        use_cache=True,
    )
    if num_beams > 1:  # transformers refuses beam-only fields on a greedy config
        hf.update(length_penalty=float(s["lenpen"]), early_stopping=True)
    text_range = s.get("text_token_range")
    if text_range is None and model_config is not None:
        text_range = default_text_token_range(model_config.vocab_size)
    fairseq = {
        "max_len_a": s["max_len_a"],
        "max_len_b": max_len_b,
        "min_len": min_len,
        "lenpen": float(s["lenpen"]),
        "normalize_scores": bool(s["normalize_scores"]),
        "unk_penalty": float(s["unk_penalty"]),
        "fairseq_temperature": float(s["fairseq_temperature"]),
        "constraint_range": s["constraint_range"],
        "text_token_range": list(text_range) if text_range is not None else None,
    }
    return hf, fairseq
