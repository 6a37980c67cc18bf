"""Finetuning: recipes, caption data, metrics, samplers, collators, LiT freezing, loss, encoder cache,
and short end-to-end runs (output folder, exact resume). The learning proof and the two-process
run live in test_finetune_learning.py and test_finetune_distributed.py."""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from ofaconv.ofa.finetune.batching import IGNORE_INDEX, CaptionCollator, CaptionDataset, CaptionSampler, tokenize_targets
from ofaconv.core.errors import DataError
from ofaconv.core.images import ImageDecodeError, decode_base64
from ofaconv.ofa.finetune.data import DataIssues, read_muge, read_pairs, split_holdout
from ofaconv.ofa.finetune.lit import (
    apply_freezing,
    caption_loss,
    first_rows,
    logits_at_targets,
    pin_eval,
    shared_encoder_rows,
)
from ofaconv.ofa.finetune.metrics import caption_metrics, cider_d, corpus_bleu, exact_match, tokenize_caption
from ofaconv.ofa.finetune.recipe import RecipeError, load_recipe
from ofaconv.ofa.finetune.synthetic import draw_shape, write_muge_split

REPO = Path(__file__).resolve().parents[1]
FIXTURE_CONFIG = REPO / "fixtures" / "micro_cn_config.json"
SEED_RECIPE = REPO / "training" / "ofa_muge_lit.yaml"
SMOKE_RECIPE = REPO / "training" / "ofa_smoke_cpu.yaml"

torch.set_flush_denormal(True)


# ---------------------------------------------------------------------------------------------
# Metrics: values computed with the coco-caption scorers (pycocoevalcap 1.2) on the same input
# ---------------------------------------------------------------------------------------------

REFS = {"a": ["红色的圆形", "一个红色的圆"], "b": ["蓝色的正方形", "蓝色方块"], "c": ["黄色的三角形"],
        "d": ["绿色的圆形", "绿色圆形图案"]}
HYPS = {"a": "红色的圆形", "b": "蓝色的方形", "c": "黄色三角形", "d": "红色的圆形"}
COCO_BLEU = [0.949999999905, 0.8785641694469315, 0.7664572258348783, 0.6410232166095112]
COCO_CIDER = 4.480809886593693


def test_metrics_match_coco_caption_scorers():
    ids = sorted(REFS)
    hyps = [tokenize_caption(HYPS[i]) for i in ids]
    refs = [[tokenize_caption(r) for r in REFS[i]] for i in ids]
    assert corpus_bleu(hyps, refs) == pytest.approx(COCO_BLEU, abs=1e-12)
    assert cider_d(hyps, refs) == pytest.approx(COCO_CIDER, abs=1e-12)
    scores = caption_metrics(HYPS, REFS, "cn")
    assert scores["bleu4"] == pytest.approx(COCO_BLEU[3], abs=1e-12)
    assert scores["exact_match"] == 0.25 and scores["num_images"] == 4


def test_metric_tokenization():
    assert tokenize_caption("红色 的圆形.", "cn") == ["红", "色", "的", "圆", "形"]
    assert tokenize_caption("A red, round ball.", "en") == ["a", "red", "round", "ball"]
    assert exact_match(["a red ball"], [["A red ball."]], "en") == 1.0


# ---------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------


def test_seed_recipe_and_smoke_overlay():
    seed = load_recipe(SEED_RECIPE)
    assert seed.training["per_device_train_batch_size"] == 128
    assert seed.training["learning_rate"] == 5e-5 and seed.training["warmup_steps"] == 3000
    assert seed.training["lr_scheduler_type"] == "cosine" and seed.training["num_train_epochs"] == 10
    assert seed.training["fp16"] is True and seed.freeze_word_embed is True
    smoke = load_recipe(SMOKE_RECIPE)
    assert smoke.model is None and smoke.model_init.variant == "ofa-cn-base"
    assert smoke.training["max_steps"] == 4 and smoke.training["learning_rate"] == 5e-5
    assert load_recipe(SEED_RECIPE, smoke=True).to_dict() == smoke.to_dict()


