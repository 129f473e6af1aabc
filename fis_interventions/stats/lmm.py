"""Linear mixed models reported as lme4/lmerTest report them.

The 2x2 models (:func:`lmm_2x2`, :func:`lmm_design`) use our profiled deviance (:mod:`.profile`, fitted by
:mod:`.mixed`) with the random-effects structure chosen and simplified by :mod:`.structure`: maximal
uncorrelated by default, correlated or intercept-only on request, prompts fixed or crossed. :func:`lmm_fit`
fits any random-intercept model with statsmodels' ``MixedLM`` and corrects what differs from lmerTest:

* **Standard errors.** lme4 reports ``sigma^2 (X' V^-1 X)^-1`` at the estimates, i.e. the GLS covariance.
  statsmodels' ``bse_fe`` comes from the inverse Hessian of its likelihood in its own parameterisation,
  which drifts from the GLS covariance (about 1e-5 relative on balanced data, more on unbalanced data).
* **Satterthwaite df** (lmerTest): ``df = 2 (L C L')^2 / (g' A g)`` with ``g`` the gradient of ``L C L'`` in
  the variance parameters and ``A = 2 H^-1`` from the Hessian of the deviance (central differences; the df
  does not depend on the parameterisation at the optimum). Variances at zero are held fixed, with a warning.
"""

from __future__ import annotations

import logging
import warnings as pywarnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from .design import Design2x2, Levels, finite_or_none, prepare_2x2, records, rounding_ss
from .mixed import MixedFit, fit_mixed
from .profile import RandomFactor
from .structure import MIN_RANDOM_LEVELS, SLOTS, Structure, initial_structure, simplify

log = logging.getLogger(__name__)

FIXED_COLUMNS = ["term", "estimate", "se", "df", "t", "p", "ci_low", "ci_high"]

# Optimisers tried in order until one reports convergence. BFGS with gtol=1e-8 reaches lme4's optimum to
# ~1e-7 relative on the golden data; statsmodels' default (1e-5) stops ~4e-5 away, and 1e-10 fails on ML fits.
OPTIMIZERS: list[tuple[str, dict[str, Any]]] = [("bfgs", {"gtol": 1e-8}), ("lbfgs", {}), ("powell", {}),
                                                ("nm", {"maxiter": 20000}), ("cg", {})]


class GaussianLik:
    """(RE)ML log-likelihood of ``y = X b + sum_k Z_k u_k + e`` in the variances (hand-written; see module).

    ``V = sum_k s2_k Z_k Z_k' + s2_e I`` is never formed: with ``W = Z diag(sqrt(d))`` the Woodbury identity
    gives ``V^-1 = (I - W K^-1 W') / s2_e`` with ``K = s2_e I + W'W`` (size = number of random levels), and
    ``log|V| = log|K| + (n - q) log s2_e``. Constants follow lme4, so ``loglik`` equals ``logLik(lmer)``.
    """

    def __init__(self, X: np.ndarray, y: np.ndarray, Zs: Sequence[np.ndarray], reml: bool) -> None:
        self.n, self.p = X.shape
        self.reml = reml
        Z = np.hstack(Zs) if Zs else np.zeros((self.n, 0))
        self.sizes = [z.shape[1] for z in Zs]
        self.XtX, self.XtZ, self.ZtZ = X.T @ X, X.T @ Z, Z.T @ Z
        self.Xty, self.Zty, self.yty = X.T @ y, Z.T @ y, float(y @ y)

    def _parts(self, theta: np.ndarray) -> dict[str, Any]:
        *comps, s2 = (float(t) for t in theta)
        if s2 <= 0 or any(c < 0 for c in comps):
            raise np.linalg.LinAlgError("variance out of range")
        s = np.concatenate([np.full(k, np.sqrt(c)) for k, c in zip(self.sizes, comps)]) if comps else np.zeros(0)
        q = s.size
        K = s2 * np.eye(q) + (s[:, None] * self.ZtZ * s[None, :])
        cK = np.linalg.cholesky(K)
        XtW, Wty = self.XtZ * s[None, :], self.Zty * s

        def solve(b: np.ndarray) -> np.ndarray:
            return np.linalg.solve(cK.T, np.linalg.solve(cK, b))

        XVX = (self.XtX - XtW @ solve(XtW.T)) / s2
        XVy = (self.Xty - XtW @ solve(Wty)) / s2
        yVy = (self.yty - Wty @ solve(Wty)) / s2
        cov = np.linalg.inv(XVX)
        beta = cov @ XVy
        logdet_v = 2 * np.sum(np.log(np.diag(cK))) + (self.n - q) * np.log(s2)
        return {"beta": beta, "cov": cov, "XVX": XVX, "rVr": yVy - beta @ XVy, "logdet_v": logdet_v}

    def loglik(self, theta: np.ndarray) -> float:
        parts = self._parts(theta)
        if self.reml:
            logdet_x = np.linalg.slogdet(parts["XVX"])[1]
            return -0.5 * ((self.n - self.p) * np.log(2 * np.pi) + parts["logdet_v"] + logdet_x + parts["rVr"])
        return -0.5 * (self.n * np.log(2 * np.pi) + parts["logdet_v"] + parts["rVr"])

    def cov_beta(self, theta: np.ndarray) -> np.ndarray:
        return self._parts(theta)["cov"]

    def beta(self, theta: np.ndarray) -> np.ndarray:
        return self._parts(theta)["beta"]


