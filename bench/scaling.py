"""How the training step cost grows with d_sae, k, NFM embedding dim and tokens per step (three sizes each).

Each row varies one knob from the base (d_in 576, d_sae 4608, k 32, emb_dim 64, batch 1024) and prints the
median seconds per step of SAE-only and joint training (the two taking turns step by step, so load from other
jobs on a shared machine hits both alike), microseconds per token and their ratio. fp32 CPU.

    python bench/scaling.py [--steps 5] [--rounds 2]
"""

from __future__ import annotations

import argparse

import torch

import statistics

from interleave import ratio  # bench/interleave.py: the one rule for ratios
from train import compare  # bench/train.py: the two modes taking turns

from fis_interventions.sae import TrainConfig
from fis_interventions.sae.synthetic import SyntheticActivations

BASE = dict(d_sae=4608, k=32, emb_dim=64, batch=1024)
GRID = {"d_sae": [2304, 4608, 9216], "k": [16, 32, 64], "emb_dim": [32, 64, 128], "batch": [512, 1024, 2048]}


def step_times(d_in: int, d_sae: int, k: int, emb_dim: int, batch: int, steps: int,
               rounds: int) -> dict:
    """Median seconds per step for each mode, and the per-step joint / SAE-only ratio (``ratio``)."""
    src = SyntheticActivations(d_in=d_in, n_features=4 * d_in, p_active=0.01, batch_size=batch)
    batches = [src.batch(i) for i in range(steps)]
    cfg = TrainConfig(d_sae=d_sae, k=k, emb_dim=emb_dim, hidden=64, batch_size=batch, lr=1e-4, warmup_steps=0,
                      tokens=batch * steps * (rounds + 1))
    times = compare(batches, cfg, warmup=2, rounds=rounds)
    return {**{mode: statistics.median(ts) for mode, ts in times.items()}, "ratio": ratio(times["joint"], times["sae"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--only", default=None, help="one knob: d_sae, k, emb_dim or batch")
    args = ap.parse_args()
    print(f"threads {torch.get_num_threads()}, d_in {args.d_in}, base {BASE}; medians of {args.rounds} x "
          f"{args.steps} steps per mode")
    print(f"{'knob':<8}{'value':>7}{'sae s/step':>12}{'joint s/step':>14}{'sae us/tok':>12}{'joint us/tok':>14}"
          f"{'joint/sae':>11}")
    for knob, values in GRID.items():
        if args.only and knob != args.only:
            continue
        for v in values:
            sizes = {**BASE, knob: v}
            sec = step_times(args.d_in, sizes["d_sae"], sizes["k"], sizes["emb_dim"], sizes["batch"], args.steps,
                             args.rounds)
            per_tok = {mode: 1e6 * sec[mode] / sizes["batch"] for mode in ("sae", "joint")}
            print(f"{knob:<8}{v:>7}{sec['sae']:>12.4f}{sec['joint']:>14.4f}{per_tok['sae']:>12.1f}"
                  f"{per_tok['joint']:>14.1f}{sec['ratio'].median:>11.3f}  IQR {sec['ratio'].q1:.2f}-"
                  f"{sec['ratio'].q3:.2f}, {sec['ratio'].load}")


if __name__ == "__main__":
    main()
