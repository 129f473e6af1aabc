"""Split suffix vs the bridge's full forward, per model family, on random-init models (no download).

What a battery pays per condition is the suffix from the hook (blocks L+1.., norm, unembedding at the readout
position); without the split it would pay a full forward. Per family and size this prints the time of
``SplitModel.suffix`` from the middle layer (readout position only, and all positions), of the generic
bridge-hook suffix, and of ``bridge(tokens)``, each the best of ``--repeats`` rounds on the same batch (taking turns), and the ratio
full / suffix. Target (issue 15): >= 1.6x for the fast adapters on the mid-size configs at the middle layer.

Usage: python bench/split.py [--sizes tiny,mid] [--families llama,gpt2,...] [--batch 8] [--seq 64]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from fis_interventions.models import default_hook, load_tokenizer
from fis_interventions.splice import SplitModel
from fis_interventions.tiny_models import FAMILY_NAMES, family_bridge

SIZES = {"tiny": (4, 64), "mid": (12, 512)}


def take_turns(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best time of each function, run in turns (one of each per round) so that load from other jobs on a
    shared machine hits every contender alike; one warm-up round first."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="tiny,mid")
    parser.add_argument("--families", default=",".join(FAMILY_NAMES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    tok = load_tokenizer()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(100, len(tok), (args.batch, args.seq), generator=gen)
    readout = torch.full((args.batch, 1), args.seq - 1)
    print(f"batch {args.batch}x{args.seq}, fp32, threads {torch.get_num_threads()}, best of {args.repeats}")
    print(f"{'family':9} {'size':5} {'hook':26} {'full ms':>8} {'suffix@1':>9} {'suffix@all':>10} {'generic':>8} "
          f"{'ratio@1':>8} {'ratio@all':>9}")
    for size in args.sizes.split(","):
        n_layers, d_model = SIZES[size]
        for family in args.families.split(","):
            bridge = family_bridge(family, tok, n_layers=n_layers, d_model=d_model)
            hook = default_hook(bridge)
            fast = SplitModel(bridge, hook)
            generic = SplitModel(bridge, hook, path="generic")
            resid, state = fast.prefix(tokens)
            _, gstate = generic.prefix(tokens)
            with torch.no_grad():
                t = take_turns({"full": lambda: bridge(tokens),
                                "one": lambda: fast.suffix(resid, state, readout),
                                "all": lambda: fast.suffix(resid, state),
                                "generic": lambda: generic.suffix(resid, gstate, readout)}, args.repeats)
            t_full, t_one, t_all, t_gen = t["full"], t["one"], t["all"], t["generic"]
            print(f"{family:9} {size:5} {hook:26} {1e3 * t_full:8.1f} {1e3 * t_one:9.1f} {1e3 * t_all:10.1f} "
                  f"{1e3 * t_gen:8.1f} {t_full / t_one:8.2f} {t_full / t_all:9.2f}", flush=True)
    print("ratio = full forward / fast suffix (>1 is faster); generic = the fallback's suffix (a full forward + hook)")


if __name__ == "__main__":
    main()
