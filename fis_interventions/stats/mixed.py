"""Fitting a :class:`~.profile.ProfiledDeviance`: rescaling, several optimisers, singularity, Satterthwaite df.

* **Centring and scaling.** The fit runs on ``(y - X b_ols) / s`` with ``s`` the OLS residual SD, then maps
  back (``b = b_ols + s b*``, variances x ``s^2``, log-likelihood minus ``(n - p) log s`` for REML or
  ``n log s`` for ML). A measure with mean 1e8, or a fixed effect 1e6 times the noise, then gives the same
  deviance surface as well-scaled data: no cancellation in ``y'y - ...``.
* **Optimisers.** L-BFGS-B with the analytic gradient runs from lme4's start (or a simplified model's warm
  start); the derivative-free COBYQA runs only when it reports trouble; the one with the lowest deviance wins
  and is polished once more with L-BFGS-B; every optimiser's log-likelihood is kept and a disagreement beyond
  :data:`AGREE` is a warning.
* **Singular fits** follow lme4's ``isSingular``: a diagonal element of a relative factor below 1e-4.
* **Satterthwaite df** as lmerTest: ``df = 2 (L C L')^2 / (g' A g)`` with ``C(theta, sigma)`` the fixed-effect
  covariance, ``g`` its gradient and ``A = 2 H^-1`` from the Hessian of the unprofiled deviance in
  ``(theta, sigma)``; the Hessian is a central difference of the analytic gradient (lmerTest uses numDeriv on
  the deviance), inverted in unit-curvature coordinates. Parameters on the
  boundary (zero) are held fixed.
"""

from __future__ import annotations

import warnings as pywarnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize

from .profile import ProfiledDeviance, RandomFactor

SINGULAR_TOL = 1e-4  # lme4's isSingular tolerance on the diagonal of the relative factors
AGREE = 1e-4         # optimisers' log-likelihoods further apart than this are reported
OPTIMIZERS: list[tuple[str, dict[str, Any]]] = [
    ("L-BFGS-B", {"options": {"ftol": 1e-15, "gtol": 1e-9, "maxiter": 5000}}),
    ("COBYQA", {"options": {"final_tr_radius": 1e-6, "maxfev": 5000}}),  # the winner is polished by L-BFGS-B
]


@dataclass
class MixedFit:
    """A fitted model on the original scale of ``y``."""

    beta: np.ndarray
    cov_beta: np.ndarray
    theta: np.ndarray
    sigma2: float
    random_cov: list[np.ndarray]
    components: list[np.ndarray | None]
    loglik: float
    optimizer: str
    optimizers: dict[str, dict[str, Any]]
    singular: bool
    zero_terms: list[tuple[str, str]]
    warnings: list[str] = field(default_factory=list)
    contrast_df: Callable[[np.ndarray], float | None] = field(default=lambda L: None, repr=False)
    problem: MixedProblem | None = field(default=None, repr=False)
    reml: bool = True
    has_df: bool = False


def _run(name: str, kwargs: dict[str, Any], dev: ProfiledDeviance, x0: np.ndarray) -> tuple[np.ndarray, float, bool]:
    with pywarnings.catch_warnings(), np.errstate(all="ignore"):
        pywarnings.simplefilter("ignore")
        if name == "L-BFGS-B":  # analytic gradient of the profiled deviance (profile.py)
            res = minimize(dev.deviance_and_gradient, x0, method=name, jac=True, bounds=dev.bounds(), **kwargs)
        else:
            res = minimize(dev.deviance, x0, method=name, bounds=dev.bounds(), **kwargs)
    return np.asarray(res.x, float), float(res.fun), bool(res.success)