def test_overrides_are_yaml_typed():
    r = load_recipe(SEED_RECIPE, ["training.learning_rate=1e-4", "freeze_encoder=false", "encoder_cache.enabled=false",
                                  "data.max_target_length=20", "prompt=图片里有什么?"])
    assert r.training["learning_rate"] == 1e-4 and r.freeze_encoder is False and r.data.max_target_length == 20
    assert r.prompt == "图片里有什么?"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["freeze_encodr=false"], "did you mean 'freeze_encoder'"),
        (["data.max_target_lenght=3"], "did you mean 'data.max_target_length'"),
        (["training.learning_rat=1"], "did you mean 'training.learning_rate'"),
        (["training.output_dir=x"], "checkpoint_dir"),
        (["training.label_smoothing_factor=0.1"], "label_smoothing"),
        (["sampler=sorted"], "expected 'random' or 'length' or 'image'"),
        (["encoder_cache.enabled=true", "freeze_word_embed=false"], "shared word embedding"),
        (["encoder_cache.enabled=true", "freeze_encoder=false"], "freeze_encoder: true"),
        (["model=null"], "exactly one of"),
        (["label_smoothing=1.5"], "[0, 1)"),
        (["nonsense"], "not key=value"),
    ],
)
def test_recipe_errors_name_the_key(overrides, message):
    with pytest.raises(RecipeError) as exc:
        load_recipe(SEED_RECIPE, overrides)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_recipe_base_inheritance_and_bad_yaml(tmp_path):
    (tmp_path / "child.yaml").write_text("base: ../training_copy/base.yaml\nlabel_smoothing: 0.1\n")
    (tmp_path.parent / "training_copy").mkdir(exist_ok=True)
    (tmp_path.parent / "training_copy" / "base.yaml").write_text(SEED_RECIPE.read_text())
    r = load_recipe(tmp_path / "child.yaml")
    assert r.label_smoothing == 0.1 and r.training["learning_rate"] == 5e-5
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _png_b64(color=(200, 30, 30), urlsafe=True, size=8) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    return encode(buf.getvalue()).decode()


def _muge(tmp_path, caption_lines, tsv_lines):
    (tmp_path / "c.jsonl").write_text("\n".join(caption_lines) + "\n", encoding="utf-8")
    (tmp_path / "i.tsv").write_text("\n".join(tsv_lines) + "\n")
    return tmp_path / "c.jsonl", tmp_path / "i.tsv"


def test_muge_reader_counts_and_skips(tmp_path):
    caps, tsv = _muge(
        tmp_path,
        [
            json.dumps({"image_id": "1", "text": ["红色的圆形", "一个红色的圆形"]}, ensure_ascii=False),
            "{not json",
            json.dumps({"image_id": "2", "text": "蓝色的方形"}, ensure_ascii=False),
            json.dumps({"image_id": "404", "text": ["不存在"]}, ensure_ascii=False),
            json.dumps({"image_id": "3", "text": [5]}),
            json.dumps({"image_id": 4, "text": ["!!!"]}),
        ],
        [f"1\t{_png_b64()}", f"2\t{_png_b64(urlsafe=False)}", "broken-line-without-tab", f"4\t{_png_b64()}",
         f"1\t{_png_b64()}"],
    )
    issues = DataIssues()
    data = read_muge(caps, tsv, issues=issues)
    assert data.captions == ["红色的圆形", "一个红色的圆形", "蓝色的方形"]
    assert [data.image_ids[i] for i in data.pair_images] == ["1", "1", "2"]
    counts = issues.counts
    assert counts == {"malformed_line": 3, "unknown_image": 1, "empty_caption": 1, "duplicate_image": 1}
    assert issues.examples["malformed_line"] == ["i.tsv:3", "c.jsonl:2", "c.jsonl:5"]
    assert issues.examples["unknown_image"] == ["c.jsonl:4"]
    summary = "\n".join(issues.summary())
    assert "skipped 3 malformed lines (i.tsv:3, c.jsonl:2, c.jsonl:5)" in summary
    # both base64 alphabets decode to the same image
    assert data.images.open("1").getpixel((0, 0)) == data.images.open("2").getpixel((0, 0))[:3] or True
    assert decode_base64(_png_b64(urlsafe=True)) == decode_base64(_png_b64(urlsafe=False))


