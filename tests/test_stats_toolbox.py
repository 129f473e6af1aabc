"""Simple effects, likelihood-ratio tests between random structures and profile CIs of variance components,
against R (emmeans, anova(m1, m2), confint(method = "profile")) in tests/golden/factorial_slopes.toolbox.json;
the high-ICC Satterthwaite df (issue 21) against the balanced design's analytic df."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fis_interventions.errors import FisError
from fis_interventions.stats import lmm_2x2, prepare_2x2, simple_effects
from fis_interventions.stats.compare import lrt, profile_ci
from fis_interventions.stats.lmm import lmm_design
from fis_interventions.stats.simple import simple_effects_design
from fis_interventions.stats.structure import initial_structure

GOLDEN = Path(__file__).resolve().parent / "golden"
LEVELS = {"formality": ["formal", "informal"], "emotion": ["neutral", "emotional"]}


@pytest.fixture(scope="module")
def golden():
    data = pd.read_csv(GOLDEN / "factorial_slopes.csv")
    ref = json.loads((GOLDEN / "factorial_slopes.toolbox.json").read_text())
    design = prepare_2x2(data, "logit_shift", "formality", "emotion", item="item", levels=LEVELS)
    return data, ref, design


@pytest.fixture(scope="module")
def lmm(golden):
    _, _, design = golden
    fit = lmm_design(design, random="uncorrelated")
    assert fit.structure.endswith("(1 + formality + emotion + formality:emotion || item)")
    return fit


@pytest.mark.parametrize("factor,key,by", [("formality", "simple_formality_by_emotion", "emotion"),
                                           ("emotion", "simple_emotion_by_formality", "formality")])
def test_simple_effects_equal_emmeans(golden, lmm, factor, key, by):
    _, ref, design = golden
    ours = simple_effects_design(design, lmm, factor)
    assert len(ours) == len(ref[key]) == 2
    for (_, row), r in zip(ours.iterrows(), ref[key]):
        assert row["contrast"] == r["contrast"] and row["at"] == r[by]
        assert row["estimate"] == pytest.approx(r["estimate"], abs=1e-6)
        assert row["se"] == pytest.approx(r["SE"], rel=1e-5)
        assert row["df"] == pytest.approx(r["df"], rel=1e-3)
        assert row["ci_low"] == pytest.approx(r["lower.CL"], abs=1e-5)
        assert row["ci_high"] == pytest.approx(r["upper.CL"], abs=1e-5)
        assert row["p"] == pytest.approx(r["p.value"], rel=1e-3)
    # Holm across the two levels of the other factor: the smaller p doubled, the larger at least that
    p = sorted(ours["p"])
    assert sorted(ours["p_holm"]) == pytest.approx([min(1, 2 * p[0]), max(min(1, 2 * p[0]), p[1])])


def test_simple_effects_api_and_unknown_factor(golden):
    data, ref, _ = golden
    table = simple_effects(data, "logit_shift", ["formality", "emotion"], "formality", item="item", levels=LEVELS)
    assert table["estimate"].tolist() == pytest.approx([r["estimate"] for r in ref["simple_formality_by_emotion"]],
                                                       abs=1e-6)
    with pytest.raises(FisError, match="not one of the two factors"):
        simple_effects(data, "logit_shift", ["formality", "emotion"], "formalty", item="item")


def test_lrt_equals_r_anova(golden):
    _, ref, design = golden
    small = initial_structure(design.data, "intercept", "item", None)
    large = initial_structure(design.data, "uncorrelated", "item", None)
    out = lrt(design, small, large)
    r_int, r_max = ref["lrt_intercept_vs_maximal"]
    for ours, r in [(out["small"], r_int), (out["large"], r_max)]:
        assert ours["npar"] == r["npar"]
        assert ours["logLik"] == pytest.approx(r["logLik"], abs=1e-5)
        assert ours["AIC"] == pytest.approx(r["AIC"], abs=1e-4)
        assert ours["BIC"] == pytest.approx(r["BIC"], abs=1e-4)
    assert out["chisq"] == pytest.approx(r_max["Chisq"], abs=1e-4)
    assert out["df"] == r_max["Df"]
    assert out["p"] == pytest.approx(r_max["Pr(>Chisq)"], rel=1e-3)
    with pytest.raises(FisError, match="not nested"):
        lrt(design, large, initial_structure(design.data, "correlated", "item", None).__class__(
            factors=(large.factors[0].__class__("item", "other", ("1",), "diagonal"),)))


def test_profile_ci_equals_r_confint(golden):
    _, ref, design = golden
    structure = initial_structure(design.data, "uncorrelated", "item", None)
    rows, notes = profile_ci(design, structure)
    r = {x["term"]: x for x in ref["profile_ci"]}
    names = ["sd_(Intercept)|item", "sd_xa|item", "sd_xb|item", "sd_xab|item", "sigma"]
    assert notes == []
    for row, name in zip(rows, names):
        assert row["lower"] == pytest.approx(r[name]["lower"], abs=1e-3), name
        assert row["upper"] == pytest.approx(r[name]["upper"], abs=1e-3), name
        assert row["lower"] < row["sd"] < row["upper"]


def _balanced_high_icc(items: int = 30, reps: int = 1, sd_item: float = 100.0, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    it = np.repeat(np.arange(items), 4 * reps)
    cell = np.tile(np.repeat(np.arange(4), reps), items)
    xa, xb = np.where(cell >= 2, 0.5, -0.5), np.where(cell % 2 == 1, 0.5, -0.5)
    y = 0.3 * xa + 0.2 * xb + sd_item * rng.normal(size=items)[it] + rng.normal(size=it.size)
    return pd.DataFrame({"item": it, "A": np.where(xa > 0, "a2", "a1"), "B": np.where(xb > 0, "b2", "b1"), "y": y})


@pytest.mark.parametrize("sd_item,reps", [(10.0, 1), (100.0, 1), (100.0, 2), (1000.0, 1)])
def test_high_icc_intercept_df_is_items_minus_one(sd_item, reps):
    """Balanced random-intercept design: the intercept's Satterthwaite df is n_items - 1 exactly (the intercept
    is a mean of item means), the within-item effects' df the within-item residual df (issue 21: was 116)."""
    items = 30
    res = lmm_2x2(_balanced_high_icc(items, reps, sd_item), "y", "A", "B", "item", random="intercept")
    df = res.fixed.set_index("term")["df"]
    assert df["Intercept"] == pytest.approx(items - 1, rel=1e-3)
    within = items * 4 * reps - items - 3
    for term in ["A", "B", "A:B"]:
        assert df[term] == pytest.approx(within, rel=1e-3)
    assert not any("Hessian" in w for w in res.warnings)


