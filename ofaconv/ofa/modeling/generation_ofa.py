"""Generation for OFA as fairseq's SequenceGenerator runs it (OFA-Sys/OFA ``models/sequence_generator.py``),
with transformers' ``generate`` arguments on top.

Self-contained (imports only torch, transformers and ``settings_ofa.py``, which holds the fields of
``generation_config.json``): ofaconv copies this file into every converted folder next to
``modeling_ofa.py``, which imports it for ``trust_remote_code=True``.

Why not transformers' beam search: fairseq normalises a finished hypothesis by the number of tokens
generated *including* EOS, finalizes an EOS candidate only when it ranks within the first ``beam``
of ``2 * beam`` candidates, stops a sentence once ``beam`` hypotheses are final, never emits
``<pad>``, forces EOS after ``max_len_b`` tokens and divides the logits by a temperature before the
log-softmax (the OFA-Huge recipe). transformers differs on several of these, so greedy and beam
requests (``do_sample=False``) run :func:`fairseq_search` here, with a key/value cache; sampling
requests are handed to transformers' ``generate`` (without a cache).

Settings live in ``generation_config.json``. Next to the usual fields (``num_beams``,
``no_repeat_ngram_size``, ``max_length`` = ``max_len_b + 2``, ...) it carries fairseq's own knobs
as extra attributes:

=========================  =====================================================================
``max_len_a``/``max_len_b``  at most ``max_len_a * src_len + max_len_b`` tokens, then EOS is forced
``min_len``                EOS is banned for the first ``min_len`` steps
``lenpen``                 hypothesis score = sum of log-probs / (tokens incl. EOS) ** lenpen
``normalize_scores``       divide by the length at all
``unk_penalty``            subtracted from ``<unk>``'s log-prob
``fairseq_temperature``    logits / temperature before the log-softmax (beam search, not sampling)
``constraint_range``       ``"start,end"``: ban ids ``4..start-1`` and ``>= end`` (fairseq flag)
``text_token_range``       ``[first, last]`` text ids; ``text_only=True`` turns it into a constraint
=========================  =====================================================================

Which setting wins
------------------
1. What the call gives (``generate`` kwargs, and the fields a ``generation_config`` passed to
   ``generate`` sets) wins over the folder's ``generation_config.json``.
2. Within one source, fairseq's knob wins over the transformers argument it shadows: ``lenpen``
   over ``length_penalty``, ``min_len`` over ``min_new_tokens`` over ``min_length``, ``max_len_b``
   over ``max_length``, ``fairseq_temperature`` over ``temperature``; except ``max_new_tokens``,
   which wins over ``max_len_b`` (ofaconv never saves it, so it was set on purpose).
3. fairseq's stopping rule (a sentence ends once ``num_beams`` hypotheses are final) replaces
   ``early_stopping``.
4. fairseq's own constraints (no ``<pad>``, EOS banned before ``min_len``, EOS forced at
   ``max_len``, ``no_repeat_ngram_size`` blocking with ``<s>`` counted, the constraint range) are
   applied after every logits processor, so no processor can undo them.

When a call's arguments conflict under rules 2 and 3, generate logs one warning line naming what
was overridden.

transformers' arguments on the fairseq search
---------------------------------------------
``logits_processor``, ``prefix_allowed_tokens_fn`` and the processors transformers builds from the
config (``repetition_penalty``, ``bad_words_ids``, ``sequence_bias``, ``suppress_tokens``,
``begin_suppress_tokens``, ``forced_bos_token_id``, ``encoder_repetition_penalty``,
``encoder_no_repeat_ngram_size``, ``exponential_decay_length_penalty``, ``renormalize_logits``,
``remove_invalid_values``, ``watermarking_config``) see the log-probabilities of every beam, as in
transformers' beam search (also at ``num_beams=1``), laid out ``sentence * num_beams + beam`` for
the whole batch at every step. ``stopping_criteria``, ``max_time`` and ``stop_strings`` (with
``tokenizer=``) are asked about each candidate continuation: a candidate they stop is finalized
like one ending in EOS (it keeps its last token). ``streamer`` works at ``num_beams=1`` (as in
transformers). ``return_dict_in_generate`` gives ``sequences``, ``sequences_scores``,
``token_scores`` (fairseq's per-token scores) and ``beam_indices``; with ``output_scores`` /
``output_logits`` / ``output_attentions`` / ``output_hidden_states`` also the per-step tensors in
transformers' layout (rows of sentences that already finished hold -inf scores and zeros), so
``model.compute_transition_scores(out.sequences, out.scores, out.beam_indices)`` gives the
per-token scores. Group beam search, contrastive search, assisted decoding and classifier-free
guidance are other algorithms and are refused.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, GenerationMixin
from transformers.generation import LogitsProcessorList, MaxTimeCriteria, StopStringCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerateBeamEncoderDecoderOutput
from transformers.utils import logging

from .settings_ofa import BOS, EOS, FAIRSEQ_DEFAULTS, PAD, UNK, default_text_token_range

logger = logging.get_logger(__name__)

# transformers' length default when nothing else says how long to generate (max_length = 20).
_HF_DEFAULT_MAX_LENGTH = 20

# Generation-config fields that ask for another decoding algorithm, with the value that means
# "off" (None is always off).
_UNSUPPORTED_FIELDS = {
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "penalty_alpha": None,
    "guidance_scale": 1.0,
    "force_words_ids": None,
    "constraints": None,
    "prompt_lookup_num_tokens": None,
    "dola_layers": None,
    "assistant_early_exit": None,
}
# generate() arguments of transformers that only make sense with another decoding loop.
_UNSUPPORTED_ARGS = (
    "assistant_model",
    "assistant_tokenizer",
    "negative_prompt_ids",
    "negative_prompt_attention_mask",
    "custom_generate",
)
_MODEL_INPUTS = ("input_ids", "patch_images", "patch_masks", "attention_mask", "encoder_outputs")
_FAIRSEQ_KNOBS = ("max_len_a", "max_len_b", "min_len", "lenpen", "normalize_scores", "unk_penalty",
                  "fairseq_temperature", "constraint_range", "text_token_range")


@dataclass
class OFAGenerateOutput(GenerateBeamEncoderDecoderOutput):
    """transformers' beam output plus fairseq's per-token scores.

    ``sequences`` start with the decoder start token (0) and end with EOS (or the token a stopping
    criterion ended on), right-padded with pad; ``sequences_scores`` are fairseq's
    length-normalised hypothesis scores; ``token_scores`` are fairseq's ``positional_scores``
    (log-prob of each generated token, EOS included), aligned with ``sequences[:, 1:]`` and padded
    with 0; ``beam_indices`` name, per generated token, the row (``sentence * num_beams + beam``) of
    ``scores`` it was chosen from, -1 past the end.
    """

    token_scores: Optional[torch.FloatTensor] = None


@dataclass
class SearchSettings:
    """Resolved settings of one fairseq search."""

    beam_size: int = 5
    max_len_a: float = 0
    max_len_b: int = 16
    min_len: int = 1
    no_repeat_ngram_size: int = 3
    lenpen: float = 1.0
    normalize_scores: bool = True
    unk_penalty: float = 0.0
    temperature: float = 1.0
    constraint_range: Optional[tuple[int, int]] = None
    # tokens [rows, step + 1] -> bool [rows, vocab] of the ids each row may continue with; the
    # others are masked on the logits, before the log-softmax (OFA's answer-trie constraint)
    logits_mask: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    num_return_sequences: int = 1
    use_cache: bool = True
    return_dict_in_generate: bool = False
    bos: int = BOS
    pad: int = PAD
    eos: int = EOS
    unk: int = UNK


@dataclass
class SearchHooks:
    """transformers' generate arguments on top of :func:`fairseq_search` (all optional), and what
    the search records for ``return_dict_in_generate``, per step in transformers' layout."""

    logits_processor: Optional[LogitsProcessorList] = None
    stopping_criteria: Optional[StoppingCriteriaList] = None
    streamer: Optional[object] = None
    track_beams: bool = False
    output_scores: bool = False
    output_logits: bool = False
    output_attentions: bool = False
    output_hidden_states: bool = False
    scores: list = field(default_factory=list)
    logits: list = field(default_factory=list)
    decoder_attentions: list = field(default_factory=list)
    cross_attentions: list = field(default_factory=list)
    decoder_hidden_states: list = field(default_factory=list)


