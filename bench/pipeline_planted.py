"""The whole pipeline with a planted interaction-carrying feature: how often is it recovered?

    python bench/pipeline_planted.py [--reps 5] [--items 8,15] [--max-seconds 2400] [--json out.json]

Each repetition builds a random-init joint checkpoint of the tiny model (seed = repetition) and plants ONE SAE
latent that carries the A x B interaction by construction: the design is negation x sentiment with a marker
word (" indeed") appended only to the negated-negative cell, the latent's encoder row is set to the direction
that separates the marker's token positions from all others (threshold half-way, so it fires only on the
marker, i.e. only in one cell), scaled so that it enters the top-k there with an activation of the order of the
other latents', and its decoder row is a large random direction. Zero-ablating it therefore changes the
readout only in that one cell. Then `fis screen` (discovery half) -> `fis battery` (top 2 SAE latents, 2 matched
controls each, primary = zero ablation on `valence`, held-out half) -> the report's analysis.

Recovered = the planted latent is among the screen's top 2, the verdict (manipulation check ignored: a
random model's readout does not measure sentiment) is "yes", and the planted latent's own primary test and its
test against its matched controls both have q < .05 with the same sign. (Other latents that fire on the marker
token carry the one-cell interaction too, by the design's construction, and may also be "yes".) Reported at two item counts (the first N
items of the design), with exact 95% intervals.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline_null import DESIGN, clopper_pearson  # noqa: E402

MARKER = " indeed"
CELL = "negated.negative"
PLANTED = 5  # the latent that is rewritten


def marked_design(dst: Path, n_items: int) -> Path:
    """The first ``n_items`` items of the design as cell lists, the marker only in the one cell."""
    from fis_interventions.designs import expand, load_design

    raw = yaml.safe_load(DESIGN.read_text(encoding="utf-8"))
    rows = expand(load_design(DESIGN)).drop_duplicates(["item", "cell"])
    items = []
    for item, sub in list(rows.groupby("item", sort=False))[:n_items]:
        cells = {c: (t[:-1] + MARKER + "." if c == CELL else t) for c, t in zip(sub["cell"], sub["stimulus"],
                                                                                 strict=True)}
        items.append({"id": str(item), "cells": cells})
    out = {"name": "negation_sentiment_marked", "factors": raw["factors"], "items": items, "readout": raw["readout"]}
    dst.write_text(yaml.safe_dump(out, sort_keys=False), encoding="utf-8")
    return dst


def plant(bridge: Any, root: Path, seed: int, design: Path) -> Path:
    """A random-init checkpoint with latent PLANTED firing only on the marker token (see module docstring)."""
    import torch

    from fis_interventions.attach import attach
    from fis_interventions.designs import expand, load_design
    from fis_interventions.interventions.battery import _prepare, encode_rows
    from fis_interventions.sae import load_checkpoint, save_checkpoint
    from tiny_checkpoints import save_tiny_joint_checkpoint

    base = save_tiny_joint_checkpoint(root / "base", bridge.tokenizer, seed=seed)
    attached = attach(bridge, base)
    marker_id = bridge.tokenizer(MARKER, add_special_tokens=False)["input_ids"]
    assert len(marker_id) == 1, "the marker must be one token"
    rows = expand(load_design(design)).reset_index(drop=True)
    xs, marks = [], []
    with torch.no_grad():
        for s in range(0, len(rows), 16):
            enc = encode_rows(rows.iloc[s:s + 16], bridge.tokenizer)
            prep = _prepare(attached, enc)
            xs.append(prep.x)
            marks.append(enc.tokens.reshape(-1)[prep.keep_idx.cpu()] == marker_id[0])
    x, mark = torch.cat(xs).float(), torch.cat(marks)
    sae = attached.joint.sae
    with torch.no_grad():
        xc = x - sae.b_dec
        u = xc[mark].mean(0) - xc[~mark].mean(0)
        u = u / u.norm()
        proj = xc @ u
        lo, hi = float(proj[mark].min()), float(proj[~mark].max())
        if lo <= hi:
            raise RuntimeError(f"marker positions not separable ({lo:.3g} <= {hi:.3g})")
        thr = (lo + hi) / 2
        pre = sae.W_enc.shape
        w_enc = sae.W_enc if pre[0] == x.shape[1] else sae.W_enc.T  # [d_in, d_sae]
        others = (xc[mark] @ w_enc + sae.b_enc).relu()
        kth = float(others.topk(sae.k, dim=-1).values[:, -1].max())
        scale = 2.0 * max(kth, 1e-3) / (lo - thr)  # in the top-k on the marker, ~2x the k-th activation
        w_enc[:, PLANTED] = scale * u
        sae.b_enc[PLANTED] = -scale * thr
        d_norm = float(sae.W_dec.norm(dim=-1).mean()) if sae.W_dec.shape[0] == sae.b_enc.shape[0] else 1.0
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(x.shape[1], generator=g)
        big = 200.0 * d_norm * v / v.norm()
        if sae.W_dec.shape[0] == sae.b_enc.shape[0]:
            sae.W_dec[PLANTED] = big
        else:
            sae.W_dec[:, PLANTED] = big
    ck = load_checkpoint(base)
    return save_checkpoint(root / "planted", attached.joint, model_name="tiny-random", hook=ck.hook,
                           normalization=ck.normalization)


def one_rep(bridge: Any, root: Path, seed: int, n_items: int) -> dict[str, Any]:
    from fis_interventions.errors import FisError
    from fis_interventions.interventions import BatteryConfig, battery
    from fis_interventions.reports.analysis import analyze_run
    from fis_interventions.reports.inference import verdicts
    from fis_interventions.reports.runfolder import load_run
    from fis_interventions.screening import screen

    design = marked_design(root / "design.yaml", n_items)
    try:
        ckpt = plant(bridge, root, seed, design)
    except RuntimeError as err:
        return {"seed": seed, "items": n_items, "error": str(err)}
    result = screen(ckpt, design, model="tiny-random", bridge=bridge, points=["sae.hook_latents"],
                    out=root / "screen", progress=False, device="cpu", split_seed=seed)
    top = [int(t["feature"]) for t in result.top[:2]] if hasattr(result, "top") else []
    if not top:
        table = result.table
        top = [int(f) for f in table[~table["degenerate"]].sort_values("p_ab")["feature"].head(2)]
    cfg = {"name": "planted", "model": "tiny-random", "checkpoint": str(ckpt), "designs": [str(design)],
           "features": [{"from_screening": str(root / "screen"), "point": "sae.hook_latents", "top": 2, "role": "top"},
                        {"matched": 2, "tolerance": 1.0}],
           "interventions": [{"kind": "zero"}], "primary": {"intervention": "zero", "readout": "valence"},
           "seed": seed, "batch_size": 16, "out": str(root / "battery"), "device": "cpu"}
    try:
        battery(BatteryConfig.model_validate(cfg), bridge=bridge, progress=False)
    except FisError as err:
        return {"seed": seed, "items": n_items, "selected": PLANTED in top, "error": str(err)}
    shutil.copy(root / "screen" / "screening.csv", root / "battery" / "screening.csv")
    run = load_run(root / "battery")
    a = analyze_run(run)
    v = verdicts(run, a.tests, a.vs_controls, a.manipulation.iloc[0:0], a.primary)[0]
    vs = a.vs_controls
    row = vs[vs["feature"] == str(PLANTED)] if len(vs) else vs
    prim = a.tests[(a.tests["family"] == "primary") & (a.tests["feature"] == str(PLANTED))]
    own = bool(len(row) and len(prim) and row["q"].iloc[0] < 0.05 and prim["q"].iloc[0] < 0.05
               and (row["estimate"].iloc[0] > 0) == (prim["estimate"].iloc[0] > 0))
    return {"seed": seed, "items": n_items, "selected": PLANTED in top, "top": top,
            "verdict_no_manip": v["answer"], "detail": v["detail"],
            "recovered": bool(PLANTED in top and v["answer"] == "yes" and own),
            "planted_vs_p": float(row["p"].iloc[0]) if len(row) else None,
            "planted_kl": float(row["kl_feature"].iloc[0]) if len(row) else None,
            "controls_kl": float(row["kl_controls"].iloc[0]) if len(row) else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--items", default="8,15")
    parser.add_argument("--max-seconds", type=float, default=2400.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import logging

    import torch

    from fis_interventions.models import load_model

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    bridge = load_model("tiny-random", device="cpu")
    counts = [int(n) for n in args.items.split(",")]
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for rep in range(args.reps):
        for n in counts:  # interleaved item counts
            if time.perf_counter() - t0 > args.max_seconds:
                break
            with tempfile.TemporaryDirectory() as tmp:
                rows.append(one_rep(bridge, Path(tmp), rep, n))
            print(json.dumps(rows[-1]), flush=True)
    summary: dict[str, Any] = {}
    for n in counts:
        ok = [r for r in rows if r["items"] == n and "recovered" in r]
        k = sum(r["recovered"] for r in ok)
        summary[str(n)] = {"reps": len(ok), "errors": sum(1 for r in rows if r["items"] == n and "error" in r),
                           "selected": sum(r["selected"] for r in ok), "recovered": k,
                           "rate": k / len(ok) if ok else None, "ci": clopper_pearson(k, len(ok)) if ok else None}
    summary["seconds"] = time.perf_counter() - t0
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
