"""Simple effects: the effect of one factor at each level of the other, from the fitted LMM (as emmeans).

With -0.5/+0.5 codes the effect of A (second level minus first) at B = b is ``L @ beta`` with
``L = [0, 1, 0, x_b]`` (``x_b`` = -0.5 or +0.5); its SE is GLS, its df Satterthwaite's for that ``L``
(lmerTest / ``emmeans(..., lmer.df = "satterthwaite")``), the CI a t interval. This is what
``summary(pairs(emmeans(m, ~ A | B), reverse = TRUE), infer = TRUE, adjust = "holm")`` reports; emmeans
applies Holm within each ``by`` group, which in a 2x2 holds a single contrast, so its ``p.value`` is the
unadjusted p (our ``p``). ``p_holm`` is Holm across the simple effects of one factor (the family a reviewer
means: both levels of the other factor), from statsmodels' ``multipletests``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..errors import FisError
from .design import Design2x2, finite_or_none
from .lmm import LmmResult

SIMPLE_COLUMNS = ["factor", "contrast", "at_factor", "at", "estimate", "se", "df", "t", "p", "p_holm",
                  "ci_low", "ci_high"]


def holm(p: Sequence[float | None]) -> list[float | None]:
    """Holm-adjusted p-values (None stays None and is not counted in the family)."""
    from statsmodels.stats.multitest import multipletests

    idx = [i for i, v in enumerate(p) if v is not None and np.isfinite(v)]
    out: list[float | None] = [None] * len(p)
    if idx:
        adj = multipletests([float(p[i]) for i in idx], method="holm")[1]  # type: ignore[arg-type]
        for i, v in zip(idx, adj):
            out[i] = float(v)
    return out


def check_simple_factor(design: Design2x2, factor: str) -> str:
    """The factor name, or a one-line error naming the two factors."""
    if factor not in (design.a, design.b):
        raise FisError(f"--simple names '{factor}', which is not one of the two factors ({design.a}, {design.b})",
                       field="--simple", fix=f"pass --simple {design.a} or --simple {design.b}")
    return factor


def simple_effects_design(design: Design2x2, lmm: LmmResult, factor: str, level: float = 0.95
                          ) -> pd.DataFrame:
    """Effects of ``factor`` (second level minus first) at each level of the other factor, from ``lmm``."""
    check_simple_factor(design, factor)
    other = design.b if factor == design.a else design.a
    rows: list[dict[str, Any]] = []
    lv = design.levels
    for code, at in zip((-0.5, 0.5), lv[other]):
        L = [0.0, 1.0, 0.0, code] if factor == design.a else [0.0, 0.0, 1.0, code]
        res = lmm.contrast(L, level=level)
        rows.append({"factor": factor, "contrast": f"{lv[factor][1]} - {lv[factor][0]}", "at_factor": other,
                     "at": at, **res})
    for row, ph in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = ph
    table = pd.DataFrame(rows, columns=SIMPLE_COLUMNS)
    return table


def simple_effects_records(design: Design2x2, lmm: LmmResult, factors: Sequence[str]) -> list[dict[str, Any]]:
    """JSON-safe rows of :func:`simple_effects_design` for each of ``factors``."""
    out = []
    for f in factors:
        for row in simple_effects_design(design, lmm, f).to_dict(orient="records"):
            out.append({k: finite_or_none(v) for k, v in row.items()})
    return out


def simple_effects(data: pd.DataFrame | str, dv: str, factors: Sequence[str], simple: str | Sequence[str],
                   item: str, levels: dict[str, Sequence[str]] | None = None, method: str = "REML",
                   random: str = "uncorrelated", prompt: str | None = None) -> pd.DataFrame:
    """Python API of ``fis stats --simple``: simple effects from the primary LMM, as emmeans reports them.

    ``simple``: one factor name (its effect at each level of the other) or both names. Columns: factor,
    contrast, at_factor, at, estimate, se, df (Satterthwaite), t, p, p_holm, ci_low, ci_high.
    """
    from .analyze import read_table
    from .design import prepare_2x2
    from .lmm import lmm_design

    if not isinstance(data, pd.DataFrame):
        data = read_table(data)
    a, b = list(factors)
    design = prepare_2x2(data, dv, a, b, item=item, levels=levels, extra_random=prompt)
    names = [simple] if isinstance(simple, str) else list(simple)
    for name in names:
        check_simple_factor(design, name)
    lmm = lmm_design(design, method=method, random=random, extra_random=prompt)
    return pd.DataFrame(simple_effects_records(design, lmm, names), columns=SIMPLE_COLUMNS)