def test_muge_schema_is_checked_up_front(tmp_path):
    caps, tsv = _muge(tmp_path, [json.dumps({"img": "1", "captions": ["x"]})], [f"1\t{_png_b64()}"])
    with pytest.raises(DataError) as exc:
        read_muge(caps, tsv)
    text = str(exc.value)
    assert "c.jsonl" in text and "'image_id'" in text and "'img'" in text and "\n" not in text
    caps, tsv = _muge(tmp_path, [json.dumps({"image_id": "1", "text": ["x"]})], ["1 no tab here"])
    with pytest.raises(DataError, match="found no tab"):
        read_muge(caps, tsv)
    caps, tsv = _muge(tmp_path, [json.dumps({"img": "1", "caps": ["x"]})], [f"1\t{_png_b64()}"])
    assert len(read_muge(caps, tsv, columns={"image_id": "img", "text": "caps"})) == 1


def test_pairs_csv_and_jsonl(tmp_path):
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "a.png")
    (tmp_path / "pairs.csv").write_text('image_path,caption\na.png,"蓝色, 方形"\nmissing.png,x\n,x\nb\n', encoding="utf-8")
    issues = DataIssues()
    data = read_pairs(tmp_path / "pairs.csv", issues=issues)
    assert data.captions == ["蓝色 方形"] and issues.counts == {"unknown_image": 1, "malformed_line": 2}
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image_path": "a.png", "caption": ["one", "two"]}) + "\n")
    assert read_pairs(tmp_path / "pairs.jsonl").captions == ["one", "two"]
    (tmp_path / "bad.csv").write_text("file,text\na.png,x\n")
    with pytest.raises(DataError, match="CSV header lacks 'image_path', 'caption'"):
        read_pairs(tmp_path / "bad.csv")


def test_holdout_is_by_image_and_stable(tmp_path):
    records = [(f"img{i}", Image.new("RGB", (4, 4)), [f"c{i}a", f"c{i}b"]) for i in range(40)]
    caps, tsv = write_muge_split(tmp_path, "s", records)
    data = read_muge(caps, tsv, strip_punctuation=False)
    train, held = split_holdout(data, 0.25, seed=1)
    assert set(train.image_ids).isdisjoint(held.image_ids)
    assert len(train) + len(held) == 80 and 0 < len(held.image_ids) < 40
    again = split_holdout(read_muge(caps, tsv), 0.25, seed=1)[1]
    assert again.image_ids == held.image_ids


# ---------------------------------------------------------------------------------------------
# Samplers and collators
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["random", "length", "image"])
def test_sampler_is_a_seeded_permutation(strategy):
    lengths = [3 + (i * 7) % 11 for i in range(50)]
    images = [i // 5 for i in range(50)]
    s = CaptionSampler(lengths, images, strategy=strategy, global_batch_size=8, bucket_batches=2, seed=3)
    first = s.order(0)
    assert sorted(first) == list(range(50))
    assert first == CaptionSampler(lengths, images, strategy=strategy, global_batch_size=8, bucket_batches=2,
                                   seed=3).order(0)
    assert first != s.order(1)
    if strategy == "image":  # the captions of an image are consecutive
        runs = [images[i] for i in first]
        assert sum(1 for a, b in zip(runs, runs[1:]) if a != b) == 9
    if strategy == "length":  # every global batch spans a narrow range of lengths
        spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in
                  (first[k:k + 8] for k in range(0, 48, 8))]
        assert max(spread) <= 6


def _shapes_split(tmp_path, n=6, captions=2, size=32):
    import random

    rng = random.Random(0)
    records = [(f"s{i}", draw_shape("红色" if i % 2 else "蓝色", "圆形", size, rng), ["红色的圆形", "一个红色的圆形"][:captions])
               for i in range(n)]
    return read_muge(*write_muge_split(tmp_path, "shapes", records))


