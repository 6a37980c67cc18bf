"""LiT training: it learns (held-out text->image R@1 >= 90%), the locked tower is cached once and
never changes, data problems are counted and skipped, the recipe is validated, the downloader copes."""

import csv
import http.server
import io
import json
import threading
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from ofaconv.clip import ClipTowers, synth
from ofaconv.clip.assemble import init_bertclip
from ofaconv.clip.data import DataStats, read_csv_pairs, read_pairs
from ofaconv.clip.download import download_images
from ofaconv.clip.evaluate import recall_at_k
from ofaconv.clip.train import load_recipe, train
from ofaconv.core.errors import OfaconvError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def init_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("lit")
    init_bertclip(synth.write_openai_clip(root / "clip"), synth.write_bert(root / "bert"), root / "init")
    return root / "init"


def _recipe(tmp_path, model, csv_path, epochs, **lit):
    recipe = {"model": str(model), "output_dir": str(tmp_path / "run"), "max_length": 16,
              "data": {"train": {"csv": str(csv_path)}},
              "lit": {"clamp_logit_scale": 4.6052, **lit},
              "training": {"per_device_train_batch_size": 16, "learning_rate": 1e-3, "lr_scheduler_type": "cosine",
                           "warmup_steps": 5, "num_train_epochs": epochs, "weight_decay": 0.0, "seed": 0,
                           "use_cpu": True, "dataloader_num_workers": 0, "disable_tqdm": True, "logging_steps": 1000}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return load_recipe(path)


def test_lit_learns_held_out_pairs(tmp_path, init_model):
    torch.set_flush_denormal(True)
    train_csv = synth.write_caption_pairs(tmp_path / "train", per_class=16, seed=0)
    held_csv = synth.write_caption_pairs(tmp_path / "held", per_class=4, seed=123)
    result = train(_recipe(tmp_path, init_model, train_csv, epochs=20))
    assert result["cached"] and result["data"]["pairs"] == 128
    towers = ClipTowers.from_pretrained(result["output"])
    pairs, store = read_csv_pairs(held_csv, None, DataStats())
    img = towers.encode_images([store.load(p.image_id) for p in pairs])
    txt = towers.encode_texts([p.text for p in pairs])
    gt = [{j for j, q in enumerate(pairs) if q.text == p.text} for p in pairs]
    recall = recall_at_k(txt @ img.t(), gt)
    assert recall["r1"] >= 90.0, recall
    # LiT: the image tower is bit-identical to the initial one; the text tower moved
    before, after = load_file(str(init_model / "model.safetensors")), load_file(str(Path(result["output"]) / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("vision_model."))
    assert not torch.equal(before["text_projection.weight"], after["text_projection.weight"])
    assert float(after["logit_scale"]) <= 4.6052 + 1e-6


def test_cache_is_filled_once_and_reused(tmp_path, init_model, monkeypatch):
    from ofaconv.clip import train as train_mod

    csv_path = synth.write_caption_pairs(tmp_path / "d", per_class=2, seed=1)
    calls = []
    real = train_mod.precompute_image_features

    def spy(towers, store, ids, cache, **kw):
        calls.append(len(cache.missing(ids)))
        return real(towers, store, ids, cache, **kw)

    monkeypatch.setattr(train_mod, "precompute_image_features", spy)
    train(_recipe(tmp_path, init_model, csv_path, epochs=1, lock_image_head=True))
    train(_recipe(tmp_path, init_model, csv_path, epochs=1, lock_image_head=True))
    assert calls == [16, 0]  # second run: every image served from the cache
    cache_dirs = list((tmp_path / "run" / "feature_cache" / "clip-image-pooled").iterdir())
    assert len(cache_dirs) == 1
    out = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert torch.equal(out["visual_projection.weight"], load_file(str(init_model / "model.safetensors"))["visual_projection.weight"])


def test_uncached_path_skips_bad_images_and_rows(tmp_path, init_model):
    csv_path = synth.write_caption_pairs(tmp_path / "d", per_class=1, seed=2)
    rows = list(csv.DictReader(open(csv_path, encoding="utf-8")))
    (tmp_path / "d" / rows[0]["filename"]).write_bytes(b"corrupt")
    rows.append({"text": "", "url": "", "filename": "images/x.png"})
    rows.append({"text": "缺失", "url": "", "filename": "images/missing.png"})
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["text", "url", "filename"])
        w.writeheader()
        w.writerows(rows)
    result = train(_recipe(tmp_path, init_model, csv_path, epochs=1, cache_image_features=False))
    assert not result["cached"]
    assert {k: result["data"][k] for k in ("pairs", "bad_rows", "missing_images", "bad_images")} == \
        {"pairs": 7, "bad_rows": 1, "missing_images": 1, "bad_images": 1}


def test_recipe_and_data_schema_errors(tmp_path, init_model):
    bad = tmp_path / "r.yaml"
    bad.write_text("model: x\noutput_dir: y\ndata: {}\nlit: {lock_images: true}\n")
    with pytest.raises(OfaconvError, match="lit.lock_images"):
        load_recipe(bad)
    csv_path = tmp_path / "wrong.csv"
    csv_path.write_text("caption,filename\na,b.png\n")
    with pytest.raises(OfaconvError, match="text.*filename"):
        read_pairs({"csv": str(csv_path)})
    with pytest.raises(OfaconvError, match="lit.cache_image_features.*lock_image"):
        _recipe(tmp_path, init_model, csv_path, epochs=1, lock_image=False)


def test_shipped_recipe_is_the_seed_run():
    recipe = load_recipe(REPO / "training" / "clip_bertclip_lit.yaml")
    t = recipe.training
    assert (t["per_device_train_batch_size"], t["learning_rate"], t["lr_scheduler_type"], t["warmup_steps"],
            t["num_train_epochs"], t["fp16"], recipe.max_length) == (768, 5e-5, "cosine", 1000, 50, True, 100)
    assert recipe.model == str(REPO / "bertclip-init") and recipe.data.train.image_root == str(REPO / "data")


def test_cnclip_tsv_jsonl_reader_counts_bad_rows(tmp_path):
    import base64

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    (tmp_path / "train_imgs.tsv").write_text(f"7\t{base64.urlsafe_b64encode(buf.getvalue()).decode()}\n")
    (tmp_path / "train_texts.jsonl").write_text(
        '{"text_id": 1, "text": "红色", "image_ids": [7]}\n{"text_id": 2, "text": "x", "image_ids": [9]}\nnot json\n')
    pairs, store, stats = read_pairs({"texts": "train_texts.jsonl", "images": "train_imgs.tsv"}, tmp_path)
    assert [(p.text, p.image_id) for p in pairs] == [("红色", "7")]
    assert (stats.bad_rows, stats.missing_images) == (1, 1) and store.load("7").size == (8, 8)


# -- downloader, against a loopback HTTP server only -----------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    hits: dict = {}

    def log_message(self, *a):
        pass

    def do_GET(self):
        _Handler.hits[self.path] = _Handler.hits.get(self.path, 0) + 1
        if self.path == "/flaky.png" and _Handler.hits[self.path] == 1:
            self.send_response(503)
            self.end_headers()
            return
        if self.path in ("/ok.png", "/flaky.png"):
            buf = io.BytesIO()
            Image.new("RGB", (4, 4), "blue").save(buf, format="PNG")
            body = buf.getvalue()
        elif self.path == "/text.png":
            body = b"<html>not an image</html>"
        else:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_downloader_retries_validates_resumes_and_reports(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        src = tmp_path / "urls.csv"
        src.write_text("text,url,filename\n"
                       f"a,{base}/ok.png,a/ok.png\nb,{base}/flaky.png,flaky.png\n"
                       f"c,{base}/missing.png,missing.png\nd,{base}/text.png,text.png\ne,{base}/ok.png,../escape.png\n")
        r = download_images(src, tmp_path / "img", workers=3, timeout=5, retries=2, backoff=0.01,
                            out_csv=tmp_path / "ok.csv")
        assert (r["downloaded"], r["failed"]) == (2, 3)
        failures = [json.loads(l) for l in open(r["failures"])]
        assert {f["filename"] for f in failures} == {"missing.png", "text.png", "../escape.png"}
        assert (tmp_path / "img" / "a" / "ok.png").is_file() and not (tmp_path / "escape.png").exists()
        assert not list((tmp_path / "img").rglob("*.part"))
        assert len(list(csv.DictReader(open(tmp_path / "ok.csv")))) == 2
        again = download_images(src, tmp_path / "img", workers=2, timeout=5, retries=0)
        assert again["skipped_existing"] == 2 and again["downloaded"] == 0
    finally:
        server.shutdown()


# -- image-feature cache fill ----------------------------------------------------------------------
def _corrupt_one(csv_path, index):
    with open(csv_path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    (csv_path.parent / rows[index]["filename"]).write_bytes(b"corrupt")
    return rows[index]["filename"]


@pytest.fixture
def fill_setup(tmp_path, init_model):
    from ofaconv.clip.train import open_image_cache

    csv_path = synth.write_caption_pairs(tmp_path / "d", per_class=1, seed=3)
    bad_id = _corrupt_one(csv_path, 2)
    pairs, store = read_csv_pairs(csv_path, None, DataStats())
    towers = ClipTowers.from_pretrained(init_model)
    ids = [p.image_id for p in pairs]
    return towers, store, ids, bad_id, lambda name: open_image_cache(towers, tmp_path / name, "float32")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_fill_decodes_in_dataloader_workers_and_matches_direct_encoding(fill_setup, num_workers):
    from ofaconv.clip.train import precompute_image_features

    towers, store, ids, bad_id, open_cache = fill_setup
    cache, stats = open_cache(f"cache{num_workers}"), DataStats()
    bad = precompute_image_features(towers, store, ids, cache, batch_size=3, num_workers=num_workers, stats=stats)
    assert bad == {bad_id} and stats.bad_images == 1 and bad_id in stats.examples[0]
    good = [i for i in ids if i != bad_id]
    assert sorted(cache.ids()) == sorted(good)
    # bit-identical to encoding each batch of ids in this process, the failed ones left out
    with torch.no_grad():
        direct = torch.cat([towers.pool_images(towers.preprocess_images([store.load(i) for i in ids[k : k + 3] if i != bad_id]))
                            for k in range(0, len(ids), 3)])
    assert torch.equal(cache.get_many(good), direct)


def test_fill_shares_are_stable_when_ranks_start_at_different_times(fill_setup):
    from ofaconv.clip.train import precompute_image_features

    towers, store, ids, bad_id, open_cache = fill_setup
    # rank 0 has written its shards before rank 1 looks at the cache
    bad = precompute_image_features(towers, store, ids, open_cache("shared"), rank=0, world_size=2)
    bad |= precompute_image_features(towers, store, ids, open_cache("shared"), rank=1, world_size=2)
    cache = open_cache("shared")
    assert bad == {bad_id} and sorted(cache.ids()) == sorted(i for i in ids if i != bad_id)


def test_fill_runs_on_the_training_device_with_the_recipe_workers(tmp_path, init_model, monkeypatch):
    from transformers import TrainingArguments

    from ofaconv.clip import train as train_mod

    class Filled(Exception):
        pass

    seen = {}

    def spy(towers, store, ids, cache, **kw):
        seen.update(device=towers.device, num_workers=kw.get("num_workers"))
        raise Filled

    # "meta" stands in for an accelerator: the towers must be on the training arguments' device
    monkeypatch.setattr(TrainingArguments, "device", property(lambda self: torch.device("meta")))
    monkeypatch.setattr(train_mod, "precompute_image_features", spy)
    recipe = _recipe(tmp_path, init_model, synth.write_caption_pairs(tmp_path / "d", per_class=1), epochs=1)
    recipe.training["dataloader_num_workers"] = 2
    with pytest.raises(Filled):
        train(recipe)
    assert seen == {"device": torch.device("meta"), "num_workers": 2}


def test_rank_fill_failures_are_merged_into_the_stats():
    from ofaconv.clip.train import _merge_rank_failures

    stats = DataStats(rows=9, pairs=9, bad_rows=1, examples=["bad_rows: pairs.csv:3"])
    ranks = []
    for rank, ids in enumerate([["a.png"], ["b.png", "c.png"]]):
        local = DataStats()
        for i in ids:
            local.bad("bad_images", f"{i} (UnidentifiedImageError)")
        ranks.append((ids, local.to_dict()))
    bad = _merge_rank_failures(ranks, stats)
    assert bad == {"a.png", "b.png", "c.png"}
    assert (stats.rows, stats.bad_rows, stats.bad_images) == (9, 1, 3) and len(stats.examples) == 4


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two torchrun processes
def test_two_processes_report_bad_images_of_every_rank(tmp_path, init_model):
    import os
    import subprocess
    import sys

    csv_path = synth.write_caption_pairs(tmp_path / "d", per_class=1, seed=4)
    _corrupt_one(csv_path, 1)  # rank 1's share: ids 1, 3, 5, 7
    _recipe(tmp_path, init_model, csv_path, epochs=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "ofaconv", "clip", "train", str(tmp_path / "recipe.yaml"),
           "--override", "training.per_device_train_batch_size=4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
    assert (stats["pairs"], stats["bad_images"]) == (7, 1), stats


# -- data readers ----------------------------------------------------------------------------------
def _png_b64():
    import base64

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    return base64.urlsafe_b64encode(buf.getvalue()).decode()


def test_cnclip_files_with_byte_order_marks(tmp_path):
    (tmp_path / "imgs.tsv").write_text(f"7\t{_png_b64()}\n8\t{_png_b64()}\n", encoding="utf-8-sig")
    (tmp_path / "texts.jsonl").write_text('{"text_id": 1, "text": "红色", "image_ids": [7, 8]}\n', encoding="utf-8-sig")
    pairs, store, stats = read_pairs({"texts": "texts.jsonl", "images": "imgs.tsv"}, tmp_path)
    assert [p.image_id for p in pairs] == ["7", "8"] and store.ids() == ["7", "8"]
    assert (stats.rows, stats.bad_rows, stats.missing_images) == (1, 0, 0) and store.load("7").size == (8, 8)


def test_filter_decodable_counts_broken_base64_rows(tmp_path):
    from ofaconv.clip.data import filter_decodable

    (tmp_path / "imgs.tsv").write_text(f"7\t{_png_b64()}\n8\t{_png_b64()[:-3]}\n")
    (tmp_path / "texts.jsonl").write_text('{"text_id": 1, "text": "红色", "image_ids": [7, 8]}\n')
    pairs, store, stats = read_pairs({"texts": "texts.jsonl", "images": "imgs.tsv"}, tmp_path)
    kept = filter_decodable(pairs, store, stats)
    assert [p.image_id for p in kept] == ["7"] and (stats.pairs, stats.bad_images) == (1, 1)
    assert stats.examples[0].startswith("bad_images: 8 (")
