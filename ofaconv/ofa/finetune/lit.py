"""LiT-tuning pieces: what is frozen, the caption loss, and sharing work across captions of one image.

- ``apply_freezing``: the ResNet trunk and encoder frozen and *pinned* in eval mode (the Trainer
  calls ``model.train()`` every step; a pinned module ignores it, so BatchNorm running statistics
  and encoder dropout never move: the defect of the seed, ofa.md §F #23), optionally the shared
  word embedding, and the decoder parameters a caption step never reaches (image-code
  generation) so that DDP and the optimizer only see what trains.
- ``caption_loss``: token cross-entropy that ignores padding (the seed counted pad targets,
  ofa.md §F #20) with fairseq's label smoothing, normalised by the number of target tokens in
  the whole accumulated (and distributed) batch.
- ``logits_at_targets``: the vocabulary projection (the largest per-token cost of a LiT step at
  OFA-CN size) runs only at target positions, not at padding.
- ``shared_encoder_rows``: when several captions of one image are in a batch, the decoder's
  cross-attention keys and values of that image are computed once and all its captions attend to
  them together, the ``seq_per_img`` trick of captioning trainers. Exact: the rows are identical,
  so the gradient of the projection is the same sum.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FreezeReport", "apply_freezing", "pin_eval", "caption_loss", "logits_at_targets", "shared_encoder_rows",
           "first_rows"]


def _eval_only_train(self, mode: bool = True):
    return nn.Module.train(self, False)


def pin_eval(module: nn.Module) -> None:
    """Put ``module`` in eval mode and keep it there whatever ``train()`` its parents receive."""
    module.train = types.MethodType(_eval_only_train, module)
    nn.Module.train(module, False)


def is_pinned(module: nn.Module) -> bool:
    return getattr(module.__dict__.get("train"), "__func__", None) is _eval_only_train


@dataclass
class FreezeReport:
    trainable: int = 0
    frozen: int = 0
    unused: list = field(default_factory=list)  # names frozen because a caption step never reaches them
    pinned: list = field(default_factory=list)  # modules kept in eval mode

    def as_dict(self) -> dict:
        return {"trainable_parameters": self.trainable, "frozen_parameters": self.frozen,
                "unused_frozen": self.unused, "eval_pinned": self.pinned}


def apply_freezing(
    model: nn.Module,
    *,
    freeze_encoder: bool,
    freeze_word_embed: bool,
    freeze_batchnorm: bool,
    probe=None,
) -> FreezeReport:
    """Set ``requires_grad`` and eval pins on an ``OFAForConditionalGeneration``.

    ``probe``: a callable ``probe(model) -> loss`` running one caption step; parameters that get no
    gradient from it are frozen too (they belong to tasks other than captioning).
    """
    report = FreezeReport()
    shared = model.get_input_embeddings().weight
    for param in model.parameters():
        param.requires_grad_(True)
    if freeze_encoder:
        for param in model.get_encoder().parameters():
            if param is not shared:
                param.requires_grad_(False)
        pin_eval(model.get_encoder())
        report.pinned.append("encoder")
    if freeze_word_embed:
        shared.requires_grad_(False)
    if freeze_batchnorm:
        count = 0
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                if not is_pinned(module):
                    pin_eval(module)
                    count += 1
        if count:
            report.pinned.append(f"{count} BatchNorm layers")

    if probe is not None:
        for param in model.parameters():
            param.grad = None
        was_training = model.training
        model.train()
        loss = probe(model)
        loss.backward()
        names = {id(p): n for n, p in model.named_parameters()}
        for param in model.parameters():
            if param.requires_grad and param.grad is None:
                param.requires_grad_(False)
                report.unused.append(names[id(param)])
            param.grad = None
        model.train(was_training)

    seen = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        if param.requires_grad:
            report.trainable += param.numel()
        else:
            report.frozen += param.numel()
    return report


def caption_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed loss, summed NLL, number of target tokens) over non-ignored positions, in fp32.

    ``logits`` are [B, T, V], or [N, V] already restricted to the N target positions
    (``logits_at_targets``).

    Label smoothing follows fairseq's ``label_smoothed_nll_loss``: the smoothing mass eps is spread
    over the other V-1 classes, ``(1 - eps - eps/(V-1)) * nll + eps/(V-1) * sum(-log p)``.
    """
    mask = labels.ne(ignore_index)
    target = labels[mask]
    selected = logits if logits.dim() == 2 else logits[mask]
    lprobs = F.log_softmax(selected.float(), dim=-1)
    nll = -lprobs.gather(1, target.unsqueeze(1)).squeeze(1)
    if label_smoothing > 0:
        eps_i = label_smoothing / (lprobs.shape[-1] - 1)
        smooth = -lprobs.sum(dim=-1)
        loss = (1.0 - label_smoothing - eps_i) * nll + eps_i * smooth
    else:
        loss = nll
    return loss.sum(), nll.detach().sum(), mask.sum()


