"""Flags for screen results that are more likely artifacts than effects; flagged features are not hits.

Why this exists: a screen ranks thousands of features, so the top of the list collects whatever is extreme,
artifacts included. On the demo checkpoint, 15 SAE latents topped a mean-aggregated screen with one shared
F = 3993: they fired only on a phrase shared by two cells, were exactly zero elsewhere, and their ratio between
the firing cells was the sentences' token-count ratio. Three patterns catch such features without looking at
what they mean:

* ``zero_level:<factor>=<level>``: the feature is exactly zero on every stimulus of one level of a factor. Its
  "interaction" then only compares the other level's two cells (a difference of one simple effect, scaled by
  whatever differs between them, e.g. length), and its error variance comes from one level only.
* ``shared_F(n)``: ``n`` (>= ``shared_min``) features share one interaction F to ``shared_rtol`` relative. Distinct
  features do not agree to six digits by chance; they do when they are the same signal times a constant (one
  phrase's detector copies, or a value fixed by token counts).
* ``rare(k)``: the feature is non-zero on only ``k`` stimuli (fewer than ``rare_fraction`` of them, at least
  ``rare_min``): its test rests on a handful of sentences.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

SHARED_RTOL = 1e-6
SHARED_MIN = 3
RARE_FRACTION = 0.1
RARE_MIN = 3


def level_and_rarity_flags(X: np.ndarray, rows: pd.DataFrame, factors: dict[str, list[str]],
                           rare_fraction: float = RARE_FRACTION, rare_min: int = RARE_MIN) -> list[str]:
    """Per column of ``X`` ([n_stimuli, n_features], rows aligned with ``rows``): its ``zero_level`` and
    ``rare`` flags, ``;``-joined ('' for none). A feature that is zero everywhere is degenerate, not flagged."""
    X = np.asarray(X)
    nonzero = X != 0
    fires = nonzero.sum(axis=0)
    flags: list[list[str]] = [[] for _ in range(X.shape[1])]
    for factor, levels in factors.items():
        values = rows[factor].astype(str).to_numpy()
        for level in levels:
            mask = values == str(level)
            silent = ~nonzero[mask].any(axis=0) & (fires > 0)
            for j in np.flatnonzero(silent):
                flags[j].append(f"zero_level:{factor}={level}")
    limit = max(rare_min, math.ceil(rare_fraction * X.shape[0]))
    for j in np.flatnonzero((fires > 0) & (fires < limit)):
        flags[j].append(f"rare({int(fires[j])})")
    return [";".join(f) for f in flags]


def shared_statistic_groups(F: np.ndarray, rtol: float = SHARED_RTOL, min_count: int = SHARED_MIN) -> np.ndarray:
    """For each value of ``F``: the size of its group of values equal to ``rtol`` relative (chained over sorted
    values) when that size is >= ``min_count``, else 0. NaN values get 0."""
    F = np.asarray(F, dtype=float)
    out = np.zeros(len(F), dtype=int)
    ok = np.flatnonzero(np.isfinite(F))
    if len(ok) < min_count:
        return out
    order = ok[np.argsort(F[ok], kind="stable")]
    values = F[order]
    close = np.abs(np.diff(values)) <= rtol * np.maximum(np.abs(values[1:]), np.finfo(float).tiny)
    group = np.concatenate([[0], np.cumsum(~close)])
    sizes = np.bincount(group)
    size_of = sizes[group]
    out[order] = np.where(size_of >= min_count, size_of, 0)
    return out


def join_flags(*columns: list[str] | np.ndarray) -> list[str]:
    """Element-wise ``;``-join of flag columns, dropping empty strings."""
    return [";".join(p for p in parts if p) for parts in zip(*columns, strict=True)]