def _optimise(dev: ProfiledDeviance, start: np.ndarray | None = None
              ) -> tuple[np.ndarray, float, str, dict[str, dict[str, Any]], list[str]]:
    """L-BFGS-B with the analytic gradient; the derivative-free COBYQA only when it reports trouble
    (no convergence or no finite deviance), then the better of the two, polished once more."""
    start = dev.start() if start is None else start
    tried: dict[str, dict[str, Any]] = {}
    best: tuple[np.ndarray, float, str] | None = None
    for name, kwargs in OPTIMIZERS:
        x, f, ok = _run(name, kwargs, dev, start)
        tried[name] = {"deviance": f if np.isfinite(f) else None, "converged": ok}
        if np.isfinite(f) and (best is None or f < best[1]):
            best = (x, f, name)
        if ok and np.isfinite(f):
            break
    notes: list[str] = []
    if best is None:
        raise np.linalg.LinAlgError("no optimiser reached a finite deviance")
    x, f, name = best
    if name != OPTIMIZERS[0][0]:
        px, pf, _ = _run(*OPTIMIZERS[0], dev, x)  # polish the winner (derivative-free) with L-BFGS-B
        if pf < f:
            x, f = px, pf
    x, f, restarts = _off_the_boundary(dev, x, f)
    if restarts:
        tried[OPTIMIZERS[0][0]].update(deviance=f, converged=True, boundary_restarts=restarts)
        name = OPTIMIZERS[0][0]
    finite = [v["deviance"] for v in tried.values() if v["deviance"] is not None]
    if max(finite) - f > 2 * AGREE:
        worse = ", ".join(f"{k} {-v['deviance'] / 2:.6f}" for k, v in tried.items() if v["deviance"] is not None)
        notes.append(f"optimisers disagree (logLik {worse}); kept the best, {name}")
    return x, f, name, tried, notes


class MixedProblem:
    """The data side of a fit, built once and shared by every fit of one model: the OLS centring and scale
    and the cross-products of each criterion's :class:`~.profile.ProfiledDeviance` (a REML fit and its ML refit
    for a likelihood-ratio test use the same ones)."""

    def __init__(self, y: np.ndarray, X: np.ndarray, factors: list[RandomFactor]) -> None:
        self.y = np.asarray(y, float)
        self.X = np.asarray(X, float)
        self.factors = factors
        n, p = self.X.shape
        self.b_ols, *_ = np.linalg.lstsq(self.X, self.y, rcond=None)
        resid = self.y - self.X @ self.b_ols
        self.s = float(np.sqrt(resid @ resid / max(n - p, 1)))
        if not np.isfinite(self.s) or self.s <= 0:
            raise ValueError("the measure has no residual variance around the fixed effects")
        self._resid = resid
        self._devs: dict[bool, ProfiledDeviance] = {}
        self.memo: dict[str, Any] = {}  # results computed once per model (e.g. its ML refit for every LRT)

    def deviance(self, reml: bool) -> ProfiledDeviance:
        """The profiled deviance on the centred, scaled data (cross-products computed once for both criteria)."""
        if reml not in self._devs:
            other = self._devs.get(not reml)
            self._devs[reml] = (other.with_reml(reml) if other is not None
                                else ProfiledDeviance(self._resid / self.s, self.X, self.factors, reml))
        return self._devs[reml]


