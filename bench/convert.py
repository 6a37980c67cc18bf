"""Conversion cost: ofaconv vs the naive converter vs the I/O floor, measured in one run.

Each approach runs in its own child process on the same synthetic checkpoint in the exact OFA
trainer format (with optimizer state); wall time, CPU time and peak RSS (``wait4`` rusage of that
child) are recorded, medians over --repeat runs after one warm-up, with the page cache primed and
every approach's output deleted before each run (see ``measure``). Approaches:
  naive   what OFA-Compress's converter does: torch.load everything, rename, save (safetensors)
  floor   the I/O floor: read each weight's bytes once and write them once
  ofaconv ``ofaconv convert`` (no --verify): also sha256 of the whole source (optimizer state
          included) and of every file written, for the report

  python bench/convert.py --smoke            # micro checkpoint, seconds (CI)
  python bench/convert.py --variants ofa-base,ofa-large
Targets (issue 2): peak RSS <= 1/4 of naive on large; wall <= 1.5x the I/O floor.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAIVE = r"""
import argparse, sys, torch
from safetensors.torch import save_file
src, out = sys.argv[1], sys.argv[2]
import numpy as np
from numpy._core import multiarray
# the globals a trainer checkpoint holds: Namespace, numpy scalars/arrays in extra_state
SAFE = [argparse.Namespace, multiarray.scalar, multiarray._reconstruct, np.dtype, np.ndarray]
SAFE += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
with torch.serialization.safe_globals(SAFE):
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
renames = [(".encoder_attn_layer_norm.", ".cross_attn_layer_norm."), (".encoder_attn.", ".cross_attn."),
           (".self_attn_ln.", ".self_attn_mid_layer_norm."), (".cross_attn_ln.", ".cross_attn_mid_layer_norm."),
           (".attn_ln.", ".self_attn_mid_layer_norm."), (".ffn_layernorm.", ".ffn_layer_norm.")]
state = {}
for key, value in ckpt["model"].items():
    if key.endswith(".version") or key in ("decoder.embed_tokens.weight", "decoder.output_projection.weight"):
        continue
    for a, b in renames:
        key = key.replace(a, b)
    state[key] = value.clone()
save_file(state, out)
"""

FLOOR = r"""
import argparse, sys, torch
src, out = sys.argv[1], sys.argv[2]
import numpy as np
from numpy._core import multiarray
# the globals a trainer checkpoint holds: Namespace, numpy scalars/arrays in extra_state
SAFE = [argparse.Namespace, multiarray.scalar, multiarray._reconstruct, np.dtype, np.ndarray]
SAFE += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
with torch.serialization.safe_globals(SAFE):
    ckpt = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
with open(out, "wb") as f:
    for key, value in ckpt["model"].items():
        if key.endswith("_rp_bucket") or key.endswith("image_position_idx") or key.endswith(".version"):
            continue
        if key in ("decoder.embed_tokens.weight", "decoder.output_projection.weight"):
            continue
        f.write(value.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
"""


def run_child(argv: list[str]) -> tuple[float, int, float]:
    """Wall seconds, peak RSS bytes and CPU seconds (user + system) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child failed: {' '.join(argv)}\n{err}")
    return wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def prime(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def approaches(src: Path, work: Path) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "naive": [py, "-c", NAIVE, str(src), str(work / "naive.safetensors")],
        "floor": [py, "-c", FLOOR, str(src), str(work / "floor.bin")],
        "ofaconv": [py, "-m", "ofaconv", "convert", str(src), str(work / "ofaconv_out"), "--force"],
        # the fixed start-up cost every approach pays
        "startup:torch": [py, "-c", "import torch, numpy"],
    }


OUTPUTS = ("naive.safetensors", "floor.bin", "ofaconv_out")


def clear_outputs(work: Path) -> None:
    for name in OUTPUTS:
        path = work / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def measure(src: Path, work: Path, repeat: int, settle: float) -> dict[str, tuple[float, int, float]]:
    """Every run starts the same way: no output of any approach on disk, source in the page cache.

    On a VM with free-page reporting (this kind of machine) memory freed a few seconds ago is back
    with the host and costs a slow first touch (writing 2 GB into the page cache: ~1 s with pages
    just freed, ~4 s with pages given back), so when outputs are deleted matters:
      settle > 0  delete outputs, wait ``settle`` s for freed memory to go back, then run: every
                  approach writes into cold memory, whatever its timing (reproducible);
      settle = 0  delete outputs right before the run: memory freed just now is warm, and an
                  approach that writes earlier after its start gets warmer pages.
    An approach that overwrote its previous output in place (truncate, then write) would always
    get warm pages, so outputs are deleted by the harness, never overwritten.
    """
    results = {}
    for name, argv in approaches(src, work).items():
        walls, rss, cpu = [], [], []
        for attempt in range(repeat + 1):  # the first run is a warm-up
            clear_outputs(work)
            if settle:
                time.sleep(settle)
            prime(src)
            wall, peak, seconds = run_child(argv)
            if attempt:
                walls.append(wall)
                rss.append(peak)
                cpu.append(seconds)
        results[name] = (statistics.median(walls), max(rss), statistics.median(cpu))
    clear_outputs(work)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="micro checkpoint, one run (CI)")
    parser.add_argument("--variants", default="ofa-base,ofa-large")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", help="where to put checkpoints and outputs (default: a temp dir)")
    parser.add_argument("--settle", default="10,0",
                        help="seconds to wait after deleting outputs, one table per value (see measure())")
    args = parser.parse_args()

    variants = ["ofa-cn-base"] if args.smoke else args.variants.split(",")
    size = "micro" if args.smoke else "full"
    repeat = 1 if args.smoke else args.repeat
    settles = [0.0] if args.smoke else [float(v) for v in args.settle.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ofaconv-bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for variant in variants:
            src = work / f"{variant}-{size}.pt"
            if not src.exists():
                # In a child: wait4's ru_maxrss of a forked child starts at the parent's RSS, so
                # this process must stay small (it never imports torch).
                synth = [sys.executable, "-m", "ofaconv", "synth", variant, str(src)] + (["--full"] if size == "full" else [])
                subprocess.run(synth, check=True, stdout=subprocess.DEVNULL)
            for settle in settles:
                rows.append((settle, variant, src.stat().st_size, measure(src, work, repeat, settle)))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    for settle in settles:
        memory = (f"outputs deleted {settle:g} s before each run (cold memory)" if settle
                  else "outputs deleted right before each run (memory just freed)")
        print(f"\nconversion, {size} synthetic checkpoints with optimizer state, median of {repeat} "
              f"(wall, CPU) / max (peak RSS), page cache primed, {memory}\n")
        print("| variant | file | approach | wall s | CPU s | peak RSS MiB | RSS vs naive | wall vs floor |")
        print("|---|---|---|---|---|---|---|---|")
        for row_settle, variant, file_size, res in rows:
            if row_settle != settle:
                continue
            naive_rss, floor_wall = res["naive"][1], res["floor"][0]
            for name in ("naive", "floor", "ofaconv"):
                wall, rss, cpu = res[name]
                print(f"| {variant} | {file_size / 2**30:.2f} GiB | {name} | {wall:.2f} | {cpu:.2f} | {rss / 2**20:.0f} | "
                      f"{rss / naive_rss:.2f}x | {wall / floor_wall:.2f}x |")
            print(f"| {variant} | | start-up: import torch | {res['startup:torch'][0]:.2f} | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
