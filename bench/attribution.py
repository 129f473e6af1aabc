"""Attribution vs real clamps, and attribution screen time vs activation screen time, on a real checkpoint.

    python bench/attribution.py --checkpoint /work/shared-runs/demo/joint/checkpoint \
        [--design stimuli/formality_emotion.yaml] [--items 4] [--features 40] [--steps 8] \
        [--clamps zero scale:4 scale:-4 set_max:1 set_max:5] \
        [--speed-reps 2] [--out /work/scratch/attribution/validation.json]

Validation: on the discovery items (first ``--items`` of them), the estimated contrast shift of every feature
(:func:`fis_interventions.attribution.attribute`, ``attribution`` and ``ig``) is compared with the shift the
battery measures (its own stacked pass: ``interventions.battery._stacked_logits``, copy 0 clean) for
``--features`` features per point (half the largest |estimate|, half random among those active on the rows),
per stimulus row (stimulus x prompt), for every ``--clamps`` condition (default: zero ablation, the demo
battery's ``scale`` 4 and -4, ``set`` to 1x and 5x the feature's largest activation on the rows). Prints
Spearman and Pearson per point and clamp value (over all feature x row pairs and over the pairs where the
feature is active on the row), the Spearman of the interaction effect (within-item contrast of the
per-stimulus shift) over features and the overlap of the top 20 by |interaction| between estimate and
measurement, and, for the largest 10% of measured shifts, the median |estimate| / |measured| and the sign
agreement (where a linear estimate fails first). ``ig`` is compared for zero ablation (its path).

Speed: ``fis screen`` (the Python API, the model loaded once) with ``--method activation`` and with
``--method attribution`` (which computes the activation screen too) on every point of the checkpoint and every
discovery item of the design, one attribution leg per ``--precisions`` value (float32 and bfloat16), legs
interleaved, ``--speed-reps`` rounds; prints the median per-round ratio of each attribution leg to the activation
leg, its IQR and min-max and the load average (``bench/interleave.py``).

Precision (``--precision-check``): the attribution estimates and screen in float32 against bfloat16 on the
discovery items (Spearman of the estimates per point, the largest difference relative to their range, Spearman of
the interaction p, the q < .05 hits and top 20 shared).
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
import torch
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from interleave import interleave, ratio  # noqa: E402  (bench/interleave.py: the one rule for ratios)

from fis_interventions.attach import attach  # noqa: E402
from fis_interventions.attribution import attribute  # noqa: E402
from fis_interventions.designs import expand, read_design  # noqa: E402
from fis_interventions.holdout import split_items  # noqa: E402
from fis_interventions.interventions.battery import Readouts, _prepare, _stacked_logits, encode_rows  # noqa: E402
from fis_interventions.interventions.features import Condition, Target  # noqa: E402
from fis_interventions.models import load_model  # noqa: E402
from fis_interventions.screening import DEFAULT_POINTS, screen, stimulus_rows  # noqa: E402


def discovery_rows(design, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The battery rows (stimulus x prompt) and stimulus rows of the discovery items, and the split."""
    stim = stimulus_rows(design)
    split = split_items(stim, 0.5, seed, design.shape, source=str(design.source))
    rows = expand(design)
    return rows, stim, split


def discovery_only(design, seed: int = 0) -> pd.DataFrame:
    """The battery rows (stimulus x prompt) of the discovery items only: what a screen attributes."""
    rows, _, split = discovery_rows(design, seed)
    return rows[rows["item"].astype(str).isin(set(split["discovery"]))].reset_index(drop=True)


