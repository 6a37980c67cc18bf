"""Using the towers: similarity, search index, export-bert, retrieval eval, init, CLI."""

import base64
import io
import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ofaconv.cli import main
from ofaconv.clip import ClipTowers, synth
from ofaconv.clip.assemble import init_bertclip
from ofaconv.clip.convert import convert
from ofaconv.clip.evaluate import evaluate_retrieval, recall_at_k
from ofaconv.clip.export import export_bert
from ofaconv.clip.search import build_index, query_index
from ofaconv.clip.similarity import similarity, similarity_from_features
from ofaconv.clip.towers import load_image
from ofaconv.core.errors import OfaconvError


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    root = tmp_path_factory.mktemp("pkg")
    src = synth.write_legacy_bertclip(root / "legacy")
    convert(src, root / "bertclip", verify=False)
    return root / "bertclip"


@pytest.fixture(scope="module")
def cnclip_package(tmp_path_factory):
    root = tmp_path_factory.mktemp("cnpkg")
    src = synth.write_cnclip_pt(root / "src", "ViT-B-16")
    convert(src, root / "cnclip", vocab=str(synth.write_vocab(root / "vocab.txt")), verify=False)
    return root / "cnclip"


@pytest.fixture(scope="module")
def towers(package):
    return ClipTowers.from_pretrained(package)


def _image(color, size=(40, 30)):
    return Image.new("RGB", size, color)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    for i, c in enumerate(["red", "green", "blue", "yellow"]):
        _image(c).save(d / f"{i}_{c}.png")
    return d


def test_similarity_modes_and_seed_semantics(towers, image_dir):
    imgs = sorted(image_dir.glob("*.png"))
    texts = ["红色", "绿色", "蓝色"]
    r = similarity(towers, "image-text", imgs, texts)
    assert r.cosine.shape == (4, 3) and torch.allclose(r.probs.sum(1), torch.ones(4))
    expected = (r.cosine * torch.tensor(towers.logit_scale).exp()).softmax(-1)
    torch.testing.assert_close(r.probs, expected)
    tt = similarity(towers, "text-text", texts)
    assert tt.self_excluded and torch.all(tt.probs.diagonal() == 0)
    assert all(j != i for i in range(3) for j, _, _ in tt.ranked(i))
    ii = similarity(towers, "image-image", imgs)
    torch.testing.assert_close(ii.cosine.diagonal(), torch.ones(4), atol=1e-5, rtol=0)
    with pytest.raises(OfaconvError, match="at least 2"):
        similarity(towers, "text-text", ["一"])
    with pytest.raises(OfaconvError, match="needs both"):
        similarity(towers, "image-text", imgs)
    with pytest.raises(OfaconvError, match="unknown mode"):
        similarity(towers, "text-audio", texts)
    cos, probs, same = similarity_from_features(torch.eye(2), None, 0.0)
    assert same and probs.tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_encode_texts_batches_equal_single_and_truncate_explicitly(towers):
    texts = ["一只猫", "公交车停在路边", "花" * 300]
    batched = towers.encode_texts(texts, batch_size=2)
    single = torch.cat([towers.encode_texts([t]) for t in texts])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    towers.encode_texts(texts)
    assert towers.last_truncated == 1


