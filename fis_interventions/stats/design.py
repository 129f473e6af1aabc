"""Checking and coding a 2x2 design: one place decides level order, drops unusable rows and says why.

Every analysis (ANOVA, by-item ANOVA, LMM, screening) goes through :func:`prepare_2x2`, so they all see the
same rows, the same level order and the same deviation codes (-0.5 for the first level, +0.5 for the second,
as in ``../shared/golden``): a main-effect coefficient is then a difference between levels and the
interaction coefficient a difference of differences.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..errors import FisError

Levels = Mapping[str, Sequence[Any]]

# Largest |measure| accepted: sums of squares of n such values must stay finite (1e100^2 * n << 1.8e308).
MAX_ABS = 1e100


@dataclass
class Design2x2:
    """Cleaned data with internal columns ``y, A, B`` (and ``item``, ``extra``) plus codes ``xa, xb, xab``."""

    data: pd.DataFrame
    dv: str
    a: str
    b: str
    item: str | None
    levels: dict[str, list[str]]
    warnings: list[str] = field(default_factory=list)

    @property
    def cells(self) -> list[tuple[str, str]]:
        """The four cells in level order: (a1,b1), (a1,b2), (a2,b1), (a2,b2)."""
        return [(la, lb) for la in self.levels[self.a] for lb in self.levels[self.b]]

    def cell_counts(self) -> dict[tuple[str, str], int]:
        counts = self.data.groupby(["A", "B"], observed=False).size()
        return {c: int(counts.get(c, 0)) for c in self.cells}

    @property
    def empty_cells(self) -> list[tuple[str, str]]:
        return [c for c, n in self.cell_counts().items() if n == 0]


def _require_columns(df: pd.DataFrame, columns: Sequence[str | None]) -> None:
    for col in columns:
        if col is not None and col not in df.columns:
            shown = ", ".join(map(str, list(df.columns)[:12]))
            raise FisError(f"column '{col}' not found (columns: {shown})", field=str(col),
                           fix="pass an existing column name")


def factor_levels(values: pd.Series, name: str, explicit: Sequence[Any] | None) -> list[str]:
    """Two level labels (as strings): ``explicit`` if given, else order of first appearance."""
    present = [str(v) for v in pd.unique(values.dropna())]
    if explicit is not None:
        wanted = [str(v) for v in explicit]
        if len(wanted) != 2 or len(set(wanted)) != 2:
            raise FisError(f"levels for '{name}' must be two different values, got {wanted}", field=name,
                           fix=f"use --levels {name}=LEVEL1,LEVEL2")
        extra = [v for v in present if v not in wanted]
        if extra:
            raise FisError(f"column '{name}' has values not among its levels {wanted}: {extra[:5]}",
                           field=name, fix="list exactly the two levels that occur, or filter the rows")
        absent = [v for v in wanted if v not in present]
        if absent:
            raise FisError(f"level {absent[0]!r} of '{name}' does not occur in the data (found {present})",
                           field=name, fix="check the spelling of the level")
        return wanted
    if len(present) != 2:
        raise FisError(f"factor '{name}' must have exactly two levels, found {len(present)}: {present[:6]}",
                       field=name, fix="filter the rows to two levels or choose another column")
    return present


def prepare_2x2(df: pd.DataFrame, dv: str, a: str, b: str, item: str | None = None,
                levels: Levels | None = None, extra_random: str | None = None) -> Design2x2:
    """Validate columns, fix level order, drop rows with missing values (with a warning), add codes.

    Raises :class:`FisError` for user mistakes (missing column, non-numeric measure, a factor without
    exactly two levels); degenerate but valid data only adds warnings.
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"expected a pandas DataFrame, got {type(df).__name__}")
    _require_columns(df, [dv, a, b, item, extra_random])
    if a == b:
        raise FisError(f"the two factors are the same column '{a}'", field=a, fix="name two different columns")
    for name in (a, b):
        if name == dv:
            raise FisError(f"column '{name}' is both the measure and a factor", field=name,
                           fix="choose a different measure or factor")
    y = df[dv]
    if pd.api.types.is_bool_dtype(y) or not pd.api.types.is_numeric_dtype(y):
        bad = pd.to_numeric(y, errors="coerce").isna() & y.notna()
        where = ""
        if bad.any():
            first = bad.idxmax()
            where = f": first non-numeric value {str(y.loc[first])[:40]!r} at row {first}"
        raise FisError(f"measure column '{dv}' is not numeric (dtype {y.dtype}){where}", field=dv,
                       fix="choose a numeric column or clean its non-numeric values")
    levels = dict(levels or {})
    unknown = [k for k in levels if k not in (a, b)]
    if unknown:
        raise FisError(f"levels given for '{unknown[0]}', which is not a factor ({a}, {b})",
                       field=str(unknown[0]), fix="give levels only for the two factor columns")

    warnings: list[str] = []
    y = y.astype(float)
    values = y.to_numpy()
    infinite = np.isinf(values)
    if infinite.any():
        row = df.index[int(np.flatnonzero(infinite)[0])]
        raise FisError(f"measure column '{dv}' has {int(infinite.sum())} infinite values (first at row index "
                       f"{row})",
                       field=dv, fix="drop or replace the infinite values (missing values may be left empty)")
    big = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 0.0
    if big > MAX_ABS:
        raise FisError(f"measure column '{dv}' has values up to {big:.3g}, whose squares overflow",
                       field=dv, fix=f"rescale the measure (for example divide it by 1e{int(np.log10(big)) - 3})")
    bad_y = np.isnan(values)
    keys = [c for c in (a, b, item, extra_random) if c is not None]
    bad_key = df[keys].isna().any(axis=1).to_numpy()
    if bad_y.any():
        warnings.append(f"dropped {int(bad_y.sum())} rows whose '{dv}' is missing")
    if (bad_key & ~bad_y).any():
        warnings.append(f"dropped {int((bad_key & ~bad_y).sum())} rows with a missing value in "
                        f"{', '.join(keys)}")
    keep = ~(bad_y | bad_key)
    if not keep.any():
        raise FisError(f"no usable rows: every row has a missing '{dv}' or factor value", field=dv,
                       fix="check the data file")
    kept = df.loc[keep]
    lv = {a: factor_levels(kept[a], a, levels.get(a)), b: factor_levels(kept[b], b, levels.get(b))}
    data = pd.DataFrame({"y": y[keep].to_numpy(),
                         "A": kept[a].astype(str).to_numpy(), "B": kept[b].astype(str).to_numpy()})
    if item is not None:
        data["item"] = kept[item].astype(str).to_numpy()
    if extra_random is not None:
        data["extra"] = kept[extra_random].astype(str).to_numpy()
    data["A"] = pd.Categorical(data["A"], categories=lv[a])
    data["B"] = pd.Categorical(data["B"], categories=lv[b])
    data["xa"] = np.where(data["A"] == lv[a][0], -0.5, 0.5)
    data["xb"] = np.where(data["B"] == lv[b][0], -0.5, 0.5)
    data["xab"] = data["xa"] * data["xb"]
    design = Design2x2(data=data, dv=dv, a=a, b=b, item=item, levels=lv, warnings=warnings)
    for la, lb in design.empty_cells:
        warnings.append(f"cell {a}={la}, {b}={lb} has no observations: the 2x2 model is not estimable")
    if float(np.ptp(data["y"].to_numpy())) == 0.0:
        warnings.append(f"'{dv}' has zero variance: no test statistic can be computed")
    return design


def rounding_ss(y: np.ndarray) -> float:
    """A sum of squares of ``y``-sized residuals at or below this is rounding noise (64 ulp per value).

    Relative to the data's magnitude, not to its total SS: with a fixed effect 1e7 times the noise the
    residual SS is 1e-14 of the total and still perfectly measurable.
    """
    y = np.asarray(y, dtype=float)
    return float(len(y) * (64 * np.finfo(float).eps * np.max(np.abs(y), initial=0.0)) ** 2)


def finite_or_none(x: Any) -> Any:
    """JSON-safe number: NaN and infinities become None, numpy scalars become Python ones."""
    if x is None:
        return None
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """DataFrame rows as JSON-safe dicts (NaN -> None)."""
    return [{k: finite_or_none(v) for k, v in row.items()} for row in table.to_dict(orient="records")]
