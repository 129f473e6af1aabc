"""Which screen selects features that the battery confirms? Attribution vs activation vs random, measured.

    python bench/attribution_selection.py --checkpoint /work/shared-runs/demo/joint/checkpoint \
        [--designs stimuli/*.yaml bench/designs/negation_temperature.yaml] [--seeds 0 1] [--top 5] \
        [--out /work/scratch/attribution/selection.json]

For each design and split seed: ``fis screen --method activation,attribution`` (the Python API) on the
discovery items; the top ``--top`` features by the activation screen's interaction p, by the attribution
screen's (zero ablation), and ``--top`` random features (non-degenerate in the activation screen, any point).
Each selected feature is then zero-ablated by the battery's own stacked pass on the held-out confirmation items
(every prompt); its measured contrast shift, averaged over the prompts of a stimulus, gets the within-item 2x2
test (:func:`fis_interventions.stats.screen.screen_features`). Prints, per selector, the fraction of selected
features with a confirmation interaction p < 0.05 (and q < 0.05, BH within that selector's features of that
design and seed), pooled and per design, with exact (Clopper-Pearson) 95% intervals, and Fisher's exact test of
attribution vs activation on the pooled counts.

``--runs design:seed ...`` runs only those pairs (in that order); ``--resume`` keeps the records of the pairs
already in ``--out`` (each pair is written as soon as it is measured, so a stopped run loses at most one pair);
``--max-prompts N`` keeps the first N prompts of a design (for screening and confirmation alike; recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attribution import measured_shifts  # noqa: E402

from fis_interventions.attach import attach  # noqa: E402
from fis_interventions.designs import expand, read_design  # noqa: E402
from fis_interventions.models import load_model  # noqa: E402
from fis_interventions.screening import screen  # noqa: E402
from fis_interventions.stats.fdr import fdr_bh  # noqa: E402
from fis_interventions.stats.screen import screen_features  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def confirm(attached, design, items: list[str], picks: list[tuple[str, int]], contrast: str) -> np.ndarray:
    """Confirmation interaction p of each picked feature's measured zero-ablation shift."""
    rows = expand(design)
    rows = rows[rows["item"].astype(str).isin(items)].reset_index(drop=True)
    shifts = measured_shifts(attached, design, rows, [(p, j, 0.0) for p, j in picks], contrast)
    keys = pd.MultiIndex.from_arrays([rows["item"].astype(str), rows["cell"].astype(str)])
    per_stim = pd.DataFrame(shifts, index=keys).groupby(level=[0, 1], sort=False).mean()
    stim = rows.drop_duplicates(["item", "cell"]).reset_index(drop=True)
    a, b = list(design.factors)
    s = screen_features(per_stim.to_numpy(), stim, a, b, levels={k: list(v) for k, v in design.factors.items()},
                        item="item")
    return s["p_ab"].to_numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--designs", type=Path, nargs="+", default=sorted((ROOT / "stimuli").glob("*.yaml")) +
                    [ROOT / "bench" / "designs" / "negation_temperature.yaml"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("/work/scratch/attribution/selection.json"))
    ap.add_argument("--runs", nargs="+", default=None, help="design_name:seed pairs to run, in this order")
    ap.add_argument("--resume", action="store_true", help="keep the pairs already measured in --out")
    ap.add_argument("--max-prompts", type=int, default=None, help="first N prompts of each design only")
    args = ap.parse_args()
    bridge = load_model("smollm2-135m", device="cpu")
    attached = attach(bridge, args.checkpoint)
    records = json.loads(args.out.read_text())["records"] if args.resume and args.out.exists() else []
    done = {(r["design"], r["seed"]) for r in records}
    designs = {read_design(p).name: p for p in args.designs}
    pairs = ([(name, int(seed)) for name, seed in (r.rsplit(":", 1) for r in args.runs)] if args.runs
             else [(name, seed) for name in designs for seed in args.seeds])
    tmp = args.out.parent / "designs"
    for name, seed in pairs:
        if (name, seed) in done:
            continue
        path = designs[name]
        if args.max_prompts:
            path = trimmed(path, args.max_prompts, tmp)
        design = read_design(path)
        t0 = time.perf_counter()
        res = screen(args.checkpoint, path, bridge=bridge, method="activation,attribution", split_seed=seed,
                     progress=False, top=args.top, permutations=0, random_init=False)
        t = res.table
        contrast = res.summary["attribution"]["contrast"]
        ok = t[~t["degenerate"] & t["p_ab"].notna()]
        rng = np.random.default_rng(seed)
        picks = {
            "activation": ok.sort_values("p_ab").head(args.top),
            "attribution": t[t["attribution_zero_p_ab"].notna()].sort_values("attribution_zero_p_ab"
                                                                             ).head(args.top),
            "random": ok.iloc[rng.choice(len(ok), size=min(args.top, len(ok)), replace=False)],
        }
        items = [str(i) for i in res.summary["split"]["confirmation"]]
        for selector, frame in picks.items():
            pk = [(str(r.point), int(r.feature)) for r in frame.itertuples()]
            p = confirm(attached, design, items, pk, contrast)
            q = fdr_bh(p)
            for (point, feat), pv, qv in zip(pk, p, q, strict=True):
                records.append({"design": design.name, "seed": seed, "selector": selector, "point": point,
                                "feature": feat, "p_confirm": float(pv), "q_confirm": float(qv),
                                "max_prompts": args.max_prompts, "load": os.getloadavg()[0]})
        df = pd.DataFrame(records)
        cur = df[(df.design == design.name) & (df.seed == seed)]
        print(json.dumps({"design": design.name, "seed": seed, "seconds": round(time.perf_counter() - t0, 1),
                          "rate_p05": cur.groupby("selector")["p_confirm"].apply(lambda s: float((s < .05).mean())
                                                                                 ).to_dict()}), flush=True)
        write_summary(args, records, final=False)
    summary = write_summary(args, records, final=True)
    print(json.dumps({k: summary[k] for k in ("rate_p05", "rate_q05", "n", "ci95_p05", "fisher_attr_vs_act",
                                              "per_design_p05")}, indent=1))
    print(f"wrote {args.out}")


