"""Images from files, bytes and base64 TSVs: one decoder, one TSV reader, one-line errors.

``open_image`` is the only place an input image is decoded: PIL, a decompression-bomb guard
(``PIL.Image.MAX_IMAGE_PIXELS``, read at call time; ``None`` lifts it), the whole image loaded (a
truncated file fails here, not later), converted to RGB. Every failure is an ``ImageDecodeError``
naming the file (or ``file:line`` of a TSV row); callers that go on count it and skip the image.

``ImageTsv`` reads ``image_id<TAB>base64[<TAB>...]`` files (MUGE, Chinese-CLIP; urlsafe or standard
alphabet) by byte offset, never all in memory. A UTF-8 byte-order mark is not part of the first id.

``expand_images`` turns command-line image arguments (files, directories, glob patterns) into
``ImageInput`` items, one per image, each argument that names none becoming an item with an error,
so batch commands (caption, clip similarity) report it and go on.
"""

from __future__ import annotations

import base64
import binascii
import glob
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from PIL import Image

from ofaconv.core.errors import DataError

__all__ = ["ImageDecodeError", "open_image", "decode_base64", "TsvRow", "tsv_rows", "ImageTsv", "IMAGE_SUFFIXES",
           "ImageInput", "expand_images"]

_BOM = b"\xef\xbb\xbf"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
_GLOB_CHARS = set("*?[")


class ImageDecodeError(DataError):
    """One image cannot be read; ``where`` is the file or ``file:line``, ``reason`` what went wrong."""

    def __init__(self, reason: str, *, path=None):
        super().__init__(reason, path=path)
        self.reason = reason

    @property
    def where(self) -> str:
        return str(self.path)


def open_image(source, where=None, *, verify: bool = False) -> Image.Image:
    """An RGB PIL image from a path, encoded bytes or a PIL image.

    ``where`` names the image in errors (default: the path, or ``<bytes>``). ``verify``: also run
    PIL's structural check (chunk checksums), which loading alone does not do.
    """
    if isinstance(source, Image.Image):
        return source if source.mode == "RGB" else source.convert("RGB")
    is_bytes = isinstance(source, (bytes, bytearray, memoryview))
    where = where if where is not None else ("<bytes>" if is_bytes else os.fspath(source))
    try:
        if verify:
            with Image.open(io.BytesIO(bytes(source)) if is_bytes else source) as image:
                image.verify()
        with Image.open(io.BytesIO(bytes(source)) if is_bytes else source) as image:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and image.size[0] * image.size[1] > limit:
                raise ImageDecodeError(_too_large(f"{image.size[0]}x{image.size[1]} pixels"), path=where)
            image.load()
            return image.convert("RGB")
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError("no such image file", path=where) from None
    except Image.DecompressionBombError:  # PIL's own check while opening (far above the limit)
        raise ImageDecodeError(_too_large("size"), path=where) from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt or truncated data
        message = str(exc).replace("\n", " ")
        raise ImageDecodeError(f"cannot read image ({type(exc).__name__}: {message})", path=where) from None


def _too_large(size: str) -> str:
    return (f"image {size} above PIL.Image.MAX_IMAGE_PIXELS ({Image.MAX_IMAGE_PIXELS} pixels), a possible "
            "decompression bomb; raise that limit only for images you trust")


def decode_base64(payload: bytes | str) -> bytes:
    """Bytes of base64 text in either alphabet (MUGE TSVs are urlsafe, others standard); padding optional."""
    if isinstance(payload, str):
        payload = payload.encode("ascii")
    payload = bytes(payload).translate(None, b" \t\r\n").translate(bytes.maketrans(b"-_", b"+/"))
    payload += b"=" * (-len(payload) % 4)
    return base64.b64decode(payload, validate=True)


@dataclass(frozen=True)
class TsvRow:
    """One non-blank TSV line; ``ok`` when it is ``image_id<TAB>base64`` (``image_id`` None: no tab)."""

    lineno: int
    image_id: str | None
    start: int  # byte offset of the base64 field
    length: int  # its length in bytes

    @property
    def ok(self) -> bool:
        return bool(self.image_id) and self.length > 0