def test_corrupt_image_names_the_file(towers, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(OfaconvError, match="bad.jpg"):
        towers.encode_images([bad])


def test_search_index_is_built_once_and_grows(towers, image_dir, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted(image_dir.glob("*.png"))[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    first = build_index(towers, folder, tmp_path / "index")
    assert first["images"] == 3 and first["newly_embedded"] == 3
    (folder / "broken.png").write_bytes(b"junk")
    (folder / "3_yellow.png").write_bytes((image_dir / "3_yellow.png").read_bytes())
    second = build_index(towers, folder, tmp_path / "index")
    assert second["images"] == 4 and second["newly_embedded"] == 1 and second["bad_images"] == 1
    hits = query_index(towers, tmp_path / "index", ["红色"], k=2)
    assert len(hits[0]["results"]) == 2
    img_feats = towers.encode_images([folder / hits[0]["results"][0]["image"]])
    cos = float(towers.encode_texts(["红色"]) @ img_feats.t())
    assert abs(cos - hits[0]["results"][0]["cosine"]) < 1e-5


def test_search_never_replaces_an_index_silently(towers, image_dir, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, pngs in ((first, [0, 1]), (second, [2, 3])):
        folder.mkdir()
        for p in sorted(image_dir.glob("*.png"))[pngs[0] : pngs[1] + 1]:
            (folder / p.name).write_bytes(p.read_bytes())
    index = tmp_path / "index"
    build_index(towers, first, index)
    before = (index / "index.json").read_text()
    with pytest.raises(OfaconvError, match="--force"):
        build_index(towers, second, index)
    assert (index / "index.json").read_text() == before
    replaced = build_index(towers, second, index, force=True)
    assert replaced["images"] == 2 and replaced["newly_embedded"] == 2
    assert {r["image"] for r in query_index(towers, index, ["红色"], k=4)[0]["results"]} == {p.name for p in second.iterdir()}
    # a folder ofaconv did not write is never an index, --force or not
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for force in (False, True):
        with pytest.raises(OfaconvError, match="not a search index"):
            build_index(towers, first, mine, force=force)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_search_over_tsv(towers, tmp_path):
    tsv = tmp_path / "valid_imgs.tsv"
    rows, images = [], []
    for i, (c, size) in enumerate([("red", (40, 30)), ("blue", (30, 50)), ("green", (64, 64)), ("white", (20, 20))]):
        buf = io.BytesIO()
        _image(c, size).save(buf, format="JPEG")
        images.append(buf.getvalue())
        rows.append(f"{1000 + i}\t{base64.urlsafe_b64encode(buf.getvalue()).decode()}")
    tsv.write_text("\n".join(rows) + "\n")
    info = build_index(towers, tsv, tmp_path / "idx")
    assert info["images"] == 4
    queries = ["蓝色", "一只猫"]
    hits = query_index(towers, tmp_path / "idx", queries, k=3)
    cosine = towers.encode_texts(queries) @ towers.encode_images(images).t()
    for hit, row in zip(hits, cosine):
        ranked = row.sort(descending=True)
        assert float(ranked.values[2] - ranked.values[3]) > 1e-4  # a real cut, not a tie, at k=3
        assert [r["image"] for r in hit["results"]] == [str(1000 + j) for j in ranked.indices[:3].tolist()]
        torch.testing.assert_close(torch.tensor([r["cosine"] for r in hit["results"]]), ranked.values[:3],
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("with_projection", [True, False])
def test_export_bert(package, towers, tmp_path, with_projection):
    from transformers import BertModel

    report = export_bert(package, tmp_path / "bert", with_projection=with_projection)
    assert report["max_abs_diff"] <= 1e-5
    bert = BertModel.from_pretrained(str(tmp_path / "bert"))
    batch = towers.tokenize(["一只猫"])
    pooled = bert(**batch).pooler_output
    if with_projection:
        w = load_file(str(tmp_path / "bert" / "text_projection.safetensors"))["weight"]
        torch.testing.assert_close(pooled @ w.t(), towers.encode_token_batch(batch, normalize=False), atol=1e-5, rtol=0)
        assert report["embedding_dim"] == w.shape[0]
    else:
        assert not (tmp_path / "bert" / "text_projection.safetensors").exists()
        assert report["embedding_dim"] == bert.config.hidden_size


@pytest.mark.parametrize("which", ["package", "cnclip_package"])
def test_sentence_transformers_layout_encodes_clip_text_embeddings(request, which):
    # BertCLIP: tanh pooler on [CLS] -> projection; Chinese-CLIP: [CLS] -> projection, its pooler unused
    import sentence_transformers as st

    package = request.getfixturevalue(which)
    model = st.SentenceTransformer(str(package / "text_tower"), device="cpu")
    texts = ["一只猫", "公交车", "花" * 80]
    got = torch.tensor(model.encode(texts))
    torch.testing.assert_close(got, ClipTowers.from_pretrained(package).encode_texts(texts), atol=1e-5, rtol=0)


def test_recall_at_k_any_match():
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.1, 0.2, 0.3], [0.0, 0.8, 0.9]])
    # row 0: top1 is its gt; row 1: gt {0,1}, best gt at rank 2; row 2: gt {1} at rank 2; none at rank 3
    r = recall_at_k(sim, [{0}, {0, 1}, {0}], ks=(1, 2, 3))
    assert r["r1"] == pytest.approx(100 / 3) and r["r2"] == pytest.approx(200 / 3) and r["r3"] == 100
    assert r["mean_recall"] == pytest.approx((100 / 3 + 200 / 3 + 100) / 3)


class _ClockTowers:
    """Stand-in towers with chosen unit features: image h (an image 10 + h pixels wide) sits at hour h
    of a clock face, the text "3.1点" at hour 3.1, so cosine similarity falls with clock distance."""

    last_truncated = 0

    @staticmethod
    def _at(hour):
        angle = 2 * math.pi * hour / 12
        return torch.tensor([math.cos(angle), math.sin(angle)])

    def encode_images(self, images, batch_size=64):
        return torch.stack([self._at(load_image(im).width - 10) for im in images])

    def encode_readable_images(self, items, load, batch_size=64):
        return self.encode_images([load(i) for i in items]), list(range(len(items))), []

    def encode_texts(self, texts, batch_size=64, max_length=None):
        return torch.stack([self._at(float(t.removesuffix("点"))) for t in texts])


def test_retrieval_known_answer(tmp_path):
    # text -> image, 12 candidates; rank of the nearest ground-truth image:
    #   t0 @0.1 {0}: 1 | t1 @3.1 {5}: 3,4,2,5 -> 4 | t2 @6.2 {0}: opposite side -> 12 | t3 @9.3 {7,10}: 9,10 -> 2
    #   t4 @1.4 {4}: 1,2,0,3,11,4 -> 6 | t5 @11.6 {2}: 0,11,1,10,2 -> 5 | t6 @4.45 {11}: 11
    #   R@1 1/7, R@5 4/7, R@10 5/7
    # image -> text, only the 7 images with a caption, 7 candidates; distances in hours:
    #   i0 {t0,t2}: t0 .1 -> 1 | i2 {t5}: t4 .6, t1 1.1, t0 1.9, t5 2.4 -> 4
    #   i4 {t4}: t6 .45, t1 .9, t2 2.2, t4 2.6 -> 4 | i5 {t1}: t6 .55, t2 1.2, t1 1.9 -> 3
    #   i7 {t3}: t2 .8, t3 2.3 -> 2 | i10 {t3}: t3 .7 -> 1 | i11 {t6}: 7
    #   R@1 2/7, R@5 6/7, R@10 7/7
    captions = [(0.1, [0]), (3.1, [5]), (6.2, [0]), (9.3, [7, 10]), (1.4, [4]), (11.6, [2]), (4.45, [11])]
    tsv = tmp_path / "test_imgs.tsv"
    lines = []
    for hour in (7, 3, 11, 0, 5, 1, 9, 2, 6, 10, 4, 8):  # TSV order is not the id order
        buf = io.BytesIO()
        _image("gray", (10 + hour, 8)).save(buf, format="PNG")
        lines.append(f"{100 + hour}\t{base64.b64encode(buf.getvalue()).decode()}")
    tsv.write_text("\n".join(lines) + "\n")
    texts = tmp_path / "test_texts.jsonl"
    texts.write_text("".join(json.dumps({"text_id": t, "text": f"{hour}点", "image_ids": [100 + i for i in ids]},
                                        ensure_ascii=False) + "\n" for t, (hour, ids) in enumerate(captions)))
    result = evaluate_retrieval(_ClockTowers(), texts, tsv, batch_size=5)
    assert (result["n_texts"], result["n_images"]) == (7, 12)
    t2i, i2t = result["text_to_image"], result["image_to_text"]
    assert [t2i["r1"], t2i["r5"], t2i["r10"]] == pytest.approx([100 / 7, 400 / 7, 500 / 7])
    assert t2i["mean_recall"] == pytest.approx(1000 / 21)
    assert [i2t["r1"], i2t["r5"], i2t["r10"]] == pytest.approx([200 / 7, 600 / 7, 100])
    assert i2t["mean_recall"] == pytest.approx(1500 / 21)


def _clock_tsv(path, hours, ids):
    lines = []
    for hour, image_id in zip(hours, ids):
        buf = io.BytesIO()
        _image("gray", (10 + hour, 8)).save(buf, format="PNG")
        lines.append(f"{image_id}\t{base64.b64encode(buf.getvalue()).decode()}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_retrieval_ties_rank_the_earlier_gallery_item_first(tmp_path):
    # every image twice (ids 100+h, then 200+h: the same pixels), so each text at hour h ties its two
    # copies for the top score. The protocol's stable sort ranks the earlier copy (100+h) first: the six
    # texts whose ground truth is that copy hit at rank 1, the six pointing at the later copy at rank 2.
    # torch.topk orders such ties its own way (here it puts the later copy first for 8 of 12 rows).
    hours = [h for h in range(12) for _ in (0, 1)]
    ids = [(100 if n % 2 == 0 else 200) + h for n, h in enumerate(hours)]
    tsv = _clock_tsv(tmp_path / "test_imgs.tsv", hours, ids)
    texts = tmp_path / "test_texts.jsonl"
    texts.write_text("".join(json.dumps({"text_id": h, "text": f"{h}点", "image_ids": [(100 if h % 2 == 0 else 200) + h]})
                             + "\n" for h in range(12)))
    t2i = evaluate_retrieval(_ClockTowers(), texts, tsv, directions=("text_to_image",))["text_to_image"]
    assert [t2i["r1"], t2i["r5"], t2i["r10"]] == [50.0, 100.0, 100.0]
    # the same rule straight on recall_at_k: equal scores, ground truth on the earlier or later column
    sim = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1]] * 2)
    assert recall_at_k(sim, [{1}, {3}], ks=(1,))["r1"] == 50.0
    assert recall_at_k(sim, [{0}, {2}], ks=(3,))["r3"] == 50.0  # ranks 1, 3, 0 | 2


