"""Selection bias, measured: pick the top features of a screen on null data, then test them on the same items
(circular, "double dipping") or on held-out items (what `fis screen` + `fis battery` do by default).

    python bench/selection.py [--reps 2000] [--items 24] [--features 2000] [--top 3] [--discover 0.5]

Synthetic null data in the shape of a matched 2x2 design: every feature has item effects (intercepts and
item x A slopes) and *cell-dependent* noise (each feature's noise SD differs between the four cells, as sparse
SAE features do in the real screening), and no true A x B interaction anywhere. Each repetition:

1. split the items with :func:`fis_interventions.holdout.split_items` (seeded, as `fis screen --discover`);
2. screen every feature on the discovery items with the toolkit's within-item screen
   (:func:`fis_interventions.stats.screen.screen_features`, the default for matched items) and keep the
   ``--top`` features by interaction p;
3. make each kept feature's battery measurement, the readout shift of a clamp, which follows the feature's
   activation (``shift = gain x activation + readout noise``: a scale clamp moves the logits in proportion to
   the activation it scales);
4. test the shift's A x B interaction with the by-item RM-ANOVA (the report's F2) and with the two-way OLS (F1),
   (a) on the discovery items and (b) on the held-out confirmation items.

Prints the rejection rates at alpha = 0.05 with their Monte-Carlo standard errors. (b) must lie in
[0.035, 0.065] (exit code 1 otherwise); (a) shows how far circular testing inflates it. Everything is vectorised:
repetitions are stacked as extra columns of one screen (items are exchangeable, so one split per chunk of
repetitions is as good as one per repetition).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fis_interventions.holdout import split_items  # noqa: E402
from fis_interventions.stats.screen import screen_features  # noqa: E402

CELLS = [("a1", "b1"), ("a1", "b2"), ("a2", "b1"), ("a2", "b2")]
ALPHA = 0.05
TARGET = (0.035, 0.065)


def design(n_items: int) -> pd.DataFrame:
    """One row per item x cell, item-major (the layout `fis screen` gets for a matched design)."""
    rows = [(f"item{i:03d}", f"{a}.{b}", a, b) for i in range(n_items) for a, b in CELLS]
    return pd.DataFrame(rows, columns=["item", "cell", "A", "B"])


def null_activations(rng: np.random.Generator, n_items: int, n_cols: int) -> np.ndarray:
    """[n_items * 4, n_cols] null features: item intercepts (SD 2), item x A slopes (SD 1), and per-feature,
    per-cell noise SDs drawn log-normally (a factor of ~2-3 between the cells of one feature), no interaction."""
    cell_sd = np.exp(rng.normal(0.0, 0.6, size=(4, n_cols)))
    xa = np.array([-0.5, -0.5, 0.5, 0.5])
    X = rng.normal(size=(n_items, 4, n_cols)) * cell_sd
    X += 2.0 * rng.normal(size=(n_items, 1, n_cols))
    X += rng.normal(size=(n_items, 1, n_cols)) * xa[None, :, None]
    return X.reshape(n_items * 4, n_cols)


def _reject(X: np.ndarray, rows: pd.DataFrame, item: str | None) -> np.ndarray:
    return screen_features(X, rows, "A", "B", item=item)["p_ab"].to_numpy() < ALPHA


def simulate(reps: int = 2000, n_items: int = 24, n_features: int = 2000, top: int = 3, discover: float = 0.5,
             chunk: int = 25, seed: int = 0, readout_noise: float = 0.5) -> dict[str, float]:
    """Rejection rates of the top features' interaction tests: ``same_f2, same_f1, held_f2, held_f1`` (and
    ``tests``, the number of tests behind each rate)."""
    rows = design(n_items)
    rng = np.random.default_rng(seed)
    counts = {"same_f2": 0, "same_f1": 0, "held_f2": 0, "held_f1": 0}
    n_tests = 0
    done = 0
    while done < reps:
        r = min(chunk, reps - done)
        split = split_items(rows, discover, seed=seed + done)
        disc = rows["item"].isin(split["discovery"]).to_numpy()
        X = null_activations(rng, n_items, r * n_features)
        p = screen_features(X[disc], rows[disc].reset_index(drop=True), "A", "B", item="item")["p_ab"].to_numpy()
        p = np.where(np.isnan(p), np.inf, p).reshape(r, n_features)
        chosen = np.argsort(p, axis=1, kind="stable")[:, :top] + (np.arange(r) * n_features)[:, None]
        act = X[:, chosen.ravel()]                                           # [rows, r * top]
        gain = rng.choice([-1.0, 1.0], size=act.shape[1]) * rng.uniform(0.5, 2.0, size=act.shape[1])
        shift = gain * act + readout_noise * rng.normal(size=act.shape)
        for side, mask in (("same", disc), ("held", ~disc)):
            sub = rows[mask].reset_index(drop=True)
            counts[f"{side}_f2"] += int(_reject(shift[mask], sub, "item").sum())
            counts[f"{side}_f1"] += int(_reject(shift[mask], sub, None).sum())
        n_tests += r * top
        done += r
    return {**{k: v / n_tests for k, v in counts.items()}, "tests": n_tests}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--items", type=int, default=24)
    ap.add_argument("--features", type=int, default=2000)
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--discover", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.reps < 500:
        ap.error("--reps must be at least 500")
    t0 = time.perf_counter()
    res = simulate(args.reps, args.items, args.features, args.top, args.discover, seed=args.seed)
    elapsed = time.perf_counter() - t0
    n = res["tests"]
    se = lambda q: np.sqrt(q * (1 - q) / n)  # noqa: E731
    print(f"null data: {args.reps} repetitions x {args.features} features, {args.items} matched items "
          f"(discovery fraction {args.discover}), top {args.top} per repetition: {n} tests per rate; {elapsed:.1f} s")
    print(f"{'tested on':<32} {'by-item RM-ANOVA (F2)':>24} {'two-way OLS (F1)':>20}")
    print(f"{'(a) the same (discovery) items':<32} {res['same_f2']:>17.3f} +- {se(res['same_f2']):.3f} "
          f"{res['same_f1']:>13.3f} +- {se(res['same_f1']):.3f}")
    print(f"{'(b) held-out items':<32} {res['held_f2']:>17.3f} +- {se(res['held_f2']):.3f} "
          f"{res['held_f1']:>13.3f} +- {se(res['held_f1']):.3f}")
    ok = TARGET[0] <= res["held_f2"] <= TARGET[1]
    print(f"(b) F2 within [{TARGET[0]}, {TARGET[1]}]: {'yes' if ok else 'NO'}; nominal alpha {ALPHA}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