@contextlib.contextmanager
def logits_at_targets(model: nn.Module, mask: torch.Tensor | None):
    """Within the block, the model's logits are [N, V] for the N positions where ``mask`` [B, T] is True."""
    if mask is None:
        yield
        return

    def select(module, args):
        return (args[0][mask],) + tuple(args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def first_rows(index: torch.Tensor, num_unique: int) -> torch.Tensor:
    """For every unique row p, one batch row b with ``index[b] == p``."""
    rows = torch.full((num_unique,), -1, dtype=torch.long, device=index.device)
    order = torch.arange(index.numel() - 1, -1, -1, device=index.device)
    rows.scatter_(0, index.flip(0), order)  # last write wins: the first occurrence
    return rows


def _grouped_cross_attention(attn: nn.Module, rows: torch.Tensor, groups: list[torch.Tensor], inverse: torch.Tensor):
    """A forward for the cross-attention ``attn`` (an ``OFAAttention``) when batch rows share images.

    ``rows[u]`` is one batch row of image u, ``groups[u]`` all of them, ``inverse`` puts rows sorted
    by image back in batch order. Keys and values are projected once per image, and the queries of
    all captions of an image attend to them in one product: nothing image-sized is ever copied per
    caption (expanding keys and values to every caption, then to heads, cost more than the
    projection saved). Same arithmetic per query as ``OFAAttention.forward``.
    """
    original = attn.forward
    heads, head_dim = attn.num_heads, attn.head_dim
    memo: list = [None, None]  # (key_value_states, its rows): every layer gets the same tensor

    def forward(hidden_states, key_value_states=None, attn_bias=None, attn_mask=None, key_padding_mask=None,
                past_key_value=None, is_cross_attention=False, output_attentions=False):
        if key_value_states is None or past_key_value is not None or attn_mask is not None or output_attentions:
            return original(hidden_states, key_value_states, attn_bias, attn_mask, key_padding_mask, past_key_value,
                            is_cross_attention, output_attentions)
        bsz, tgt_len, embed_dim = hidden_states.shape
        if memo[0] is not key_value_states:
            memo[:] = [key_value_states, key_value_states.index_select(0, rows)]
        source = memo[1]
        images, src_len = source.shape[:2]
        k = attn.k_proj(source).view(images, src_len, heads, head_dim).transpose(1, 2)
        v = attn.v_proj(source).view(images, src_len, heads, head_dim).transpose(1, 2)
        q = (attn.q_proj(hidden_states) * attn.scaling).view(bsz, tgt_len, heads, head_dim).transpose(1, 2)
        bias = None if attn_bias is None else attn_bias.view(bsz, heads, tgt_len, src_len)
        outputs = []
        for u, members in enumerate(groups):
            n = members.numel()
            weights = torch.matmul(q.index_select(0, members).transpose(0, 1).reshape(heads, n * tgt_len, head_dim),
                                   k[u].transpose(1, 2))
            if bias is not None:
                weights = weights + bias.index_select(0, members).transpose(0, 1).reshape(heads, n * tgt_len, src_len)
            if key_padding_mask is not None:
                weights = weights.masked_fill(key_padding_mask[rows[u]].to(torch.bool)[None, None, :], float("-inf"))
            probs = F.softmax(weights.float(), dim=-1).type_as(weights)
            probs = F.dropout(probs, p=attn.dropout, training=attn.training)
            outputs.append(torch.matmul(probs, v[u]).view(heads, n, tgt_len, head_dim).transpose(0, 1))
        out = torch.cat(outputs).index_select(0, inverse).transpose(1, 2)
        if attn.c_attn is not None:
            out = out * attn.c_attn[:, None]
        # No (k, v) to cache: they are per image, not in the per-row layout a decoder cache holds.
        return attn.out_proj(out.reshape(bsz, tgt_len, embed_dim)), None, None

    return forward


@contextlib.contextmanager
def shared_encoder_rows(model: nn.Module, index: torch.Tensor | None, num_unique: int | None = None):
    """Within the block, the decoder projects each distinct encoder row once.

    ``index[b]`` names the image of batch row b; rows with the same index must carry identical
    encoder states (they are gathered from one tensor). The cross-attention keys and values are
    computed per image (``_grouped_cross_attention``), and so are the encoder positions' keys of
    the position bias. No-op when every row is distinct.
    """
    if index is None or num_unique is None or num_unique >= index.numel():
        yield
        return
    rows = first_rows(index, num_unique)
    order = torch.argsort(index, stable=True)
    groups = list(order.split(torch.bincount(index, minlength=num_unique).tolist()))
    inverse = torch.argsort(order)
    decoder = model.get_decoder()
    handles, patched = [], []

    def shrink(module, args):
        return (args[0].index_select(0, rows),) + tuple(args[1:])

    def expand(module, args, output):
        return output.index_select(0, index)

    try:
        handles.append(decoder.cross_pos_k_linear.register_forward_pre_hook(shrink))
        handles.append(decoder.cross_pos_k_linear.register_forward_hook(expand))
        for layer in decoder.layers:
            layer.cross_attn.forward = _grouped_cross_attention(layer.cross_attn, rows, groups, inverse)
            patched.append(layer.cross_attn)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for attn in patched:
            del attn.forward  # back to the class's forward