def _central_steps(theta: np.ndarray, free: np.ndarray) -> np.ndarray:
    return np.where(free, 1e-4 * np.abs(theta), 0.0)


def satterthwaite_setup(lik: GaussianLik, theta: np.ndarray, free: np.ndarray
                        ) -> tuple[np.ndarray | None, list[np.ndarray], list[str]]:
    """``A = 2 H^-1`` over the free variance parameters and ``dC/dtheta_i``, by central differences."""
    notes: list[str] = []
    idx = np.flatnonzero(free)
    h = _central_steps(theta, free)

    def dev(t: np.ndarray) -> float:
        return -2.0 * lik.loglik(t)

    k = idx.size
    H = np.zeros((k, k))
    f0 = dev(theta)
    for i, ii in enumerate(idx):
        for j, jj in enumerate(idx[: i + 1]):
            if i == j:
                e = np.zeros_like(theta)
                e[ii] = h[ii]
                H[i, i] = (dev(theta + e) - 2 * f0 + dev(theta - e)) / h[ii] ** 2
            else:
                ei, ej = np.zeros_like(theta), np.zeros_like(theta)
                ei[ii], ej[jj] = h[ii], h[jj]
                H[i, j] = H[j, i] = (dev(theta + ei + ej) - dev(theta + ei - ej) - dev(theta - ei + ej)
                                     + dev(theta - ei - ej)) / (4 * h[ii] * h[jj])
    grads = []
    for ii in idx:
        e = np.zeros_like(theta)
        e[ii] = h[ii]
        grads.append((lik.cov_beta(theta + e) - lik.cov_beta(theta - e)) / (2 * h[ii]))
    eig = np.linalg.eigvalsh(H) if k else np.zeros(0)
    if k and eig.min() <= 0:
        notes.append("Satterthwaite df not computed: the deviance Hessian is not positive definite")
        return None, grads, notes
    return 2.0 * np.linalg.inv(H), grads, notes


