"""The whole pipeline under the null: how often does it say "yes"?

    python bench/pipeline_null.py [--reps 20] [--legs random,permuted] [--max-seconds 3000] [--json out.json]
                                  [--jsonl reps.jsonl] [--summarise reps.jsonl] [--directions 2]

Each repetition runs `fis screen` -> `fis battery` -> the report's analysis (manipulation check, primary
tests, feature vs matched controls, verdict) on the tiny random model (`tiny-random`) with a fresh random-init
joint checkpoint (seed = repetition), on the negation x sentiment design (15 items; the screen's discovery half
selects 2 top SAE latents, the battery tests them on the held-out half with 2 matched controls each, the
primary clamp is zero ablation on the `valence` contrast):

- leg ``random``: the design as written (a random-init checkpoint carries no learned interaction);
- leg ``permuted``: the four cell texts of every item shuffled among the cells (seeded), so the cell labels
  mean nothing.

A random-init model's readout does not measure sentiment, so the manipulation check fails and the verdict is
"inconclusive" by that rule alone; the bench also reports the verdict with the manipulation check ignored
(the feature and feature-vs-controls rules alone), which is what must stay at or below 5%. Rates come with
exact (Clopper-Pearson) 95% intervals. Small sizes and a time bound: this is a calibration benchmark on a
shared 2-core machine, not a test.

Everything runs in one process through the Python API (`screen`, `battery`, `analyze_run` + `verdicts`, the
code `fis report` runs), with the tiny model loaded once. With ``--jsonl`` every finished repetition is appended
to that file (with its seconds and the load average) and repetitions already there are skipped, so a stopped
run continues where it stopped; ``--summarise FILE`` prints the table of a JSONL without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from scipy import stats as sps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

DESIGN = ROOT / "stimuli" / "negation_sentiment.yaml"


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    a = 1 - level
    lo = 0.0 if k == 0 else float(sps.beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(sps.beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def load_rows(path: Path | None) -> list[dict[str, Any]]:
    """Finished repetitions of an earlier (possibly stopped) run: one JSON object per line; a torn last line
    (the run was killed mid-write) is ignored."""
    if path is None or not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_row(path: Path | None, row: dict[str, Any]) -> None:
    """One finished repetition, appended and flushed to disk before the next starts."""
    if path is None:
        return
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def timed(fn: Any, *args: Any) -> dict[str, Any]:
    """``fn(*args)`` (a dict) with its wall seconds and the 1-minute load average at its end."""
    t = time.perf_counter()
    row = fn(*args)
    row["seconds"] = round(time.perf_counter() - t, 2)
    row["load1"] = round(os.getloadavg()[0], 2)
    return row


def permuted_design(src: Path, dst: Path, seed: int) -> Path:
    """The design with each item's four cell texts shuffled among its cells (labels carry no meaning)."""
    from fis_interventions.designs import expand, load_design

    raw = yaml.safe_load(src.read_text(encoding="utf-8"))
    rows = expand(load_design(src)).drop_duplicates(["item", "cell"])
    rng = random.Random(seed)
    items = []
    for item, sub in rows.groupby("item", sort=False):
        cells, texts = list(sub["cell"]), list(sub["stimulus"])
        rng.shuffle(texts)
        items.append({"id": str(item), "cells": dict(zip(cells, texts, strict=True))})
    out = {"name": raw["name"] + "_permuted", "factors": raw["factors"], "items": items, "readout": raw["readout"]}
    dst.write_text(yaml.safe_dump(out, sort_keys=False), encoding="utf-8")
    return dst


