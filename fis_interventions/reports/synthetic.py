"""A synthetic battery run folder with known answers, for tests and for trying the report without a model.

One ``top`` feature carries a planted A x B interaction on one contrast readout whose size grows with the
clamp (``scale`` value - 1: a scale of 1 is the no-op, so its shift is only float noise); a
``random_control`` feature has no effect at all and a ``linear_control`` feature has a main effect of A but
no interaction. The folder has the battery's exact format (``run.json``, ``results.sqlite``, and
optionally ``screening.csv`` and ``eval.json``), including its text feature labels and prompt ids.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

RESULT_COLUMNS = ["design", "item", "cell", "a", "b", "prompt_id", "point", "feature", "role", "intervention",
                  "value", "position", "readout", "readout_kind", "score_clean", "score_edited", "shift"]

POINT = "secondary.hook_latents"
FACTORS = {"formality": ["formal", "informal"], "emotion": ["neutral", "emotional"]}
CONTRASTS = {"formal_vs_casual": "formal - casual", "emotional_vs_neutral": "emotional - neutral"}
PLANTED = {"feature": 12, "readout": "formal_vs_casual", "interaction": 1.0}
FEATURES = [  # (feature, role, main effect of A, interaction on the planted readout)
    (PLANTED["feature"], "top", 0.3, PLANTED["interaction"]),
    (345, "random_control", 0.0, 0.0),
    (7, "linear_control", 0.8, 0.0),
]


def synthetic_results(seed: int = 0, n_items: int = 10, n_prompts: int = 2,
                      values: Sequence[float] = (0.0, 1.0, 4.0), noise: float = 0.5,
                      features: Sequence[tuple[int, str, float, float]] = FEATURES) -> pd.DataFrame:
    """The ``results`` table of a synthetic run (see module docstring for what is planted)."""
    rng = np.random.default_rng(seed)
    (fa, la), (fb, lb) = FACTORS.items()
    # the clean model's scores: one per readout x item x cell x prompt (shared by every clamp, as in a real run),
    # and each contrast readout moves with its own factor (formal > informal; emotional > neutral)
    clean_rng = np.random.default_rng(seed + 1000)
    moves = {"formal_vs_casual": lambda xa, xb: -1.0 * xa, "emotional_vs_neutral": lambda xa, xb: 1.0 * xb}
    clean_of = {(r, i, ia, ib, p): moves.get(r, lambda xa, xb: 0.0)(ia - 0.5, ib - 0.5) + clean_rng.normal(0, 0.3)
                for r in [*CONTRASTS, "formal", "__kl__"] for i in range(n_items) for ia in range(2)
                for ib in range(2) for p in range(n_prompts)}
    rows: list[dict[str, Any]] = []
    for feature, role, main_a, inter in features:
        for value in values:
            dose = value - 1.0  # scale 1 is the identity clamp
            for readout in [*CONTRASTS, "formal", "__kl__"]:
                kind = "contrast" if readout in CONTRASTS else ("kl" if readout == "__kl__" else "word")
                item_eff = rng.normal(0, 0.3, n_items)
                prompt_eff = rng.normal(0, 0.2, n_prompts)
                for i in range(n_items):
                    for ia, a in enumerate(la):
                        for ib, b in enumerate(lb):
                            xa, xb = ia - 0.5, ib - 0.5
                            for p in range(n_prompts):
                                if dose == 0.0:
                                    shift = float(rng.normal(0, 1e-7))  # float noise of an exact no-op
                                else:
                                    planted = inter if readout == PLANTED["readout"] else 0.0
                                    mean = main_a * xa + planted * xa * xb + item_eff[i] + prompt_eff[p]
                                    shift = float(dose * mean + abs(dose) * rng.normal(0, noise))
                                if kind == "kl":
                                    shift = abs(shift)
                                rng.normal(0, 2)  # kept: the planted shifts stay the same draws
                                clean = float(clean_of[(readout, i, ia, ib, p)])
                                rows.append({"design": "formality_emotion", "item": f"item{i:02d}",
                                             "cell": f"{a}.{b}", "a": a, "b": b, "prompt_id": f"p{p + 1}",
                                             "point": POINT, "feature": str(feature), "role": role,
                                             "intervention": "scale",
                                             "value": float(value), "position": "all", "readout": readout,
                                             "readout_kind": kind, "score_clean": clean,
                                             "score_edited": clean + shift, "shift": shift})
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def run_info(n_items: int, n_prompts: int, values: Sequence[float], seed: int,
             features: Sequence[tuple[int, str, float, float]] = FEATURES,
             matched: dict[int, int] | None = None) -> dict[str, Any]:
    """The ``run.json`` content matching :func:`synthetic_results`."""
    from ..provenance import provenance

    info = {"name": "synthetic", "model": "synthetic-model", "hook": "blocks.6.hook_resid_post",
            "checkpoint": "checkpoints/synthetic", "seed": seed, "provenance": provenance(seed),
            "config": {"interventions": [{"kind": "scale", "values": list(values)}], "position": "all"},
            "designs": {"formality_emotion": {"factors": FACTORS, "file": "stimuli/formality_emotion.yaml",
                                              "n_items": n_items,
                                              "prompts": [f"Prompt {p}:" for p in range(n_prompts)],
                                              "contrasts": CONTRASTS}},
            "features": [{"point": POINT, "feature": str(f), "role": r,
                          **({"screen": {"F_ab": 26.7, "p_ab": 1e-6, "q_ab": 0.003}} if r == "top" else {}),
                          **({"matched_to": str((matched or {})[f])} if f in (matched or {}) else {})}
                         for f, r, _, _ in features],
            "warnings": ["synthetic data: no model was run"]}
    return json.loads(json.dumps(info))  # a fresh copy: callers may edit it without touching FACTORS


def write_synthetic_run(folder: str | Path, seed: int = 0, n_items: int = 10, n_prompts: int = 2,
                        values: Sequence[float] = (0.0, 1.0, 4.0), extras: bool = True,
                        features: Sequence[tuple[int, str, float, float]] = FEATURES,
                        matched: dict[int, int] | None = None) -> Path:
    """Write a synthetic run folder (``extras`` adds ``screening.csv`` and ``eval.json``); returns it.
    ``features`` replaces the three default features (``(id, role, main effect of A, interaction)``) and
    ``matched`` names a control's feature (control id -> feature id, run.json ``matched_to``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = synthetic_results(seed, n_items, n_prompts, values, features=features)
    (folder / "run.json").write_text(json.dumps(run_info(n_items, n_prompts, values, seed, features, matched),
                                                indent=2), encoding="utf-8")
    with sqlite3.connect(folder / "results.sqlite") as con:
        table.to_sql("results", con, index=False, if_exists="replace")
    con.close()
    if extras:
        pd.DataFrame({"feature": [12, 345, 7], "point": POINT, "F_a": [3.1, 0.2, 40.0], "p_a": [0.08, 0.6, 1e-8],
                      "F_b": [0.5, 0.1, 0.3], "p_b": [0.5, 0.7, 0.6], "F_ab": [26.7, 0.4, 0.9],
                      "p_ab": [1e-6, 0.5, 0.3], "q_ab": [0.003, 0.9, 0.8]}).to_csv(folder / "screening.csv",
                                                                                   index=False)
        (folder / "eval.json").write_text(json.dumps({"table": [
            {"checkpoint": "synthetic", "mode": "joint", "components": "sae", "fvu": 0.27, "kl": 0.61,
             "ce_recovered": 0.81},
            {"checkpoint": "synthetic", "mode": "joint", "components": "sae+nfm", "fvu": 0.16, "kl": 0.30,
             "ce_recovered": 0.90}]}), encoding="utf-8")
    return folder
