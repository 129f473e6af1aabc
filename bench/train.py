"""Training throughput of SAE-only vs joint (SAE + NFM) updates on the same activations (fp32 CPU).

Defaults: d_in 576 (SmolLM2-135M), 8x expansion, k 32, NFM emb_dim 64, batch 1024. Target: joint/SAE-only
time per step <= 1.2x. Prints a table; no assertions.

    python bench/train.py [--steps 20] [--threads N] [--activations shards.pt]
"""

from __future__ import annotations

import argparse
import time

import torch

from fis_interventions.sae import JointSAE, TrainConfig
from fis_interventions.sae.synthetic import SyntheticActivations
from fis_interventions.sae.trainers import JointTrainer, SAETrainer


def bench(mode: str, batches: list[torch.Tensor], cfg: TrainConfig, warmup: int) -> float:
    """Seconds per optimiser step: the fastest timed step (robust to other processes on a shared machine)."""
    torch.manual_seed(0)
    model = JointSAE(cfg.model_copy(update={"mode": mode}).arch(batches[0].shape[1]))
    trainer = (SAETrainer if mode == "sae" else JointTrainer)(model, cfg, len(batches))
    times = []
    for step, x in enumerate(batches):
        t = time.perf_counter()
        trainer.update(step, x)
        if step >= warmup:
            times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--activations", default=None, help="a .pt file holding a [N, d_in] tensor (optional)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.activations:
        acts = torch.load(args.activations).float()
        batches = [acts[i:i + args.batch] for i in range(0, len(acts) - args.batch + 1, args.batch)]
        batches = (batches * (args.steps // max(1, len(batches)) + 1))[:args.steps]
    else:
        src = SyntheticActivations(d_in=args.d_in, n_features=4 * args.d_in, p_active=0.01, batch_size=args.batch)
        batches = [src.batch(i) for i in range(args.steps)]
    cfg = TrainConfig(expansion=8, k=32, emb_dim=64, hidden=64, batch_size=args.batch, lr=1e-4,
                      warmup_steps=0, tokens=args.batch * args.steps)
    rows = [(mode, bench(mode, batches, cfg, args.warmup)) for mode in ("sae", "joint")]
    d_in = batches[0].shape[1]
    print(f"d_in={d_in} d_sae={8 * d_in} k=32 emb_dim=64 batch={args.batch} threads={torch.get_num_threads()} "
          f"device=cpu fp32 steps={args.steps} (fastest of {args.steps - args.warmup})")
    print(f"{'mode':<8}{'s/step':>10}{'tokens/s':>12}")
    for mode, sec in rows:
        print(f"{mode:<8}{sec:>10.4f}{args.batch / sec:>12.0f}")
    print(f"joint / sae-only time ratio: {rows[1][1] / rows[0][1]:.3f} (target <= 1.2)")


if __name__ == "__main__":
    main()
