"""CLIP towers benchmark (CPU): embedding throughput against plain transformers code, and LiT
epoch time with the locked image tower cached against recomputing it every step.

    python bench/clip.py            # base size (ViT-B/32 + BERT-base, the released BertCLIP), batch 64
    python bench/clip.py --smoke    # micro models, seconds (CI)
    python bench/clip.py --lit-models cnclip-vit-l-14   # only the LiT run on Chinese-CLIP ViT-L/14

Every baseline is measured in the same run. Embedding calls are interleaved with the baseline and
each figure is the best of ``--repeat`` calls (on a shared machine the minimum is the least
disturbed run); both paths run under the same torch thread settings.

* Embedding baseline: what users write by hand: ``AutoModel`` + ``AutoProcessor``, the processor
  called per batch (transformers' default image backend), texts tokenized per batch in the given
  order with the tokenizer's ``padding=True`` (longest in the batch) and truncation at the model's
  training length. ofaconv's extra for texts is the length sort (less padding per batch).
* LiT: three separate numbers, all from the real ``ofaconv.clip.train.train`` on the HF Trainer,
  timed per epoch by a ``TrainerCallback``: the uncached epoch (decode, pre-process and locked
  tower forward every step, as the seed recipe does), the one-time cache fill, and the
  steady-state cached epoch (cache already filled). The first epoch of each run is warm-up and is
  dropped; the best of the rest is reported. The per-step phase split (data / forward+backward /
  optimizer) says where the remaining time goes and bounds what any image-side saving can give.
  LiT runs on each of ``--lit-models``: the released BertCLIP (ViT-B/32 + BERT-base) and the
  released Chinese-CLIP ViT-L/14 (+ RoBERTa-wwm-base; Chinese-CLIP's ``--freeze-vision``), both
  synthetic at full size, same pairs and captions. What caching can give is set by how much of an
  uncached step the locked tower is, so the two sizes bracket it.
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import TrainerCallback

FILLER = "画面中央的物体颜色鲜艳，边缘清晰，背景是带有细小噪点的灰色平面，光线均匀，没有其他物体遮挡。"


def caption(text: str, i: int) -> str:
    """Caption lengths spread like real captions (about 10 to 48 tokens, deterministic)."""
    return text + "，" + FILLER[: (i * 37) % len(FILLER)]


def best_of(fns: dict, repeat: int) -> dict:
    """Interleaved calls; seconds of the fastest call per name (the first call doubles as warm-up)."""
    times = defaultdict(list)
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: min(ts) for name, ts in times.items()}


def chunks(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


def bench_embeddings(model_dir: Path, images, texts, batch: int, repeat: int) -> None:
    from transformers import AutoModel, AutoProcessor

    from ofaconv.clip import ClipTowers

    towers = ClipTowers.from_pretrained(model_dir)
    plain = AutoModel.from_pretrained(str(model_dir)).eval()
    proc = AutoProcessor.from_pretrained(str(model_dir))
    max_length = towers.max_length

    def plain_images():
        with torch.no_grad():
            return torch.cat([plain.get_image_features(
                pixel_values=proc(images=c, return_tensors="pt")["pixel_values"]).pooler_output for c in chunks(images, batch)])

    def plain_texts():
        out = []
        with torch.no_grad():
            for c in chunks(texts, batch):
                tok = proc.tokenizer(c, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                out.append(plain.get_text_features(input_ids=tok["input_ids"],
                                                   attention_mask=tok["attention_mask"]).pooler_output)
        return torch.cat(out)

    t = best_of({
        "plain_images": plain_images,
        "ofaconv_images": lambda: towers.encode_images(images, batch_size=batch),
        "plain_pre": lambda: [proc(images=c, return_tensors="pt") for c in chunks(images, batch)],
        "ofaconv_pre": lambda: [towers.preprocess_images(c) for c in chunks(images, batch)],
    }, repeat)
    t.update(best_of({
        "plain_texts": plain_texts,
        "ofaconv_texts": lambda: towers.encode_texts(texts, batch_size=batch),
    }, repeat))
    lengths = [len(ids) for ids in proc.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    pad_plain = sum(len(c) * max(c) for c in chunks(lengths, batch))
    pad_ofa = sum(len(c) * max(c) for c in chunks(sorted(lengths), batch))

    n_img, n_txt = len(images), len(texts)
    print(f"\nEmbedding throughput: {n_img} images, {n_txt} texts of {min(lengths)}-{max(lengths)} tokens "
          f"(mean {statistics.mean(lengths):.1f}), batch {batch}, best of {repeat}")
    print(f"  {'':28s} {'plain /s':>9s} {'ofaconv /s':>11s} {'ratio':>7s}")
    for name, key, n in (("images", "images", n_img), ("texts", "texts", n_txt)):
        tp, to = t[f"plain_{key}"], t[f"ofaconv_{key}"]
        print(f"  {name:28s} {n / tp:9.1f} {n / to:11.1f} {tp / to:6.2f}x")
    print(f"  {'image pre-processing / batch':28s} {1000 * t['plain_pre'] * batch / n_img:7.1f}ms "
          f"{1000 * t['ofaconv_pre'] * batch / n_img:9.1f}ms   {type(proc.image_processor).__name__} vs "
          f"{type(towers.image_processor).__name__}; the rest is the same vision forward")
    print(f"  {'text tokens incl. padding':28s} {pad_plain:9d} {pad_ofa:11d}   batches in given order vs length-sorted")


class EpochClock(TrainerCallback):
    """Wall time per epoch and per-step phases (data, forward+backward, optimizer, other)."""

    def __init__(self):
        self.epochs = []  # (seconds, {phase: seconds}, steps)

    def _lap(self, phase=None):
        now = time.perf_counter()
        if phase is not None:
            self.phases[phase] += now - self.mark
        self.mark = now

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.phases, self.steps, self.start = defaultdict(float), 0, time.perf_counter()
        self._lap()

    def on_step_begin(self, args, state, control, **kwargs):
        self._lap("data")  # dataset items + collate (DataLoader fetch)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._lap("fwd+bwd")  # includes gradient-norm clipping

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._lap("optimizer")

    def on_step_end(self, args, state, control, **kwargs):
        self._lap("other")  # scheduler, zero_grad
        self.steps += 1

    def on_epoch_end(self, args, state, control, **kwargs):
        self.epochs.append((time.perf_counter() - self.start, dict(self.phases), self.steps))


def steady(clock):
    """Best epoch after the warm-up epoch: (seconds, phases per step)."""
    runs = clock.epochs[1:] or clock.epochs
    secs, phases, steps = min(runs, key=lambda r: r[0])
    return secs, {k: v / max(steps, 1) for k, v in phases.items()}, steps


def bench_lit(tmp: Path, model_dir: Path, csv_path: Path, n_pairs: int, batch: int, epochs: int, label: str) -> None:
    import yaml

    from ofaconv.clip import ClipTowers
    from ofaconv.clip.data import read_pairs
    from ofaconv.clip.train import load_recipe, open_image_cache, precompute_image_features, train

    def run(name, cached, cache_dir=None):
        name = f"{model_dir.name}-{name}"
        recipe_path = tmp / f"{name}.yaml"
        recipe_path.write_text(yaml.safe_dump({
            "model": str(model_dir), "output_dir": str(tmp / name), "data": {"train": {"csv": str(csv_path)}},
            "lit": {"cache_image_features": cached, "cache_dir": str(cache_dir) if cache_dir else None},
            "training": {"per_device_train_batch_size": batch, "num_train_epochs": epochs, "use_cpu": True,
                         "dataloader_num_workers": 0, "disable_tqdm": True, "learning_rate": 1e-4,
                         "logging_steps": 10000, "seed": 0}}, allow_unicode=True))
        clock = EpochClock()
        t = time.perf_counter()
        train(load_recipe(recipe_path), callbacks=[clock])
        total = time.perf_counter() - t
        return clock, total - sum(e[0] for e in clock.epochs)

    uncached, over_u = run("uncached", False)

    cache_dir = tmp / f"{model_dir.name}-cache"
    towers = ClipTowers.from_pretrained(model_dir)
    t = time.perf_counter()
    cache = open_image_cache(towers, cache_dir, "float16")
    t_fingerprint = time.perf_counter() - t
    pairs, store, _ = read_pairs({"csv": str(csv_path)})
    unique = list(dict.fromkeys(p.image_id for p in pairs))
    t = time.perf_counter()
    precompute_image_features(towers, store, unique, cache, batch_size=batch)
    t_fill = time.perf_counter() - t
    del towers, cache

    cached, over_c = run("cached", True, cache_dir)

    (u, pu, steps), (c, pc, _) = steady(uncached), steady(cached)
    image_share = 1 - (c - pc.get("data", 0) * steps) / u  # what any image-side saving could remove
    payoff = math.floor(t_fill / (u - c)) + 1 if u > c else None
    print(f"\nLiT epoch, {label}: {n_pairs} pairs, batch {batch}, {steps} step(s)/epoch, {epochs} epochs per run "
          f"(first is warm-up; best of the rest)")
    print(f"  {'uncached epoch':28s} {u:9.2f} s   decode + pre-process + locked tower forward every step")
    print(f"  {'cache fill, once':28s} {t_fill:9.2f} s   {len(unique)} images to fp16; + {t_fingerprint:.2f} s "
          f"weight fingerprint at every run start")
    print(f"  {'cached epoch, steady state':28s} {c:9.2f} s   cache already filled")
    print(f"  {'ratio uncached / cached':28s} {u / c:9.2f} x   target >= 5x: {'reached' if u / c >= 5 else 'NOT reached'}")
    print(f"  {'image side of uncached epoch':28s} {100 * image_share:9.0f} %   all a cache can remove; "
          f"5x needs >= 80 %, the rest is text tower fwd+bwd + optimizer")
    print(f"  {'cache pays off from epoch':28s} {payoff if payoff else 'never':>9}     fill + E cached < E uncached")
    print(f"  {'per step, seconds':28s} {'data':>9s} {'fwd+bwd':>9s} {'optimizer':>9s} {'other':>9s}")
    for name, ph in (("uncached", pu), ("cached", pc)):
        print(f"    {name:26s} " + " ".join(f"{ph.get(k, 0):9.3f}" for k in ("data", "fwd+bwd", "optimizer", "other")))
    print(f"  outside the epochs (load, image check / fingerprint, Trainer setup, export): "
          f"uncached run {over_u:.1f} s, cached run {over_c:.1f} s")


LIT_MODELS = {
    "bertclip": "BertCLIP (ViT-B/32 + BERT-base)",
    "cnclip-vit-l-14": "Chinese-CLIP ViT-L/14 (+ RoBERTa-wwm-base)",
}


def build_lit_model(name: str, tmp: Path, size: str) -> Path:
    """A CLIP package folder for the LiT runs (synthetic weights at ``size``)."""
    from ofaconv.clip import synth
    from ofaconv.clip.assemble import init_bertclip
    from ofaconv.clip.convert import convert

    out = tmp / name
    if name == "bertclip":
        if not out.exists():
            init_bertclip(synth.write_openai_clip(tmp / "clip", size), synth.write_bert(tmp / "bert", size), out)
        return out
    micro = size == "micro"
    src = synth.write_cnclip_pt(tmp / "cnclip-src", "ViT-L-14", micro=micro)
    vocab = synth.write_vocab(tmp / "cnclip-src" / "vocab.txt") if micro else None
    convert(src, out, verify=False, vocab=None if vocab is None else str(vocab))
    src.unlink()  # 1.6 GB at full size
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="micro models, seconds (CI)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=64, help="LiT training pairs (base size)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per LiT run, the first is warm-up (3 smoke, 2 base)")
    ap.add_argument("--repeat", type=int, default=2, help="timed embedding calls per path (best is kept)")
    ap.add_argument("--lit-models", default=",".join(LIT_MODELS),
                    help=f"LiT runs, comma-separated from: {', '.join(LIT_MODELS)}")
    ap.add_argument("--no-embeddings", action="store_true", help="skip the embedding throughput part")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's; 1 with --smoke)")
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    # Micro models run hundreds of tiny parallel regions; on a loaded runner each one can wait a
    # scheduler slice for its second thread, which swamps the timing. One thread keeps smoke stable.
    threads = args.threads or (1 if args.smoke else None)
    if threads:
        torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from ofaconv.clip import synth
    from ofaconv.clip.data import DataStats, read_csv_pairs

    lit_models = [m for m in args.lit_models.split(",") if m]
    unknown = [m for m in lit_models if m not in LIT_MODELS]
    if unknown:
        ap.error(f"unknown --lit-models {unknown[0]!r} (choose from {', '.join(LIT_MODELS)})")

    size = "micro" if args.smoke else "base"
    batch = 8 if args.smoke else args.batch
    n_pairs = 2 * batch if args.smoke else args.pairs
    repeat = 30 if args.smoke else args.repeat
    image_size = 32 if args.smoke else 224
    print(f"size={size} batch={batch} threads={torch.get_num_threads()} torch={torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = synth.write_caption_pairs(tmp / "data", per_class=math.ceil(n_pairs / 8), image_size=image_size)
        with open(src, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))[:n_pairs]
        for i, row in enumerate(rows):
            row["text"] = caption(row["text"], i)
        csv_path = src.with_name("pairs_long.csv")
        with open(csv_path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

        pairs, store = read_csv_pairs(csv_path, None, DataStats())
        images = [store.load(p.image_id) for p in pairs[:batch]]
        texts = [caption(synth.caption_classes()[i % 8][0], i) for i in range(2 * batch)]
        if not args.no_embeddings:
            bench_embeddings(build_lit_model("bertclip", tmp, size), images, texts, batch, repeat)
        for name in lit_models:
            model_dir = build_lit_model(name, tmp, size)
            bench_lit(tmp, model_dir, csv_path, len(pairs), batch, args.epochs or (3 if args.smoke else 2),
                      LIT_MODELS[name] + (" micro" if args.smoke else ""))
            shutil.rmtree(model_dir)
            shutil.rmtree(tmp / f"{name}-cache", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
