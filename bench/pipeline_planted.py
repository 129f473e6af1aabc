"""The whole pipeline with a planted interaction-carrying feature: how often is it recovered?

    python bench/pipeline_planted.py [--reps 5] [--items 8,15] [--max-seconds 2400] [--json out.json]
                                     [--jsonl reps.jsonl] [--summarise reps.jsonl] [--decoder-norm typical]

Each repetition builds a random-init joint checkpoint of the tiny model (seed = repetition) and plants ONE SAE
latent that carries the A x B interaction by construction. The design is negation x sentiment with a marker word
appended to every stimulus after its final period, so that it is the stimulus' last token (the position the
screen's default aggregation ``last`` reads) and every cell has the same token count: " indeed" in the
negated-negative cell, " too" in the other three. The latent's encoder row is a least-squares linear read-out of
the residual (2 on " indeed", 1 on " too", -1 elsewhere) thresholded half-way between the markers and the rest,
scaled so that it enters the top-k on every marker; it therefore fires on every stimulus' last token, about twice
as strongly in the one cell. (A latent that fired in one cell only would be exactly zero on a whole factor level,
which the screen flags as a likely artifact and never selects: the first version of this bench planted such a
latent, with the marker before the period, and under the ``last`` default it was never selected.) Its decoder
row is a random direction whose norm is the median decoder-row norm of the other latents (``--decoder-norm
typical``, the default; ``--decoder-norm 200`` gives 200x the mean norm, as the first version did, which made the
planted latent's ablation far larger than its matched controls'). Zero-ablating it therefore shifts the readout
in every cell, about twice as much in the one cell: an interaction. Then `fis screen` (discovery half) -> `fis
battery` (top 2 SAE latents, 2 matched controls each, primary = zero ablation on `valence`, held-out half) -> the
report's analysis.

Recovered = the planted latent is among the screen's top 2, the verdict (manipulation check ignored: a
random model's readout does not measure sentiment) is "yes", and the planted latent's own primary test and its
test against its matched controls both have q < .05 with the same sign. (Other latents that fire on the marker
token carry the one-cell interaction too, by the design's construction, and may also be "yes".) Reported at two item counts (the first N
items of the design), with exact 95% intervals.

Resumable like ``pipeline_null.py``: ``--jsonl`` appends each finished repetition (with its seconds and the load
average) and skips those already there; ``--summarise FILE`` prints the table of a JSONL.
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

from pipeline_null import DESIGN, append_row, clopper_pearson, load_rows, timed  # noqa: E402

MARKER = " indeed"  # ends the stimuli of CELL
OTHER = " too"  # ends the stimuli of the other three cells (same token count in every cell)
CELL = "negated.negative"
PLANTED = 5  # the latent that is rewritten


def marked_design(dst: Path, n_items: int) -> Path:
    """The first ``n_items`` items of the design as cell lists, the marker only in the one cell, as its last
    token (the screen's default aggregation, ``last``, reads the stimulus' last token)."""
    from fis_interventions.designs import expand, load_design

    raw = yaml.safe_load(DESIGN.read_text(encoding="utf-8"))
    rows = expand(load_design(DESIGN)).drop_duplicates(["item", "cell"])
    items = []
    for item, sub in list(rows.groupby("item", sort=False))[:n_items]:
        cells = {c: t + (MARKER if c == CELL else OTHER) for c, t in zip(sub["cell"], sub["stimulus"], strict=True)}
        items.append({"id": str(item), "cells": cells})
    out = {"name": "negation_sentiment_marked", "factors": raw["factors"], "items": items, "readout": raw["readout"]}
    dst.write_text(yaml.safe_dump(out, sort_keys=False), encoding="utf-8")
    return dst


def plant(bridge: Any, root: Path, seed: int, design: Path, decoder_norm: str = "typical") -> Path:
    """A random-init checkpoint with latent PLANTED firing only on the two marker tokens, twice as strongly on
    the one-cell marker (see module docstring)."""
    import torch

    from fis_interventions.attach import attach
    from fis_interventions.designs import expand, load_design
    from fis_interventions.interventions.battery import _prepare, encode_rows
    from fis_interventions.sae import load_checkpoint, save_checkpoint
    from tiny_checkpoints import save_tiny_joint_checkpoint

    base = save_tiny_joint_checkpoint(root / "base", bridge.tokenizer, seed=seed)
    attached = attach(bridge, base)
    ids = [bridge.tokenizer(m, add_special_tokens=False)["input_ids"] for m in (MARKER, OTHER)]
    assert all(len(i) == 1 for i in ids), "the markers must be one token each"
    rows = expand(load_design(design)).reset_index(drop=True)
    xs, toks = [], []
    with torch.no_grad():
        for s in range(0, len(rows), 16):
            enc = encode_rows(rows.iloc[s:s + 16], bridge.tokenizer)
            prep = _prepare(attached, enc)
            xs.append(prep.x)
            toks.append(enc.tokens.reshape(-1)[prep.keep_idx.cpu()])
    x, tok = torch.cat(xs).double(), torch.cat(toks)
    mark_a, mark_b = tok == ids[0][0], tok == ids[1][0]
    mark = mark_a | mark_b
    sae = attached.joint.sae
    with torch.no_grad():
        xc = x - sae.b_dec.double()
        # one linear read-out of the residual: 2 on the one-cell marker, 1 on the other cells' marker, -1 elsewhere
        target = torch.where(mark_a, 2.0, torch.where(mark_b, 1.0, -1.0)).double()
        design_m = torch.cat([xc, torch.ones(len(xc), 1, dtype=xc.dtype)], 1)
        ridge = 1e-3 * torch.eye(design_m.shape[1], dtype=xc.dtype)
        coef = torch.linalg.solve(design_m.T @ design_m + ridge, design_m.T @ target)
        w, b0 = coef[:-1], float(coef[-1])
        pred = xc @ w + b0
        lo, hi = float(pred[mark].min()), float(pred[~mark].max())
        if lo <= hi:
            raise RuntimeError(f"marker positions not separable ({lo:.3g} <= {hi:.3g})")
        thr = (lo + hi) / 2
        pre = sae.W_enc.shape
        w_enc = sae.W_enc if pre[0] == x.shape[1] else sae.W_enc.T  # [d_in, d_sae]
        others = (xc[mark].to(w_enc.dtype) @ w_enc + sae.b_enc).relu()
        kth = float(others.topk(sae.k, dim=-1).values[:, -1].max())
        scale = 1.5 * max(kth, 1e-3) / (lo - thr)  # in the top-k on every marker, >= 1.5x the k-th activation
        w_enc[:, PLANTED] = (scale * w).to(w_enc.dtype)
        sae.b_enc[PLANTED] = scale * (b0 - thr)
        rows_first = sae.W_dec.shape[0] == sae.b_enc.shape[0]
        norms = sae.W_dec.norm(dim=-1) if rows_first else sae.W_dec.norm(dim=0)
        others = torch.cat([norms[:PLANTED], norms[PLANTED + 1:]])
        target = float(others.median()) if decoder_norm == "typical" else float(decoder_norm) * float(norms.mean())
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(x.shape[1], generator=g)
        row = target * v / v.norm()
        if rows_first:
            sae.W_dec[PLANTED] = row
        else:
            sae.W_dec[:, PLANTED] = row
    ck = load_checkpoint(base)
    return save_checkpoint(root / "planted", attached.joint, model_name="tiny-random", hook=ck.hook,
                           normalization=ck.normalization)


def one_rep(bridge: Any, root: Path, seed: int, n_items: int, decoder_norm: str = "typical",
            directions: int = 0) -> dict[str, Any]:
    from fis_interventions.errors import FisError
    from fis_interventions.interventions import BatteryConfig, battery
    from fis_interventions.reports.analysis import analyze_run
    from fis_interventions.reports.inference import verdicts
    from fis_interventions.reports.runfolder import load_run
    from fis_interventions.screening import screen

    design = marked_design(root / "design.yaml", n_items)
    try:
        ckpt = plant(bridge, root, seed, design, decoder_norm)
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
                        {"matched": 2, "tolerance": 1.0}] + ([{"directions": directions}] if directions else []),
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
    both = vs[vs["feature"] == str(PLANTED)] if len(vs) else vs
    kind = both["control_kind"] if "control_kind" in both else None
    row = both[kind == "matched_latent"] if kind is not None else both
    drow = both[kind == "random_direction"] if kind is not None else both.iloc[0:0]
    prim = a.tests[(a.tests["family"] == "primary") & (a.tests["feature"] == str(PLANTED))]
    own = bool(len(row) and len(prim) and row["q"].iloc[0] < 0.05 and prim["q"].iloc[0] < 0.05
               and (row["estimate"].iloc[0] > 0) == (prim["estimate"].iloc[0] > 0))
    return {"seed": seed, "items": n_items, "decoder_norm": decoder_norm, "selected": PLANTED in top, "top": top,
            "verdict_no_manip": v["answer"], "detail": v["detail"],
            "recovered": bool(PLANTED in top and v["answer"] == "yes" and own),
            "planted_vs_p": float(row["p"].iloc[0]) if len(row) else None,
            "planted_kl": float(row["kl_feature"].iloc[0]) if len(row) else None,
            "controls_kl": float(row["kl_controls"].iloc[0]) if len(row) else None,
            **({"planted_vs_directions_p": float(drow["p"].iloc[0]) if len(drow) else None,
                "directions_kl": float(drow["kl_controls"].iloc[0]) if len(drow) else None} if directions else {})}


def summarise(rows: list[dict[str, Any]], counts: list[int]) -> dict[str, Any]:
    """Per item count: repetitions, how often the planted latent was selected and recovered [exact 95% CI],
    its p against its controls, the KLs, the median seconds per repetition and the mean load average."""
    summary: dict[str, Any] = {}
    for n in counts:
        ok = [r for r in rows if r["items"] == n and "recovered" in r]
        k = sum(r["recovered"] for r in ok)
        secs = sorted(r["seconds"] for r in ok if "seconds" in r)
        loads = [r["load1"] for r in ok if "load1" in r]
        summary[str(n)] = {"reps": len(ok), "errors": sum(1 for r in rows if r["items"] == n and "error" in r),
                           "selected": sum(r["selected"] for r in ok), "recovered": k,
                           "rate": k / len(ok) if ok else None, "ci": clopper_pearson(k, len(ok)) if ok else None,
                           "planted_vs_p": [r["planted_vs_p"] for r in ok],
                           "planted_kl": [r["planted_kl"] for r in ok], "controls_kl": [r["controls_kl"] for r in ok],
                           "median_seconds": secs[len(secs) // 2] if secs else None,
                           "mean_load1": round(sum(loads) / len(loads), 2) if loads else None}
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--items", default="8,15")
    parser.add_argument("--max-seconds", type=float, default=2400.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--jsonl", type=Path, default=None, help="append each repetition here; skip those there")
    parser.add_argument("--summarise", type=Path, default=None, help="print the summary of a JSONL and exit")
    parser.add_argument("--decoder-norm", default="typical",
                        help="planted decoder row norm: 'typical' (median of the others) or a multiple of the mean")
    parser.add_argument("--directions", type=int, default=0,
                        help="also N norm-matched random residual directions per top feature")
    args = parser.parse_args()
    if args.summarise:
        rows = load_rows(args.summarise)
        print(json.dumps(summarise(rows, sorted({r["items"] for r in rows})), indent=2))
        return 0

    import logging

    import torch

    from fis_interventions.models import load_model

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    bridge = load_model("tiny-random", device="cpu")
    counts = [int(n) for n in args.items.split(",")]
    rows = [r for r in load_rows(args.jsonl) if r.get("decoder_norm", "200") == args.decoder_norm]
    done = {(r["seed"], r["items"]) for r in rows}
    t0 = time.perf_counter()
    for rep in range(args.reps):
        for n in counts:  # interleaved item counts
            if time.perf_counter() - t0 > args.max_seconds or (rep, n) in done:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                rows.append(timed(one_rep, bridge, Path(tmp), rep, n, args.decoder_norm, args.directions))
            rows[-1].setdefault("decoder_norm", args.decoder_norm)
            append_row(args.jsonl, rows[-1])
            print(json.dumps(rows[-1]), flush=True)
    summary = summarise(rows, counts)
    summary["seconds"] = time.perf_counter() - t0
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
