"""One TopK SAE training step, ours against EleutherAI sparsify and SAELens, on the same activations.

Each contender runs the same number of steps (Adam, same lr, no warm-up or decay) on the same batches and is
scored by the FVU it reaches on a batch it never trained on, so speed cannot come from doing less. A step is
forward + backward + optimiser + decoder normalisation. Also printed: the floor that the machine's dense
matmul throughput sets (3 x 2 x B x d x d_sae FLOPs: encoder forward and its backward), measured here.

    python bench/peers.py [--activations HARVEST_DIR] [--steps 30] [--threads 1] [--saelens]

Defaults: d_in 576 (SmolLM2-135M), 16x expansion, k 32, batch 4096 tokens, fp32 on CPU (bf16 with --bf16 on
CUDA). SAELens needs its own venv (`make -C bench saelens-venv`); it runs in a subprocess on the same tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fis_interventions.sae import JointSAE, TrainConfig
from fis_interventions.sae.metrics import fvu
from fis_interventions.sae.synthetic import SyntheticActivations
from fis_interventions.sae.trainers import JointTrainer, SAETrainer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from interleave import ratio  # noqa: E402  (bench/interleave.py: the one rule for ratios)
SAELENS_PY = HERE / ".venv-saelens" / "bin" / "python"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(steps: dict[str, Callable[[int, torch.Tensor], None]], batches: list[torch.Tensor], warmup: int,
          device: str) -> dict[str, list[float]]:
    """Seconds of every step after ``warmup`` for each named step function, called as ``step(i, batch)``; they
    take turns batch by batch (A, B, A, B, ... on the same batch: ``bench/interleave.py``'s rule), so load
    from other jobs on a shared machine hits all alike; every batch is trained on, timed or not."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i, x in enumerate(batches):
        for name, step in steps.items():
            sync(device)
            t = time.perf_counter()
            step(i, x)
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return times


def make_ours(modes: list[str], batches, args) -> dict[str, tuple[Callable, Callable]]:
    """Our SAE-only and joint steps, and per mode a function giving the held-out FVU after training."""
    out = {}
    for mode in modes:
        cfg = TrainConfig(d_sae=args.d_in * args.expansion, k=args.k, mode=mode, emb_dim=64, hidden=64,
                          lr=args.lr, warmup_steps=0, lr_decay_to=1.0, batch_size=args.batch,
                          tokens=args.batch * len(batches), device=args.device, dtype=args.dtype)
        torch.manual_seed(0)
        # fp32 master weights; with --bf16 the trainer runs the forward under bf16 autocast (as `fis train` does)
        model = JointSAE(cfg.arch(args.d_in)).to(args.device)
        trainer = (SAETrainer if mode == "sae" else JointTrainer)(model, cfg, len(batches))

        def held_fvu(held, trainer=trainer, mode=mode) -> float:
            trainer.model.eval()
            with torch.no_grad():
                recon = trainer.model(held.float(), "sae" if mode == "sae" else "full").recon
            return float(fvu(held.float(), recon))
        out[mode] = (trainer.update, held_fvu)
    return out


def make_sparsify(args) -> tuple[Callable, Callable]:
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    sae = SparseCoder(args.d_in, SparseCoderConfig(num_latents=args.d_in * args.expansion, k=args.k),
                      device=args.device, dtype=getattr(torch, args.dtype))
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)

    def step(_, x):  # the same step as sparsify's Trainer (fvu loss, parallel-gradient removal, renormalise)
        out = sae(x)
        opt.zero_grad(set_to_none=True)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()

    def held_fvu(held) -> float:
        with torch.no_grad():
            return float(fvu(held, sae(held).sae_out))
    return step, held_fvu


