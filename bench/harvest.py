"""Harvest throughput vs a bare `model(tokens, stop_at_layer=L+1)` loop on the same tokens, in one run.

Target (issue 2): ratio >= 0.9. Usage: python bench/harvest.py [--tokens 8000] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from fis_interventions.activations import harvest
from fis_interventions.corpus import ContextBatcher
from fis_interventions.models import default_hook, load_model, resolve_hook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context-length", type=int, default=128)
    args = parser.parse_args()

    bridge = load_model(args.model, device="auto")
    hook = resolve_hook(bridge, default_hook(bridge))
    n_ctx = -(-args.tokens // (args.context_length - 1))
    contexts = ContextBatcher(bridge.tokenizer, args.context_length).contexts(["default"], max_contexts=n_ctx)
    device = next(bridge.original_model.parameters()).device

    def bare() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for b in range(0, len(contexts), args.batch_size):
                bridge(contexts[b:b + args.batch_size].to(device), stop_at_layer=hook.stop_at_layer)
        return time.perf_counter() - start

    def ours() -> float:
        out = Path(tempfile.mkdtemp())
        try:
            start = time.perf_counter()
            harvest(bridge=bridge, model=args.model, out=out / "acts", tokens=args.tokens,
                    context_length=args.context_length, batch_size=args.batch_size, progress=False)
            return time.perf_counter() - start
        finally:
            shutil.rmtree(out, ignore_errors=True)

    bare()  # warm-up
    t_bare = min(bare(), bare())
    t_ours = min(ours(), ours())
    n_tok = contexts.numel()
    print(f"model {args.model}, hook {hook.name}, {n_tok} tokens, batch {args.batch_size}x{args.context_length}, "
          f"threads {torch.get_num_threads()}, device {device}")
    print(f"bare stop_at_layer loop : {n_tok / t_bare:8.0f} tokens/s")
    print(f"fis harvest (to shards) : {n_tok / t_ours:8.0f} tokens/s (includes tokenising, exclusion, stats, writes)")
    print(f"ratio harvest/bare      : {t_bare / t_ours:8.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
