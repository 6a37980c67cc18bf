"""``ofaconv predict`` against ModelScope's own OFA task pipelines.

fixtures/modelscope_tasks.json holds what modelscope 1.40.2 (OfaPreprocessor + OfaForAllTasks)
produced on tiny random-weight ModelScope folders (tests/modelscope_tasks.py). Here the same folders
are written again (same weights: their sha256 is checked), upgraded with ``ofaconv upgrade`` and run
with no task flags; prompt tokens, pixels, generated tokens, scores and post-processed outputs must
equal ModelScope's. Random weights give similar outputs for every input, so the test also checks
that the recorded outputs differ between images (and, for matching, between texts).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

import modelscope_tasks as cases
from ofaconv.cli import main
from ofaconv.core.images import open_image

FIXTURE = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "modelscope_tasks.json").read_text("utf-8"))
FAST = ("grounding_en", "ocr_cn")  # the default tier; the other cases run in the slow tier


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return cases.write_images(tmp_path_factory.mktemp("task-images"))


@pytest.fixture(scope="module")
def upgraded(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            root = tmp_path_factory.mktemp(f"ms-{name}")
            folder = cases.write_modelscope_folder(root / "ms", name)
            assert cases.weights_sha256(folder) == FIXTURE["cases"][name]["weights_sha256"], \
                "the tiny ModelScope weights changed: regenerate fixtures/modelscope_tasks.json"
            assert main(["upgrade", str(folder), str(root / "up")]) == 0
            (folder / "pytorch_model.bin").unlink()
            made[name] = root / "up"
        return made[name]

    return get


def _runner(folder):
    from ofaconv.ofa.predict import load_runner

    runner, note = load_runner(folder)
    assert note is None
    return runner


def _pixels_sha(pixels) -> str:
    return hashlib.sha256(pixels.numpy().astype(np.float32).tobytes()).hexdigest()


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in cases.CASES])
def test_predict_equals_modelscope(name, upgraded, images):
    recorded = FIXTURE["cases"][name]
    runner = _runner(upgraded(name))
    first, last = runner.layout.bin_ids.start, runner.layout.bin_ids.stop
    for record in recorded["records"]:
        where = f"{name} {record['image']} {record['text']!r}"
        image = open_image(images[record["image"]], record["image"])
        item = runner.prepare(image, record["text"])
        assert item.input_ids == record["input_ids"], where
        assert list(item.pixels.shape) == record["patch_image"]["shape"], where
        assert _pixels_sha(item.pixels) == record["patch_image"]["sha256"], where
        out = runner.run(item)
        output = record["output"]
        if "answer_logprobs" in record:  # ModelScope's traverse scoring (matching)
            assert out["logprobs"] == pytest.approx(record["answer_logprobs"][0], abs=1e-5), where
            assert out["label"] == output["labels"], where
            assert out["scores"][out["label"]] == pytest.approx(output["scores"], abs=1e-5), where
            assert sum(out["scores"].values()) == pytest.approx(1.0, abs=1e-6)
            continue
        theirs = record["tokens"][0]
        if "box" in out:
            x0, y0, x1, y1 = out["box"]
            assert 0 <= x0 <= image.width and 0 <= x1 <= image.width, where
            assert 0 <= y0 <= image.height and 0 <= y1 <= image.height, where
            assert all(first <= t < last for t in out["tokens"][:4]) and out["tokens"][4:] == [2], where
            if not all(first <= t < last for t in theirs[:4]):
                # ModelScope let <s>/<unk> through its constraint range: its box is off the image
                # (a negative bin); ofaconv chooses among location tokens only
                assert min(output["boxes"][0]) < 0, where
                continue
            expected = [min(max(v, 0.0), float(limit))
                        for v, limit in zip(output["boxes"][0], [image.width, image.height] * 2)]
            assert out["box"] == expected, where
        assert out["tokens"] == theirs, where
        assert out["score"] == pytest.approx(record["score"][0], abs=1e-5), where
        for ours, key in (("caption", "caption"), ("answer", "text"), ("text", "text")):
            if ours in out:
                assert out[ours] == output[key][0], where


def test_recorded_outputs_depend_on_the_input():
    for name in ("caption_en", "vqa_en", "ocr_cn"):
        tokens = {json.dumps(r["tokens"]) for r in FIXTURE["cases"][name]["records"]}
        assert len(tokens) > 1, name
    for name in ("grounding_en", "vqa_answers_en"):  # same tokens, but scores (and boxes) follow the input
        scores = {r["score"][0] for r in FIXTURE["cases"][name]["records"]}
        assert len(scores) == len(FIXTURE["cases"][name]["records"]), name
    scores = {tuple(r["answer_logprobs"][0]) for r in FIXTURE["cases"]["matching_en"]["records"]}
    assert len(scores) == len(FIXTURE["cases"]["matching_en"]["records"])


def test_predict_command_writes_records(upgraded, images, tmp_path, capsys):
    folder = upgraded("grounding_en")
    out = tmp_path / "boxes.jsonl"
    texts = tmp_path / "texts.txt"
    texts.write_text("the red car\na dog\nthe man\n", encoding="utf-8")
    paths = [str(images[n]) for n in ("square", "tall", "wide")]
    assert main(["predict", str(folder), *paths, "--texts", str(texts), "--out", str(out), "--no-progress"]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["query"] for r in records] == ["the red car", "a dog", "the man"]
    for record, path in zip(records, paths):
        assert record["task"] == "grounding" and record["image"] == path
        width, height = open_image(path).size
        x0, y0, x1, y1 = record["box"]
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
    # an earlier predict output may be replaced; another task on the same folder runs with a note
    assert main(["predict", str(folder), paths[0], "--task", "matching", "--text", "a car", "--out", str(out),
                 "--no-progress"]) == 0
    assert "finetuned for 'grounding'" in capsys.readouterr().err
    (record,) = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert set(record["scores"]) == {"yes", "no", "maybe"} and record["label"] in record["scores"]
    assert math.isclose(sum(record["scores"].values()), 1.0, abs_tol=1e-5)


def test_predict_api(upgraded, images):
    import ofaconv

    records = ofaconv.predict(upgraded("ocr_cn"), [str(images["wide"])])
    assert records[0]["task"] == "ocr"
    recorded = next(r for r in FIXTURE["cases"]["ocr_cn"]["records"] if r["image"] == "wide")
    assert records[0]["text"] == recorded["output"]["text"][0]


def test_task_text_rules_and_box_formula():
    from ofaconv.ofa.tasks import bins_to_box, clean_text, task_names

    assert task_names() == ["caption", "vqa", "grounding", "matching", "ocr"]
    assert clean_text("  What color is the car", "question") == "what color is the car?"
    assert clean_text(",A blue turtle-like / pokemon", "caption") == "a blue turtle like pokemon"
    # OFA refcoco: bin / (num_bins - 1) * max_image_size / (S / side), clipped to the image
    box = bins_to_box([100, 0, 999, 500], first_bin=0, num_bins=1000, max_image_size=512, image_size=512,
                      width=1024, height=256)
    assert box == pytest.approx([1024 * 100 / 999, 0.0, 1024.0, 256 * 500 / 999])
    assert bins_to_box([999] * 4, first_bin=0, num_bins=1000, max_image_size=640, image_size=512,
                       width=100, height=50) == [100.0, 50.0, 100.0, 50.0]


def test_a_batch_computes_what_one_item_at_a_time_computes(upgraded, images):
    """Prompts of different lengths in one batch: grouped by length, never padded."""
    runner = _runner(upgraded("grounding_en"))
    texts = ["a dog", "the man on the left", "a blue turtle-like pokemon with round head", "the cat"]
    items = [runner.prepare(open_image(images[name]), text)
             for name, text in zip(("square", "wide", "tall", "wide"), texts)]
    assert len({len(item.input_ids) for item in items}) == 3
    for one, batched in zip([runner.run(item) for item in items], runner.run_batch(items)):
        assert batched["tokens"] == one["tokens"] and batched["box"] == one["box"]
        assert batched["score"] == pytest.approx(one["score"], abs=1e-5)


# -- catalog runs: texts stay paired with their images through chunks, a kill and a rerun ------------


def _tsv_row(name: str, path: Path) -> str:
    import base64

    return f"{name}\t{base64.b64encode(path.read_bytes()).decode()}\n"


@pytest.fixture()
def catalog_inputs(images, tmp_path):
    """7 inputs: 2 files, a list of 3 (one broken), a TSV of 2 rows; and one text per input."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{images['tall']}\n{broken}\n{images['square']}\n", encoding="utf-8")
    tsv = tmp_path / "rows.tsv"
    tsv.write_text(_tsv_row("row-wide", images["wide"]) + _tsv_row("row-tall", images["tall"]), encoding="utf-8")
    texts = ["the red car", "a dog", "the man on the left", "a broken image", "two birds", "a blue sky", "the cat"]
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("\n".join(texts) + "\n", encoding="utf-8")
    argv = [str(images["square"]), str(images["wide"]), "--list", str(listing), "--tsv", str(tsv),
            "--texts", str(texts_file), "--chunk-size", "2", "--batch-size", "2", "--workers", "0", "--no-progress"]
    names = [str(images["square"]), str(images["wide"]), str(images["tall"]), str(broken), str(images["square"]),
             "row-wide", "row-tall"]
    return argv, names, texts, texts_file


