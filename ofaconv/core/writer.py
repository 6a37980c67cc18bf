"""Streaming safetensors writer: shard plan and headers from shapes alone, then one tensor at a time.

Invariants:
- shard membership, file names and every header are fixed from the items' shapes and dtypes before
  any tensor is read (greedy in item order, like ``huggingface_hub``'s splitter, but never reordered);
- each tensor comes from its thunk and is copied (cast) chunk by chunk through two reusable staging
  buffers and written, while a worker thread hashes it one chunk behind (and looks for NaN/Inf
  there, unless a cast was made: that is checked as it is made), so peak memory is two chunks plus
  what the thunk maps, never a tensor copy or a shard;
- identical input gives byte-identical files: fixed header order and metadata, no timestamps;
- files appear under their final names only when complete (written as hidden ``.partial`` siblings)
  and a failure removes whatever this call wrote.

:class:`OutputFolder` is the one way ofaconv writes an output folder: a temp sibling filled and
hashed as it is written, a manifest of every file in ``conversion_report.json``, an exclusive lock
per output, and an atomic rename that replaces only an earlier ofaconv output (see its docstring).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

from . import registry
from .digest import check_stop, file_sha256
from .errors import OfaconvError
from .report import REPORT_NAME, SCHEMA, load_report

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
METADATA = {"format": "pt"}  # transformers refuses safetensors files without it

if TYPE_CHECKING:  # torch loads with the first tensor written: checking an output folder needs none of it
    import torch

    Item = tuple[str, Sequence[int], torch.dtype, Callable[[], torch.Tensor]]


@functools.cache
def _dtype_tables() -> tuple[dict, dict]:
    import torch

    casts = {
        "fp32": torch.float32, "float32": torch.float32,
        "fp16": torch.float16, "float16": torch.float16,
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    }  # fmt: skip
    safetensors_dtypes = {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
        torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8", torch.bool: "BOOL",
    }  # fmt: skip
    return casts, safetensors_dtypes


def __getattr__(name: str):
    """``CASTS`` (dtype name -> torch dtype) and ``SAFETENSORS_DTYPES`` (torch dtype -> header name)."""
    if name == "CASTS":
        return _dtype_tables()[0]
    if name == "SAFETENSORS_DTYPES":
        return _dtype_tables()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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
    import torch

    casts, safetensors_dtypes = _dtype_tables()
    dtype = value
    if isinstance(value, str):
        dtype = casts[value] if value in casts else getattr(torch, value, None)
    if dtype not in safetensors_dtypes:
        raise OfaconvError(f"{what}: unsupported dtype {value!r} (cast to one of fp32, fp16, bf16)")
    return dtype


def output_dtype(source_dtype: torch.dtype, cast: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor is written at: floating tensors are cast to ``cast`` (when given), integer
    buffers keep theirs; its bytes are the source's exactly when this is ``source_dtype``."""
    return cast if cast is not None and source_dtype.is_floating_point else source_dtype


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
        out = output_dtype(source_dtype, cast)
        planned = _Planned(name, tuple(int(d) for d in shape), source_dtype, out, thunk)
        if shards[-1] and size + planned.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(planned)
        size += planned.nbytes
    if not seen:
        raise OfaconvError("no tensors to write")
    return shards


