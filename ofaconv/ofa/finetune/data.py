"""Caption data: MUGE files (captions jsonl + image TSV) and plain image/caption pair lists.

MUGE caption format: a jsonl of ``{"image_id": str, "text": [captions...]}`` and an image TSV of
``image_id<TAB>base64`` lines (urlsafe or standard alphabet, as published). Pairs format: a CSV with
a header, or a jsonl, of ``image_path`` and ``caption`` (image paths relative to the file, or to
``images`` when given). Every caption of an image becomes one (image, caption) pair.

The schema (column names, the TSV's tab) is checked on the first record, before any training
starts; a wrong column is one clear error. After that, malformed lines, captions naming unknown
images and images that cannot be decoded are counted, skipped and summarised at the end with the
first line numbers of each kind (``DataIssues``).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import string
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ofaconv.core.errors import DataError
from ofaconv.core.images import ImageDecodeError, ImageTsv, open_image  # noqa: F401 - batching, cache import it here

__all__ = [
    "DataIssues",
    "CaptionSet",
    "TsvImages",
    "FileImages",
    "read_muge",
    "read_pairs",
    "load_split",
    "clean_caption",
    "split_holdout",
]

MUGE_COLUMNS = {"image_id": "image_id", "text": "text"}
PAIRS_COLUMNS = {"image": "image_path", "caption": "caption"}
_ASCII_PUNCT = str.maketrans("", "", string.punctuation)
_EXAMPLES = 5


# ---------------------------------------------------------------------------------------------
# Issue accounting
# ---------------------------------------------------------------------------------------------

_KIND_TEXT = {
    "malformed_line": "malformed lines",
    "empty_caption": "empty captions",
    "unknown_image": "captions naming unknown images",
    "duplicate_image": "duplicate image ids in the image file (first kept)",
    "undecodable_image": "undecodable images",
}


@dataclass
class DataIssues:
    """Counts of skipped records by kind, with the first few locations of each."""

    counts: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)

    def add(self, kind: str, where: str, n: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n
        shown = self.examples.setdefault(kind, [])
        if len(shown) < _EXAMPLES and where not in shown:
            shown.append(where)

    def merge(self, other: "DataIssues | dict") -> None:
        data = other.as_dict() if isinstance(other, DataIssues) else other
        for kind, entry in data.items():
            self.counts[kind] = self.counts.get(kind, 0) + entry["count"]
            shown = self.examples.setdefault(kind, [])
            for where in entry["first"]:
                if len(shown) < _EXAMPLES and where not in shown:
                    shown.append(where)

    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {k: {"count": self.counts[k], "first": list(self.examples.get(k, []))} for k in sorted(self.counts)}

    def summary(self) -> list[str]:
        """One line per kind: ``skipped 3 malformed lines (captions.jsonl:4, captions.jsonl:17, ...)``."""
        lines = []
        for kind in sorted(self.counts):
            first = self.examples.get(kind, [])
            more = ", ..." if self.counts[kind] > len(first) else ""
            lines.append(f"skipped {self.counts[kind]} {_KIND_TEXT.get(kind, kind)} ({', '.join(first)}{more})")
        return lines


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


class TsvImages(ImageTsv):
    """A MUGE image TSV whose skipped rows are counted in ``issues``, with cache keys that change with the file."""

    def __init__(self, path: str | os.PathLike, issues: DataIssues | None = None):
        self.issues = issues if issues is not None else DataIssues()
        super().__init__(path, self.issues.add)
        stat = self.path.stat()
        self.tag = _short_hash(f"{self.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}")

    def cache_key(self, image_id: str) -> str:
        return f"{image_id}@{self.tag}"


class FileImages:
    """``image path -> image`` for pairs files; ids are paths as written in the captions file."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._stat: dict[str, tuple[int, int]] = {}

    def resolve(self, image_id: str) -> Path:
        path = Path(image_id)
        return path if path.is_absolute() else self.root / path

    def __contains__(self, image_id: str) -> bool:
        if image_id in self._stat:
            return True
        try:
            stat = self.resolve(image_id).stat()
        except OSError:
            return False
        self._stat[image_id] = (stat.st_size, stat.st_mtime_ns)
        return True

    def where(self, image_id: str) -> str:
        return str(self.resolve(image_id))

    def cache_key(self, image_id: str) -> str:
        size, mtime = self._stat.get(image_id) or (0, 0)
        return _short_hash(f"{self.resolve(image_id).resolve()}|{size}|{mtime}") + "@" + Path(image_id).name

    def open(self, image_id: str):
        return open_image(self.resolve(image_id), self.where(image_id))


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


def clean_caption(text: str, strip_punctuation: bool = True) -> str:
    """fairseq's training-caption cleaning: ASCII punctuation removed, whitespace collapsed."""
    if strip_punctuation:
        text = text.translate(_ASCII_PUNCT)
    return " ".join(text.split())


