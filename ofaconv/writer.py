"""Streaming safetensors writer: shard plan and headers from shapes alone, then one tensor at a time.

Invariants:
- shard membership, file names and every header are fixed from the items' shapes and dtypes before
  any tensor is read (greedy in item order, like ``huggingface_hub``'s splitter, but never reordered);
- each tensor comes from its thunk, is cast, written, hashed and released before the next thunk
  runs, so peak memory is about one tensor plus its cast copy, never a shard;
- identical input gives byte-identical files: fixed header order and metadata, no timestamps;
- files appear under their final names only when complete (written as hidden ``.partial`` siblings)
  and a failure removes whatever this call wrote.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from .errors import OfaconvError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
METADATA = {"format": "pt"}  # transformers refuses safetensors files without it
CASTS = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}  # fmt: skip
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip

Item = tuple[str, Sequence[int], torch.dtype, Callable[[], torch.Tensor]]


@dataclass
class WriteResult:
    files: dict[str, dict]  # file name -> {"sha256": hex, "size": bytes}; shards and the index
    index: dict | None  # the index written next to the shards, None for a single file
    total_size: int  # tensor bytes, as in the index's metadata


@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]
    source_dtype: torch.dtype
    dtype: torch.dtype  # as written
    thunk: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _as_dtype(value, what: str) -> torch.dtype:
    dtype = value
    if isinstance(value, str):
        dtype = CASTS[value] if value in CASTS else getattr(torch, value, None)
    if dtype not in SAFETENSORS_DTYPES:
        raise OfaconvError(f"{what}: unsupported dtype {value!r} (cast to one of fp32, fp16, bf16)")
    return dtype


def plan_shards(items: Iterable[Item], *, max_shard_size: int = 2 * 10**9, dtype=None) -> list[list[_Planned]]:
    """Greedy shards in item order; a tensor larger than the cap gets a shard of its own."""
    cast = None if dtype is None else _as_dtype(dtype, "output")
    if cast is not None and not cast.is_floating_point:
        raise OfaconvError(f"output dtype must be a floating type, got {dtype!r}")
    shards: list[list[_Planned]] = [[]]
    size, seen = 0, set()
    for name, shape, source_dtype, thunk in items:
        if name in seen:
            raise OfaconvError("tensor name given twice", key=name)
        seen.add(name)
        source_dtype = _as_dtype(source_dtype, name)
        out = cast if cast is not None and source_dtype.is_floating_point else source_dtype
        planned = _Planned(name, tuple(int(d) for d in shape), source_dtype, out, thunk)
        if shards[-1] and size + planned.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(planned)
        size += planned.nbytes
    if not seen:
        raise OfaconvError("no tensors to write")
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _layout(shard: list[_Planned]) -> tuple[bytes, list[_Planned]]:
    """Header bytes and data order. Larger elements first keeps every tensor aligned, as safetensors does."""
    order = sorted(shard, key=lambda t: -t.dtype.itemsize)  # stable: item order within a width
    header, offset = {"__metadata__": METADATA}, 0
    for t in order:
        header[t.name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-aligned
    return len(text).to_bytes(8, "little") + text, order


def _all_finite(tensor: torch.Tensor) -> bool:
    # A finite sum proves every element finite with no temporary the size of the tensor (isfinite
    # needs about two); only an overflowing sum (fp16) needs the exact check, chunk by chunk in fp64.
    flat = tensor.reshape(-1)
    if flat.numel() == 0 or bool(torch.isfinite(flat.sum())):
        return True
    return all(bool(torch.isfinite(chunk.sum(dtype=torch.float64))) for chunk in flat.split(1 << 20))


def _materialize(t: _Planned, check_finite: bool, source_path) -> torch.Tensor:
    tensor = t.thunk()
    if not isinstance(tensor, torch.Tensor):
        raise OfaconvError(f"expected a tensor, got {type(tensor).__name__}", path=source_path, key=t.name)
    if tuple(tensor.shape) != t.shape or tensor.dtype != t.source_dtype:
        raise OfaconvError(
            f"tensor is {tuple(tensor.shape)} {tensor.dtype}, the plan said {t.shape} {t.source_dtype}",
            path=source_path, key=t.name,
        )  # fmt: skip
    out = tensor.detach().to(device="cpu", dtype=t.dtype).contiguous()
    if check_finite and out.is_floating_point() and not _all_finite(out):
        if out.dtype != tensor.dtype and _all_finite(tensor):
            message = f"tensor overflows {str(t.dtype).removeprefix('torch.')} (finite in {str(t.source_dtype).removeprefix('torch.')})"
        else:
            message = "tensor holds NaN or Inf values"
        raise OfaconvError(message, path=source_path, key=t.name)
    return out


def _write_file(path: Path, header: bytes, order: list[_Planned], check_finite, source_path, bar, written) -> dict:
    digest = hashlib.sha256(header)
    with open(path, "wb") as f:
        f.write(header)
        for t in order:
            out = _materialize(t, check_finite, source_path)
            data = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            f.write(data)
            digest.update(data)
            del out, data  # released before the next thunk runs
            if written is not None:
                written(t.name)
            bar.update(t.nbytes)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": digest.hexdigest(), "size": path.stat().st_size}


def write_shards(
    out_dir,
    items: Iterable[Item],
    *,
    max_shard_size: int = 2 * 10**9,
    dtype=None,
    check_finite: bool = True,
    source_path=None,
    progress: bool = False,
    written=None,
) -> WriteResult:
    """Write ``items`` — ``(name, shape, dtype, thunk)`` in the order wanted — as safetensors shards.

    ``dtype`` (``"fp32"``, ``"fp16"``, ``"bf16"`` or a torch dtype) casts floating tensors at write
    time; integer buffers keep theirs. ``check_finite`` refuses NaN/Inf (also infinities made by the
    cast), naming the key and ``source_path``. ``written(name)`` is called once a tensor's bytes
    are on disk (the converter drops the source's memory-mapped pages there). ``out_dir`` should be fresh: same-named files are
    replaced, stale shards of another split are not removed.
    """
    from tqdm.auto import tqdm

    if sys.byteorder != "little":
        raise OfaconvError("safetensors files are little-endian; this machine is not")
    shards = plan_shards(items, max_shard_size=max_shard_size, dtype=dtype)
    names = shard_names(len(shards))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = sum(t.nbytes for shard in shards for t in shard)
    result = WriteResult({}, None, total)
    partial = None
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc="Writing", disable=not progress) as bar:
            for name, shard in zip(names, shards):
                header, order = _layout(shard)
                partial = out_dir / f".{name}.partial"
                result.files[name] = _write_file(partial, header, order, check_finite, source_path, bar, written)
                partial.replace(out_dir / name)
                partial = None
        if len(shards) > 1:
            result.index = {
                "metadata": {"total_size": total},
                "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard},
            }
            data = (json.dumps(result.index, indent=2, sort_keys=True) + "\n").encode()
            partial = out_dir / f".{INDEX_FILE}.partial"
            partial.write_bytes(data)
            partial.replace(out_dir / INDEX_FILE)
            partial = None
            result.files[INDEX_FILE] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    except BaseException:
        for path in [partial, *(out_dir / name for name in result.files)]:
            if path is not None:
                path.unlink(missing_ok=True)
        raise
    return result
