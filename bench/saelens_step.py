"""SAELens' TopK training SAE timed on a saved activation tensor; run by bench/peers.py in bench/.venv-saelens.

Mirrors SAELens' own training step (``training_forward_pass``, backward, Adam, and the decoder handling its
TopK config implies: with ``rescale_acts_by_decoder_norm`` the decoder is not renormalised). Prints one JSON
line ``{"sec": median seconds per step, "fvu": held-out FVU}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    for name, typ in (("batch", int), ("steps", int), ("warmup", int), ("expansion", int), ("k", int),
                      ("lr", float), ("threads", int), ("device", str), ("dtype", str)):
        ap.add_argument(f"--{name}", type=typ, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = torch.load(args.data).to(args.device, getattr(torch, args.dtype))
    held, batches = data[:args.batch], list(data[args.batch:].split(args.batch))
    d_in = data.shape[1]
    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_in * args.expansion, k=args.k,
                                                dtype=args.dtype, device=args.device))
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
    times = []
    for i, x in enumerate(batches):
        t = time.perf_counter()
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None,
                                                       n_training_steps=i, is_logging_step=False))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    with torch.no_grad():
        recon = sae(held)
        fvu = float((recon - held).square().sum() / (held - held.mean(0)).square().sum())
    print(json.dumps({"sec": statistics.median(times), "fvu": fvu}))


if __name__ == "__main__":
    main()