@dataclass
class LmmResult:
    """A fitted LMM as lme4/lmerTest would report it. ``fixed`` columns: term, estimate, se, df, t, p, CI."""

    method: str
    converged: bool
    optimizer: str | None
    fixed: pd.DataFrame
    item_var: float | None
    resid_var: float | None
    loglik: float | None
    warnings: list[str] = field(default_factory=list)
    other_var: dict[str, float | None] = field(default_factory=dict)
    n: int = 0
    n_groups: int = 0
    cov_fixed: np.ndarray | None = field(default=None, repr=False)
    structure: str | None = None
    requested: str | None = None
    random: str | None = None
    random_effects: list[dict[str, Any]] = field(default_factory=list)
    simplification: list[str] = field(default_factory=list)
    optimizers: dict[str, dict[str, Any]] = field(default_factory=dict)
    singular: bool = False
    prompts: str | None = None
    _contrast: Callable[[np.ndarray], tuple[float, float, float | None]] | None = field(default=None,
                                                                                         repr=False)

    def contrast(self, L: Sequence[float], level: float = 0.95) -> dict[str, float | None]:
        """Estimate, SE, Satterthwaite df, t, p and CI of ``L @ beta`` (None where not computable)."""
        keys = ["estimate", "se", "df", "t", "p", "ci_low", "ci_high"]
        if self._contrast is None:
            return dict.fromkeys(keys)
        est, se, df = self._contrast(np.asarray(L, dtype=float))
        return dict(zip(keys, _t_summary(est, se, df, level)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (NaN -> None)."""
        return {"method": self.method, "converged": bool(self.converged), "optimizer": self.optimizer,
                "fixed": records(self.fixed), "item_var": finite_or_none(self.item_var),
                "resid_var": finite_or_none(self.resid_var), "loglik": finite_or_none(self.loglik),
                "other_var": {k: finite_or_none(v) for k, v in self.other_var.items()},
                "n": self.n, "n_groups": self.n_groups, "random": self.random, "requested": self.requested,
                "structure": self.structure,
                "random_effects": [{k: finite_or_none(v) for k, v in r.items()} for r in self.random_effects],
                "simplification": list(self.simplification), "singular": bool(self.singular),
                "prompts": self.prompts,
                "optimizers": {k: {kk: finite_or_none(vv) for kk, vv in v.items()}
                               for k, v in self.optimizers.items()},
                "warnings": list(self.warnings)}


def _t_summary(est: float, se: float, df: float | None, level: float = 0.95) -> list[float | None]:
    t = est / se if se > 0 else None
    if df is None or not np.isfinite(df) or df <= 0 or t is None:
        return [est, se, finite_or_none(df), t, None, None, None]
    crit = float(sps.t.ppf(0.5 + level / 2, df))
    p = float(2 * sps.t.sf(abs(t), df))
    return [est, se, float(df), t, p, est - crit * se, est + crit * se]


def _empty_result(method: str, terms: Sequence[str], notes: list[str], n: int = 0, n_groups: int = 0
                  ) -> LmmResult:
    fixed = pd.DataFrame({"term": list(terms)})
    for col in FIXED_COLUMNS[1:]:
        fixed[col] = np.nan
    return LmmResult(method=method, converged=False, optimizer=None, fixed=fixed, item_var=None,
                     resid_var=None, loglik=None, warnings=notes, n=n, n_groups=n_groups)


def _fit_statsmodels(model: Any, reml: bool) -> tuple[Any, str | None, list[str]]:
    """Try the optimisers in :data:`OPTIMIZERS` until one converges; say which, and what went wrong."""
    notes: list[str] = []
    for i, (name, kwargs) in enumerate(OPTIMIZERS):
        with pywarnings.catch_warnings(record=True) as caught:
            pywarnings.simplefilter("always")
            try:
                res = model.fit(reml=reml, method=[name], **kwargs)
            except (np.linalg.LinAlgError, ValueError, ZeroDivisionError) as err:
                notes.append(f"LMM optimiser {name} failed: {err}")
                continue
        messages = sorted({str(w.message).splitlines()[0] for w in caught
                           if not issubclass(w.category, (DeprecationWarning, FutureWarning))})
        if res.converged and np.all(np.isfinite(res.fe_params)):
            if i > 0:
                notes.append(f"LMM converged only with fallback optimiser '{name}'")
            return res, name, notes + [f"statsmodels: {m}" for m in messages]
        notes.append(f"LMM optimiser {name} did not converge")
    return None, None, notes


def lmm_fit(df: pd.DataFrame, formula_fixed: str, group: str, method: str = "REML",
            extra_random: str | None = None) -> LmmResult:
    """Fit ``formula_fixed + (1|group)`` [``+ (1|extra_random)``, crossed] and report it like lmerTest.

    ``formula_fixed`` is a patsy formula (``"Weight ~ Time"``); term names are patsy's (``Intercept``).
    A crossed second factor uses statsmodels variance components with a single all-data group.
    A fit that no optimiser makes converge is returned with ``converged=False``, no estimates and a warning.
    """
    import statsmodels.formula.api as smf

    method = method.upper()
    if method not in ("REML", "ML"):
        raise ValueError(f"method must be 'REML' or 'ML', got {method!r}")
    reml = method == "REML"
    data = df.reset_index(drop=True)
    n_groups = int(data[group].nunique())
    notes: list[str] = []
    with pywarnings.catch_warnings():
        pywarnings.simplefilter("ignore")
        if extra_random is None:
            model = smf.mixedlm(formula_fixed, data, groups=data[group])
        else:
            vcf = {"a_group": f"0 + C({group})", "b_extra": f"0 + C({extra_random})"}
            model = smf.mixedlm(formula_fixed, data, groups=np.ones(len(data)), re_formula="0",
                                vc_formula=vcf)
    terms = list(model.exog_names)
    if n_groups < 2:
        return _empty_result(method, terms, [f"LMM not fitted: {n_groups} level(s) of '{group}' (need 2)"],
                             len(data), n_groups)
    res, optimizer, fit_notes = _fit_statsmodels(model, reml)
    notes += fit_notes
    if res is None:
        notes.append("LMM did not converge with any optimiser: no estimates reported")
        return _empty_result(method, terms, notes, len(data), n_groups)

    X, y = np.asarray(model.exog), np.asarray(model.endog)
    groups = data[group].astype(str)
    Zs = [pd.get_dummies(groups).to_numpy(dtype=float)]
    if extra_random is None:
        comps = [float(res.cov_re.iloc[0, 0])]
    else:
        # statsmodels' vcomp is on the data scale, in vc name order (sorted: a_group, b_extra)
        comps = [float(v) for v in np.asarray(res.vcomp)]
        Zs.append(pd.get_dummies(data[extra_random].astype(str)).to_numpy(dtype=float))
    theta = np.array(comps + [float(res.scale)])
    lik = GaussianLik(X, y, Zs, reml=reml)
    scale = float(theta[-1])
    free = theta > 1e-8 * max(scale, np.finfo(float).tiny)
    if not free[:-1].all():
        notes.append("singular fit: a random-effect variance is estimated as zero (held fixed at zero "
                     "for the Satterthwaite df)")
        theta = np.where(free, theta, 0.0)
    cov = lik.cov_beta(theta)
    beta = np.asarray(res.fe_params, dtype=float)
    A, dcov, sat_notes = satterthwaite_setup(lik, theta, free)
    notes += sat_notes

    def contrast(L: np.ndarray) -> tuple[float, float, float | None]:
        var = float(L @ cov @ L)
        if A is None or var <= 0:
            return float(L @ beta), float(np.sqrt(max(var, 0.0))), None
        g = np.array([float(L @ d @ L) for d in dcov])
        denom = float(g @ A @ g)
        df_ = 2 * var**2 / denom if denom > 0 else None
        return float(L @ beta), float(np.sqrt(var)), df_

    rows = []
    for i, term in enumerate(terms):
        L = np.zeros(len(terms))
        L[i] = 1.0
        est, se, dfv = contrast(L)
        rows.append(dict(zip(FIXED_COLUMNS, [term, *_t_summary(est, se, dfv)])))
    fixed = pd.DataFrame(rows, columns=FIXED_COLUMNS)
    for col in FIXED_COLUMNS[1:]:
        fixed[col] = pd.to_numeric(fixed[col].astype(object).where(fixed[col].notna(), np.nan))
    other = {} if extra_random is None else {extra_random: float(theta[1])}
    return LmmResult(method=method, converged=True, optimizer=optimizer, fixed=fixed,
                     item_var=float(theta[0]), resid_var=scale, loglik=float(lik.loglik(theta)),
                     warnings=notes, other_var=other, n=len(data), n_groups=n_groups, cov_fixed=cov,
                     _contrast=contrast)


def _design_matrix(data: pd.DataFrame, structure: Structure) -> tuple[np.ndarray, list[str]]:
    """``[1, xa, xb, xab]`` plus sum-coded prompt columns when prompts are a fixed factor."""
    X = [np.ones(len(data)), data["xa"].to_numpy(), data["xb"].to_numpy(), data["xab"].to_numpy()]
    names = ["Intercept", "xa", "xb", "xab"]
    if structure.prompts == "fixed":
        codes, levels = pd.factorize(data["extra"], sort=True)
        last = len(levels) - 1
        for j in range(last):
            X.append(np.where(codes == j, 1.0, np.where(codes == last, -1.0, 0.0)))
            names.append(f"{structure.prompt_label}[{levels[j]}]")
    return np.column_stack(X), names


def _factors(data: pd.DataFrame, structure: Structure) -> list[RandomFactor]:
    out = []
    for spec in structure.factors:
        codes = pd.factorize(data[spec.group], sort=True)[0]
        Z = np.column_stack([np.ones(len(data)) if t == "1" else data[t].to_numpy() for t in spec.terms])
        out.append(RandomFactor(spec.label, codes, Z, list(spec.terms), spec.kind))
    return sorted(out, key=lambda f: -f.n_levels)  # the many-level factor is eliminated blockwise


def _varcorr(factors: list[RandomFactor], fit: MixedFit, names: dict[str, str]) -> list[dict[str, Any]]:
    """Every variance and covariance, listed like R's ``as.data.frame(VarCorr(m))``."""
    rows: list[dict[str, Any]] = []
    sigma2 = fit.sigma2
    for f, C, comp in zip(factors, fit.random_cov, fit.components):
        if comp is not None:  # variance components: one variance per nested factor, as lme4 lists them
            for t, v in zip(f.terms, comp):
                group = f.name if t == "1" else f"{f.name}:{names[t]}"
                rows.append({"group": group, "term1": "(Intercept)", "term2": None, "vcov": float(v),
                             "sdcor": float(np.sqrt(v))})
            continue
        for j, t in enumerate(f.terms):
            rows.append({"group": f.name, "term1": names[t], "term2": None, "vcov": float(C[j, j]),
                         "sdcor": float(np.sqrt(max(C[j, j], 0.0)))})
        if f.kind == "correlated":
            for j in range(f.k):
                for i in range(j + 1, f.k):
                    denom = np.sqrt(C[i, i] * C[j, j])
                    rows.append({"group": f.name, "term1": names[f.terms[j]], "term2": names[f.terms[i]],
                                 "vcov": float(C[i, j]), "sdcor": float(C[i, j] / denom) if denom > 0 else None})
    rows.append({"group": "Residual", "term1": None, "term2": None, "vcov": sigma2,
                 "sdcor": float(np.sqrt(sigma2))})
    return rows


def _fit_structure(data: pd.DataFrame, structure: Structure, reml: bool) -> MixedFit:
    X, _ = _design_matrix(data, structure)
    return fit_mixed(data["y"].to_numpy(), X, _factors(data, structure), reml=reml)


def lmm_design(design: Design2x2, method: str = "REML", extra_random: str | None = None,
               random: str = "uncorrelated") -> LmmResult:
    """``y ~ A*B`` with the random effects of ``random`` (see :mod:`.structure`), reported like lmerTest.

    ``extra_random`` names the prompt column (prepared into the design as ``extra``): a fixed factor below
    5 levels, else crossed random effects. A singular fit is simplified by the rule in :mod:`.structure`;
    the structure fitted, each simplification step and every variance/covariance are in the result.
    """
    names = {"Intercept": "Intercept", "xa": design.a, "xb": design.b, "xab": f"{design.a}:{design.b}"}
    terms = list(names.values())
    method = method.upper()
    data = design.data
    if design.item is None:
        raise ValueError("lmm needs an item column")
    if design.empty_cells:
        return _empty_result(method, terms, ["LMM not fitted: a cell is empty"], len(data))
    if float(np.ptp(data["y"].to_numpy())) == 0.0:
        return _empty_result(method, terms, ["LMM not fitted: the measure has zero variance"], len(data))
    within = data["y"] - data.groupby(["A", "B"], observed=True)["y"].transform("mean")
    if float(np.sum(within**2)) <= rounding_ss(data["y"].to_numpy()):
        return _empty_result(method, terms, ["LMM not fitted: the measure is constant within each cell "
                                             "(zero residual variance)"], len(data))
    if extra_random is not None and "extra" not in data:
        raise ValueError("prepare the design with extra_random to fit a crossed factor")
    n_groups = int(data["item"].nunique())
    if n_groups < 2:
        return _empty_result(method, terms, [f"LMM not fitted: {n_groups} level(s) of the item column (need 2)"],
                             len(data), n_groups)
    structure = initial_structure(data, random, design.item, extra_random)
    requested = structure.formula(design.a, design.b)
    notes: list[str] = []
    reml = method == "REML"
    try:
        fit = _fit_structure(data, structure, reml)
        while fit.singular:
            step = simplify(structure, fit.zero_terms)
            if step is None:
                break
            structure, _ = step
            fit = _fit_structure(data, structure, reml)
    except (np.linalg.LinAlgError, ValueError) as err:
        return _empty_result(method, terms, [f"LMM not fitted: {err}"], len(data), n_groups)
    if structure.steps:
        notes.append(f"singular fit simplified: {'; '.join(structure.steps)}")
    if fit.singular:
        zero = ", ".join(f"{g}" for g, _ in fit.zero_terms)
        notes.append(f"singular fit: a random intercept variance ({zero}) is estimated as zero (held fixed "
                     "at zero for the Satterthwaite df)")
    notes += fit.warnings
    if structure.prompts == "fixed":
        notes.append(f"{structure.n_prompts} prompts (< {MIN_RANDOM_LEVELS}): prompt entered as a fixed factor")
    p = len(fit.beta)

    def contrast(L: np.ndarray) -> tuple[float, float, float | None]:
        L = np.concatenate([L, np.zeros(p - len(L))])
        var = float(L @ fit.cov_beta @ L)
        return float(L @ fit.beta), float(np.sqrt(max(var, 0.0))), fit.contrast_df(L)

    rows = []
    for i, term in enumerate(terms):
        est, se, dfv = contrast(np.eye(4)[i])
        rows.append(dict(zip(FIXED_COLUMNS, [term, *_t_summary(est, se, dfv)])))
    fixed = pd.DataFrame(rows, columns=FIXED_COLUMNS)
    for col in FIXED_COLUMNS[1:]:
        fixed[col] = pd.to_numeric(fixed[col].astype(object).where(fixed[col].notna(), np.nan))
    factors = _factors(data, structure)
    varcorr = _varcorr(factors, fit, {"1": "(Intercept)", **{k: names[k] for k in SLOTS[1:]}})
    intercepts = {r["group"]: r["vcov"] for r in varcorr if r["term1"] == "(Intercept)" and r["term2"] is None}
    other = {extra_random: intercepts.get(extra_random)} if structure.prompts == "random" else {}
    return LmmResult(method=method, converged=True, optimizer=fit.optimizer, fixed=fixed,
                     item_var=intercepts.get(design.item), resid_var=fit.sigma2, loglik=fit.loglik,
                     warnings=notes, other_var=other, n=len(data), n_groups=n_groups,
                     cov_fixed=fit.cov_beta[:4, :4], structure=structure.formula(design.a, design.b),
                     requested=requested, random=random, random_effects=varcorr, simplification=list(structure.steps),
                     optimizers=fit.optimizers, singular=fit.singular, prompts=structure.prompts,
                     _contrast=contrast)


def lmm_2x2(df: pd.DataFrame, dv: str, a: str, b: str, item: str, levels: Levels | None = None,
            method: str = "REML", extra_random: str | None = None, random: str = "uncorrelated") -> LmmResult:
    """``dv ~ a*b + (1 + a + b + a:b || item)`` (maximal, by default) with -0.5/+0.5 codes, like lmerTest.

    Terms: ``Intercept`` (grand mean of cell means), ``a``, ``b`` (differences between levels) and ``a:b``
    (difference of differences), named after the columns. ``random``: ``intercept``, ``uncorrelated``,
    ``correlated`` (or ``varcomp``, lme4's nested-factor form of ``uncorrelated``); ``extra_random``: the
    prompt column (fixed below 5 levels, crossed random from 5).
    """
    design = prepare_2x2(df, dv, a, b, item=item, levels=levels, extra_random=extra_random)
    result = lmm_design(design, method=method, extra_random=extra_random, random=random)
    result.warnings = design.warnings + result.warnings
    for note in result.warnings:
        log.warning(note)
    return result
