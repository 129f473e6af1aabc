"""A label-permutation null for the screen: what the same screen finds when the cell labels carry no signal.

Why this exists: a screen's count of "significant" features means little on its own. Activations are not
normal (sparse, zero-inflated, heavy tails), features are correlated, and artifacts (length, shared phrases)
make parametric p-values too small. Here the cell labels are permuted many times and the whole screen is
repeated on each relabelling, vectorised: each feature gets a permutation p-value for its interaction F
(``p_perm``), a family-wise one from the maximum F over all features screened (``p_perm_fwer``, Westfall-Young
single-step: valid whatever the correlation between features), and the screen's BH count (q < alpha) is set
beside the counts the relabelled screens reach.

Schemes (exchangeable units under the null of no effect of the cell labels):

* **within items** (matched items, the within-item model): the four cell labels are permuted within each item,
  independently across items. On the item x cell means, permuting the four cells turns the interaction contrast
  (+1 -1 -1 +1) into one of six sign patterns, each with probability 1/6: +-(1 -1 -1 1), +-(1 1 -1 -1),
  +-(1 -1 1 -1). So a permuted per-item contrast is a random sign times a random one of three fixed contrasts,
  and every permutation's sums and sums of squares for all features are two matrix products.
* **across stimuli** (cell lists, the OLS model): the stimuli's cell labels are permuted (cell sizes kept); the
  Gram matrix of the design is unchanged, so each permutation's coefficients for all features are one product.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

from ..errors import FisError
from .design import Levels, prepare_2x2

# The three contrasts a permuted interaction contrast can become (up to sign), on cells (a1b1, a1b2, a2b1, a2b2).
PERMUTED_CONTRASTS = np.array([[1.0, -1.0, -1.0, 1.0], [1.0, 1.0, -1.0, -1.0], [1.0, -1.0, 1.0, -1.0]])
CHUNK_ELEMENTS = 1_000_000  # permutations x features per chunk: bounded memory (~100 MB of temporaries)


@dataclass
class PermutationNull:
    """Per feature: ``p_perm`` and ``p_perm_fwer``; per permutation: ``null_hits`` (BH count q < alpha over the
    same family) and ``max_F``."""

    p_perm: np.ndarray
    p_perm_fwer: np.ndarray
    null_hits: np.ndarray
    max_F: np.ndarray
    n_perm: int
    seed: int
    scheme: str
    df_error: int

    def hits_summary(self, observed: int) -> dict[str, float]:
        """The observed BH count set against the permutation distribution of that count."""
        h = self.null_hits
        return {"observed": int(observed), "null_median": float(np.median(h)), "null_mean": float(h.mean()),
                "null_q95": float(np.quantile(h, 0.95)), "null_max": int(h.max()),
                "p_count": float((1 + int((h >= observed).sum())) / (len(h) + 1))}


def permutation_null(X: np.ndarray, design: pd.DataFrame, a: str, b: str, F_obs: np.ndarray,
                     levels: Levels | None = None, item: str | None = None, n_perm: int = 1000, seed: int = 0,
                     alpha: float = 0.05) -> PermutationNull:
    """Permutation null of the interaction F of every column of ``X`` ([n_obs, k]); ``F_obs`` are the screen's
    observed F values of those columns (finite: degenerate features are left out by the caller). ``item``
    selects the within-item scheme (the screen's within-item model), else labels are permuted across rows."""
    if n_perm < 1:
        raise FisError(f"the number of permutations must be >= 1, got {n_perm}", field="permutations",
                       fix="use e.g. 1000, or 0 to skip the null")
    X = np.asarray(X, dtype=float)
    F_obs = np.asarray(F_obs, dtype=float)
    if X.shape[1] != len(F_obs):
        raise FisError(f"{X.shape[1]} features but {len(F_obs)} observed F values")
    cols = [a, b] + ([item] if item is not None else [])
    frame = design[cols].copy().reset_index(drop=True)
    frame["_dummy"] = 0.0
    prepared = prepare_2x2(frame, "_dummy", a, b, item=item, levels=levels)
    rng = np.random.default_rng(seed)
    k = X.shape[1]
    if item is not None:
        means = item_cell_means(X, prepared)
        stat, df_err, scheme = _within_item_stat(means), means.shape[0] - 1, "within items"
    else:
        stat, df_err, scheme = _ols_stat(X, prepared), len(X) - 4, "across stimuli"
    exceed = np.zeros(k, dtype=np.int64)
    max_F = np.empty(n_perm)
    hits = np.empty(n_perm, dtype=np.int64)
    chunk = max(1, CHUNK_ELEMENTS // max(k, 1))
    threshold = F_obs * (1 - 1e-9)  # ties (e.g. the identity relabelling) count as at least as extreme
    # BH on p-values of one F(1, df) distribution is BH on F: the i-th largest F passes when it reaches the
    # critical F at level alpha * i / k (computed once; no p-value per permutation and feature)
    f_crit = sps.f.isf(alpha * np.arange(1, k + 1) / k, 1, df_err)
    for start in range(0, n_perm, chunk):
        n = min(chunk, n_perm - start)
        F = stat(rng, n)                                               # [n, k], NaN where degenerate
        valid = np.isfinite(F)
        exceed += (valid & (F >= threshold)).sum(axis=0)
        Fz = np.where(valid, F, 0.0)
        max_F[start:start + n] = Fz.max(axis=1) if k else 0.0
        passes = -np.sort(-Fz, axis=1) >= f_crit                        # F in decreasing order vs its BH bar
        hits[start:start + n] = np.where(passes.any(axis=1), k - np.argmax(passes[:, ::-1], axis=1), 0)
    p_perm = (1 + exceed) / (n_perm + 1)
    p_fwer = (1 + (max_F[None, :] >= threshold[:, None]).sum(axis=1)) / (n_perm + 1)
    return PermutationNull(p_perm, p_fwer, hits, max_F, n_perm, seed, scheme, df_err)


def item_cell_means(X: np.ndarray, prepared) -> np.ndarray:
    """``[m, 4, k]`` item x cell means of the items that have all four cells (cells in level order)."""
    from .screen import item_cells

    return item_cells(X, prepared)[0]


def within_item_F(D: np.ndarray, W: np.ndarray, tss: np.ndarray, D2: np.ndarray | None = None) -> np.ndarray:
    """Interaction F of each relabelling: ``D`` [m, 3, k] the three contrasts per item, ``W`` [n, m, 3] each
    relabelling's signed choice (one +-1 per item), ``tss`` [k] for the degeneracy rule of the screen; ``D2``
    is ``D ** 2`` if already computed."""
    n, m, _ = W.shape
    s1 = W.reshape(n, 3 * m) @ D.reshape(3 * m, -1)
    s2 = np.abs(W).reshape(n, 3 * m) @ (D ** 2 if D2 is None else D2).reshape(3 * m, -1)
    est = s1 / m
    err = np.maximum(s2 - m * est ** 2, 0.0)
    tiny = 1e-12 * np.maximum(tss, np.finfo(float).tiny)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(err > tiny, m * est ** 2 / (err / (m - 1)), np.nan)


def _within_item_stat(means: np.ndarray):
    m = means.shape[0]
    D = np.einsum("jc,ick->ijk", PERMUTED_CONTRASTS, means)          # [m, 3, k]
    centred = means - means.mean(axis=(0, 1))
    tss = np.einsum("ick,ick->k", centred, centred)
    D2 = D ** 2

    def stat(rng: np.random.Generator, n: int) -> np.ndarray:
        W = np.zeros((n, m, 3))
        choice = rng.integers(0, 3, size=(n, m))
        sign = rng.choice(np.array([-1.0, 1.0]), size=(n, m))
        np.put_along_axis(W, choice[..., None], sign[..., None], axis=2)
        return within_item_F(D, W, tss, D2)

    return stat


def ols_permuted_F(X: np.ndarray, D: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """Interaction F (the last column of the deviation-coded ``D`` [n, 4]) of every column of ``X`` under each
    relabelling ``perms`` [size, n] (row ``i`` of the data gets the codes of row ``perms[:, i]``)."""
    n = len(X)
    G_inv = np.linalg.inv(D.T @ D)   # unchanged by relabelling: cell sizes are kept
    Xc = X - X.mean(axis=0)          # the intercept absorbs the mean; centring keeps the subtraction exact
    xx = np.einsum("ij,ij->j", Xc, Xc)
    tiny = 1e-12 * np.maximum(xx, np.finfo(float).tiny)
    size = len(perms)
    B = (D[perms].transpose(0, 2, 1).reshape(size * 4, n) @ Xc).reshape(size, 4, -1)   # one GEMM: D_p' X
    beta = G_inv @ B
    rss = np.maximum(xx - (B * beta).sum(axis=1), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(rss > tiny, beta[:, 3] ** 2 / G_inv[3, 3] / (rss / (n - 4)), np.nan)


def _ols_stat(X: np.ndarray, prepared):
    data = prepared.data
    n = len(X)
    D = np.column_stack([np.ones(n), data["xa"], data["xb"], data["xab"]])

    def stat(rng: np.random.Generator, size: int) -> np.ndarray:
        return ols_permuted_F(X, D, np.argsort(rng.random((size, n)), axis=1))

    return stat
