"""CLIP towers benchmark (CPU): embedding throughput vs a plain per-batch transformers forward,
and LiT epoch time with the locked image tower cached vs recomputed every epoch.

    python bench/clip.py            # base size (ViT-B/32 + BERT-base), batch 64
    python bench/clip.py --smoke    # micro models, seconds (CI)

Baselines are measured in the same run. The plain baseline is what users write by hand: the
stock model, processor + tokenizer called per batch with padding to the max length.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


def _time(fn, repeat):
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    from transformers import AutoModel, AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from ofaconv.clip import ClipTowers, synth
    from ofaconv.clip.assemble import init_bertclip
    from ofaconv.clip.data import DataStats, read_csv_pairs
    from ofaconv.clip.train import load_recipe, train

    size = "micro" if args.smoke else "base"
    batch = 8 if args.smoke else args.batch
    repeat = 2 if args.smoke else 3
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        init_bertclip(synth.write_openai_clip(tmp / "clip", size), synth.write_bert(tmp / "bert", size), tmp / "model")
        image_size = 32 if args.smoke else 224
        csv_path = synth.write_caption_pairs(tmp / "data", per_class=(2 if args.smoke else 8), image_size=image_size)
        pairs, store = read_csv_pairs(csv_path, None, DataStats())
        images = [store.load(p.image_id) for p in pairs][:batch]
        texts = [p.text + "。" + "图片" * (i % 5) for i, p in enumerate(pairs)][:batch]
        towers = ClipTowers.from_pretrained(tmp / "model")

        plain = AutoModel.from_pretrained(str(tmp / "model")).eval()
        proc = AutoProcessor.from_pretrained(str(tmp / "model"))

        def plain_images():
            with torch.no_grad():
                px = proc(images=images, return_tensors="pt")["pixel_values"]
                return plain.get_image_features(pixel_values=px)

        def plain_texts():
            with torch.no_grad():
                tok = proc.tokenizer(texts, padding="max_length", max_length=100, truncation=True, return_tensors="pt")
                return plain.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])

        t_pi, t_oi = _time(plain_images, repeat), _time(lambda: towers.encode_images(images, batch_size=batch), repeat)
        t_pt, t_ot = _time(plain_texts, repeat), _time(lambda: towers.encode_texts(texts, batch_size=batch), repeat)
        print(f"size={size} batch={batch} threads={torch.get_num_threads()}")
        print(f"images/s  plain {batch / t_pi:9.1f}   ofaconv {batch / t_oi:9.1f}   ratio {t_pi / t_oi:5.2f}x")
        print(f"texts/s   plain {batch / t_pt:9.1f}   ofaconv {batch / t_ot:9.1f}   ratio {t_pt / t_ot:5.2f}x")

        times = {}
        for cached in (False, True):
            recipe_path = tmp / f"r{cached}.yaml"
            import yaml

            recipe_path.write_text(yaml.safe_dump({
                "model": str(tmp / "model"), "output_dir": str(tmp / f"run{cached}"), "max_length": 32,
                "data": {"train": {"csv": str(csv_path)}}, "lit": {"cache_image_features": cached},
                "training": {"per_device_train_batch_size": batch, "num_train_epochs": args.epochs, "use_cpu": True,
                             "dataloader_num_workers": 0, "disable_tqdm": True, "learning_rate": 1e-4,
                             "logging_steps": 10000}}, allow_unicode=True))
            t = time.perf_counter()
            train(load_recipe(recipe_path))
            times[cached] = (time.perf_counter() - t) / args.epochs
        print(f"LiT epoch ({len(pairs)} pairs, {args.epochs} epochs, cache fill included)  uncached "
              f"{times[False]:7.2f}s   cached {times[True]:7.2f}s   ratio {times[False] / times[True]:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