def parse_constraint_range(value) -> Optional[tuple[int, int]]:
    """fairseq's ``--constraint-range "start,end"`` (or a pair) as two ints."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    if len(parts) != 2:
        raise ValueError(f"constraint_range must be 'start,end', got {value!r}")
    start, end = (int(p) for p in parts)
    if not 4 <= start <= end:
        raise ValueError(f"constraint_range must satisfy 4 <= start <= end, got {value!r}")
    return start, end


def _set(value) -> bool:
    return value is not None


def resolve_settings(model, generation_config: Optional[GenerationConfig], kwargs: dict):
    """Merge the model's generation config, an explicit one and ``generate`` kwargs (module
    docstring, "Which setting wins").

    Returns ``(settings, config, model_kwargs, conflicts)``: the search settings, the merged
    ``GenerationConfig`` (its transformers fields drive the logits processors), the remaining
    (model input) kwargs, and one message per overridden argument of this call.
    """
    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    kwargs = dict(kwargs)
    conflicts: list[str] = []

    explicit = {name: kwargs.pop(name) for name in _FAIRSEQ_KNOBS if name in kwargs}
    explicit = {name: value for name, value in explicit.items() if value is not None}
    text_only = kwargs.pop("text_only", None)

    def shadow(fairseq_name, value, hf_name, shown=None):
        if fairseq_name in explicit:
            if explicit[fairseq_name] != value:
                conflicts.append(f"{fairseq_name}={explicit[fairseq_name]} wins over {hf_name}={shown if shown is not None else value}")
        else:
            explicit[fairseq_name] = value

    # HF names given as kwargs: map them onto fairseq's knobs (kwargs beat every config field).
    length: dict[str, int] = {}
    min_names = sorted(n for n in ("min_new_tokens", "min_length") if kwargs.get(n) is not None)
    for hf_name, value in list(kwargs.items()):
        if hf_name in _MODEL_INPUTS or value is None:
            continue
        if hf_name in ("max_new_tokens", "max_length"):
            length[hf_name] = int(value)
        elif hf_name == "min_new_tokens":
            shadow("min_len", int(value), hf_name)
        elif hf_name == "min_length":
            if "min_new_tokens" not in min_names:
                shadow("min_len", max(int(value) - 1, 0), hf_name, shown=value)
        elif hf_name == "length_penalty":
            shadow("lenpen", float(value), hf_name)
        elif hf_name == "temperature":
            shadow("fairseq_temperature", float(value), hf_name)
        elif hf_name == "early_stopping":
            if value is not True:
                conflicts.append(f"fairseq's stopping rule wins over early_stopping={value!r}")
        elif hasattr(config, hf_name):
            setattr(config, hf_name, value)
        else:
            continue
        kwargs.pop(hf_name)

    if "max_new_tokens" in length:
        if "max_len_b" in explicit and explicit["max_len_b"] != length["max_new_tokens"] - 1:
            conflicts.append(f"max_new_tokens={length['max_new_tokens']} wins over max_len_b={explicit['max_len_b']}")
        explicit["max_len_a"], explicit["max_len_b"] = 0, length["max_new_tokens"] - 1
    elif "max_length" in length:
        if "max_len_b" not in explicit:
            explicit["max_len_a"], explicit["max_len_b"] = 0, length["max_length"] - 2
        elif explicit["max_len_b"] != length["max_length"] - 2:
            conflicts.append(f"max_len_b={explicit['max_len_b']} wins over max_length={length['max_length']}")

    unsupported = [
        name
        for name, off in _UNSUPPORTED_FIELDS.items()
        if getattr(config, name, None) is not None and getattr(config, name) != off and getattr(config, name) != []
    ]
    if unsupported:
        raise ValueError(f"OFA's fairseq search does not support: {', '.join(unsupported)} "
                         "(another decoding algorithm than beam search)")
    eos = config.eos_token_id if _set(config.eos_token_id) else EOS
    eos = int(eos[0] if isinstance(eos, (list, tuple)) else eos)
    if config.forced_eos_token_id is not None and config.forced_eos_token_id != eos:
        raise ValueError("forced_eos_token_id must be the EOS id (fairseq forces EOS at max_len)")

    def knob(name, default):
        if name in explicit:
            return explicit[name]
        value = getattr(config, name, None)
        return default if value is None else value

    # config: max_new_tokens (never saved by ofaconv) > max_len_b > max_length > transformers' default
    if "max_len_b" in explicit:
        max_len_a, max_len_b = float(explicit.get("max_len_a", knob("max_len_a", 0))), int(explicit["max_len_b"])
    elif _set(config.max_new_tokens):
        max_len_a, max_len_b = 0, int(config.max_new_tokens) - 1
    elif _set(getattr(config, "max_len_b", None)):
        max_len_a, max_len_b = float(knob("max_len_a", 0)), int(config.max_len_b)
    else:
        max_len_a = 0
        max_len_b = int(config.max_length if _set(config.max_length) else _HF_DEFAULT_MAX_LENGTH) - 2
    if "min_len" in explicit:
        min_len = int(explicit["min_len"])
    elif _set(getattr(config, "min_len", None)):
        min_len = int(config.min_len)
    elif _set(config.min_new_tokens):
        min_len = int(config.min_new_tokens)
    elif _set(config.min_length) and config.min_length > 0:
        min_len = int(config.min_length) - 1
    else:
        min_len = FAIRSEQ_DEFAULTS["min_len"]
    lenpen = knob("lenpen", None)
    if lenpen is None:
        lenpen = config.length_penalty if _set(config.length_penalty) else 1.0

    constraint = parse_constraint_range(knob("constraint_range", None))
    if text_only:
        text_range = knob("text_token_range", None) or default_text_token_range(model.config.vocab_size)
        if text_range is None:
            raise ValueError("text_only needs text_token_range in the generation config")
        constraint = (int(text_range[0]), int(text_range[1]) + 1)

    num_beams = int(config.num_beams) if _set(config.num_beams) else 1
    num_return = int(config.num_return_sequences) if _set(config.num_return_sequences) else 1
    if num_beams < 1:
        raise ValueError("num_beams must be at least 1")
    if num_return > num_beams:
        raise ValueError(f"num_return_sequences ({num_return}) cannot exceed num_beams ({num_beams})")
    temperature = float(knob("fairseq_temperature", 1.0))
    if temperature <= 0:
        raise ValueError("temperature must be greater than 0")
    if max_len_b < 0:
        raise ValueError(f"max_len_b must be >= 0, got {max_len_b}")

    settings = SearchSettings(
        beam_size=num_beams,
        max_len_a=max_len_a,
        max_len_b=max_len_b,
        min_len=min_len,
        no_repeat_ngram_size=int(config.no_repeat_ngram_size or 0),
        lenpen=float(lenpen),
        normalize_scores=bool(knob("normalize_scores", True)),
        unk_penalty=float(knob("unk_penalty", 0.0)),
        temperature=temperature,
        constraint_range=constraint,
        num_return_sequences=num_return,
        use_cache=config.use_cache is not False,
        return_dict_in_generate=bool(config.return_dict_in_generate),
        bos=int(config.decoder_start_token_id if _set(config.decoder_start_token_id) else BOS),
        pad=int(config.pad_token_id if _set(config.pad_token_id) else PAD),
        eos=eos,
    )
    return settings, config, kwargs, conflicts


# ---------------------------------------------------------------------------------------------
# fairseq search
# ---------------------------------------------------------------------------------------------


def block_repeated_ngrams(tokens: torch.Tensor, lprobs: torch.Tensor, step: int, ngram_size: int) -> None:
    """fairseq ``NGramRepeatBlock``: ban (in place) every token that would repeat an n-gram of the
    row's prefix ``tokens[:, :step + 1]`` (``<s>`` included)."""
    if step + 2 - ngram_size < 0:
        return
    prefix = tokens[:, : step + 1]
    if prefix.shape[1] < ngram_size:
        return
    windows = prefix.unfold(1, ngram_size, 1)  # [rows, step + 2 - n, n]
    key = prefix[:, step + 2 - ngram_size :]  # the last n - 1 tokens
    match = (windows[:, :, :-1] == key[:, None, :]).all(dim=-1)
    rows, starts = match.nonzero(as_tuple=True)
    if rows.numel():
        lprobs[rows, windows[rows, starts, -1]] = -math.inf


