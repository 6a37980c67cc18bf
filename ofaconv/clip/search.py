"""``ofaconv clip search``: embed a folder or a Chinese-CLIP TSV of images once into an on-disk
index (a FeatureCache keyed by image id + a fingerprint of the image tower, its projection and
pre-processing), then answer text queries with the top-k images. Re-running over a grown folder
embeds only the new images; a different model starts a fresh index."""

from __future__ import annotations

import json
import os
from pathlib import Path


from ofaconv.core.errors import OfaconvError
from ofaconv.core.featcache import FeatureCache
from .data import DataStats, ImageStore
from .towers import ClipTowers

__all__ = ["build_index", "query_index"]

_MANIFEST = "index.json"


def _store_for(source: Path) -> ImageStore:
    source = Path(source)
    if source.is_dir():
        return ImageStore(root=source)
    if source.is_file() and source.suffix.lower() == ".tsv":
        return ImageStore(tsv=source)
    raise OfaconvError("expected an image folder or a .tsv of base64 images", path=source)


def build_index(towers: ClipTowers, source: str | os.PathLike, index_dir: str | os.PathLike, *,
                batch_size: int = 64) -> dict:
    index_dir = Path(index_dir)
    store = _store_for(Path(source))
    ids = store.ids()
    cache = FeatureCache(index_dir, namespace="clip-search", fingerprint=towers.image_fingerprint(include_projection=True))
    todo = cache.missing(ids)
    stats = DataStats(rows=len(ids))
    bad = []
    for start in range(0, len(todo), batch_size):
        chunk_ids, images = [], []
        for image_id in todo[start : start + batch_size]:
            try:
                images.append(store.load(image_id))
                chunk_ids.append(image_id)
            except Exception as exc:
                bad.append(image_id)
                stats.bad("bad_images", f"{image_id} ({type(exc).__name__})")
        if chunk_ids:
            cache.put_many(chunk_ids, towers.encode_images(images, batch_size=batch_size))
    kept = [i for i in ids if i in cache]
    manifest = {"source": str(Path(source).resolve()), "fingerprint": cache.fingerprint, "ids": kept,
                "newly_embedded": len(todo) - len(bad), "bad_images": stats.bad_images, "examples": stats.examples}
    tmp = index_dir / f".{_MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, ensure_ascii=False))
    os.replace(tmp, index_dir / _MANIFEST)
    return {k: v for k, v in manifest.items() if k != "ids"} | {"images": len(kept)}


def query_index(towers: ClipTowers, index_dir: str | os.PathLike, queries: list[str], *, k: int = 10) -> list[dict]:
    index_dir = Path(index_dir)
    path = index_dir / _MANIFEST
    if not path.is_file():
        raise OfaconvError("not a search index (no index.json); build it with --images first", path=index_dir)
    manifest = json.loads(path.read_text())
    fp = towers.image_fingerprint(include_projection=True)
    if manifest["fingerprint"] != fp:
        raise OfaconvError("index was built with another model or pre-processing; rebuild it", path=index_dir)
    cache = FeatureCache(index_dir, namespace="clip-search", fingerprint=fp, invalidate_stale=False)
    ids = manifest["ids"]
    if not ids:
        raise OfaconvError("index holds no images", path=index_dir)
    feats = cache.get_many(ids)
    q = towers.encode_texts(queries)
    sims = q @ feats.t()
    top = sims.topk(min(k, len(ids)), dim=1)
    return [{"query": text, "results": [{"image": ids[j], "cosine": float(s)}
                                         for s, j in zip(top.values[r].tolist(), top.indices[r].tolist())]}
            for r, text in enumerate(queries)]
