"""``ofaconv clip search``: an on-disk index of image embeddings, answering text queries with the
top-k images. One index folder (``index.json``: the source, the image tower's fingerprint, the ids),
filled one of two ways:

- ``--images FOLDER|TSV``: the images are embedded here into a FeatureCache keyed by image id + a
  fingerprint of the image tower, its projection and pre-processing; re-running over a grown folder
  embeds only the new images; queries are an exact matrix product. For thousands of images.
- ``--embeddings DIR`` (what ``ofaconv clip embed`` wrote): a faiss index built shard by shard,
  ``flat`` (exact) below ``flat_below`` vectors, IVF (or HNSW) above; the build reports recall@10
  against exact search over the shards for a sample of the vectors as queries. For catalogs.

An index of another source or model is replaced only with ``force``; a folder that is not an index
ofaconv wrote is never written into. Images that do not decode are skipped and listed (``failed``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ofaconv.core.errors import DataError, OfaconvError
from ofaconv.core.featcache import FeatureCache
from ofaconv.core.writer import write_atomic
from .data import ImageStore
from .evaluate import top_k
from .towers import ClipTowers

__all__ = ["build_index", "build_index_from_embeddings", "query_index", "exact_top_k", "INDEX_KINDS", "FLAT_BELOW"]

_MANIFEST = "index.json"
_SCHEMA = "ofaconv/clip-search@1"
_NAMESPACE = "clip-search"
_FAISS_FILES = ("index.faiss", "ids.jsonl", "ids.offsets.npy")
INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")
FLAT_BELOW = 200_000  # exact search below this many vectors (about 0.1 s a query on a CPU at 512 dimensions)


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
    ids = manifest.get("ids") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("fingerprint"), str) \
            or not (isinstance(ids, list) or (manifest.get("backend") == "faiss" and ids == "ids.jsonl")):
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
    unknown = sorted(p.name for p in index_dir.iterdir() if p.name not in (_MANIFEST, _NAMESPACE, *_FAISS_FILES))
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
        for name in _FAISS_FILES:  # an index built from embeddings before
            (index_dir / name).unlink(missing_ok=True)
        cache = FeatureCache(index_dir, namespace=_NAMESPACE, fingerprint=fp)  # drops another model's features
        todo = cache.missing(ids)
        feats, kept, failed = towers.encode_readable_images(todo, load=store.load, batch_size=batch_size)
        cache.put_many([todo[i] for i in kept], feats)
        indexed = [i for i in ids if i in cache]
        manifest = {"schema": _SCHEMA, "source": str(source), "fingerprint": fp, "ids": indexed,
                    "newly_embedded": len(kept), "bad_images": len(failed),
                    "failed": [{"image": where, "error": reason} for where, reason in failed]}
        write_atomic(index_dir / _MANIFEST, json.dumps(manifest, ensure_ascii=False))
    except BaseException:
        if created:  # a new index that did not finish is not left half-built
            shutil.rmtree(index_dir, ignore_errors=True)
        raise
    return {k: v for k, v in manifest.items() if k not in ("ids", "schema")} | {"images": len(indexed),
                                                                                "total": len(ids)}


def query_index(towers: ClipTowers, index_dir: str | os.PathLike, queries: list[str], *, k: int = 10,
                nprobe: int | None = None, ef_search: int | None = None) -> list[dict]:
    """Top-``k`` images per text query: ``{"query", "results": [{"image", "cosine"}]}``. An index
    built from embeddings answers through faiss (``nprobe`` / ``ef_search`` override its IVF /
    HNSW search settings)."""
    index_dir = Path(index_dir)
    manifest = _read_manifest(index_dir)
    if manifest is None:
        raise OfaconvError("not a search index (no index.json); build it with --images or --embeddings first",
                           path=index_dir)
    fp = towers.image_fingerprint(include_projection=True)
    if manifest["fingerprint"] != fp:
        raise OfaconvError("index was built with another model or pre-processing; rebuild it", path=index_dir)
    if manifest.get("backend") == "faiss":
        return _query_faiss(towers, index_dir, manifest, queries, k=k, nprobe=nprobe, ef_search=ef_search)
    cache = FeatureCache(index_dir, namespace=_NAMESPACE, fingerprint=fp, invalidate_stale=False)
    ids = manifest["ids"]
    if not ids:
        raise OfaconvError("index holds no images", path=index_dir)
    feats = cache.get_many(ids)
    sims = towers.encode_texts(queries) @ feats.t()
    top = top_k(sims, min(k, len(ids)))
    return [{"query": text, "results": [{"image": ids[j], "cosine": float(sims[r, j])} for j in top[r].tolist()]}
            for r, text in enumerate(queries)]


# ---------------------------------------------------------------------------------------------
# Indexes built from an embeddings folder (``ofaconv clip embed``), through faiss
# ---------------------------------------------------------------------------------------------


def _faiss():
    try:
        import faiss
    except ImportError:
        raise OfaconvError("faiss is not installed; pip install 'ofaconv[faiss]' (faiss-cpu) to build or query an "
                           "index of embeddings") from None
    return faiss


def _sample_rows(embeddings: Path, manifest: dict, rows, dim: int):
    """The vectors at the (sorted, unique) global row numbers ``rows``, read shard by shard."""
    import numpy as np

    from ofaconv.core.catalog import iter_embedding_shards

    out, start, rows = [], 0, np.asarray(rows)
    for _, matrix in iter_embedding_shards(embeddings, manifest):
        end = start + matrix.shape[0]
        mine = rows[(rows >= start) & (rows < end)] - start
        if len(mine):
            out.append(np.asarray(matrix[mine], dtype=np.float32))
        start = end
    return np.concatenate(out) if out else np.zeros((0, dim), dtype=np.float32)


def exact_top_k(embeddings, queries, k: int = 10, manifest: dict | None = None):
    """(scores, rows) of the exact top-``k`` inner products of ``queries`` [Q, dim] over every
    shard of an embeddings folder, one shard in memory at a time; rows sorted best first."""
    import numpy as np

    from ofaconv.core.catalog import iter_embedding_shards, read_embeddings_manifest

    manifest = manifest or read_embeddings_manifest(embeddings)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    start = 0
    for _, matrix in iter_embedding_shards(embeddings, manifest):
        sims = queries @ np.asarray(matrix, dtype=np.float32).T
        scores = np.concatenate([best_s, sims], axis=1)
        rows = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + sims.shape[1]), sims.shape)], axis=1)
        keep = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(scores, keep, 1), np.take_along_axis(rows, keep, 1)
        start += matrix.shape[0]
    return best_s, best_i


def build_index_from_embeddings(embeddings: str | os.PathLike, index_dir: str | os.PathLike, *,
                                fingerprint: str | None = None, kind: str = "auto", flat_below: int = FLAT_BELOW,
                                nlist: int | None = None, nprobe: int | None = None, hnsw_m: int = 32,
                                ef_search: int | None = None, recall_queries: int = 100, force: bool = False,
                                seed: int = 0) -> dict:
    """A faiss index over the shards of ``embeddings`` (an ``ofaconv clip embed`` folder) in
    ``index_dir``: ``flat`` (exact inner product = cosine) when ``kind`` is ``auto`` and there are
    fewer than ``flat_below`` vectors, else IVF-Flat (``nlist`` lists, default 4·sqrt(N), trained on
    a sample; ``nprobe`` searched, default nlist/32, at least 16) or HNSW (``hnsw_m`` links,
    ``ef_search`` default 128). Vectors are added a shard at a time. ``recall_at_10`` in the
    result: the index's top-10 against exact search over the shards, for ``recall_queries`` of the
    vectors as queries. ``fingerprint``: the querying model's image fingerprint, which must be the
    one the embeddings were made with."""
    import math

    import numpy as np

    from ofaconv.core.catalog import iter_embedding_shards, read_embeddings_manifest
    from ofaconv.core.writer import output_lock, place_folder

    faiss = _faiss()
    if kind not in INDEX_KINDS:
        raise OfaconvError(f"--index-type {kind!r}: choose one of {', '.join(INDEX_KINDS)}")
    for flag, value in (("--flat-below", flat_below), ("--nlist", nlist), ("--nprobe", nprobe),
                        ("--ef-search", ef_search), ("--recall-queries", recall_queries)):
        if value is not None and value < 1:
            raise OfaconvError(f"{flag} must be at least 1, got {value}")
    embeddings, index_dir = Path(embeddings).resolve(), Path(index_dir)
    emb = read_embeddings_manifest(embeddings)
    count, dim = int(emb.get("count") or 0), emb.get("dim")
    if count == 0 or not isinstance(dim, int):
        raise OfaconvError("holds no embeddings; nothing to index", path=embeddings / "embeddings.json")
    if fingerprint is not None and emb.get("fingerprint") != fingerprint:
        raise OfaconvError("embedded with another model or pre-processing than the one given; pass the model that "
                           "made them (its queries must share their space) or embed again",
                           path=embeddings / "embeddings.json", key="fingerprint")
    with output_lock(index_dir):
        manifest = _read_manifest(index_dir)
        _check_replaceable(index_dir, manifest, embeddings, emb["fingerprint"], force)
        if kind == "auto":
            kind = "flat" if count < flat_below else "ivf"
        params: dict = {}
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "ivf":
            nlist = min(nlist or max(1, int(4 * math.sqrt(count))), count)
            nprobe = min(nprobe or max(16, nlist // 32), nlist)
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.min_points_per_centroid = 1  # a small catalog trains on what it has (faiss would warn)
            rng = np.random.default_rng(seed)
            train = np.sort(rng.choice(count, size=min(count, 256 * nlist), replace=False))
            index.train(_sample_rows(embeddings, emb, train, dim))
            index.nprobe = nprobe
            params = {"nlist": nlist, "nprobe": nprobe}
        else:
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = max(40, 2 * hnsw_m)
            index.hnsw.efSearch = ef_search or 128
            params = {"m": hnsw_m, "ef_search": index.hnsw.efSearch}
        for _, matrix in iter_embedding_shards(embeddings, emb):
            index.add(np.ascontiguousarray(matrix, dtype=np.float32))
        rng = np.random.default_rng(seed + 1)
        probe = _sample_rows(embeddings, emb, np.sort(rng.choice(count, size=min(count, recall_queries),
                                                                  replace=False)), dim)
        k = min(10, count)
        _, exact = exact_top_k(embeddings, probe, k, emb)
        _, approx = index.search(probe, k)
        recall = float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx.tolist(), exact.tolist())]))
        from ofaconv.core.writer import _sibling

        tmp = _sibling(index_dir, "tmp")
        tmp.mkdir()
        try:
            offsets = np.zeros(count, dtype=np.uint64)
            with open(embeddings / emb.get("ids", "ids.jsonl"), "rb") as source, open(tmp / "ids.jsonl", "wb") as ids:
                for row in range(count):
                    line = source.readline()
                    if not line:
                        raise OfaconvError(f"holds fewer ids than the {count} rows of the shards",
                                           path=embeddings / "ids.jsonl")
                    offsets[row] = ids.tell()
                    ids.write(line)
            np.save(tmp / "ids.offsets.npy", offsets)
            faiss.write_index(index, str(tmp / "index.faiss"))
            built = {"schema": _SCHEMA, "backend": "faiss", "kind": kind, "source": str(embeddings),
                     "fingerprint": emb["fingerprint"], "ids": "ids.jsonl", "images": count, "dim": dim,
                     "params": params, "recall_at_10": round(recall, 4), "recall_queries": len(probe),
                     "bad_images": emb.get("failed", 0)}
            (tmp / _MANIFEST).write_text(json.dumps(built, ensure_ascii=False), encoding="utf-8")
            place_folder(tmp, index_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return {k: v for k, v in built.items() if k not in ("ids", "schema")}


def _query_faiss(towers: ClipTowers, index_dir: Path, manifest: dict, queries: list[str], *, k: int,
                 nprobe: int | None, ef_search: int | None) -> list[dict]:
    import numpy as np

    faiss = _faiss()
    try:
        index = faiss.read_index(str(index_dir / "index.faiss"))
        offsets = np.load(index_dir / "ids.offsets.npy", mmap_mode="r", allow_pickle=False)
    except (RuntimeError, OSError, ValueError) as exc:
        raise OfaconvError(f"unreadable index ({' '.join(str(exc).split())[:200]}); build it again",
                           path=index_dir) from None
    if manifest.get("kind") == "ivf":
        index.nprobe = nprobe or manifest.get("params", {}).get("nprobe", 16)
    elif manifest.get("kind") == "hnsw":
        index.hnsw.efSearch = ef_search or manifest.get("params", {}).get("ef_search", 128)
    vectors = np.ascontiguousarray(towers.encode_texts(queries).numpy(), dtype=np.float32)
    scores, rows = index.search(vectors, min(k, index.ntotal))
    out = []
    with open(index_dir / "ids.jsonl", "rb") as ids:
        for text, row_scores, row_ids in zip(queries, scores.tolist(), rows.tolist()):
            results = []
            for score, row in zip(row_scores, row_ids):
                if row < 0:  # fewer than k reachable (a sparse IVF probe)
                    continue
                ids.seek(int(offsets[row]))
                results.append({"image": json.loads(ids.readline()), "cosine": float(score)})
            out.append({"query": text, "results": results})
    return out