def _select_encoder_rows(encoder_outputs, index: torch.Tensor):
    return type(encoder_outputs)(
        last_hidden_state=encoder_outputs.last_hidden_state.index_select(0, index),
        padding_mask=encoder_outputs.padding_mask.index_select(0, index),
        position_embedding=encoder_outputs.position_embedding.index_select(0, index),
    )


def _reorder_self_attention(cache, index: torch.Tensor, num_heads: int) -> None:
    """Beam reordering within each sentence: only the growing self-attention keys/values change
    (the cross-attention ones are identical copies across a sentence's beams)."""
    flat = (index[:, None] * num_heads + torch.arange(num_heads, device=index.device)).reshape(-1)
    cache.self_kv = [None if kv is None else (kv[0].index_select(0, flat), kv[1].index_select(0, flat))
                     for kv in cache.self_kv]


class _Decoder:
    """One decoding step of the model: cached (new token only) or full recompute. ``last`` keeps
    the step's raw logits (and attentions / hidden states when asked) for the output trace."""

    def __init__(self, model, settings: SearchSettings, outputs: Optional[dict] = None):
        self.model = model
        self.settings = settings
        self.num_heads = model.config.decoder_attention_heads
        self.outputs = outputs or {}
        self.cache = None
        self.last = None

    def lprobs(self, tokens: torch.Tensor, step: int, encoder_outputs) -> torch.Tensor:
        if self.settings.use_cache:
            out = self.model(decoder_input_ids=tokens[:, step : step + 1], encoder_outputs=encoder_outputs,
                             cache=self.cache, use_cache=True, **self.outputs)
            self.cache = out.cache
        else:
            out = self.model(decoder_input_ids=tokens[:, : step + 1], encoder_outputs=encoder_outputs, use_cache=False,
                             **self.outputs)
        if self.outputs or self.settings.return_dict_in_generate:
            self.last = out
        # fairseq: logits of the last position divided by the temperature, the constraint range
        # masked on the logits, then log_softmax in fp32.
        logits = out.logits[:, -1:, :]
        logits = logits / self.settings.temperature if self.last is not None else logits.div_(self.settings.temperature)
        if self.settings.constraint_range is not None:
            start, end = self.settings.constraint_range
            logits[:, :, 4:start] = -math.inf
            logits[:, :, end:] = -math.inf
        if self.settings.logits_mask is not None:
            allowed = self.settings.logits_mask(tokens[:, : step + 1]).to(logits.device)
            logits = logits.masked_fill(~allowed[:, None, :], -math.inf)
        return F.log_softmax(logits, dim=-1, dtype=torch.float32)[:, -1, :]

    def reorder(self, index: torch.Tensor, within_sentences: bool) -> None:
        if self.cache is None:
            return
        if within_sentences:
            _reorder_self_attention(self.cache, index, self.num_heads)
        else:
            self.cache.reorder(index, self.num_heads)


