"""Image-text data in the two formats the CLIP tools read, with bad rows counted and skipped.

* BertCLIP CSV: header ``text,url,filename`` (``url`` optional); images under ``image_root``.
* Chinese-CLIP: ``{split}_imgs.tsv`` (``image_id<TAB>base64``) + ``{split}_texts.jsonl``
  (``{"text_id", "text", "image_ids": [...]}``).

A malformed row (missing field, bad JSON, unknown image id) is counted in ``DataStats`` and
skipped; a schema problem (wrong CSV header) is an error naming the file.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from ofaconv.core.errors import DataError, OfaconvError
from ofaconv.core.images import IMAGE_SUFFIXES, ImageDecodeError, ImageTsv, open_image
from ofaconv.core.batch import Tally

__all__ = ["Pair", "DataStats", "read_csv", "ImageStore", "read_pairs", "read_csv_pairs", "read_cnclip", "validate_image_bytes",
           "read_cnclip_texts", "read_image_tsv", "list_image_folder"]


@dataclass
class Pair:
    text: str
    image_id: str


class DataStats(Tally):
    """Rows read, pairs kept, and what was skipped (by kind, with the first examples)."""

    FIELDS = ("rows", "pairs", "bad_rows", "missing_images", "bad_images")


def validate_image_bytes(data: bytes) -> str | None:
    """None when ``data`` decodes as an image, else the reason (a PIL replacement for ``imghdr``)."""
    try:
        open_image(data, verify=True)
    except ImageDecodeError as exc:
        return exc.reason
    return None


class ImageStore:
    """id -> image over a folder or a Chinese-CLIP image TSV (kept as file offsets)."""

    def __init__(self, *, root: Path | None = None, tsv: Path | None = None):
        self.root = Path(root) if root else None
        self.tsv = ImageTsv(tsv) if tsv else None

    def ids(self) -> list[str]:
        if self.tsv is not None:
            return self.tsv.ids()
        return [str(p.relative_to(self.root)) for p in list_image_folder(self.root)]

    def __contains__(self, image_id: str) -> bool:
        if self.tsv is not None:
            return image_id in self.tsv
        return (self.root / image_id).is_file()

    def read(self, image_id: str) -> bytes:
        """Encoded bytes; ``ImageDecodeError`` (naming file:line) for a TSV row with broken base64."""
        if self.tsv is not None:
            return self.tsv.read(image_id)
        return (self.root / image_id).read_bytes()

    def load(self, image_id: str) -> Image.Image:
        """RGB image; ``ImageDecodeError`` naming the file (or TSV file:line) when it cannot be decoded."""
        if self.tsv is not None:
            return self.tsv.open(image_id)
        return open_image(self.root / image_id)


def list_image_folder(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise DataError("no such image folder", path=root)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_csv_pairs(csv_path: Path, image_root: Path | None, stats: DataStats) -> tuple[list[Pair], ImageStore]:
    csv_path = Path(csv_path)
    root = Path(image_root) if image_root else csv_path.parent
    pairs = []
    with read_csv(csv_path) as (reader, header):
        if "text" not in header or "filename" not in header:
            raise DataError(f"CSV header must contain 'text' and 'filename' (BertCLIP's text,url,filename), got {header}",
                            path=csv_path)
        for row in reader:
            lineno = reader.line_num
            stats.rows += 1
            text, name = (row.get("text") or "").strip(), (row.get("filename") or "").strip()
            if not text or not name:
                stats.bad("bad_rows", f"{csv_path}:{lineno}")
                continue
            if not (root / name).is_file():
                stats.bad("missing_images", f"{csv_path}:{lineno} {name}")
                continue
            pairs.append(Pair(text, name))
    return pairs, ImageStore(root=root)


@contextlib.contextmanager
def read_csv(path: Path):
    """(``csv.DictReader``, header) over a UTF-8 CSV (a byte-order mark allowed); text that is not
    UTF-8 or a malformed row is a ``DataError`` naming ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no such CSV file", path=path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames or []
            yield reader, header
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
        except csv.Error as exc:
            raise DataError(f"malformed CSV row ({exc})", path=f"{path}:{reader.line_num}") from None


def _not_utf8(path: Path) -> DataError:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return DataError(f"not UTF-8 text (byte {exc.start} of the line); save the file as UTF-8",
                                 path=f"{path}:{lineno}")
    return DataError("not UTF-8 text; save the file as UTF-8", path=path)