def run_saelens(data_path: Path, args) -> tuple[float, float] | str:
    if not SAELENS_PY.exists():
        return "not installed (make -C bench saelens-venv)"
    cmd = [str(SAELENS_PY), str(HERE / "saelens_step.py"), str(data_path), "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--expansion", str(args.expansion),
           "--k", str(args.k), "--lr", str(args.lr), "--threads", str(torch.get_num_threads()),
           "--device", args.device, "--dtype", args.dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return res["sec"], res["fvu"]


def floor_step(args) -> Callable[[int, torch.Tensor], None]:
    """The matmul floor as a leg: three dense [B, d] x [d, d_sae] products (encoder forward and its backward)."""
    dt = getattr(torch, args.dtype)
    a = torch.randn(args.batch, args.d_in, device=args.device, dtype=dt)
    w = torch.randn(args.d_in, args.d_in * args.expansion, device=args.device, dtype=dt)

    def step(_, x) -> None:
        for _ in range(3):
            a @ w
    return step


def load_data(args) -> tuple[torch.Tensor, str]:
    n = args.batch * (args.steps + 1)
    if args.activations:
        from fis_interventions.activations import ActivationStore

        acts = ActivationStore(args.activations).activations("train")
        if len(acts) < n:
            acts = acts.repeat((n + len(acts) - 1) // len(acts), 1)
        args.d_in = acts.shape[1]
        return acts[:n].float().contiguous(), f"harvested activations from {args.activations} (normalised)"
    src = SyntheticActivations(d_in=args.d_in, n_features=4 * args.d_in, p_active=0.01, batch_size=args.batch)
    return torch.cat([src.batch(i) for i in range(args.steps + 1)]), \
        "SYNTHETIC activations (sparse features + noise; pass --activations for real ones)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--activations", type=Path, default=None, help="a `fis harvest` folder")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--bf16", action="store_true", help="bf16 (CUDA only): data and peers' parameters in bf16; "
                    "ours keeps fp32 master weights under bf16 autocast")
    ap.add_argument("--saelens", action="store_true", help="also time SAELens in bench/.venv-saelens")
    ap.add_argument("--only", default="sae,joint,sparsify", help="comma list of: sae, joint, sparsify")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = "bfloat16" if args.bf16 and args.device == "cuda" else "float32"
    data, note = load_data(args)
    data = data.to(args.device, getattr(torch, args.dtype))
    held, batches = data[:args.batch], list(data[args.batch:].split(args.batch))
    wanted = args.only.split(",")

    names = {"sae": "ours: TopK SAE (SAE-only)", "joint": "ours: joint SAE + NFM",
             "sparsify": "EleutherAI sparsify SparseCoder"}
    legs = {mode: fns for mode, fns in make_ours([m for m in ("sae", "joint") if m in wanted], batches, args).items()}
    missing: dict[str, str] = {}
    if "sparsify" in wanted:
        try:
            legs["sparsify"] = make_sparsify(args)
        except ImportError as err:
            missing[names["sparsify"]] = f"not installed ({err}); pip install -e '.[bench]'"
    legs["floor"] = (floor_step(args), None)
    times = timed({name: step for name, (step, _) in legs.items()}, batches, args.warmup, args.device)
    rows: dict[str, tuple[float, float] | str] = {
        names[name]: (statistics.median(times[name]), held_fvu(held))
        for name, (_, held_fvu) in legs.items() if held_fvu is not None}
    rows.update(missing)
    if args.saelens:  # another venv, another process: timed alone, so no ratio is printed against it
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "acts.pt"
            torch.save(data.float().cpu(), path)
            rows["SAELens TopK training SAE (not interleaved)"] = run_saelens(path, args)

    d_sae = args.d_in * args.expansion
    floor = statistics.median(times["floor"])
    gflops = 3 * 2 * args.batch * args.d_in * d_sae / floor / 1e9
    print(f"data: {note}")
    print(f"d_in={args.d_in} d_sae={d_sae} k={args.k} batch={args.batch} steps={args.steps} (median of "
          f"{args.steps - args.warmup} timed, contenders in turns batch by batch) lr={args.lr} device={args.device} "
          f"dtype={args.dtype} threads={torch.get_num_threads()} cores={os.cpu_count()}")
    print(f"dense matmul [B,d]x[d,d_sae]: {gflops:.1f} GFLOP/s -> floor (3 x 2 x B x d x d_sae) {floor:.3f} s/step")
    print(f"{'contender':<44}{'s/step':>9}{'steps/s':>9}{'tokens/s':>11}{'FVU held-out':>14}")
    for name, res in rows.items():
        if isinstance(res, str):
            print(f"{name:<44}  {res}")
        else:
            print(f"{name:<44}{res[0]:>9.3f}{1 / res[0]:>9.2f}{args.batch / res[0]:>11.0f}{res[1]:>14.4f}")
    if "sae" in times:
        if "sparsify" in times:
            print(f"ours vs sparsify: {ratio(times['sparsify'], times['sae'])} the speed (target >= 1.0)")
        print(f"ours vs floor: {ratio(times['sae'], times['floor'])} the floor time (target <= 1.5)")
        if "joint" in times:
            print(f"joint / SAE-only time: {ratio(times['joint'], times['sae'])} (target <= 1.15)")


if __name__ == "__main__":
    main()
