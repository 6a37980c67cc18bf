"""One image decoder and one base64-TSV reader for both families: a byte-order mark does not cost the
first image, and decompression bombs, truncated images and broken base64 are one-line errors that
name the file (or TSV file:line)."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from ofaconv.clip.data import ImageStore
from ofaconv.clip.towers import load_image
from ofaconv.core.errors import DataError, OfaconvError
from ofaconv.core.images import ImageDecodeError, ImageTsv, decode_base64, open_image
from ofaconv.ofa.caption import read_tsv
from ofaconv.ofa.finetune.data import DataIssues, read_muge

BOM = "\ufeff"


def _png(size=(8, 8), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds none: what a decompression bomb looks like to PIL."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


def _one_line(exc: pytest.ExceptionInfo, *names: str) -> str:
    text = str(exc.value)
    assert "\n" not in text and all(name in text for name in names), text
    return text


# -- byte-order mark -----------------------------------------------------------------------------


def _bom_tsv(tmp_path: Path) -> Path:
    tsv = tmp_path / "imgs.tsv"
    tsv.write_text(f"{BOM}1000\t{_b64(_png())}\n1001\t{_b64(_png(color=(0, 0, 255)))}\n", encoding="utf-8")
    return tsv


def test_bom_keeps_the_first_image_for_finetune_muge(tmp_path):
    tsv = _bom_tsv(tmp_path)
    captions = tmp_path / "caps.jsonl"
    captions.write_text("".join(json.dumps({"image_id": i, "text": ["红色"]}) + "\n" for i in ("1000", "1001")),
                        encoding="utf-8")
    issues = DataIssues()
    data = read_muge(captions, tsv, issues=issues)
    assert data.image_ids == ["1000", "1001"] and issues.counts == {}
    assert data.images.open("1000").getpixel((0, 0)) == (200, 30, 30)


def test_bom_keeps_the_first_image_for_caption_tsv(tmp_path):
    items = list(read_tsv(str(_bom_tsv(tmp_path))))
    assert [item.name for item in items] == ["1000", "1001"]
    assert items[0].error is None and open_image(items[0].data).size == (8, 8)


def test_bom_keeps_the_first_image_for_clip_stores(tmp_path):
    store = ImageStore(tsv=_bom_tsv(tmp_path))
    assert store.ids() == ["1000", "1001"] and store.load("1000").size == (8, 8)


# -- decompression bombs -------------------------------------------------------------------------


def test_decompression_bomb_is_a_one_line_error(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(100_000, 100_000))
    for load in (open_image, load_image):
        with pytest.raises(ImageDecodeError) as exc:
            load(bomb)
        assert "decompression bomb" in _one_line(exc, str(bomb), "MAX_IMAGE_PIXELS")
    tsv = tmp_path / "bomb.tsv"
    tsv.write_text(f"ok\t{_b64(_png())}\nbomb\t{_b64(bomb.read_bytes())}\n")
    with pytest.raises(ImageDecodeError) as exc:
        ImageStore(tsv=tsv).load("bomb")
    _one_line(exc, "bomb.tsv:2", "decompression bomb")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_the_pixel_limit_is_pils_and_exact(tmp_path, monkeypatch):
    image = tmp_path / "a.png"
    image.write_bytes(_png((20, 20)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # PIL itself only warns below twice the limit
    with pytest.raises(ImageDecodeError, match="above PIL.Image.MAX_IMAGE_PIXELS"):
        load_image(image)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)
    assert load_image(image).size == (20, 20)


# -- truncated images and broken base64 ------------------------------------------------------------


@pytest.mark.parametrize("encode", [_png, _jpeg])
def test_truncated_image_is_a_one_line_error_naming_the_row(tmp_path, encode):
    data = encode()
    tsv = tmp_path / "t.tsv"
    tsv.write_text(f"good\t{_b64(data)}\ncut\t{_b64(data[: len(data) // 2])}\n")
    store = ImageStore(tsv=tsv)
    assert store.load("good").mode == "RGB"
    with pytest.raises(ImageDecodeError) as exc:
        store.load("cut")
    _one_line(exc, "t.tsv:2", "cannot read image")
    cut = tmp_path / "cut.img"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError) as exc:
        load_image(cut)
    _one_line(exc, str(cut))
    assert isinstance(exc.value, OfaconvError)


def test_broken_base64_names_file_and_line(tmp_path):
    tsv = tmp_path / "b.tsv"
    tsv.write_text(f"good\t{_b64(_png())}\nbad\t%%%not base64\n")
    with pytest.raises(ImageDecodeError) as exc:
        ImageStore(tsv=tsv).read("bad")
    _one_line(exc, "b.tsv:2", "invalid base64")
    items = list(read_tsv(str(tsv)))
    assert items[1].name == "bad" and f"{tsv}:2: invalid base64" in items[1].error


def test_tsv_reader_rows_and_schema(tmp_path):
    tsv = tmp_path / "r.tsv"
    tsv.write_text(f"a\t{_b64(_png())}\textra\n\nno-tab\na\t{_b64(_png())}\n\t{_b64(_png())}\n", encoding="utf-8")
    skipped = []
    images = ImageTsv(tsv, lambda kind, where: skipped.append((kind, where)))
    assert images.ids() == ["a"] and images.open("a").size == (8, 8)
    assert skipped == [("malformed_line", "r.tsv:3"), ("duplicate_image", "r.tsv:4"), ("malformed_line", "r.tsv:5")]
    (tmp_path / "n.tsv").write_text("just text\n")
    with pytest.raises(DataError, match="found no tab"):
        ImageTsv(tmp_path / "n.tsv")
    with pytest.raises(DataError, match="not found"):
        ImageTsv(tmp_path / "missing.tsv")
    data = bytes(range(256)) * 3
    assert decode_base64(base64.urlsafe_b64encode(data)) == decode_base64(base64.b64encode(data).rstrip(b"=")) == data