MAX_LINE_BYTES = 1 << 20  # a caption line longer than this is refused unread (one text, not a file)


def read_cnclip_texts(jsonl: Path, stats: DataStats, failed: list | None = None) -> list[dict]:
    """The usable records of a ``*_texts.jsonl``; each bad line (not UTF-8, not JSON, wrong fields,
    longer than ``MAX_LINE_BYTES``) is counted in ``stats.bad_rows`` and, when given, appended to
    ``failed`` as ("file:line", reason). Records carry their ``where`` ("file:line")."""
    jsonl = Path(jsonl)
    if not jsonl.is_file():
        raise DataError("no such texts JSONL", path=jsonl)
    out = []
    with open(jsonl, "rb") as f:
        for lineno, raw in enumerate(_lines(f), start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            stats.rows += 1
            where = f"{jsonl}:{lineno}"
            try:
                if raw is _TOO_LONG:
                    raise ValueError(f"line longer than {MAX_LINE_BYTES} bytes")
                obj = json.loads(raw.decode("utf-8"))
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
                text, ids = obj.get("text"), obj.get("image_ids")
                if not isinstance(text, str) or not text.strip() or not isinstance(ids, list):
                    raise ValueError("needs a non-empty string 'text' and a list 'image_ids'")
            except UnicodeDecodeError as exc:
                reason = f"not UTF-8 text (byte {exc.start})"
            except json.JSONDecodeError as exc:
                reason = f"invalid JSON ({exc.msg} at column {exc.colno})"
            except RecursionError:
                reason = "JSON nested too deeply"
            except ValueError as exc:
                reason = str(exc)
            else:
                out.append({"text_id": str(obj.get("text_id", lineno)), "text": text, "image_ids": [str(i) for i in ids],
                            "where": where})
                continue
            stats.bad("bad_rows", f"{where} ({reason})")
            if failed is not None:
                failed.append((where, reason))
    return out


_TOO_LONG = b"\0too-long"


def _lines(f):
    """The lines of a binary file, each at most ``MAX_LINE_BYTES`` in memory: a longer one is read
    past and given as ``_TOO_LONG``."""
    while True:
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(MAX_LINE_BYTES)
            yield _TOO_LONG
            continue
        yield line


def read_image_tsv(tsv: Path) -> ImageStore:
    return ImageStore(tsv=Path(tsv))


def read_cnclip(texts: Path, images: Path, stats: DataStats) -> tuple[list[Pair], ImageStore]:
    store = read_image_tsv(images)
    pairs = []
    for rec in read_cnclip_texts(texts, stats):
        for image_id in rec["image_ids"]:
            if image_id not in store:
                stats.bad("missing_images", f"{texts} text_id {rec['text_id']} image {image_id}")
                continue
            pairs.append(Pair(rec["text"], image_id))
    return pairs, store


def read_pairs(spec: dict, base: Path | None = None) -> tuple[list[Pair], ImageStore, DataStats]:
    """``spec``: {csv, image_root} or {texts, images} (paths relative to ``base``)."""
    stats = DataStats()

    def p(key):
        v = spec.get(key)
        return None if v is None else (Path(v) if base is None or os.path.isabs(v) else Path(base) / v)

    if spec.get("csv"):
        pairs, store = read_csv_pairs(p("csv"), p("image_root"), stats)
    elif spec.get("texts") and spec.get("images"):
        pairs, store = read_cnclip(p("texts"), p("images"), stats)
    else:
        raise DataError(f"data spec needs 'csv' (+ 'image_root') or 'texts' + 'images', got {sorted(spec)}")
    stats.pairs = len(pairs)
    return pairs, store, stats


def filter_decodable(pairs: list[Pair], store: ImageStore, stats: DataStats,
                     check: Callable[[bytes], str | None] = validate_image_bytes) -> list[Pair]:
    """Drop pairs whose image does not decode (each image checked once)."""
    ok: dict[str, bool] = {}
    out = []
    for pair in pairs:
        if pair.image_id not in ok:
            try:
                reason = check(store.read(pair.image_id))
            except (OSError, OfaconvError) as exc:  # OfaconvError: a TSV row whose base64 is broken
                reason = str(exc)
            ok[pair.image_id] = reason is None
            if reason is not None:
                stats.bad("bad_images", f"{pair.image_id} ({reason})")
        if ok[pair.image_id]:
            out.append(pair)
    stats.pairs = len(out)
    return out