@dataclass
class CaptionSet:
    """The usable (image, caption) pairs of one split, with every caption of each image."""

    images: TsvImages | FileImages
    image_ids: list[str]  # unique, first-seen order
    pair_images: list[int]  # per pair: index into image_ids
    captions: list[str]  # per pair
    issues: DataIssues
    name: str = "train"

    def __len__(self) -> int:
        return len(self.captions)

    def references(self) -> dict[str, list[str]]:
        refs: dict[str, list[str]] = {}
        for image, caption in zip(self.pair_images, self.captions):
            refs.setdefault(self.image_ids[image], []).append(caption)
        return refs

    def select_images(self, keep: Iterable[str], name: str | None = None) -> "CaptionSet":
        """The pairs whose image is in ``keep`` (same image store and issues)."""
        keep = set(keep)
        new_ids = [i for i in self.image_ids if i in keep]
        position = {image_id: n for n, image_id in enumerate(new_ids)}
        pairs, captions = [], []
        for image, caption in zip(self.pair_images, self.captions):
            image_id = self.image_ids[image]
            if image_id in position:
                pairs.append(position[image_id])
                captions.append(caption)
        return CaptionSet(self.images, new_ids, pairs, captions, self.issues, name or self.name)


class _Builder:
    def __init__(self, images, issues: DataIssues, strip_punctuation: bool, name: str):
        self.images = images
        self.issues = issues
        self.strip = strip_punctuation
        self.name = name
        self.image_ids: list[str] = []
        self.position: dict[str, int] = {}
        self.pair_images: list[int] = []
        self.captions: list[str] = []

    def add(self, image_id: str, captions: Sequence[str], where: str) -> None:
        if image_id not in self.images:
            self.issues.add("unknown_image", where)
            return
        for caption in captions:
            cleaned = clean_caption(caption, self.strip)
            if not cleaned:
                self.issues.add("empty_caption", where)
                continue
            index = self.position.get(image_id)
            if index is None:
                index = self.position[image_id] = len(self.image_ids)
                self.image_ids.append(image_id)
            self.pair_images.append(index)
            self.captions.append(cleaned)

    def build(self, path: Path) -> CaptionSet:
        if not self.captions:
            detail = "; ".join(self.issues.summary()) or "the file has no records"
            raise DataError(f"no usable image/caption pairs ({detail})", path=path)
        return CaptionSet(self.images, self.image_ids, self.pair_images, self.captions, self.issues, self.name)


# A caption record is one short line (MUGE: an id and a few captions, well under a kilobyte). A
# longer one is not captions (a TSV given as captions, a file with no line breaks) and reading it
# whole would hold it, then its tokens, in memory.
MAX_LINE_BYTES = 1 << 20
_BOM = b"\xef\xbb\xbf"


