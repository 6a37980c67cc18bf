"""Catalog runs (``ofaconv caption``, ``ofaconv clip embed``; ``ofaconv.core.catalog``): every input
once, in input order, whatever the chunking; a run killed mid-way and rerun gives the uninterrupted
output; a rerun of another run is refused; one run per output; list files and BOM TSVs; the
embeddings equal the towers'; faiss search over them equals exact search."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ofaconv.cli import main
from ofaconv.core import catalog

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("catalog-photos")
    rng = np.random.default_rng(0)
    for i in range(9):
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(root / f"p{i}.jpg", quality=90)
    (root / "p5.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")  # one broken image inside a chunk
    return root


def _b64(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (20, 16), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _caption_argv(folder, photos, out, *extra):
    return ["caption", str(folder), str(photos), "--out", str(out), "--max-len", "3", "--beams", "2",
            "--chunk-size", "2", "--batch-size", "2", "--workers", "0", "--no-progress", *extra]


@pytest.fixture(scope="module")
def reference_captions(ofa_verified_folder, photos, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("catalog-ref") / "ref.jsonl"
    assert main(_caption_argv(ofa_verified_folder, photos, out, "--chunk-size", "1000")) == 2
    return _records(out)


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("OFACONV_DEBUG", None)
    return env


def test_chunks_do_not_change_the_output(ofa_verified_folder, photos, tmp_path, reference_captions):
    out = tmp_path / "c.jsonl"
    assert main(_caption_argv(ofa_verified_folder, photos, out)) == 2
    assert _records(out) == reference_captions
    assert [Path(r["image"]).name for r in reference_captions] == [f"p{i}.jpg" for i in range(9)]
    assert "error" in reference_captions[5] and all("caption" in r for i, r in enumerate(reference_captions) if i != 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]  # no run folder, no lock left


def test_killed_run_resumes_each_input_once(ofa_verified_folder, photos, tmp_path, reference_captions):
    """SIGKILL while the third chunk is half written; the rerun does the rest, the output equals the
    uninterrupted run."""
    out = tmp_path / "c.jsonl"
    argv = [sys.executable, "-m", "ofaconv", *_caption_argv(ofa_verified_folder, photos, out)]
    proc = subprocess.run(argv, env={**_env(), catalog.KILL_AFTER_ENV: "2"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr
    run = tmp_path / ".c.jsonl.ofaconv-run"
    assert not out.exists()
    names = sorted(p.name for p in run.iterdir())
    assert re.fullmatch(r"\.chunk-00000002\.jsonl\.ofaconv-\d+-[0-9a-f]+\.tmp", names[0]), names  # the half-written one
    assert names[1:] == ["chunk-00000000.json", "chunk-00000000.jsonl", "chunk-00000001.json",
                         "chunk-00000001.jsonl", "run.json"]
    assert main(_caption_argv(ofa_verified_folder, photos, out)) == 2  # one broken image: exit 2, output whole
    records = _records(out)
    assert records == reference_captions
    assert len({r["image"] for r in records}) == len(records) == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


class _Crash(BaseException):
    pass


def _crash_after(monkeypatch, sink_class, commits: int):
    real = sink_class.commit
    seen = []

    def commit(self, run, index, packed, kill=False):
        if len(seen) == commits:
            raise _Crash()
        seen.append(index)
        return real(self, run, index, packed)

    monkeypatch.setattr(sink_class, "commit", commit)


def test_rerun_with_other_inputs_model_or_settings_is_refused(ofa_verified_folder, photos, tmp_path, monkeypatch,
                                                              capsys, reference_captions):
    out = tmp_path / "c.jsonl"
    with monkeypatch.context() as m:
        _crash_after(m, catalog.RecordSink, 1)
        assert main(_caption_argv(ofa_verified_folder, photos, out)) == 1  # the CLI's "unexpected" line
    run = tmp_path / ".c.jsonl.ofaconv-run"
    before = sorted(p.name for p in run.iterdir())
    assert "chunk-00000000.json" in before and not out.exists()
    capsys.readouterr()
    for extra, said in ((["--beams", "3"], "other settings (num_beams: 2 then, 3 now)"),
                        ([str(photos / "p0.jpg")], "other inputs"),
                        (["--chunk-size", "3"], "chunk_size")):
        assert main(_caption_argv(ofa_verified_folder, photos, out, *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0] and "--restart" in err[0] and str(run) in err[0], err
        assert sorted(p.name for p in run.iterdir()) == before and not out.exists()
    # --restart discards the unfinished run and starts over
    assert main(_caption_argv(ofa_verified_folder, photos, out, "--restart")) == 2
    assert _records(out) == reference_captions and not run.exists()


def test_one_run_per_output_and_never_a_foreign_run_folder(ofa_verified_folder, photos, tmp_path, capsys):
    from ofaconv.core.writer import _lock, _unlock

    out = tmp_path / "c.jsonl"
    fd = _lock(out)
    try:
        assert main(_caption_argv(ofa_verified_folder, photos, out)) == 2
    finally:
        _unlock(out, fd)
    assert "another ofaconv run is writing this output" in capsys.readouterr().err
    run = tmp_path / ".c.jsonl.ofaconv-run"
    run.mkdir()
    (run / "mine.txt").write_text("not ofaconv's")
    for extra in ([], ["--restart"]):
        assert main(_caption_argv(ofa_verified_folder, photos, out, *extra)) == 2
        assert "not an unfinished ofaconv run" in capsys.readouterr().err
        assert (run / "mine.txt").read_text() == "not ofaconv's" and not out.exists()


def test_list_files_and_bom_tsvs(ofa_verified_folder, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xef\xbb\xbf" + f"{photos / 'p1.jpg'}\n\n{photos / 'p0.jpg'}\nmissing.jpg\n".encode())
    tsv = tmp_path / "imgs.tsv"
    tsv.write_bytes(b"\xef\xbb\xbf" + f"red\t{_b64('red')}\nblue\t{_b64('blue')}\nno tab here\n".encode())
    out = tmp_path / "c.jsonl"
    argv = ["caption", str(ofa_verified_folder), str(photos / "p2.jpg"), "--list", str(listing), "--tsv", str(tsv),
            "--out", str(out), "--max-len", "2", "--no-progress", "--workers", "1", "--chunk-size", "3"]
    assert main(argv) == 2
    records = _records(out)
    assert [r["image"] for r in records] == [str(photos / "p2.jpg"), str(photos / "p1.jpg"), str(photos / "p0.jpg"),
                                             "missing.jpg", "red", "blue", f"{tsv}:3"]
    assert records[3]["error"] == f"{listing}:4: no such file or directory"
    assert "malformed TSV line" in records[6]["error"]
    assert all("caption" in r for r in records[:3] + records[4:6])


def test_python_api_returns_the_records(ofa_verified_folder, photos, tmp_path, reference_captions):
    import ofaconv

    kwargs = dict(max_len=3, beams=2, chunk_size=2, batch_size=2, workers=0)
    in_memory = ofaconv.caption(ofa_verified_folder, [str(photos)], **kwargs)
    assert list(in_memory) == reference_captions and in_memory.failed == 1
    written = ofaconv.caption(ofa_verified_folder, [str(photos)], out=tmp_path / "c.jsonl", **kwargs)
    assert list(written) == reference_captions and _records(tmp_path / "c.jsonl") == reference_captions
    assert written.first_failure[0].endswith("p5.jpg")


# -- embeddings -----------------------------------------------------------------------------------


def _shards(folder: Path) -> tuple[list[str], np.ndarray]:
    manifest = catalog.read_embeddings_manifest(folder)
    ids = [json.loads(line) for line in (folder / "ids.jsonl").read_text(encoding="utf-8").splitlines()]
    return ids, np.concatenate([m for _, m in catalog.iter_embedding_shards(folder, manifest)])


def _embed_argv(package, photos, out, *extra):
    return ["clip", "embed", str(package), str(photos), "--out", str(out), "--chunk-size", "4", "--batch-size", "3",
            "--workers", "0", "--no-progress", *extra]


def test_embeddings_equal_the_towers_and_resume_after_a_crash(bertclip_verified_folder, photos, tmp_path,
                                                              monkeypatch):
    from ofaconv.clip import ClipTowers

    out = tmp_path / "emb"
    with monkeypatch.context() as m:
        _crash_after(m, catalog.ArraySink, 1)
        assert main(_embed_argv(bertclip_verified_folder, photos, out, "--format", "safetensors")) == 1
    assert not out.exists() and (tmp_path / ".emb.ofaconv-run" / "chunk-00000000.safetensors").exists()
    assert main(_embed_argv(bertclip_verified_folder, photos, out, "--format", "safetensors")) == 2
    ids, vectors = _shards(out)
    good = [photos / f"p{i}.jpg" for i in range(9) if i != 5]
    assert ids == [str(p) for p in good]
    towers = ClipTowers.from_pretrained(bertclip_verified_folder)
    assert np.abs(vectors - towers.encode_images(good).numpy()).max() < 1e-5
    manifest = catalog.read_embeddings_manifest(out)
    assert manifest["count"] == 8 and manifest["failed"] == 1 and manifest["inputs"] == 9
    assert manifest["fingerprint"] == towers.image_fingerprint(include_projection=True)
    assert [json.loads(x)["image"] for x in (out / "failed.jsonl").read_text().splitlines()] == [str(photos / "p5.jpg")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb"]
    # npy shards hold the same numbers, and the Python API is the command
    import ofaconv

    result = ofaconv.clip.embed(bertclip_verified_folder, [str(photos)], out=tmp_path / "npy", chunk_size=4,
                                batch_size=3, workers=0)
    assert result["count"] == 8 and result["first_failure"][0] == str(photos / "p5.jpg")
    assert np.array_equal(_shards(tmp_path / "npy")[1], vectors)


def test_embed_never_replaces_what_it_did_not_write(bertclip_verified_folder, photos, tmp_path, capsys):
    out = tmp_path / "emb"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(_embed_argv(bertclip_verified_folder, photos, out)) == 2
    assert "not an earlier `ofaconv clip embed` output" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# -- faiss search over embeddings -----------------------------------------------------------------


@pytest.fixture(scope="module")
def embeddings(bertclip_verified_folder, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("catalog-emb")
    rng = np.random.default_rng(1)
    photos = root / "photos"
    photos.mkdir()
    for i in range(60):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(photos / f"{i:02d}.png")
    assert main(["clip", "embed", str(bertclip_verified_folder), str(photos), "--out", str(root / "emb"),
                 "--chunk-size", "16", "--workers", "0", "--no-progress"]) == 0
    return root / "emb"


QUERIES = ["红色的花", "一只猫", "蓝色的天空", "shoes"]


def test_faiss_flat_top10_equals_exact_search(bertclip_verified_folder, embeddings, tmp_path, capsys):
    pytest.importorskip("faiss")
    from ofaconv.clip import ClipTowers
    from ofaconv.clip.search import build_index_from_embeddings, exact_top_k, query_index

    towers = ClipTowers.from_pretrained(bertclip_verified_folder)
    built = build_index_from_embeddings(embeddings, tmp_path / "idx",
                                        fingerprint=towers.image_fingerprint(include_projection=True))
    assert built["kind"] == "flat" and built["images"] == 60 and built["recall_at_10"] == 1.0
    answers = query_index(towers, tmp_path / "idx", QUERIES, k=10)
    ids, vectors = _shards(embeddings)
    texts = towers.encode_texts(QUERIES).numpy()
    order = np.argsort(-(texts @ vectors.T), axis=1, kind="stable")[:, :10]
    for answer, rows in zip(answers, order):
        assert [r["image"] for r in answer["results"]] == [ids[j] for j in rows]
    _, streamed = exact_top_k(embeddings, texts, 10)
    assert np.array_equal(streamed, order)
    # the command line: the same index folder, queried like one built from images
    capsys.readouterr()
    assert main(["clip", "search", str(bertclip_verified_folder), "--index", str(tmp_path / "idx"),
                 "--query", QUERIES[0]]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in printed["queries"][0]["results"]] == [ids[j] for j in order[0]]


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_report_recall(bertclip_verified_folder, embeddings, tmp_path, kind, capsys):
    pytest.importorskip("faiss")
    argv = ["clip", "search", str(bertclip_verified_folder), "--index", str(tmp_path / "idx"), "--embeddings",
            str(embeddings), "--flat-below", "10", "--nlist", "4", "--query", "一只猫", "-k", "5"]
    if kind == "hnsw":
        argv += ["--index-type", "hnsw"]
    capsys.readouterr()
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["index"]["kind"] == kind and 0.0 < printed["index"]["recall_at_10"] <= 1.0
    assert printed["index"]["recall_queries"] == 60 and len(printed["queries"][0]["results"]) == 5
    if kind == "ivf":
        assert printed["index"]["params"] == {"nlist": 4, "nprobe": 4}
        assert printed["index"]["recall_at_10"] == 1.0  # every list probed: exact


def test_without_faiss_one_line_names_the_extra(bertclip_verified_folder, embeddings, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    assert main(["clip", "search", str(bertclip_verified_folder), "--index", str(tmp_path / "idx"), "--embeddings",
                 str(embeddings)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ofaconv[faiss]" in err[0] and not (tmp_path / "idx").exists()
