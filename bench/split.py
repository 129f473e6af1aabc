"""Split suffix vs the bridge's full forward, per model family, on random-init models (no download).

What a battery pays per condition is the suffix from the hook (blocks L+1.., norm, unembedding at the readout
position); without the split it would pay a full forward. Per family and size this prints the time of
``SplitModel.suffix`` from the middle layer (readout position only, and all positions), of the generic
bridge-hook suffix, and of ``bridge(tokens)``, the legs in turns on the same batch (``--repeats`` rounds), and the median per-round ratio
full / suffix with its IQR and the load average (``bench/interleave.py``). Target (issue 15): >= 1.6x for the fast adapters on the mid-size configs at the middle layer.

Usage: python bench/split.py [--sizes tiny,mid] [--families llama,gpt2,...] [--batch 8] [--seq 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from fis_interventions.models import default_hook, load_tokenizer, weights_device
from fis_interventions.splice import SplitModel
from fis_interventions.tiny_models import FAMILY_NAMES, family_bridge

sys.path.insert(0, str(Path(__file__).resolve().parent))
from interleave import interleave, ratio  # noqa: E402  (bench/interleave.py: the one rule for ratios)

SIZES = {"tiny": (4, 64), "mid": (12, 512)}


def legs(bridge, hook: str, tokens: torch.Tensor, readout: torch.Tensor) -> dict:
    """The timed legs on one batch: the full forward, the fast suffix at the readout position and at all
    positions, the generic suffix. Token ids and positions go to the model's device first (built on the CPU,
    they would be a device-mismatch error on a GPU, as bench/battery.py's were)."""
    device = weights_device(bridge)
    tokens, readout = tokens.to(device), readout.to(device)
    fast = SplitModel(bridge, hook)
    generic = SplitModel(bridge, hook, path="generic")
    with torch.no_grad():
        resid, state = fast.prefix(tokens)
        _, gstate = generic.prefix(tokens)
    return {"full": lambda: bridge(tokens),
            "one": lambda: fast.suffix(resid, state, readout),
            "all": lambda: fast.suffix(resid, state),
            "generic": lambda: generic.suffix(resid, gstate, readout)}


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
    print(f"batch {args.batch}x{args.seq}, fp32, threads {torch.get_num_threads()}, medians of {args.repeats} interleaved rounds")
    print(f"{'family':9} {'size':5} {'hook':26} {'full ms':>8} {'suffix@1':>9} {'suffix@all':>10} {'generic':>8} "
          f"{'ratio@1':>8} {'ratio@all':>9}")
    for size in args.sizes.split(","):
        n_layers, d_model = SIZES[size]
        for family in args.families.split(","):
            bridge = family_bridge(family, tok, n_layers=n_layers, d_model=d_model)
            hook = default_hook(bridge)
            with torch.no_grad():
                t = interleave(legs(bridge, hook, tokens, readout), args.repeats)
            t_full, t_one, t_all, t_gen = (statistics.median(t[k]) for k in ("full", "one", "all", "generic"))
            r_one, r_all = ratio(t["full"], t["one"]), ratio(t["full"], t["all"])
            print(f"{family:9} {size:5} {hook:26} {1e3 * t_full:8.1f} {1e3 * t_one:9.1f} {1e3 * t_all:10.1f} "
                  f"{1e3 * t_gen:8.1f} {r_one.median:8.2f} {r_all.median:9.2f}  "
                  f"@1 IQR {r_one.q1:.2f}-{r_one.q3:.2f}, {r_one.load}", flush=True)
    print("ratio = median over rounds of full forward / fast suffix (>1 is faster), legs in turns on the same batch "
          "(bench/interleave.py); generic = the fallback's suffix (a full forward + hook)")


if __name__ == "__main__":
    main()
