"""sha256 of large files, in the foreground or on a worker thread (stdlib only: a conversion starts
hashing its source before it imports torch)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import mmap
import os
import threading

CHUNK_BYTES = 64 * 2**20  # a multiple of every page size
_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


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
                    if stop is not None and stop.is_set():
                        raise concurrent.futures.CancelledError(f"hashing {path} was stopped")
                    length = min(chunk_bytes, size - start)
                    digest.update(view[start : start + length])
                    if _DONTNEED is not None:
                        mapped.madvise(_DONTNEED, start, length)
            finally:
                view.release()
    return digest.hexdigest()


class BackgroundSha256:
    """``file_sha256(path)`` on a worker thread started at construction.

    ``cancel()`` stops it at the next chunk: a conversion that fails early must not keep the
    process alive for seconds hashing a source whose report will never be written.
    """

    def __init__(self, path):
        self._stop = threading.Event()
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ofaconv-sha256")
        self._future = pool.submit(file_sha256, path, CHUNK_BYTES, self._stop)
        pool.shutdown(wait=False)

    def result(self) -> str:
        return self._future.result()

    def cancel(self) -> None:
        self._stop.set()
