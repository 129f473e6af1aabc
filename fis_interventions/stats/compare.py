"""Model comparison between random-effect structures and profile-likelihood CIs for variance components.

* **Likelihood-ratio test** (R's ``anova(m1, m2)``, which refits REML models by ML): both structures are
  refitted by ML; ``Chisq = 2 (logLik_2 - logLik_1)`` on ``Df = npar_2 - npar_1`` (``npar``: fixed effects +
  relative-factor parameters + residual SD), AIC/BIC as R prints them. Only nested structures are compared
  (each grouping factor of the smaller model is in the larger with a subset of its terms; correlations only if
  the larger has them).
* **Profile CIs** (lme4's ``confint(method = "profile")``): for each random-effect SD and the residual SD,
  the values where the (RE)ML deviance profiled over every other variance parameter rises by
  ``qchisq(level, 1)`` above its minimum. Diagonal (``||`` or intercept-only) structures only.
"""

from __future__ import annotations

import warnings as pywarnings
from typing import Any

import numpy as np
from scipy.special import chdtrc, chdtri
from scipy.optimize import brentq, minimize

from ..errors import FisError
from .design import Design2x2
from .mixed import SINGULAR_TOL, fit_mixed, single_blas_thread
from .structure import Structure


def nested(small: Structure, large: Structure) -> bool:
    """True when ``small``'s random part is a special case of ``large``'s (same fixed part)."""
    if small.prompts != large.prompts:
        return False
    big = {f.label: f for f in large.factors}
    for f in small.factors:
        g = big.get(f.label)
        if g is None or not set(f.terms) <= set(g.terms):
            return False
        if f.kind == "correlated" and g.kind != "correlated":
            return False
        if (f.kind == "varcomp") != (g.kind == "varcomp"):
            return False
    return True


def _npar(structure: Structure, p: int) -> int:
    n_theta = sum(len(f.terms) * (len(f.terms) + 1) // 2 if f.kind == "correlated" else len(f.terms)
                  for f in structure.factors)
    return p + n_theta + 1


def _ml_start(factors: list, theta: np.ndarray) -> np.ndarray:
    """The REML estimates of the same structure as the ML refit's start: ML's optimum is near (variances
    shrunk by about ``(n - p) / n``). A relative SD at 0 is lifted to :data:`~.lmm.WARM_FLOOR`, where the
    gradient does not vanish by symmetry; correlations are kept."""
    from .lmm import WARM_FLOOR

    out = np.asarray(theta, float).copy()
    off = 0
    for f in factors:
        diag = off + f.diagonal_index()
        out[diag] = np.maximum(np.abs(out[diag]), WARM_FLOOR)
        off += f.n_theta
    return out


def ml_fit(design: Design2x2, structure: Structure, start: np.ndarray | None = None,
           cache: dict | None = None) -> dict[str, Any]:
    """ML refit of one structure: logLik, npar, AIC, BIC, deviance (R's ``anova`` row).

    ``start``: this structure's relative-factor estimates to start from (e.g. its REML fit's), else lme4's
    start. ``cache``: prepared problems by structure (:func:`.lmm._problem`), shared with the REML fits.
    """
    from .lmm import _problem

    problem = _problem(design.data, structure, cache)
    if "ml_row" in problem.memo:  # the maximal model of several LRTs is refitted by ML once
        return dict(problem.memo["ml_row"])
    if start is not None:
        start = _ml_start(problem.factors, start)
    fit = fit_mixed(None, None, None, reml=False, start=start, df=False, problem=problem)
    n, p = problem.X.shape
    k = _npar(structure, p)
    ll = fit.loglik
    row = {"model": structure.formula(design.a, design.b), "npar": k, "AIC": -2 * ll + 2 * k,
           "BIC": -2 * ll + k * np.log(n), "logLik": ll, "deviance": -2 * ll, "singular": fit.singular}
    if cache is not None:
        problem.memo["ml_row"] = dict(row)
    return row


def lrt(design: Design2x2, small: Structure, large: Structure, starts: tuple[np.ndarray | None, np.ndarray | None]
        = (None, None), cache: dict | None = None) -> dict[str, Any]:
    """``anova(small, large)`` with ML refits: both rows and ``chisq``, ``df``, ``p`` (``starts``: each
    model's REML relative-factor estimates, to start its ML refit from; ``cache``: see :func:`ml_fit`)."""
    if not nested(small, large):
        raise FisError(f"cannot compare '{small.formula(design.a, design.b)}' with "
                       f"'{large.formula(design.a, design.b)}': the models are not nested", field="--random",
                       fix="compare a structure with one that contains all its random terms")
    r0, r1 = ml_fit(design, small, starts[0], cache), ml_fit(design, large, starts[1], cache)
    chisq = max(2 * (r1["logLik"] - r0["logLik"]), 0.0)
    df = r1["npar"] - r0["npar"]
    p = float(chdtrc(df, chisq)) if df > 0 else None
    return {"small": r0, "large": r1, "chisq": chisq, "df": df, "p": p}


