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
from scipy.special import fdtrc

from ..errors import FisWarning
from .design import Design2x2, Levels, prepare_2x2, rounding_ss

log = logging.getLogger(__name__)

COLUMNS = ["term", "ss", "df1", "df2", "F", "p", "partial_eta2"]


def term_names(design: Design2x2) -> list[str]:
    return [design.a, design.b, f"{design.a}:{design.b}"]


def _empty_table(design: Design2x2) -> pd.DataFrame:
    table = pd.DataFrame({"term": term_names(design)})
    for col in COLUMNS[1:]:
        table[col] = np.nan
    return table


def _type3(codes: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Type III SS of each coded column (Wald: ``b_j^2 / [(X'X)^-1]_jj``, as ``car::Anova(type = 3)`` with
    sum-to-zero codes) from one QR least-squares solve (numpy; no formula machinery at start-up)."""
    n = len(y)
    X = np.column_stack([np.ones(n), codes])
    Q, R = np.linalg.qr(X)
    beta = np.linalg.solve(R, Q.T @ y)
    resid = y - X @ beta
    ss_res = float(resid @ resid)
    df_res = float(n - X.shape[1])
    Rinv = np.linalg.inv(R)
    diag = np.sum(Rinv**2, axis=1)
    out: dict[str, Any] = {"ss_res": ss_res, "df_res": df_res, "ss": {}, "F": {}}
    for j, col in enumerate(["xa", "xb", "xab"], start=1):
        ss = float(beta[j] ** 2 / diag[j])
        out["ss"][col] = ss
        with np.errstate(divide="ignore", invalid="ignore"):
            out["F"][col] = float(np.float64(ss) / np.float64(ss_res / df_res))
    return out


def anova_design(design: Design2x2) -> tuple[pd.DataFrame, list[str]]:
    """Type III ANOVA on a prepared design; returns the table and the warnings (NaN where not computable)."""

    data = design.data
    notes: list[str] = []
    if design.empty_cells:
        return _empty_table(design), ["ANOVA not computed: a cell is empty"]
    n = len(data)
    if n <= 4:
        return _empty_table(design), [f"ANOVA not computed: {n} observations leave no residual df"]
    # Centre (and scale) the measure before solving: with mean 1e6 and SD 1e-4 the normal equations of the raw
    # y lose ~5 digits of F (issue 21); Type III SS of xa, xb, xab are unchanged by a shift of y (the model
    # has an intercept) and scale with its square.
    y = data["y"].to_numpy(dtype=float)
    centre = float(np.median(y))
    spread = float(np.std(y - centre)) or 1.0
    a3 = _type3(data[["xa", "xb", "xab"]].to_numpy(dtype=float), (y - centre) / spread)
    ss_res = a3["ss_res"] * spread**2
    df_res = a3["df_res"]
    rows = []
    total = float(np.sum((data["y"] - data["y"].mean()) ** 2))
    noise = rounding_ss(data["y"].to_numpy())
    for name, col in zip(term_names(design), ["xa", "xb", "xab"]):
        ss = max(float(a3["ss"][col]), 0.0) * spread**2
        F = a3["F"][col]
        row: dict[str, Any] = {"term": name, "ss": ss, "df1": 1.0, "df2": df_res, "F": F,
                               "p": float(fdtrc(1.0, df_res, F)) if np.isfinite(F) else np.nan,
                               "partial_eta2": ss / (ss + ss_res) if ss + ss_res > 0 else np.nan}
        if ss <= noise:  # rounding noise of an exactly null effect: report the exact zero
            row.update(ss=0.0, F=0.0, p=1.0, partial_eta2=0.0)
        rows.append(row)
    table = pd.DataFrame(rows, columns=COLUMNS)
    if total == 0.0 or ss_res <= rounding_ss(data["y"].to_numpy()):
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
    """By-item (F2) repeated-measures ANOVA on item x cell means; items missing a cell are dropped.

    Closed form (hand-written; equals afex/pingouin, tested): in a 2x2 within-item design each effect has one
    contrast per item, ``d_i``, and ``SS = c m mean(d)^2``, ``SS_error = c sum (d_i - mean(d))^2`` (``c`` = 1
    for main effects as level differences, 1/4 for the difference of differences), so ``F = t^2`` of the
    one-sample t test of ``d``. Sums of squares are squares: never negative. Contrasts within rounding of zero
    (64 ulp of the largest item-cell mean) are exactly zero: an exact null gives ``F = 0``, ``p = 1`` and
    ``partial_eta2 = 0`` (even when its error term is zero too); a non-zero effect over a zero error term
    gives no F (with a warning).
    """
    if design.item is None:
        raise ValueError("rm_anova needs an item column")
    data = design.data
    means = data.groupby(["item", "A", "B"], observed=False)["y"].mean().unstack(["A", "B"])
    cols = [(la, lb) for la in design.levels[design.a] for lb in design.levels[design.b]]
    means = means.reindex(columns=pd.MultiIndex.from_tuples(cols))
    complete = means.dropna()
    n_items = int(data["item"].nunique())
    dropped = n_items - len(complete)
    info: dict[str, Any] = {"n_items": n_items, "n_items_complete": int(len(complete)),
                            "n_items_dropped": int(dropped), "warnings": []}
    if dropped:
        info["warnings"].append(f"by-item ANOVA: dropped {dropped} of {n_items} items that miss a cell")
    m = len(complete)
    if m < 2:
        info["warnings"].append(f"by-item ANOVA not computed: {m} complete items (need 2)")
        return _empty_table(design), info
    cm = complete.to_numpy(dtype=float)
    if float(np.ptp(cm)) == 0.0:
        info["warnings"].append("by-item ANOVA not computed: the item means have zero variance")
        return _empty_table(design), info
    m11, m12, m21, m22 = cm.T
    tol = 64 * np.finfo(float).eps * float(np.max(np.abs(cm - cm.mean())))
    rows = []
    undefined = False
    for name, d, c in [(design.a, (m21 + m22 - m11 - m12) / 2, 1.0), (design.b, (m12 + m22 - m11 - m21) / 2, 1.0),
                       (f"{design.a}:{design.b}", m22 - m12 - m21 + m11, 0.25)]:
        d = np.where(np.abs(d) <= tol, 0.0, d)
        mean = float(d.mean())
        if abs(mean) <= tol:
            mean = 0.0
        ss = c * m * mean**2
        dev = d - mean
        ss_err = c * float(dev @ dev)
        if ss_err <= c * m * tol**2:
            ss_err = 0.0
        row: dict[str, Any] = {"term": name, "ss": ss, "df1": 1.0, "df2": float(m - 1), "F": np.nan, "p": np.nan,
                               "partial_eta2": ss / (ss + ss_err) if ss + ss_err > 0 else np.nan}
        if ss == 0.0:  # an exact null: no evidence whatever the error term
            row.update(F=0.0, p=1.0, partial_eta2=0.0)
        elif ss_err > 0:
            row["F"] = ss / (ss_err / (m - 1))
            row["p"] = float(fdtrc(1.0, m - 1, row["F"]))
        else:
            undefined = True
        rows.append(row)
    table = pd.DataFrame(rows, columns=COLUMNS)
    if undefined:
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