def one_rep(bridge: Any, root: Path, seed: int, leg: str, directions: int = 0) -> dict[str, Any]:
    """screen -> battery -> analysis for one random-init checkpoint; returns the verdicts and the tests.
    ``directions``: also that many norm-matched random residual directions per top feature (a second kind of
    control: a "yes" must then beat both kinds)."""
    from fis_interventions.errors import FisError
    from fis_interventions.interventions import BatteryConfig, battery
    from fis_interventions.reports.analysis import analyze_run
    from fis_interventions.reports.inference import verdicts
    from fis_interventions.reports.runfolder import load_run
    from fis_interventions.screening import screen
    from tiny_checkpoints import save_tiny_joint_checkpoint

    ckpt = save_tiny_joint_checkpoint(root / "ckpt", bridge.tokenizer, seed=seed)
    design = DESIGN if leg == "random" else permuted_design(DESIGN, root / "design.yaml", seed)
    screen(ckpt, design, model="tiny-random", bridge=bridge, points=["sae.hook_latents"], out=root / "screen",
           progress=False, device="cpu", split_seed=seed)
    cfg = {"name": "null", "model": "tiny-random", "checkpoint": str(ckpt), "designs": [str(design)],
           "features": [{"from_screening": str(root / "screen"), "point": "sae.hook_latents", "top": 2, "role": "top"},
                        {"matched": 2, "tolerance": 0.5}] + ([{"directions": directions}] if directions else []),
           "interventions": [{"kind": "zero"}], "primary": {"intervention": "zero", "readout": "valence"},
           "seed": seed, "batch_size": 16, "out": str(root / "battery"), "device": "cpu"}
    try:
        battery(BatteryConfig.model_validate(cfg), bridge=bridge, progress=False)
    except FisError as err:
        return {"seed": seed, "leg": leg, "error": str(err)}
    shutil.copy(root / "screen" / "screening.csv", root / "battery" / "screening.csv")
    run = load_run(root / "battery")
    a = analyze_run(run)
    ignoring = verdicts(run, a.tests, a.vs_controls, a.manipulation.iloc[0:0], a.primary)
    vs = a.vs_controls
    return {"seed": seed, "leg": leg, "directions": directions, "verdict": a.verdicts[0]["answer"],
            "verdict_no_manip": ignoring[0]["answer"],
            "manipulation": a.verdicts[0]["manipulation"],
            "feature_p": a.tests.loc[a.tests["family"] == "primary", "p"].tolist(),
            "vs_p": vs["p"].tolist() if len(vs) else [],
            "vs_kind": vs["control_kind"].tolist() if len(vs) and "control_kind" in vs else [],
            "kl_feature": vs["kl_feature"].tolist() if len(vs) else [],
            "kl_controls": vs["kl_controls"].tolist() if len(vs) else []}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for leg in sorted({r["leg"] for r in rows}):
        ok = [r for r in rows if r["leg"] == leg and "error" not in r]
        n = len(ok)
        entry: dict[str, Any] = {"reps": n, "errors": sum(1 for r in rows if r["leg"] == leg and "error" in r)}
        for key in ("verdict", "verdict_no_manip"):
            k = sum(1 for r in ok if r[key] == "yes")
            entry[f"yes_{key}"] = k
            entry[f"rate_{key}"] = k / n if n else None
            entry[f"ci_{key}"] = clopper_pearson(k, n) if n else None
        vs = [p for r in ok for p in r["vs_p"] if p is not None]
        fp = [p for r in ok for p in r["feature_p"] if p is not None]
        entry["vs_controls_reject_rate"] = sum(p < 0.05 for p in vs) / len(vs) if vs else None
        for kind in sorted({k for r in ok for k in r.get("vs_kind", [])}):
            kp = [p for r in ok for p, k in zip(r["vs_p"], r.get("vs_kind", []), strict=False)
                  if k == kind and p is not None]
            entry[f"vs_{kind}_reject"] = f"{sum(p < 0.05 for p in kp)} / {len(kp)}"
        entry["vs_controls_tests"] = len(vs)
        entry["feature_reject_rate"] = sum(p < 0.05 for p in fp) / len(fp) if fp else None
        entry["feature_tests"] = len(fp)
        entry["manipulation_failed"] = sum(1 for r in ok if r["manipulation"] == "failed")
        entry["feature_reject"] = sum(p < 0.05 for p in fp)
        entry["vs_controls_reject"] = sum(p < 0.05 for p in vs)
        for key in ("kl_feature", "kl_controls"):
            kls = sorted(v for r in ok for v in r.get(key, []) if v is not None)
            entry[f"median_{key}"] = kls[len(kls) // 2] if kls else None
        secs = sorted(r["seconds"] for r in ok if "seconds" in r)
        loads = [r["load1"] for r in ok if "load1" in r]
        entry["median_seconds"] = secs[len(secs) // 2] if secs else None
        entry["mean_load1"] = round(sum(loads) / len(loads), 2) if loads else None
        out[leg] = entry
    ok = [r for r in rows if "error" not in r]
    if len(out) > 1 and ok:
        k = sum(1 for r in ok if r["verdict_no_manip"] == "yes")
        kv = sum(1 for r in ok if r["verdict"] == "yes")
        out["both"] = {"reps": len(ok), "yes_verdict": kv, "ci_verdict": clopper_pearson(kv, len(ok)),
                       "yes_verdict_no_manip": k, "ci_verdict_no_manip": clopper_pearson(k, len(ok))}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--legs", default="random,permuted")
    parser.add_argument("--max-seconds", type=float, default=3000.0, help="stop starting repetitions after this")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--jsonl", type=Path, default=None, help="append each repetition here; skip those there")
    parser.add_argument("--summarise", type=Path, default=None, help="print the summary of a JSONL and exit")
    parser.add_argument("--directions", type=int, default=0,
                        help="also N norm-matched random residual directions per top feature (second control kind)")
    args = parser.parse_args()
    if args.summarise:
        print(json.dumps(summarise(load_rows(args.summarise)), indent=2))
        return 0

    import logging

    import torch

    from fis_interventions.models import load_model

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    bridge = load_model("tiny-random", device="cpu")
    legs = args.legs.split(",")
    rows = load_rows(args.jsonl)
    other = {r.get("directions", 0) for r in rows} - {args.directions}
    if other:  # one JSONL, one setting: never mix repetitions run with other controls
        raise SystemExit(f"{args.jsonl} holds repetitions with --directions {sorted(other)}; use another --jsonl")
    done = {(r["seed"], r["leg"]) for r in rows}
    t0 = time.perf_counter()
    for rep in range(args.reps):
        for leg in legs:  # interleaved legs: load on the machine hits both alike
            if time.perf_counter() - t0 > args.max_seconds or (rep, leg) in done:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                rows.append(timed(one_rep, bridge, Path(tmp), rep, leg, args.directions))
            append_row(args.jsonl, rows[-1])
            print(json.dumps(rows[-1]), flush=True)
    summary = summarise(rows)
    summary["seconds"] = time.perf_counter() - t0
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