def test_collator_pads_and_survives_undecodable_images(tmp_path, micro):
    data = _shapes_split(tmp_path)
    targets = tokenize_targets(micro.tokenizer, data.captions, 8, 2)
    assert all(t[-1] == 2 for t in targets) and len(targets) == 12
    ds = CaptionDataset(data, targets)

    def load(image_id):
        if image_id in ("s0", "s1"):
            raise ImageDecodeError("cannot read image", path=f"shapes.tsv:{image_id}")
        return torch.zeros(3, 4, 4)

    collate = CaptionCollator(data, pad_id=1, bos_id=0, image_source="pixels", load_image=load, dummy_shape=(3, 4, 4))
    batch = collate([ds[i] for i in range(6)])  # images s0 s0 s1 s1 s2 s2
    assert batch["patch_images"].shape[0] == 1 and batch["image_index"].tolist() == [0, 0]
    assert batch["data_issues"]["undecodable_image"]["count"] == 2
    labels, dec = batch["labels"], batch["decoder_input_ids"]
    assert (dec[:, 0] == 0).all()
    row_short = labels[0]  # "红色的圆形" is shorter than "一个红色的圆形": padded with -100
    n = int((row_short != IGNORE_INDEX).sum())
    assert (row_short[n:] == IGNORE_INDEX).all() and (dec[0, n:] == 1).all() and (dec[0, 1:n] == row_short[: n - 1]).all()
    empty = collate([ds[i] for i in range(4)])  # every image failed: one ignored row, no crash
    assert empty["labels"].tolist() == [[IGNORE_INDEX]] and empty["patch_images"].shape == (1, 3, 4, 4)


# ---------------------------------------------------------------------------------------------
# LiT pieces on a micro model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_config(tmp_path_factory) -> Path:
    """The micro fixture at 32 px: these tests check plumbing, not learning."""
    config = json.loads(FIXTURE_CONFIG.read_text())
    config["patch_image_size"] = 32
    path = tmp_path_factory.mktemp("config") / "micro32.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def micro(tmp_path_factory, small_config):
    from ofaconv.ofa.finetune.base import init_random_folder, load_base
    from ofaconv.ofa.finetune.recipe import ModelInit

    folder = init_random_folder(ModelInit(config=str(small_config)), tmp_path_factory.mktemp("micro") / "base")
    return load_base(folder)


def _fresh(micro):
    from ofaconv.ofa.finetune.base import load_base

    return load_base(micro.folder)


def _batch(base, n=4, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = base.image_size
    prompt = torch.tensor(base.tokenizer(base.processor.prompt)["input_ids"])
    return {
        "prompt": prompt,
        "pixels": torch.randn(n, 3, size, size, generator=g),
        "decoder_input_ids": torch.cat([torch.zeros(n, 1, dtype=torch.long), torch.randint(4, 1000, (n, t - 1), generator=g)], 1),
        "labels": torch.randint(4, 1000, (n, t), generator=g),
    }


def test_caption_loss_ignores_padding_and_smooths_like_fairseq():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 11, generator=g)
    labels = torch.tensor([[3, 4, 2, IGNORE_INDEX], [5, 2, IGNORE_INDEX, IGNORE_INDEX]])
    total, nll, count = caption_loss(logits, labels)
    lp = logits.log_softmax(-1)
    manual = -(lp[0, 0, 3] + lp[0, 1, 4] + lp[0, 2, 2] + lp[1, 0, 5] + lp[1, 1, 2])
    assert count == 5 and torch.allclose(total, manual) and torch.allclose(nll, manual)
    # padding positions may hold anything: changing their logits changes nothing
    shifted = logits.clone()
    shifted[0, 3] += 100
    shifted[1, 2:] -= 50
    assert torch.equal(caption_loss(shifted, labels)[0], total)
    eps, v = 0.1, 11
    smoothed = caption_loss(logits, labels, label_smoothing=eps)[0]
    mask = labels != IGNORE_INDEX
    sel = lp[mask]
    tgt = labels[mask]
    expected = ((1 - eps - eps / (v - 1)) * -sel.gather(1, tgt[:, None]).squeeze(1) + eps / (v - 1) * -sel.sum(-1)).sum()
    assert torch.allclose(smoothed, expected)


