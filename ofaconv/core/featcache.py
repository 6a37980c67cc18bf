"""Disk-backed cache for the outputs of a frozen tower (image embeddings, encoder states).

A cache lives in ``root/<namespace>/<fingerprint>/`` and maps item ids (strings) to tensors.
The fingerprint hashes the frozen module's weights together with every setting that changes
its input or output (image size, prompt, normalisation...), so a cache can never serve features
computed by different weights or preprocessing: opening the cache with a new fingerprint starts
an empty folder and deletes the stale siblings of the same namespace.

Storage is append-only: each ``put_many`` writes one safetensors shard (temp file, then rename),
so several processes (one per rank, DataLoader workers) can fill and read the same cache without
locks; a reader picks up shards written by others on ``refresh()``. Shards are read with mmap.

    fp = fingerprint(model.vision_model, image_size=224, crop=True)
    cache = FeatureCache(root, namespace="clip-image", fingerprint=fp, dtype=torch.float16)
    todo = cache.missing(ids)
    cache.put_many(todo, compute(todo))
    feats = cache.get_many(ids)          # float32 by default, stacked
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import OfaconvError
from .writer import atomic_path, write_atomic

__all__ = ["FeatureCache", "fingerprint", "CacheError"]

_SHARD_SUFFIX = ".safetensors"
_META = "cache.json"
_SCHEMA = "ofaconv/featcache@1"


class CacheError(OfaconvError):
    """The cache folder is unreadable or holds something that is not a feature cache."""


def fingerprint(module_or_state: torch.nn.Module | Mapping[str, torch.Tensor] | None = None, **settings) -> str:
    """Hex digest of weights (names, dtypes, shapes, bytes) plus JSON-serialisable settings."""
    h = hashlib.sha256()
    if module_or_state is not None:
        state = module_or_state.state_dict() if isinstance(module_or_state, torch.nn.Module) else module_or_state
        for name in sorted(state):
            tensor = state[name].detach().cpu().contiguous()
            h.update(name.encode())
            h.update(str(tensor.dtype).encode())
            h.update(str(tuple(tensor.shape)).encode())
            h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


class FeatureCache:
    """Map item id -> tensor, persisted under ``root/namespace/fingerprint[:32]``.

    dtype: storage dtype (e.g. ``torch.float16`` halves the disk size); reads return
    ``read_dtype`` (float32 unless told otherwise). ``invalidate_stale``: remove caches of the
    same namespace made with other fingerprints (disable when several jobs share one root).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        namespace: str,
        fingerprint: str,
        dtype: torch.dtype | None = None,
        read_dtype: torch.dtype | None = torch.float32,
        invalidate_stale: bool = True,
    ):
        if not namespace or "/" in namespace or namespace.startswith("."):
            raise CacheError(f"invalid cache namespace {namespace!r}")
        if not fingerprint or not all(c in "0123456789abcdef" for c in fingerprint):
            raise CacheError(f"fingerprint must be a hex digest, got {fingerprint!r}")
        self.root = Path(root)
        self.namespace = namespace
        self.fingerprint = fingerprint
        self.dtype = dtype
        self.read_dtype = read_dtype
        self.dir = self.root / namespace / fingerprint[:32]
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_meta()
        if invalidate_stale:
            self.invalidate_stale()
        self._index: dict[str, str] = {}
        self._seen: set[str] = set()
        self._handles: dict[str, object] = {}
        self._pid = os.getpid()
        self.refresh()

    # -- bookkeeping -------------------------------------------------------------------------
    def _write_meta(self) -> None:
        meta_path = self.dir / _META
        meta = {"schema": _SCHEMA, "namespace": self.namespace, "fingerprint": self.fingerprint}
        if meta_path.exists():
            try:
                found = json.loads(meta_path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise CacheError(f"unreadable cache metadata: {exc}", path=meta_path) from exc
            if found.get("schema") != _SCHEMA or found.get("fingerprint") != self.fingerprint:
                raise CacheError("cache folder belongs to another fingerprint or schema", path=meta_path)
            return
        write_atomic(meta_path, json.dumps(meta, indent=1))

    def invalidate_stale(self) -> list[Path]:
        """Delete caches of this namespace whose fingerprint differs; returns what was removed."""
        removed = []
        for sibling in (self.root / self.namespace).iterdir():
            if sibling.is_dir() and sibling.name != self.dir.name and (sibling / _META).exists():
                shutil.rmtree(sibling, ignore_errors=True)
                removed.append(sibling)
        return removed

    def refresh(self) -> None:
        """Index shards written since the last look (by this or another process)."""
        for shard in sorted(self.dir.glob(f"*{_SHARD_SUFFIX}")):
            if shard.name in self._seen or shard.name.startswith("."):
                continue
            try:
                with safe_open(str(shard), framework="pt") as f:
                    keys = list(f.keys())
            except Exception as exc:  # a truncated shard is a corrupt cache, never silently skipped
                raise CacheError(f"corrupt cache shard ({exc}); delete the cache folder", path=shard) from exc
            for key in keys:
                self._index[key] = shard.name
            self._seen.add(shard.name)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._index

    def ids(self) -> list[str]:
        return list(self._index)

    def missing(self, item_ids: Iterable[str]) -> list[str]:
        """Ids (deduplicated, in first-seen order) that have no cached entry."""
        out, seen = [], set()
        for i in item_ids:
            if i not in self._index and i not in seen:
                seen.add(i)
                out.append(i)
        return out

    # -- writing -----------------------------------------------------------------------------
    def put_many(self, item_ids: Sequence[str], tensors: torch.Tensor | Sequence[torch.Tensor]) -> None:
        if len(item_ids) != len(tensors):
            raise CacheError(f"{len(item_ids)} ids for {len(tensors)} tensors", path=self.dir)
        if not item_ids:
            return
        if len(set(item_ids)) != len(item_ids):
            raise CacheError("duplicate ids in one put_many call", path=self.dir)
        payload = {}
        for item_id, tensor in zip(item_ids, tensors):
            if not isinstance(item_id, str) or not item_id:
                raise CacheError(f"cache ids must be non-empty strings, got {item_id!r}", path=self.dir)
            t = tensor.detach().to("cpu")
            if self.dtype is not None:
                t = t.to(self.dtype)
            payload[item_id] = t.contiguous().clone()
        name = f"{uuid.uuid4().hex}{_SHARD_SUFFIX}"
        with atomic_path(self.dir / name) as tmp:
            save_file(payload, str(tmp), metadata={"schema": _SCHEMA, "fingerprint": self.fingerprint})
        for item_id in payload:
            self._index[item_id] = name
        self._seen.add(name)

    def put(self, item_id: str, tensor: torch.Tensor) -> None:
        self.put_many([item_id], [tensor])

    # -- reading -----------------------------------------------------------------------------
    def _handle(self, shard: str):
        if self._pid != os.getpid():  # forked DataLoader worker: mmap handles are per process
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(shard)
        if handle is None:
            handle = safe_open(str(self.dir / shard), framework="pt")
            self._handles[shard] = handle
        return handle

    def get(self, item_id: str) -> torch.Tensor:
        shard = self._index.get(item_id)
        if shard is None:
            self.refresh()
            shard = self._index.get(item_id)
            if shard is None:
                raise KeyError(item_id)
        t = self._handle(shard).get_tensor(item_id)
        return t.to(self.read_dtype) if self.read_dtype is not None else t

    def get_many(self, item_ids: Sequence[str]) -> torch.Tensor:
        return torch.stack([self.get(i) for i in item_ids])

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def close(self) -> None:
        self._handles = {}

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.glob(f"*{_SHARD_SUFFIX}"))
