"""Vectorised screening: equal to the per-feature ANOVA, finds a planted interaction, calibrated on noise."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from fis_interventions.errors import FisError
from fis_interventions.stats import anova_2x2, fdr_bh, screen_features


def design(n_per_cell=(100, 100, 100, 100)) -> pd.DataFrame:
    cells = [("formal", "neutral"), ("formal", "emotional"), ("informal", "neutral"), ("informal", "emotional")]
    rows = [c for c, k in zip(cells, n_per_cell) for _ in range(k)]
    return pd.DataFrame(rows, columns=["formality", "emotion"])


def test_equals_anova_2x2_on_unbalanced_cells():
    d = design((30, 41, 25, 37))
    X = np.random.default_rng(1).gamma(2.0, size=(len(d), 6))
    X[:, 2] += 3.0 * (d["formality"] == "informal") * (d["emotion"] == "emotional")
    out = screen_features(X, d, "formality", "emotion")
    for j in range(6):
        ref = anova_2x2(d.assign(y=X[:, j]), "y", "formality", "emotion").set_index("term")
        for suffix, term in (("a", "formality"), ("b", "emotion"), ("ab", "formality:emotion")):
            for ours, theirs in ((f"F_{suffix}", "F"), (f"p_{suffix}", "p"), (f"partial_eta2_{suffix}",
                                                                             "partial_eta2")):
                assert out.loc[j, ours] == pytest.approx(ref.loc[term, theirs], rel=1e-8)
    assert out.loc[2, "p_ab"] < 0.01
    cell = X[(d["formality"] == "informal").to_numpy() & (d["emotion"] == "neutral").to_numpy()].mean(0)
    np.testing.assert_allclose(out["mean_informal_neutral"], cell)
    assert list(out.columns[:11]) == ["feature", "F_a", "p_a", "F_b", "p_b", "F_ab", "p_ab", "partial_eta2_a",
                                      "partial_eta2_b", "partial_eta2_ab", "q_ab"]


def test_planted_interaction_is_top_ranked():
    d = design()
    rng = np.random.default_rng(7)
    X = rng.normal(size=(len(d), 2000))
    xa = np.where(d["formality"] == "formal", -0.5, 0.5)
    xb = np.where(d["emotion"] == "neutral", -0.5, 0.5)
    X[:, 1234] += 2.0 * xa * xb          # interaction only (difference of differences 0.5 SD)
    X[:, 99] += 1.0 * xa                 # main effect only
    out = screen_features(X, d, "formality", "emotion")
    assert out["p_ab"].idxmin() == 1234 and out.loc[1234, "q_ab"] < 0.05
    assert out["p_a"].idxmin() == 99 and out.loc[99, "p_ab"] > 1e-3
    assert (out["q_ab"] < 0.05).sum() <= 3


def test_null_data_is_calibrated():
    d = design()
    X = np.random.default_rng(11).normal(size=(len(d), 2000))
    out = screen_features(X, d, "formality", "emotion")
    frac = float((out["p_ab"] < 0.05).mean())
    assert 0.03 <= frac <= 0.07, frac
    assert (out["q_ab"] < 0.05).sum() <= 2
    assert not out["degenerate"].any()


def test_degenerate_features_are_flagged_and_left_out_of_fdr():
    d = design((10, 10, 10, 10))
    rng = np.random.default_rng(3)
    X = rng.normal(size=(40, 5))
    X[:, 0] = 3.0                                                  # constant
    X[:, 1] = np.repeat([1.0, 2.0, 3.0, 4.0], 10)                  # constant within cells
    out = screen_features(X, d, "formality", "emotion", feature_names=list("vwxyz"))
    assert list(out["degenerate"]) == [True, True, False, False, False]
    assert out.loc[:1, ["F_ab", "p_ab", "q_ab"]].isna().all().all()
    np.testing.assert_allclose(out["q_ab"].iloc[2:], fdr_bh(out["p_ab"].iloc[2:]))
    assert list(out["feature"]) == list("vwxyz")


def test_speed_5000_features():
    d = design()
    X = np.random.default_rng(0).normal(size=(len(d), 5000))
    screen_features(X[:, :10], d, "formality", "emotion")  # warm imports
    start = time.perf_counter()
    out = screen_features(X, d, "formality", "emotion")
    assert time.perf_counter() - start < 1.0
    assert len(out) == 5000


def test_user_errors():
    d = design((5, 5, 5, 5))
    X = np.zeros((20, 3))
    with pytest.raises(FisError, match="20"):
        screen_features(X[:19], d, "formality", "emotion")
    with pytest.raises(FisError, match="no observations"):
        screen_features(X[:15], d.iloc[:15], "formality", "emotion")
    with pytest.raises(FisError, match="NaN"):
        screen_features(np.full((20, 3), np.nan), d, "formality", "emotion")