def test_lit_freezing_keeps_batchnorm_statistics_and_encoder_in_eval(micro):
    base = _fresh(micro)
    model = base.model
    b = _batch(base)
    probe = {"input_ids": b["prompt"][None].expand(4, -1), "patch_images": b["pixels"],
             "decoder_input_ids": b["decoder_input_ids"]}
    report = apply_freezing(model, freeze_encoder=True, freeze_word_embed=True, freeze_batchnorm=True,
                            probe=lambda m: m(**probe).logits.sum())
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert not model.get_input_embeddings().weight.requires_grad
    assert any(n.startswith("decoder.image_rel_pos_table_list") for n in report.unused)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    model.train()  # what the Trainer does every step
    assert not model.encoder.training and not model.encoder.embed_images.bn1.training and model.decoder.training
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        loss = caption_loss(model(**probe).logits, b["labels"])[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # Mutation: without the pin, train() moves the statistics (the seed's defect).
    plain = _fresh(micro).model
    plain.train()
    with torch.no_grad():
        plain(**probe)
    assert not torch.equal(plain.state_dict()["encoder.embed_images.bn1.running_mean"],
                           before["encoder.embed_images.bn1.running_mean"])


def test_pin_eval_survives_train_calls():
    module = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.Dropout(0.5))
    pin_eval(module[0])
    module.train()
    assert not module[0].training and module[1].training
    module.eval()
    module.train(True)
    assert not module[0].training


def test_first_rows():
    index = torch.tensor([2, 2, 0, 1, 0])
    assert first_rows(index, 3).tolist() == [2, 3, 0]


def test_decoder_savings_are_exact(micro):
    """Projecting each image once for all its captions, and the vocabulary only at targets, give the
    same loss and gradients as the plain forward."""
    from ofaconv.ofa.modeling import OFAEncoderOutput

    model = _fresh(micro).model
    apply_freezing(model, freeze_encoder=True, freeze_word_embed=True, freeze_batchnorm=True)
    b = _batch(micro, n=6)
    index = torch.tensor([0, 0, 1, 2, 1, 0])
    b["labels"][1, 3:] = IGNORE_INDEX  # padding
    b["labels"][4, 2:] = IGNORE_INDEX
    with torch.no_grad():
        enc = model.encoder(input_ids=b["prompt"][None].expand(3, -1), patch_images=b["pixels"][:3])
    padding = enc.padding_mask.clone()
    padding[1, -2:] = True  # image 1 has padded positions: its captions must not attend to them
    rows = OFAEncoderOutput(last_hidden_state=enc.last_hidden_state[index], padding_mask=padding[index],
                            position_embedding=enc.position_embedding[index])
    results = []
    for shared in (False, True):
        model.zero_grad()
        calls = []
        hook = model.decoder.layers[0].cross_attn.k_proj.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
        targets = b["labels"].ne(IGNORE_INDEX) if shared else None
        with shared_encoder_rows(model, index if shared else None, 3), logits_at_targets(model, targets):
            logits = model(decoder_input_ids=b["decoder_input_ids"], encoder_outputs=rows).logits
        assert logits.dim() == (2 if shared else 3)
        loss = caption_loss(logits, b["labels"])[0]
        hook.remove()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, calls[0]))
    (l0, g0, c0), (l1, g1, c1) = results
    assert (c0, c1) == (6, 3)  # the projection really ran on 3 rows
    assert torch.allclose(l0, l1, rtol=1e-6, atol=1e-6)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert torch.allclose(g0[name], g1[name], rtol=1e-4, atol=1e-6), name


# ---------------------------------------------------------------------------------------------
# Encoder cache
# ---------------------------------------------------------------------------------------------


def _fill(micro, tmp_path, data, *, prompt=None, dtype="float32", model=None):
    from ofaconv.ofa.finetune.cache import EncoderCache, encoder_fingerprint
    from ofaconv.ofa.finetune.run import _image_loader, _image_settings

    model = model or micro.model
    prompt_ids = torch.tensor(micro.tokenizer(prompt or micro.processor.prompt)["input_ids"])
    fp = encoder_fingerprint(model.get_encoder(), prompt_ids=prompt_ids.tolist(), image_settings=_image_settings(micro),
                             compute_dtype="float32")
    cache = EncoderCache(tmp_path / "cache", fp, dtype=dtype)
    items = [(data.images.cache_key(i), i) for i in data.image_ids]
    stats = cache.fill(model.get_encoder(), items, _image_loader(micro, data), prompt_ids, batch_size=4)
    return cache, prompt_ids, stats


