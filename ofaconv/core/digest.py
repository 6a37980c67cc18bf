"""Digests of large inputs, in the foreground or on a worker thread.

Two digests identify a conversion's source:
- :func:`file_sha256`, the sha256 of the whole file: what a user compares with a published
  checksum. Stdlib only, so the CLI can start it before importing torch.
- :func:`state_fingerprint`, the sha256 of exactly the bytes a conversion uses: the checkpoint's
  pickle record (its arguments and the name, dtype, shape and storage of every tensor), then every
  tensor of the converted state dict, each either hashed or, where the conversion wrote it
  unchanged, named by where it went, which the weight files' sha256 (hashed as they are written,
  for the manifest) then covers. It binds the output to its input as firmly (change any byte the
  conversion read and it changes) at a fraction of the cost: a trainer checkpoint is mostly
  optimizer state that a conversion never reads (OFA-Large: 1.96 of 5.26 GB are weights), and the
  weights are hashed once, not once for the source and again for the manifest.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import mmap
import os
import threading
import zipfile
from collections.abc import Callable, Mapping

CHUNK_BYTES = 64 * 2**20  # a multiple of every page size
_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)
FINGERPRINT_SCHEME = "ofaconv/state-sha256@2"
# Reports written before 2026-12-07 hash every converted tensor's bytes (no written tensors, no files).
LEGACY_SCHEME = "ofaconv/state-sha256@1"
# A legacy (pre-zip) torch file has no separate pickle record: its fingerprint is the whole file's.
FILE_SCHEME = "file-sha256"


def file_sha256(path, chunk_bytes: int = CHUNK_BYTES, stop: threading.Event | None = None) -> str:
    """sha256 of a file, hashed straight from a read-only mapping in large chunks.

    The mapping saves the copy a ``read()`` makes (a third of the cost of hashing a checkpoint
    that sits in the page cache); each chunk is dropped from the mapping once hashed, so resident
    memory stays at one chunk. The GIL is taken a few times per chunk only, so hashing on a worker
    thread runs beside a busy main thread instead of queueing behind it. Setting ``stop`` ends it
    early with ``CancelledError``.
    """
    if chunk_bytes <= 0 or chunk_bytes % mmap.PAGESIZE:
        raise ValueError(f"chunk_bytes must be a positive multiple of the page size ({mmap.PAGESIZE})")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return digest.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                for start in range(0, size, chunk_bytes):
                    check_stop(stop, path)
                    length = min(chunk_bytes, size - start)
                    digest.update(view[start : start + length])
                    if _DONTNEED is not None:
                        mapped.madvise(_DONTNEED, start, length)
            finally:
                view.release()
    return digest.hexdigest()


def state_fingerprint(path, state: Mapping, *, written: Mapping[str, str] | None = None,
                      files: Mapping[str, dict] | None = None, release: Callable | None = None,
                      stop: threading.Event | None = None, scheme: str = FINGERPRINT_SCHEME) -> dict:
    """``{"scheme", "sha256"}``: the digest of the bytes a conversion of ``path`` reads.

    ``state`` maps names to the tensors the conversion reads (loaded from ``path``). The digest
    covers the zip's ``data.pkl`` record, then for each name in sorted order its name, dtype and
    shape and then either its bytes or, for a tensor the conversion wrote unchanged (``written``:
    source name -> output tensor name), the output name; last, the manifest entries (sha256, size)
    of the weight files written (``files``), which cover those tensors' bytes. So a conversion
    hashes every byte it converts once, for the manifest, and the fingerprint still changes with
    any byte the conversion read. A tensor sharing another's bytes, as tied embeddings do, is
    hashed once and named as an alias. ``release(tensor)`` is called once a tensor is hashed (to
    drop the pages of a memory-mapped checkpoint). A file that is not a zip archive is hashed whole.
    ``scheme`` ``LEGACY_SCHEME`` (no ``written``, no ``files``) recomputes an older report's.
    """
    return finish_fingerprint(fingerprint_prefix(path, state, written=written, release=release, stop=stop,
                                                 scheme=scheme), files)


def fingerprint_prefix(path, state: Mapping, *, written: Mapping[str, str] | None = None,
                       release: Callable | None = None, stop: threading.Event | None = None,
                       scheme: str = FINGERPRINT_SCHEME):
    """:func:`state_fingerprint` up to the weight files' entries, which :func:`finish_fingerprint`
    adds once they are written; a whole-file digest (no pickle record) is already final."""
    if scheme not in (FINGERPRINT_SCHEME, LEGACY_SCHEME) or (scheme == LEGACY_SCHEME and written):
        raise ValueError(f"unknown fingerprint scheme {scheme!r}, or written tensors with {LEGACY_SCHEME}")
    pickle_record = _pickle_record(path)
    if pickle_record is None:
        return {"scheme": FILE_SCHEME, "sha256": file_sha256(path, stop=stop)}
    written = written or {}
    digest = hashlib.sha256(scheme.encode() + b"\0")
    digest.update(len(pickle_record).to_bytes(8, "little"))
    digest.update(pickle_record)
    seen: dict[tuple[int, int], str] = {}
    for name in sorted(state):
        check_stop(stop, path)
        tensor = state[name]
        digest.update(f"\0{name}\0{str(tensor.dtype)}\0{list(tensor.shape)}\0".encode())
        if name in written:
            digest.update(f"written\0{written[name]}".encode())
            continue
        contiguous = tensor.is_contiguous()
        view = tensor if contiguous else tensor.contiguous()
        nbytes = view.numel() * view.element_size()
        where = (view.data_ptr(), nbytes)
        if nbytes and where in seen:
            digest.update(f"alias\0{seen[where]}".encode())
            continue
        if contiguous:  # a temporary copy's address may be reused by the next one
            seen[where] = name
        if nbytes:
            digest.update((ctypes.c_ubyte * nbytes).from_address(view.data_ptr()))
        if release is not None:
            release(tensor)
    return scheme, digest


def finish_fingerprint(prefix, files: Mapping[str, dict] | None = None) -> dict:
    """``{"scheme", "sha256"}`` from a :func:`fingerprint_prefix` and the weight files' entries."""
    if isinstance(prefix, dict):
        return prefix
    scheme, digest = prefix
    if (files is None) != (scheme == LEGACY_SCHEME):
        raise ValueError(f"{scheme} fingerprints {'need' if files is None else 'have no'} weight files")
    digest = digest.copy()
    for name in sorted(files or {}):
        digest.update(f"\0file\0{name}\0{files[name]['sha256']}\0{files[name]['size']}".encode())
    return {"scheme": scheme, "sha256": digest.hexdigest()}


