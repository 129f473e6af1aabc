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


# --- within-item screen (matched items: the item is a block) -------------------------------------------------

CELLS = [("formal", "neutral"), ("formal", "emotional"), ("informal", "neutral"), ("informal", "emotional")]


def item_design(n_items: int, reps: int = 1) -> pd.DataFrame:
    rows = [(f"i{i:02d}", fa, fb) for i in range(n_items) for fa, fb in CELLS for _ in range(reps)]
    return pd.DataFrame(rows, columns=["item", "formality", "emotion"])


def item_data(d: pd.DataFrame, k: int, rng: np.random.Generator, item_sd: float = 3.0) -> np.ndarray:
    """Null features with large item effects (intercepts and item x formality slopes) and cell-dependent
    noise, as the real screening shows (sparse features vary more in some cells)."""
    items = d["item"].astype("category").cat.codes.to_numpy()
    n_items = items.max() + 1
    xa = np.where(d["formality"] == "formal", -0.5, 0.5)
    cell = 2 * (d["formality"] == "informal").to_numpy() + (d["emotion"] == "emotional").to_numpy()
    noise_sd = np.array([0.5, 1.0, 1.5, 2.0])[cell]
    X = rng.normal(size=(len(d), k)) * noise_sd[:, None]
    X += item_sd * rng.normal(size=(n_items, k))[items]
    X += rng.normal(size=(n_items, k))[items] * xa[:, None]
    return X


def test_within_item_equals_rm_anova_per_feature():
    """Replicated observations per item x cell, one item missing a cell: equal to pingouin's RM-ANOVA."""
    from fis_interventions.stats import rm_anova_by_item

    d = item_design(9, reps=2)
    rng = np.random.default_rng(5)
    X = item_data(d, 7, rng)
    X[:, 3] += 2.0 * np.where(d["formality"] == "informal", 0.5, -0.5) * np.where(d["emotion"] == "emotional",
                                                                                     0.5, -0.5)
    drop = (d["item"] == "i04") & (d["formality"] == "informal") & (d["emotion"] == "neutral")
    d, X = d[~drop].reset_index(drop=True), X[~drop.to_numpy()]
    out = screen_features(X, d, "formality", "emotion", item="item")
    assert out.attrs["model"] == "within_item" and out.attrs["n_items"] == 8 and out.attrs["n_items_dropped"] == 1
    assert out.attrs["df_error"] == 7
    for j in range(7):
        ref, info = rm_anova_by_item(d.assign(y=X[:, j]), "y", "formality", "emotion", item="item")
        ref = ref.set_index("term")
        assert info["n_items_complete"] == 8
        for suffix, term in (("a", "formality"), ("b", "emotion"), ("ab", "formality:emotion")):
            for ours, theirs in ((f"F_{suffix}", "F"), (f"p_{suffix}", "p"),
                                 (f"partial_eta2_{suffix}", "partial_eta2")):
                assert out.loc[j, ours] == pytest.approx(ref.loc[term, theirs], rel=1e-8), (j, ours)
    assert out["p_ab"].idxmin() == 3


def test_within_item_equals_pingouin_directly():
    """The same against pingouin itself (no engine in between), one observation per item x cell."""
    import pingouin as pg

    d = item_design(12)
    X = item_data(d, 4, np.random.default_rng(8))
    out = screen_features(X, d, "formality", "emotion", item="item")
    for j in range(4):
        aov = pg.rm_anova(data=d.assign(y=X[:, j]), dv="y", within=["formality", "emotion"], subject="item",
                          effsize="np2", correction=False).set_index("Source")
        for suffix, src in (("a", "formality"), ("b", "emotion"), ("ab", "formality * emotion")):
            assert out.loc[j, f"F_{suffix}"] == pytest.approx(aov.loc[src, "F"], rel=1e-8)
            assert out.loc[j, f"p_{suffix}"] == pytest.approx(aov.loc[src, "p_unc" if "p_unc" in aov else "p-unc"], rel=1e-8)
            assert out.loc[j, f"partial_eta2_{suffix}"] == pytest.approx(aov.loc[src, "np2"], rel=1e-8)


def test_within_item_null_is_calibrated():
    d = item_design(24)
    X = item_data(d, 3000, np.random.default_rng(21))
    out = screen_features(X, d, "formality", "emotion", item="item")
    frac = float((out["p_ab"] < 0.05).mean())
    assert 0.035 <= frac <= 0.065, frac
    assert (out["q_ab"] < 0.05).sum() <= 2 and not out["degenerate"].any()


def _found(X: np.ndarray, d: pd.DataFrame, planted: int, item: str | None) -> bool:
    out = screen_features(X, d, "formality", "emotion", item=item)
    return bool(out["p_ab"].idxmin() == planted and out.loc[planted, "q_ab"] < 0.05)


def test_within_item_finds_planted_interaction_with_fewer_items_than_ols():
    """Item effects are large next to the interaction: OLS leaves them in its error term, the block removes
    them. The smallest number of items at which each screen finds the planted feature (top, q < 0.05)."""
    full = item_design(40)
    X_full = item_data(full, 500, np.random.default_rng(2), item_sd=4.0)
    xa = np.where(full["formality"] == "formal", -0.5, 0.5)
    xb = np.where(full["emotion"] == "neutral", -0.5, 0.5)
    X_full[:, 77] += 4.0 * xa * xb              # difference of differences 4 (noise SD 0.5-2, item SD 4)
    need = {}
    for item in ("item", None):
        for n in range(4, 41, 2):
            rows = (full.index < 4 * n)
            if _found(X_full[rows], full[rows].reset_index(drop=True), 77, item):
                need[item] = n
                break
    assert "item" in need, need
    assert need["item"] < need.get(None, 41), need


def test_within_item_degenerate_and_errors():
    d = item_design(6)
    X = np.random.default_rng(0).normal(size=(24, 3))
    X[:, 0] = 1.0                                                     # constant
    X[:, 1] = np.tile([1.0, 2.0, 3.0, 4.0], 6) + np.repeat(np.arange(6.0), 4)  # additive: no A x B error
    out = screen_features(X, d, "formality", "emotion", item="item")
    assert list(out["degenerate"]) == [True, True, False]
    assert out.loc[:1, ["F_ab", "p_ab", "q_ab"]].isna().all().all()
    with pytest.raises(FisError, match="at least 3"):
        screen_features(X[:8], d.iloc[:8], "formality", "emotion", item="item")
