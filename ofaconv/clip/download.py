"""Download the images of a URL list (BertCLIP's ``text,url,filename`` CSV) with timeouts,
retries with back-off, a thread pool, resume (valid files already on disk are skipped) and a
failure manifest; every file is checked with PIL (the seed's ``imghdr`` is gone in Python 3.13)
and written atomically, so an interrupted run leaves no half-written image.

Only ``http://`` and ``https://`` URLs are fetched, redirects included (``file://``, ``ftp://``,
``data:`` ... fail that row). An image is checked from its header first: one of more than
``max_pixels`` pixels (default ``PIL.Image.MAX_IMAGE_PIXELS``, the limit every ofaconv reader of
images applies) is refused undecoded; the others are checked whole without holding the full
bitmap: PNG by its chunk checksums, JPEG decoded at 1/8 scale, other formats decoded.

Each file has a total deadline over all its attempts besides the per-operation socket timeout,
which a server dripping bytes over a kept-alive connection never trips. Failures are appended to
the manifest (flushed per line) as they happen, and ``out_csv`` is written atomically at the end
or when the run is interrupted, so a stopped run still says what it has and what failed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from PIL import Image

from ofaconv.core.errors import DataError
from ofaconv.core.batch import Tally
from ofaconv.core.writer import atomic_file, write_atomic
from .data import read_csv

__all__ = ["download_images", "DownloadResult"]

_UA = "ofaconv-clip-downloader/1.0"
_SCHEMES = ("http", "https")
# urllib's default opener also serves file://, ftp:// and data: URLs (and follows redirects to
# ftp://); this one has the HTTP(S) handlers only, so no URL or redirect reaches anything else.
_OPENER = urllib.request.OpenerDirector()
for _handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), urllib.request.HTTPHandler(),
                 urllib.request.HTTPSHandler(), urllib.request.HTTPRedirectHandler(),
                 urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):
    _OPENER.add_handler(_handler)


class DownloadResult(Tally):
    FIELDS = ("total", "downloaded", "skipped_existing", "failed")


def _read_body(resp, end: float, deadline: float, max_bytes: int) -> bytes:
    chunks, size = [], 0
    while True:
        if time.monotonic() > end:
            raise TimeoutError(f"not finished within the {deadline:g} s per-file deadline ({size} bytes read)")
        # read1 returns after one receive; read(n) would keep waiting for n bytes of a slow drip
        chunk = resp.read1(1 << 16)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise ValueError(f"larger than {max_bytes} bytes")
        chunks.append(chunk)


def _fetch(url: str, timeout: float, deadline: float, retries: int, backoff: float, max_bytes: int) -> bytes:
    end = time.monotonic() + deadline
    last = None
    for attempt in range(retries + 1):
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"not finished within the {deadline:g} s per-file deadline") from last
        try:
            req = urllib.request.Request(url, headers={"User-Agent": _UA})
            with _OPENER.open(req, timeout=min(timeout, remaining)) as resp:
                return _read_body(resp, end, deadline, max_bytes)
        except urllib.error.HTTPError as exc:
            last = exc
            if exc.code < 500 and exc.code != 429:  # client errors do not heal on retry
                break
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
            last = exc
        if attempt < retries:
            time.sleep(max(0.0, min(backoff * 2**attempt, end - time.monotonic())))
    raise last


def check_image(data: bytes, max_pixels: int | None) -> str | None:
    """None when ``data`` is a whole image of at most ``max_pixels`` pixels, else why not."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if max_pixels and width * height > max_pixels:
                return f"{width}x{height} pixels, above the limit of {max_pixels} (--max-pixels)"
            kind = image.format
            image.verify()  # PNG: reads every chunk to IEND and checks its checksum, decoding nothing
        if kind == "PNG":
            return None
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))  # JPEG: decode at 1/8 scale
            image.load()  # reads all the data: a truncated file fails here
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt or truncated data
        return f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return None