@torch.no_grad()
def measured_shifts(attached, design, rows: pd.DataFrame, targets: list[tuple],
                    contrast: str, batch_size: int = 8, max_blocks: int = 24) -> np.ndarray:
    """The battery's measured contrast shift [n_rows, n_targets] per target ``(point, feature, value)`` (``set
    feature = value``) or ``(point, feature, value, kind)`` (kind ``set``, ``scale``, ``add``)."""
    tok = attached.split.bridge.tokenizer
    readouts = Readouts.for_design(design, tok)
    out = np.empty((len(rows), len(targets)))
    for s in range(0, len(rows), batch_size):
        part = rows.iloc[s:s + batch_size]
        prep = _prepare(attached, encode_rows(part, tok))
        for c in range(0, len(targets), max_blocks):
            chunk = targets[c:c + max_blocks]
            blocks = [(Target(t[0], (t[1],), "bench"), Condition(t[3] if len(t) > 3 else "set", t[2], "all", t[2]))
                      for t in chunk]
            logits = _stacked_logits(attached, prep, prep.enc.readout.unsqueeze(1), blocks)[:, 0]
            con = readouts.scores(logits)[1][contrast].double().view(len(blocks) + 1, len(part))
            out[s:s + len(part), c:c + len(chunk)] = (con[1:] - con[:1]).T.cpu().numpy()
    return out


@torch.no_grad()
def feature_max(attached, design, rows: pd.DataFrame, points) -> dict[str, np.ndarray]:
    """Largest activation of every feature of every point on the kept positions of ``rows``."""
    tok = attached.split.bridge.tokenizer
    best: dict[str, np.ndarray] = {}
    for s in range(0, len(rows), 16):
        prep = _prepare(attached, encode_rows(rows.iloc[s:s + 16], tok))
        out = attached.joint(prep.x, "full")
        vals = {"sae.hook_latents": out.latents.dense(), "nfm.hook_hidden": out.hidden,
                "secondary.hook_latents": out.secondary_latents.dense()}
        for p in points:
            m = vals[p].max(0).values.double().numpy()
            best[p] = m if p not in best else np.maximum(best[p], m)
    return best


def interaction(X: np.ndarray, rows: pd.DataFrame, design) -> np.ndarray:
    """Interaction contrast (a1b1 - a1b2 - a2b1 + a2b2) of the per-stimulus means (mean over prompts), averaged
    over items: the screen's effect size, computable from a single item."""
    a, b = list(design.factors)
    la, lb = design.factors[a], design.factors[b]
    sign = {(la[0], lb[0]): 1.0, (la[0], lb[1]): -1.0, (la[1], lb[0]): -1.0, (la[1], lb[1]): 1.0}
    w = np.array([sign[x, y] for x, y in zip(rows[a].astype(str), rows[b].astype(str), strict=True)])
    per_cell = rows.groupby(["item", a, b]).size()  # rows per (item, cell): the prompts
    n = np.array([per_cell[i, x, y] for i, x, y in zip(rows["item"], rows[a], rows[b], strict=True)])
    return (w / n) @ X / rows["item"].nunique()


CLAMPS = ("zero", "scale:4", "scale:-4", "set_max:1", "set_max:5")


def parse_clamp(spec: str) -> tuple[str, float]:
    """``zero`` | ``scale:S`` | ``add:A`` | ``set:V`` | ``set_max:M`` (set to M x the feature's max on the rows)."""
    if spec == "zero":
        return "set", 0.0
    kind, _, value = spec.partition(":")
    if kind not in ("scale", "add", "set", "set_max") or not value:
        raise SystemExit(f"--clamps: bad entry {spec!r} (use zero, scale:S, add:A, set:V, set_max:M)")
    return kind, float(value)


