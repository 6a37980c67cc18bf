"""Using the towers: similarity, search index, export-bert, retrieval eval, init, CLI."""

import base64
import io
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ofaconv.cli import main
from ofaconv.clip import ClipTowers, synth
from ofaconv.clip.assemble import init_bertclip
from ofaconv.clip.convert import convert
from ofaconv.clip.evaluate import recall_at_k
from ofaconv.clip.export import export_bert
from ofaconv.clip.search import build_index, query_index
from ofaconv.clip.similarity import similarity, similarity_from_features
from ofaconv.errors import OfaconvError


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    root = tmp_path_factory.mktemp("pkg")
    src = synth.write_legacy_bertclip(root / "legacy")
    convert(src, root / "bertclip", verify=False)
    return root / "bertclip"


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


def test_search_over_tsv(towers, tmp_path):
    tsv = tmp_path / "valid_imgs.tsv"
    rows = []
    for i, c in enumerate(["red", "blue"]):
        buf = io.BytesIO()
        _image(c).save(buf, format="JPEG")
        rows.append(f"{1000 + i}\t{base64.urlsafe_b64encode(buf.getvalue()).decode()}")
    tsv.write_text("\n".join(rows) + "\n")
    info = build_index(towers, tsv, tmp_path / "idx")
    assert info["images"] == 2
    assert {r["image"] for r in query_index(towers, tmp_path / "idx", ["蓝色"])[0]["results"]} == {"1000", "1001"}


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


def test_sentence_transformers_layout_encodes_clip_text_embeddings(package, towers):
    import sentence_transformers as st

    model = st.SentenceTransformer(str(package / "text_tower"), device="cpu")
    got = torch.tensor(model.encode(["一只猫", "公交车"]))
    torch.testing.assert_close(got, towers.encode_texts(["一只猫", "公交车"]), atol=1e-5, rtol=0)


def test_recall_at_k_any_match():
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.1, 0.2, 0.3], [0.0, 0.8, 0.9]])
    # row 0: top1 is its gt; row 1: gt {0,1}, best gt at rank 2; row 2: gt {1} at rank 2; none at rank 3
    r = recall_at_k(sim, [{0}, {0, 1}, {0}], ks=(1, 2, 3))
    assert r["r1"] == pytest.approx(100 / 3) and r["r2"] == pytest.approx(200 / 3) and r["r3"] == 100
    assert r["mean_recall"] == pytest.approx((100 / 3 + 200 / 3 + 100) / 3)


def test_eval_cli_on_cnclip_files(package, tmp_path, capsys):
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
    assert main(["clip", "eval", str(package), "--texts", str(texts), "--images", str(tsv), "--output",
                 str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["protocol"]["context_length"] == 52 and result["bad_rows"] == 1
    assert set(result["text_to_image"]) == {"r1", "r5", "r10", "mean_recall"}
    assert result["image_to_text"]["r10"] == 100.0  # 3 images, 2 texts: everything is in the top 10


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