def tsv_rows(path: str | os.PathLike) -> Iterator[TsvRow]:
    """The rows of an image TSV in file order (the base64 itself is not kept)."""
    path = Path(path)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise DataError("image TSV not found", path=path) from None
    except OSError as exc:
        raise DataError(f"cannot read image TSV ({exc.strerror})", path=path) from None
    with handle:
        offset = 0
        for lineno, line in enumerate(handle, 1):
            start, offset = offset, offset + len(line)
            if lineno == 1 and line.startswith(_BOM):
                line, start = line[len(_BOM):], start + len(_BOM)
            body = line.rstrip(b"\r\n")
            if not body.strip():
                continue
            tab = body.find(b"\t")
            if tab < 0:
                yield TsvRow(lineno, None, start, 0)
                continue
            end = body.find(b"\t", tab + 1)  # columns after the base64 are ignored
            end = len(body) if end < 0 else end
            yield TsvRow(lineno, body[:tab].decode("utf-8", "replace").strip(), start + tab + 1, end - tab - 1)


class ImageTsv:
    """``image_id -> image`` over a base64 image TSV, indexed by byte offset.

    The first row must have a tab (else the file is not an image TSV: ``DataError``). Later rows
    that are not ``image_id<TAB>base64`` and repeated ids (the first is kept) are passed to
    ``on_skip(kind, "file:line")`` with kind ``malformed_line`` / ``duplicate_image``.
    """

    def __init__(self, path: str | os.PathLike, on_skip: Callable[[str, str], None] | None = None):
        self.path = Path(path)
        self._rows: dict[str, TsvRow] = {}
        self._fh = None
        self._pid = None
        skip = on_skip or (lambda kind, where: None)
        for n, row in enumerate(tsv_rows(self.path)):
            if not row.ok:
                if n == 0 and row.image_id is None:
                    raise DataError(f"line {row.lineno} is not 'image_id<TAB>base64' (an image TSV); found no tab",
                                    path=self.path)
                skip("malformed_line", self._where(row))
            elif row.image_id in self._rows:
                skip("duplicate_image", self._where(row))
            else:
                self._rows[row.image_id] = row
        if not self._rows:
            raise DataError("no 'image_id<TAB>base64' lines", path=self.path)

    def _where(self, row: TsvRow) -> str:
        return f"{self.path.name}:{row.lineno}"

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def ids(self) -> list[str]:
        return list(self._rows)

    def where(self, image_id: str) -> str:
        row = self._rows.get(image_id)
        return self._where(row) if row else f"{self.path.name}:{image_id}"

    def read(self, image_id: str) -> bytes:
        """The image's encoded bytes; ``ImageDecodeError`` naming ``file:line`` for broken base64."""
        row = self._rows[image_id]
        if self._fh is None or self._pid != os.getpid():  # one handle per (forked) process
            self._fh, self._pid = open(self.path, "rb"), os.getpid()
        self._fh.seek(row.start)
        try:
            return decode_base64(self._fh.read(row.length))
        except (binascii.Error, ValueError) as exc:
            raise ImageDecodeError(f"invalid base64 ({exc})", path=self.where(image_id)) from None

    def open(self, image_id: str) -> Image.Image:
        return open_image(self.read(image_id), self.where(image_id))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fh"] = None
        return state


@dataclass
class ImageInput:
    """One input image: a display name and either a path, encoded bytes, or the reason it has none."""

    name: str
    path: Optional[str] = None
    data: Optional[bytes] = None
    error: Optional[str] = None

    def open(self) -> Image.Image:
        """The RGB image; ``ImageDecodeError`` naming this input when it has none or does not decode."""
        if self.error is not None:
            raise ImageDecodeError(self.error, path=self.name)
        return open_image(self.data if self.data is not None else self.path, self.name)


def _directory_images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def expand_images(arguments: Iterable[str]) -> Iterator[ImageInput]:
    """Files as given, directories as their image files (sorted), globs as their matches (sorted)."""
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = _directory_images(path)
            if not found:
                yield ImageInput(argument, error="directory holds no image files")
            for p in found:
                yield ImageInput(str(p), path=str(p))
        elif path.exists():
            yield ImageInput(argument, path=argument)
        elif _GLOB_CHARS & set(argument):
            matches = sorted(m for m in glob.glob(argument, recursive=True) if os.path.isfile(m))
            if not matches:
                yield ImageInput(argument, error="no files match this pattern")
            for m in matches:
                yield ImageInput(m, path=m)
        else:
            yield ImageInput(argument, error="no such file or directory")