def _diagonal(structure: Structure) -> bool:
    return all(f.kind == "diagonal" for f in structure.factors)


@single_blas_thread
def profile_ci(design: Design2x2, structure: Structure, reml: bool = False, level: float = 0.95,
               start: np.ndarray | None = None, cache: dict | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Profile-likelihood CIs of every random-effect SD and the residual SD (lme4's ``confint``).

    As lme4, the profile is of the ML deviance (``reml=False``; also for a model reported by REML: lme4's
    ``profile`` of a REML fit does the same, checked against ``confint`` on the golden data); ``sd`` is the
    ML estimate.

    Rows: ``group``, ``term``, ``sd`` (estimate), ``lower``, ``upper``. A singular fit (an SD at zero) gets a
    one-line warning: its lower limit is 0 and lme4's profile is unreliable there too.
    """
    from .lmm import _problem

    if not _diagonal(structure):
        raise FisError("profile CIs need an uncorrelated or intercept-only structure", field="--random",
                       fix="pass --random uncorrelated or --random intercept with --variance-ci")
    problem = _problem(design.data, structure, cache)
    factors = problem.factors
    s = problem.s
    fit = fit_mixed(None, None, None, reml=reml, df=False, problem=problem,
                    start=None if start is None else _ml_start(factors, start))
    dev = problem.deviance(reml)
    sigma = float(np.sqrt(dev.sigma2(fit.theta)))
    est = np.append(fit.theta * sigma, sigma)          # SDs on the scaled data, residual SD last
    m = est.size
    dmin = dev.deviance_vp(np.append(fit.theta, sigma))
    crit = float(chdtri(1, 1 - level))
    notes: list[str] = []
    if reml:
        notes.append("profile CIs on the REML criterion (lme4's confint profiles the ML deviance)")
    if fit.singular:
        notes.append("profile CIs on a singular fit: a variance is estimated at zero, so its lower limit is 0 "
                      "and the intervals near the boundary are approximate")

    def dev_sd(sd: np.ndarray) -> tuple[float, np.ndarray]:
        sig = sd[-1]
        th = sd[:-1] / sig
        vp = np.append(th, sig)
        try:
            g, _ = dev.deviance_vp_gradient(vp)
            f = dev.deviance_vp(vp)
        except np.linalg.LinAlgError:
            return np.inf, np.zeros(m)
        out = np.empty(m)
        out[:-1] = g[:-1] / sig
        out[-1] = g[-1] - float(np.dot(g[:-1], th)) / sig
        return f, out

    def profiled(j: int, v: float, x0: np.ndarray) -> tuple[float, np.ndarray]:
        free = [i for i in range(m) if i != j]

        def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
            sd = np.empty(m)
            sd[free] = z
            sd[j] = v
            f, g = dev_sd(sd)
            return f, g[free]

        # bounded search box (a step to sigma ~ 0 makes theta = sd / sigma explode and the solve fail)
        bounds = [(0.0, 100 * sigma) if i < m - 1 else (sigma / 20, 20 * sigma) for i in free]
        with pywarnings.catch_warnings(), np.errstate(all="ignore"):
            pywarnings.simplefilter("ignore")
            res = minimize(fun, x0[free], jac=True, method="L-BFGS-B", bounds=bounds,
                           options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 2000})
        x = x0.copy()
        x[free] = res.x
        x[j] = v
        return float(res.fun) - dmin, x

    rows = []
    shown = {"1": "(Intercept)", "xa": design.a, "xb": design.b, "xab": f"{design.a}:{design.b}"}
    labels = [(f.name, shown[t]) for f in factors for t in f.terms] + [("Residual", None)]
    for j in range(m):
        start = est.copy()

        def excess(v: float) -> float:
            return profiled(j, v, start)[0] - crit

        lo_bound = 0.0 if j < m - 1 else 1e-6 * sigma
        limits = []
        for side in (-1, 1):
            if side < 0 and (est[j] <= SINGULAR_TOL * sigma or excess(lo_bound) < 0):
                limits.append(0.0)
                continue
            step = max(est[j], 0.05 * sigma) * 0.5
            near = est[j]
            far = est[j] + side * step
            while side > 0 and excess(far) < 0:
                near, far = far, far + side * step
                step *= 2
            if side < 0:
                far = max(far, lo_bound)
                while excess(far) < 0 and far > lo_bound:
                    near, far = far, max(lo_bound, far - step)
            a, b = sorted((near, far))
            limits.append(brentq(excess, a, b, xtol=1e-10 * max(sigma, 1e-300)))
        rows.append({"group": labels[j][0], "term": labels[j][1], "sd": est[j] * s,
                     "lower": limits[0] * s, "upper": limits[1] * s})
    return rows, notes