def _full(values: torch.Tensor, rows: torch.Tensor, total: int, fill) -> torch.Tensor:
    """``values`` of the current rows placed at their rows of the whole batch (``total`` rows)."""
    out = values.new_full((total,) + tuple(values.shape[1:]), fill)
    out[rows] = values
    return out


def _trace_step(hooks: SearchHooks, decoder: _Decoder, lprobs, rows, total, expand) -> None:
    """Record the step's processed scores, raw logits, attentions and hidden states."""
    if hooks.output_scores:
        hooks.scores.append(_full(lprobs, rows, total, -math.inf))
    out = decoder.last
    if out is None:
        return

    def place(t, fill=0.0):
        return _full(t if expand is None else t.index_select(0, expand), rows, total, fill)

    if hooks.output_logits:
        hooks.logits.append(place(out.logits[:, -1, :].float()))
    if hooks.output_attentions:
        hooks.decoder_attentions.append(tuple(place(a) for a in out.decoder_attentions))
        hooks.cross_attentions.append(tuple(place(a) for a in out.cross_attentions))
    if hooks.output_hidden_states:
        hooks.decoder_hidden_states.append(tuple(place(h) for h in out.decoder_hidden_states))


@torch.no_grad()
def fairseq_search(model, encoder_outputs, settings: SearchSettings, src_len: int,
                   hooks: Optional[SearchHooks] = None) -> list[list[dict]]:
    """fairseq ``SequenceGenerator._generate`` with ``search.BeamSearch`` (beam 1 = greedy).

    ``encoder_outputs`` holds one row per sentence. Returns, per sentence, its finalized
    hypotheses best first: dicts with ``tokens`` (ending with EOS, no ``<s>``), ``score`` (float,
    normalised as fairseq does), ``positional_scores`` and, when ``hooks.track_beams``,
    ``beam_indices``. ``hooks`` adds transformers' processors, stopping criteria, streamer and
    per-step outputs (module docstring); without it the search is fairseq's, step for step.
    """
    s = settings
    hooks = hooks if hooks is not None else SearchHooks()
    bsz = encoder_outputs.last_hidden_state.shape[0]
    device = encoder_outputs.last_hidden_state.device
    vocab_size = model.config.vocab_size
    beam_size = min(s.beam_size, vocab_size - 1)  # pad is never selected
    max_len = int(s.max_len_a * src_len + s.max_len_b)
    if s.min_len > max_len:
        raise ValueError(f"min_len ({s.min_len}) cannot be larger than max_len ({max_len})")
    if max_len + 1 > model.config.max_position_embeddings:
        raise ValueError(f"max_len {max_len} exceeds the decoder's {model.config.max_position_embeddings} positions")
    if hooks.streamer is not None and beam_size > 1:
        raise ValueError("`streamer` cannot be used with beam search (as in transformers); use num_beams=1")

    outputs = {name: True for name in ("output_attentions", "output_hidden_states") if getattr(hooks, name)}
    decoder = _Decoder(model, s, outputs)
    tokens = torch.full((bsz * beam_size, max_len + 2), s.pad, dtype=torch.long, device=device)
    tokens[:, 0] = s.bos
    scores = torch.zeros(bsz * beam_size, max_len + 1, dtype=torch.float32, device=device)
    # per active row and step: the row of the whole batch (sentence * beam + beam) it was chosen from
    history = torch.full_like(tokens[:, :-1], -1) if hooks.track_beams else None
    cands_to_ignore = torch.zeros(bsz, beam_size, dtype=torch.bool, device=device)
    finalized: list[list[dict]] = [[] for _ in range(bsz)]
    finished = [False] * bsz
    num_remaining = bsz
    sentence_of_row = list(range(bsz))  # current batch position -> original sentence
    total_rows = bsz * beam_size
    cand_size = 2 * beam_size
    bbsz_offsets = (torch.arange(bsz, device=device) * beam_size).unsqueeze(1)
    cand_offsets = torch.arange(cand_size, device=device)
    beam_offsets = torch.arange(beam_size, device=device)
    full_rows = torch.arange(total_rows, device=device)  # current row -> row of the whole batch
    if hooks.streamer is not None:
        hooks.streamer.put(tokens[:, :1].cpu())

    reorder_state: Optional[torch.Tensor] = None
    batch_idxs: Optional[torch.Tensor] = None
    for step in range(max_len + 1):  # one extra step for the EOS marker
        expand = None
        if step == 0:
            # All beams of a sentence start identical: decode one row per sentence, then copy
            # rows (encoder states, cross-attention keys/values) into the beams.
            lprobs = decoder.lprobs(tokens[::beam_size], 0, encoder_outputs)
            expand = torch.arange(bsz, device=device).repeat_interleave(beam_size)
            encoder_outputs = _select_encoder_rows(encoder_outputs, expand)
            decoder.reorder(expand, within_sentences=False)
            lprobs = lprobs.index_select(0, expand)
        else:
            if batch_idxs is not None:
                # sentences were dropped: map the new beam rows back onto the old batch
                corr = batch_idxs - torch.arange(batch_idxs.numel(), device=device)
                reorder_state.view(-1, beam_size).add_(corr.unsqueeze(-1) * beam_size)
                encoder_outputs = _select_encoder_rows(encoder_outputs, reorder_state)
            decoder.reorder(reorder_state, within_sentences=batch_idxs is None)
            lprobs = decoder.lprobs(tokens, step, encoder_outputs)

        if hooks.logits_processor:
            ids = _full(tokens[:, : step + 1], full_rows, total_rows, s.pad)
            lprobs = hooks.logits_processor(ids, _full(lprobs, full_rows, total_rows, -math.inf))[full_rows]
        if step < s.min_len:
            lprobs[:, s.eos] = -math.inf
        lprobs[lprobs != lprobs] = -math.inf
        lprobs[:, s.pad] = -math.inf
        lprobs[:, s.unk] -= s.unk_penalty
        if step >= max_len:
            lprobs[:, : s.eos] = -math.inf
            lprobs[:, s.eos + 1 :] = -math.inf
        if s.no_repeat_ngram_size > 0:
            block_repeated_ngrams(tokens, lprobs, step, s.no_repeat_ngram_size)
        _trace_step(hooks, decoder, lprobs, full_rows, total_rows, expand)

        # BeamSearch.step: the top 2 * beam of beam x V cumulative scores (beam 0 only at step 0)
        lp = lprobs.view(bsz, -1, vocab_size)
        if step == 0:
            lp = lp[:, ::beam_size, :].contiguous()
        else:
            lp = lp + scores.view(bsz, beam_size, -1)[:, :, step - 1].unsqueeze(-1)
        flat = lp.view(bsz, -1)
        cand_scores, flat_idx = torch.topk(flat, k=min(cand_size, flat.size(1) - 1))
        cand_beams = flat_idx // vocab_size
        cand_indices = flat_idx.fmod(vocab_size)
        cand_bbsz_idx = cand_beams + bbsz_offsets

        # finalize hypotheses ending in EOS, but only among the first beam_size candidates
        eos_mask = cand_indices.eq(s.eos)
        if hooks.stopping_criteria:
            # a candidate a stopping criterion ends is finalized like one ending in EOS
            rows = cand_bbsz_idx.reshape(-1)
            candidates = tokens.index_select(0, rows)[:, : step + 2]
            candidates[:, step + 1] = cand_indices.reshape(-1)
            eos_mask |= hooks.stopping_criteria(candidates, lprobs.index_select(0, rows)).view_as(eos_mask)
        eos_mask &= cand_scores.ne(-math.inf)
        eos_mask[:, :beam_size][cands_to_ignore] = False
        if hooks.streamer is not None:  # beam 1: the top candidate is this step's token
            streamed = torch.full((len(finished),), s.pad, dtype=torch.long, device=device)
            streamed[torch.tensor(sentence_of_row, device=device)] = cand_indices[:, 0]
            hooks.streamer.put(streamed.cpu())
        top_eos = eos_mask[:, :beam_size]
        finalized_rows: list[int] = []
        if bool(top_eos.any()):
            eos_bbsz_idx = cand_bbsz_idx[:, :beam_size][top_eos]
            eos_scores = cand_scores[:, :beam_size][top_eos]
            end_tokens = cand_indices[:, :beam_size][top_eos]
            hypo_history = None
            if history is not None:
                hypo_history = torch.cat([history.index_select(0, eos_bbsz_idx)[:, :step],
                                          full_rows[eos_bbsz_idx].unsqueeze(1)], dim=1)
            finalized_rows = _finalize(step, eos_bbsz_idx, eos_scores, end_tokens, hypo_history, tokens, scores,
                                       finalized, finished, sentence_of_row, beam_size, max_len, s)
            num_remaining -= len(finalized_rows)
        if num_remaining == 0:
            break
        if step >= max_len:
            raise RuntimeError(f"search did not finish at max_len {max_len}")

        if finalized_rows:  # drop sentences that have beam_size finished hypotheses
            keep = torch.ones(bsz, dtype=torch.bool, device=device)
            keep[finalized_rows] = False
            batch_idxs = torch.arange(bsz, device=device)[keep]
            new_bsz = int(batch_idxs.numel())
            kept = batch_idxs.tolist()
            sentence_of_row = [sentence_of_row[i] for i in kept]
            eos_mask = eos_mask[batch_idxs]
            cand_beams = cand_beams[batch_idxs]
            bbsz_offsets = (torch.arange(new_bsz, device=device) * beam_size).unsqueeze(1)
            cand_bbsz_idx = cand_beams + bbsz_offsets
            cand_scores = cand_scores[batch_idxs]
            cand_indices = cand_indices[batch_idxs]
            cands_to_ignore = cands_to_ignore[batch_idxs]
            scores = scores.view(bsz, -1)[batch_idxs].view(new_bsz * beam_size, -1)
            tokens = tokens.view(bsz, -1)[batch_idxs].view(new_bsz * beam_size, -1)
            if history is not None:
                history = history.view(bsz, -1)[batch_idxs].view(new_bsz * beam_size, -1)
            full_rows = (torch.tensor(sentence_of_row, device=device)[:, None] * beam_size + beam_offsets).view(-1)
            bsz = new_bsz
        else:
            batch_idxs = None

        # continue with the beam_size best candidates that do not end in EOS: EOS and ignored
        # candidates get an offset of cand_size so that the smallest values are the active ones
        eos_mask[:, :beam_size] = cands_to_ignore | eos_mask[:, :beam_size]
        active_mask = eos_mask.long() * cand_size + cand_offsets[: eos_mask.size(1)]
        new_ignore, active_hypos = torch.topk(active_mask, k=beam_size, dim=1, largest=False)
        cands_to_ignore = new_ignore.ge(cand_size)[:, :beam_size]
        if not bool((~cands_to_ignore).any(dim=1).all()):
            raise RuntimeError("beam search has no active hypothesis left for a sentence")
        active_bbsz_idx = torch.gather(cand_bbsz_idx, 1, active_hypos).view(-1)
        tokens[:, : step + 1] = tokens[:, : step + 1].index_select(0, active_bbsz_idx)
        tokens.view(bsz, beam_size, -1)[:, :, step + 1] = torch.gather(cand_indices, 1, active_hypos)
        if step > 0:
            scores[:, :step] = scores[:, :step].index_select(0, active_bbsz_idx)
        scores.view(bsz, beam_size, -1)[:, :, step] = torch.gather(cand_scores, 1, active_hypos)
        if history is not None:
            history[:, :step] = history[:, :step].index_select(0, active_bbsz_idx)
            history[:, step] = full_rows[active_bbsz_idx]
        reorder_state = active_bbsz_idx

    if hooks.streamer is not None:
        hooks.streamer.end()
    results = []
    for hypos in finalized:
        order = torch.sort(torch.tensor([h["score"] for h in hypos]), descending=True)[1].tolist()
        results.append([hypos[i] for i in order])
    return results


