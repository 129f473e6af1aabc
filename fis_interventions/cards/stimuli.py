"""What a feature does on the design's own stimuli: its activation per cell and token by token.

Why: a card's corpus contexts (the harvest) say what a feature is in general; a reader of a battery report
asks what it does on *these* stimuli, cell by cell. The values come from :func:`fis_interventions.screening.
collect`, the screen's own forward pass (same tokenisation, exclusion rule and aggregate over the kept
positions), so the per-cell means are the screen's numbers: per stimulus the aggregate (``last`` by default,
the screen's default), then the mean of each item x cell (as :func:`fis_interventions.stats.screen.item_cells`),
then per cell the mean over items with a 95% t interval. The token view keeps every kept position's value from
the same pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

PER_CELL = 2  # stimuli shown token by token per cell (the first items of the design, the same in every cell)


def _cell_table(values: np.ndarray, rows: pd.DataFrame, a: str, b: str, levels: dict[str, list[str]]
                ) -> list[dict[str, Any]]:
    """Per cell (level order): mean over items of the item x cell means, its 95% t CI, and the item count."""
    from scipy import stats as sps

    frame = rows[["item", a, b]].assign(v=values.astype(np.float64))
    item_means = frame.groupby([a, b, "item"], sort=False)["v"].mean()
    by_cell = {cell: part.to_numpy() for cell, part in item_means.groupby(level=[0, 1], sort=False)}
    out = []
    for la in levels[a]:
        for lb in levels[b]:
            m = by_cell.get((la, lb), np.array([]))
            n = len(m)
            mean = float(m.mean()) if n else None
            half = float(sps.t.ppf(0.975, n - 1) * m.std(ddof=1) / np.sqrt(n)) if n > 1 else None
            out.append({"cell": f"{la}.{lb}", a: la, b: lb, "mean": mean, "n_items": n,
                        "ci_low": None if half is None else mean - half,
                        "ci_high": None if half is None else mean + half})
    return out


def stimulus_activity(attached: Any, design: Any, keys: Sequence[Any], aggregate: str = "last",
                      per_cell: int = PER_CELL, items: Sequence[str] | None = None, batch_size: int = 16
                      ) -> dict[tuple[str, int], dict[str, Any]]:
    """``{(point, index): section}`` for each :class:`~.stream.FeatureKey`: per-cell activation (mean, 95% CI
    over items) and ``per_cell`` stimuli per cell token by token, from one screen pass over the design's
    stimuli (``items``: only these items, e.g. the battery's confirmation items)."""
    from ..screening import check_aggregate, collect, stimulus_rows, stimulus_tokens
    from .directions import token_texts

    check_aggregate(aggregate)
    if aggregate == "critical":
        aggregate = "mean"  # the token view needs every position; the critical region is a screen option
    rows = stimulus_rows(design)
    which = "every item of the design"
    if items is not None:
        chosen = rows["item"].astype(str).isin(set(map(str, items)))
        if chosen.any():
            rows, which = rows[chosen].reset_index(drop=True), "the battery's items"
        else:  # the run's item names are not this file's (an edited design): say so, show them all
            which = "every item of the design: none of the battery's item names is in this design file"
    a, b = list(design.factors)
    levels = {f: list(v) for f, v in design.factors.items()}
    tokenizer = attached.split.bridge.tokenizer
    token_lists = stimulus_tokens(tokenizer, rows["stimulus"].tolist())
    wanted: dict[str, list[int]] = {}
    for k in keys:
        wanted.setdefault(k.point, []).append(k.index)
    got = collect(attached, token_lists, list(wanted), aggregate, batch_size, token_features=wanted)
    shown_items = list(dict.fromkeys(rows["item"].astype(str)))[:per_cell]
    texts = [token_texts(tokenizer, ids) for ids in token_lists]
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for point, indices in wanted.items():
        for j, index in enumerate(indices):
            values = got.values[point][:, index]
            examples = []
            for la in levels[a]:
                for lb in levels[b]:
                    for item in shown_items:
                        hit = np.flatnonzero((rows[a] == la).to_numpy() & (rows[b] == lb).to_numpy()
                                             & (rows["item"].astype(str) == item).to_numpy())
                        for r in hit[:1]:
                            acts = got.per_token[point][r][:, j]
                            examples.append({"cell": f"{la}.{lb}", "item": item, "value": float(values[r]),
                                             "tokens": [{"text": t, "activation": None if np.isnan(v) else float(v)}
                                                        for t, v in zip(texts[r], acts, strict=True)]})
            out[(point, index)] = {
                "design": design.name, "aggregate": aggregate, "n_stimuli": len(rows),
                "items": which,
                "definition": (f"per stimulus the feature's {aggregate} over its kept positions (the screen's "
                               "aggregate and forward pass), then the mean of each item x cell, then per cell the "
                               "mean over items with a 95% t interval"),
                "cells": _cell_table(values, rows, a, b, levels), "examples": examples}
    return out


def explained_share(integration: dict[str, Any]) -> dict[str, float] | None:
    """How much of an integration feature's mean pre-activation the listed pairs explain, and the rest."""
    pre = integration.get("preactivation_mean")
    pairs = integration.get("pairs") or []
    if not pre:
        return None
    listed = sum(p["contribution"] for p in pairs) / pre
    constant = integration.get("constant_mean", 0.0) / pre
    return {"listed": listed, "constant": constant, "rest": 1.0 - listed - constant}
