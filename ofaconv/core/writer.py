"""Streaming safetensors writer: shard plan and headers from shapes alone, then one tensor at a time.

Invariants:
- shard membership, file names and every header are fixed from the items' shapes and dtypes before
  any tensor is read (greedy in item order, like ``huggingface_hub``'s splitter, but never reordered);
- each tensor comes from its thunk and is copied (cast) chunk by chunk through two reusable staging
  buffers, checked, written and hashed (on a worker thread) before the next thunk runs, so peak
  memory is two chunks plus what the thunk maps, never a tensor copy or a shard;
- identical input gives byte-identical files: fixed header order and metadata, no timestamps;
- files appear under their final names only when complete (written as hidden ``.partial`` siblings)
  and a failure removes whatever this call wrote.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from concurrent.futures import ThreadPoolExecutor
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
CHUNK_BYTES = 64 * 2**20  # staging buffer size: memory is two of these, whatever the tensor size


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


def _source(t: _Planned, source_path) -> torch.Tensor:
    tensor = t.thunk()
    if not isinstance(tensor, torch.Tensor):
        raise OfaconvError(f"expected a tensor, got {type(tensor).__name__}", path=source_path, key=t.name)
    if tuple(tensor.shape) != t.shape or tensor.dtype != t.source_dtype:
        raise OfaconvError(
            f"tensor is {tuple(tensor.shape)} {tensor.dtype}, the plan said {t.shape} {t.source_dtype}",
            path=source_path, key=t.name,
        )  # fmt: skip
    return tensor.detach().reshape(-1)


class _Staging:
    """Two reusable buffers: chunk i is hashed on a worker thread while chunk i+1 is filled and written.

    Filling a buffer with ``copy_`` reads a memory-mapped source much faster than computing on its
    pages directly, casts on the way, and keeps memory at two chunks whatever the tensor size.
    Hashing releases the GIL, so on two cores it costs no wall time; updates run in submission order.
    """

    def __init__(self, chunk_bytes: int):
        self.buffers = [torch.empty(chunk_bytes, dtype=torch.uint8) for _ in range(2)]
        self.pending = [None, None]
        self.turn = 0
        self.hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ofaconv-hash")

    def next(self) -> torch.Tensor:
        self.turn ^= 1
        if self.pending[self.turn] is not None:
            self.pending[self.turn].result()  # that buffer's hash is done: it may be refilled
        return self.buffers[self.turn]

    def hash(self, digest, data) -> None:
        self.pending[self.turn] = self.hasher.submit(digest.update, data)

    def drain(self) -> None:
        for i, future in enumerate(self.pending):
            if future is not None:
                future.result()
            self.pending[i] = None

    def close(self) -> None:
        self.hasher.shutdown(wait=True)


def _write_tensor(f, t: _Planned, digest, staging: _Staging, check_finite: bool, source_path) -> None:
    flat = _source(t, source_path)
    per_chunk = staging.buffers[0].numel() // t.dtype.itemsize
    for start in range(0, flat.numel(), per_chunk):
        src = flat[start : start + per_chunk]
        out = staging.next()[: src.numel() * t.dtype.itemsize].view(t.dtype)
        out.copy_(src)  # the cast, if any, happens here
        if check_finite and out.is_floating_point() and not _all_finite(out):
            if out.dtype != src.dtype and _all_finite(src):
                message = (f"tensor overflows {str(t.dtype).removeprefix('torch.')} "
                           f"(finite in {str(t.source_dtype).removeprefix('torch.')})")
            else:
                message = "tensor holds NaN or Inf values"
            raise OfaconvError(message, path=source_path, key=t.name)
        data = memoryview(out.view(torch.uint8).numpy())
        staging.hash(digest, data)
        f.write(data)


def _write_file(path: Path, header: bytes, order: list[_Planned], check_finite, source_path, bar, written,
                staging: _Staging) -> dict:
    # No fsync, like save_pretrained: the rename makes a complete file appear at once, durability
    # across a power cut is the file system's business (fsync cost ~10% of a conversion).
    digest = hashlib.sha256(header)
    try:
        with open(path, "wb") as f:
            f.write(header)
            for t in order:
                _write_tensor(f, t, digest, staging, check_finite, source_path)
                if written is not None:
                    written(t.name)  # its bytes are all copied out of the source
                bar.update(t.nbytes)
    finally:
        staging.drain()
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
    are all copied out of its source (the converter drops the source's memory-mapped pages there).
    ``out_dir`` should be fresh: same-named files are replaced, stale shards of another split are
    not removed.
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
    largest = max(t.nbytes for shard in shards for t in shard)
    staging = _Staging(max(8, min(CHUNK_BYTES, -(-largest // 8) * 8)))
    partial = None
    # Copies and sums here are memory-bound; torch's OpenMP workers would spin after each one and
    # starve the hashing threads (the converter also hashes the source) of the other core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc="Writing", disable=not progress) as bar:
            for name, shard in zip(names, shards):
                header, order = _layout(shard)
                partial = out_dir / f".{name}.partial"
                result.files[name] = _write_file(partial, header, order, check_finite, source_path, bar, written,
                                                 staging)
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
    finally:
        staging.close()
        torch.set_num_threads(threads)
    return result