def agreement(est: np.ndarray, real: np.ndarray, active: np.ndarray, rows: pd.DataFrame, design) -> dict:
    """Spearman / Pearson of estimate vs measurement over feature x row pairs (all pairs, and the pairs where
    the feature is active on the row: inactive pairs of ``set 0`` / ``scale`` are exactly 0 on both sides);
    the interaction contrast's Spearman over features and the overlap of the top 20 by |interaction|."""
    x, y = est.ravel(), real.ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    act = ok & active.ravel()
    ia, ir = interaction(est, rows, design), interaction(real, rows, design)
    k = min(20, est.shape[1])
    top_e, top_r = set(np.argsort(-np.abs(ia))[:k]), set(np.argsort(-np.abs(ir))[:k])
    big = ok & (np.abs(y) >= np.quantile(np.abs(y[ok]), 0.9))  # the largest 10% of measured shifts

    def corr(mask: np.ndarray, fn) -> float | None:
        return float(fn(x[mask], y[mask])[0]) if mask.sum() > 2 and np.std(x[mask]) > 0 and np.std(y[mask]) > 0 \
            else None

    return {"pairs": int(ok.sum()), "spearman": corr(ok, sps.spearmanr), "pearson": corr(ok, sps.pearsonr),
            "active_pairs": int(act.sum()), "spearman_active": corr(act, sps.spearmanr),
            "pearson_active": corr(act, sps.pearsonr),
            "interaction_spearman": float(sps.spearmanr(ia, ir)[0]), "top_k": k,
            "top_overlap": len(top_e & top_r),
            "median_abs_ratio_active": float(np.median(np.abs(x[act]) / np.maximum(np.abs(y[act]), 1e-9)))
            if act.any() else None,
            "largest10pct_median_abs_ratio": float(np.median(np.abs(x[big]) / np.maximum(np.abs(y[big]), 1e-9))),
            "largest10pct_sign_agreement": float(np.mean(np.sign(x[big]) == np.sign(y[big])))}


@torch.no_grad()
def active_on_rows(attached, rows: pd.DataFrame, points) -> dict[str, np.ndarray]:
    """[n_rows, width] bool per point: the feature is non-zero at some kept position of the row."""
    tok = attached.split.bridge.tokenizer
    out: dict[str, list] = {p: [] for p in points}
    for s in range(0, len(rows), 16):
        prep = _prepare(attached, encode_rows(rows.iloc[s:s + 16], tok))
        t = prep.resid.shape[1]
        row_of = torch.div(prep.keep_idx, t, rounding_mode="floor")
        res = attached.joint(prep.x, "full")
        vals = {"sae.hook_latents": res.latents.dense(), "nfm.hook_hidden": res.hidden,
                "secondary.hook_latents": res.secondary_latents.dense()}
        for p in points:
            nz = (vals[p] != 0).to(torch.int32)
            out[p].append((nz.new_zeros(len(prep.enc.tokens), nz.shape[1]).index_add_(0, row_of, nz) > 0).numpy())
    return {p: np.concatenate(v) for p, v in out.items()}


def validate(args, bridge) -> dict:
    design = read_design(args.design)
    attached = attach(bridge, args.checkpoint)
    rows, _, split = discovery_rows(design, args.seed)
    items = [str(i) for i in split["discovery"]][:args.items]
    rows = rows[rows["item"].astype(str).isin(items)].reset_index(drop=True)
    points = [p for p in DEFAULT_POINTS if p in attached.joint.hook_points()]
    if args.points:
        points = [p for p in points if p in args.points]
    t0 = time.perf_counter()
    lin = attribute(attached, design, rows, points, method="attribution", batch_size=8)
    t_lin = time.perf_counter() - t0
    t0 = time.perf_counter()
    ig = (attribute(attached, design, rows, points, method="ig", steps=args.steps, batch_size=8) if args.steps
          else None)
    t_ig = time.perf_counter() - t0
    print(json.dumps({"rows": len(rows), "seconds_attribution": round(t_lin, 1), "seconds_ig": round(t_ig, 1),
                      "load": os.getloadavg()}), flush=True)
    fmax = feature_max(attached, design, rows, points)
    active = active_on_rows(attached, rows, points)
    rng = np.random.default_rng(args.seed)
    report: dict = {"design": str(args.design), "items": items, "rows": len(rows), "contrast": lin.contrast,
                    "steps": args.steps, "seconds": {"attribution": t_lin, "ig": t_ig}, "points": {}}
    for point in points:
        est0 = lin.estimate(point, "set", 0.0)
        live = np.flatnonzero(fmax[point] > 0)
        by_size = live[np.argsort(-np.abs(est0[:, live]).sum(0))]
        half = args.features // 2
        chosen = list(by_size[:half])
        rest = np.setdiff1d(live, chosen)
        chosen += list(rng.choice(rest, size=min(len(rest), args.features - len(chosen)), replace=False))
        chosen = np.array(sorted(chosen))
        entry: dict = {"features": len(chosen), "rows": len(rows)}
        for spec in args.clamps:
            kind, v = parse_clamp(spec)
            values = [float(v * fmax[point][j]) if kind == "set_max" else v for j in chosen]
            bkind = "set" if kind == "set_max" else kind
            t0 = time.perf_counter()
            real = measured_shifts(attached, design, rows,
                                   [(point, int(j), val, bkind) for j, val in zip(chosen, values, strict=True)],
                                   lin.contrast)
            res: dict = {"seconds_measured": round(time.perf_counter() - t0, 1)}
            act = active[point][:, chosen] if bkind in ("set", "scale") and (bkind == "scale" or v == 0) \
                else np.ones_like(real, dtype=bool)
            for name, r in (("attribution", lin), ("ig", ig)):
                if r is None or (name == "ig" and spec != "zero"):
                    continue  # ig integrates the zero-ablation path only
                est = np.column_stack([r.estimate(point, bkind, val)[:, j] for j, val in
                                       zip(chosen, values, strict=True)])
                res[name] = agreement(est, real, act, rows, design)
            entry[spec] = res
            print(json.dumps({point: {spec: res}, "load": os.getloadavg()}), flush=True)
        report["points"][point] = entry
    return report


