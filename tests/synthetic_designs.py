"""Synthetic data sets shared by the statistics tests and bench/stats_speed.py (a helper module, not a test file)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def crossed_design(seed: int = 0, items: int = 600, prompts: int = 24, per_item: int = 4) -> pd.DataFrame:
    """A 2x2 design with items crossed with prompts (each item seen under ``per_item`` prompts), by-item SDs
    1.0/0.5/0.4/0.3 and by-prompt SDs 0.6/0.3/0.2/0.2 on intercept, A, B, A:B; residual SD 1."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(items):
        for p in rng.choice(prompts, per_item, replace=False):
            for c in range(4):
                rows.append((i, p, c))
    it, pr, cell = np.array(rows).T
    xa, xb = np.where(cell >= 2, 0.5, -0.5), np.where(cell % 2 == 1, 0.5, -0.5)
    u = rng.normal(size=(items, 4)) * [1.0, 0.5, 0.4, 0.3]
    v = rng.normal(size=(prompts, 4)) * [0.6, 0.3, 0.2, 0.2]
    y = (0.3 * xa + 0.2 * xb + 0.1 * xa * xb + u[it, 0] + u[it, 1] * xa + u[it, 2] * xb + u[it, 3] * xa * xb
         + v[pr, 0] + v[pr, 1] * xa + v[pr, 2] * xb + v[pr, 3] * xa * xb + rng.normal(size=it.size))
    return pd.DataFrame({"item": it, "prompt": pr, "A": np.where(xa > 0, "a2", "a1"),
                         "B": np.where(xb > 0, "b2", "b1"), "y": y})