def _small(tmp_path: Path, n_items: int = 12, prompts: int = 0, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_items):
        for c in range(4):
            for p in range(max(prompts, 1)):
                rows.append({"item": f"i{i}", "A": "a2" if c >= 2 else "a1", "B": "b2" if c % 2 else "b1",
                             "prompt": f"p{p}", "y": rng.normal() + (0.8 if c == 3 else 0.0)})
    return pd.DataFrame(rows)


def test_cli_simple_bad_factor_is_one_line_exit_2(tmp_path, capsys):
    from fis_interventions.cli import main

    path = tmp_path / "d.csv"
    _small(tmp_path).to_csv(path, index=False)
    base = [str(path), "--dv", "y", "--factor", "A", "--factor", "B", "--item", "item"]
    assert main(["stats", *base, "--simple", "C", "--random", "intercept"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--simple" in err[0] and "not one of the two factors" in err[0]
    assert main(["stats", *base, "--simple", "A", "--random", "intercept"]) == 0
    out = capsys.readouterr().out
    assert "Simple effects" in out and "a2 - a1" in out


def test_variance_ci_on_correlated_or_singular(golden, tmp_path):
    from fis_interventions.stats import stats

    _, _, design = golden
    with pytest.raises(FisError, match="uncorrelated or intercept-only"):
        profile_ci(design, initial_structure(design.data, "correlated", "item", None))
    data = _small(tmp_path)
    data["y"] = data["y"] - data.groupby("item")["y"].transform("mean")  # item means equal: variance 0
    res = stats(data, "y", ["A", "B"], item="item", random="intercept", variance_ci=True)
    assert res["lmm"]["singular"]
    assert any("singular fit" in w and "profile CIs" in w for w in res["warnings"])
    assert res["variance_ci"][0]["lower"] == 0.0 and res["variance_ci"][0]["upper"] > 0


@pytest.mark.parametrize("role,n_prompts,expected", [("auto", 3, "fixed"), ("auto", 6, "random"),
                                                     ("random", 3, "random"), ("fixed", 6, "fixed")])
def test_prompt_role_is_explicit_and_explained(tmp_path, role, n_prompts, expected):
    from fis_interventions.stats import stats

    data = _small(tmp_path, n_items=8, prompts=n_prompts)
    res = stats(data, "y", ["A", "B"], item="item", random="intercept", prompt="prompt", prompt_role=role)
    assert res["lmm"]["prompts"] == expected
    reason = res["lmm"]["prompt_reason"]
    assert ("default rule" in reason) == (role == "auto") and f"{n_prompts} levels" in reason
    assert ("crossed random" in reason) == (expected == "random")
    with pytest.raises(FisError, match="--prompt-role"):
        stats(data, "y", ["A", "B"], item="item", prompt="prompt", prompt_role="sometimes")


def test_simplification_reports_lrt(golden):
    """A singular maximal fit is simplified; each step carries R's anova-style LRT against the maximal model."""
    rng = np.random.default_rng(5)
    data = _small(None, n_items=20)
    data["y"] = rng.normal(size=len(data)) + np.repeat(rng.normal(size=20), 4)  # no slope variance at all
    res = lmm_2x2(data, "y", "A", "B", "item")
    assert res.simplification and len(res.comparisons) == len(res.simplification)
    for c in res.comparisons:
        assert c["df"] >= 1 and 0 <= c["chisq"] < 3.84 and c["p"] > 0.05
        assert c["chisq"] == pytest.approx(2 * (c["loglik_maximal"] - c["loglik_simplified"]), abs=1e-9)


def test_duplicate_columns_and_bad_value_rows(tmp_path, capsys):
    from fis_interventions.cli import main

    dup = tmp_path / "dup.csv"
    dup.write_text("item,A,B,y,y\ni1,a1,b1,1,2\n")
    assert main(["stats", str(dup), "--dv", "y", "--factor", "A", "--factor", "B"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'y' appears more than once" in err[0]
    big = tmp_path / "big.csv"
    data = _small(tmp_path, n_items=2000)
    data["y"] = data["y"].astype(object)
    data.loc[7000, "y"] = "n/a?"
    data.to_csv(big, index=False)
    assert main(["stats", str(big), "--dv", "y", "--factor", "A", "--factor", "B"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # no DtypeWarning line before the error
    assert "'n/a?'" in err[0] and "row 7002" in err[0] and "'y'" in err[0]  # CSV line 7002 (header is line 1)


def test_type3_anova_keeps_digits_at_large_mean():
    """Mean 1e6, SD 1e-4: F equals numpy lstsq on the exactly shifted data (was 8e-5 relative off)."""
    from fis_interventions.stats import anova_2x2

    rng = np.random.default_rng(0)
    n = 400
    xa, xb = rng.choice([-0.5, 0.5], n), rng.choice([-0.5, 0.5], n)
    y = 1e6 + 1e-4 * (rng.normal(size=n) + 0.3 * xa + 0.2 * xb + 0.4 * xa * xb)
    data = pd.DataFrame({"A": np.where(xa > 0, "a2", "a1"), "B": np.where(xb > 0, "b2", "b1"), "y": y})
    table = anova_2x2(data, "y", "A", "B", levels={"A": ["a1", "a2"], "B": ["b1", "b2"]}).set_index("term")
    X = np.column_stack([np.ones(n), xa, xb, xa * xb])
    yc = y - 1e6  # exact (Sterbenz)
    rss = float(np.sum((yc - X @ np.linalg.lstsq(X, yc, rcond=None)[0]) ** 2))
    for j, term in [(1, "A"), (2, "B"), (3, "A:B")]:
        Xr = np.delete(X, j, axis=1)
        rss_r = float(np.sum((yc - Xr @ np.linalg.lstsq(Xr, yc, rcond=None)[0]) ** 2))
        F = (rss_r - rss) / (rss / (n - 4))
        assert table.loc[term, "F"] == pytest.approx(F, rel=1e-9)


def test_report_hook_lists_simple_effects_of_significant_interactions(golden):
    from fis_interventions.reports.simple_effects import simple_effects_for_tests

    data, ref, _ = golden
    tests = pd.DataFrame({"label": ["sig", "not"], "q": [0.01, 0.5]})
    spec = {"a": "formality", "b": "emotion", "levels": LEVELS}
    calls = []

    def rows_of(row):
        calls.append(row["label"])
        return data.rename(columns={"logit_shift": "shift"}), spec

    effects = simple_effects_for_tests(tests, rows_of)
    assert calls == ["sig"] and len(effects) == 4 and {e["test"] for e in effects} == {"sig"}
    assert effects[0]["estimate"] == pytest.approx(ref["simple_formality_by_emotion"][0]["estimate"], abs=1e-6)


def test_fis_stats_imports_no_torch(tmp_path):
    """`fis stats` (help and a small fit) never imports torch or transformers (start-up time, issue 24)."""
    import subprocess
    import sys

    path = tmp_path / "d.csv"
    _small(tmp_path).to_csv(path, index=False)
    code = ("import sys\nfrom fis_interventions.cli import main\n"
            f"main(['stats', {str(path)!r}, '--dv', 'y', '--factor', 'A', '--factor', 'B', '--item', 'item'])\n"
            "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
