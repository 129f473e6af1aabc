"""Benjamini-Hochberg false discovery rate, NaN-safe, with the family written next to the q-values."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def fdr_bh(pvalues: Sequence[float] | np.ndarray | pd.Series) -> np.ndarray:
    """BH q-values (statsmodels ``multipletests(method="fdr_bh")``).

    NaN p-values stay NaN and do not count towards the family size.
    """
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=float).ravel()
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = multipletests(p[ok], method="fdr_bh")[1]
    return q


def add_qvalues(table: pd.DataFrame, p_col: str = "p", family_cols: Sequence[str] | None = None,
                out: str = "q") -> pd.DataFrame:
    """Copy of ``table`` with BH q-values in ``out``, computed within each family.

    A family is the rows sharing the values of ``family_cols`` (the whole table when empty). The columns
    ``<out>_family`` (e.g. ``"term=a:b"`` or ``"all rows"``) and ``<out>_family_size`` (number of non-NaN
    p-values corrected together) say what was corrected over, so a q-value is never read out of context.
    """
    family_cols = list(family_cols or [])
    missing = [c for c in [p_col, *family_cols] if c not in table.columns]
    if missing:
        raise KeyError(f"columns not in table: {missing}")
    result = table.copy()
    result[out] = np.nan
    result[f"{out}_family"] = "all rows"
    result[f"{out}_family_size"] = 0
    groups = ([(key, sub.index) for key, sub in result.groupby(family_cols, dropna=False, sort=False)]
              if family_cols else [((), result.index)])
    for key, index in groups:
        key = key if isinstance(key, tuple) else (key,)
        p = result.loc[index, p_col].to_numpy(dtype=float)
        result.loc[index, out] = fdr_bh(p)
        if family_cols:
            result.loc[index, f"{out}_family"] = "; ".join(f"{c}={v}" for c, v in zip(family_cols, key))
        result.loc[index, f"{out}_family_size"] = int(np.isfinite(p).sum())
    return result