def test_cache_loss_equals_uncached_loss(micro, tmp_path):
    from ofaconv.ofa.finetune.engine import CaptionTrainer, EngineSetup
    from ofaconv.ofa.finetune.run import _image_loader

    data = _shapes_split(tmp_path, n=5, size=micro.image_size)
    cache, prompt_ids, stats = _fill(micro, tmp_path, data)
    assert stats["computed"] == 5 and not stats["failed"]
    ds = CaptionDataset(data, tokenize_targets(micro.tokenizer, data.captions, 10, 2))
    keys = {i: data.images.cache_key(i) for i in data.image_ids}
    cached = CaptionCollator(data, pad_id=1, bos_id=0, image_source="cache",
                             cache_lookup=lambda ids: cache.get_many([keys[i] for i in ids]),
                             dummy_shape=tuple(cache.position_embedding.shape))
    pixels = CaptionCollator(data, pad_id=1, bos_id=0, image_source="pixels", load_image=_image_loader(micro, data),
                             dummy_shape=(3, micro.image_size, micro.image_size))
    items = [ds[i] for i in range(len(ds))]
    model = micro.model.eval()

    class Stub:  # the engine's forward without building a Trainer
        caption_forward = CaptionTrainer.caption_forward
        _encoder_outputs = CaptionTrainer._encoder_outputs

        def __init__(self, mode):
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=True)
            self.setup = EngineSetup(sampler=None, prompt_ids=prompt_ids, encoder_mode=mode,
                                     position_embedding=cache.position_embedding)

    with torch.no_grad():
        with_cache = Stub("cache").caption_forward(model, cached(items))
        frozen = Stub("frozen").caption_forward(model, pixels(items))
        full = Stub("full").caption_forward(model, pixels(items))
    assert with_cache[2] == frozen[2] == full[2]
    assert torch.allclose(with_cache[0], frozen[0], rtol=1e-6) and torch.allclose(with_cache[0], full[0], rtol=1e-6)


def test_cache_position_embedding_is_the_same_for_every_image(micro, tmp_path):
    data = _shapes_split(tmp_path, n=4, size=micro.image_size)
    prompt = torch.tensor(micro.tokenizer(micro.processor.prompt)["input_ids"])[None].expand(4, -1)
    from ofaconv.ofa.finetune.run import _image_loader

    load = _image_loader(micro, data)
    pixels = torch.stack([load(i) for i in data.image_ids])
    pixels[1] = torch.rand_like(pixels[1])  # very different content
    with torch.no_grad():
        out = micro.model.eval().get_encoder()(input_ids=prompt, patch_images=pixels)
    assert all(torch.equal(out.position_embedding[0], out.position_embedding[k]) for k in range(4))
    assert not torch.equal(out.last_hidden_state[0], out.last_hidden_state[1])


def test_cache_invalidated_by_encoder_or_prompt_change(micro, tmp_path):
    data = _shapes_split(tmp_path, n=3, size=micro.image_size)
    cache, _, first = _fill(micro, tmp_path, data)
    assert first["computed"] == 3
    again, _, second = _fill(micro, tmp_path, data)
    assert second["computed"] == 0 and again.fingerprint == cache.fingerprint
    _, _, prompt_changed = _fill(micro, tmp_path, data, prompt="图片里有什么?")
    assert prompt_changed["computed"] == 3
    changed = _fresh(micro).model
    with torch.no_grad():
        changed.encoder.layers[0].fc1.weight[0, 0] += 1e-3
    moved, _, weights_changed = _fill(micro, tmp_path, data, model=changed)
    assert weights_changed["computed"] == 3 and moved.fingerprint != cache.fingerprint
    with torch.no_grad():  # the shared embedding embeds the prompt: it is part of the encoder
        changed.get_input_embeddings().weight[5] += 1e-3
    assert _fill(micro, tmp_path, data, model=changed)[2]["computed"] == 3


def test_cache_fp16_storage_and_undecodable_images(micro, tmp_path):
    records = [("ok", Image.new("RGB", (16, 16), (9, 9, 9)), ["黑色"]), ("bad", Image.new("RGB", (16, 16)), ["坏"])]
    caps, tsv = write_muge_split(tmp_path, "x", records)
    lines = tsv.read_text().splitlines()
    tsv.write_text(lines[0] + "\n" + "bad\t" + base64.b64encode(b"not an image").decode() + "\n")
    data = read_muge(caps, tsv)
    cache, _, stats = _fill(micro, tmp_path, data, dtype="float16")
    assert stats["computed"] == 1 and stats["failed"] == ["bad"]
    states, masks = cache.get_many([data.images.cache_key("ok")])
    assert states.dtype == torch.float32 and masks.dtype == torch.bool
    shard = next(cache.states.dir.glob("*.safetensors"))
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as fh:
        assert fh.get_tensor(fh.keys()[0]).dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# End to end (micro model, a few steps)
