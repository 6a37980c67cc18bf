"""OFA folders as ONNX graphs (``ofaconv export onnx``), and captions from onnxruntime alone.

Every axis named here is dynamic; ``rows`` is sentences (encoder) or sentences x beams (decoder),
``len`` is image patches + prompt tokens, ``d`` the model width, ``hd`` the head width.

``encoder.onnx``
    inputs   ``input_ids`` [rows, src] int64, ``patch_images`` [rows, 3, S, S] float32,
             ``patch_masks`` [rows] bool
    outputs  ``last_hidden_state`` [rows, len, d], and what every decoder step reads from the
             encoder, computed once by the decoder's own first step: ``encoder_padding_mask``
             [rows, len] bool, ``cross_pos_key`` [rows, heads, len, hd], ``cross_key.{i}`` and
             ``cross_value.{i}`` [rows * heads, len, hd] for each decoder layer ``i``
``decoder.onnx``  one step; the first step gets a past of length 0
    inputs   ``input_ids`` [rows, 1] (the newest token), ``encoder_padding_mask``,
             ``cross_pos_key``, ``cross_key.{i}``, ``cross_value.{i}``, ``past_key.{i}`` and
             ``past_value.{i}`` [rows * heads, past, hd]
    outputs  ``logits`` [rows, vocab] float32, ``present_key.{i}`` and ``present_value.{i}``
             [rows * heads, past + 1, hd]
``onnx_generation.json``
    the folder's search settings (``generation_config.json`` resolved as ``generate`` resolves
    it), the caption prompt and its ids, the image pre-processing and the decoder's shape.

:class:`OnnxCaptioner` runs fairseq's beam search (``generation_ofa.fairseq_search``, step for
step) in numpy over the two graphs; its captions equal ``model.generate``'s token for token, which
the export checks at beam 1 and 5. Everything above the export section imports numpy and
onnxruntime only (PIL for :meth:`OnnxCaptioner.pixels`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["OnnxCaptioner", "export_onnx", "ENCODER", "DECODER", "SETTINGS"]

ENCODER, DECODER, SETTINGS = "encoder.onnx", "decoder.onnx", "onnx_generation.json"
_NEG_INF = np.float32(-np.inf)


def encoder_outputs(layers: int) -> list[str]:
    return ["last_hidden_state", "encoder_padding_mask", "cross_pos_key", *_per_layer(layers, "cross")]


def _per_layer(layers: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kv}.{i}" for i in range(layers) for kv in ("key", "value")]


# -- runtime: numpy and onnxruntime ---------------------------------------------------------------
class OnnxCaptioner:
    """Captions from ``encoder.onnx`` + ``decoder.onnx`` in ``folder`` (what ``ofaconv export onnx`` wrote)."""

    def __init__(self, folder, *, threads: int | None = None, providers=None):
        import onnxruntime as ort

        folder = Path(folder)
        self.settings = json.loads((folder / SETTINGS).read_text(encoding="utf-8"))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = providers or ["CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(str(folder / ENCODER), options, providers=providers)
        self.decoder = ort.InferenceSession(str(folder / DECODER), options, providers=providers)

    def pixels(self, images) -> np.ndarray:
        """``patch_images`` [n, 3, S, S] of image paths or PIL images, as the folder's processor makes them."""
        from PIL import Image

        spec = self.settings["image"]
        mean = np.asarray(spec["mean"], dtype=np.float32)[:, None, None]
        std = np.asarray(spec["std"], dtype=np.float32)[:, None, None]
        out = []
        for image in images:
            pil = image if isinstance(image, Image.Image) else Image.open(image)
            pil = pil.convert("RGB").resize((spec["width"], spec["height"]), resample=spec["resample"])
            array = np.asarray(pil, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / 255
            out.append((array - mean) / std)
        return np.stack(out).astype(np.float32, copy=False)

    def prompt_ids(self, rows: int) -> np.ndarray:
        """The caption prompt's ``input_ids``, one row per image."""
        ids = self.settings.get("prompt_ids")
        if ids is None:
            raise ValueError("this export has no caption prompt (the folder had no processor): pass input_ids")
        return np.tile(np.asarray(ids, dtype=np.int64), (rows, 1))

    def generate(self, input_ids, patch_images, patch_masks=None, *, num_beams: int | None = None) -> np.ndarray:
        """Token ids as ``model.generate`` returns them: [rows, T], ``<s>`` ... ``</s>``, right-padded."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        patch_images = np.asarray(patch_images, dtype=np.float32)
        patch_masks = np.ones(len(input_ids), dtype=bool) if patch_masks is None else np.asarray(patch_masks, bool)
        search = dict(self.settings["search"])
        if num_beams is not None:
            search["beam_size"] = int(num_beams)
        outputs = self.encoder.run(None, {"input_ids": input_ids, "patch_images": patch_images,
                                          "patch_masks": patch_masks})
        state = _DecoderState(self.decoder, dict(zip(encoder_outputs(self.settings["decoder_layers"]), outputs)),
                              self.settings)
        hypos = fairseq_search(state, search, len(input_ids), input_ids.shape[1], self.settings["vocab_size"])
        return _pack([h[0]["tokens"] for h in hypos], search)

    def caption_ids(self, images, *, num_beams: int | None = None) -> np.ndarray:
        pixels = self.pixels(images)
        return self.generate(self.prompt_ids(len(pixels)), pixels, num_beams=num_beams)


class _DecoderState:
    """The decoder's inputs between steps: the encoder's tensors and the growing keys/values, one
    row per hypothesis (tensors of [rows * heads, ...] are selected in blocks of ``heads``)."""

    def __init__(self, session, encoded: dict, settings: dict):
        self.session = session
        self.layers = settings["decoder_layers"]
        self.heads = settings["decoder_attention_heads"]
        self.cross = {k: v for k, v in encoded.items() if k != "last_hidden_state"}
        rows = len(encoded["encoder_padding_mask"])
        empty = np.zeros((rows * self.heads, 0, settings["head_dim"]), dtype=np.float32)
        self.past = {name: empty for name in _per_layer(self.layers, "past")}

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        outputs = self.session.run(None, {"input_ids": input_ids, **self.cross, **self.past})
        self.past = dict(zip(_per_layer(self.layers, "past"), outputs[1:]))
        return outputs[0]

    def select(self, index: np.ndarray, *, cross: bool) -> None:
        """Keep (and repeat) the rows ``index``: the growing keys/values, and with ``cross`` the
        encoder's tensors (identical across a sentence's beams, so reordering beams skips them)."""
        self.past = {k: self._rows(v, index) for k, v in self.past.items()}
        if cross:
            self.cross = {k: self._rows(v, index) for k, v in self.cross.items()}

    def _rows(self, value: np.ndarray, index: np.ndarray) -> np.ndarray:
        if value.ndim == 3:  # [rows * heads, len, hd]
            by_row = value.reshape(-1, self.heads, *value.shape[1:])
            return by_row[index].reshape(-1, *value.shape[1:])
        return value[index]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _topk(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``torch.topk`` along the last axis: the k largest, largest first (ties: lower index first)."""
    part = np.argpartition(-values, k - 1, axis=1)[:, :k]
    picked = np.take_along_axis(values, part, axis=1)
    order = np.lexsort((part, -picked), axis=1)
    index = np.take_along_axis(part, order, axis=1)
    return np.take_along_axis(values, index, axis=1), index


