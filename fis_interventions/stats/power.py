"""Power of the primary interaction test by simulation (``fis power``), like R's simr for our 2x2 design.

The simulated design is balanced: N items, every item in all four cells, ``reps`` observations per item x
cell x prompt, P prompts (a fixed factor below 5, as in the primary model). Each simulated set is analysed
with the primary model, ``y ~ A*B [+ prompt] + (1 + A + B [+ A:B] || item)``, by REML with Satterthwaite df.

Closed form (hand-written, vectorised over simulations): in a balanced design the item strata (item means,
item x A, item x B, item x A:B contrasts) and the residual are orthogonal, and each stratum's mean square
estimates ``sigma2 + k_s var_s``. The REML fit of the uncorrelated model is then the order-restricted fit
of these mean squares: each slope stratum keeps its own mean square unless it falls below the residual's,
in which case it is pooled with the residual (its variance is zero: the singular-fit rule drops it). The
interaction test is ``F = SS_AB / MS`` of the A:B stratum on its ``N - 1`` df, or of the pooled residual
on the pooled df. ``tests/test_stats_power.py`` checks this against full fits of the same data sets. Five or
more prompts (crossed random prompts) use full fits (:func:`.lmm.lmm_2x2`), which is slow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import fdtrc

from ..errors import FisError
from .structure import MIN_RANDOM_LEVELS

XA = np.array([-0.5, -0.5, 0.5, 0.5])
XB = np.array([-0.5, 0.5, -0.5, 0.5])


@dataclass(frozen=True)
class PowerSpec:
    """The data-generating model: fixed effects and the variances of the maximal uncorrelated model."""

    effect: float                 # the A:B interaction (difference of differences)
    var_resid: float
    var_item: float = 0.0
    var_a: float = 0.0
    var_b: float = 0.0
    var_ab: float = 0.0
    reps: int = 1                 # observations per item x cell x prompt
    prompts: int = 1
    var_prompt: float = 0.0
    effect_a: float = 0.0
    effect_b: float = 0.0

    def check(self) -> None:
        """One-line :class:`FisError` naming the option for impossible settings."""
        for name in ("effect", "effect_a", "effect_b"):
            if not math.isfinite(getattr(self, name)):
                raise FisError(f"{name} is {getattr(self, name)}", field=f"--{name.replace('_', '-')}",
                               fix="give a finite number")
        for name in ("var_resid", "var_item", "var_a", "var_b", "var_ab", "var_prompt"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise FisError(f"variance {name} = {v} is negative or not finite",
                               field=f"--{name.replace('_', '-')}", fix="give a variance >= 0")
        if self.var_resid <= 0:
            raise FisError("the residual variance must be positive", field="--var-resid",
                           fix="give the pilot's residual variance (> 0)")
        if self.reps < 1:
            raise FisError(f"reps = {self.reps}", field="--reps", fix="give at least 1 observation per cell")
        if self.prompts < 1:
            raise FisError(f"prompts = {self.prompts}", field="--prompts", fix="give at least 1 prompt")


def simulate(spec: PowerSpec, n_items: int, n_sims: int, rng: np.random.Generator) -> np.ndarray:
    """Simulated measures ``[n_sims, n_items, 4 cells, prompts * reps]`` (cells in the order of XA, XB)."""
    R = spec.prompts * spec.reps
    u = rng.normal(size=(n_sims, n_items, 4)) * np.sqrt([spec.var_item, spec.var_a, spec.var_b, spec.var_ab])
    mean = (u[..., 0:1] + (spec.effect_a + u[..., 1:2]) * XA + (spec.effect_b + u[..., 2:3]) * XB
            + (spec.effect + u[..., 3:4]) * XA * XB)
    y = mean[..., None] + rng.normal(scale=np.sqrt(spec.var_resid), size=(n_sims, n_items, 4, R))
    if spec.prompts > 1:
        prompt_fx = rng.normal(scale=np.sqrt(spec.var_prompt), size=(n_sims, spec.prompts))
        y += np.repeat(prompt_fx, spec.reps, axis=1)[:, None, None, :]
    return y


def closed_form_test(y: np.ndarray, prompts: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Interaction estimate, F and Satterthwaite df of the primary model for each balanced data set in ``y``."""
    S, m, _, R = y.shape
    cell = y.mean(axis=3)                                        # [S, m, 4]
    resid = y - cell[..., None]
    ss_e = np.einsum("smcr,smcr->s", resid, resid)
    df_e = 4.0 * m * (R - 1)
    if prompts > 1:  # prompt as a fixed factor: its main effect leaves the residual
        reps = R // prompts
        per_prompt = y.reshape(S, m, 4, prompts, reps).mean(axis=(1, 2, 4))
        dev = per_prompt - per_prompt.mean(axis=1, keepdims=True)
        ss_e = ss_e - 4.0 * m * reps * np.einsum("sp,sp->s", dev, dev)
        df_e -= prompts - 1
    item_mean = cell.mean(axis=2)
    a_hat = cell @ XA                                            # (c21 + c22 - c11 - c12) / 2
    b_hat = cell @ XB
    c_hat = cell @ (XA * XB * 4)                                 # c22 - c21 - c12 + c11
    est = c_hat.mean(axis=1)

    def ss(v: np.ndarray, k: float) -> np.ndarray:
        d = v - v.mean(axis=1, keepdims=True)
        return k * np.einsum("sm,sm->s", d, d)

    strata = [ss(item_mean, 4.0 * R), ss(a_hat, float(R)), ss(b_hat, float(R))]
    ss_ab_fixed = R / 4.0 * m * est**2
    if R > 1:
        strata.append(ss(c_hat, R / 4.0))
        ab = len(strata) - 1
    else:  # one observation per cell: the item x A:B stratum is the residual
        ss_e, df_e, ab = ss(c_hat, 0.25), float(m - 1), None
    ms = np.stack(strata, axis=1) / (m - 1)                      # [S, k]
    order = np.argsort(ms, axis=1)
    pooled_ss, pooled_df = ss_e.copy(), np.full(S, df_e)
    active = np.ones(S, dtype=bool)
    in_pool = np.zeros_like(ms, dtype=bool)
    rows = np.arange(S)
    for k in range(ms.shape[1]):
        j = order[:, k]
        take = active & (ms[rows, j] < pooled_ss / pooled_df)
        pooled_ss = np.where(take, pooled_ss + ms[rows, j] * (m - 1), pooled_ss)
        pooled_df = np.where(take, pooled_df + (m - 1), pooled_df)
        in_pool[rows[take], j[take]] = True
        active &= take
    if ab is None:
        denom, df = pooled_ss / pooled_df, pooled_df
    else:
        own = ~in_pool[:, ab]
        denom = np.where(own, ms[:, ab], pooled_ss / pooled_df)
        df = np.where(own, float(m - 1), pooled_df)
    with np.errstate(divide="ignore", invalid="ignore"):
        F = ss_ab_fixed / denom
    return est, F, df