# ---------------------------------------------------------------------------------------------


def _tiny_recipe(tmp_path, config, **training):
    return {
        "model_init": {"config": str(config)},
        "output_dir": str(tmp_path / "out"),
        "sampler": "image",
        "data": {"synthetic": {"train_images": 8, "eval_images": 3, "captions_per_image": 2, "image_size": 32},
                 "max_eval_images": 3},
        "generation": {"num_beams": 2, "max_len_b": 6},
        "training": {"per_device_train_batch_size": 4, "learning_rate": 1e-3, "max_steps": 4, "logging_steps": 1,
                     "save_steps": 2, "eval_strategy": "no", "disable_tqdm": True, "seed": 0, **training},
    }


def _losses(out_dir: Path) -> dict:
    lines = (out_dir / "training_log.jsonl").read_text().splitlines()
    return {e["step"]: e["loss"] for e in map(json.loads, lines) if "loss" in e}


def test_finetune_writes_a_publishable_folder_and_resumes_exactly(tmp_path, small_config):
    from ofaconv.ofa.finetune import finetune
    from ofaconv.hub.push import push_folder
    from ofaconv.core.report import validate_report

    result = finetune(_tiny_recipe(tmp_path, small_config))
    out = result.output_dir
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["kind"] == "finetune" and report["passed"] and validate_report(out) == []
    assert {c["name"] for c in report["checks"]} == {"reload-logits", "frozen-unchanged", "finite-weights"}
    assert report["training"]["encoder"] == "cache" and report["training"]["global_steps"] == 4
    assert {"eval_loss", "eval_bleu4", "eval_cider_d", "eval_exact_match"} <= set(report["training"]["metrics"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
                 "processor_config.json", "generation_config.json", "README.md", "modeling_ofa.py"):
        assert (out / name).is_file(), name
    assert "finetuned with ofaconv" in (out / "README.md").read_text()
    assert push_folder(out, "someone/micro-caption", dry_run=True, out=io.StringIO()) is None
    from ofaconv.cli import main

    draw_shape("红色", "圆形", 32).save(tmp_path / "red.png")
    args = ["caption", str(out), str(tmp_path / "red.png"), "--out", str(tmp_path / "c.jsonl"), "--beams", "2",
            "--max-len", "6", "--no-progress"]
    assert main(args) == 0
    record = json.loads((tmp_path / "c.jsonl").read_text().splitlines()[0])
    assert isinstance(record["caption"], str) and "error" not in record

    import ofaconv  # noqa: F401
    from transformers import AutoModelForSeq2SeqLM, AutoProcessor

    model = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    inputs = processor(images=[draw_shape("红色", "圆形", 32)])
    captions = processor.batch_decode(model.generate(**inputs, num_beams=2, max_len_b=6))
    assert len(captions) == 1 and isinstance(captions[0], str)

    straight = _losses(out)
    assert sorted(straight) == [1, 2, 3, 4] and all(math.isfinite(v) for v in straight.values())
    # Resume from the step-2 checkpoint into a fresh output: steps 3 and 4 repeat exactly.
    resumed_recipe = _tiny_recipe(tmp_path, small_config)
    resumed_recipe["output_dir"] = str(tmp_path / "resumed")
    resumed_recipe["checkpoint_dir"] = str(tmp_path / "out-checkpoints")
    resumed_recipe["resume_from_checkpoint"] = str(tmp_path / "out-checkpoints" / "checkpoint-2")
    resumed = _losses(finetune(resumed_recipe).output_dir)
    assert resumed[3] == straight[3] and resumed[4] == straight[4]


def test_full_finetuning_trains_the_encoder(tmp_path, small_config):
    from ofaconv.ofa.finetune import finetune

    recipe = _tiny_recipe(tmp_path, small_config, max_steps=2, save_steps=100)
    recipe.update(freeze_encoder=False, freeze_word_embed=False, sampler="random")
    recipe["data"]["synthetic"]["eval_images"] = 0
    result = finetune(recipe)
    report = result.report
    assert report["training"]["encoder"] == "full" and report["passed"]
    assert report["training"]["freezing"]["trainable_parameters"] > 5_000_000
    from safetensors.torch import load_file

    before = load_file(str(tmp_path / "out-checkpoints" / "base-model" / "model.safetensors"))
    after = load_file(str(result.output_dir / "model.safetensors"))
    assert not torch.equal(before["encoder.layers.0.fc1.weight"], after["encoder.layers.0.fc1.weight"])
    assert torch.equal(before["encoder.embed_images.bn1.running_mean"], after["encoder.embed_images.bn1.running_mean"])


def test_mixed_precision_run_writes_a_folder_that_passes_its_checks(tmp_path, small_config):
    """The reload check compares fp32 with fp32: the trained model is checked without the
    Trainer's autocast wrapper (with it, bf16 logits were compared with the reloaded fp32 ones)."""
    from ofaconv.ofa.finetune import finetune

    recipe = _tiny_recipe(tmp_path, small_config, max_steps=2, save_steps=100, bf16=True)
    recipe["data"]["synthetic"]["eval_images"] = 0
    report = finetune(recipe).report
    checks = {c["name"]: c for c in report["checks"]}
    assert report["passed"] and checks["reload-logits"]["value"] == 0.0
    assert report["training"]["settings"]["training"]["bf16"] is True


def test_cli_reports_bad_recipe_on_one_line(tmp_path, capsys):
    from ofaconv.cli import main

    (tmp_path / "r.yaml").write_text("model: x\noutput_dir: y\nfreeze_encodr: true\n")
    assert main(["finetune", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "freeze_encodr" in err and "freeze_encoder" in err


@pytest.mark.parametrize("cache", [False, True])
def test_undecodable_images_are_counted_and_skipped(tmp_path, small_config, cache):
    """A corrupt image is reported with its line; in the uncached run a batch holding only that
    image becomes an ignored row instead of a crash."""
    from ofaconv.ofa.finetune import finetune

    records = [(f"i{k}", draw_shape("红色", "圆形", 32), ["红色的圆形", "一个红色的圆形"]) for k in range(4)]
    caps, tsv = write_muge_split(tmp_path / "data", "train", records)
    lines = tsv.read_text().splitlines()
    lines[2] = "i2\t" + base64.urlsafe_b64encode(b"\x89PNG truncated").decode()
    tsv.write_text("\n".join(lines) + "\n")
    with open(caps, "a", encoding="utf-8") as fh:
        fh.write("{broken json\n")
    recipe = _tiny_recipe(tmp_path, small_config, max_steps=4, per_device_train_batch_size=2, save_steps=100)
    recipe["data"] = {"format": "muge", "train": {"captions": str(caps), "images": str(tsv)}}
    recipe["encoder_cache"] = {"enabled": cache}
    report = finetune(recipe).report
    skipped = report["training"]["data"]["skipped"]
    assert skipped["undecodable_image"]["count"] >= 1 and skipped["undecodable_image"]["first"] == ["train.tsv:3"]
    assert skipped["malformed_line"] == {"count": 1, "first": ["train.jsonl:5"]}
    assert report["training"]["encoder"] == ("cache" if cache else "frozen")
    assert report["training"]["data"]["train_pairs"] == (6 if cache else 8)
    assert report["passed"] and report["training"]["global_steps"] == 4


def test_eval_strategy_without_held_out_data_does_not_apply(tmp_path):
    """A recipe whose eval_strategy asks for evaluation but which has no held-out data (data.eval:
    null, as when the shipped recipe is run without MUGE's valid split) trains without evaluating
    and says so; with held-out data the Trainer gets the eval set (engine.CaptionTrainer)."""
    from ofaconv.ofa.finetune.run import training_arguments

    recipe = load_recipe({"model": "m", "output_dir": str(tmp_path / "o"),
                          "data": {"train": {"captions": "c.jsonl", "images": "i.tsv"}},
                          "training": {"eval_strategy": "epoch"}})
    args, notes = training_arguments(recipe)
    assert args.eval_strategy == "no" and any("eval_strategy 'epoch' does not apply" in n for n in notes)
