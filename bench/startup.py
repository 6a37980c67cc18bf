"""Start-up benchmark: ``ofaconv --help`` against ``python -c "import torch"`` and a bare interpreter.

    python bench/startup.py            # 7 interleaved rounds
    python bench/startup.py --smoke    # 1 round (CI)
    git archive COMMIT ofaconv mappings | tar -x -C /tmp/old
    python bench/startup.py --old /tmp/old   # also an older tree's `python -m ofaconv --help`

Each command runs in a fresh process, the three interleaved round after round (on a shared machine
the median of interleaved runs is the least biased figure); the ratios are against
``import torch`` measured in the same run. ``ofaconv --help`` imports every command's module to
list them, none of which may import torch or transformers (tests/test_startup.py checks that per
command); what remains is Python, the registry's entry-point scan and small pure-Python modules.
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


def commands(old: str | None) -> dict[str, tuple[list[str], dict | None]]:
    found = {
        "python (bare)": ([sys.executable, "-c", "pass"], None),
        "import torch": ([sys.executable, "-c", "import torch"], None),
        "python -m ofaconv --help": ([sys.executable, "-m", "ofaconv", "--help"], None),
    }
    script = shutil.which("ofaconv")
    if script:
        found["ofaconv --help"] = ([script, "--help"], None)
    if old:
        found[f"python -m ofaconv --help ({old})"] = ([sys.executable, "-m", "ofaconv", "--help"],
                                                      {**os.environ, "PYTHONPATH": old})
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--old", metavar="DIR", help="a tree holding an older ofaconv/ (and mappings/) to time too")
    args = parser.parse_args()
    rounds = 1 if args.smoke else args.rounds
    cmds = commands(args.old)
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(rounds):
        for name, (argv, env) in cmds.items():
            start = time.perf_counter()
            # from a neutral folder: `python -m` puts the working directory first on sys.path
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env, cwd=tempfile.gettempdir())
            times[name].append(time.perf_counter() - start)
    torch_s = statistics.median(times["import torch"])
    print(f"{rounds} round(s), median wall seconds per fresh process")
    print("| command | wall s | vs import torch |")
    print("|---|---|---|")
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"| `{name}` | {median:.3f} | {median / torch_s:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
