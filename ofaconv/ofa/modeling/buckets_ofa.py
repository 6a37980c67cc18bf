"""Relative-position bucket tables of OFA (fairseq ``make_token_bucket_position`` /
``make_image_bucket_position``), derived at model init and never stored.

Imports only torch, so the converter can check a checkpoint's stored tables against them without
loading the transformers model machinery.
"""

from __future__ import annotations

import math

import torch


# fairseq builds the token table at its default 1024 positions whatever --max-source-positions says
# (the log-scale buckets depend on the table size), so a 512-position checkpoint uses 1024's table.
FAIRSEQ_TOKEN_TABLE_SIZE = 1024


def token_bucket_table_size(max_positions: int) -> int:
    return max(FAIRSEQ_TOKEN_TABLE_SIZE, max_positions)


def make_token_bucket_position(bucket_size: int, max_position: int = FAIRSEQ_TOKEN_TABLE_SIZE) -> torch.Tensor:
    context_pos = torch.arange(max_position, dtype=torch.long)[:, None]
    memory_pos = torch.arange(max_position, dtype=torch.long)[None, :]
    relative_pos = context_pos - memory_pos
    sign = torch.sign(relative_pos)
    mid = bucket_size // 2
    abs_pos = torch.where((relative_pos < mid) & (relative_pos > -mid), mid - 1, torch.abs(relative_pos))
    # fairseq divides int64 by int, i.e. float32 under torch's default dtype: pinned to float32 so a
    # caller's set_default_dtype(float64) cannot flip a ceil and make the table differ from fairseq's.
    log_pos = (
        torch.ceil(torch.log(abs_pos.to(torch.float32) / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    )
    log_pos = log_pos.int()
    bucket_pos = torch.where(abs_pos.le(mid), relative_pos, log_pos * sign).long()
    return bucket_pos + bucket_size - 1


def make_image_bucket_position(bucket_size: int, num_relative_distance: int) -> torch.Tensor:
    coords_h = torch.arange(bucket_size)
    coords_w = torch.arange(bucket_size)
    coords = torch.stack(torch.meshgrid([coords_h, coords_w], indexing="ij"))
    coords_flatten = torch.flatten(coords, 1)
    relative_coords = coords_flatten[:, :, None] - coords_flatten[:, None, :]
    relative_coords = relative_coords.permute(1, 2, 0).contiguous()
    relative_coords[:, :, 0] += bucket_size - 1
    relative_coords[:, :, 1] += bucket_size - 1
    relative_coords[:, :, 0] *= 2 * bucket_size - 1
    relative_position_index = torch.zeros(size=(bucket_size * bucket_size + 1,) * 2, dtype=relative_coords.dtype)
    relative_position_index[1:, 1:] = relative_coords.sum(-1)
    relative_position_index[0, 0:] = num_relative_distance - 3
    relative_position_index[0:, 0] = num_relative_distance - 2
    relative_position_index[0, 0] = num_relative_distance - 1
    return relative_position_index


def image_num_rel_dis(image_bucket_size: int) -> int:
    return (2 * image_bucket_size - 1) * (2 * image_bucket_size - 1) + 3
