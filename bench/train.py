"""Training throughput of SAE-only vs joint (SAE + NFM) updates on the same activations (fp32 CPU).

Defaults: d_in 576 (SmolLM2-135M), 8x expansion, k 32, NFM emb_dim 64, batch 1024. Target: joint/SAE-only
time per step <= 1.2x. Prints a table; no assertions.

    python bench/train.py [--steps 10] [--rounds 3] [--threads N] [--activations shards.pt]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from fis_interventions.sae import JointSAE, TrainConfig
from fis_interventions.sae.synthetic import SyntheticActivations
from fis_interventions.sae.trainers import JointTrainer, SAETrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from interleave import ratio  # noqa: E402  (bench/interleave.py: the one rule for ratios)


def make_trainer(mode: str, batches: list[torch.Tensor], cfg: TrainConfig) -> SAETrainer | JointTrainer:
    torch.manual_seed(0)
    model = JointSAE(cfg.model_copy(update={"mode": mode}).arch(batches[0].shape[1]))
    return (SAETrainer if mode == "sae" else JointTrainer)(model, cfg, len(batches))


def step_times(trainer, batches: list[torch.Tensor], first_step: int = 0) -> list[float]:
    times = []
    for i, x in enumerate(batches):
        t = time.perf_counter()
        trainer.update(first_step + i, x)
        times.append(time.perf_counter() - t)
    return times


def compare(batches: list[torch.Tensor], cfg: TrainConfig, warmup: int, rounds: int) -> dict[str, list[float]]:
    """Seconds of every timed step per mode, the modes taking turns step by step.

    Taking turns means a burst of load from other processes on a shared machine hits both modes alike, so
    the ratio from one run is meaningful even when the absolute times drift.
    """
    trainers = {mode: make_trainer(mode, batches, cfg) for mode in ("sae", "joint")}
    for trainer in trainers.values():  # warm-up steps, not timed
        step_times(trainer, batches[:warmup])
    times: dict[str, list[float]] = {mode: [] for mode in trainers}
    for r in range(rounds):
        for i, x in enumerate(batches):
            for mode, trainer in trainers.items():
                times[mode] += step_times(trainer, [x], warmup + r * len(batches) + i)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="the two modes take turns this many times")
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
                      warmup_steps=0, tokens=args.batch * (args.warmup + args.rounds * args.steps))
    times = compare(batches, cfg, args.warmup, args.rounds)
    d_in = batches[0].shape[1]
    print(f"d_in={d_in} d_sae={8 * d_in} k=32 emb_dim=64 batch={args.batch} threads={torch.get_num_threads()} "
          f"device=cpu fp32; {args.rounds} rounds x {args.steps} steps per mode, modes taking turns step by step")
    print(f"{'mode':<8}{'fastest s/step':>16}{'median s/step':>15}{'tokens/s (median)':>19}")
    for mode, ts in times.items():
        print(f"{mode:<8}{min(ts):>16.4f}{statistics.median(ts):>15.4f}{args.batch / statistics.median(ts):>19.0f}")
    print(f"joint / sae-only time ratio: {ratio(times['joint'], times['sae'])} (target <= 1.2); "
          f"fastest steps: {min(times['joint']) / min(times['sae']):.3f}")


if __name__ == "__main__":
    main()
