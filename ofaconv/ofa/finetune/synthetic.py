"""Synthetic caption data: coloured shapes drawn with Pillow, captioned in Chinese ("红色的圆形").

Written in the MUGE format (captions jsonl + base64 image TSV) so that smoke runs, tests and the
benchmark go through the same reader as real data. The caption is a function of the image, so a
model that learns reaches exact-match captions on held-out images.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
from pathlib import Path

__all__ = ["COLORS", "SHAPES", "draw_shape", "write_shapes_split", "write_muge_split"]

COLORS = {
    "红色": (220, 40, 40),
    "绿色": (40, 170, 70),
    "蓝色": (40, 80, 220),
    "黄色": (235, 200, 30),
}
# Shapes whose outlines differ at a coarse patch grid (a circle and a square of the same size
# differ only in their corners, which a frozen random trunk barely sees).
SHAPES = ("圆形", "长方形", "三角形")
# Extra phrasings for runs that want several captions per image.
TEMPLATES = ("{color}的{shape}", "一个{color}的{shape}", "图中有一个{color}的{shape}", "{shape}是{color}的")


def draw_shape(color: str, shape: str, size: int = 64, rng: random.Random | None = None):
    """A ``size``-pixel RGB image of one filled shape, jittered in place, scale and shade, on a noisy ground."""
    from PIL import Image, ImageDraw

    rng = rng or random.Random(0)
    shade = rng.randint(225, 255)
    image = Image.new("RGB", (size, size), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    for _ in range(size // 8):  # a little clutter so the background is not constant
        x, y = rng.randrange(size), rng.randrange(size)
        grey = rng.randint(170, 240)
        draw.point((x, y), fill=(grey, grey, grey))
    # Large and near the centre: the shape, not its place, is what a caption names.
    extent = rng.uniform(0.6, 0.8) * size
    cx = size / 2 + rng.uniform(-0.08, 0.08) * size
    cy = size / 2 + rng.uniform(-0.08, 0.08) * size
    half = extent / 2
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLORS[color])
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "圆形":
        draw.ellipse(box, fill=fill)
    elif shape == "长方形":  # a wide, flat rectangle
        draw.rectangle((cx - half, cy - half * 0.4, cx + half, cy + half * 0.4), fill=fill)
    elif shape == "三角形":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def _encode(image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.urlsafe_b64encode(buf.getvalue()).decode("ascii")


def write_muge_split(folder: str | os.PathLike, name: str, records, *, fmt: str = "PNG") -> tuple[Path, Path]:
    """Write ``records`` = [(image_id, PIL image, [captions])] as ``name.jsonl`` + ``name.tsv``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    jsonl, tsv = folder / f"{name}.jsonl", folder / f"{name}.tsv"
    with open(jsonl, "w", encoding="utf-8") as fj, open(tsv, "w", encoding="ascii") as ft:
        for image_id, image, captions in records:
            fj.write(json.dumps({"image_id": image_id, "text": list(captions)}, ensure_ascii=False) + "\n")
            ft.write(f"{image_id}\t{_encode(image, fmt)}\n")
    return jsonl, tsv


def write_shapes_split(
    folder: str | os.PathLike,
    name: str,
    num_images: int,
    *,
    image_size: int = 64,
    captions_per_image: int = 1,
    seed: int = 0,
    id_prefix: str | None = None,
) -> tuple[Path, Path]:
    """A MUGE split of ``num_images`` shapes; every (colour, shape) combination in turn."""
    rng = random.Random(seed)
    combos = [(c, s) for c in COLORS for s in SHAPES]
    records = []
    prefix = id_prefix if id_prefix is not None else f"{name}-"
    for i in range(num_images):
        color, shape = combos[(i + seed) % len(combos)]
        templates = TEMPLATES[: max(1, captions_per_image)]
        captions = [templates[k % len(templates)].format(color=color, shape=shape) for k in range(captions_per_image)]
        records.append((f"{prefix}{i}", draw_shape(color, shape, image_size, rng), captions))
    return write_muge_split(folder, name, records)
