"""Relative-position bucket tables and the decoder image-position index, exactly as fairseq OFA
builds them (``models/ofa/unify_transformer.py``, OFA-Sys/OFA a36b91c; ofa.md §A.3.6).

The token table goes through float32 ``log``/``ceil``; a float64 reimplementation can flip a
bucket at a boundary, so these functions use the same torch ops in the same dtypes and are
tested bit for bit against the buffers of the official micro checkpoint.
"""

from __future__ import annotations

import math

import torch

# fairseq calls make_token_bucket_position(bucket_size) without max_position, so the table is
# always 1024 x 1024, whatever max_source_positions is.
DEFAULT_MAX_POSITION = 1024

# decoder.image_position_idx is [0] + the code grid + "no position" entries: current fairseq code
# appends 769 (1 + 16^2 + 769 = 1026 at code_image_size 128); released checkpoints and the old HF
# port have 768 (1025; OFA-Sys/OFA#229).
FAIRSEQ_IMAGE_POSITION_TRAILING = 769
RELEASED_IMAGE_POSITION_TRAILING = 768


def image_position_idx_length(code_image_size: int = 128, trailing: int = FAIRSEQ_IMAGE_POSITION_TRAILING) -> int:
    return 1 + (code_image_size // 8) ** 2 + trailing


FAIRSEQ_IMAGE_POSITION_IDX_LENGTH = image_position_idx_length()
RELEASED_IMAGE_POSITION_IDX_LENGTH = image_position_idx_length(trailing=RELEASED_IMAGE_POSITION_TRAILING)


def make_token_bucket_position(bucket_size: int, max_position: int = DEFAULT_MAX_POSITION) -> torch.Tensor:
    """[max_position, max_position] int64 table of token relative-position buckets in [0, 2*bucket_size-2]."""
    context_pos = torch.arange(max_position, dtype=torch.long)[:, None]
    memory_pos = torch.arange(max_position, dtype=torch.long)[None, :]
    relative_pos = context_pos - memory_pos
    sign = torch.sign(relative_pos)
    mid = bucket_size // 2
    abs_pos = torch.where((relative_pos < mid) & (relative_pos > -mid), mid - 1, torch.abs(relative_pos))
    # Upstream divides int64 by int (float32 under torch's default dtype); pinned to float32 here so a
    # caller's set_default_dtype(float64) cannot flip a ceil. The log divisor is a Python float.
    log_pos = torch.ceil(torch.log(abs_pos.to(torch.float32) / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    log_pos = log_pos.int()
    bucket_pos = torch.where(abs_pos.le(mid), relative_pos, log_pos * sign).long()
    return bucket_pos + bucket_size - 1


def image_num_relative_distance(bucket_size: int) -> int:
    """Rows of an image relative-position table: (2*IB - 1)^2 + 3 (three special rows)."""
    return (2 * bucket_size - 1) * (2 * bucket_size - 1) + 3


def make_image_bucket_position(bucket_size: int, num_relative_distance: int | None = None) -> torch.Tensor:
    """[IB^2 + 1, IB^2 + 1] int64 table of 2-D relative-position buckets over the IB x IB grid.

    Grid cell k (row-major) lives at index k + 1; row/column 0 hold the special buckets.
    """
    if num_relative_distance is None:
        num_relative_distance = image_num_relative_distance(bucket_size)
    coords_h = torch.arange(bucket_size)
    coords_w = torch.arange(bucket_size)
    coords = torch.stack(torch.meshgrid([coords_h, coords_w], indexing="ij"))  # 2, Wh, Ww
    coords_flatten = torch.flatten(coords, 1)
    relative_coords = coords_flatten[:, :, None] - coords_flatten[:, None, :]
    relative_coords = relative_coords.permute(1, 2, 0).contiguous()
    relative_coords[:, :, 0] += bucket_size - 1
    relative_coords[:, :, 1] += bucket_size - 1
    relative_coords[:, :, 0] *= 2 * bucket_size - 1
    n = bucket_size * bucket_size + 1
    relative_position_index = torch.zeros(size=(n,) * 2, dtype=relative_coords.dtype)
    relative_position_index[1:, 1:] = relative_coords.sum(-1)
    relative_position_index[0, 0:] = num_relative_distance - 3
    relative_position_index[0:, 0] = num_relative_distance - 2
    relative_position_index[0, 0] = num_relative_distance - 1
    return relative_position_index


def make_image_position_idx(
    image_bucket_size: int = 42,
    code_image_size: int = 128,
    *,
    length: int = FAIRSEQ_IMAGE_POSITION_IDX_LENGTH,
) -> torch.Tensor:
    """``decoder.image_position_idx``: [0] + the (code_image_size/8)^2 code-grid ids + trailing 1024s.

    Only used when the decoder generates image codes. ``length`` 1026 is current fairseq's table,
    1025 the released checkpoints' (both at code_image_size 128: they differ in the trailing count).
    """
    window = code_image_size // 8
    num_trailing = length - 1 - window * window
    if num_trailing < 0:
        raise ValueError(f"length {length} is shorter than the {window}x{window} code grid + 1")
    grid = torch.arange(window).unsqueeze(0).expand(window, window) + torch.arange(window).unsqueeze(1) * image_bucket_size + 1
    idx = torch.cat([torch.tensor([0]), grid.reshape(-1)])
    return torch.cat([idx, torch.tensor([1024] * num_trailing)])