def _finalize(step, bbsz_idx, eos_scores, end_tokens, hypo_history, tokens, scores, finalized, finished,
              sentence_of_row, beam_size, max_len, s: SearchSettings) -> list[int]:
    """Store hypotheses that just ended (EOS, or a stopping criterion on ``end_tokens``); return
    the batch rows of sentences now finished."""
    hypo_tokens = tokens.index_select(0, bbsz_idx)[:, 1 : step + 2]  # drop <s>
    hypo_tokens[:, step] = end_tokens
    pos_scores = scores.index_select(0, bbsz_idx)[:, : step + 1]
    pos_scores[:, step] = eos_scores
    pos_scores[:, 1:] = pos_scores[:, 1:] - pos_scores[:, :-1]  # cumulative -> per token
    if s.normalize_scores:
        eos_scores = eos_scores / (step + 1) ** s.lenpen

    rows = (bbsz_idx // beam_size).tolist()
    values = eos_scores.tolist()
    touched: dict[int, int] = {}
    for i, row in enumerate(rows):
        sent = sentence_of_row[row]
        touched.setdefault(sent, row)
        if len(finalized[sent]) < beam_size:
            hypo = {"tokens": hypo_tokens[i], "score": values[i], "positional_scores": pos_scores[i]}
            if hypo_history is not None:
                hypo["beam_indices"] = hypo_history[i]
            finalized[sent].append(hypo)
    newly_finished = []
    for sent in sorted(touched):
        if not finished[sent] and (len(finalized[sent]) == beam_size or step == max_len):
            finished[sent] = True
            newly_finished.append(touched[sent])
    return newly_finished


# ---------------------------------------------------------------------------------------------
# generate()
# ---------------------------------------------------------------------------------------------


def pack_hypotheses(results: list[list[dict]], num_return: int, settings: SearchSettings, device):
    """HF-style tensors: sequences [B * num_return, T] (start token, ..., EOS, pad...), their
    scores, per-token scores and beam indices (None unless the search tracked them)."""
    rows, row_scores, row_token_scores, row_beams = [], [], [], []
    for hypos in results:
        for k in range(num_return):
            if k < len(hypos):
                rows.append(hypos[k]["tokens"].tolist())
                row_scores.append(hypos[k]["score"])
                row_token_scores.append(hypos[k]["positional_scores"].tolist())
                row_beams.append(hypos[k]["beam_indices"].tolist() if "beam_indices" in hypos[k] else None)
            else:  # fewer finished hypotheses than asked for (a sentence cut at max_len)
                rows.append([settings.eos])
                row_scores.append(-math.inf)
                row_token_scores.append([0.0])
                row_beams.append([-1])
    width = 1 + max(len(r) for r in rows)
    sequences = torch.full((len(rows), width), settings.pad, dtype=torch.long)
    token_scores = torch.zeros(len(rows), width - 1, dtype=torch.float32)
    sequences[:, 0] = settings.bos
    for i, (row, ts) in enumerate(zip(rows, row_token_scores)):
        sequences[i, 1 : 1 + len(row)] = torch.tensor(row, dtype=torch.long)
        token_scores[i, : len(ts)] = torch.tensor(ts, dtype=torch.float32)
    beam_indices = None
    if all(b is not None for b in row_beams):
        beam_indices = torch.full((len(rows), width - 1), -1, dtype=torch.long)
        for i, b in enumerate(row_beams):
            beam_indices[i, : len(b)] = torch.tensor(b, dtype=torch.long)
        beam_indices = beam_indices.to(device)
    return (sequences.to(device), torch.tensor(row_scores, dtype=torch.float32).to(device), token_scores.to(device),
            beam_indices)


def _logits_processor(model, config: GenerationConfig, settings: SearchSettings, input_ids, model_kwargs,
                      logits_processor, prefix_allowed_tokens_fn, device) -> LogitsProcessorList:
    """transformers' processors for the config's fields (and the caller's), without the ones that
    fairseq's search does itself (length limits, n-gram blocking, forced EOS)."""
    config = copy.deepcopy(config)
    config.no_repeat_ngram_size = None
    config.min_length, config.min_new_tokens = 0, None
    config.forced_eos_token_id = None
    config.do_sample = False
    config.num_beams = settings.beam_size
    config._eos_token_tensor = torch.tensor([settings.eos], device=device)
    encoder_ids = None if input_ids is None else input_ids.repeat_interleave(settings.beam_size, dim=0)
    return model._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=1,
        encoder_input_ids=encoder_ids,
        prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        logits_processor=LogitsProcessorList(logits_processor or []),
        device=device,
        model_kwargs=model_kwargs,
    )


