"""Maximal random effects against lme4/lmerTest (tests/golden/factorial_slopes.*), the structure rules and the
singular-fit simplification rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fis_interventions.stats import analyze_2x2, lmm_2x2, rm_anova_by_item

GOLDEN = Path(__file__).resolve().parent / "golden"
LEVELS = {"formality": ["formal", "informal"], "emotion": ["neutral", "emotional"]}
R_TERMS = ["(Intercept)", "formality1", "emotion1", "formality1:emotion1"]
R_VAR = {"(Intercept)": "(Intercept)", "a": "formality", "b": "emotion", "ab": "formality:emotion"}
MODELS = {"varcomp": "lmm_varcomp", "uncorrelated": "lmm_slopes_uncorrelated",
          "correlated": "lmm_slopes_correlated"}


@pytest.fixture(scope="module")
def golden() -> tuple[pd.DataFrame, dict]:
    assert (GOLDEN / "factorial_slopes.csv").is_file(), f"golden data missing at {GOLDEN}"
    return pd.read_csv(GOLDEN / "factorial_slopes.csv"), json.loads((GOLDEN / "factorial_slopes.r.json").read_text())


@pytest.fixture(scope="module")
def fits(golden):
    data, _ = golden
    return {r: lmm_2x2(data, "logit_shift", "formality", "emotion", "item", levels=LEVELS, random=r)
            for r in MODELS}


def rel(ours: float, theirs: float) -> float:
    return abs(ours / theirs - 1)


@pytest.mark.parametrize("random", list(MODELS))
def test_matches_lmertest(golden, fits, random):
    _, ref = golden
    r = ref[MODELS[random]]
    fit = fits[random]
    assert fit.converged and fit.warnings == [] and not fit.singular and r["singular"] is False
    assert fit.loglik == pytest.approx(r["loglik"], abs=1e-6)
    for row, (_, ours) in zip(r["fixed"], fit.fixed.iterrows()):
        assert rel(ours["estimate"], row["estimate"]) < 1e-6, (random, row["term"])
        assert rel(ours["se"], row["se"]) < 1e-4
        assert rel(ours["df"], row["df"]) < 1e-3
        assert rel(ours["p"], row["p"]) < 1e-3
    ours_vc = {(v["group"], v["term1"], v["term2"]): v["vcov"] for v in fit.to_dict()["random_effects"]}
    assert len(ours_vc) == len(r["varcorr"])
    for v in r["varcorr"]:
        if v["grp"] == "Residual":
            key = ("Residual", None, None)
        elif random == "varcomp":
            key = (v["grp"], "(Intercept)", None)
        else:
            key = ("item", R_VAR[v["var1"]], R_VAR[v["var2"]] if v["var2"] else None)
        assert ours_vc[key] == pytest.approx(v["vcov"], abs=1e-4, rel=1e-4), (random, key)


def test_intercept_only_overstates_the_evidence(golden, fits):
    data, ref = golden
    small = lmm_2x2(data, "logit_shift", "formality", "emotion", "item", levels=LEVELS, random="intercept")
    assert small.fixed["df"].iloc[3] > 350 and fits["uncorrelated"].fixed["df"].iloc[3] < 40
    assert small.fixed["se"].iloc[3] < 0.95 * fits["uncorrelated"].fixed["se"].iloc[3]
    assert small.structure == "formality*emotion + (1 | item)"
    assert fits["uncorrelated"].structure == "formality*emotion + (1 + formality + emotion + formality:emotion || item)"
    assert fits["correlated"].structure.endswith("(1 + formality + emotion + formality:emotion | item)")


def balanced(seed: int, n_items: int = 24, reps: int = 2, sd_slope: float = 0.8, inter: float = 0.3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_items):
        u = rng.normal(0, [1.0, sd_slope, sd_slope, sd_slope * 2])
        for fa, xa in zip(LEVELS["formality"], (-0.5, 0.5)):
            for em, xb in zip(LEVELS["emotion"], (-0.5, 0.5)):
                for _ in range(reps):
                    y = u[0] + (0.5 + u[1]) * xa + (0.2 + u[2]) * xb + (inter + u[3]) * xa * xb + rng.normal(0, 0.5)
                    rows.append({"item": f"i{i:02d}", "formality": fa, "emotion": em, "y": y})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seed", [1, 2])
def test_balanced_maximal_t_squared_is_the_by_item_f(seed):
    data = balanced(seed)
    fit = lmm_2x2(data, "y", "formality", "emotion", "item", levels=LEVELS)
    assert not fit.singular and fit.simplification == []
    rm, _ = rm_anova_by_item(data, "y", "formality", "emotion", "item", levels=LEVELS)
    for k, term in enumerate(["formality", "emotion", "formality:emotion"], start=1):
        row = fit.fixed.iloc[k]
        f2 = rm.set_index("term").loc[term]
        assert row["t"] ** 2 == pytest.approx(f2["F"], rel=1e-6)
        assert row["df"] == pytest.approx(23, rel=1e-6)
        assert row["p"] == pytest.approx(f2["p"], rel=1e-5)


def test_singular_fit_follows_the_rule():
    # no slope variance for B or A:B at all: the correlated maximal fit is singular
    data = balanced(4, sd_slope=0.0, n_items=20)
    rng = np.random.default_rng(9)
    slope = dict(zip(sorted(data["item"].unique()), rng.normal(0, 1.0, 20)))
    data["y"] += data["item"].map(slope) * np.where(data["formality"] == "formal", -0.5, 0.5)
    fit = lmm_2x2(data, "y", "formality", "emotion", "item", levels=LEVELS, random="correlated")
    assert fit.simplification[0] == "dropped the random-effect correlations"
    assert all(s.startswith("dropped the zero-variance by-item slope") for s in fit.simplification[1:])
    order = [s.rsplit(" ", 1)[1] for s in fit.simplification[1:]]
    assert order == [t for t in ["A:B", "B", "A"] if t in order]  # fixed order, highest order first
    assert not fit.singular and "A" not in order
    assert any("singular fit simplified" in w for w in fit.warnings)
    assert fit.requested.endswith("(1 + formality + emotion + formality:emotion | item)")
    assert fit.structure == "formality*emotion + (1 + formality + formality:emotion || item)"
    # the same data twice: the same structure (deterministic)
    again = lmm_2x2(data, "y", "formality", "emotion", "item", levels=LEVELS, random="correlated")
    assert again.structure == fit.structure and again.simplification == fit.simplification


def test_slopes_only_where_the_design_supports_them():
    data = balanced(3, reps=1)
    fit = lmm_2x2(data, "y", "formality", "emotion", "item", levels=LEVELS)
    # one observation per item x cell: the by-item A:B slope is the residual, so it is not in the model
    assert "formality:emotion ||" not in fit.requested and fit.requested.endswith("(1 + formality + emotion || item)")
    between = data[data["formality"] == "formal"].assign(formality="formal")
    other = data[data["formality"] == "informal"].assign(item=lambda d: d["item"] + "x")
    fit2 = lmm_2x2(pd.concat([between, other]), "y", "formality", "emotion", "item", levels=LEVELS)
    assert "formality +" not in fit2.requested  # A varies between items: no by-item A slope


@pytest.mark.parametrize("n_prompts, mode", [(3, "fixed"), (6, "random")])
def test_prompts_fixed_below_five_random_from_five(n_prompts, mode):
    data = balanced(5, reps=n_prompts)
    data["prompt"] = np.tile(np.arange(n_prompts), len(data) // n_prompts).astype(str)
    bump = np.random.default_rng(1).normal(0, 1, n_prompts)
    data["y"] += bump[data["prompt"].astype(int)]
    out = analyze_2x2(data, "y", "formality", "emotion", item="item", levels=LEVELS, prompt="prompt")
    lmm = out["lmm"]
    assert lmm["prompts"] == mode
    if mode == "fixed":
        assert "prompt (fixed, 3 levels)" in lmm["structure"]
        assert not any(r["group"] == "prompt" for r in lmm["random_effects"])
    else:
        assert "|| prompt)" in lmm["structure"] or "| prompt)" in lmm["structure"]
        assert lmm["other_var"]["prompt"] == pytest.approx(np.var(bump, ddof=1), rel=0.8)
    json.dumps(out, allow_nan=False)


def test_crossed_prompt_slopes_match_a_dense_likelihood():
    """Items and >= 5 prompts, both with slopes: the sparse engine's logLik, estimates and SEs equal lme4's
    formulas evaluated with a dense V built here from the reported variances."""
    data = balanced(6, n_items=12, reps=6)
    data["prompt"] = np.tile(np.arange(6), len(data) // 6).astype(str)
    rng = np.random.default_rng(2)
    pfx = rng.normal(0, [0.8, 0.6], size=(6, 2))
    xa = np.where(data["formality"] == "formal", -0.5, 0.5)
    xb = np.where(data["emotion"] == "neutral", -0.5, 0.5)
    data["y"] += pfx[data["prompt"].astype(int), 0] + pfx[data["prompt"].astype(int), 1] * xa
    fit = lmm_2x2(data, "y", "formality", "emotion", "item", levels=LEVELS, extra_random="prompt")
    assert fit.prompts == "random" and "|| prompt)" in fit.structure
    X = np.column_stack([np.ones(len(data)), xa, xb, xa * xb])
    cols = {"(Intercept)": X[:, 0], "formality": xa, "emotion": xb, "formality:emotion": xa * xb}
    V = np.eye(len(data)) * fit.resid_var
    for r in fit.random_effects:
        if r["group"] == "Residual":
            continue
        assert r["term2"] is None  # uncorrelated
        g = pd.get_dummies(data[r["group"]]).to_numpy(float)
        z = g * cols[r["term1"]][:, None]
        V += r["vcov"] * z @ z.T
    Vi = np.linalg.inv(V)
    XVX = X.T @ Vi @ X
    cov = np.linalg.inv(XVX)
    y = data["y"].to_numpy()
    beta = cov @ X.T @ Vi @ y
    res = y - X @ beta
    n, p = X.shape
    reml = -0.5 * ((n - p) * np.log(2 * np.pi) + np.linalg.slogdet(V)[1] + np.linalg.slogdet(XVX)[1] + res @ Vi @ res)
    assert fit.loglik == pytest.approx(reml, rel=1e-9)
    np.testing.assert_allclose(fit.fixed["estimate"], beta, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(fit.fixed["se"], np.sqrt(np.diag(cov)), rtol=1e-7)
