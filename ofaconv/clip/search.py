"""``ofaconv clip search``: embed a folder or a Chinese-CLIP TSV of images once into an on-disk
index (a FeatureCache keyed by image id + a fingerprint of the image tower, its projection and
pre-processing), then answer text queries with the top-k images. Re-running over a grown folder
embeds only the new images. An index of another source or model is replaced only with ``force``;
a folder that is not an index ofaconv wrote is never written into. Images that do not decode are
skipped and listed (``failed``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ofaconv.core.errors import DataError, OfaconvError
from ofaconv.core.featcache import FeatureCache
from .data import ImageStore
from .evaluate import top_k
from .towers import ClipTowers

__all__ = ["build_index", "query_index"]

_MANIFEST = "index.json"
_SCHEMA = "ofaconv/clip-search@1"
_NAMESPACE = "clip-search"


def _store_for(source: Path) -> ImageStore:
    source = Path(source)
    if source.is_dir():
        return ImageStore(root=source)
    if source.is_file() and source.suffix.lower() == ".tsv":
        return ImageStore(tsv=source)
    raise OfaconvError("expected an image folder or a .tsv of base64 images", path=source)


def _read_manifest(index_dir: Path) -> dict | None:
    """The index's manifest; None when the folder holds none. A manifest ofaconv did not write is an error."""
    path = index_dir / _MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"not a search index ofaconv wrote ({type(exc).__name__}); choose another --index",
                        path=path) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("ids"), list) \
            or not isinstance(manifest.get("fingerprint"), str):
        raise DataError("not a search index ofaconv wrote (no 'ids' and 'fingerprint'); choose another --index",
                        path=path)
    return manifest


def _check_replaceable(index_dir: Path, manifest: dict | None, source: Path, fp: str, force: bool) -> None:
    """Growing the same index is an update; anything else needs an empty folder or ``force`` over our index."""
    if manifest is None:
        if index_dir.exists() and (not index_dir.is_dir() or any(index_dir.iterdir())):
            raise DataError("exists and is not a search index; ofaconv writes an index only into a new or empty "
                            "folder", path=index_dir)
        return
    other = [what for what, same in (("images", manifest.get("source") == str(source)),
                                     ("model", manifest["fingerprint"] == fp)) if not same]
    if other and not force:
        raise DataError(f"holds an index of other {' and '.join(other)} ({manifest.get('source')}); pass --force to "
                        "replace it, or choose another --index", path=index_dir / _MANIFEST)
    unknown = sorted(p.name for p in index_dir.iterdir() if p.name not in (_MANIFEST, _NAMESPACE))
    if other and unknown:
        raise DataError(f"holds files an index does not ({unknown[0]}); ofaconv replaces only what it wrote",
                        path=index_dir)


def build_index(towers: ClipTowers, source: str | os.PathLike, index_dir: str | os.PathLike, *,
                batch_size: int = 64, force: bool = False) -> dict:
    index_dir, source = Path(index_dir), Path(source).resolve()
    store = _store_for(source)
    ids = store.ids()
    fp = towers.image_fingerprint(include_projection=True)
    manifest = _read_manifest(index_dir)
    _check_replaceable(index_dir, manifest, source, fp, force)
    created = not index_dir.exists()
    try:
        if manifest is not None and manifest.get("source") != str(source):
            shutil.rmtree(index_dir / _NAMESPACE, ignore_errors=True)  # --force: the other images' features
        cache = FeatureCache(index_dir, namespace=_NAMESPACE, fingerprint=fp)  # drops another model's features
        todo = cache.missing(ids)
        feats, kept, failed = towers.encode_readable_images(todo, load=store.load, batch_size=batch_size)
        cache.put_many([todo[i] for i in kept], feats)
        indexed = [i for i in ids if i in cache]
        manifest = {"schema": _SCHEMA, "source": str(source), "fingerprint": fp, "ids": indexed,
                    "newly_embedded": len(kept), "bad_images": len(failed),
                    "failed": [{"image": where, "error": reason} for where, reason in failed]}
        tmp = index_dir / f".{_MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, index_dir / _MANIFEST)
    except BaseException:
        if created:  # a new index that did not finish is not left half-built
            shutil.rmtree(index_dir, ignore_errors=True)
        raise
    return {k: v for k, v in manifest.items() if k not in ("ids", "schema")} | {"images": len(indexed),
                                                                                "total": len(ids)}


def query_index(towers: ClipTowers, index_dir: str | os.PathLike, queries: list[str], *, k: int = 10) -> list[dict]:
    index_dir = Path(index_dir)
    manifest = _read_manifest(index_dir)
    if manifest is None:
        raise OfaconvError("not a search index (no index.json); build it with --images first", path=index_dir)
    fp = towers.image_fingerprint(include_projection=True)
    if manifest["fingerprint"] != fp:
        raise OfaconvError("index was built with another model or pre-processing; rebuild it", path=index_dir)
    cache = FeatureCache(index_dir, namespace=_NAMESPACE, fingerprint=fp, invalidate_stale=False)
    ids = manifest["ids"]
    if not ids:
        raise OfaconvError("index holds no images", path=index_dir)
    feats = cache.get_many(ids)
    sims = towers.encode_texts(queries) @ feats.t()
    top = top_k(sims, min(k, len(ids)))
    return [{"query": text, "results": [{"image": ids[j], "cosine": float(sims[r, j])} for j in top[r].tolist()]}
            for r, text in enumerate(queries)]
