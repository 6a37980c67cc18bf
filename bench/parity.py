"""Parity table: convert every variant's synthetic checkpoint with --verify and print the numbers.

  python bench/parity.py            # micro fixtures of every variant in mappings/variants.yaml
  python bench/parity.py --smoke    # one variant (CI)
  python bench/parity.py --size full --variants ofa-base   # real-size synthetic weights (slow)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--variants", help="comma-separated (default: all)")
    parser.add_argument("--size", choices=["micro", "full"], default="micro")
    args = parser.parse_args()

    from ofaconv.ofa.convert import convert_checkpoint
    from ofaconv.ofa.synth import write_synthetic_checkpoint
    from ofaconv.ofa.variants import variant_names

    torch.set_flush_denormal(True)
    names = args.variants.split(",") if args.variants else variant_names()
    if args.smoke:
        names = names[:1]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ofaconv-parity-") as tmp:
        for name in names:
            src = Path(tmp) / f"{name}.pt"
            write_synthetic_checkpoint(src, name, size=args.size, optimizer_state=False)
            start = time.perf_counter()
            result = convert_checkpoint(src, Path(tmp) / name, verify=True)
            checks = {c["name"]: c for c in result.report["checks"]}
            rows.append((name, result.report["config"], checks, time.perf_counter() - start))
    print(f"\nparity, {args.size} synthetic checkpoints (every tensor perturbed), fp32, CPU\n")
    print("| variant | layers | d_model | tensors | encoder max-abs-diff | logits max-abs-diff | greedy | beam search | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    failed = False
    for name, config, c, seconds in rows:
        def numeric(level):
            return f"{c[level]['value']:.1e} (gate {c[level]['gate']:g})"

        def gen(level):
            return f"{c[level]['value']}/{c[level]['gate']}" if "value" in c[level] else "FAIL"

        failed |= not all(x["passed"] for x in c.values())
        beam = next(name for name in c if name.startswith("beam"))  # the folder's own beam size
        print(f"| {name} | {config['encoder_layers']}+{config['decoder_layers']} | {config['d_model']} | "
              f"{'bit-exact' if c['tensors']['passed'] else 'FAIL'} | {numeric('encoder_states')} | "
              f"{numeric('decoder_logits')} | {gen('greedy')} | {gen(beam)} ({beam}) | {seconds:.0f} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
