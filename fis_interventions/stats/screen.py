"""Screening thousands of features with one 2x2 ANOVA each, in a single vectorised least-squares solve.

Hand-written (statsmodels fits one response at a time, far too slow for 10^4 features): with the
deviation-coded design ``D = [1, xa, xb, xa*xb]`` the Type III SS of a term is the increase in residual SS
when its column is dropped, which for one column equals ``beta_j^2 / [(D'D)^-1]_jj`` (the squared t statistic
times the residual mean square). Tests check this against :func:`anova_2x2` to 1e-8.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sps

from ..errors import FisError
from .design import Levels, prepare_2x2
from .fdr import fdr_bh


def screen_features(X: np.ndarray, design: pd.DataFrame, a: str, b: str, levels: Levels | None = None,
                    feature_names: list[str] | None = None) -> pd.DataFrame:
    """Two-way Type III ANOVA of every column of ``X`` (``[n_obs, n_features]``) on ``design[a] x design[b]``.

    One row per feature: ``feature, F_a, p_a, F_b, p_b, F_ab, p_ab, partial_eta2_{a,b,ab}, q_ab`` (BH over
    all non-degenerate features, interaction term), ``mean_<a level>_<b level>`` for the four cells, and
    ``degenerate`` (True for a constant feature or one with zero residual variance: statistics NaN, left out
    of the FDR family).
    """
    X = np.asarray(X, dtype=float)
    if X.ndim != 2:
        raise FisError(f"activation matrix must be 2-D [observations, features], got shape {X.shape}")
    if len(design) != X.shape[0]:
        raise FisError(f"design has {len(design)} rows but the activation matrix has {X.shape[0]}",
                       fix="pass one design row per observation, in the same order")
    if not np.all(np.isfinite(X)):
        raise FisError("activation matrix contains NaN or infinite values", fix="clean or drop them first")
    frame = design[[a, b]].copy().reset_index(drop=True)
    frame["_dummy"] = 0.0
    prepared = prepare_2x2(frame, "_dummy", a, b, levels=levels)
    if prepared.empty_cells:
        la, lb = prepared.empty_cells[0]
        raise FisError(f"cell {a}={la}, {b}={lb} has no observations", fix="every cell needs observations")
    n, k = X.shape
    if n <= 4:
        raise FisError(f"{n} observations leave no residual degrees of freedom", fix="use more stimuli")
    data = prepared.data
    D = np.column_stack([np.ones(n), data["xa"], data["xb"], data["xab"]])
    beta, *_ = np.linalg.lstsq(D, X, rcond=None)
    resid = X - D @ beta
    rss = np.einsum("ij,ij->j", resid, resid)
    df_res = n - 4
    centred = X - X.mean(axis=0)
    tss = np.einsum("ij,ij->j", centred, centred)
    degenerate = (tss <= 0) | (rss <= 1e-12 * np.maximum(tss, np.finfo(float).tiny))
    inv_diag = np.diag(np.linalg.inv(D.T @ D))
    out = pd.DataFrame({"feature": feature_names if feature_names is not None else np.arange(k)})
    with np.errstate(divide="ignore", invalid="ignore"):
        mse = rss / df_res
        for j, name in ((1, "a"), (2, "b"), (3, "ab")):
            ss = beta[j] ** 2 / inv_diag[j]
            F = np.where(degenerate, np.nan, ss / mse)
            out[f"F_{name}"] = F
            out[f"p_{name}"] = np.where(degenerate, np.nan, sps.f.sf(F, 1, df_res))
            out[f"partial_eta2_{name}"] = np.where(tss <= 0, np.nan, ss / (ss + rss))
    out["q_ab"] = fdr_bh(out["p_ab"].to_numpy())
    for la in prepared.levels[a]:
        for lb in prepared.levels[b]:
            mask = ((data["A"] == la) & (data["B"] == lb)).to_numpy()
            out[f"mean_{la}_{lb}"] = X[mask].mean(axis=0)
    out["degenerate"] = degenerate
    first = ["feature", "F_a", "p_a", "F_b", "p_b", "F_ab", "p_ab", "partial_eta2_a", "partial_eta2_b",
             "partial_eta2_ab", "q_ab"]
    return out[first + [c for c in out.columns if c not in first]]