def _lines(path: Path):
    """(line number, bytes without the line break) of every line, each at most ``MAX_LINE_BYTES``."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise DataError("captions file not found", path=path) from None
    except OSError as exc:
        raise DataError(f"cannot read captions file ({exc.strerror})", path=path) from None
    with fh:
        lineno = 0
        while True:
            line = fh.readline(MAX_LINE_BYTES + 2)
            if not line:
                return
            lineno += 1
            if lineno == 1 and line.startswith(_BOM):
                line = line[len(_BOM):]
            body = line.rstrip(b"\r\n")
            if len(body) > MAX_LINE_BYTES:
                raise DataError(f"line longer than {MAX_LINE_BYTES // 2**20} MiB: not a caption record "
                                "(one short line per image); check that this is the captions file",
                                path=f"{path}:{lineno}")
            yield lineno, body


def _text_lines(path: Path):
    """The lines as text (for the CSV reader); a line that is not UTF-8 is an error naming it."""
    for lineno, body in _lines(path):
        try:
            yield body.decode("utf-8") + "\n"
        except UnicodeDecodeError:
            raise DataError("not UTF-8 text; save the file as UTF-8", path=f"{path}:{lineno}") from None


def _caption_list(value) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


_NOT_UTF8 = object()  # a line that is not UTF-8 text


def _iter_jsonl(path: Path):
    """(line number, parsed object, or None for a line that is not JSON, or ``_NOT_UTF8``) for every non-empty line."""
    for lineno, body in _lines(path):
        if not body.strip():
            continue
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            yield lineno, _NOT_UTF8
            continue
        try:
            yield lineno, json.loads(text)
        except (ValueError, RecursionError):  # not JSON, or nested too deeply
            yield lineno, None


def _check_first_record(path: Path, lineno: int, record, required: dict, fmt: str) -> None:
    if record is _NOT_UTF8:
        raise DataError(f"line {lineno} is not UTF-8 text; save the file as UTF-8", path=path)
    if not isinstance(record, dict):
        raise DataError(f"line {lineno} is not a JSON object; expected {fmt} lines", path=path)
    missing = [name for name in required.values() if name not in record]
    if missing:
        found = ", ".join(repr(k) for k in record) or "none"
        raise DataError(
            f"line {lineno} lacks {', '.join(repr(m) for m in missing)} (found {found}); expected {fmt} lines "
            "(rename the columns with data.columns)",
            path=path,
            key=missing[0],
        )


def read_muge(
    captions: str | os.PathLike,
    images: str | os.PathLike | TsvImages,
    *,
    columns: dict | None = None,
    strip_punctuation: bool = True,
    issues: DataIssues | None = None,
    name: str = "train",
) -> CaptionSet:
    """Pairs from a MUGE caption jsonl and its image TSV."""
    cols = {**MUGE_COLUMNS, **{k: v for k, v in (columns or {}).items() if k in MUGE_COLUMNS}}
    issues = issues if issues is not None else DataIssues()
    store = images if isinstance(images, TsvImages) else TsvImages(images, issues)
    path = Path(captions)
    builder = _Builder(store, issues, strip_punctuation, name)
    first = True
    fmt = f'MUGE caption {{"{cols["image_id"]}": ..., "{cols["text"]}": [...]}}'
    for lineno, record in _iter_jsonl(path):
        where = f"{path.name}:{lineno}"
        if first:
            _check_first_record(path, lineno, record, cols, fmt)
            first = False
        if not isinstance(record, dict) or cols["image_id"] not in record:
            issues.add("malformed_line", where)
            continue
        texts = _caption_list(record.get(cols["text"]))
        image_id = record[cols["image_id"]]
        if texts is None or not isinstance(image_id, (str, int)) or isinstance(image_id, bool):
            issues.add("malformed_line", where)
            continue
        builder.add(str(image_id), texts, where)
    return builder.build(path)


def read_pairs(
    captions: str | os.PathLike,
    images: str | os.PathLike | None = None,
    *,
    columns: dict | None = None,
    strip_punctuation: bool = True,
    issues: DataIssues | None = None,
    name: str = "train",
) -> CaptionSet:
    """Pairs from a CSV (with header) or jsonl of ``image_path`` / ``caption`` records."""
    cols = {**PAIRS_COLUMNS, **{k: v for k, v in (columns or {}).items() if k in PAIRS_COLUMNS}}
    issues = issues if issues is not None else DataIssues()
    path = Path(captions)
    store = FileImages(images if images is not None else path.parent)
    builder = _Builder(store, issues, strip_punctuation, name)
    is_jsonl = path.suffix.lower() in (".jsonl", ".json", ".ndjson")
    if is_jsonl:
        first = True
        for lineno, record in _iter_jsonl(path):
            where = f"{path.name}:{lineno}"
            if first:
                _check_first_record(path, lineno, record, cols, "image/caption pair JSON")
                first = False
            texts = _caption_list(record.get(cols["caption"])) if isinstance(record, dict) else None
            image = record.get(cols["image"]) if isinstance(record, dict) else None
            if texts is None or not isinstance(image, str) or not image:
                issues.add("malformed_line", where)
                continue
            builder.add(image, texts, where)
        return builder.build(path)

    with contextlib.closing(_text_lines(path)) as lines:
        reader = csv.reader(lines)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError("empty CSV file", path=path) from None
        except csv.Error as exc:
            raise DataError(f"unreadable CSV header ({exc})", path=path) from None
        header = [h.strip() for h in header]
        missing = [c for c in cols.values() if c not in header]
        if missing:
            raise DataError(
                f"CSV header lacks {', '.join(repr(m) for m in missing)} (found {', '.join(repr(h) for h in header)}); "
                "rename the columns with data.columns",
                path=path,
                key=missing[0],
            )
        image_col, caption_col = header.index(cols["image"]), header.index(cols["caption"])
        lineno = 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error:
                lineno = reader.line_num
                issues.add("malformed_line", f"{path.name}:{lineno}")
                continue
            lineno = reader.line_num
            if not row or not any(cell.strip() for cell in row):
                continue
            where = f"{path.name}:{lineno}"
            if len(row) != len(header) or not row[image_col].strip():
                issues.add("malformed_line", where)
                continue
            builder.add(row[image_col].strip(), [row[caption_col]], where)
    return builder.build(path)


def load_split(spec, data_cfg, issues: DataIssues, name: str) -> CaptionSet:
    """One split of a recipe's ``data`` section."""
    if data_cfg.format == "muge":
        return read_muge(
            spec.captions, spec.images, columns=data_cfg.columns, strip_punctuation=data_cfg.strip_punctuation,
            issues=issues, name=name,
        )
    return read_pairs(
        spec.captions, spec.images, columns=data_cfg.columns, strip_punctuation=data_cfg.strip_punctuation,
        issues=issues, name=name,
    )


def split_holdout(data: CaptionSet, fraction: float, seed: int = 0) -> tuple[CaptionSet, CaptionSet]:
    """(train, held-out) split by image, stable under reordering: an image's hash decides its side."""
    held = [
        image_id
        for image_id in data.image_ids
        if (zlib.crc32(f"{seed}:{image_id}".encode()) & 0xFFFFFFFF) / 2**32 < fraction
    ]
    if fraction > 0 and not held and len(data.image_ids) > 1:
        held = [data.image_ids[-1]]
    held_set = set(held)
    train = data.select_images([i for i in data.image_ids if i not in held_set], name=data.name)
    return train, data.select_images(held, name="eval")
