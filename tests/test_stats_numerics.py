"""Numerics at the edges: huge means and effects, optimiser disagreement, boundary ML fits, exact zeros,
non-finite input, big sparse designs and output paths that are folders. All data are generated here."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pytest

from fis_interventions.cli import main
from fis_interventions.errors import FisError
from fis_interventions.stats import analyze_2x2, anova_2x2, lmm_2x2, rm_anova_by_item
from fis_interventions.stats import mixed

LEVELS = {"a": ["a1", "a2"], "b": ["b1", "b2"]}


def design(n_items: int = 20, reps: int = 2, seed: int = 0, sd_item: float = 1.0, sd_slope: float = 0.7,
           effects: tuple[float, float, float] = (0.5, 0.2, 0.3)) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    item = np.repeat(np.arange(n_items), 4 * reps)
    xa = np.tile(np.repeat([-0.5, -0.5, 0.5, 0.5], reps), n_items)
    xb = np.tile(np.repeat([-0.5, 0.5, -0.5, 0.5], reps), n_items)
    u = rng.normal(0, [sd_item, sd_slope, sd_slope, 2 * sd_slope], size=(n_items, 4))
    y = (u[item, 0] + (effects[0] + u[item, 1]) * xa + (effects[1] + u[item, 2]) * xb
         + (effects[2] + u[item, 3]) * xa * xb + rng.normal(0, 0.5, size=len(item)))
    return pd.DataFrame({"item": [f"i{i:03d}" for i in item], "a": np.where(xa < 0, "a1", "a2"),
                         "b": np.where(xb < 0, "b1", "b2"), "y": y})


def fit(df: pd.DataFrame, **kw):
    return lmm_2x2(df, "y", "a", "b", "item", levels=LEVELS, **kw)


@pytest.mark.parametrize("random", ["intercept", "uncorrelated"])
def test_huge_mean_gives_the_centred_answer(random):
    data = design(seed=1)
    data["y"] -= data["y"].mean()
    shifted = data.assign(y=data["y"] + 1e8)
    base, big = fit(data, random=random), fit(shifted, random=random)
    assert big.loglik == pytest.approx(base.loglik, rel=1e-6)
    np.testing.assert_allclose(big.fixed["df"], base.fixed["df"], rtol=1e-5)
    np.testing.assert_allclose(big.fixed["p"].iloc[1:], base.fixed["p"].iloc[1:], rtol=1e-5)
    np.testing.assert_allclose(big.fixed["se"], base.fixed["se"], rtol=1e-6)
    np.testing.assert_allclose(big.fixed["estimate"].iloc[1:], base.fixed["estimate"].iloc[1:], rtol=1e-6)
    assert big.fixed["estimate"].iloc[0] - 1e8 == pytest.approx(base.fixed["estimate"].iloc[0], abs=1e-6)
    v_base = [r["vcov"] for r in base.random_effects]
    v_big = [r["vcov"] for r in big.random_effects]
    np.testing.assert_allclose(v_big, v_base, rtol=1e-5)
    scaled = fit(data.assign(y=data["y"] * 1e-6), random=random)  # scaling: loglik moves by (n - p) log s
    assert scaled.loglik == pytest.approx(base.loglik - (len(data) - 4) * np.log(1e-6), rel=1e-8)
    np.testing.assert_allclose(scaled.fixed["df"], base.fixed["df"], rtol=1e-5)


@pytest.mark.parametrize("random", ["intercept", "uncorrelated"])
def test_huge_effect_keeps_exact_balanced_df(random):
    data = design(seed=2, reps=1, effects=(1e7, -3e6, 0.3))
    out = fit(data, random=random)
    assert not out.singular
    # balanced, one observation per cell: the intercept's Satterthwaite df is exactly n_items - 1
    assert out.fixed["df"].iloc[0] == pytest.approx(19, rel=1e-5)
    assert out.fixed["estimate"].iloc[1] == pytest.approx(1e7, rel=1e-6)


def test_optimisers_are_compared_and_the_best_kept(monkeypatch):
    data = design(seed=3)
    good = fit(data)
    # L-BFGS-B with the analytic gradient converged: the derivative-free second optimiser is not run (issue 24)
    assert set(good.optimizers) == {"L-BFGS-B"} and good.optimizers["L-BFGS-B"]["converged"]
    best = max(v["loglik"] for v in good.optimizers.values())
    assert good.loglik >= best - 1e-9
    crippled = [("L-BFGS-B", {"options": {"maxiter": 1}}), mixed.OPTIMIZERS[1]]
    monkeypatch.setattr(mixed, "OPTIMIZERS", crippled)
    again = fit(data)
    assert set(again.optimizers) == {"L-BFGS-B", "COBYQA"}  # trouble reported: the second optimiser runs
    assert again.optimizer == "COBYQA"  # the stopped-early optimiser claims nothing it did not reach
    assert again.optimizers["L-BFGS-B"]["loglik"] < again.loglik - 1e-3
    assert any("optimisers disagree" in w for w in again.warnings)
    assert again.loglik == pytest.approx(good.loglik, abs=1e-6)


def test_ml_fit_without_item_variance_reaches_the_ols_likelihood():
    import statsmodels.formula.api as smf

    data = design(seed=4, sd_item=0.0, sd_slope=0.0)
    # remove every item-level deviation: the ML item variance is exactly on the boundary
    data["y"] -= data.groupby("item")["y"].transform("mean") - data["y"].mean()
    out = fit(data, random="intercept", method="ML")
    d = data.assign(xa=np.where(data.a == "a1", -0.5, 0.5), xb=np.where(data.b == "b1", -0.5, 0.5))
    ols = smf.ols("y ~ xa * xb", d).fit()
    assert out.item_var == pytest.approx(0.0, abs=1e-10) and out.singular
    assert out.loglik == pytest.approx(ols.llf, abs=1e-7)  # no worse than the exact maximum
    assert all(v["loglik"] <= out.loglik + 1e-9 for v in out.optimizers.values())


def test_exact_zero_interaction_gives_zero_f_and_eta2():
    data = design(seed=5, reps=2, effects=(0.5, 0.2, 0.0), sd_slope=0.0)
    xa = np.where(data.a == "a1", -0.5, 0.5)
    xb = np.where(data.b == "b1", -0.5, 0.5)
    item_fx = data.groupby("item")["y"].transform("mean")
    # additive cell means for every item (no interaction at all, to the last bit of the model)
    data["y"] = item_fx + 0.5 * xa + 0.2 * xb + np.tile([0.3, -0.3], len(data) // 2)
    rm, _ = rm_anova_by_item(data, "y", "a", "b", "item", levels=LEVELS)
    ab = rm.set_index("term").loc["a:b"]
    assert ab["F"] == 0.0 and ab["partial_eta2"] == 0.0 and ab["ss"] == 0.0 and ab["p"] == 1.0
    f1 = anova_2x2(data, "y", "a", "b", levels=LEVELS).set_index("term").loc["a:b"]
    assert f1["F"] == 0.0 and f1["partial_eta2"] == 0.0
    # interaction exactly zero on average but varying over items: F = 0 over a positive error term
    rng = np.random.default_rng(0)
    d = rng.normal(size=20)
    d -= d.mean()
    d[-1] = -d[:-1].sum()
    data2 = data.assign(y=data["y"] + data["item"].map(dict(zip(sorted(data["item"].unique()), d))) * xa * xb)
    rm2, _ = rm_anova_by_item(data2, "y", "a", "b", "item", levels=LEVELS)
    row = rm2.set_index("term").loc["a:b"]
    assert row["F"] == pytest.approx(0.0, abs=1e-12) and row["partial_eta2"] >= 0


@pytest.mark.parametrize("seed", range(5))
def test_no_negative_sums_of_squares(seed):
    data = design(seed=seed, effects=(0.0, 0.0, 0.0))
    out = analyze_2x2(data, "y", "a", "b", item="item", levels=LEVELS)
    for row in out["anova"] + out["rm_anova"]:
        assert row["ss"] >= 0 and (row["F"] is None or row["F"] >= 0)
        assert row["partial_eta2"] is None or 0 <= row["partial_eta2"] <= 1


@pytest.mark.parametrize("value, message", [(np.inf, "infinite values"), (-np.inf, "infinite values"),
                                            (1e300, "overflow")])
def test_non_finite_and_overflowing_measures_are_user_errors(value, message, tmp_path, capsys):
    data = design(seed=6)
    data.loc[3, "y"] = value
    with pytest.raises(FisError, match=message):
        analyze_2x2(data, "y", "a", "b", item="item")
    path = tmp_path / "bad.csv"
    data.to_csv(path, index=False)
    assert main(["stats", str(path), "--dv", "y", "--factor", "a", "--factor", "b", "--item", "item"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_json_path_that_is_a_folder_exits_2(tmp_path, capsys):
    path = tmp_path / "d.csv"
    design(seed=7).to_csv(path, index=False)
    folder = tmp_path / "out"
    folder.mkdir()
    assert main(["stats", str(path), "--dv", "y", "--factor", "a", "--factor", "b", "--json", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a folder" in err and len(err.splitlines()) == 1 and list(folder.iterdir()) == []


def test_sparse_design_80k_rows_20k_items_stays_small():
    rng = np.random.default_rng(0)
    m, n = 20000, 80000
    item = np.repeat(np.arange(m), 4)
    xa, xb = np.tile([-0.5, -0.5, 0.5, 0.5], m), np.tile([-0.5, 0.5, -0.5, 0.5], m)
    u = rng.normal(size=(m, 3))
    y = u[item, 0] + (0.3 + u[item, 1]) * xa + (0.1 + u[item, 2]) * xb + 0.2 * xa * xb + rng.normal(size=n)
    data = pd.DataFrame({"item": item, "a": np.where(xa < 0, "a1", "a2"), "b": np.where(xb < 0, "b1", "b2"),
                         "y": y})
    tracemalloc.start()
    try:
        out = fit(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.converged and out.structure == "a*b + (1 + a + b || item)"
    assert peak < 2 * 2**30, f"peak {peak / 2**30:.2f} GiB"
    assert out.fixed["estimate"].iloc[3] == pytest.approx(0.2, abs=0.05)
