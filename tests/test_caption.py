"""``ofaconv caption``: files, directories, globs and base64 TSVs in, one JSONL record per input out;
corrupt inputs give error records, the run goes on, and the exit code tells whether any failed."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ofaconv.core.images import decode_base64
from ofaconv.core.images import expand_images
from ofaconv.ofa.caption import caption_items, load_captioner, read_tsv
from ofaconv.cli import main
from ofaconv.ofa.modeling.tokenization_ofa import CJK_CHARACTERS
from ofaconv.ofa.tokenization import decode_caption


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(micro_converted):
    return lambda variant: micro_converted(variant)[0]


def _png_bytes(seed: int, size=(24, 32), mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (*size, 3) if mode == "RGB" else (*size, 4) if mode == "RGBA" else size
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(d / "a.jpg", quality=90)
    (d / "b.png").write_bytes(_png_bytes(1))
    (d / "c_gray.png").write_bytes(_png_bytes(2, mode="L"))
    (d / "d_alpha.png").write_bytes(_png_bytes(3, mode="RGBA"))
    (d / "e_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"definitely not a jpeg" * 3)
    (d / "notes.txt").write_text("not an image, ignored in a directory")
    return d


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_directory_glob_missing_and_corrupt(folders, image_dir, tmp_path, capsys):
    folder = folders("ofa-tiny")
    out = tmp_path / "captions.jsonl"
    rc = main(["caption", str(folder), str(image_dir), str(image_dir / "b*.png"), str(tmp_path / "missing.jpg"),
               str(tmp_path / "nomatch*.png"), "--out", str(out), "--batch-size", "2", "--max-len", "4"])
    assert rc == 2
    records = _records(out)
    names = [Path(r["image"]).name for r in records]
    assert names == ["a.jpg", "b.png", "c_gray.png", "d_alpha.png", "e_corrupt.jpg", "b.png", "missing.jpg",
                     "nomatch*.png"]
    by_name = dict(zip(names, records))
    for name in ("a.jpg", "b.png", "c_gray.png", "d_alpha.png"):
        assert set(by_name[name]) == {"image", "caption", "score"}
        assert isinstance(by_name[name]["caption"], str) and by_name[name]["score"] < 0
    assert "cannot read image" in by_name["e_corrupt.jpg"]["error"]
    assert records[6]["error"] == "no such file or directory"
    assert records[7]["error"] == "no files match this pattern"
    assert records[1]["caption"] == records[5]["caption"]  # same file, batched differently
    assert abs(records[1]["score"] - records[5]["score"]) < 1e-4
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ofaconv: error: 3 of 8 images failed (first: ") and "e_corrupt.jpg" in err


def test_all_good_exits_zero_and_matches_generate(folders, image_dir, tmp_path):
    folder = folders("ofa-tiny")
    files = [str(image_dir / n) for n in ("a.jpg", "b.png", "d_alpha.png")]
    out1, out3 = tmp_path / "one.jsonl", tmp_path / "three.jsonl"
    args = ["--beams", "2", "--max-len", "3", "--no-progress"]
    assert main(["caption", str(folder), *files, "--out", str(out1), "--batch-size", "1", *args]) == 0
    assert main(["caption", str(folder), *files, "--out", str(out3), "--batch-size", "3", *args]) == 0
    one, three = _records(out1), _records(out3)
    # Same captions; scores agree to float noise (batched matmuls round differently).
    assert [{k: v for k, v in r.items() if k != "score"} for r in one] == \
        [{k: v for k, v in r.items() if k != "score"} for r in three]
    assert all(abs(a["score"] - b["score"]) < 1e-4 for a, b in zip(one, three))

    model, processor = load_captioner(folder)
    inputs = processor(images=files, return_tensors="pt")
    out = model.generate(**inputs, num_beams=2, max_len_b=3, return_dict_in_generate=True)
    expected = [decode_caption(processor.tokenizer, row, "en") for row in out.sequences]
    assert [r["caption"] for r in _records(out1)] == expected
    assert [r["score"] for r in _records(out1)] == pytest.approx(out.sequences_scores.tolist(), abs=1e-5)


def test_tsv_urlsafe_standard_and_bad_lines(folders, tmp_path):
    folder = folders("ofa-tiny")
    png = _png_bytes(5)
    tsv = tmp_path / "images.tsv"
    tsv.write_text(
        "\n".join([
            "img-url\t" + base64.urlsafe_b64encode(png).decode(),
            "img-std\t" + base64.b64encode(png).decode(),
            "img-corrupt\t" + base64.b64encode(b"garbage bytes").decode(),
            "img-b64\t%%%not base64",
            "just-an-id",
        ]) + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "tsv.jsonl"
    assert main(["caption", str(folder), "--tsv", str(tsv), "--out", str(out), "--max-len", "3", "--no-progress"]) == 2
    records = _records(out)
    assert [r["image"] for r in records] == ["img-url", "img-std", "img-corrupt", "img-b64", f"{tsv}:5"]
    assert records[0]["caption"] == records[1]["caption"] and records[0]["score"] == records[1]["score"]
    assert "cannot read image" in records[2]["error"]
    assert "invalid base64" in records[3]["error"] and "malformed TSV line" in records[4]["error"]


def test_decode_base64_both_alphabets():
    data = bytes(range(256)) * 3
    assert decode_base64(base64.urlsafe_b64encode(data).decode()) == data
    assert decode_base64(base64.b64encode(data).decode()) == data
    assert decode_base64(base64.b64encode(data).decode().rstrip("=")) == data


def test_text_only_and_prompt(folders, image_dir, tmp_path):
    folder = folders("ofa-tiny")
    image = str(image_dir / "b.png")
    free, text_only, prompted = (tmp_path / n for n in ("free.jsonl", "text.jsonl", "prompt.jsonl"))
    main(["caption", str(folder), image, "--out", str(free), "--max-len", "6", "--no-progress"])
    main(["caption", str(folder), image, "--out", str(text_only), "--max-len", "6", "--text-only", "--no-progress"])
    assert "<code_" not in _records(text_only)[0]["caption"] and "<bin_" not in _records(text_only)[0]["caption"]

    prompt = " what is in the picture?"
    main(["caption", str(folder), image, "--out", str(prompted), "--max-len", "6", "--prompt", prompt,
          "--no-progress"])
    model, processor = load_captioner(folder)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    ids = model.generate(**inputs, max_len_b=6)
    assert _records(prompted)[0]["caption"] == decode_caption(processor.tokenizer, ids[0], "en")


def test_chinese_captions_have_no_spaces_next_to_cjk(folders, image_dir, tmp_path):
    folder = folders("ofa-cn-base")
    out = tmp_path / "cn.jsonl"
    assert main(["caption", str(folder), str(image_dir / "a.jpg"), str(image_dir / "b.png"), "--out", str(out),
                 "--max-len", "8", "--beams", "3", "--text-only", "--no-progress"]) == 0
    cjk_space = re.compile(f"(?<=[{CJK_CHARACTERS}]) | (?=[{CJK_CHARACTERS}])")
    for record in _records(out):
        assert record["caption"] and not cjk_space.search(record["caption"])
    _, processor = load_captioner(folder)
    assert processor.prompt == "图片描述了什么内容?"


def test_bf16_runs(folders, image_dir, tmp_path):
    out = tmp_path / "bf16.jsonl"
    assert main(["caption", str(folders("ofa-tiny")), str(image_dir / "a.jpg"), "--out", str(out), "--dtype", "bf16",
                 "--max-len", "3", "--no-progress"]) == 0
    assert "caption" in _records(out)[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "no images given"),
        (["--tsv", "missing.tsv"], "no such TSV file"),
        (["IMG", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["IMG", "--beams", "0"], "--beams must be at least 1"),
    ],
)
def test_bad_arguments_one_line_error_no_output(folders, image_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out.jsonl"
    extra = [str(image_dir / "a.jpg") if e == "IMG" else str(tmp_path / e) if e.endswith(".tsv") else e for e in extra]
    rc = main(["caption", str(folders("ofa-tiny")), *extra, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and message in err[-1] and err[-1].startswith("ofaconv: error:")
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl.*"))


def test_not_a_model_folder(tmp_path, image_dir, capsys):
    rc = main(["caption", str(tmp_path), str(image_dir / "a.jpg"), "--out", str(tmp_path / "o.jsonl")])
    assert rc == 2 and "not a model folder" in capsys.readouterr().err


def test_expand_and_read_helpers(image_dir, tmp_path):
    items = list(expand_images([str(image_dir)]))
    assert [Path(i.name).name for i in items] == ["a.jpg", "b.png", "c_gray.png", "d_alpha.png", "e_corrupt.jpg"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert next(expand_images([str(empty)])).error == "directory holds no image files"
    tsv = tmp_path / "t.tsv"
    tsv.write_text("x\t" + base64.b64encode(b"abc").decode() + "\textra column\n\n", encoding="utf-8")
    (item,) = list(read_tsv(str(tsv)))
    assert item.name == "x" and item.data == b"abc"


def test_caption_items_keeps_order_with_errors_inside_batches(folders, image_dir):
    model, processor = load_captioner(folders("ofa-tiny"))
    items = list(expand_images([str(image_dir / "e_corrupt.jpg"), str(image_dir / "a.jpg"), "missing.png",
                                str(image_dir / "b.png")]))
    records = list(caption_items(model, processor, items, batch_size=1, max_len_b=3))
    assert ["error" in r for r in records] == [True, False, True, False]


def test_out_replaces_an_earlier_caption_output_only(folders, image_dir, tmp_path, capsys):
    out = tmp_path / "c.jsonl"
    args = ["caption", str(folders("ofa-tiny")), str(image_dir / "a.jpg"), "--out", str(out), "--max-len", "2",
            "--no-progress"]
    assert main(args) == 0
    first = out.read_bytes()
    assert main(args) == 0 and out.read_bytes() == first  # the earlier output is replaced (same captions)
    out.write_text("my notes\n")
    assert main(args) == 2 and out.read_text() == "my notes\n"
    assert "not an earlier `ofaconv caption` output" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "images"]
