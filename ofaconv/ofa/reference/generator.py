"""fairseq's SequenceGenerator (as OFA-Sys/OFA ``models/sequence_generator.py`` runs it for
captioning) on top of :class:`~ofaconv.reference.forward.FairseqReference`.

The bookkeeping repeats fairseq's: the decoder starts from ``<s>`` (OFA sets ``tokens[:, 0] =
bos``), ``max_len = max_len_a * src_len + max_len_b`` with steps ``0..max_len`` and EOS forced at
``max_len``, EOS banned before ``min_len``, ``<pad>`` always banned, NaN log-probs set to -inf,
the unk penalty, n-gram blocking over the whole token buffer (``<s>`` included), beam search over
the top ``2 * beam`` of ``beam x V`` cumulative scores (only beam 0 at step 0), EOS candidates
finalized only within the first ``beam`` ranks, scores divided by ``(step + 1) ** lenpen``, and
finished sentences dropped from the batch.

Decoding is incremental, as fairseq's: each step runs only the newest token through the decoder
against the keys and values saved by the earlier steps (reordered with the beams), while the
positions and position biases come from the whole prefix. Prefix tokens, lexical constraints,
LM fusion and image-code generation are out of scope (captioning uses none of them).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ofaconv.core.errors import OfaconvError
from ofaconv.ofa.reference.forward import BOS, EOS, PAD, UNK, FairseqReference


def parse_constraint_range(constraint_range) -> tuple[int, int] | None:
    """fairseq's ``--constraint-range "start,end"`` (or a ``(start, end)`` pair) as two ints."""
    if constraint_range is None:
        return None
    if isinstance(constraint_range, str):
        parts = constraint_range.split(",")
    else:
        parts = list(constraint_range)
    if len(parts) != 2:
        raise OfaconvError(f"constraint_range must be 'start,end', got {constraint_range!r}")
    start, end = (int(p) for p in parts)
    return start, end


def no_repeat_ngram(tokens: Tensor, lprobs: Tensor, step: int, ngram_size: int) -> Tensor:
    """fairseq ``NGramRepeatBlock._no_repeat_ngram``: ban every token that would complete an
    n-gram already present in the row. ``tokens`` is the whole (pad-filled) buffer."""
    rows = tokens.cpu().tolist()
    if step + 2 - ngram_size < 0:
        return lprobs
    for row_idx, row in enumerate(rows):
        seen: dict[tuple[int, ...], list[int]] = {}
        for start in range(len(row) - ngram_size + 1):
            ngram = row[start:start + ngram_size]
            seen.setdefault(tuple(ngram[:-1]), []).append(ngram[-1])
        key = tuple(row[step + 2 - ngram_size:step + 1])
        banned = seen.get(key, [])
        lprobs[row_idx][torch.tensor(banned, dtype=torch.int64)] = -math.inf
    return lprobs


def beam_search_step(step: int, lprobs: Tensor, scores: Tensor | None):
    """fairseq ``search.BeamSearch.step``: top ``2 * beam`` candidates over ``beam x V``.

    ``lprobs`` is [bsz, beam, V]; ``scores`` the cumulative scores [bsz, beam, step].
    Returns (scores, token indices, beam indices), each [bsz, 2 * beam].
    """
    bsz, beam_size, vocab_size = lprobs.size()
    if step == 0:
        # all hypotheses are equal at the first step: expand only beam 0
        lprobs = lprobs[:, ::beam_size, :].contiguous()
    else:
        lprobs = lprobs + scores[:, :, step - 1].unsqueeze(-1)
    flat = lprobs.view(bsz, -1)
    top_scores, top_indices = torch.topk(flat, k=min(beam_size * 2, flat.size(1) - 1))
    beams = top_indices // vocab_size
    indices = top_indices.fmod(vocab_size)
    return top_scores, indices, beams


