"""Linear mixed models reported as lme4/lmerTest report them.

The 2x2 models (:func:`lmm_2x2`, :func:`lmm_design`) have the random-effects structure chosen and simplified by
:mod:`.structure`: maximal uncorrelated by default, correlated or intercept-only on request, prompts fixed or
crossed; :func:`lmm_fit` fits any random-intercept model given as a patsy formula. Both use our profiled
deviance (:mod:`.profile`) fitted by :mod:`.mixed`, which reports what ``summary(lmerTest::lmer(...))`` does:
GLS standard errors ``sigma^2 (X' V^-1 X)^-1`` at the estimates and Satterthwaite df.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import stdtr, stdtrit

from .design import Design2x2, Levels, finite_or_none, prepare_2x2, records, rounding_ss
from .mixed import MixedFit, MixedProblem, fit_mixed, with_satterthwaite
from .profile import RandomFactor
from .structure import SLOTS, Structure, initial_structure, simplify

log = logging.getLogger(__name__)

FIXED_COLUMNS = ["term", "estimate", "se", "df", "t", "p", "ci_low", "ci_high"]


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
    prompt_reason: str | None = None
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    fitted_structure: Structure | None = field(default=None, repr=False)
    theta: np.ndarray | None = field(default=None, repr=False)      # relative factors of the fitted structure
    problems: dict | None = field(default=None, repr=False)         # prepared data by structure, for refits
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
                "prompts": self.prompts, "prompt_reason": self.prompt_reason,
                "comparisons": [_json_lrt(c) for c in self.comparisons],
                "optimizers": {k: {kk: finite_or_none(vv) for kk, vv in v.items()}
                               for k, v in self.optimizers.items()},
                "warnings": list(self.warnings)}


def _json_lrt(c: dict[str, Any]) -> dict[str, Any]:
    return {k: ({kk: finite_or_none(vv) for kk, vv in v.items()} if isinstance(v, dict) else finite_or_none(v))
            for k, v in c.items()}


def _t_summary(est: float, se: float, df: float | None, level: float = 0.95) -> list[float | None]:
    t = est / se if se > 0 else None
    if df is None or not np.isfinite(df) or df <= 0 or t is None:
        return [est, se, finite_or_none(df), t, None, None, None]
    crit = float(stdtrit(df, 0.5 + level / 2))
    p = float(2 * stdtr(df, -abs(t)))
    return [est, se, float(df), t, p, est - crit * se, est + crit * se]


def _fixed_effects(fit: Any, terms: list[str]) -> tuple[Callable[[np.ndarray], tuple[float, float, float | None]],
                                                        pd.DataFrame]:
    """The contrast function of a fit (estimate, SE and Satterthwaite df of ``L @ beta``; ``L`` is padded with
    zeros for fixed columns beyond ``terms``, e.g. prompt dummies) and the table of the ``terms`` coefficients."""
    p = len(fit.beta)

    def contrast(L: np.ndarray) -> tuple[float, float, float | None]:
        L = np.concatenate([L, np.zeros(p - len(L))])
        var = float(L @ fit.cov_beta @ L)
        return float(L @ fit.beta), float(np.sqrt(max(var, 0.0))), fit.contrast_df(L)

    rows = []
    for i, term in enumerate(terms):
        est, se, dfv = contrast(np.eye(len(terms))[i])
        rows.append(dict(zip(FIXED_COLUMNS, [term, *_t_summary(est, se, dfv)])))
    fixed = pd.DataFrame(rows, columns=FIXED_COLUMNS)
    for col in FIXED_COLUMNS[1:]:
        fixed[col] = pd.to_numeric(fixed[col].astype(object).where(fixed[col].notna(), np.nan))
    return contrast, fixed


def _empty_result(method: str, terms: Sequence[str], notes: list[str], n: int = 0, n_groups: int = 0
                  ) -> LmmResult:
    fixed = pd.DataFrame({"term": list(terms)})
    for col in FIXED_COLUMNS[1:]:
        fixed[col] = np.nan
    return LmmResult(method=method, converged=False, optimizer=None, fixed=fixed, item_var=None,
                     resid_var=None, loglik=None, warnings=notes, n=n, n_groups=n_groups)


def lmm_fit(df: pd.DataFrame, formula_fixed: str, group: str, method: str = "REML",
            extra_random: str | None = None) -> LmmResult:
    """Fit ``formula_fixed + (1|group)`` [``+ (1|extra_random)``, crossed] and report it like lmerTest.

    ``formula_fixed`` is a patsy formula (``"Weight ~ Time"``); term names are patsy's (``Intercept``).
    Same engine as the 2x2 models (:mod:`.mixed`): optimisers compared, Satterthwaite df, singular fits
    reported (a zero variance is held fixed for the df).
    """
    import patsy

    method = method.upper()
    if method not in ("REML", "ML"):
        raise ValueError(f"method must be 'REML' or 'ML', got {method!r}")
    data = df.reset_index(drop=True)
    y, X = patsy.dmatrices(formula_fixed, data, return_type="dataframe")
    terms = list(X.columns)
    data = data.loc[X.index]
    n_groups = int(data[group].nunique())
    if n_groups < 2:
        return _empty_result(method, terms, [f"LMM not fitted: {n_groups} level(s) of '{group}' (need 2)"],
                             len(data), n_groups)
    factors = [RandomFactor(name, pd.factorize(data[name], sort=True)[0], np.ones((len(data), 1)), ["1"])
               for name in [group] + ([extra_random] if extra_random is not None else [])]
    factors.sort(key=lambda f: -f.n_levels)
    try:
        fit = fit_mixed(y.to_numpy().ravel(), X.to_numpy(), factors, reml=method == "REML")
    except (np.linalg.LinAlgError, ValueError) as err:
        return _empty_result(method, terms, [f"LMM not fitted: {err}"], len(data), n_groups)
    notes = list(fit.warnings)
    if fit.singular:
        notes.append("singular fit: a random-effect variance is estimated as zero (held fixed at zero "
                     "for the Satterthwaite df)")
    var = {f.name: float(c[0, 0]) for f, c in zip(factors, fit.random_cov)}

    contrast, fixed = _fixed_effects(fit, terms)
    other = {} if extra_random is None else {extra_random: var[extra_random]}
    return LmmResult(method=method, converged=True, optimizer=fit.optimizer, fixed=fixed, item_var=var[group],
                     resid_var=fit.sigma2, loglik=fit.loglik, warnings=notes, other_var=other, n=len(data),
                     n_groups=n_groups, cov_fixed=fit.cov_beta, optimizers=fit.optimizers, singular=fit.singular,
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


WARM_FLOOR = 0.05  # a warm start never puts a relative SD at 0, where its gradient vanishes by symmetry


def _warm_start(previous: list[RandomFactor], theta: np.ndarray, factors: list[RandomFactor]) -> np.ndarray:
    """Start values for a simplified structure from the previous fit: each kept term's relative SD
    (no refit from scratch after a simplification step); a new correlation starts at 0."""
    sds: dict[tuple[str, str], float] = {}
    splits = np.cumsum([f.n_theta for f in previous])[:-1]
    for f, t in zip(previous, np.split(theta, splits)):
        T = f.factor(t)
        for j, term in enumerate(f.terms):
            sds[(f.name, term)] = float(np.sqrt((T @ T.T)[j, j]))
    out = []
    for f in factors:
        sd = np.array([max(sds.get((f.name, term), 1.0), WARM_FLOOR) for term in f.terms])
        if f.kind == "correlated":
            T = np.diag(sd)
            out.append(T[np.tril_indices(f.k)])
        elif f.kind == "varcomp":
            out.append(f.start())
        else:
            out.append(sd)
    return np.concatenate(out)


Problems = dict[Structure, MixedProblem]


def _problem(data: pd.DataFrame, structure: Structure, cache: Problems | None = None) -> MixedProblem:
    """Design matrix, random factors and cross-products of one structure, built once per structure (the REML
    fit, its ML refit for a likelihood-ratio test and a profile CI all reuse them through ``cache``)."""
    if cache is not None and structure in cache:
        return cache[structure]
    X, _ = _design_matrix(data, structure)
    problem = MixedProblem(data["y"].to_numpy(), X, _factors(data, structure))
    if cache is not None:
        cache[structure] = problem
    return problem


def _fit_structure(data: pd.DataFrame, structure: Structure, reml: bool,
                   previous: tuple[list[RandomFactor], MixedFit] | None = None, cache: Problems | None = None,
                   df: bool = True) -> MixedFit:
    problem = _problem(data, structure, cache)
    start = None if previous is None else _warm_start(previous[0], previous[1].theta, problem.factors)
    return fit_mixed(None, None, None, reml=reml, start=start, df=df, problem=problem)


def lmm_design(design: Design2x2, method: str = "REML", extra_random: str | None = None,
               random: str = "uncorrelated", prompt_role: str = "auto", compare: bool = True) -> LmmResult:
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
    structure = initial_structure(data, random, design.item, extra_random, prompt_role)
    requested = structure.formula(design.a, design.b)
    history: list[tuple[Structure, np.ndarray]] = []
    notes: list[str] = []
    reml = method == "REML"
    cache: Problems = {}
    try:
        # Satterthwaite df only for the fit that is reported, not for one that is simplified further
        fit = _fit_structure(data, structure, reml, cache=cache, df=False)
        history.append((structure, fit.theta))
        while fit.singular:
            step = simplify(structure, fit.zero_terms)
            if step is None:
                break
            old_factors = cache[structure].factors
            structure, _ = step
            fit = _fit_structure(data, structure, reml, previous=(old_factors, fit), cache=cache, df=False)
            history.append((structure, fit.theta))
        fit = with_satterthwaite(fit)
    except (np.linalg.LinAlgError, ValueError) as err:
        return _empty_result(method, terms, [f"LMM not fitted: {err}"], len(data), n_groups)
    if structure.steps:
        notes.append(f"singular fit simplified: {'; '.join(structure.steps)}")
    if fit.singular:
        zero = ", ".join(f"{g}" for g, _ in fit.zero_terms)
        notes.append(f"singular fit: a random intercept variance ({zero}) is estimated as zero (held fixed "
                     "at zero for the Satterthwaite df)")
    notes += fit.warnings
    if structure.prompts == "fixed" and structure.prompt_role == "auto":
        notes.append(f"{structure.prompt_reason()}")
    comparisons = _compare_steps(design, history, notes, cache) if compare else []
    contrast, fixed = _fixed_effects(fit, terms)
    factors = cache[structure].factors
    varcorr = _varcorr(factors, fit, {"1": "(Intercept)", **{k: names[k] for k in SLOTS[1:]}})
    intercepts = {r["group"]: r["vcov"] for r in varcorr if r["term1"] == "(Intercept)" and r["term2"] is None}
    other = {extra_random: intercepts.get(extra_random)} if structure.prompts == "random" else {}
    return LmmResult(method=method, converged=True, optimizer=fit.optimizer, fixed=fixed,
                     item_var=intercepts.get(design.item), resid_var=fit.sigma2, loglik=fit.loglik,
                     warnings=notes, other_var=other, n=len(data), n_groups=n_groups,
                     cov_fixed=fit.cov_beta[:4, :4], structure=structure.formula(design.a, design.b),
                     requested=requested, random=random, random_effects=varcorr, simplification=list(structure.steps),
                     optimizers=fit.optimizers, singular=fit.singular, prompts=structure.prompts,
                     prompt_reason=structure.prompt_reason(), comparisons=comparisons,
                     fitted_structure=structure, theta=fit.theta, problems=cache, _contrast=contrast)


def _compare_steps(design: Design2x2, history: list[tuple[Structure, np.ndarray]], notes: list[str],
                   cache: Problems | None = None) -> list[dict[str, Any]]:
    """Likelihood-ratio test (ML refits, R's ``anova``) of each simplified structure against the one asked for;
    each ML refit starts from that structure's REML estimates and reuses its cross-products (``cache``)."""
    from .compare import lrt

    out = []
    for simpler, theta in history[1:]:
        try:
            res = lrt(design, simpler, history[0][0], starts=(theta, history[0][1]), cache=cache)
        except (np.linalg.LinAlgError, ValueError) as err:
            notes.append(f"likelihood-ratio test of the simplification not computed: {err}")
            continue
        out.append({"simplified": res["small"]["model"], "maximal": res["large"]["model"], "chisq": res["chisq"],
                    "df": res["df"], "p": res["p"], "loglik_simplified": res["small"]["logLik"],
                    "loglik_maximal": res["large"]["logLik"]})
    return out


def lmm_2x2(df: pd.DataFrame, dv: str, a: str, b: str, item: str, levels: Levels | None = None,
            method: str = "REML", extra_random: str | None = None, random: str = "uncorrelated",
            prompt_role: str = "auto", compare: bool = True) -> LmmResult:
    """``dv ~ a*b + (1 + a + b + a:b || item)`` (maximal, by default) with -0.5/+0.5 codes, like lmerTest.

    Terms: ``Intercept`` (grand mean of cell means), ``a``, ``b`` (differences between levels) and ``a:b``
    (difference of differences), named after the columns. ``random``: ``intercept``, ``uncorrelated``,
    ``correlated`` (or ``varcomp``, lme4's nested-factor form of ``uncorrelated``); ``extra_random``: the
    prompt column (fixed below 5 levels, crossed random from 5). ``compare=False`` skips the likelihood-ratio
    tests of simplification steps (ML refits; a power simulation only needs the fixed effects).
    """
    design = prepare_2x2(df, dv, a, b, item=item, levels=levels, extra_random=extra_random)
    result = lmm_design(design, method=method, extra_random=extra_random, random=random, prompt_role=prompt_role,
                        compare=compare)
    result.warnings = design.warnings + result.warnings
    for note in result.warnings:
        log.warning(note)
    return result