def _stopping_criteria(config: GenerationConfig, stopping_criteria, tokenizer) -> StoppingCriteriaList:
    """The caller's criteria plus ``max_time`` and ``stop_strings``; length and EOS are fairseq's."""
    criteria = StoppingCriteriaList(stopping_criteria or [])
    if config.max_time is not None:
        criteria.append(MaxTimeCriteria(max_time=config.max_time))
    if config.stop_strings is not None:
        if tokenizer is None:
            raise ValueError("`stop_strings` needs the tokenizer: pass `tokenizer=` to generate")
        criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=config.stop_strings))
    return criteria


def ofa_generate(model, inputs: Optional[torch.Tensor] = None, generation_config: Optional[GenerationConfig] = None,
                 logits_processor=None, stopping_criteria=None, prefix_allowed_tokens_fn=None, synced_gpus=None,
                 streamer=None, **kwargs):
    """``OFAForConditionalGeneration.generate``: fairseq search for greedy/beam, transformers'
    sampling (uncached) for ``do_sample=True``; transformers' arguments work on both (module docstring)."""
    for name in _UNSUPPORTED_ARGS:
        if kwargs.pop(name, None) is not None:
            raise ValueError(f"OFA's fairseq search does not support `{name}`")
    if synced_gpus:
        raise ValueError("OFA's fairseq search does not support `synced_gpus`")
    if inputs is not None:
        if kwargs.get("input_ids") is not None:
            raise ValueError("pass the prompt as `inputs` or `input_ids`, not both")
        kwargs["input_ids"] = inputs
    if generation_config is not None and generation_config is not model.generation_config:
        # as in transformers: what the given config sets wins, the model's config fills the rest
        # (and HF-named fields map onto fairseq's knobs exactly as kwargs do)
        given = {k: v for k, v in generation_config.to_diff_dict().items() if k != "transformers_version"}
        kwargs = {**given, **kwargs}
        generation_config = None
    sample_requested = kwargs.get("do_sample")
    if sample_requested is None:
        config = generation_config if generation_config is not None else model.generation_config
        sample_requested = bool(getattr(config, "do_sample", False))
    extras = dict(logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                  prefix_allowed_tokens_fn=prefix_allowed_tokens_fn, streamer=streamer)
    if sample_requested:
        return _sample(model, generation_config, kwargs, extras)

    tokenizer = kwargs.pop("tokenizer", None)
    settings, config, model_kwargs, conflicts = resolve_settings(model, generation_config, kwargs)
    if conflicts:
        logger.warning("OFA generate: " + "; ".join(conflicts) + " (see generation_ofa.py, 'Which setting wins')")
    unknown = sorted(k for k in model_kwargs if k not in _MODEL_INPUTS and model_kwargs[k] is not None)
    if unknown:
        raise TypeError(f"OFA generate() got unexpected arguments: {', '.join(unknown)}")
    input_ids = model_kwargs.get("input_ids")
    encoder_outputs = model_kwargs.get("encoder_outputs")
    if input_ids is None and (encoder_outputs is None or settings.max_len_a):
        raise ValueError("OFA generate() needs `input_ids` (the tokenized prompt)")
    want_attentions, want_hidden = bool(config.output_attentions), bool(config.output_hidden_states)
    if encoder_outputs is None:
        encoder_outputs = model.get_encoder()(
            input_ids=input_ids,
            patch_images=model_kwargs.get("patch_images"),
            patch_masks=model_kwargs.get("patch_masks"),
            attention_mask=model_kwargs.get("attention_mask"),
            output_attentions=want_attentions,
            output_hidden_states=want_hidden,
        )
    elif isinstance(encoder_outputs, (tuple, list)):
        raise ValueError("encoder_outputs must be the encoder's OFAEncoderOutput")

    device = encoder_outputs.last_hidden_state.device
    hooks = SearchHooks(
        logits_processor=_logits_processor(model, config, settings, input_ids, model_kwargs, logits_processor,
                                           prefix_allowed_tokens_fn, device),
        stopping_criteria=_stopping_criteria(config, stopping_criteria, tokenizer),
        streamer=streamer,
        track_beams=settings.return_dict_in_generate,
        output_scores=settings.return_dict_in_generate and bool(config.output_scores),
        output_logits=settings.return_dict_in_generate and bool(config.output_logits),
        output_attentions=settings.return_dict_in_generate and want_attentions,
        output_hidden_states=settings.return_dict_in_generate and want_hidden,
    )
    src_len = input_ids.shape[1] if input_ids is not None else 0
    results = fairseq_search(model, encoder_outputs, settings, src_len=src_len, hooks=hooks)
    sequences, sequence_scores, token_scores, beam_indices = pack_hypotheses(
        results, settings.num_return_sequences, settings, device
    )
    if not settings.return_dict_in_generate:
        return sequences
    return OFAGenerateOutput(
        sequences=sequences,
        sequences_scores=sequence_scores,
        token_scores=token_scores,
        beam_indices=beam_indices,
        scores=tuple(hooks.scores) if hooks.output_scores else None,
        logits=tuple(hooks.logits) if hooks.output_logits else None,
        encoder_attentions=encoder_outputs.attentions if want_attentions else None,
        encoder_hidden_states=encoder_outputs.hidden_states if want_hidden else None,
        decoder_attentions=tuple(hooks.decoder_attentions) if hooks.output_attentions else None,
        cross_attentions=tuple(hooks.cross_attentions) if hooks.output_attentions else None,
        decoder_hidden_states=tuple(hooks.decoder_hidden_states) if hooks.output_hidden_states else None,
    )


