"""Unbalanced designs (items missing cells, unequal replicates) and a crossed random factor.

No R here, so expected values are computed independently in this file: lme4's formulas with a dense ``V``
(GLS estimate, ``(X' V^-1 X)^-1``, the REML/ML log-likelihood) at the fitted variance components, Type III SS
by comparing restricted OLS fits, and the F2 ANOVA as squared one-sample t tests on item contrasts.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from fis_interventions.errors import FisWarning
from fis_interventions.stats import anova_2x2, lmm_2x2, rm_anova_by_item

LEVELS = {"formality": ["formal", "informal"], "emotion": ["neutral", "emotional"]}


def unbalanced(seed: int = 3, n_items: int = 24, n_prompts: int = 0) -> pd.DataFrame:
    """Items 0-4 miss one cell, replicates vary 1-4 per cell; true interaction 0.5."""
    rng = np.random.default_rng(seed)
    prompt_fx = rng.normal(0, 0.6, size=max(n_prompts, 1))
    rows = []
    for i in range(n_items):
        u = rng.normal(0, 1.0)
        for fa in LEVELS["formality"]:
            for em in LEVELS["emotion"]:
                if i < 5 and (fa, em) == (("informal", "emotional") if i % 2 else ("formal", "neutral")):
                    continue
                for _ in range(int(rng.integers(1, 5))):
                    xa, xb = (-0.5 if fa == "formal" else 0.5), (-0.5 if em == "neutral" else 0.5)
                    prompt = int(rng.integers(0, max(n_prompts, 1)))
                    y = 1 + 0.8 * xa + 0.3 * xb + 0.5 * xa * xb + u + rng.normal(0, 0.7)
                    y += prompt_fx[prompt] if n_prompts else 0.0
                    rows.append({"item": f"i{i:02d}", "prompt": f"p{prompt}", "formality": fa, "emotion": em,
                                 "y": y})
    return pd.DataFrame(rows)


def dense_parts(data: pd.DataFrame, variances: list[float], resid: float, factors: list[str]):
    """Dense V = sum_k v_k Z_k Z_k' + resid I and lme4's GLS quantities (independent of the fitting engine)."""
    xa = np.where(data["formality"] == "formal", -0.5, 0.5)
    xb = np.where(data["emotion"] == "neutral", -0.5, 0.5)
    X = np.column_stack([np.ones(len(data)), xa, xb, xa * xb])
    y = data["y"].to_numpy()
    V = resid * np.eye(len(data))
    for v, f in zip(variances, factors):
        Z = pd.get_dummies(data[f]).to_numpy(float)
        V += v * Z @ Z.T
    Vi = np.linalg.inv(V)
    XVX = X.T @ Vi @ X
    cov = np.linalg.inv(XVX)
    beta = cov @ X.T @ Vi @ y
    r = y - X @ beta
    n, p = X.shape
    logdet_v = np.linalg.slogdet(V)[1]
    ml = -0.5 * (n * np.log(2 * np.pi) + logdet_v + r @ Vi @ r)
    reml = -0.5 * ((n - p) * np.log(2 * np.pi) + logdet_v + np.linalg.slogdet(XVX)[1] + r @ Vi @ r)
    return {"beta": beta, "cov": cov, "ml": ml, "reml": reml}


@pytest.fixture(scope="module")
def data() -> pd.DataFrame:
    return unbalanced()


@pytest.fixture(scope="module")
def fit(data):
    return lmm_2x2(data, "y", "formality", "emotion", "item", levels=LEVELS, random="intercept")


def test_fixture_is_unbalanced(data):
    counts = data.groupby(["item", "formality", "emotion"]).size()
    assert counts.min() == 1 and counts.max() == 4 and len(counts) == 24 * 4 - 5


def test_lmm_matches_lme4_formulas_at_fitted_components(data, fit):
    assert fit.converged
    ref = dense_parts(data, [fit.item_var], fit.resid_var, ["item"])
    np.testing.assert_allclose(fit.fixed["estimate"], ref["beta"], rtol=1e-7)
    np.testing.assert_allclose(fit.fixed["se"], np.sqrt(np.diag(ref["cov"])), rtol=1e-9)
    assert fit.loglik == pytest.approx(ref["reml"], rel=1e-10)


def test_reml_estimates_are_at_the_optimum(data, fit):
    best = dense_parts(data, [fit.item_var], fit.resid_var, ["item"])["reml"]
    for d_item, d_res in [(1.01, 1), (0.99, 1), (1, 1.01), (1, 0.99)]:
        other = dense_parts(data, [fit.item_var * d_item], fit.resid_var * d_res, ["item"])["reml"]
        assert other < best


def test_statsmodels_bse_drifts_but_loglik_agrees(data, fit):
    import statsmodels.formula.api as smf

    d = data.assign(xa=np.where(data.formality == "formal", -0.5, 0.5),
                    xb=np.where(data.emotion == "neutral", -0.5, 0.5))
    res = smf.mixedlm("y ~ xa * xb", d, groups="item").fit(reml=True, method=["bfgs"], gtol=1e-8)
    assert res.llf == pytest.approx(fit.loglik, rel=1e-9)
    # why lmm.py computes SEs itself: statsmodels' Hessian-based SEs are not lme4's GLS SEs here
    rel = np.abs(np.asarray(res.bse_fe) / fit.fixed["se"].to_numpy() - 1)
    assert rel.max() > 1e-6


def _lmertest_dfs(data: pd.DataFrame, fit) -> np.ndarray:
    """Satterthwaite df of each coefficient in lmerTest's parameterisation (theta = sd_item/sigma, sigma)."""
    def parts(par):
        th, s = par
        return dense_parts(data, [(th * s) ** 2], s**2, ["item"])

    sigma = np.sqrt(fit.resid_var)
    par = np.array([np.sqrt(fit.item_var) / sigma, sigma])
    h = 1e-4 * par
    E = np.diag(h)
    dev = {}
    for a in (-1, 1):
        for b in (-1, 1):
            for i in range(2):
                for j in range(2):
                    key = tuple(np.round(a * E[i] + b * E[j], 15))
                    if key not in dev:
                        dev[key] = -2 * parts(par + np.array(key))["reml"]
    H = np.zeros((2, 2))
    for i in range(2):
        for j in range(2):
            def d(a, b):
                return dev[tuple(np.round(a * E[i] + b * E[j], 15))]
            H[i, j] = (d(1, 1) - d(1, -1) - d(-1, 1) + d(-1, -1)) / (4 * h[i] * h[j])
    dcov = [(parts(par + E[i])["cov"] - parts(par - E[i])["cov"]) / (2 * h[i]) for i in range(2)]
    cov = parts(par)["cov"]
    A = 2 * np.linalg.inv(H)
    out = []
    for k in range(4):
        g = np.array([dc[k, k] for dc in dcov])
        out.append(2 * cov[k, k] ** 2 / (g @ A @ g))
    return np.array(out)


