"""Speed of `fis power`: 1000 simulated 24-item data sets analysed with the primary model (target < 60 s).

Times the balanced closed form (what `fis power` uses below 5 prompts) and, for scale, full REML fits of the
same model by the profiled-deviance engine on a few of the same data sets (per-fit cost x 1000).

    python bench/power.py            # --sims 1000 --items 24 --full 20
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fis_interventions.stats.power import PowerSpec, _fit_test, closed_form_test, power_curve, simulate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sims", type=int, default=1000)
    ap.add_argument("--items", type=int, default=24)
    ap.add_argument("--full", type=int, default=20, help="data sets also fitted in full, for the per-fit cost")
    args = ap.parse_args()
    spec = PowerSpec(0.5, 1.0, var_item=1.0, var_a=0.5, var_b=0.5, var_ab=2.0, reps=2)
    started = time.perf_counter()
    curve = power_curve(spec, [args.items], n_sims=args.sims, seed=0)
    closed = time.perf_counter() - started
    print(f"closed form: {args.sims} simulations of {args.items} items x 4 cells x 2 obs in {closed:.3f} s "
          f"(target < 60 s: {'met' if closed < 60 else 'NOT met'}); power {curve['power'].iloc[0]:.3f}")
    y = simulate(spec, args.items, args.full, np.random.default_rng(1))
    started = time.perf_counter()
    est, F, df = _fit_test(y, 1)
    per_fit = (time.perf_counter() - started) / args.full
    _, F2, df2 = closed_form_test(y)
    print(f"full REML fits: {per_fit:.3f} s per data set -> {per_fit * args.sims:.0f} s for {args.sims} "
          f"({per_fit * args.sims / closed:.0f}x the closed form); largest relative F difference "
          f"{np.max(np.abs(F / F2 - 1)):.1e}, df {np.max(np.abs(df / df2 - 1)):.1e}")


if __name__ == "__main__":
    main()