def _block_repeated_ngrams(tokens: np.ndarray, lprobs: np.ndarray, step: int, n: int) -> None:
    """fairseq ``NGramRepeatBlock`` (as ``generation_ofa.block_repeated_ngrams``)."""
    if step + 2 - n < 0 or step + 1 < n:
        return
    prefix = tokens[:, : step + 1]
    windows = np.lib.stride_tricks.sliding_window_view(prefix, n, axis=1)  # [rows, step + 2 - n, n]
    key = prefix[:, step + 2 - n :]
    rows, starts = np.nonzero((windows[:, :, :-1] == key[:, None, :]).all(axis=-1))
    if rows.size:
        lprobs[rows, windows[rows, starts, -1]] = _NEG_INF


def fairseq_search(state: _DecoderState, s: dict, bsz: int, src_len: int, vocab_size: int) -> list[list[dict]]:
    """``generation_ofa.fairseq_search`` in numpy (fairseq's ``SequenceGenerator`` with
    ``BeamSearch``; beam 1 is greedy): per sentence, its finished hypotheses best first, each
    ``{"tokens": [..., eos], "score": float}``."""
    beam = min(s["beam_size"], vocab_size - 1)
    bos, pad, eos, unk = s["bos"], s["pad"], s["eos"], s["unk"]
    max_len = int(s["max_len_a"] * src_len + s["max_len_b"])
    if s["min_len"] > max_len:
        raise ValueError(f"min_len ({s['min_len']}) cannot be larger than max_len ({max_len})")
    tokens = np.full((bsz * beam, max_len + 2), pad, dtype=np.int64)
    tokens[:, 0] = bos
    scores = np.zeros((bsz * beam, max_len + 1), dtype=np.float32)
    cands_to_ignore = np.zeros((bsz, beam), dtype=bool)
    finalized: list[list[dict]] = [[] for _ in range(bsz)]
    finished = [False] * bsz
    num_remaining = bsz
    sentence_of_row = list(range(bsz))
    cand_size = 2 * beam
    bbsz_offsets = (np.arange(bsz) * beam)[:, None]
    cand_offsets = np.arange(cand_size)
    reorder_state = batch_idxs = None
    for step in range(max_len + 1):
        if step == 0:  # every beam of a sentence starts alike: one row per sentence, then repeat
            lprobs = _lprobs(state, tokens[::beam, :1], s)
            expand = np.repeat(np.arange(bsz), beam)
            state.select(expand, cross=True)
            lprobs = lprobs[expand]
        else:
            if batch_idxs is not None:
                corr = batch_idxs - np.arange(batch_idxs.size)
                reorder_state = (reorder_state.reshape(-1, beam) + corr[:, None] * beam).reshape(-1)
            state.select(reorder_state, cross=batch_idxs is not None)
            lprobs = _lprobs(state, tokens[:, step : step + 1], s)

        if step < s["min_len"]:
            lprobs[:, eos] = _NEG_INF
        lprobs[np.isnan(lprobs)] = _NEG_INF
        lprobs[:, pad] = _NEG_INF
        lprobs[:, unk] -= np.float32(s["unk_penalty"])
        if step >= max_len:
            lprobs[:, :eos] = _NEG_INF
            lprobs[:, eos + 1 :] = _NEG_INF
        if s["no_repeat_ngram_size"] > 0:
            _block_repeated_ngrams(tokens, lprobs, step, s["no_repeat_ngram_size"])

        lp = lprobs.reshape(bsz, -1, vocab_size)
        if step == 0:
            lp = lp[:, ::beam, :]
        else:
            lp = lp + scores.reshape(bsz, beam, -1)[:, :, step - 1][:, :, None]
        flat = lp.reshape(bsz, -1)
        cand_scores, flat_idx = _topk(flat, min(cand_size, flat.shape[1] - 1))
        cand_beams = flat_idx // vocab_size
        cand_indices = flat_idx % vocab_size
        cand_bbsz_idx = cand_beams + bbsz_offsets

        eos_mask = (cand_indices == eos) & (cand_scores != _NEG_INF)
        eos_mask[:, :beam][cands_to_ignore] = False
        top_eos = eos_mask[:, :beam]
        finalized_rows: list[int] = []
        if top_eos.any():
            finalized_rows = _finalize(step, cand_bbsz_idx[:, :beam][top_eos], cand_scores[:, :beam][top_eos],
                                       tokens, scores, finalized, finished, sentence_of_row, beam, max_len, s)
            num_remaining -= len(finalized_rows)
        if num_remaining == 0:
            break
        if step >= max_len:
            raise RuntimeError(f"search did not finish at max_len {max_len}")

        if finalized_rows:  # drop sentences that have beam finished hypotheses
            keep = np.ones(bsz, dtype=bool)
            keep[finalized_rows] = False
            batch_idxs = np.nonzero(keep)[0]
            new_bsz = batch_idxs.size
            sentence_of_row = [sentence_of_row[i] for i in batch_idxs]
            eos_mask, cand_beams = eos_mask[batch_idxs], cand_beams[batch_idxs]
            bbsz_offsets = (np.arange(new_bsz) * beam)[:, None]
            cand_bbsz_idx = cand_beams + bbsz_offsets
            cand_scores, cand_indices = cand_scores[batch_idxs], cand_indices[batch_idxs]
            cands_to_ignore = cands_to_ignore[batch_idxs]
            scores = scores.reshape(bsz, -1)[batch_idxs].reshape(new_bsz * beam, -1)
            tokens = tokens.reshape(bsz, -1)[batch_idxs].reshape(new_bsz * beam, -1)
            bsz = new_bsz
        else:
            batch_idxs = None

        # the beam best candidates not ending in EOS: EOS and ignored ones sort after the others
        eos_mask[:, :beam] = cands_to_ignore | eos_mask[:, :beam]
        active_mask = eos_mask.astype(np.int64) * cand_size + cand_offsets[: eos_mask.shape[1]]
        active_hypos = np.argsort(active_mask, axis=1, kind="stable")[:, :beam]
        cands_to_ignore = np.take_along_axis(active_mask, active_hypos, axis=1) >= cand_size
        if not (~cands_to_ignore).any(axis=1).all():
            raise RuntimeError("beam search has no active hypothesis left for a sentence")
        active_bbsz_idx = np.take_along_axis(cand_bbsz_idx, active_hypos, axis=1).reshape(-1)
        tokens[:, : step + 1] = tokens[active_bbsz_idx, : step + 1]
        tokens.reshape(bsz, beam, -1)[:, :, step + 1] = np.take_along_axis(cand_indices, active_hypos, axis=1)
        if step > 0:
            scores[:, :step] = scores[active_bbsz_idx, :step]
        scores.reshape(bsz, beam, -1)[:, :, step] = np.take_along_axis(cand_scores, active_hypos, axis=1)
        reorder_state = active_bbsz_idx

    results = []
    for hypos in finalized:
        order = np.argsort(-np.asarray([h["score"] for h in hypos], dtype=np.float32), kind="stable")
        results.append([hypos[i] for i in order])
    return results


