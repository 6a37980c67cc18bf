"""Download the images of a URL list (BertCLIP's ``text,url,filename`` CSV) with timeouts,
retries with back-off, a thread pool, resume (valid files already on disk are skipped) and a
failure manifest; every file is checked with PIL (the seed's ``imghdr`` is gone in Python 3.13)
and written atomically, so an interrupted run leaves no half-written image."""

from __future__ import annotations

import csv
import json
import os
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import OfaconvError
from .data import validate_image_bytes

__all__ = ["download_images", "DownloadResult"]

_UA = "ofaconv-clip-downloader/1.0"


@dataclass
class DownloadResult:
    total: int = 0
    downloaded: int = 0
    skipped_existing: int = 0
    failed: int = 0

    def to_dict(self):
        return dict(self.__dict__)


def _fetch(url: str, timeout: float, retries: int, backoff: float, max_bytes: int) -> bytes:
    last = None
    for attempt in range(retries + 1):
        try:
            req = urllib.request.Request(url, headers={"User-Agent": _UA})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                data = resp.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise ValueError(f"larger than {max_bytes} bytes")
            return data
        except urllib.error.HTTPError as exc:
            last = exc
            if exc.code < 500 and exc.code != 429:  # client errors do not heal on retry
                break
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
            last = exc
        if attempt < retries:
            time.sleep(backoff * 2**attempt)
    raise last


def download_images(csv_path: str | os.PathLike, image_root: str | os.PathLike, *, workers: int = 16,
                    timeout: float = 10.0, retries: int = 2, backoff: float = 0.5, max_bytes: int = 20 << 20,
                    failures: str | os.PathLike | None = None, out_csv: str | os.PathLike | None = None,
                    allow_gif: bool = False) -> dict:
    csv_path, image_root = Path(csv_path), Path(image_root)
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if not {"url", "filename"} <= set(header):
            raise OfaconvError(f"CSV header must contain 'url' and 'filename', got {header}", path=csv_path)
        rows = list(reader)
    image_root.mkdir(parents=True, exist_ok=True)
    result = DownloadResult(total=len(rows))
    failed_rows = []

    def work(row):
        url, name = (row.get("url") or "").strip(), (row.get("filename") or "").strip()
        if not url or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            return row, "skip", "missing url/filename or unsafe filename"
        dest = image_root / name
        if dest.is_file() and validate_image_bytes(dest.read_bytes()) is None:
            return row, "existing", None
        try:
            data = _fetch(url, timeout, retries, backoff, max_bytes)
        except Exception as exc:
            return row, "failed", f"{type(exc).__name__}: {exc}"
        reason = validate_image_bytes(data)
        if reason is None and not allow_gif and data[:6] in (b"GIF87a", b"GIF89a"):
            reason = "GIF skipped (as the seed does)"
        if reason is not None:
            return row, "failed", f"not an image: {reason}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
        return row, "downloaded", None

    ok_rows = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for row, status, error in pool.map(work, rows):
            if status == "downloaded":
                result.downloaded += 1
            elif status == "existing":
                result.skipped_existing += 1
            else:
                result.failed += 1
                failed_rows.append({"url": row.get("url"), "filename": row.get("filename"), "error": error})
                continue
            ok_rows.append(row)
    failures = Path(failures) if failures else image_root / "download_failures.jsonl"
    with open(failures, "w", encoding="utf-8") as f:
        for rec in failed_rows:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    if out_csv:
        with open(out_csv, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(ok_rows)
    return {**result.to_dict(), "failures": str(failures), "out_csv": str(out_csv) if out_csv else None}
