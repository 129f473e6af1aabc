"""Degenerate data gives warnings and JSON-safe output (no NaN, no crash); user mistakes raise FisError."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fis_interventions.errors import FisError
from fis_interventions.stats import analyze_2x2, interaction_contrast, lmm_2x2

GOLDEN = Path(__file__).resolve().parent / "golden"
ARGS = ("logit_shift", "formality", "emotion")


@pytest.fixture(scope="module")
def golden() -> pd.DataFrame:
    assert (GOLDEN / "factorial_items.csv").is_file(), f"golden data missing at {GOLDEN}"
    return pd.read_csv(GOLDEN / "factorial_items.csv")


def run(df: pd.DataFrame, **kw) -> dict:
    out = analyze_2x2(df, *ARGS, **kw)
    json.dumps(out, allow_nan=False)  # raises on any NaN/inf left in the output
    return out


def test_full_shape(golden):
    out = run(golden, item="item", random="intercept")
    assert [r["term"] for r in out["anova"]] == ["formality", "emotion", "formality:emotion"]
    assert [r["term"] for r in out["lmm"]["fixed"]] == ["Intercept", "formality", "emotion",
                                                       "formality:emotion"]
    assert set(out["anova"][0]) >= {"term", "ss", "df1", "df2", "F", "p", "partial_eta2"}
    assert (out["n"], out["n_items"], out["warnings"]) == (240, 30, [])
    assert out["lmm"]["method"] == "REML" and out["lmm"]["converged"] is True
    inter = out["contrast"]["interaction"]
    means = {(c["formality"], c["emotion"]): c["mean"] for c in out["contrast"]["cells"]}
    dod = (means["informal", "emotional"] - means["formal", "emotional"]) - (
        means["informal", "neutral"] - means["formal", "neutral"])
    assert inter["estimate"] == pytest.approx(dod, rel=1e-10) == pytest.approx(0.48625956667, rel=1e-6)
    assert inter["ci_low"] < inter["estimate"] < inter["ci_high"]
    std = inter["estimate"] / np.sqrt(out["lmm"]["item_var"] + out["lmm"]["resid_var"])
    assert out["contrast"]["effect_sizes"]["standardized_interaction"] == pytest.approx(std)
    # balanced: every estimated cell mean is the observed mean; its SE is sqrt((item_var + resid/2)/30)
    cell = out["contrast"]["cells"][0]
    assert cell["mean"] == pytest.approx(cell["observed_mean"], rel=1e-9)
    se = np.sqrt((out["lmm"]["item_var"] + out["lmm"]["resid_var"] / 2) / 30)
    assert cell["se"] == pytest.approx(se, rel=1e-8)


def test_without_items_uses_ols(golden):
    out = run(golden)
    assert out["rm_anova"] is None and out["lmm"] is None and out["n_items"] is None
    inter = out["contrast"]["interaction"]
    assert inter["source"] == "ols" and inter["df"] == 236
    # OLS t^2 of the interaction equals the Type III F
    assert inter["t"] ** 2 == pytest.approx(out["anova"][2]["F"], rel=1e-10)
    direct = interaction_contrast(golden, *ARGS)
    assert direct["interaction"]["estimate"] == pytest.approx(inter["estimate"])


def test_zero_variance(golden):
    out = run(golden.assign(logit_shift=1.0), item="item")
    assert any("zero variance" in w for w in out["warnings"])
    assert all(r["F"] is None and r["p"] is None for r in out["anova"])
    assert out["anova"][0]["ss"] == 0.0
    assert out["lmm"]["converged"] is False and out["lmm"]["fixed"][0]["estimate"] is None
    assert out["contrast"]["interaction"]["estimate"] is None


def test_missing_cell(golden):
    df = golden[~((golden.formality == "informal") & (golden.emotion == "emotional"))]
    out = run(df, item="item")
    assert any("has no observations" in w for w in out["warnings"])
    assert all(r["F"] is None for r in out["anova"] + out["rm_anova"])
    assert out["lmm"]["converged"] is False
    assert out["cell_counts"][3]["n"] == 0


def test_single_item(golden):
    out = run(golden[golden["item"] == "item000"], item="item")
    assert any("need 2" in w for w in out["warnings"])
    assert out["lmm"]["converged"] is False and out["rm_anova"][0]["F"] is None
    assert out["anova"][0]["df2"] == 4 and out["anova"][0]["F"] is not None


def test_singular_fit_is_reported(golden):
    rng = np.random.default_rng(0)
    noise = rng.normal(size=len(golden))
    noise -= pd.Series(noise).groupby(golden["item"]).transform("mean").to_numpy()  # no item variance at all
    df = golden.assign(logit_shift=0.5 * (golden["formality"] == "informal") + noise)
    fit = lmm_2x2(df, *ARGS, item="item", random="intercept")
    assert fit.converged and fit.item_var == pytest.approx(0.0, abs=1e-6)
    assert any("singular fit" in w for w in fit.warnings)
    assert fit.optimizer is not None
    # with the item variance at zero the model is OLS: Satterthwaite gives n - 4
    assert fit.fixed["df"].to_numpy() == pytest.approx(236, rel=1e-5)


def test_nan_rows_dropped(golden):
    df = golden.copy()
    df.loc[:6, "logit_shift"] = np.nan
    out = run(df, item="item")
    assert out["n"] == 233
    assert "dropped 7 rows whose 'logit_shift' is missing" in out["warnings"]
    assert any("dropped 1 of 30 items" in w for w in out["warnings"])
    assert out["lmm"]["converged"] and out["n_items_complete"] == 29


def test_level_order(golden):
    first = run(golden)
    flipped = run(golden, levels={"formality": ["informal", "formal"]})
    assert first["levels"]["formality"] == ["formal", "informal"]
    a, b = first["contrast"]["interaction"]["estimate"], flipped["contrast"]["interaction"]["estimate"]
    assert b == pytest.approx(-a)
    assert flipped["anova"][2]["F"] == pytest.approx(first["anova"][2]["F"])
    appearance = run(golden.iloc[::-1])
    assert appearance["levels"]["emotion"] == ["emotional", "neutral"]


@pytest.mark.parametrize("change, kwargs, message", [
    (lambda d: d, {"dv": "nope"}, "column 'nope' not found"),
    (lambda d: d.assign(logit_shift="x"), {}, "measure column 'logit_shift' is not numeric"),
    (lambda d: d.assign(emotion=np.arange(len(d)) % 3), {}, "factor 'emotion' must have exactly two levels"),
    (lambda d: d, {"levels": {"emotion": ["neutral", "emotionl"]}}, "not among its levels"),
    (lambda d: d, {"levels": {"emotion": ["neutral"]}}, "two different values"),
    (lambda d: d, {"levels": {"mood": ["a", "b"]}}, "not a factor"),
    (lambda d: d, {"b": "formality"}, "same column"),
    (lambda d: d[d.formality == "formal"], {}, "exactly two levels, found 1"),
])
def test_user_errors(golden, change, kwargs, message):
    args = {"dv": "logit_shift", "a": "formality", "b": "emotion", **kwargs}
    with pytest.raises(FisError, match=message) as err:
        analyze_2x2(change(golden), **args)
    assert "\n" not in str(err.value) and "fix:" in str(err.value)