def _pickle_record(path) -> bytes | None:
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        return archive.read(names[0]) if names else None


def check_stop(stop: threading.Event | None, path) -> None:
    """Raise ``CancelledError`` once ``stop`` (set by another thread) is set: ends a long job early."""
    if stop is not None and stop.is_set():
        raise concurrent.futures.CancelledError(f"work on {path} was stopped")


class Background:
    """``function(*args, stop=event, **kwargs)`` on a worker thread started at construction.

    ``cancel()`` sets the event, which the digests check between chunks: a conversion that fails
    early must not keep the process alive for seconds hashing a source whose report will never be
    written. As a context manager it cancels when the block raises.
    """

    def __init__(self, function: Callable, *args, **kwargs):
        self._stop = threading.Event()
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ofaconv-digest")
        self._future = pool.submit(function, *args, stop=self._stop, **kwargs)
        pool.shutdown(wait=False)

    def result(self):
        return self._future.result()

    def cancel(self) -> None:
        self._stop.set()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.cancel()


class BackgroundSha256(Background):
    """:func:`file_sha256` of ``path`` on a worker thread."""

    def __init__(self, path):
        super().__init__(file_sha256, path, CHUNK_BYTES)


class BackgroundFingerprint(Background):
    """:func:`fingerprint_prefix` on a worker thread; ``result(files)`` finishes it."""

    def __init__(self, path, state: Mapping, *, written: Mapping[str, str] | None = None,
                 release: Callable | None = None):
        super().__init__(fingerprint_prefix, path, state, written=written, release=release)

    def result(self, files: Mapping[str, dict] | None = None) -> dict:
        return finish_fingerprint(super().result(), files)
