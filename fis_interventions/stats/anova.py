"""Two-way ANOVAs for a 2x2 design: Type III OLS on all observations (F1) and by-item repeated measures (F2).

Type III sums of squares need sum-to-zero codes; we use the -0.5/+0.5 deviation codes from
:mod:`.design` as numeric columns, so ``anova_lm(typ=3)`` drops exactly one coefficient per term (what
``car::Anova(type=3)`` does with these contrasts).
"""

from __future__ import annotations

import logging
import warnings as pywarnings
from typing import Any

import numpy as np
import pandas as pd

from ..errors import FisWarning
from .design import Design2x2, Levels, prepare_2x2

log = logging.getLogger(__name__)

COLUMNS = ["term", "ss", "df1", "df2", "F", "p", "partial_eta2"]


def term_names(design: Design2x2) -> list[str]:
    return [design.a, design.b, f"{design.a}:{design.b}"]


def _empty_table(design: Design2x2) -> pd.DataFrame:
    table = pd.DataFrame({"term": term_names(design)})
    for col in COLUMNS[1:]:
        table[col] = np.nan
    return table


def anova_design(design: Design2x2) -> tuple[pd.DataFrame, list[str]]:
    """Type III ANOVA on a prepared design; returns the table and the warnings (NaN where not computable)."""
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    data = design.data
    notes: list[str] = []
    if design.empty_cells:
        return _empty_table(design), ["ANOVA not computed: a cell is empty"]
    n = len(data)
    if n <= 4:
        return _empty_table(design), [f"ANOVA not computed: {n} observations leave no residual df"]
    fit = smf.ols("y ~ xa + xb + xab", data=data).fit()
    with np.errstate(divide="ignore", invalid="ignore"):
        a3 = anova_lm(fit, typ=3)
    ss_res = float(a3.loc["Residual", "sum_sq"])
    df_res = float(a3.loc["Residual", "df"])
    rows = []
    for name, col in zip(term_names(design), ["xa", "xb", "xab"]):
        ss = float(a3.loc[col, "sum_sq"])
        row: dict[str, Any] = {"term": name, "ss": ss, "df1": float(a3.loc[col, "df"]), "df2": df_res,
                               "F": float(a3.loc[col, "F"]), "p": float(a3.loc[col, "PR(>F)"]),
                               "partial_eta2": ss / (ss + ss_res) if ss + ss_res > 0 else np.nan}
        rows.append(row)
    table = pd.DataFrame(rows, columns=COLUMNS)
    total = float(np.sum((data["y"] - data["y"].mean()) ** 2))
    if total == 0.0 or ss_res <= 1e-12 * max(total, np.finfo(float).tiny):
        table[["F", "p"]] = np.nan
        if total == 0.0:
            table["ss"] = 0.0  # exact; the solver leaves ~1e-31 of rounding noise
            table["partial_eta2"] = np.nan
        notes.append("ANOVA: residual variance is zero, so F and p are undefined")
    return table, notes


def anova_2x2(df: pd.DataFrame, dv: str, a: str, b: str, levels: Levels | None = None) -> pd.DataFrame:
    """Type III two-way ANOVA (OLS, deviation coding) of ``dv`` on factors ``a`` and ``b``.

    Rows ``a``, ``b``, ``a:b`` named after the columns; columns ``term, ss, df1, df2, F, p, partial_eta2``.
    Values that cannot be computed are NaN and the reason is in ``table.attrs["warnings"]``.
    """
    design = prepare_2x2(df, dv, a, b, levels=levels)
    table, notes = anova_design(design)
    table.attrs["warnings"] = design.warnings + notes
    for note in table.attrs["warnings"]:
        log.warning(note)
    return table


def rm_anova_design(design: Design2x2) -> tuple[pd.DataFrame, dict[str, Any]]:
    """By-item (F2) repeated-measures ANOVA on item x cell means; items missing a cell are dropped."""
    import pingouin as pg

    if design.item is None:
        raise ValueError("rm_anova needs an item column")
    data = design.data
    means = data.groupby(["item", "A", "B"], observed=False)["y"].mean().reset_index()
    per_item = means.groupby("item", observed=True)["y"].apply(lambda s: s.notna().sum())
    complete = per_item[per_item == 4].index
    n_items = int(data["item"].nunique())
    dropped = n_items - len(complete)
    info: dict[str, Any] = {"n_items": n_items, "n_items_complete": int(len(complete)),
                            "n_items_dropped": int(dropped), "warnings": []}
    if dropped:
        info["warnings"].append(f"by-item ANOVA: dropped {dropped} of {n_items} items that miss a cell")
    if len(complete) < 2:
        info["warnings"].append(f"by-item ANOVA not computed: {len(complete)} complete items (need 2)")
        return _empty_table(design), info
    means = means[means["item"].isin(complete)].copy()
    means["A"] = means["A"].astype(str)
    means["B"] = means["B"].astype(str)
    if float(np.ptp(means["y"].to_numpy())) == 0.0:
        info["warnings"].append("by-item ANOVA not computed: the item means have zero variance")
        return _empty_table(design), info
    with pywarnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        pywarnings.simplefilter("ignore", RuntimeWarning)
        aov = pg.rm_anova(data=means, dv="y", within=["A", "B"], subject="item", effsize="np2",
                          correction=False)
    source = {"A": design.a, "B": design.b, "A * B": f"{design.a}:{design.b}"}
    rows = []
    for _, r in aov.iterrows():
        f = float(r["F"])
        rows.append({"term": source[r["Source"]], "ss": float(r["SS"]), "df1": float(r["ddof1"]),
                     "df2": float(r["ddof2"]), "F": f if np.isfinite(f) else np.nan,
                     "p": float(r["p_unc"]) if np.isfinite(f) else np.nan,
                     "partial_eta2": float(r["np2"]) if np.isfinite(f) else np.nan})
    table = pd.DataFrame(rows, columns=COLUMNS)
    if table["F"].isna().any():
        info["warnings"].append("by-item ANOVA: an error term has zero variance, so some F are undefined")
    return table, info


def rm_anova_by_item(df: pd.DataFrame, dv: str, a: str, b: str, item: str,
                     levels: Levels | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """F2 analysis: repeated-measures ANOVA over items on item x cell means (pingouin ``rm_anova``).

    Same columns as :func:`anova_2x2`. ``info`` holds ``n_items``, ``n_items_complete``,
    ``n_items_dropped`` and ``warnings``; dropping items also emits a :class:`FisWarning`.
    """
    design = prepare_2x2(df, dv, a, b, item=item, levels=levels)
    table, info = rm_anova_design(design)
    info["warnings"] = design.warnings + info["warnings"]
    if info["n_items_dropped"]:
        pywarnings.warn(f"by-item ANOVA: dropped {info['n_items_dropped']} items that miss a cell",
                        FisWarning, stacklevel=2)
    return table, info
