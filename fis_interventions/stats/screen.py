"""Screening thousands of features with one 2x2 ANOVA each, in a single vectorised least-squares solve.

Hand-written (statsmodels and pingouin fit one response at a time, far too slow for 10^4 features). Two models:

* **Between-stimulus OLS** (cell lists, or no item column): with the deviation-coded design
  ``D = [1, xa, xb, xa*xb]`` the Type III SS of a term is the increase in residual SS when its column is
  dropped, which for one column equals ``beta_j^2 / [(D'D)^-1]_jj`` (the squared t statistic times the residual
  mean square). Tests check this against :func:`anova_2x2` to 1e-8.
* **Within-item** (matched items: the four cells of an item are one sentence frame, so the item is a block):
  the by-item repeated-measures ANOVA on item x cell means, as :func:`rm_anova_by_item` (pingouin). In a 2x2
  within design each effect has one df and its own error stratum (effect x item), so its F equals the squared
  one-sample t of the per-item contrast (A: mean of a2 - mean of a1; B likewise; A x B: the difference of
  differences). All contrasts of all features are one matrix product of the item x cell means with the
  contrast matrix, and their means and error sums of squares are the least-squares fit of an intercept;
  ``partial eta2 = SS / (SS + SS_error)`` of the stratum. Item effects (length, topic) cancel out of every
  contrast, which is why this screen finds a within-item interaction with fewer items than the OLS one.
  Tests check it against the engine's RM-ANOVA per feature to 1e-8.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import fdtrc

from ..errors import FisError
from .design import Design2x2, Levels, prepare_2x2
from .fdr import fdr_bh

FIRST_COLUMNS = ["feature", "F_a", "p_a", "F_b", "p_b", "F_ab", "p_ab", "partial_eta2_a", "partial_eta2_b",
                 "partial_eta2_ab", "q_ab"]
MODELS = {"ols": "two-way Type III ANOVA over all stimuli (OLS)",
          "within_item": "by-item repeated-measures ANOVA (item as a block; each effect tested against its "
                         "effect x item error, df 1 and n_items - 1)"}


def screen_features(X: np.ndarray, design: pd.DataFrame, a: str, b: str, levels: Levels | None = None,
                    feature_names: list[str] | None = None, item: str | None = None) -> pd.DataFrame:
    """Two-way ANOVA of every column of ``X`` (``[n_obs, n_features]``) on ``design[a] x design[b]``.

    Without ``item``: Type III OLS over all observations. With ``item`` (matched items): the within-item model
    (by-item RM-ANOVA on item x cell means; items missing a cell are left out, counted in
    ``table.attrs['n_items_dropped']``). ``table.attrs`` holds ``model``, ``df_error`` and ``n_items``.

    One row per feature: ``feature, F_a, p_a, F_b, p_b, F_ab, p_ab, partial_eta2_{a,b,ab}, q_ab`` (BH over
    all non-degenerate features, interaction term), ``mean_<a level>_<b level>`` for the four cells, and
    ``degenerate`` (True for a constant feature or one whose interaction error variance is zero: statistics
    NaN, left out of the FDR family).
    """
    X = np.asarray(X, dtype=float)
    if X.ndim != 2:
        raise FisError(f"activation matrix must be 2-D [observations, features], got shape {X.shape}")
    if len(design) != X.shape[0]:
        raise FisError(f"design has {len(design)} rows but the activation matrix has {X.shape[0]}",
                       fix="pass one design row per observation, in the same order")
    if not np.all(np.isfinite(X)):
        raise FisError("activation matrix contains NaN or infinite values", fix="clean or drop them first")
    cols = [a, b] + ([item] if item is not None else [])
    frame = design[cols].copy().reset_index(drop=True)
    frame["_dummy"] = 0.0
    prepared = prepare_2x2(frame, "_dummy", a, b, item=item, levels=levels)
    if prepared.empty_cells:
        la, lb = prepared.empty_cells[0]
        raise FisError(f"cell {a}={la}, {b}={lb} has no observations", fix="every cell needs observations")
    if item is None:
        out, attrs = _ols(X, prepared)
    else:
        out, attrs = _within_item(X, prepared)
    out.insert(0, "feature", feature_names if feature_names is not None else np.arange(X.shape[1]))
    out["q_ab"] = fdr_bh(out["p_ab"].to_numpy())
    used = attrs.pop("rows")
    data = prepared.data
    for la in prepared.levels[a]:
        for lb in prepared.levels[b]:
            mask = ((data["A"] == la) & (data["B"] == lb)).to_numpy() & used
            out[f"mean_{la}_{lb}"] = X[mask].mean(axis=0) if mask.any() else np.nan
    out["degenerate"] = attrs.pop("degenerate")
    out = out[FIRST_COLUMNS + [c for c in out.columns if c not in FIRST_COLUMNS]]
    out.attrs.update(attrs)
    return out


def _fill(out: pd.DataFrame, name: str, ss: np.ndarray, err: np.ndarray, df_err: int, invalid: np.ndarray,
          tss_zero: np.ndarray) -> None:
    """F, p and partial eta2 of one 1-df term from its SS and its error SS (NaN where ``invalid``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        F = np.where(invalid, np.nan, ss / (err / df_err))
        out[f"F_{name}"] = F
        out[f"p_{name}"] = np.where(invalid, np.nan, fdtrc(1, df_err, F))
        out[f"partial_eta2_{name}"] = np.where(tss_zero, np.nan, ss / (ss + err))


def _ols(X: np.ndarray, prepared: Design2x2) -> tuple[pd.DataFrame, dict]:
    n, _ = X.shape
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
    out = pd.DataFrame(index=range(X.shape[1]))
    for j, name in ((1, "a"), (2, "b"), (3, "ab")):
        _fill(out, name, beta[j] ** 2 / inv_diag[j], rss, df_res, degenerate, tss <= 0)
    return out, {"model": "ols", "df_error": df_res, "n_items": None, "n_items_dropped": 0,
                 "rows": np.ones(n, dtype=bool), "degenerate": degenerate}


# Per-item contrasts on the cell means in the order (a1,b1), (a1,b2), (a2,b1), (a2,b2); scaled so that a
# contrast is the difference between levels (A, B) or the difference of differences (A x B).
CONTRASTS = np.array([[-0.5, -0.5, 0.5, 0.5], [-0.5, 0.5, -0.5, 0.5], [1.0, -1.0, -1.0, 1.0]])


def item_cells(X: np.ndarray, prepared: Design2x2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(``[m, 4, k]`` item x cell means of the items with all four cells, in level order; which items are
    complete; each row's item index). The screen and its permutation null share it."""
    data = prepared.data
    items, item_idx = np.unique(data["item"].to_numpy(), return_inverse=True)
    cell = 2 * (data["xa"].to_numpy() > 0) + (data["xb"].to_numpy() > 0)
    slot = item_idx * 4 + cell
    counts = np.bincount(slot, minlength=4 * len(items)).reshape(len(items), 4)
    complete = (counts > 0).all(axis=1)
    m = int(complete.sum())
    if m < 3:
        raise FisError(f"{m} items have all four cells: the within-item model needs at least 3",
                       fix="use more matched items")
    onehot = np.zeros((4 * len(items), len(X)))
    onehot[slot, np.arange(len(X))] = 1.0 / counts.reshape(-1)[slot]
    return (onehot @ X).reshape(len(items), 4, -1)[complete], complete, item_idx


def _within_item(X: np.ndarray, prepared: Design2x2) -> tuple[pd.DataFrame, dict]:
    means, complete, item_idx = item_cells(X, prepared)                # [m, 4, k] item x cell means
    m = int(complete.sum())
    contrasts = np.einsum("ec,ick->eik", CONTRASTS, means)              # [3, m, k]
    est = contrasts.mean(axis=1)                                       # intercept fit of each contrast
    err = ((contrasts - est[:, None, :]) ** 2).sum(axis=1)             # its residual SS: the error stratum
    ss = m * est ** 2
    centred = means - means.mean(axis=(0, 1))
    tss = np.einsum("ick,ick->k", centred, centred)
    tiny = 1e-12 * np.maximum(tss, np.finfo(float).tiny)
    degenerate = (tss <= 0) | (err[2] <= tiny)
    out = pd.DataFrame(index=range(X.shape[1]))
    for e, name in enumerate(("a", "b", "ab")):
        _fill(out, name, ss[e], err[e], m - 1, (tss <= 0) | (err[e] <= tiny), tss <= 0)
    used = complete[item_idx]
    return out, {"model": "within_item", "df_error": m - 1, "n_items": m,
                 "n_items_dropped": int(len(complete) - m), "rows": used, "degenerate": degenerate}
