"""Catalog throughput: ``ofaconv clip embed`` and ``ofaconv caption`` with 1 and 2 processes.

Each run is the real command (``python -m ofaconv`` for one process, ``torchrun --nproc_per_node 2``
for two) over the same synthetic JPEGs, with ``OMP_NUM_THREADS=1`` per process and the default
number of decoding workers. images/s is the processing loop's (rank 0's ``OFACONV_CATALOG_STATS``:
from its first decoded batch, not counted, to the last chunk written; model loading, the input scan
and the workers' start-up excluded); the
scaling ratio is 2-process images/s over 1-process images/s measured in the same run, and the two
outputs are checked to be identical. On a machine with CUDA GPUs the GPU rows run too (one process
per GPU, up to two).

  python bench/catalog.py --smoke     # micro models, 64 small images (CI)
  python bench/catalog.py             # BertCLIP base-size towers, OFA-Tiny full size, 384 images
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ofaconv(argv: list[str], cwd: Path, **kw) -> None:
    subprocess.run([sys.executable, "-m", "ofaconv", *argv], cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, **kw)


def _prepare(work: Path, smoke: bool, images: int) -> dict:
    photos = work / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    side = 64 if smoke else 256
    for i in range(images):
        pixels = rng.integers(0, 256, (side, side + 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"{i:05d}.jpg", quality=90)
    _ofaconv(["clip", "synth", "legacy-bertclip", "bertclip", "--size", "micro" if smoke else "base"], work)
    _ofaconv(["clip", "convert", "bertclip", "clip", "--no-verify"], work)
    _ofaconv(["synth", "ofa-tiny", "tiny.pt", "--no-optimizer", *([] if smoke else ["--full"])], work)
    _ofaconv(["convert", "tiny.pt", "ofa"], work)
    return {"photos": photos, "clip": work / "clip", "ofa": work / "ofa"}


def _run(task: str, paths: dict, work: Path, procs: int, device: str, out: Path) -> dict:
    stats = work / f"stats-{task}-{device}-{procs}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "OFACONV_CATALOG_STATS": str(stats),
           "PYTHONPATH": str(ROOT)}
    if task == "embed":
        argv = ["clip", "embed", str(paths["clip"]), str(paths["photos"]), "--out", str(out)]
    else:
        argv = ["caption", str(paths["ofa"]), str(paths["photos"]), "--out", str(out), "--max-len", "8",
                "--beams", "2"]
    argv += ["--device", device, "--no-progress", "--chunk-size", "16"]
    launch = [sys.executable, "-m", "ofaconv"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1",
        "--master_port", str(_port()), "-m", "ofaconv"]
    proc = subprocess.run([*launch, *argv], env=env, capture_output=True, text=True, cwd=work)
    if proc.returncode != 0:
        raise SystemExit(f"{task} with {procs} process(es) failed:\n{proc.stderr[-3000:]}")
    return json.loads(stats.read_text())


def _same(task: str, a: Path, b: Path) -> bool:
    if task == "caption":
        return filecmp.cmp(a, b, shallow=False)
    from ofaconv.core.catalog import iter_embedding_shards

    one = np.concatenate([m for _, m in iter_embedding_shards(a)])
    two = np.concatenate([m for _, m in iter_embedding_shards(b)])
    return (a / "ids.jsonl").read_bytes() == (b / "ids.jsonl").read_bytes() and np.array_equal(one, two)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="micro models, few images (seconds)")
    parser.add_argument("--images", type=int, help="images per run (default 64 smoke, 384 full)")
    parser.add_argument("--tasks", default="embed,caption")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    images = args.images or (64 if args.smoke else 384)
    import torch

    devices = [("cpu", [1, 2])]
    if torch.cuda.is_available():
        devices.append(("cuda", sorted({1, min(2, torch.cuda.device_count())})))
    rows = []
    with tempfile.TemporaryDirectory(prefix="ofaconv-bench-catalog-") as tmp:
        work = Path(tmp)
        paths = _prepare(work, args.smoke, images)
        for task in args.tasks.split(","):
            for device, counts in devices:
                outs = {}
                for procs in counts:
                    outs[procs] = work / f"{task}-{device}-{procs}" / ("out.jsonl" if task == "caption" else "emb")
                    outs[procs].parent.mkdir()
                    stats = _run(task, paths, work, procs, device, outs[procs])
                    rows.append({"task": task, "device": device, "processes": procs, "images": stats["images"],
                                 "seconds": round(stats["seconds"], 3),
                                 "images_per_s": round(stats["images"] / stats["seconds"], 2)})
                if len(counts) == 2:
                    base, two = rows[-2], rows[-1]
                    two["scaling"] = round(two["images_per_s"] / base["images_per_s"], 2)
                    two["same_output"] = _same(task, outs[counts[0]], outs[counts[1]])
                for path in outs.values():
                    shutil.rmtree(path.parent, ignore_errors=True)
    print(f"{'task':8s} {'device':6s} {'procs':>5s} {'images':>6s} {'seconds':>8s} {'images/s':>9s}  scaling vs 1")
    for row in rows:
        extra = f"{row['scaling']:.2f}x (same output: {row['same_output']})" if "scaling" in row else "1.00x (baseline)"
        print(f"{row['task']:8s} {row['device']:6s} {row['processes']:5d} {row['images']:6d} {row['seconds']:8.2f} "
              f"{row['images_per_s']:9.2f}  {extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    if not all(row.get("same_output", True) for row in rows):
        print("error: 2 processes wrote another output than 1", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