def _write_csv_atomic(path: Path, header: list[str], rows: list[dict]) -> None:
    with atomic_file(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")  # cells past the header
        writer.writeheader()
        writer.writerows(rows)


def download_images(csv_path: str | os.PathLike, image_root: str | os.PathLike, *, workers: int = 16,
                    timeout: float = 10.0, deadline: float = 120.0, retries: int = 2, backoff: float = 0.5,
                    max_bytes: int = 20 << 20, max_pixels: int | None = None, failures: str | os.PathLike | None = None,
                    out_csv: str | os.PathLike | None = None, allow_gif: bool = False) -> dict:
    """``timeout`` bounds each socket operation, ``deadline`` a whole file (every attempt and back-off;
    a read already waiting may add up to one ``timeout``). ``max_pixels``: None for
    ``PIL.Image.MAX_IMAGE_PIXELS``, 0 for no limit. The result's ``first_failure`` is the first
    failed row of the CSV (its ``line``, ``url`` and ``error``), or None."""
    csv_path, image_root = Path(csv_path), Path(image_root)
    for flag, path in (("--failures", failures), ("--out-csv", out_csv)):
        if path and Path(path).resolve() == csv_path.resolve():
            raise DataError(f"{flag} names the input CSV; choose another file", path=path)
    max_pixels = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    with read_csv(csv_path) as (reader, header):
        if not {"url", "filename"} <= set(header):
            raise DataError(f"CSV header must contain 'url' and 'filename', got {header}", path=csv_path)
        rows, lines = [], []
        for row in reader:
            rows.append(row)
            lines.append(reader.line_num)
    if image_root.exists() and not image_root.is_dir():
        raise DataError("image root is not a folder", path=image_root)
    image_root.mkdir(parents=True, exist_ok=True)
    result = DownloadResult(total=len(rows))

    def check(data: bytes) -> str | None:
        reason = check_image(data, max_pixels)
        if reason is None and not allow_gif and data[:6] in (b"GIF87a", b"GIF89a"):
            reason = "GIF skipped (as the seed does)"
        return reason

    def work(row):
        url, name = (row.get("url") or "").strip(), (row.get("filename") or "").strip()
        if not url or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            return "skip", "missing url/filename or unsafe filename"
        if urllib.parse.urlsplit(url).scheme.lower() not in _SCHEMES:
            return "failed", "not an http(s) URL; only http:// and https:// are fetched"
        dest = image_root / name
        if dest.is_file() and check(dest.read_bytes()) is None:
            return "existing", None
        try:
            data = _fetch(url, timeout, deadline, retries, backoff, max_bytes)
        except Exception as exc:
            return "failed", f"{type(exc).__name__}: {exc}"
        reason = check(data)
        if reason is not None:
            return "failed", f"not an image: {reason}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(dest, data)
        return "downloaded", None

    failures = Path(failures) if failures else image_root / "download_failures.jsonl"
    ok: list[int] = []
    first_failure = None
    # a bounded window of submitted rows: a million-row CSV must not become a million futures
    window = 4 * max(1, workers)
    todo = iter(enumerate(rows))
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    # PIL warns while opening an image above MAX_IMAGE_PIXELS; check_image refuses it in words of its own
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with open(failures, "w", encoding="utf-8") as manifest:
                pending: dict = {}
                while True:
                    for index, row in todo:
                        pending[pool.submit(work, row)] = index
                        if len(pending) >= window:
                            break
                    if not pending:
                        break
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for index, future in sorted((pending.pop(f), f) for f in finished):  # row order
                        status, error = future.result()
                        if status == "downloaded":
                            result.downloaded += 1
                        elif status == "existing":
                            result.skipped_existing += 1
                        else:
                            result.failed += 1
                            row = rows[index]
                            record = {"line": lines[index], "url": row.get("url"), "filename": row.get("filename"),
                                      "error": error}
                            if first_failure is None or record["line"] < first_failure["line"]:
                                first_failure = record
                            manifest.write(json.dumps(record, ensure_ascii=False) + "\n")
                            manifest.flush()
                            continue
                        ok.append(index)
        finally:
            # On an interruption the queued rows are dropped and what is done is recorded before waiting for
            # the downloads already running: each ends by its deadline and is written whole for a resume.
            pool.shutdown(wait=False, cancel_futures=True)
            if out_csv:
                _write_csv_atomic(Path(out_csv), header, [rows[i] for i in sorted(ok)])
            pool.shutdown(wait=True)
    return {**result.to_dict(), "failures": str(failures), "out_csv": str(out_csv) if out_csv else None,
            "first_failure": first_failure}
