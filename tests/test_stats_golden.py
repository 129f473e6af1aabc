"""Our statistics against R (car, lme4, lmerTest, afex), pingouin's bundled data and lme4 on dietox."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fis_interventions.stats import anova_2x2, lmm_2x2, lmm_fit, rm_anova_by_item

GOLDEN = Path(__file__).resolve().parent / "golden"
TERMS = ["formality", "emotion", "formality:emotion"]
R_TERMS = {"(Intercept)": "Intercept", "formality1": "formality", "emotion1": "emotion",
           "formality1:emotion1": "formality:emotion"}


@pytest.fixture(scope="module")
def golden() -> tuple[pd.DataFrame, dict]:
    # The golden R outputs are part of the project (tests/golden): a missing file is a failure, not a skip.
    assert (GOLDEN / "factorial_items.csv").is_file(), f"golden data missing at {GOLDEN}"
    data = pd.read_csv(GOLDEN / "factorial_items.csv")
    ref = json.loads((GOLDEN / "factorial_items.r.json").read_text())
    return data, ref


@pytest.fixture(scope="module")
def reml(golden):
    data, _ = golden
    return lmm_2x2(data, "logit_shift", "formality", "emotion", "item", random="intercept",
                   levels={"formality": ["formal", "informal"], "emotion": ["neutral", "emotional"]})


def close(ours: float, theirs: float, rel: float) -> None:
    assert ours == pytest.approx(theirs, rel=rel, abs=0), (ours, theirs)


def test_type3_anova_matches_car(golden):
    data, ref = golden
    table = anova_2x2(data, "logit_shift", "formality", "emotion").set_index("term")
    assert list(table.index) == TERMS
    for row in ref["anova_type3_ols"]:
        ours = table.loc[row["term"]]
        for key in ("ss", "F", "p", "partial_eta2"):
            close(ours[key], row[key], 1e-6)
        assert ours["df1"] == row["df1"] and ours["df2"] == row["df2"]


def test_rm_anova_by_item_matches_afex(golden):
    data, ref = golden
    table, info = rm_anova_by_item(data, "logit_shift", "formality", "emotion", "item")
    table = table.set_index("term")
    assert info["n_items_complete"] == ref["n_items_complete"] == 30 and info["n_items_dropped"] == 0
    for row in ref["rm_anova_by_item"]:
        ours = table.loc[row["term"]]
        for key in ("F", "p", "partial_eta2"):
            close(ours[key], row[key], 1e-6)
        assert (ours["df1"], ours["df2"]) == (row["df1"], row["df2"])


def test_reml_fixed_effects_match_lmertest(golden, reml):
    _, ref = golden
    assert reml.converged and reml.method == "REML" and reml.optimizer in ("L-BFGS-B", "COBYQA")
    fixed = reml.fixed.set_index("term")
    for row in ref["lmm_reml"]["fixed"]:
        ours = fixed.loc[R_TERMS[row["term"]]]
        close(ours["estimate"], row["estimate"], 1e-6)
        close(ours["se"], row["se"], 1e-4)
        close(ours["t"], row["t"], 1e-4)
        close(ours["df"], row["df"], 1e-5)   # Satterthwaite: 29 and 207 here
        close(ours["p"], row["p"], 1e-4)


def test_reml_variance_components_and_loglik(golden, reml):
    _, ref = golden
    close(reml.item_var, ref["lmm_reml"]["item_var"], 1e-4)
    close(reml.resid_var, ref["lmm_reml"]["resid_var"], 1e-4)
    close(reml.loglik, ref["lmm_reml"]["loglik"], 1e-8)
    assert reml.warnings == []


def test_ml_fixed_effects_and_loglik(golden):
    data, ref = golden
    ml = lmm_2x2(data, "logit_shift", "formality", "emotion", "item", method="ML", random="intercept")
    assert ml.converged and ml.method == "ML"
    fixed = ml.fixed.set_index("term")
    for r_term, value in ref["lmm_ml"]["fixed_estimates"].items():
        close(fixed.loc[R_TERMS[r_term], "estimate"], value, 1e-6)
    close(ml.loglik, ref["lmm_ml"]["loglik"], 1e-8)
    # ML shrinks the variances by about (n - p)/n relative to REML, so ML SEs are smaller
    reml_se = lmm_2x2(data, "logit_shift", "formality", "emotion", "item",
                      random="intercept").fixed["se"].to_numpy()
    assert np.all(fixed["se"].to_numpy() < reml_se)


def test_pingouin_unbalanced_two_way():
    import pingouin as pg

    data = pg.read_dataset("anova2_unbalanced")
    ours = anova_2x2(data, "Scores", "Diet", "Exercise").set_index("term")
    theirs = pg.anova(data=data, dv="Scores", between=["Diet", "Exercise"], ss_type=3,
                      effsize="np2").set_index("Source")
    # published in pingouin's docs for this dataset: SS 390.625, 180.625, 15.625; residual SS 315.75, df 6
    expected = {"Diet": (390.625, 7.422803, 0.034437, 0.552999),
                "Exercise": (180.625, 3.432304, 0.113373, 0.363888),
                "Diet:Exercise": (15.625, 0.296912, 0.605470, 0.047152)}
    for term, (ss, f, p, np2) in expected.items():
        row = ours.loc[term]
        close(row["ss"], ss, 1e-9)
        close(row["F"], f, 1e-6)
        close(row["p"], p, 2e-5)
        close(row["partial_eta2"], np2, 2e-6)
        assert row["df2"] == 6
        pg_row = theirs.loc[term.replace(":", " * ")]
        close(row["F"], pg_row["F"], 1e-10)
        close(row["p"], pg_row["p_unc" if "p_unc" in pg_row else "p-unc"], 1e-10)  # pingouin < 0.7: p-unc


def dietox() -> pd.DataFrame:
    import statsmodels

    path = Path(statsmodels.__file__).parent / "regression" / "tests" / "results" / "dietox.csv"
    assert path.is_file(), "statsmodels no longer ships dietox.csv"
    return pd.read_csv(path)


def test_dietox_matches_published_lme4_fit():
    fit = lmm_fit(dietox(), "Weight ~ Time", "Pig", method="REML")
    assert fit.converged and fit.n_groups == 72 and fit.n == 861
    fixed = fit.fixed.set_index("term")
    close(fixed.loc["Intercept", "estimate"], 15.723523, 1e-6)
    close(fixed.loc["Time", "estimate"], 6.942505, 1e-6)
    close(fixed.loc["Intercept", "se"], 0.78805374, 1e-5)
    close(fixed.loc["Time", "se"], 0.03338727, 1e-5)
    close(fit.resid_var, 11.36692, 1e-5)
    close(fit.item_var, 40.39395, 1e-5)
    close(fit.loglik, -2404.775, 1e-6)
