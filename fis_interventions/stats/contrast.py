"""The interaction as a difference of differences, estimated cell means, and effect sizes.

With -0.5/+0.5 codes the interaction coefficient *is* ``(m22 - m12) - (m21 - m11)``; a cell mean is
``L @ beta`` with ``L = [1, xa, xb, xa*xb]``. Intervals come from the LMM (Satterthwaite df) when there is an
item column, else from OLS (statsmodels ``t_test``, residual df).
"""

from __future__ import annotations

import warnings as pywarnings
from typing import Any

import numpy as np
import pandas as pd

from .anova import anova_design
from .design import Design2x2, Levels, finite_or_none, prepare_2x2
from .lmm import LmmResult, lmm_design

_KEYS = ["estimate", "se", "df", "t", "p", "ci_low", "ci_high"]


def _cell_vectors(design: Design2x2) -> list[tuple[str, str, np.ndarray]]:
    out = []
    for i, la in enumerate(design.levels[design.a]):
        for j, lb in enumerate(design.levels[design.b]):
            xa, xb = (-0.5, 0.5)[i], (-0.5, 0.5)[j]
            out.append((la, lb, np.array([1.0, xa, xb, xa * xb])))
    return out


def _ols_contrasts(design: Design2x2, Ls: list[np.ndarray]) -> tuple[list[dict[str, Any]], float]:
    import statsmodels.formula.api as smf

    fit = smf.ols("y ~ xa + xb + xab", data=design.data).fit()
    out = []
    for L in Ls:
        with pywarnings.catch_warnings(), np.errstate(all="ignore"):
            pywarnings.simplefilter("ignore")
            tt = fit.t_test(L)
        low, high = np.asarray(tt.conf_int()).ravel()
        out.append(dict(zip(_KEYS, [float(np.ravel(tt.effect)[0]), float(np.ravel(tt.sd)[0]),
                                    float(tt.df_denom), float(np.ravel(tt.tvalue)[0]),
                                    float(np.ravel(tt.pvalue)[0]), float(low), float(high)])))
    return out, float(fit.scale)


def contrast_design(design: Design2x2, lmm: LmmResult | None = None,
                    anova: pd.DataFrame | None = None) -> dict[str, Any]:
    """Interaction, cell means and effect sizes for a prepared design (reuses fits passed in)."""
    notes: list[str] = []
    cells = _cell_vectors(design)
    counts = design.cell_counts()
    Ls = [np.array([0.0, 0.0, 0.0, 1.0])] + [L for _, _, L in cells]
    estimable = not design.empty_cells and len(design.data) > 4 and float(np.ptp(design.data["y"])) > 0
    source = "lmm" if lmm is not None else "ols"
    total_var = None
    if not estimable:
        notes.append("interaction contrast and cell means not computed: the 2x2 model is not estimable")
        results = [dict.fromkeys(_KEYS) for _ in Ls]
    elif lmm is not None:
        results = [lmm.contrast(L) for L in Ls]
        if lmm.item_var is not None and lmm.resid_var is not None:
            total_var = lmm.item_var + lmm.resid_var + sum(v or 0.0 for v in lmm.other_var.values())
    else:
        results, total_var = _ols_contrasts(design, Ls)
    inter = {k: finite_or_none(v) for k, v in results[0].items()}
    inter["source"] = source
    cell_rows = []
    for (la, lb, _), res in zip(cells, results[1:]):
        cell_rows.append({design.a: la, design.b: lb, "n": counts[(la, lb)],
                          "observed_mean": finite_or_none(design.data.loc[(design.data["A"] == la)
                                                                          & (design.data["B"] == lb), "y"].mean()),
                          **{("mean" if k == "estimate" else k): finite_or_none(v) for k, v in res.items()}})
    if anova is None and estimable:
        anova, more = anova_design(design)
        notes += more
    pes = {} if anova is None else {r["term"]: finite_or_none(r["partial_eta2"]) for _, r in anova.iterrows()}
    std = None
    if inter["estimate"] is not None and total_var is not None and total_var > 0:
        std = inter["estimate"] / float(np.sqrt(total_var))
    effect = {"partial_eta2": pes, "standardized_interaction": std,
              "standardized_by": ("sqrt(item_var + resid_var)" if source == "lmm"
                                  else "sqrt(residual mean square)")}
    return {"interaction": inter, "cells": cell_rows, "effect_sizes": effect, "warnings": notes}


def interaction_contrast(df: pd.DataFrame, dv: str, a: str, b: str, item: str | None = None,
                         levels: Levels | None = None, method: str = "REML") -> dict[str, Any]:
    """Difference of differences with 95% CI, estimated cell means with 95% CIs, and effect sizes.

    From the primary LMM (maximal uncorrelated random effects) when ``item`` is given, else from OLS.
    ``standardized_interaction`` is the estimate divided by ``sqrt(item_var + resid_var)`` (OLS: by the
    residual SD).
    """
    design = prepare_2x2(df, dv, a, b, item=item, levels=levels)
    lmm = lmm_design(design, method=method) if item is not None else None
    out = contrast_design(design, lmm)
    out["warnings"] = design.warnings + (lmm.warnings if lmm is not None else []) + out["warnings"]
    return out