def shard_names(count: int, stem: str = "model") -> list[str]:
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _layout(shard: list[_Planned]) -> tuple[bytes, list[_Planned]]:
    """Header bytes and data order. Larger elements first keeps every tensor aligned, as safetensors does."""
    order = sorted(shard, key=lambda t: -t.dtype.itemsize)  # stable: item order within a width
    header, offset = {"__metadata__": METADATA}, 0
    names = _dtype_tables()[1]
    for t in order:
        header[t.name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-aligned
    return len(text).to_bytes(8, "little") + text, order


def _all_finite(tensor: torch.Tensor) -> bool:
    # A finite sum proves every element finite with no temporary the size of the tensor (isfinite
    # needs about two); only an overflowing sum (fp16) needs the exact check, chunk by chunk in fp64.
    import torch

    flat = tensor.reshape(-1)
    if flat.numel() == 0 or bool(torch.isfinite(flat.sum())):
        return True
    return all(bool(torch.isfinite(chunk.sum(dtype=torch.float64))) for chunk in flat.split(1 << 20))


def _source(t: _Planned, source_path) -> torch.Tensor:
    import torch

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
    """Two reusable buffers: chunk i is hashed (and checked) on a worker thread while chunk i+1 is
    filled and written.

    Filling a buffer with ``copy_`` reads a memory-mapped source much faster than computing on its
    pages directly, casts on the way, and keeps memory at two chunks whatever the tensor size.
    Hashing releases the GIL, so on two cores it costs no wall time; updates run in submission order.
    """

    def __init__(self, chunk_bytes: int):
        import torch

        self.buffers = [torch.empty(chunk_bytes, dtype=torch.uint8) for _ in range(2)]
        self.pending = [None, None]
        self.turn = 0
        self.hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ofaconv-hash")

    def next(self) -> torch.Tensor:
        self.turn ^= 1
        if self.pending[self.turn] is not None:
            self.pending[self.turn].result()  # that buffer's hash is done: it may be refilled
        return self.buffers[self.turn]

    def hash(self, digest, data, check: Callable[[], None] | None = None) -> None:
        """Hash the current buffer's ``data`` (in submission order), then run ``check`` on it: its
        error is raised by the ``next`` or ``drain`` that waits for this buffer."""
        self.pending[self.turn] = self.hasher.submit(_hash_and_check, digest, data, check)

    def drain(self) -> None:
        for i, future in enumerate(self.pending):
            if future is not None:
                future.result()
            self.pending[i] = None

    def close(self) -> None:
        self.hasher.shutdown(wait=True)


def _hash_and_check(digest, data, check) -> None:
    digest.update(data)
    if check is not None:
        check()


def _check_finite(t: _Planned, out: torch.Tensor, src: torch.Tensor | None, source_path) -> None:
    """``src``: the chunk before a cast (None without one), to tell an overflow from NaN/Inf."""
    if _all_finite(out):
        return
    if src is not None and _all_finite(src):
        message = (f"tensor overflows {str(t.dtype).removeprefix('torch.')} "
                   f"(finite in {str(t.source_dtype).removeprefix('torch.')})")
    else:
        message = "tensor holds NaN or Inf values"
    raise OfaconvError(message, path=source_path, key=t.name)


def _write_tensor(f, t: _Planned, digest, staging: _Staging, check_finite: bool, source_path) -> None:
    import torch

    flat = _source(t, source_path)
    per_chunk = staging.buffers[0].numel() // t.dtype.itemsize
    for start in range(0, flat.numel(), per_chunk):
        src = flat[start : start + per_chunk]
        out = staging.next()[: src.numel() * t.dtype.itemsize].view(t.dtype)
        out.copy_(src)  # the cast, if any, happens here
        data = memoryview(out.view(torch.uint8).numpy())
        check = None
        if check_finite and out.is_floating_point():
            if out.dtype != src.dtype:
                _check_finite(t, out, src, source_path)
            else:
                # on the hashing thread, which has time to spare (the source chunk is not kept alive
                # for it): a chunk with NaN/Inf fails the write when its buffer is next waited for
                check = functools.partial(_check_finite, t, out, None, source_path)
        staging.hash(digest, data, check)
        f.write(data)


def _write_file(path: Path, header: bytes, order: list[_Planned], check_finite, source_path, bar, written,
                staging: _Staging, stop) -> dict:
    # No fsync, like save_pretrained: the rename makes a complete file appear at once, durability
    # across a power cut is the file system's business (fsync cost ~10% of a conversion).
    digest = hashlib.sha256(header)
    try:
        with open(path, "wb") as f:
            f.write(header)
            for t in order:
                check_stop(stop, path)
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
    stem: str = "model",
    stop: threading.Event | None = None,
) -> WriteResult:
    """Write ``items`` — ``(name, shape, dtype, thunk)`` in the order wanted — as safetensors shards.

    ``dtype`` (``"fp32"``, ``"fp16"``, ``"bf16"`` or a torch dtype) casts floating tensors at write
    time; integer buffers keep theirs. ``check_finite`` refuses NaN/Inf (also infinities made by the
    cast), naming the key and ``source_path``. ``written(name)`` is called once a tensor's bytes
    are all copied out of its source (the converter drops the source's memory-mapped pages there).
    ``out_dir`` should be fresh: same-named files are replaced, stale shards of another split are
    not removed. ``stem`` names the files (``model.safetensors``, ``model-00001-of-00002...``).
    ``stop``: an event another thread sets to end the write early (checked before each tensor):
    ``CancelledError`` is raised and what this call wrote is removed.
    """
    import torch
    from tqdm.auto import tqdm

    if sys.byteorder != "little":
        raise OfaconvError("safetensors files are little-endian; this machine is not")
    shards = plan_shards(items, max_shard_size=max_shard_size, dtype=dtype)
    names = shard_names(len(shards), stem)
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
                                                 staging, stop)
                partial.replace(out_dir / name)
                partial = None
        if len(shards) > 1:
            result.index = {
                "metadata": {"total_size": total},
                "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard},
            }
            data = (json.dumps(result.index, indent=2, sort_keys=True) + "\n").encode()
            index_name = f"{stem}.safetensors.index.json"
            partial = out_dir / f".{index_name}.partial"
            partial.write_bytes(data)
            partial.replace(out_dir / index_name)
            partial = None
            result.files[index_name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    except BaseException:
        for path in [partial, *(out_dir / name for name in result.files)]:
            if path is not None:
                path.unlink(missing_ok=True)
        raise
    finally:
        staging.close()
        torch.set_num_threads(threads)
    return result


def write_safetensors(path, state: Mapping[str, torch.Tensor], *, check_finite: bool = True) -> dict:
    """One safetensors file ``path`` (``*.safetensors``) from an in-memory state dict, through the
    same streaming writer; returns its ``{"sha256", "size"}``, hashed as it was written."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a safetensors file name must end in .safetensors")
    items = [(name, tuple(t.shape), t.dtype, functools.partial(_identity, t)) for name, t in state.items()]
    result = write_shards(path.parent, items, max_shard_size=sys.maxsize, check_finite=check_finite, stem=path.stem)
    return result.files[path.name]


def _identity(value):
    return value


# -- output folders ---------------------------------------------------------------------------------
TEMP_TAG = "ofaconv"  # temp siblings: .OUT.ofaconv-<pid>-<random>.tmp (being filled) / .old (being replaced)


def _sibling(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{TEMP_TAG}-{os.getpid()}-{secrets.token_hex(4)}.{kind}"


@contextlib.contextmanager
def atomic_path(path):
    """A temp sibling of ``path`` to write (by name: safetensors, numpy, a zip); renamed over ``path``
    when the block ends without an error, removed when it does not: nothing half-written is ever
    at ``path`` (the temp name, ``.NAME.ofaconv-<pid>-<random>.tmp``, says whose it was)."""
    path = Path(path)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path, mode: str = "wb", **open_kwargs):
    """``open(path, mode)`` through :func:`atomic_path`; the file gets the umask's permissions."""
    with atomic_path(path) as tmp, open(tmp, mode.replace("w", "x"), **open_kwargs) as handle:
        yield handle


def write_atomic(path, data: bytes | str, encoding: str = "utf-8") -> Path:
    """Write ``data`` to ``path`` all at once or not at all (:func:`atomic_path`)."""
    if isinstance(data, str):
        data = data.encode(encoding)
    with atomic_file(path) as handle:
        handle.write(data)
    return Path(path)


def place_folder(tmp, out) -> None:
    """Rename the finished folder ``tmp`` to ``out``; an existing ``out`` (already checked to be
    replaceable) is moved aside first and removed only once ``tmp`` took its place."""
    tmp, out = Path(tmp), Path(out)
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    try:
        os.rename(tmp, out)  # an empty folder is replaced in one step
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise
    trash = _sibling(out, "old")
    os.rename(out, trash)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(trash, out)
        raise
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


@contextlib.contextmanager
def output_lock(out):
    """Hold ``.OUT.ofaconv.lock``, the lock of every ofaconv output, for the block."""
    out = Path(os.path.abspath(out))
    if not out.parent.is_dir():
        raise OfaconvError("the output's folder does not exist; create it first", path=out.parent)
    fd = _lock(out)
    try:
        yield
    finally:
        _unlock(out, fd)


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.{TEMP_TAG}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_siblings(out) -> list[Path]:
    """Remove the temp siblings of ``out`` left by ofaconv runs that were killed (their process is
    gone); a live run's are kept. Returns what was removed."""
    out = Path(os.path.abspath(out))
    pattern = re.compile(rf"\.{re.escape(out.name)}\.{TEMP_TAG}-(\d+)-[0-9a-f]+\.(tmp|old)")
    removed = []
    try:
        entries = list(os.scandir(out.parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir() or _alive(int(match.group(1))):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def _resolved(path) -> Path:
    return Path(os.path.realpath(path))


def check_output(out, *, force: bool = False, protect: Iterable = (), busy: bool = True) -> None:
    """Refuse an output folder this run may not write; the rule of :class:`OutputFolder`.

    ``protect``: the run's inputs (checkpoint file, source folder); ``None`` entries are ignored.
    ``busy``: also refuse while another run holds OUT's lock (a command checks this first, so a
    second run fails at once rather than after loading its input).
    """
    out = Path(os.path.abspath(out))
    target = _resolved(out)
    for source in protect:
        if source is None:
            continue
        src = _resolved(source)
        if target == src or target in src.parents or src in target.parents:
            relation = "is" if target == src else ("contains" if target in src.parents else "lies inside")
            raise OfaconvError(f"the output {relation} the input {source}; choose an output folder outside it",
                               path=out)
    if busy and out.parent.is_dir():
        _unlock(out, _lock(out))
    if out.is_symlink():
        raise OfaconvError("the output is a symbolic link; give the folder's own path", path=out)
    if not out.exists():
        return
    if not out.is_dir():
        raise OfaconvError("the output exists and is not a folder; remove it or choose another output", path=out)
    if not any(out.iterdir()):
        return  # an empty folder: nothing to lose
    if not force:
        raise OfaconvError("output exists (use --force to replace a folder ofaconv wrote)", path=out)
    reason = _not_ofaconv_output(out)
    if reason:
        raise OfaconvError(f"--force replaces only a folder ofaconv wrote, and {reason}; "
                           "move it away or choose another output", path=out)


def _not_ofaconv_output(out: Path) -> str | None:
    """Why ``out`` is not wholly an earlier ofaconv output, or None: it must hold an ofaconv report,
    and every file in it (hidden ones included) must be that report or in its manifest; only empty
    folders and Python bytecode caches may be added. Nothing in it may be a link."""
    try:
        report = load_report(out)
    except OfaconvError:
        return f"it has no readable {REPORT_NAME}"
    files = report.get("files")
    if report.get("schema") != SCHEMA or not isinstance(files, dict):
        return f"its {REPORT_NAME} is not an ofaconv report"
    allowed = set(files) | {REPORT_NAME}
    for dirpath, dirnames, filenames in os.walk(out):
        base = Path(dirpath)
        if base.name == "__pycache__":
            dirnames[:] = []
            continue
        for name in sorted(dirnames + filenames):
            path = base / name
            rel = path.relative_to(out).as_posix()
            if path.is_symlink():
                return f"{rel} is a symbolic link"
            if name not in dirnames and rel not in allowed:
                return f"{rel} is not in its manifest"
    return None


def _lock(out: Path) -> int:
    """An exclusive, non-blocking lock on ``.OUT.ofaconv.lock`` beside ``out``; the open descriptor."""
    path = _lock_path(out)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise OfaconvError(f"cannot create the lock file {path.name} ({exc.strerror})", path=out) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusyError("another ofaconv run is writing this output; wait for it to finish or choose "
                                  "another output", path=out) from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file as it released it: lock the file now at that path


def _unlock(out: Path, fd: int) -> None:
    try:
        _lock_path(out).unlink(missing_ok=True)  # while still held, so no one locks a removed file
    finally:
        os.close(fd)


class OutputBusyError(OfaconvError):
    """Another ofaconv run holds the output's lock."""


class OutputFolder:
    """The one writer of ofaconv output folders.

    ::

        with OutputFolder(out, force=force, protect=[source]) as folder:
            folder.write_json("config.json", config)       # also write_text / write_bytes / write_tensors
            folder.add_entries(write_shards(folder.path, items).files)
            with folder.recording():                        # files a library writes are hashed once
                tokenizer.save_pretrained(folder.path)
            folder.commit(report)

    - The folder is filled in a temp sibling ``.OUT.ofaconv-<pid>-<random>.tmp`` and renamed into
      place by ``commit``; leaving the block without ``commit`` (or by an exception) removes it.
      Temp siblings of killed runs (process gone) are removed by the next run for the same OUT.
    - ``commit`` writes the model card (the ``ofaconv.card`` entry point, when installed), then
      ``conversion_report.json`` with ``files``: the manifest of every file written (sha256, size;
      hashed from memory or while streaming, never by re-reading weights); a file in the folder that
      was not recorded is an error, so the manifest is the folder.
    - Only one run writes an OUT at a time (``.OUT.ofaconv.lock`` beside it, non-blocking).
    - OUT may be written when absent or an empty folder; with ``force``, it may replace a folder
      only if that is wholly an earlier ofaconv output (its report, plus nothing outside its
      manifest, no links); never when OUT is, contains or lies inside a ``protect`` path. The state
      of OUT is checked again under the lock just before the rename.
    - Folders and files are created with the default modes (the umask applies).
    """

    def __init__(self, out, *, force: bool = False, protect: Iterable = ()):
        self.out = Path(os.path.abspath(out))
        self.force = force
        self.protect = [p for p in protect if p is not None]
        self.path: Path | None = None
        self.files: dict[str, dict] = {}
        self.committed = False
        self._lock_fd: int | None = None

    def __enter__(self) -> "OutputFolder":
        check_output(self.out, force=self.force, protect=self.protect, busy=False)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OfaconvError(f"cannot create the parent folder ({exc.strerror})", path=self.out) from None
        self._lock_fd = _lock(self.out)
        try:
            remove_stale_siblings(self.out)
            path = _sibling(self.out, "tmp")
            path.mkdir()
            self.path = path
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if not self.committed and self.path is not None:
                shutil.rmtree(self.path, ignore_errors=True)
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            _unlock(self.out, fd)

    # -- writing ----------------------------------------------------------------------------------
    def _target(self, name) -> Path:
        name = PurePosixPath(name).as_posix()
        parts = PurePosixPath(name).parts
        if not parts or PurePosixPath(name).is_absolute() or any(p in (".", "..") for p in parts) \
                or any(p.startswith(".") for p in parts) or name == REPORT_NAME:
            raise ValueError(f"{name!r}: not a file name an output folder can hold")
        if self.path is None or self.committed:
            raise RuntimeError("OutputFolder is not open for writing")
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_bytes(self, name: str, data: bytes) -> Path:
        path = self._target(name)
        path.write_bytes(data)
        self.files[PurePosixPath(name).as_posix()] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        return path

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, data) -> Path:
        return self.write_text(name, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

    def write_tensors(self, name: str, state: Mapping[str, torch.Tensor]) -> Path:
        """``state`` as one safetensors file ``name``, hashed while it is written."""
        path = self._target(name)
        self.files[PurePosixPath(name).as_posix()] = write_safetensors(path, state)
        return path

    def add_entries(self, entries: Mapping[str, dict], under: str = "") -> None:
        """Files already written and hashed (``write_shards(...).files``), relative to ``under``."""
        for name, entry in entries.items():
            rel = f"{under.strip('/')}/{name}" if under.strip("/") else name
            self._target(rel)  # validates the name
            self.files[rel] = {"sha256": entry["sha256"], "size": entry["size"]}

    def record(self, *names: str) -> None:
        """Hash files something else wrote into ``path`` (small files: a library's config, tokenizer)."""
        for name in names:
            path = self._target(name)
            if path.is_symlink() or not path.is_file():
                raise RuntimeError(f"{path}: recorded, but not a regular file")
            self.files[PurePosixPath(name).as_posix()] = {"sha256": file_sha256(path), "size": path.stat().st_size}

    @contextlib.contextmanager
    def recording(self):
        """Record every file created or changed in ``path`` during the block (a library's writes)."""
        before = self._snapshot()
        yield self.path
        after = self._snapshot()
        self.record(*sorted(name for name, stamp in after.items() if before.get(name) != stamp))

    def _snapshot(self) -> dict[str, tuple]:
        stamps = {}
        for name in self._present():
            st = os.lstat(self.path / name)
            stamps[name] = (st.st_ino, st.st_size, st.st_mtime_ns)
        stamps.pop(REPORT_NAME, None)
        return stamps

    def _present(self) -> list[str]:
        """Every non-directory entry under ``path``, hidden ones and links included."""
        found = []
        for dirpath, dirnames, filenames in os.walk(self.path):
            base = Path(dirpath)
            found += [(base / n).relative_to(self.path).as_posix() for n in filenames]
            found += [(base / n).relative_to(self.path).as_posix() for n in dirnames if (base / n).is_symlink()]
        return sorted(found)

    # -- committing -------------------------------------------------------------------------------
    def commit(self, report: dict, *, card: Mapping | None = None) -> dict:
        """Write the card and the report (with the manifest) and rename the folder into place.

        ``report`` needs ``schema``, ``kind`` and ``model_family``; ``card``: keyword arguments of
        the card writer (``license``). Returns the report as written.
        """
        missing = [k for k in ("schema", "kind", "model_family") if not report.get(k)]
        if missing:
            raise ValueError(f"report lacks {', '.join(missing)}")
        if self.path is None or self.committed:
            raise RuntimeError("OutputFolder is not open for writing")
        report = dict(report)
        report_path = self.path / REPORT_NAME
        write_card = registry.card_writer()
        if write_card is not None:
            # The card is built from the report: a provisional one (without the card's own entry).
            report["files"] = dict(sorted(self.files.items()))
            report_path.write_text(_report_text(report), encoding="utf-8")
            with self.recording():
                write_card(self.path, **dict(card or {}))
        unrecorded = [n for n in self._present() if n != REPORT_NAME and n not in self.files]
        if unrecorded:
            raise RuntimeError(f"{self.path / unrecorded[0]}: written without being recorded in the manifest")
        absent = [n for n in self.files if not (self.path / n).is_file()]
        if absent:
            raise RuntimeError(f"{self.path / absent[0]}: in the manifest but not written")
        report["files"] = dict(sorted(self.files.items()))
        report_path.write_text(_report_text(report), encoding="utf-8")
        check_output(self.out, force=self.force, protect=self.protect, busy=False)  # under the lock: OUT now
        self._place()
        self.committed = True
        self.path = self.out
        return report

    def _place(self) -> None:
        place_folder(self.path, self.out)


def _report_text(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