def test_eval_skips_lines_that_are_not_utf8_json_or_too_long(tmp_path, monkeypatch):
    from ofaconv.clip import data

    monkeypatch.setattr(data, "MAX_LINE_BYTES", 64)
    tsv = _clock_tsv(tmp_path / "test_imgs.tsv", [0, 3], [100, 103])
    texts = tmp_path / "test_texts.jsonl"
    good = [json.dumps({"text_id": h, "text": f"{h}点", "image_ids": [100 + h]}, ensure_ascii=False).encode() for h in (0, 3)]
    texts.write_bytes(b"\n".join([good[0], b'{"text": "\xff\xfe", "image_ids": [100]}', b"[[[[[[" * 50, b"[1, 2]",
                                  b'{"text": "x", "image_ids": 100}', good[1]]) + b"\n")
    result = evaluate_retrieval(_ClockTowers(), texts, tsv)
    assert result["n_texts"] == 2 and result["bad_rows"] == 4
    reasons = {f["item"].rsplit(":", 1)[1]: f["error"] for f in result["failed"]}
    assert reasons["2"].startswith("not UTF-8") and "longer than 64 bytes" in reasons["3"]
    assert reasons["4"] == "not a JSON object" and "list 'image_ids'" in reasons["5"]
    assert result["items"] == 6 + 2 and result["text_to_image"]["r1"] == 100.0