class SequenceGenerator:
    """Beam search exactly as fairseq/OFA run it for captioning (beam 1 = greedy)."""

    def __init__(self, reference: FairseqReference, *, beam_size: int = 5, max_len_a: float = 0,
                 max_len_b: int = 16, min_len: int = 1, no_repeat_ngram_size: int = 3,
                 lenpen: float = 1.0, temperature: float = 1.0, normalize_scores: bool = True,
                 unk_penalty: float = 0, constraint_range=None):
        if temperature <= 0:
            raise OfaconvError("temperature must be greater than 0")
        if beam_size < 1:
            raise OfaconvError("beam_size must be at least 1")
        self.model = reference
        self.vocab_size = reference.vocab_size
        # the largest usable beam is V - 1 since pad is never selected
        self.beam_size = min(beam_size, self.vocab_size - 1)
        self.max_len_a = max_len_a
        self.max_len_b = max_len_b
        self.min_len = min_len
        self.no_repeat_ngram_size = no_repeat_ngram_size
        self.len_penalty = lenpen
        self.temperature = temperature
        self.normalize_scores = normalize_scores
        self.unk_penalty = unk_penalty
        self.constraint = parse_constraint_range(constraint_range)

    # ----------------------------------------------------------------------------------------

    def _step_lprobs(self, tokens: Tensor, encoder_out: dict[str, Tensor],
                     incremental_state: dict[str, Tensor]) -> Tensor:
        """EnsembleModel.forward_decoder for one model."""
        logits = self.model._decode(tokens, encoder_out, incremental_state)
        logits = logits[:, -1:, :].div_(self.temperature)
        if self.constraint is not None:
            start, end = self.constraint
            logits[:, :, 4:start] = -math.inf
            logits[:, :, end:] = -math.inf
        lprobs = F.log_softmax(logits, dim=-1, dtype=torch.float32)
        return lprobs[:, -1, :]

    @staticmethod
    def _reorder_encoder_out(encoder_out: dict[str, Tensor], new_order: Tensor):
        return {
            "encoder_out": encoder_out["encoder_out"].index_select(1, new_order),
            "padding_mask": encoder_out["padding_mask"].index_select(0, new_order),
            "position_embeddings": encoder_out["position_embeddings"].index_select(0, new_order),
        }

    @torch.no_grad()
    def generate(self, src_tokens: Tensor, patch_images: Tensor | None,
                 patch_masks: Tensor | None = None, *,
                 encoder_out: dict[str, Tensor] | None = None) -> list[list[dict[str, Any]]]:
        """Hypotheses per sentence, best first: dicts with ``tokens`` (LongTensor ending with
        EOS, no BOS), ``score`` (float, length-normalised) and ``positional_scores``.

        ``encoder_out``: the reference's fairseq-layout encoder output for these inputs, if the
        caller already computed it (``FairseqReference._encode``); it is not modified."""
        bsz, src_len = src_tokens.size()[:2]
        beam_size = self.beam_size
        vocab_size = self.vocab_size
        max_len = int(self.max_len_a * src_len + self.max_len_b)
        if self.min_len > max_len:
            raise OfaconvError("min_len cannot be larger than max_len")
        if max_len + 1 > self.model.token_rp_bucket["decoder"].size(0):
            raise OfaconvError(f"max_len {max_len} exceeds the decoder's positions")

        if encoder_out is None:
            encoder_out = self.model._encode(src_tokens, patch_images, patch_masks)
        incremental_state: dict[str, Tensor] = {}
        new_order = torch.arange(bsz).view(-1, 1).repeat(1, beam_size).view(-1)
        new_order = new_order.to(src_tokens.device).long()
        encoder_out = self._reorder_encoder_out(encoder_out, new_order)

        scores = torch.zeros(bsz * beam_size, max_len + 1).to(src_tokens).float()
        tokens = torch.zeros(bsz * beam_size, max_len + 2).to(src_tokens).long().fill_(PAD)
        tokens[:, 0] = BOS
        cands_to_ignore = torch.zeros(bsz, beam_size).to(src_tokens).eq(-1)
        finalized: list[list[dict[str, Tensor]]] = [[] for _ in range(bsz)]
        finished = [False for _ in range(bsz)]
        num_remaining_sent = bsz
        cand_size = 2 * beam_size
        bbsz_offsets = (torch.arange(0, bsz) * beam_size).unsqueeze(1).type_as(tokens)
        cand_offsets = torch.arange(0, cand_size).type_as(tokens)

        reorder_state: Tensor | None = None
        batch_idxs: Tensor | None = None
        for step in range(max_len + 1):  # one extra step for the EOS marker
            if reorder_state is not None:
                if batch_idxs is not None:
                    # account for sentences removed from the batch
                    corr = batch_idxs - torch.arange(batch_idxs.numel()).type_as(batch_idxs)
                    reorder_state.view(-1, beam_size).add_(corr.unsqueeze(-1) * beam_size)
                self.model.reorder_incremental_state(incremental_state, reorder_state)
                encoder_out = self._reorder_encoder_out(encoder_out, reorder_state)

            lprobs = self._step_lprobs(tokens[:, :step + 1], encoder_out, incremental_state)
            if step < self.min_len:
                lprobs[:, EOS] = -math.inf
            lprobs[lprobs != lprobs] = torch.tensor(-math.inf).to(lprobs)
            lprobs[:, PAD] = -math.inf
            lprobs[:, UNK] -= self.unk_penalty
            if step >= max_len:
                lprobs[:, :EOS] = -math.inf
                lprobs[:, EOS + 1:] = -math.inf

            scores = scores.type_as(lprobs)
            if self.no_repeat_ngram_size > 0:
                lprobs = no_repeat_ngram(tokens, lprobs, step, self.no_repeat_ngram_size)

            cand_scores, cand_indices, cand_beams = beam_search_step(
                step, lprobs.view(bsz, -1, vocab_size),
                scores.view(bsz, beam_size, -1)[:, :, :step])
            cand_bbsz_idx = cand_beams.add(bbsz_offsets)

            # finalize hypotheses that end in EOS, but only among the first beam_size candidates
            eos_mask = cand_indices.eq(EOS) & cand_scores.ne(-math.inf)
            eos_mask[:, :beam_size][cands_to_ignore] = torch.tensor(0).to(eos_mask)
            eos_bbsz_idx = torch.masked_select(cand_bbsz_idx[:, :beam_size],
                                               mask=eos_mask[:, :beam_size])
            finalized_sents: list[int] = []
            if eos_bbsz_idx.numel() > 0:
                eos_scores = torch.masked_select(cand_scores[:, :beam_size],
                                                 mask=eos_mask[:, :beam_size])
                finalized_sents = self._finalize_hypos(
                    step, eos_bbsz_idx, eos_scores, tokens, scores, finalized, finished,
                    beam_size, max_len)
                num_remaining_sent -= len(finalized_sents)

            assert num_remaining_sent >= 0
            if num_remaining_sent == 0:
                break
            assert step < max_len, f"{step} < {max_len}"

            # drop sentences that have beam_size finished hypotheses
            if len(finalized_sents) > 0:
                new_bsz = bsz - len(finalized_sents)
                batch_mask = torch.ones(bsz, dtype=torch.bool, device=cand_indices.device)
                batch_mask[finalized_sents] = False
                batch_idxs = torch.arange(bsz, device=cand_indices.device).masked_select(
                    batch_mask)
                eos_mask = eos_mask[batch_idxs]
                cand_beams = cand_beams[batch_idxs]
                bbsz_offsets.resize_(new_bsz, 1)
                cand_bbsz_idx = cand_beams.add(bbsz_offsets)
                cand_scores = cand_scores[batch_idxs]
                cand_indices = cand_indices[batch_idxs]
                cands_to_ignore = cands_to_ignore[batch_idxs]
                scores = scores.view(bsz, -1)[batch_idxs].view(new_bsz * beam_size, -1)
                tokens = tokens.view(bsz, -1)[batch_idxs].view(new_bsz * beam_size, -1)
                bsz = new_bsz
            else:
                batch_idxs = None

            # pick the beam_size best candidates that do not end in EOS: EOS (and ignored)
            # candidates get an offset of cand_size so the smallest values are the active ones
            eos_mask[:, :beam_size] = ~((~cands_to_ignore) & (~eos_mask[:, :beam_size]))
            active_mask = torch.add(eos_mask.type_as(cand_offsets) * cand_size,
                                    cand_offsets[:eos_mask.size(1)])
            new_cands_to_ignore, active_hypos = torch.topk(active_mask, k=beam_size, dim=1,
                                                           largest=False)
            cands_to_ignore = new_cands_to_ignore.ge(cand_size)[:, :beam_size]
            assert (~cands_to_ignore).any(dim=1).all()

            active_bbsz_idx = torch.gather(cand_bbsz_idx, dim=1, index=active_hypos).view(-1)
            tokens[:, :step + 1] = torch.index_select(tokens[:, :step + 1], dim=0,
                                                      index=active_bbsz_idx)
            tokens.view(bsz, beam_size, -1)[:, :, step + 1] = torch.gather(
                cand_indices, dim=1, index=active_hypos)
            if step > 0:
                scores[:, :step] = torch.index_select(scores[:, :step], dim=0,
                                                      index=active_bbsz_idx)
            scores.view(bsz, beam_size, -1)[:, :, step] = torch.gather(
                cand_scores, dim=1, index=active_hypos)
            reorder_state = active_bbsz_idx

        results = []
        for hypos in finalized:
            sent_scores = torch.tensor([float(h["score"].item()) for h in hypos])
            _, order = torch.sort(sent_scores, descending=True)
            results.append([
                {"tokens": hypos[i]["tokens"], "score": float(hypos[i]["score"].item()),
                 "positional_scores": hypos[i]["positional_scores"]}
                for i in order.tolist()
            ])
        return results

    def _finalize_hypos(self, step: int, bbsz_idx: Tensor, eos_scores: Tensor, tokens: Tensor,
                        scores: Tensor, finalized: list[list[dict[str, Tensor]]],
                        finished: list[bool], beam_size: int, max_len: int) -> list[int]:
        """Store hypotheses that just produced EOS; return the (current-batch) indices of the
        sentences that became finished."""
        tokens_clone = tokens.index_select(0, bbsz_idx)[:, 1:step + 2]  # drop the BOS
        tokens_clone[:, step] = EOS

        pos_scores = scores.index_select(0, bbsz_idx)[:, :step + 1]
        pos_scores[:, step] = eos_scores
        pos_scores[:, 1:] = pos_scores[:, 1:] - pos_scores[:, :-1]  # cumulative -> per token
        if self.normalize_scores:
            eos_scores /= (step + 1) ** self.len_penalty

        # map indices in the (possibly reduced) batch back to the original sentences
        cum_unfin: list[int] = []
        prev = 0
        for f in finished:
            if f:
                prev += 1
            else:
                cum_unfin.append(prev)
        cum_fin_tensor = torch.tensor(cum_unfin, dtype=torch.int).to(bbsz_idx)
        unfin_idx = bbsz_idx // beam_size
        sent = unfin_idx + torch.index_select(cum_fin_tensor, 0, unfin_idx)
        seen = (sent << 32) + unfin_idx
        unique_seen: list[int] = torch.unique(seen).tolist()

        sent_list: list[int] = sent.tolist()
        for i in range(bbsz_idx.size(0)):
            if len(finalized[sent_list[i]]) < beam_size:
                finalized[sent_list[i]].append({
                    "tokens": tokens_clone[i],
                    "score": eos_scores[i],
                    "positional_scores": pos_scores[i],
                })

        newly_finished: list[int] = []
        for unique_s in unique_seen:
            unique_sent = unique_s >> 32
            unique_unfin_idx = unique_s - (unique_sent << 32)
            if not finished[unique_sent] and (
                    len(finalized[unique_sent]) == beam_size or step == max_len):
                finished[unique_sent] = True
                newly_finished.append(unique_unfin_idx)
        return newly_finished