def _lprobs(state: _DecoderState, input_ids: np.ndarray, s: dict) -> np.ndarray:
    """fairseq: logits over the temperature, the constraint range masked, log-softmax in fp32."""
    logits = state.logits(np.ascontiguousarray(input_ids)).astype(np.float32, copy=False)
    logits = logits / np.float32(s["temperature"])
    if s.get("constraint_range") is not None:
        start, end = s["constraint_range"]
        logits[:, 4:start] = _NEG_INF
        logits[:, end:] = _NEG_INF
    return _log_softmax(logits)


def _finalize(step, bbsz_idx, eos_scores, tokens, scores, finalized, finished, sentence_of_row, beam, max_len,
              s) -> list[int]:
    """Store hypotheses that just produced EOS; return the batch rows of sentences now finished."""
    hypo_tokens = tokens[bbsz_idx, 1 : step + 2].copy()
    hypo_tokens[:, step] = s["eos"]
    if s["normalize_scores"]:
        eos_scores = eos_scores / np.float32((step + 1) ** s["lenpen"])
    touched: dict[int, int] = {}
    for i, row in enumerate((bbsz_idx // beam).tolist()):
        sent = sentence_of_row[row]
        touched.setdefault(sent, row)
        if len(finalized[sent]) < beam:
            finalized[sent].append({"tokens": hypo_tokens[i].tolist(), "score": float(eos_scores[i])})
    newly_finished = []
    for sent in sorted(touched):
        if not finished[sent] and (len(finalized[sent]) == beam or step == max_len):
            finished[sent] = True
            newly_finished.append(touched[sent])
    return newly_finished


def _pack(rows: list[list[int]], s: dict) -> np.ndarray:
    out = np.full((len(rows), 1 + max(len(r) for r in rows)), s["pad"], dtype=np.int64)
    out[:, 0] = s["bos"]
    for i, row in enumerate(rows):
        out[i, 1 : 1 + len(row)] = row
    return out


# -- export: torch ---------------------------------------------------------------------------------
# generation_config.json fields that ask for more than fairseq's search (the ONNX search does not
# run transformers' logits processors), with the value that means "off".
_UNSUPPORTED = {"do_sample": False, "repetition_penalty": 1.0, "bad_words_ids": None, "suppress_tokens": None,
                "begin_suppress_tokens": None, "sequence_bias": None, "forced_bos_token_id": None,
                "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0,
                "exponential_decay_length_penalty": None, "num_return_sequences": 1}
_SEARCH_KEYS = ("beam_size", "max_len_a", "max_len_b", "min_len", "no_repeat_ngram_size", "lenpen", "normalize_scores",
                "unk_penalty", "temperature", "constraint_range", "bos", "pad", "eos", "unk")
_PROBE_SEED = 0


def export_onnx(folder, out, *, threads: int | None = None) -> dict:
    """The family hook (:mod:`ofaconv.core.export`): write ``encoder.onnx``, ``decoder.onnx`` and
    ``onnx_generation.json`` into ``out`` and measure them against the folder's PyTorch model."""
    import torch

    from ofaconv.core.export import trace

    folder, out = Path(folder), Path(out)
    model = _load_model(folder)
    settings = _settings(model, folder)
    layers = settings["decoder_layers"]
    prompt = settings["prompt_ids"] or [0, *range(4, 12), 2]
    size = model.config.patch_image_size
    # The example has a padded prompt and a masked image, so tracing records the padding branch
    # of the encoder: exact for unpadded input too (it multiplies by 1 and masks nothing).
    ids = torch.tensor([prompt, prompt[:-2] + [prompt[-1], model.config.pad_token_id]])
    pixels = torch.zeros(2, 3, size, size)
    masks = torch.tensor([True, False])
    encoder, decoder = _graphs(model)
    enc_out = encoder_outputs(layers)
    cross_axes = {"encoder_padding_mask": {0: "rows", 1: "len"}, "cross_pos_key": {0: "rows", 2: "len"},
                  **{n: {0: "rows_x_heads", 1: "len"} for n in _per_layer(layers, "cross")}}
    with torch.no_grad():  # also fills the model's bucket-table cache: the graphs get the tables, not their making
        encoded = encoder(ids, pixels, masks)[1:]
    trace(encoder, (ids, pixels, masks), out / ENCODER, inputs=["input_ids", "patch_images", "patch_masks"],
          outputs=enc_out, dynamic_axes={"input_ids": {0: "rows", 1: "src"}, "patch_images": {0: "rows"},
                                         "patch_masks": {0: "rows"}, "last_hidden_state": {0: "rows", 1: "len"},
                                         **cross_axes})
    heads, head_dim = settings["decoder_attention_heads"], settings["head_dim"]
    past = [torch.zeros(2 * heads, 3, head_dim) for _ in range(2 * layers)]
    step_ids = torch.tensor([[5], [6]])
    dec_in = ["input_ids", *enc_out[1:], *_per_layer(layers, "past")]
    dec_out = ["logits", *_per_layer(layers, "present")]
    trace(decoder, (step_ids, *encoded, *past), out / DECODER, inputs=dec_in, outputs=dec_out,
          dynamic_axes={"input_ids": {0: "rows"}, "logits": {0: "rows"}, **cross_axes,
                        **{n: {0: "rows_x_heads", 1: "past"} for n in _per_layer(layers, "past")},
                        **{n: {0: "rows_x_heads", 1: "past_plus_1"} for n in _per_layer(layers, "present")}})
    (out / SETTINGS).write_text(json.dumps(settings, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                encoding="utf-8")
    graphs = {ENCODER: {"inputs": ["input_ids", "patch_images", "patch_masks"], "outputs": enc_out},
              DECODER: {"inputs": dec_in, "outputs": dec_out}}
    return {"graphs": graphs, "checks": _parity(model, encoder, out, prompt, threads)}


def _load_model(folder: Path):
    import torch
    from transformers.utils import logging as hf_logging

    from ofaconv.core.errors import OfaconvError
    from .modeling import OFAForConditionalGeneration

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = OFAForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise OfaconvError(f"cannot load the model ({str(exc).splitlines()[0][:200]})", path=folder) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval()


def _settings(model, folder: Path) -> dict:
    """``onnx_generation.json``: the search as ``generate`` resolves the folder's generation config."""
    from dataclasses import asdict

    from ofaconv.core.errors import OfaconvError
    from .modeling.generation_ofa import resolve_settings

    config = model.generation_config
    asked = [k for k, off in _UNSUPPORTED.items() if getattr(config, k, None) not in (None, off, [], False)]
    if asked:
        raise OfaconvError(f"the ONNX search runs fairseq's beam search only, not {', '.join(asked)}; "
                           "remove it from generation_config.json or caption with PyTorch",
                           path=folder / "generation_config.json", key=asked[0])
    search = asdict(resolve_settings(model, None, {})[0])
    prompt = prompt_ids = image = None
    family = None
    try:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, KeyError):
        processor = None
    if processor is not None:
        prompt = getattr(processor, "prompt", None)
        family = getattr(processor, "family", None)
        if prompt is not None:
            prompt_ids = processor.tokenizer([prompt])["input_ids"][0]
        ip = processor.image_processor
        image = {"height": ip.size["height"], "width": ip.size["width"], "resample": int(ip.resample),
                 "mean": [float(v) for v in ip.image_mean], "std": [float(v) for v in ip.image_std]}
    cfg = model.config
    return {
        "search": {k: search[k] for k in _SEARCH_KEYS},
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "family": family,
        "image": image,
        "vocab_size": cfg.vocab_size,
        "decoder_layers": cfg.decoder_layers,
        "decoder_attention_heads": cfg.decoder_attention_heads,
        "head_dim": cfg.d_model // cfg.decoder_attention_heads,
    }


def _graphs(model):
    """The two graphs as modules around ``model``: the encoder (plus the decoder's first step on
    ``<s>``, run only for the cache it fills: the cross-attention keys/values and position keys
    every later step reads), and one decoder step from the newest token and the past."""
    import torch

    from .modeling import OFADecoderCache
    from .modeling.modeling_ofa import OFAEncoderOutput

    layers = model.config.decoder_layers

    class EncoderGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, patch_images, patch_masks):
            enc = self.model.get_encoder()(input_ids=input_ids, patch_images=patch_images, patch_masks=patch_masks)
            cache = OFADecoderCache(layers)
            start = torch.full_like(input_ids[:, :1], self.model.config.decoder_start_token_id)
            self.model(decoder_input_ids=start, encoder_outputs=enc, past_key_values=cache, use_cache=True)
            return (enc.last_hidden_state, enc.padding_mask, cache.cross_pos_key, *[t for kv in cache.cross_kv for t in kv])

    class DecoderGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, encoder_padding_mask, cross_pos_key, *kv):
            cross, past = kv[: 2 * layers], kv[2 * layers :]
            cache = OFADecoderCache(layers)
            cache.cross_kv = [(cross[2 * i], cross[2 * i + 1]) for i in range(layers)]
            cache.self_kv = [(past[2 * i], past[2 * i + 1]) for i in range(layers)]
            cache.cross_pos_key = cross_pos_key
            enc = OFAEncoderOutput(last_hidden_state=None, padding_mask=encoder_padding_mask, position_embedding=None)
            out = self.model(decoder_input_ids=input_ids, encoder_outputs=enc, past_key_values=cache, use_cache=True)
            return (out.logits[:, -1, :], *[t for kv in cache.self_kv for t in kv])

    return EncoderGraph().eval(), DecoderGraph().eval()


