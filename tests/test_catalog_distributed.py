"""Two CPU processes (torchrun, gloo) caption, embed and predict exactly what one process does, in
input order: the chunks are dealt to the ranks and rank 0 writes them back in order (predict's
``--texts`` stay paired with their images)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ofaconv.cli import main
from ofaconv.core import catalog

pytestmark = pytest.mark.slow  # two torchrun processes: the slow tier, which .ci/run runs

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "ofaconv", *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist-photos")
    rng = np.random.default_rng(0)
    for i in range(11):  # 6 chunks of 2: rank 0 gets 3, rank 1 gets 3 (the last one short)
        Image.fromarray(rng.integers(0, 256, (18, 22, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    (root / "04.png").write_bytes(b"not a png")
    return root


def test_two_processes_caption_like_one(ofa_verified_folder, photos, tmp_path):
    common = ["--max-len", "3", "--beams", "2", "--chunk-size", "2", "--batch-size", "2", "--workers", "1",
              "--no-progress"]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert main(["caption", str(ofa_verified_folder), str(photos), "--out", str(one), *common]) == 2
    proc = _torchrun(["caption", str(ofa_verified_folder), str(photos), "--out", str(two), *common])
    assert proc.returncode != 0 and proc.stderr.count("ofaconv: error: 1 of 11 images failed") == 1, proc.stderr
    assert two.read_bytes() == one.read_bytes()
    names = [Path(json.loads(line)["image"]).name for line in one.read_text().splitlines()]
    assert names == [f"{i:02d}.png" for i in range(11)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl", "two.jsonl"]


def test_two_processes_embed_like_one(bertclip_verified_folder, photos, tmp_path):
    common = ["--chunk-size", "2", "--batch-size", "2", "--workers", "1", "--no-progress"]
    assert main(["clip", "embed", str(bertclip_verified_folder), str(photos), "--out", str(tmp_path / "one"),
                 *common]) == 2
    proc = _torchrun(["clip", "embed", str(bertclip_verified_folder), str(photos), "--out", str(tmp_path / "two"),
                      *common])
    assert proc.returncode != 0 and "ofaconv: error: 1 of 11 images failed" in proc.stderr, proc.stderr
    for name in ("ids.jsonl", "failed.jsonl"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    one = np.concatenate([m for _, m in catalog.iter_embedding_shards(tmp_path / "one")])
    two = np.concatenate([m for _, m in catalog.iter_embedding_shards(tmp_path / "two")])
    assert one.shape == (10, one.shape[1]) and np.array_equal(one, two)
    manifest = json.loads((tmp_path / "two" / "embeddings.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [2, 2, 1, 2, 2, 1]


def test_two_processes_resume_what_one_process_left(ofa_verified_folder, photos, tmp_path):
    """A one-process run killed after two chunks, finished by two processes: the same output."""
    common = ["--max-len", "3", "--chunk-size", "2", "--batch-size", "2", "--workers", "0", "--no-progress"]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert main(["caption", str(ofa_verified_folder), str(photos), "--out", str(one), *common]) == 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", catalog.KILL_AFTER_ENV: "2"}
    killed = subprocess.run([sys.executable, "-m", "ofaconv", "caption", str(ofa_verified_folder), str(photos),
                             "--out", str(two), *common], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    proc = _torchrun(["caption", str(ofa_verified_folder), str(photos), "--out", str(two), *common])
    assert "1 of 11 images failed" in proc.stderr, proc.stderr
    assert two.read_bytes() == one.read_bytes()


def test_two_processes_predict_like_one(ofa_verified_folder, photos, tmp_path):
    """VQA with one question per image (of different token lengths): the same records, each with its own text."""
    texts = [f"what is in picture {i}" + " and why" * (i % 3) for i in range(11)]
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("\n".join(texts) + "\n", encoding="utf-8")
    common = ["--task", "vqa", "--texts", str(texts_file), "--max-len", "3", "--beams", "2", "--chunk-size", "2",
              "--batch-size", "2", "--workers", "1", "--no-progress"]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert main(["predict", str(ofa_verified_folder), str(photos), "--out", str(one), *common]) == 2
    proc = _torchrun(["predict", str(ofa_verified_folder), str(photos), "--out", str(two), *common])
    assert proc.returncode != 0 and proc.stderr.count("ofaconv: error: 1 of 11 images failed") == 1, proc.stderr
    assert proc.stderr.count("ofaconv: note:") == 1, proc.stderr  # rank 0 says it, once
    assert two.read_bytes() == one.read_bytes()
    records = [json.loads(line) for line in one.read_text(encoding="utf-8").splitlines()]
    assert [Path(r["image"]).name for r in records] == [f"{i:02d}.png" for i in range(11)]
    assert [r["query"] for r in records] == texts
    assert "error" in records[4] and all("answer" in r for i, r in enumerate(records) if i != 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl", "texts.txt", "two.jsonl"]
