"""Harvest throughput vs a bare `model(tokens, stop_at_layer=L+1)` loop on the same tokens, in one run.

Target (issue 2): ratio >= 0.9. Usage: python bench/harvest.py [--tokens 8000] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import statistics
import sys
from pathlib import Path

import torch

from fis_interventions.activations import harvest
from fis_interventions.corpus import ContextBatcher
from fis_interventions.models import default_hook, load_model, resolve_hook

sys.path.insert(0, str(Path(__file__).resolve().parent))
from interleave import interleave, ratio  # noqa: E402  (bench/interleave.py: the one rule for ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (bare, ours) x this")
    args = parser.parse_args()

    bridge = load_model(args.model, device="auto")
    hook = resolve_hook(bridge, default_hook(bridge))
    n_ctx = -(-args.tokens // (args.context_length - 1))
    contexts = ContextBatcher(bridge.tokenizer, args.context_length).contexts(["default"], max_contexts=n_ctx)
    device = next(bridge.original_model.parameters()).device

    def bare() -> None:
        with torch.no_grad():
            for b in range(0, len(contexts), args.batch_size):
                bridge(contexts[b:b + args.batch_size].to(device), stop_at_layer=hook.stop_at_layer)

    def ours() -> None:
        out = Path(tempfile.mkdtemp())
        try:
            harvest(bridge=bridge, model=args.model, out=out / "acts", tokens=args.tokens,
                    context_length=args.context_length, batch_size=args.batch_size, progress=False)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else None
    times = interleave({"bare": bare, "ours": ours}, rounds=args.rounds, warmup=1, sync=sync)
    t_bare, t_ours = statistics.median(times["bare"]), statistics.median(times["ours"])
    n_tok = contexts.numel()
    print(f"model {args.model}, hook {hook.name}, {n_tok} tokens, batch {args.batch_size}x{args.context_length}, "
          f"threads {torch.get_num_threads()}, device {device}")
    print(f"bare stop_at_layer loop : {n_tok / t_bare:8.0f} tokens/s")
    print(f"fis harvest (to shards) : {n_tok / t_ours:8.0f} tokens/s (includes tokenising, exclusion, stats, writes)")
    print(f"ratio harvest/bare      : {ratio(times['bare'], times['ours'])}  (target >= 0.9)")


if __name__ == "__main__":
    main()