def test_killed_predict_run_resumes_with_texts_paired(upgraded, catalog_inputs, tmp_path, capsys):
    """SIGKILL while the third of four chunks is half written; the rerun does the rest: the output
    equals the uninterrupted run's, every record carries its own image's text."""
    import os
    import subprocess
    import sys

    from ofaconv.core import catalog

    folder = upgraded("grounding_en")
    argv, names, texts, texts_file = catalog_inputs
    reference, out = tmp_path / "ref.jsonl", tmp_path / "boxes.jsonl"
    assert main(["predict", str(folder), *argv, "--out", str(reference)]) == 2  # the broken image
    records = [json.loads(line) for line in reference.read_text(encoding="utf-8").splitlines()]
    assert [r["image"] for r in records] == names and [r["query"] for r in records] == texts
    assert "error" in records[3] and all("box" in r for i, r in enumerate(records) if i != 3)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", catalog.KILL_AFTER_ENV: "2",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("OFACONV_DEBUG", None)
    killed = subprocess.run([sys.executable, "-m", "ofaconv", "predict", str(folder), *argv, "--out", str(out)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    run = tmp_path / ".boxes.jsonl.ofaconv-run"
    left = sorted(p.name for p in run.iterdir())
    assert not out.exists() and left[1:] == ["chunk-00000000.json", "chunk-00000000.jsonl", "chunk-00000001.json",
                                             "chunk-00000001.jsonl", "run.json"]
    assert left[0].startswith(".chunk-00000002.jsonl.") and left[0].endswith(".tmp")  # the chunk it was writing
    # other texts are other inputs: refused, the run folder untouched
    before = sorted(p.name for p in run.iterdir())
    other = tmp_path / "other.txt"
    other.write_text("\n".join(reversed(texts)) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["predict", str(folder), *[str(other) if a == str(texts_file) else a for a in argv],
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other inputs" in err[0] and "--restart" in err[0], err
    assert sorted(p.name for p in run.iterdir()) == before
    # the same command resumes
    assert main(["predict", str(folder), *argv, "--out", str(out)]) == 2
    assert out.read_bytes() == reference.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_predict_api_runs_the_catalog(upgraded, images, tmp_path):
    import ofaconv

    folder = upgraded("grounding_en")
    paths = [str(images[n]) for n in ("square", "wide", "tall")]
    in_memory = ofaconv.predict(folder, paths, texts=["a dog", "the man", "a car"], batch_size=3, workers=0)
    assert [r["query"] for r in in_memory] == ["a dog", "the man", "a car"] and in_memory.failed == 0
    written = ofaconv.predict(folder, paths, text="a dog", out=tmp_path / "o.jsonl", chunk_size=2, workers=0)
    assert list(written) == [json.loads(line) for line in (tmp_path / "o.jsonl").read_text("utf-8").splitlines()]
    assert written[0] == in_memory[0]


@pytest.mark.parametrize("content, said", [("a dog\n\nthe man\n", ":2: empty text"),
                                           ("a dog\nthe man\n", "holds 2 texts for 3 images"),
                                           (None, "no such texts file")])
def test_texts_that_cannot_pair_are_refused_before_anything_is_written(upgraded, images, tmp_path, capsys, content,
                                                                       said):
    texts = tmp_path / "texts.txt"
    if content is not None:
        texts.write_text(content, encoding="utf-8")
    paths = [str(images[n]) for n in ("square", "wide", "tall")]
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert main(["predict", str(upgraded("grounding_en")), *paths, "--texts", str(texts), "--out",
                 str(tmp_path / "o.jsonl"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ofaconv: error: {texts}") and said in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