def test_eval_cli_on_cnclip_files(package, towers, tmp_path, capsys):
    tsv = tmp_path / "test_imgs.tsv"
    lines = []
    for i, c in enumerate(["red", "green", "blue"]):
        buf = io.BytesIO()
        _image(c).save(buf, format="PNG")
        lines.append(f"{i}\t{base64.b64encode(buf.getvalue()).decode()}")
    tsv.write_text("\n".join(lines) + "\n")
    texts = tmp_path / "test_texts.jsonl"
    recs = [{"text_id": 1, "text": "红色", "image_ids": [0]}, {"text_id": 2, "text": "“绿色”", "image_ids": [1, 2]}]
    texts.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n{broken\n")
    # the broken line is skipped and reported: the result is written, the run exits 2 naming file:line
    assert main(["clip", "eval", str(package), "--texts", str(texts), "--images", str(tsv), "--output",
                 str(tmp_path / "r.json")]) == 2
    assert capsys.readouterr().err.strip().startswith(f"ofaconv: error: 1 of 6 items failed (first: {texts}:3: invalid JSON")
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["protocol"]["context_length"] == 52 and result["bad_rows"] == 1
    assert result["failed"][0]["item"] == f"{texts}:3"
    direct = evaluate_retrieval(towers, texts, tsv)
    for direction in ("text_to_image", "image_to_text"):
        assert result[direction] == pytest.approx(direct[direction]), direction


def test_similarity_takes_folders_and_globs_and_skips_unreadable_images(package, image_dir, tmp_path, capsys):
    folder, extra = tmp_path / "folder", tmp_path / "extra"
    folder.mkdir()
    extra.mkdir()
    pngs = sorted(image_dir.glob("*.png"))
    for p in pngs[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "9_broken.png").write_bytes(b"not a png")
    (extra / pngs[2].name).write_bytes(pngs[2].read_bytes())
    assert main(["clip", "similarity", str(package), "--mode", "image-text", "--images", str(folder),
                 str(extra / "*.png"), str(tmp_path / "missing.png"), "--texts", "红色", "绿色", "--json"]) == 2
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert [r["query"] for r in out["results"]] == [str(folder / pngs[0].name), str(folder / pngs[1].name),
                                                    str(extra / pngs[2].name)]
    assert [f["image"] for f in out["failed"]] == [str(folder / "9_broken.png"), str(tmp_path / "missing.png")]
    assert captured.err.splitlines() == [captured.err.strip()]
    assert captured.err.startswith(f"ofaconv: error: 2 of 5 images failed (first: {folder / '9_broken.png'}: ")


def test_init_keeps_clip_vision_projection_and_temperature(tmp_path):
    clip = synth.write_openai_clip(tmp_path / "clip")
    bert = synth.write_bert(tmp_path / "bert")
    report = init_bertclip(clip, bert, tmp_path / "new")
    src = load_file(str(clip / "model.safetensors"))
    out = load_file(str(tmp_path / "new" / "model.safetensors"))
    assert torch.equal(out["visual_projection.weight"], src["visual_projection.weight"])
    assert torch.equal(out["logit_scale"], src["logit_scale"]) and report["logit_scale"] == pytest.approx(float(src["logit_scale"]))
    assert torch.equal(out["vision_model.vision_model.post_layernorm.weight"], src["vision_model.post_layernorm.weight"])
    bsrc = load_file(str(bert / "model.safetensors"))
    assert torch.equal(out["text_model.pooler.dense.weight"], bsrc["bert.pooler.dense.weight"])
    assert out["text_projection.weight"].shape == (src["visual_projection.weight"].shape[0], 64)
    assert not any(k.startswith("cls.") or "token_embedding" in k for k in out)


def test_similarity_cli(package, image_dir, capsys):
    imgs = [str(p) for p in sorted(image_dir.glob("*.png"))]
    assert main(["clip", "similarity", str(package), "--mode", "image-text", "--images", *imgs[:2],
                 "--texts", "红色", "绿色", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["results"]) == 2 and len(out["results"][0]["matches"]) == 2
    assert main(["clip", "similarity", str(package), "--mode", "text-text", "--texts", "一"]) == 2
    assert "at least 2" in capsys.readouterr().err
