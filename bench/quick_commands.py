"""Start-up time of the small commands a newcomer runs first, each in a fresh process (issue 23, item 5).

Legs are interleaved (new, old, new, old, ...) so that the machine's load hits both alike; the "old" leg is the
previous way of loading the tokenizer (transformers' AutoTokenizer, with torch imported), run on the same design.
Prints the median wall time of each leg, the ratio's median and range, and the load average.

    python bench/quick_commands.py [--repeats 5] [--design stimuli/formality_emotion.yaml]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

OLD_VALIDATE = ("import torch; from fis_interventions.models import load_tokenizer; "
                "from fis_interventions.designs import validate; validate({design!r}, load_tokenizer())")
NEW_VALIDATE = "from fis_interventions.designs import validate; validate({design!r})"


def wall(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--design", default=str(ROOT / "stimuli" / "formality_emotion.yaml"))
    args = ap.parse_args()
    py, cli = sys.executable, [sys.executable, "-m", "fis_interventions.cli"]
    legs = {
        "fis --help": [cli + ["--help"]],
        "fis stimuli validate": [cli + ["stimuli", "validate", args.design]],
        "fis stimuli show": [cli + ["stimuli", "show", args.design]],
        "validate (new tokenizer | old AutoTokenizer)": [[py, "-c", NEW_VALIDATE.format(design=args.design)],
                                                        [py, "-c", OLD_VALIDATE.format(design=args.design)]],
    }
    for argv in (legs["fis stimuli validate"][0],):  # warm the file cache and the converted-model folder once
        wall(argv)
    print(f"load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)")
    for name, variants in legs.items():
        times: list[list[float]] = [[] for _ in variants]
        for _ in range(args.repeats):
            for i, argv in enumerate(variants):
                times[i].append(wall(argv))
        medians = [statistics.median(t) for t in times]
        line = f"{name:48s} median {medians[0]:6.2f} s"
        if len(variants) == 2:
            ratios = sorted(b / a for a, b in zip(*times))
            line += (f" | old {medians[1]:6.2f} s | old/new ratio median {statistics.median(ratios):.2f} "
                     f"(range {ratios[0]:.2f}-{ratios[-1]:.2f})")
        print(line)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
