"""Conversion cost: ofaconv vs the naive converter vs the I/O floor, and what --verify adds.

Each approach runs in its own child process on the same synthetic checkpoint in the exact OFA
trainer format (with optimizer state); wall time, CPU time and peak RSS (``wait4`` rusage of that
child) are recorded, medians over --repeat runs after one warm-up, with the page cache primed and
every approach's output deleted before each run (see ``measure``). Approaches:
  naive    what OFA-Compress's converter does: torch.load everything, rename, save (safetensors)
  floor    the I/O floor: read each weight's bytes once and write them once
  ofaconv  ``ofaconv convert`` (no --verify): fingerprints the bytes it converts and hashes every
           file it writes, for the report
  ofaconv --source-sha256   the same, also hashing the whole source (optimizer state included)
  ofaconv --verify          the same as ofaconv, then the full parity check
With --busy N every run is repeated with N processes spinning on the CPUs beside it (idle and busy
runs alternate, so both see the same drift of the machine).

  python bench/convert.py --smoke            # micro checkpoint, seconds (CI)
  python bench/convert.py --variants ofa-base,ofa-large --busy 3
  python bench/convert.py --variants ofa-large --repeat 2 --settle 10 --busy 3 --reset 8
Targets: peak RSS <= 0.15x naive; wall <= 1.5x the I/O floor; CPU below naive; --verify wall
<= 3x plain ofaconv.
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
    convert = [py, "-m", "ofaconv", "convert", str(src), str(work / "ofaconv_out"), "--force"]
    return {
        "naive": [py, "-c", NAIVE, str(src), str(work / "naive.safetensors")],
        "floor": [py, "-c", FLOOR, str(src), str(work / "floor.bin")],
        "ofaconv": convert,
        "ofaconv --source-sha256": convert + ["--source-sha256"],
        "ofaconv --verify": convert + ["--verify"],
        # the fixed start-up cost every approach pays
        "startup:torch": [py, "-c", "import torch, numpy"],
    }


OUTPUTS = ("naive.safetensors", "floor.bin", "ofaconv_out")
SPIN = "while True: pass"


def clear_outputs(work: Path) -> None:
    for name in OUTPUTS:
        path = work / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


class Spinners:
    """``count`` processes burning CPU for the duration of a ``with`` block (none for 0)."""

    def __init__(self, count: int):
        self.count, self.procs = count, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(self.count)]
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.kill()
            proc.wait()


def reset_memory(gib: float) -> None:
    """A child that touches ``gib`` GiB and exits: whatever ran before, the next run follows this."""
    if gib > 0:
        subprocess.run([sys.executable, "-c", f"bytearray(b'x') * {int(gib * 2**30)}"], check=True)


def measure(src: Path, work: Path, repeat: int, settle: float,
            busy: int = 0, reset: float = 0.0) -> dict[tuple[str, str], tuple[float, int, float]]:
    """``{(condition, approach): (median wall s, max peak RSS bytes, median CPU s)}``, condition
    ``idle`` (and ``busy``: ``busy`` spinning processes beside each run, alternating with idle).

    Every run starts the same way: no output of any approach on disk, source in the page cache.
    On a VM with free-page reporting (this kind of machine) memory freed a few seconds ago is back
    with the host and costs a slow first touch (writing 2 GB into the page cache: ~1 s with pages
    just freed, ~4 s with pages given back), so when outputs are deleted matters:
      settle > 0  delete outputs, wait ``settle`` s for freed memory to go back, then run: every
                  approach writes into cold memory, whatever its timing (reproducible);
      settle = 0  delete outputs right before the run: memory freed just now is warm, and an
                  approach that writes earlier after its start gets warmer pages.
    An approach that overwrote its previous output in place (truncate, then write) would always
    get warm pages, so outputs are deleted by the harness, never overwritten.
    How much memory the previous run freed matters as much: 10 s after the naive path (8 GB) the
    floor ran in 4.1-5.3 s, 10 s after another floor run in 5.6 s, 30-60 s after the naive path in
    6.3-6.7 s. ``reset`` > 0: before every run (then ``settle``) a child touches ``reset`` GiB and
    exits, so every approach follows the same predecessor whatever the order.
    """
    conditions = {"as found": 0, **({"busy": busy} if busy else {})}
    samples: dict[tuple[str, str], list[tuple[float, int, float]]] = {}
    for attempt in range(repeat + 1):  # the first round is a warm-up
        for name, argv in approaches(src, work).items():
            for condition, spinners in conditions.items():
                clear_outputs(work)
                reset_memory(reset)
                if settle:
                    time.sleep(settle)
                prime(src)
                with Spinners(spinners):
                    sample = run_child(argv)
                if attempt:
                    samples.setdefault((condition, name), []).append(sample)
    clear_outputs(work)
    return {key: (statistics.median(s[0] for s in runs), max(s[1] for s in runs), statistics.median(s[2] for s in runs))
            for key, runs in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="micro checkpoint, one run (CI)")
    parser.add_argument("--variants", default="ofa-base,ofa-large")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--busy", type=int, default=0, metavar="N",
                        help="also run everything with N processes spinning on the CPUs (alternating with idle runs)")
    parser.add_argument("--workdir", help="where to put checkpoints and outputs (default: a temp dir)")
    parser.add_argument("--reset", type=float, default=0.0, metavar="GIB",
                        help="before every run, a child touches GIB GiB and exits (see measure(); 8 covers the "
                             "naive path's peak on OFA-Large)")
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
                rows.append((settle, variant, src.stat().st_size,
                             measure(src, work, repeat, settle, args.busy, 0.0 if args.smoke else args.reset)))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    for settle in settles:
        memory = (f"outputs deleted {settle:g} s before each run (cold memory)" if settle
                  else "outputs deleted right before each run (memory just freed)")
        busy = f"; busy = {args.busy} processes spinning beside each run" if args.busy else ""
        if args.reset and not args.smoke:
            memory = f"{args.reset:g} GiB touched and freed, then {memory}"
        print(f"\nconversion, {size} synthetic checkpoints with optimizer state, median of {repeat} "
              f"(wall, CPU) / max (peak RSS), page cache primed, {memory}{busy}\n")
        print("| variant | file | machine | approach | wall s | CPU s | peak RSS MiB | RSS vs naive | wall vs floor | "
              "wall vs ofaconv |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for row_settle, variant, file_size, res in rows:
            if row_settle != settle:
                continue
            for condition in sorted({c for c, _ in res}, key=["as found", "busy"].index):
                naive_rss, floor_wall = res[condition, "naive"][1], res[condition, "floor"][0]
                plain_wall = res[condition, "ofaconv"][0]
                for name in ("naive", "floor", "ofaconv", "ofaconv --source-sha256", "ofaconv --verify"):
                    wall, rss, cpu = res[condition, name]
                    print(f"| {variant} | {file_size / 2**30:.2f} GiB | {condition} | {name} | {wall:.2f} | {cpu:.2f} | "
                          f"{rss / 2**20:.0f} | {rss / naive_rss:.2f}x | {wall / floor_wall:.2f}x | "
                          f"{wall / plain_wall:.2f}x |")
                print(f"| {variant} | | {condition} | start-up: import torch | {res[condition, 'startup:torch'][0]:.2f} "
                      f"| | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
