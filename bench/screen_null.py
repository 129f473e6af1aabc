"""Cost of the screen's label-permutation null against the screen itself, at the demo's sizes.

The null is on by default (`fis screen --permutations 1000`), so its cost must stay a small multiple of the
screen's statistics. This times, in turns on the same data (so load from other jobs hits both alike), the
vectorised screen table (`screen_table`: ANOVA of every feature, BH, flags) and the permutation null over the
same family, for the within-item scheme (matched items) and the across-stimuli scheme (cell lists), and prints
the ratio null / screen and the seconds per 1,000 relabellings. Sizes default to the demo checkpoint's
4,928 features and 12 discovery items (48 stimuli).

Usage: python bench/screen_null.py [--features 4928] [--items 12] [--permutations 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from fis_interventions.screening import add_permutation_null, screen_table

LEVELS = {"f": ["x", "y"], "g": ["p", "q"]}
CELLS = ["x.p", "x.q", "y.p", "y.q"]


def rows_for(items: int, matched: bool) -> pd.DataFrame:
    return pd.DataFrame([{"item": f"i{i}" if matched else f"{c}{i}", "cell": c, "f": c[0], "g": c[2]}
                         for i in range(items) for c in CELLS])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=4928)
    ap.add_argument("--items", type=int, default=12)
    ap.add_argument("--permutations", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    for matched in (True, False):
        rows = rows_for(args.items, matched)
        X = np.maximum(rng.normal(size=(len(rows), args.features)) - 1.0, 0.0).astype(np.float32)  # sparse, >= 0
        acts = {"sae.hook_latents": X}
        item = "item" if matched else None
        best = {"screen": np.inf, "null": np.inf}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            table = screen_table(acts, rows, "f", "g", LEVELS, item=item)
            best["screen"] = min(best["screen"], time.perf_counter() - t0)
            t0 = time.perf_counter()
            add_permutation_null(table, acts, rows, "f", "g", LEVELS, item, args.permutations, 0)
            best["null"] = min(best["null"], time.perf_counter() - t0)
        family = int(table["p_ab"].notna().sum())
        print(f"{'within items' if matched else 'across stimuli'}: {family} features in the family, "
              f"{len(rows)} stimuli: screen {best['screen']:.2f} s, null ({args.permutations} relabellings) "
              f"{best['null']:.2f} s, ratio null/screen {best['null'] / best['screen']:.1f}x, "
              f"{1000 * best['null'] / args.permutations:.2f} s per 1,000")


if __name__ == "__main__":
    main()