def _fit_test(y: np.ndarray, prompts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same statistics from full fits (:func:`.lmm.lmm_2x2`), one data set at a time."""
    from .lmm import lmm_2x2

    S, m, _, R = y.shape
    reps = R // prompts
    item = np.repeat(np.arange(m), 4 * R)
    cellidx = np.tile(np.repeat(np.arange(4), R), m)
    prompt = np.tile(np.repeat(np.arange(prompts), reps), 4 * m)
    frame = pd.DataFrame({"item": item, "a": np.where(XA[cellidx] < 0, "a1", "a2"),
                          "b": np.where(XB[cellidx] < 0, "b1", "b2"), "prompt": prompt})
    levels = {"a": ["a1", "a2"], "b": ["b1", "b2"]}
    est, F, df = (np.full(S, np.nan) for _ in range(3))
    for s in range(S):
        fit = lmm_2x2(frame.assign(y=y[s].ravel()), "y", "a", "b", "item", levels=levels,
                      extra_random="prompt" if prompts > 1 else None, compare=False)
        row = fit.fixed.iloc[3]
        est[s], F[s], df[s] = row["estimate"], row["t"] ** 2, row["df"]
    return est, F, df


def _interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson (exact binomial) interval of a rejection rate."""
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(k, n, alpha=1 - level, method="beta")
    return float(low), float(high)


def power_curve(spec: PowerSpec, items: Sequence[int], n_sims: int = 1000, seed: int = 0, alpha: float = 0.05,
                engine: str = "auto", stop_at: float | None = None) -> pd.DataFrame:
    """Power of the interaction test at each N in ``items``: rejections / n_sims with a 95% Clopper-Pearson CI.

    ``engine``: ``closed`` (balanced closed form), ``fit`` (full REML fits) or ``auto`` (closed form unless
    there are 5 or more prompts, which the primary model treats as crossed random effects). ``stop_at``: end
    the curve at the first N whose power reaches it (the grid is simulated in order from one seeded stream,
    so every row, and :func:`items_needed` for that target, is the same as on the full curve).
    """
    spec.check()
    items = [int(n) for n in items]
    if not items or min(items) < 2:
        raise FisError(f"item counts {items} include fewer than 2 items", field="--items",
                       fix="give item counts of at least 2, e.g. --items 12,24,48")
    if n_sims < 10:
        raise FisError(f"{n_sims} simulations", field="--sims", fix="use at least 10 (1000 for a 95% CI of +-3%)")
    if not 0 < alpha < 1:
        raise FisError(f"alpha = {alpha}", field="--alpha", fix="give a level between 0 and 1, e.g. 0.05")
    if engine == "auto":
        engine = "fit" if spec.prompts >= MIN_RANDOM_LEVELS else "closed"
    rng = np.random.default_rng(seed)
    rows = []
    for n in items:
        y = simulate(spec, n, n_sims, rng)
        est, F, df = closed_form_test(y, spec.prompts) if engine == "closed" else _fit_test(y, spec.prompts)
        p = fdtrc(1, df, F)
        k = int(np.sum(p < alpha))
        low, high = _interval(k, n_sims)
        rows.append({"n_items": n, "power": k / n_sims, "ci_low": low, "ci_high": high, "rejections": k,
                     "n_sims": n_sims, "mean_estimate": float(np.nanmean(est)),
                     "median_df": float(np.nanmedian(df))})
        if stop_at is not None and k / n_sims >= stop_at:
            break
    return pd.DataFrame(rows)


def items_needed(curve: pd.DataFrame, target: float) -> int | None:
    """Smallest N on the grid whose estimated power reaches ``target`` (None if none does)."""
    ok = curve[curve["power"] >= target]
    return int(ok["n_items"].min()) if not ok.empty else None


def spec_from_stats(result: dict[str, Any], source: str | None = None) -> PowerSpec:
    """Variance components and interaction of a ``fis stats`` result (its maximal or simplified LMM)."""
    lmm = result.get("lmm")
    if not lmm or not lmm.get("converged"):
        raise FisError("the pilot has no fitted mixed model (was it run with --item?)", source=source,
                       field="lmm", fix="run fis stats with --item on the pilot data")
    a, b = result["factors"]
    names = {"(Intercept)": "var_item", a: "var_a", b: "var_b", f"{a}:{b}": "var_ab"}
    item = result.get("item")
    values: dict[str, float] = {}
    for r in lmm.get("random_effects") or []:
        if r["group"] == "Residual":
            values["var_resid"] = float(r["vcov"])
        elif r["group"] == item and r.get("term2") is None and r["term1"] in names:
            values[names[r["term1"]]] = float(r["vcov"] or 0.0)
    if "var_resid" not in values and lmm.get("resid_var") is not None:
        values["var_resid"] = float(lmm["resid_var"])
        values["var_item"] = float(lmm.get("item_var") or 0.0)
    fixed = {r["term"]: r for r in lmm["fixed"]}
    inter = fixed.get(f"{a}:{b}", {}).get("estimate")
    if inter is None or "var_resid" not in values:
        raise FisError("the pilot lacks the interaction estimate or the residual variance", source=source,
                       field="lmm", fix="use a pilot whose mixed model converged")
    n_items = result.get("n_items") or 1
    reps = max(1, int(round(result["n"] / (4 * n_items))))
    return PowerSpec(effect=float(inter), reps=reps, effect_a=float(fixed[a]["estimate"] or 0.0),
                     effect_b=float(fixed[b]["estimate"] or 0.0), **values)


def spec_dict(spec: PowerSpec) -> dict[str, Any]:
    return asdict(spec)
