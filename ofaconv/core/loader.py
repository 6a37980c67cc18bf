"""Reading weights files safely: the only place ofaconv unpickles anything.

Invariants:
- A pickled file is a torch zip archive or a legacy (torch < 1.6) torch file; anything else is
  refused before unpickling. Nothing is unpickled but by torch's ``weights_only`` unpickler with
  the fixed allow-list below, and a zip file that names any other global is refused before
  loading. There is no unsafe fallback.
- Zip files are memory-mapped, so tensors nobody reads (optimizer moments, an unused EMA copy)
  are never paged in; ``check_tensors`` reads shapes, strides and storage sizes, never data.
- A tensor is accepted only if it is dense, on the CPU, and owns at least the bytes it shows:
  an expanded / overlapping view (a few stored bytes presented as a huge tensor) is refused.
- Errors are one line naming the file (and key) in ofaconv's words; torch's messages (hints to
  load unsafely, terminal colour codes) never reach the user.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import CheckpointError

logger = logging.getLogger(__name__)

__all__ = [
    "ALLOWED_GLOBALS",
    "ALLOWED_GLOBAL_NAMES",
    "load_torch",
    "load_state_dict_file",
    "load_safetensors",
    "read_config",
    "read_folder_state_dict",
    "read_sharded",
    "check_tensors",
    "check_finite",
]

_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
# torch < 1.6 files: pickle protocol 2, then the magic number 0x1950a86a20f9469cfc6c as a LONG1.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")

# Numeric numpy dtype classes that may appear in pickled numpy scalars / arrays.
_NUMPY_DTYPE_CLASSES = (
    "BoolDType", "Int8DType", "Int16DType", "Int32DType", "Int64DType", "UInt8DType", "UInt16DType",
    "UInt32DType", "UInt64DType", "ByteDType", "UByteDType", "ShortDType", "UShortDType", "IntDType",
    "UIntDType", "LongDType", "ULongDType", "LongLongDType", "ULongLongDType", "Float16DType",
    "Float32DType", "Float64DType", "LongDoubleDType", "Complex64DType", "Complex128DType",
)

_REFUSE_HINT = "(ofaconv never falls back to unsafe unpickling)"


def _allowed_globals() -> list[tuple[object, str]]:
    """The fixed allow-list beyond torch's own (tensors, containers, numbers, strings).

    ``argparse.Namespace`` holds fairseq's arguments (``cfg["model"]`` or legacy ``args``).
    numpy scalars, dtypes and plain arrays appear in fairseq's ``extra_state`` meters and ``best``
    values; they are data (an object array's items go through the same restricted unpickler).
    Pickles written under numpy < 2 spell the module ``numpy.core``, under numpy >= 2
    ``numpy._core``; both names are mapped to the installed objects.
    """
    entries: list[tuple[object, str]] = [(argparse.Namespace, "argparse.Namespace")]
    try:
        import numpy as np
    except ImportError:  # numpy absent: a file that needs it is refused by name
        return entries
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        entries.append((multiarray.scalar, f"{module}.scalar"))
        entries.append((multiarray._reconstruct, f"{module}._reconstruct"))
    entries.append((np.dtype, "numpy.dtype"))
    entries.append((np.ndarray, "numpy.ndarray"))
    dtypes = getattr(np, "dtypes", None)
    for name in _NUMPY_DTYPE_CLASSES:
        cls = getattr(dtypes, name, None)
        if cls is not None:
            entries.append((cls, f"numpy.dtypes.{name}"))
    return entries


ALLOWED_GLOBALS = _allowed_globals()
ALLOWED_GLOBAL_NAMES = frozenset(name for _, name in ALLOWED_GLOBALS)


# --------------------------------------------------------------------------------------------
# Pickled torch files


def load_torch(path) -> tuple[object, bool]:
    """(the unpickled object, whether its tensors are memory-mapped) of a torch file.

    Legacy (torch < 1.6) files can be neither memory-mapped nor scanned for globals in advance;
    they still go through the same restricted unpickler, which refuses any global outside the
    allow-list before constructing it, but the whole file is read into memory.
    The tensors are not checked here: the caller knows which of them it will use and passes
    those to ``check_tensors``.
    """
    path = Path(path)
    kind = _file_kind(path)
    if kind == "zip":
        try:
            wanted = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/ValueError/zip errors alike
            raise CheckpointError(_zip_error(exc), path=path) from None
        refused = sorted({_python3_name(name) for name in set(wanted) - ALLOWED_GLOBAL_NAMES})
        if refused:
            raise CheckpointError(
                f"refusing to unpickle: the file needs globals outside the allow-list: {', '.join(refused)} "
                + _REFUSE_HINT,
                path=path,
            )
    else:
        logger.warning("%s: legacy (pre-zip) torch file: loading without mmap, the whole file is read", path)
    try:
        # torch's load-time warnings (deprecations, sparse validation) are its internals, not ours to show.
        with warnings.catch_warnings(), torch.serialization.safe_globals(ALLOWED_GLOBALS):
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", mmap=kind == "zip", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(_load_error(exc, kind), path=path) from None
    return obj, kind == "zip"


def load_state_dict_file(path) -> dict[str, torch.Tensor]:
    """A ``pytorch_model.bin``-style file: a flat dict of names -> tensors, every tensor checked."""
    path = Path(path)
    obj, _ = load_torch(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a state dict (a dict of tensors), got a {type(obj).__name__}", path=path)
    check_tensors(obj, path=path)
    return dict(obj)


def _file_kind(path: Path) -> str:
    try:
        if path.is_dir():
            raise CheckpointError("is a directory, expected a checkpoint file", path=path)
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
    except FileNotFoundError:
        raise CheckpointError("no such file", path=path) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read: {exc.strerror or exc}", path=path) from None
    if not head:
        raise CheckpointError("file is empty, not a checkpoint", path=path)
    if head[:4] in _ZIP_MAGICS:
        return "zip"
    if head == _LEGACY_MAGIC:
        return "legacy"
    raise CheckpointError(
        "not a PyTorch checkpoint (neither a torch zip archive nor a legacy torch file); ofaconv reads only those",
        path=path,
    )


def _python3_name(dotted: str) -> str:
    """A global as Python 3 names it: torch pickles at protocol 2, which writes Python 2's names
    (``subprocess.Popen`` is stored as ``commands.Popen``)."""
    import _compat_pickle

    module, _, name = dotted.rpartition(".")
    python3 = (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), python3)
    return f"{module}.{name}" if module else name


def _zip_error(exc: Exception) -> str:
    msg = str(exc)
    if "central directory" in msg or "failed reading zip archive" in msg:
        return "truncated or corrupt checkpoint (the zip archive has no readable central directory)"
    if "not in a subdirectory" in msg or "data.pkl" in msg or "Expected input to be a checkpoint" in msg:
        return "a zip archive but not a PyTorch checkpoint"
    if "resize storage" in msg or "storage has wrong byte size" in msg or "invalid storage offset" in msg \
            or "Storage size calculation" in msg:
        return "a tensor reaches outside its stored bytes (corrupt or forged checkpoint); ofaconv refuses it"
    return "truncated or corrupt checkpoint (torch could not read it); re-download or re-save the file"


def _load_error(exc: Exception, kind: str) -> str:
    if isinstance(exc, pickle.UnpicklingError):
        # torch's wording ends in hints to load unsafely; only the refused global's name is kept.
        wanted = re.findall(r"GLOBAL ([\w.]+)", str(exc)) or re.findall(r"Unsupported global: ([\w.]+)", str(exc))
        which = f" ({', '.join(dict.fromkeys(map(_python3_name, wanted)))})" if wanted else ""
        return f"refusing to unpickle: the file needs a global outside the allow-list{which} " + _REFUSE_HINT
    if kind == "zip" or isinstance(exc, RuntimeError):
        return _zip_error(exc)
    return "truncated or corrupt legacy torch file; re-download or re-save the file"


# --------------------------------------------------------------------------------------------
# Tensor checks (metadata only: nothing is paged in)


def check_tensors(state: Mapping, *, path=None, prefix: str = "") -> None:
    """Every entry is a dense CPU tensor that owns the bytes it shows.

    Refused: non-tensors, sparse / quantized / nested layouts, meta tensors, and any strided view
    whose elements overlap (stride 0 over a dimension of size > 1, as ``expand`` makes) or reach
    past its storage. Such a view turns a few stored bytes into an arbitrarily large tensor once
    anything copies it.
    """
    for name, value in state.items():
        key = f"{prefix}{name}"
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"is a {type(value).__name__}, expected a tensor", path=path, key=key)
        problem = _tensor_problem(value)
        if problem:
            raise CheckpointError(problem, path=path, key=key)


_SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)


def _tensor_problem(t: torch.Tensor) -> str | None:
    if t.layout != torch.strided:
        kind = "sparse" if t.layout in _SPARSE_LAYOUTS else str(t.layout).removeprefix("torch.")
        return f"is a {kind} tensor; ofaconv converts dense weights only"
    if t.is_quantized:
        return "is a quantized tensor; ofaconv converts dense weights only"
    if t.is_nested:
        return "is a nested tensor; ofaconv converts dense weights only"
    if t.is_meta:
        return "is a meta tensor (a shape without stored data); ofaconv converts stored weights only"
    if t.device.type != "cpu":
        return f"is on device {t.device.type}, expected a CPU tensor"
    if t.numel() == 0:
        return None
    offset, stride, size = t.storage_offset(), t.stride(), list(t.shape)
    stored = t.untyped_storage().nbytes()
    if offset < 0 or any(s < 0 for s in stride):
        return "has a negative stride or storage offset (corrupt or forged checkpoint)"
    # Walking the dimensions from the smallest stride up, each stride must step past every element
    # the smaller ones reach: then no two elements share bytes (slices and transposes pass).
    reach = 1
    for st, n in sorted((st, n) for st, n in zip(stride, size) if n > 1):
        if st < reach:
            return (f"is an expanded or overlapping view (shape {size}, strides {list(stride)}): its "
                    f"{t.numel()} elements share {stored} stored bytes; ofaconv refuses such views "
                    "(save the tensor after .clone())")
        reach += st * (n - 1)
    if (offset + reach) * t.element_size() > stored:
        return (f"reaches past its stored bytes (shape {size}, offset {offset}, {stored} bytes stored); "
                "corrupt or forged checkpoint")
    return None


_FINITE_CHUNK = 1 << 24


def check_finite(state: Mapping[str, torch.Tensor], *, path=None) -> None:
    """Raise ``CheckpointError`` at the first floating tensor holding NaN or Inf (chunked: bounded extra memory)."""
    for name, tensor in state.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        flat = tensor.reshape(-1)
        n_nan = n_inf = 0
        for start in range(0, flat.numel(), _FINITE_CHUNK):
            chunk = flat[start : start + _FINITE_CHUNK]
            if bool(torch.isfinite(chunk).all()):
                continue
            n_nan += int(torch.isnan(chunk).sum())
            n_inf += int(torch.isinf(chunk).sum())
        if n_nan or n_inf:
            raise CheckpointError(f"holds {n_nan} NaN and {n_inf} Inf values", path=path, key=name)


# --------------------------------------------------------------------------------------------
# Model folders (transformers layout)


def read_config(folder: str | os.PathLike) -> dict:
    cfg_path = Path(folder) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError("no config.json", path=folder)
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        detail = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise CheckpointError(f"malformed JSON: {detail}", path=cfg_path) from None
    if not isinstance(cfg, dict):
        raise CheckpointError("config is not a JSON object", path=cfg_path)
    return cfg


def load_safetensors(path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError("no such file", path=path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"unreadable safetensors file: {first}", path=path) from None
    check_tensors(state, path=path)
    return state


def read_folder_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """State dict of a transformers model folder: single or sharded safetensors, else pytorch_model.bin."""
    folder = Path(folder)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            return read_sharded(index)
    if (folder / "model.safetensors").is_file():
        return load_safetensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return load_state_dict_file(folder / "pytorch_model.bin")
    raise CheckpointError("no model.safetensors or pytorch_model.bin", path=folder)


def read_sharded(index) -> dict[str, torch.Tensor]:
    """The state dict of a sharded folder from its ``*.index.json`` (safetensors or pickled shards)."""
    index = Path(index)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"malformed shard index: {exc}", path=index) from None
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise CheckpointError(f"shard {shard!r} is not a file name in this folder", path=index)
        file = index.parent / shard
        state.update(load_safetensors(file) if shard.endswith(".safetensors") else load_state_dict_file(file))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointError("key listed in the shard index is absent from its shard", path=index, key=missing[0])
    return state