def _sample(model, generation_config, kwargs, extras):
    """Sampling: transformers' own loop, full recompute each step (the OFA cache is not a
    transformers ``Cache``). ``<pad>`` is suppressed as in fairseq."""
    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    for name in _FAIRSEQ_KNOBS + ("text_only",):
        if kwargs.pop(name, None) not in (None, False):
            raise ValueError(f"`{name}` applies to fairseq's beam search, not to sampling")
    explicit_beams = kwargs.get("num_beams") is not None
    model_kwargs = config.update(**kwargs)
    suppress = list(config.suppress_tokens or [])
    pad = config.pad_token_id if config.pad_token_id is not None else PAD
    if pad not in suppress:
        suppress.append(pad)
    config.suppress_tokens = suppress
    if not explicit_beams:  # the saved num_beams is for beam search: sample plain sequences
        config.num_beams = 1
        config.length_penalty, config.early_stopping = 1.0, False
    # new-token counts as lengths (the decoder prompt is the start token): transformers warns when
    # max_new_tokens meets the saved max_length
    if config.max_new_tokens is not None:
        config.max_length, config.max_new_tokens = config.max_new_tokens + 1, None
    if config.min_new_tokens is not None:
        config.min_length, config.min_new_tokens = config.min_new_tokens + 1, None
    config.use_cache = False
    extras = {k: v for k, v in extras.items() if v is not None}
    return GenerationMixin.generate(model, generation_config=config, **extras, **model_kwargs)