def test_satterthwaite_df_is_parameterisation_free(data, fit):
    np.testing.assert_allclose(fit.fixed["df"], _lmertest_dfs(data, fit), rtol=1e-4)
    # unbalanced: not the balanced 23 and n - 4 - 23 = 204 exactly
    assert 20 < fit.fixed["df"].iloc[0] < 30 and fit.fixed["df"].iloc[3] > 100
    assert fit.fixed["df"].iloc[0] != pytest.approx(23, abs=0.01)


def test_type3_ss_equals_restricted_model_comparison(data):
    table = anova_2x2(data, "y", "formality", "emotion", levels=LEVELS)
    xa = np.where(data["formality"] == "formal", -0.5, 0.5)
    xb = np.where(data["emotion"] == "neutral", -0.5, 0.5)
    X = np.column_stack([np.ones(len(data)), xa, xb, xa * xb])
    y = data["y"].to_numpy()

    def rss(M):
        resid = y - M @ np.linalg.lstsq(M, y, rcond=None)[0]
        return resid @ resid

    full = rss(X)
    df_res = len(y) - 4
    for j, row in zip([1, 2, 3], table.itertuples()):
        ss = rss(np.delete(X, j, axis=1)) - full
        assert row.ss == pytest.approx(ss, rel=1e-9)
        assert row.F == pytest.approx(ss / (full / df_res), rel=1e-9)
        assert row.df2 == df_res
        assert row.partial_eta2 == pytest.approx(ss / (ss + full), rel=1e-9)


def test_rm_anova_drops_incomplete_items_and_equals_t_squared(data):
    with pytest.warns(FisWarning, match="dropped 5 items"):
        table, info = rm_anova_by_item(data, "y", "formality", "emotion", "item", levels=LEVELS)
    assert (info["n_items"], info["n_items_complete"], info["n_items_dropped"]) == (24, 19, 5)
    means = data.groupby(["item", "formality", "emotion"])["y"].mean().unstack(["formality", "emotion"])
    means = means.dropna()
    ff, fe = means[("formal", "neutral")], means[("formal", "emotional")]
    inf_, ie = means[("informal", "neutral")], means[("informal", "emotional")]
    contrasts = [(inf_ + ie) - (ff + fe), (fe + ie) - (ff + inf_), (ie - inf_) - (fe - ff)]
    for row, c in zip(table.itertuples(), contrasts):
        t = sps.ttest_1samp(c, 0.0)
        assert row.F == pytest.approx(t.statistic**2, rel=1e-9)
        assert row.p == pytest.approx(t.pvalue, rel=1e-8)
        assert (row.df1, row.df2) == (1, 18)


def test_crossed_prompt_factor():
    data = unbalanced(seed=5, n_items=20, n_prompts=6)
    fit = lmm_2x2(data, "y", "formality", "emotion", "item", levels=LEVELS, extra_random="prompt",
                  random="intercept")
    assert fit.converged and set(fit.other_var) == {"prompt"}
    ref = dense_parts(data, [fit.item_var, fit.other_var["prompt"]], fit.resid_var, ["item", "prompt"])
    np.testing.assert_allclose(fit.fixed["estimate"], ref["beta"], rtol=1e-6)
    np.testing.assert_allclose(fit.fixed["se"], np.sqrt(np.diag(ref["cov"])), rtol=1e-9)
    assert fit.loglik == pytest.approx(ref["reml"], rel=1e-10)
    # the crossed fit is a maximum of the dense REML likelihood too
    for k in range(3):
        bump = np.ones(3)
        bump[k] = 1.02
        v = [fit.item_var * bump[0], fit.other_var["prompt"] * bump[1]]
        assert dense_parts(data, v, fit.resid_var * bump[2], ["item", "prompt"])["reml"] < ref["reml"]
    # ignoring the prompt factor leaves its variance in the residual
    plain = lmm_2x2(data, "y", "formality", "emotion", "item", levels=LEVELS, random="intercept")
    assert plain.resid_var > fit.resid_var
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fit.fixed["df"].notna().all()