def speed(args, bridge) -> dict:
    """The activation screen against the attribution screen at each ``--precisions`` value, legs interleaved;
    one ratio per precision (each attribution leg against the same activation legs)."""
    if args.threads:
        torch.set_num_threads(args.threads)

    def leg(method: str, precision: str = "float32"):
        return lambda: screen(args.checkpoint, args.design, bridge=bridge, method=method, progress=False,
                              batch_size=16, precision=precision)

    legs = {"activation": leg("activation")}
    legs.update({f"attribution_{p}": leg("attribution", p) for p in args.precisions})
    # legs in turns (bench/interleave.py); one thread is timed in CPU seconds (what the load cannot inflate)
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    times = interleave(legs, rounds=args.speed_reps, warmup=1, clock=clock)
    med = {k: float(np.median(v)) for k, v in times.items()}
    out = {"seconds": times, "median": med, "threads": torch.get_num_threads(),
           "clock": "cpu" if clock is time.process_time else "wall", "ratios": {}}
    for p in args.precisions:
        r = ratio(times[f"attribution_{p}"], times["activation"])
        out["ratios"][p] = {"median": r.median, "iqr": [r.q1, r.q3], "min_max": [r.low, r.high]}
        out["load"] = r.load
    print(json.dumps({"speed": out}), flush=True)
    return out


def precision_agreement(args, bridge) -> dict:
    """The attribution screen in float32 and in bfloat16 on the same design: how far the estimates and the
    screen's statistics move (Spearman and max |difference| / range of the per-stimulus estimates per point,
    Spearman of the interaction p, the q < .05 sets and the top 20 by p)."""
    from fis_interventions.attribution import attribute

    design = read_design(args.design)
    rows = discovery_only(design, args.seed)
    attached = attach(bridge, args.checkpoint)
    est = {p: attribute(attached, design, rows, DEFAULT_POINTS, precision=p) for p in ("float32", "bfloat16")}
    tables = {p: screen(args.checkpoint, args.design, bridge=bridge, method="attribution", progress=False,
                        precision=p, permutations=0, random_init=False).table for p in ("float32", "bfloat16")}
    out: dict = {"points": {}}
    for point in est["float32"].A:
        a, b = est["float32"].estimate(point).ravel(), est["bfloat16"].estimate(point).ravel()
        live = a != 0
        out["points"][point] = {"spearman": float(sps.spearmanr(a[live], b[live])[0]),
                                "pearson": float(np.corrcoef(a, b)[0, 1]),
                                "max_abs_diff_over_range": float(np.abs(a - b).max() / (a.max() - a.min()))}
    col = "attribution_zero_"
    t32, t16 = (tables[p].set_index(["point", "feature"]) for p in ("float32", "bfloat16"))
    both = t32[col + "p_ab"].notna() & t16[col + "p_ab"].notna()
    hits = {p: set(t[t[col + "q_ab"] < 0.05].index) for p, t in (("float32", t32), ("bfloat16", t16))}
    top = {p: set(t[col + "p_ab"].sort_values(kind="stable").head(20).index) for p, t in (("float32", t32),
                                                                                            ("bfloat16", t16))}
    out.update({"p_spearman": float(sps.spearmanr(t32.loc[both, col + "p_ab"], t16.loc[both, col + "p_ab"])[0]),
                "hits_float32": len(hits["float32"]), "hits_bfloat16": len(hits["bfloat16"]),
                "hits_shared": len(hits["float32"] & hits["bfloat16"]),
                "top20_overlap": len(top["float32"] & top["bfloat16"])})
    print(json.dumps({"precision": out}), flush=True)
    return out


