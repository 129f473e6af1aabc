"""How the training step cost grows with d_sae, k, NFM embedding dim and tokens per step (three sizes each).

Each row varies one knob from the base (d_in 576, d_sae 4608, k 32, emb_dim 64, batch 1024, joint mode) and
prints seconds per step and microseconds per token. fp32 CPU; fastest of the timed steps (shared machine).

    python bench/scaling.py [--steps 6]
"""

from __future__ import annotations

import argparse

import torch

from train import bench  # bench/train.py: seconds per step, fastest timed step

from fis_interventions.sae import TrainConfig
from fis_interventions.sae.synthetic import SyntheticActivations

BASE = dict(d_sae=4608, k=32, emb_dim=64, batch=1024)
GRID = {"d_sae": [2304, 4608, 9216], "k": [16, 32, 64], "emb_dim": [32, 64, 128], "batch": [512, 1024, 2048]}


def step_time(mode: str, d_in: int, d_sae: int, k: int, emb_dim: int, batch: int, steps: int) -> float:
    src = SyntheticActivations(d_in=d_in, n_features=4 * d_in, p_active=0.01, batch_size=batch)
    batches = [src.batch(0)] * steps  # timing only: one batch reused (generating data is not what we measure)
    cfg = TrainConfig(d_sae=d_sae, k=k, emb_dim=emb_dim, hidden=64, batch_size=batch, lr=1e-4, warmup_steps=0,
                      tokens=batch * steps, mode=mode)
    return bench(mode, batches, cfg, warmup=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--only", default=None, help="one knob: d_sae, k, emb_dim or batch")
    args = ap.parse_args()
    print(f"threads {torch.get_num_threads()}, d_in {args.d_in}, base {BASE}, joint mode unless noted")
    print(f"{'knob':<8}{'value':>8}{'mode':>7}{'s/step':>10}{'us/token':>10}")
    for knob, values in GRID.items():
        if args.only and knob != args.only:
            continue
        for v in values:
            sizes = {**BASE, knob: v}
            modes = ("sae", "joint") if knob in ("d_sae", "k", "batch") else ("joint",)
            for mode in modes:
                sec = step_time(mode, args.d_in, sizes["d_sae"], sizes["k"], sizes["emb_dim"], sizes["batch"],
                                args.steps)
                print(f"{knob:<8}{v:>8}{mode:>7}{sec:>10.4f}{1e6 * sec / sizes['batch']:>10.1f}")


if __name__ == "__main__":
    main()