def trimmed(path: Path, n: int, folder: Path) -> Path:
    """A copy of the design with its first ``n`` prompts only (same name), under ``folder``."""
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    prompts = (data.get("readout") or {}).get("prompts")
    if isinstance(prompts, dict) and len(prompts) > n:
        data["readout"]["prompts"] = dict(list(prompts.items())[:n])
    elif isinstance(prompts, list) and len(prompts) > n:
        data["readout"]["prompts"] = prompts[:n]
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / Path(path).name
    out.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return out


def exact_ci(k: int, n: int) -> list[float]:
    """Clopper-Pearson 95% interval of k successes in n."""
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(0.95, method="exact")
    return [float(ci.low), float(ci.high)]


def write_summary(args, records: list[dict], final: bool) -> dict:
    """Rates per selector (pooled, per design) and every record; written after each design x seed, so an
    interrupted run keeps what it measured (``complete`` says whether every design and seed ran)."""
    df = pd.DataFrame(records)
    summary = {"complete": final,
        "top": args.top, "seeds": args.seeds, "designs": [str(p) for p in args.designs],
        "rate_p05": df.groupby("selector")["p_confirm"].apply(lambda s: float((s < .05).mean())).to_dict(),
        "rate_q05": df.groupby("selector")["q_confirm"].apply(lambda s: float((s < .05).mean())).to_dict(),
        "n": df.groupby("selector").size().to_dict(),
        "k_p05": {k: int(v) for k, v in df.groupby("selector")["p_confirm"].apply(lambda s: (s < .05).sum()).items()},
        "runs": sorted({f"{d}:{s}" for d, s in zip(df["design"], df["seed"], strict=True)}),
        "per_design_p05": df.groupby(["design", "selector"])["p_confirm"].apply(
            lambda s: float((s < .05).mean())).unstack().to_dict(),
        "records": records,
    }
    summary["ci95_p05"] = {k: exact_ci(summary["k_p05"][k], int(summary["n"][k])) for k in summary["k_p05"]}
    if {"activation", "attribution"} <= set(summary["k_p05"]):
        from scipy.stats import fisher_exact

        ka, na = summary["k_p05"]["attribution"], int(summary["n"]["attribution"])
        kc, nc = summary["k_p05"]["activation"], int(summary["n"]["activation"])
        summary["fisher_attr_vs_act"] = float(fisher_exact([[ka, na - ka], [kc, nc - kc]])[1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