def single_blas_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` with BLAS limited to one thread (threadpoolctl). A fit is many small products (per-level
    blocks, a ~100-square Schur complement); on a busy machine OpenBLAS's threads spin against each other:
    a 1,600-row crossed fit took 74 s with 2 threads at load 14, 1.8 s with one. lme4 is single-threaded too."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper


PROBES = (0.05, 0.25, 1.0)  # relative SDs tried off a zero boundary (small, typical, large)


def _off_the_boundary(dev: ProfiledDeviance, x: np.ndarray, f: float, rounds: int = 10
                      ) -> tuple[np.ndarray, float, int]:
    """Restart L-BFGS-B off a zero relative SD where the deviance falls away from zero.

    The deviance is even in a diagonal relative SD, so its gradient there is exactly 0 at 0: a quasi-Newton
    step that lands on the bound stops there even when zero is a saddle, not a minimum (lme4's derivative-free
    bobyqa does not). Each SD at 0 is probed at :data:`PROBES`; from the lowest probe below the optimum found,
    L-BFGS-B runs again (at most ``rounds`` times). A truly singular fit costs ``len(PROBES)`` deviance
    evaluations per zero SD. Returns the point, its deviance and the number of restarts that improved it."""
    lower = [lb for lb, _ in dev.bounds()]
    restarts = 0
    for _ in range(rounds):
        zero = [j for j, lb in enumerate(lower) if lb is not None and abs(x[j]) < SINGULAR_TOL]
        best: tuple[np.ndarray, float] | None = None
        for j in zero:
            for value in PROBES:
                z = x.copy()
                z[j] = value
                fz = dev.deviance(z)
                if fz < f - AGREE and (best is None or fz < best[1]):
                    best = (z, fz)
        if best is None:
            break
        nx, nf, _ = _run(*OPTIMIZERS[0], dev, best[0])
        if not nf < f - AGREE:
            break
        x, f = nx, nf
        restarts += 1
    return x, f, restarts


@single_blas_thread
def fit_mixed(y: np.ndarray | None, X: np.ndarray | None, factors: list[RandomFactor] | None, reml: bool = True,
              start: np.ndarray | None = None, df: bool = True, problem: MixedProblem | None = None) -> MixedFit:
    """Fit ``y ~ X + random factors`` by (RE)ML like lme4 and report it on the scale of ``y``.

    ``start``: relative-factor parameters to start from (lme4's identity start when None), e.g. the previous
    fit's estimates without the term a simplification step dropped (no refit from scratch). ``df=False`` skips
    the Satterthwaite df (a fit that is simplified further, or an ML refit for a likelihood-ratio test, never
    reports them; :func:`with_satterthwaite` adds them later). ``problem``: a prepared :class:`MixedProblem`
    (then ``y``, ``X`` and ``factors`` are ignored).
    """
    if problem is None:
        problem = MixedProblem(y, X, factors)
    factors = problem.factors
    n, p = problem.X.shape
    s = problem.s
    dev = problem.deviance(reml)
    theta, fmin, name, tried, notes = _optimise(dev, start)
    s2_scaled = dev.sigma2(theta)
    diag = np.concatenate([t[f.diagonal_index()] for f, t in zip(factors, dev.split(theta))])
    if any(f.kind == "varcomp" for f in factors):
        diag = theta
    singular = bool(np.any(np.abs(diag) < SINGULAR_TOL))
    zero_terms = []
    for f, t in zip(factors, dev.split(theta)):
        T = f.factor(t)
        for j, term in enumerate(f.terms):
            if abs(T[j, j]) < SINGULAR_TOL:
                zero_terms.append((f.name, term))
    shift = (n - p) if reml else n
    loglik = -fmin / 2 - shift * np.log(s)
    for v in tried.values():
        v["loglik"] = None if v["deviance"] is None else -v["deviance"] / 2 - shift * np.log(s)
        del v["deviance"]
    beta = problem.b_ols + s * dev.beta(theta)
    cov = s * s * s2_scaled * dev.unscaled_cov(theta)
    rcov = [c * s * s for c in dev.random_cov(theta, s2_scaled)]
    comps = [s * s * s2_scaled * t**2 if f.kind == "varcomp" else None for f, t in zip(factors, dev.split(theta))]
    fit = MixedFit(beta=beta, cov_beta=cov, theta=theta, sigma2=s2_scaled * s * s, random_cov=rcov,
                   components=comps, loglik=float(loglik), optimizer=name, optimizers=tried, singular=singular,
                   zero_terms=zero_terms, warnings=notes, problem=problem, reml=reml)
    return with_satterthwaite(fit) if df else fit


@single_blas_thread
def with_satterthwaite(fit: MixedFit) -> MixedFit:
    """``fit`` with its Satterthwaite df function (and any note on the deviance Hessian) filled in."""
    if fit.problem is None or fit.has_df:
        return fit
    dev = fit.problem.deviance(fit.reml)
    df_fn, sat_notes = _satterthwaite(dev, fit.theta, dev.sigma2(fit.theta))
    fit.contrast_df = df_fn
    fit.warnings = fit.warnings + sat_notes
    fit.has_df = True
    return fit


def _satterthwaite(dev: ProfiledDeviance, theta: np.ndarray, s2: float
                   ) -> tuple[Callable[[np.ndarray], float | None], list[str]]:
    """lmerTest's Satterthwaite df for contrasts ``L`` (scale-free, so computed on the scaled fit).

    Central differences with one Richardson step (steps ``h`` and ``h/2``, ``h`` = 0.2% of each parameter), as
    numDeriv does for lmerTest: small steps on a near-zero variance drown in rounding. A Hessian with
    non-positive eigenvalues is inverted on its positive eigenspace (lmerTest does the same), with a warning.
    """
    varpar = np.append(theta, np.sqrt(s2))
    free = np.abs(varpar) >= SINGULAR_TOL * np.append(np.ones_like(theta), 0.0)
    bounded = np.array([lb is not None for lb, _ in dev.bounds()] + [True])
    free = free | ~bounded
    idx = np.flatnonzero(free)
    k = idx.size
    base = 2e-3 * np.maximum(np.abs(varpar), 1e-2)

    def jacobians(h: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Central differences of the analytic gradient (-> Hessian) and of the covariance, step ``h``."""
        rows, covs = [], []
        for i in idx:
            e = np.zeros_like(varpar)
            e[i] = h[i]
            gp, cp = dev.deviance_vp_gradient(varpar + e)
            gm, cm = dev.deviance_vp_gradient(varpar - e)
            rows.append((gp - gm)[idx] / (2 * h[i]))
            covs.append((cp - cm) / (2 * h[i]))
        H = np.array(rows)
        return (H + H.T) / 2, covs

    if k == 0:
        return (lambda L: None), ["Satterthwaite df not computed: no free variance parameter"]
    (H1, G1), (H2, G2) = jacobians(base), jacobians(base / 2)
    H = (4 * H2 - H1) / 3
    G = [(4 * g2 - g1) / 3 for g1, g2 in zip(G1, G2)]
    cov = dev.cov_beta_vp(varpar)
    # Eigen-decomposition of the Hessian in unit-curvature coordinates (D H D, D = |diag H|^-1/2): with a
    # variance 100x the residual the raw curvatures differ by 1e8 and a tolerance relative to the largest
    # eigenvalue drops a well-determined direction (the intercept's df then became the residual df, issue 21).
    # For a positive definite H the df are unchanged by the rescaling.
    scale = 1.0 / np.sqrt(np.maximum(np.abs(np.diag(H)), 1e-300))
    evals, evecs = np.linalg.eigh(H * np.outer(scale, scale))
    evecs = evecs * scale[:, None]
    pos = evals > 1e-8 * max(float(np.abs(evals).max()), 1e-300)
    notes = []
    if not pos.all():
        notes.append("deviance Hessian not positive definite at the optimum: Satterthwaite df from its positive "
                     "eigenspace (as lmerTest)")
    if not pos.any():
        return (lambda L: None), ["Satterthwaite df not computed: the deviance Hessian has no positive curvature"]
    A = 2.0 * (evecs[:, pos] / evals[pos]) @ evecs[:, pos].T

    def df(L: np.ndarray) -> float | None:
        var = float(L @ cov @ L)
        g = np.array([float(L @ d @ L) for d in G])
        denom = float(g @ A @ g)
        return 2 * var * var / denom if var > 0 and denom > 0 else None

    return df, notes