def _probe(model, prompt: list[int], rows: int, *, varied: bool):
    """``rows`` random images with the prompt; ``varied`` (rows > 1): prompts longer than the traced
    example, one padded, and the last image masked."""
    import torch

    size = model.config.patch_image_size
    generator = torch.Generator().manual_seed(_PROBE_SEED + rows)
    pixels = torch.rand(rows, 3, size, size, generator=generator) * 2 - 1
    masks = torch.ones(rows, dtype=torch.bool)
    ids = [prompt] * rows
    if varied and rows > 1:
        longer = prompt[:-1] + [4, 5, 6, 7] + prompt[-1:]
        ids = [longer, prompt + [model.config.pad_token_id] * 4] + [longer] * (rows - 2)
        masks[-1] = False
    return torch.tensor(ids), pixels, masks


def _parity(model, encoder, out: Path, prompt: list[int], threads) -> list[dict]:
    """Encoder outputs and decoder logits (four cached steps vs a full forward) at batch 1 and 3
    (batch 3: prompts of two lengths, one image masked), and captions at beam 1 and 5 (batch 3),
    against PyTorch."""
    import torch

    from ofaconv.core.export import inference_session, max_abs_diff, parity_row

    enc_session = inference_session(out / ENCODER, threads)
    dec_session = inference_session(out / DECODER, threads)
    settings = json.loads((out / SETTINGS).read_text(encoding="utf-8"))
    names = encoder_outputs(settings["decoder_layers"])
    checks = []
    for rows in (1, 3):
        ids, pixels, masks = _probe(model, prompt, rows, varied=True)
        with torch.no_grad():
            expected = [t.numpy() for t in encoder(ids, pixels, masks)]
            got = enc_session.run(None, {"input_ids": ids.numpy(), "patch_images": pixels.numpy(),
                                         "patch_masks": masks.numpy()})
            checks.append(parity_row(f"encoder_batch{rows}", max(map(max_abs_diff, got, expected)),
                                     detail=f"{len(names)} outputs" + (", prompts of two lengths, one padded, "
                                                                       "last image masked" if rows > 1 else "")))
            prefix = torch.tensor([[model.config.decoder_start_token_id, 5, 6, 7]] * rows)
            enc = model.get_encoder()(input_ids=ids, patch_images=pixels, patch_masks=masks)
            full = model(decoder_input_ids=prefix, encoder_outputs=enc, use_cache=False).logits.numpy()
        state = _DecoderState(dec_session, dict(zip(names, expected)), settings)
        steps = [state.logits(prefix[:, i : i + 1].numpy()) for i in range(prefix.shape[1])]
        checks.append(parity_row(f"decoder_batch{rows}", max(max_abs_diff(s, full[:, i]) for i, s in enumerate(steps)),
                                 detail=f"logits of {prefix.shape[1]} cached steps vs a full forward"))
    captioner = OnnxCaptioner(out, threads=threads)
    ids, pixels, masks = _probe(model, prompt, 3, varied=False)
    for beams in (1, 5):
        with torch.no_grad():
            expected = model.generate(input_ids=ids, patch_images=pixels, patch_masks=masks, num_beams=beams).numpy()
        got = captioner.generate(ids.numpy(), pixels.numpy(), masks.numpy(), num_beams=beams)
        differing = len(got) if got.shape != expected.shape else int((got != expected).any(axis=1).sum())
        checks.append(parity_row(f"caption_beam{beams}", differing, gate=0, metric="rows_differing",
                                 detail=f"3 captions, onnxruntime search vs model.generate (beam {beams})"))
    return checks