def packing_agreement(args, bridge) -> dict:
    """A design with prompts: per stimulus, the estimates with each stimulus' prompts packed into one sequence
    against the unpacked rows' mean over prompts (largest difference relative to the range, per point), and the
    time of each (CPU seconds at one thread)."""
    from fis_interventions.attribution import attribute
    from fis_interventions.screening_attribution import prompt_means

    design = read_design(args.design)
    rows = discovery_only(design, args.seed)
    attached = attach(bridge, args.checkpoint)
    res, secs = {}, {}
    for pack in (False, True):
        t0 = time.process_time()
        res[pack] = attribute(attached, design, rows, DEFAULT_POINTS, pack=pack)
        secs[pack] = time.process_time() - t0
    M = prompt_means(rows, rows.drop_duplicates(["item", "cell"])[["item", "cell"]].reset_index(drop=True))
    out: dict = {"rows": len(rows), "seconds_unpacked": secs[False], "seconds_packed": secs[True], "points": {}}
    for point in res[False].A:
        a, b = M @ res[False].estimate(point), M @ res[True].estimate(point)
        out["points"][point] = {"max_abs_diff_over_range": float(np.abs(a - b).max() / (a.max() - a.min()))}
    print(json.dumps({"packing": out}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--design", type=Path, default=Path(__file__).resolve().parents[1] / "stimuli" /
                    "formality_emotion.yaml")
    ap.add_argument("--items", type=int, default=4)
    ap.add_argument("--features", type=int, default=40)
    ap.add_argument("--clamps", nargs="+", default=list(CLAMPS),
                    help="zero, scale:S, add:A, set:V, set_max:M (M x the feature's max on the rows)")
    ap.add_argument("--steps", type=int, default=8, help="integrated-gradient points (0: no ig leg)")
    ap.add_argument("--points", nargs="+", default=None, help="only these points (default: every point)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--speed-reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for the speed legs (0: torch's default); 1 is steadier on a shared machine")
    ap.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"],
                    help="attribution legs of the speed run, one per suffix precision")
    ap.add_argument("--skip", choices=["none", "speed", "validate"], default="none")
    ap.add_argument("--pack-check", action="store_true",
                    help="also compare packed and unpacked attribution of a design with prompts (per stimulus)")
    ap.add_argument("--precision-check", action="store_true",
                    help="also compare the float32 and bfloat16 attribution screens (estimates, p, hits, top 20)")
    ap.add_argument("--out", type=Path, default=Path("/work/scratch/attribution/validation.json"))
    ap.add_argument("--trace-every", type=float, default=0.0, help="dump stacks every N seconds (0: off)")
    args = ap.parse_args()
    if args.trace_every:  # where a slow run is: every N seconds, the stack of every thread to stderr
        import faulthandler

        faulthandler.dump_traceback_later(args.trace_every, repeat=True)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    bridge = load_model("smollm2-135m", device="cpu")
    print(json.dumps({"model_load_seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    report = {}
    if args.skip != "speed":
        report["speed"] = speed(args, bridge)
    if args.precision_check:
        report["precision"] = precision_agreement(args, bridge)
    if args.pack_check:
        report["packing"] = packing_agreement(args, bridge)
    if args.skip != "validate":
        report["validation"] = validate(args, bridge)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
