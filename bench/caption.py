"""Captioning throughput: ofaconv's cached fairseq search vs the reference generator, same run.

Both sides caption the same batch of images with the same settings (beam 5, max_len_b 16,
no_repeat_ngram 3, min_len 1) on CPU with ``torch.set_flush_denormal(True)`` and the same number
of torch threads (``--threads``, default 1):
  ofaconv    the converted folder, ``model.generate`` (key/value cache, fairseq's beam search)
  reference  ``ofaconv.ofa.reference`` on the raw fairseq state dict: fairseq's SequenceGenerator
             recomputing the whole prefix every step (no cache)
Each side runs in its own child process (one warm-up call, then the timed batches); images/s and
the child's peak RSS (VmHWM) are recorded, and the top hypotheses of both sides are
compared token for token.

  python bench/caption.py --smoke        # micro fixtures, seconds (CI)
  python bench/caption.py                # OFA-Base and OFA-CN-Base size synthetic weights
Target (issue 3): ofaconv >= 3x the reference's images/s on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# children
# ---------------------------------------------------------------------------------------------


def _settings(args) -> dict:
    return {"beam": args.beam, "max_len_b": args.max_len_b, "min_len": 1, "no_repeat_ngram_size": 3}


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM). Not wait4's ru_maxrss: Linux carries the forking parent's
    high-water mark across exec, and the parent here has converted checkpoints."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_ofaconv(args) -> dict:
    from ofaconv.ofa.modeling import OFAForConditionalGeneration

    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    inputs = torch.load(args.inputs)
    model = OFAForConditionalGeneration.from_pretrained(args.folder, dtype=torch.float32).eval()
    s = _settings(args)

    def run(batch, max_len_b):
        return model.generate(**batch, num_beams=s["beam"], max_len_a=0, max_len_b=max_len_b, min_len=s["min_len"],
                              no_repeat_ngram_size=s["no_repeat_ngram_size"], lenpen=1.0, fairseq_temperature=1.0)

    with torch.inference_mode():
        run({k: v[:1] for k, v in inputs.items()}, 2)  # warm-up
        start = time.perf_counter()
        rows = []
        for _ in range(args.repeat):
            out = run(inputs, s["max_len_b"])
        seconds = time.perf_counter() - start
    for row in out.tolist():
        row = row[1:]
        rows.append(row[: row.index(2) + 1] if 2 in row else row)
    return {"seconds": seconds, "images": args.repeat * len(inputs["input_ids"]), "tokens": rows}


def child_reference(args) -> dict:
    from ofaconv.ofa.checkpoint import load_checkpoint, read_flags
    from ofaconv.ofa.reference import FairseqReference, SequenceGenerator

    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    inputs = torch.load(args.inputs)
    ckpt = load_checkpoint(args.checkpoint)
    reference = FairseqReference(ckpt.state_dict, {**ckpt.task_args, **ckpt.model_args, **read_flags(ckpt)})
    s = _settings(args)

    def run(batch, max_len_b):
        generator = SequenceGenerator(reference, beam_size=s["beam"], max_len_b=max_len_b, min_len=s["min_len"],
                                      no_repeat_ngram_size=s["no_repeat_ngram_size"])
        return generator.generate(batch["input_ids"], batch["patch_images"], batch["patch_masks"])

    with torch.inference_mode():
        run({k: v[:1] for k, v in inputs.items()}, 2)  # warm-up
        start = time.perf_counter()
        for _ in range(args.repeat):
            hypos = run(inputs, s["max_len_b"])
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": args.repeat * len(inputs["input_ids"]),
            "tokens": [h[0]["tokens"].tolist() for h in hypos]}


# ---------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------


def run_child(role: str, common: list[str]) -> dict:
    """Run one side in a fresh interpreter; returns its result (with the child's peak RSS)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = handle.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", role, "--result", result_path, *common]
    try:
        done = subprocess.run(cmd, cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(f"{role} child failed with exit code {done.returncode}")
        return json.loads(Path(result_path).read_text())
    finally:
        os.unlink(result_path)


def make_inputs(folder: Path, batch: int, size: int, path: Path) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    coarse = torch.rand(batch, 3, 8, 8, generator=gen) * 2 - 1
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    text = processor.tokenizer([processor.prompt] * batch, return_tensors="pt")
    torch.save({"input_ids": text["input_ids"], "patch_images": images.contiguous(),
                "patch_masks": torch.ones(batch, dtype=torch.bool)}, path)


def prepare(variant: str, size: str, work: Path) -> tuple[Path, Path]:
    from ofaconv.ofa.convert import convert_checkpoint
    from ofaconv.ofa.synth import write_synthetic_checkpoint

    src = work / f"{variant}-{size}.pt"
    folder = work / f"{variant}-{size}-hf"
    if not src.exists():
        write_synthetic_checkpoint(src, variant, size=size, optimizer_state=False)
    if not folder.exists():
        convert_checkpoint(src, folder)
    return src, folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="micro fixtures, tiny batch: seconds")
    parser.add_argument("--variants", default="ofa-base,ofa-cn-base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--max-len-b", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=1, help="timed batches per side")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per side (default 1: the CI machine's 2 cores are shared)")
    parser.add_argument("--work", help="keep checkpoints/folders here (default: a temporary directory)")
    parser.add_argument("--child", choices=["ofaconv", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        result = (child_ofaconv if args.child == "ofaconv" else child_reference)(args)
        result["peak_rss_mib"] = peak_rss_mib()
        Path(args.result).write_text(json.dumps(result))
        return 0

    size = "full"
    if args.smoke:
        size, args.batch, args.beam, args.max_len_b, args.image_size = "micro", 2, 2, 4, 128
    work_ctx = tempfile.TemporaryDirectory(prefix="ofaconv-bench-caption-") if not args.work else None
    work = Path(args.work or work_ctx.name)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for variant in args.variants.split(","):
            src, folder = prepare(variant, size, work)
            inputs = work / f"{variant}-{size}-inputs.pt"
            make_inputs(folder, args.batch, args.image_size, inputs)
            common = ["--folder", str(folder), "--checkpoint", str(src), "--inputs", str(inputs),
                      "--beam", str(args.beam), "--max-len-b", str(args.max_len_b), "--repeat", str(args.repeat),
                      "--threads", str(args.threads)]
            ours = run_child("ofaconv", common)
            ref = run_child("reference", common)
            ours_ips = ours["images"] / ours["seconds"]
            ref_ips = ref["images"] / ref["seconds"]
            same = sum(a == b for a, b in zip(ours["tokens"], ref["tokens"]))
            rows.append((variant, size, ours_ips, ref_ips, ours["peak_rss_mib"], ref["peak_rss_mib"], same,
                         len(ref["tokens"])))
    finally:
        if work_ctx is not None:
            work_ctx.cleanup()

    threads = args.threads
    print(f"\nbatch {args.batch}, beam {args.beam}, max_len_b {args.max_len_b}, {args.image_size} px, CPU fp32, "
          f"{threads} threads, flush denormals; reference = fairseq SequenceGenerator without cache\n")
    print("| model | ofaconv img/s | reference img/s | speedup | ofaconv peak RSS | reference peak RSS | identical top hypotheses |")
    print("|---|---|---|---|---|---|---|")
    for variant, size, ours_ips, ref_ips, ours_rss, ref_rss, same, total in rows:
        name = variant if size == "full" else f"{variant} (micro)"
        print(f"| {name} | {ours_ips:.3f} | {ref_ips:.3f} | {ours_ips / ref_ips:.1f}x | {ours_rss:.0f} MiB | "
              f"{ref_rss:.0f} MiB | {same}/{total} |")
    failed = [r for r in rows if r[6] != r[7]]
    if failed:
        print("\ngenerated tokens differ from the reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
