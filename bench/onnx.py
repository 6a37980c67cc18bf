"""onnxruntime vs PyTorch on this machine, same run: OFA captioning and CLIP embedding.

Each model is synthesised, converted, exported with ``ofaconv export onnx`` (whose parity checks
must pass), then both runtimes process the same inputs on CPU in fp32 with the same number of
threads (``--threads``, default 1), one warm-up call each, then ``--repeat`` timed batches:
  OFA captions   PyTorch ``model.generate`` (the folder's settings: beam 5, max_len_b 16,
                 no_repeat_ngram 3) vs ``OnnxCaptioner.generate`` (encoder.onnx + decoder.onnx and
                 the numpy search); the captions are compared token for token
  CLIP images    ``ClipTowers.encode_pixels`` vs vision.onnx (normalised image embeddings)
  CLIP texts     ``ClipTowers.encode_token_batch`` vs text.onnx (normalised text embeddings)

  python bench/onnx.py --smoke                   # micro models, seconds (CI)
  python bench/onnx.py                           # micro models, bigger batches
  python bench/onnx.py --variant ofa-base --size full --clip-arch ViT-B-16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder is sys.path[0], where its name would shadow the onnx package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _timed(fn, repeat: int) -> tuple[float, object]:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        result = fn()
    return time.perf_counter() - start, result


def bench_ofa(work: Path, variant: str, size: str, batch: int, repeat: int, threads: int) -> dict:
    from ofaconv.core.export import export_onnx
    from ofaconv.ofa.convert import convert_checkpoint
    from ofaconv.ofa.modeling import OFAForConditionalGeneration
    from ofaconv.ofa.onnx import OnnxCaptioner
    from ofaconv.ofa.synth import write_synthetic_checkpoint

    src = write_synthetic_checkpoint(work / f"{variant}.pt", variant, size=size, optimizer_state=False)
    folder, out = work / f"{variant}-hf", work / f"{variant}-onnx"
    convert_checkpoint(src, folder)
    export_onnx(folder, out, threads=threads)
    model = OFAForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    captioner = OnnxCaptioner(out, threads=threads)
    side = model.config.patch_image_size
    pixels = np.random.default_rng(0).uniform(-1, 1, (batch, 3, side, side)).astype(np.float32)
    ids = captioner.prompt_ids(batch)
    with torch.inference_mode():
        torch_s, expected = _timed(lambda: model.generate(input_ids=torch.from_numpy(ids),
                                                          patch_images=torch.from_numpy(pixels)).numpy(), repeat)
    onnx_s, got = _timed(lambda: captioner.generate(ids, pixels), repeat)
    same = int((got == expected).all(axis=1).sum()) if got.shape == expected.shape else 0
    beams = captioner.settings["search"]["beam_size"]
    return {"what": f"{variant} ({size}) captions, beam {beams}", "unit": "images/s", "torch": batch * repeat / torch_s,
            "onnx": batch * repeat / onnx_s, "check": f"{same}/{batch} captions identical", "ok": same == batch}


def bench_clip(work: Path, arch: str, batch: int, repeat: int, threads: int) -> list[dict]:
    from ofaconv.clip import synth
    from ofaconv.clip.convert import PROBE_TEXTS, convert, probe_images
    from ofaconv.clip.towers import ClipTowers
    from ofaconv.core.export import export_onnx, inference_session

    src = synth.write_cnclip_pt(work / f"{arch}.pt", arch)
    folder, out = work / f"{arch}-hf", work / f"{arch}-onnx"
    convert(src, folder, vocab=str(synth.write_vocab(work / "vocab.txt")))
    export_onnx(folder, out, threads=threads)
    towers = ClipTowers.from_pretrained(folder)
    vision, text = inference_session(out / "vision.onnx", threads), inference_session(out / "text.onnx", threads)
    pixels = towers.preprocess_images(probe_images(batch))
    tokens = towers.tokenize([PROBE_TEXTS[i % len(PROBE_TEXTS)] for i in range(batch)])
    feeds = {k: tokens[k].numpy() for k in ("input_ids", "attention_mask")}
    rows = []
    for what, run_torch, run_onnx in (
        ("images", lambda: towers.encode_pixels(pixels).numpy(), lambda: vision.run(None, {"pixel_values": pixels.numpy()})[0]),
        ("texts", lambda: towers.encode_token_batch(tokens).numpy(), lambda: text.run(None, feeds)[0]),
    ):
        torch_s, expected = _timed(run_torch, repeat)
        onnx_s, got = _timed(run_onnx, repeat)
        diff = float(np.abs(got - expected).max())
        rows.append({"what": f"Chinese-CLIP {arch} (micro) {what}", "unit": f"{what}/s", "torch": batch * repeat / torch_s,
                     "onnx": batch * repeat / onnx_s, "check": f"max abs diff {diff:.1e}", "ok": diff <= 1e-4})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="micro models, small batches: seconds (CI)")
    ap.add_argument("--variant", default="ofa-tiny", help="OFA variant to synthesise (default ofa-tiny)")
    ap.add_argument("--size", choices=["micro", "full"], default="micro", help="OFA weights' size (default micro)")
    ap.add_argument("--clip-arch", default="ViT-B-16", help="Chinese-CLIP architecture, micro size (default ViT-B-16)")
    ap.add_argument("--batch", type=int, default=None, help="images (texts) per call (default 8, smoke 2)")
    ap.add_argument("--repeat", type=int, default=None, help="timed calls per runtime (default 5, smoke 1)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and onnxruntime threads (default 1: the CI machine's 2 cores are shared)")
    args = ap.parse_args(argv)
    batch = args.batch or (2 if args.smoke else 8)
    repeat = args.repeat or (1 if args.smoke else 5)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory(prefix="ofaconv-bench-onnx-") as tmp:
        work = Path(tmp)
        rows = [bench_ofa(work, args.variant, args.size, batch, repeat, args.threads),
                *bench_clip(work, args.clip_arch, batch, repeat, args.threads)]
    print(f"\nCPU fp32, {args.threads} thread(s), batch {batch}, {repeat} timed call(s) after a warm-up\n")
    print("| workload | PyTorch | onnxruntime | onnxruntime / PyTorch | check |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['torch']:.1f} {r['unit']} | {r['onnx']:.1f} {r['unit']} | "
              f"{r['onnx'] / r['torch']:.2f}x | {r['check']} |")
    if not all(r["ok"] for r in rows):
        print("\nonnxruntime's results differ from PyTorch's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
