"""The LMM's refits reuse what the first fit computed (issue 24, item 1), and its model comparisons are between
nested structures by construction; bad requests (a non-nested comparison, CIs on a singular or unfitted model,
``--simple`` naming no factor) end in one line, exit 2, or a one-line warning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fis_interventions.cli import main
from fis_interventions.errors import FisError
from fis_interventions.stats import lmm_2x2, prepare_2x2
from fis_interventions.stats import lmm as lmm_module
from fis_interventions.stats import mixed, profile
from fis_interventions.stats.compare import lrt, nested
from fis_interventions.stats.lmm import lmm_design
from fis_interventions.stats.structure import SLOTS, initial_structure, simplify
from synthetic_designs import crossed_design


def _data(n_items: int = 16, prompts: int = 0, seed: int = 5, slopes: bool = False) -> pd.DataFrame:
    """Items x 4 cells (x prompts), 2 replicates; item intercepts only unless ``slopes`` (then singular
    simplifications are rare)."""
    rng = np.random.default_rng(seed)
    rows = []
    u = rng.normal(size=(n_items, 4)) * ([1.0, 0.8, 0.8, 0.6] if slopes else [1.0, 0, 0, 0])
    for i in range(n_items):
        for c in range(4):
            xa, xb = (0.5 if c >= 2 else -0.5), (0.5 if c % 2 else -0.5)
            for p in range(max(prompts, 1)):
                for _ in range(2):
                    y = u[i, 0] + u[i, 1] * xa + u[i, 2] * xb + u[i, 3] * xa * xb + rng.normal()
                    rows.append({"item": f"i{i}", "A": "a2" if xa > 0 else "a1", "B": "b2" if xb > 0 else "b1",
                                 "prompt": f"p{p}", "y": y})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("random", ["correlated", "uncorrelated", "intercept", "varcomp"])
@pytest.mark.parametrize("prompts,role", [(0, "auto"), (3, "auto"), (6, "auto"), (3, "random")])
def test_every_simplification_is_nested_in_the_requested_model(random, prompts, role):
    """The CLI and the report compare a model only with the one asked for after the rule dropped terms: walk the
    rule with every variance at zero (the longest chain) and check each step is nested in the request."""
    data = _data(n_items=8, prompts=prompts)
    design = prepare_2x2(data, "y", "A", "B", item="item", extra_random="prompt" if prompts else None)
    requested = initial_structure(design.data, random, "item", "prompt" if prompts else None, role)
    structure, steps = requested, 0
    while True:
        every_term = [(f.label, t) for f in structure.factors for t in SLOTS if t in f.terms]
        step = simplify(structure, every_term)
        if step is None:
            break
        structure = step[0]
        steps += 1
        assert nested(structure, requested), (random, prompts, role, structure)
        assert not nested(requested, structure)  # a real simplification: strictly smaller
    assert steps >= (0 if random in ("intercept", "varcomp") else 1)


def test_non_nested_comparison_reaches_the_cli_as_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """Were a comparison ever built between non-nested models, `fis stats` would refuse it (one line, exit 2,
    no JSON written), not print a meaningless chi-square."""
    path = tmp_path / "d.csv"
    _data().to_csv(path, index=False)
    out = tmp_path / "s.json"

    def broken(structure, zero):  # a "simplification" to a random factor the request does not have
        f = structure.factors[0]
        if f.label != "item":
            return None
        renamed = f.__class__(f.group, "item_copy", ("1",), "diagonal")
        return structure.__class__(factors=(renamed,), steps=("renamed the item factor",)), "renamed"

    data = _data()
    design = prepare_2x2(data, "y", "A", "B", item="item")
    small = initial_structure(design.data, "intercept", "item", None)
    one_slope = small.__class__(factors=(small.factors[0].__class__("item", "item", ("1", "xa"), "diagonal"),))
    other = small.__class__(factors=(small.factors[0].__class__("item", "item", ("1", "xb"), "diagonal"),))
    with pytest.raises(FisError, match="not nested"):
        lrt(design, one_slope, other)
    monkeypatch.setattr(lmm_module, "simplify", broken)
    code = main(["stats", str(path), "--dv", "y", "--factor", "A", "--factor", "B", "--item", "item",
                 "--json", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not nested" in err[0], err
    assert not out.exists()


def test_refits_reuse_the_first_fit(monkeypatch):
    """A singular maximal fit simplified once, with its LRT: each structure's cross-products are built once (the
    ML refit reuses the REML fit's), and the Satterthwaite df are computed once, for the reported fit only."""
    built, sat = [], []
    real_init, real_sat = profile.ProfiledDeviance.__init__, mixed._satterthwaite

    def count_init(self, *args, **kwargs):
        built.append(1)
        real_init(self, *args, **kwargs)

    def count_sat(*args, **kwargs):
        sat.append(1)
        return real_sat(*args, **kwargs)

    monkeypatch.setattr(profile.ProfiledDeviance, "__init__", count_init)
    monkeypatch.setattr(mixed, "_satterthwaite", count_sat)
    res = lmm_2x2(_data(), "y", "A", "B", "item")
    structures = 1 + len(res.simplification)
    assert res.simplification and len(res.comparisons) == len(res.simplification)
    assert len(built) == structures and len(sat) == 1


def test_maximal_model_is_refitted_by_ml_once(monkeypatch):
    """Several simplification steps each get an LRT against the maximal model; that model's ML refit is done
    once and shared (one ML fit per structure)."""
    ml = []
    real = mixed.fit_mixed

    def count(*args, **kwargs):
        if kwargs.get("reml") is False:
            ml.append(kwargs.get("problem"))
        return real(*args, **kwargs)

    monkeypatch.setattr(mixed, "fit_mixed", count)
    monkeypatch.setattr(lmm_module, "fit_mixed", count)
    import fis_interventions.stats.compare as compare_module
    monkeypatch.setattr(compare_module, "fit_mixed", count)
    res = lmm_2x2(_data(), "y", "A", "B", "item", random="correlated")
    assert len(res.comparisons) == len(res.simplification) >= 2
    assert len(ml) == len(res.simplification) + 1 == len({id(p) for p in ml})
    maximal = {c["loglik_maximal"] for c in res.comparisons}
    assert len(maximal) == 1


def test_warm_started_lrt_equals_a_cold_one():
    """The LRT reported with a simplification (ML refits warm-started from the REML estimates, sharing their
    cross-products) equals lrt() run from lme4's start on fresh matrices."""
    design = prepare_2x2(_data(), "y", "A", "B", item="item")
    fit = lmm_design(design)
    assert fit.comparisons
    requested = initial_structure(design.data, "uncorrelated", "item", None)
    cold = lrt(design, fit.fitted_structure, requested)
    warm = fit.comparisons[-1]
    assert warm["loglik_simplified"] == pytest.approx(cold["small"]["logLik"], abs=1e-6)
    assert warm["loglik_maximal"] == pytest.approx(cold["large"]["logLik"], abs=1e-6)
    assert warm["chisq"] == pytest.approx(cold["chisq"], abs=1e-5)


def test_variance_ci_requests_that_cannot_be_met(tmp_path, capsys):
    """--variance-ci: on a correlated fit (kept correlated: not singular), exit 2 with one line; on a singular fit, the CIs with a one-line
    warning; on a model that could not be fitted, a one-line warning and no CIs."""
    path = tmp_path / "d.csv"
    data = _data(slopes=True)
    data.to_csv(path, index=False)
    base = ["stats", str(path), "--dv", "y", "--factor", "A", "--factor", "B", "--item", "item", "--variance-ci"]
    out = tmp_path / "c.json"
    code = main(base + ["--random", "correlated", "--json", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "uncorrelated or intercept-only" in err[0] and not out.exists()
    flat = data.assign(y=data["y"] - data.groupby("item")["y"].transform("mean"))  # no item variance at all
    flat.to_csv(path, index=False)
    out = tmp_path / "s.json"
    assert main(base + ["--random", "intercept", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["lmm"]["singular"] and res["variance_ci"][0]["lower"] == 0.0
    assert sum("profile CIs on a singular fit" in w for w in res["warnings"]) == 1
    constant = data.assign(y=1.0)
    constant.to_csv(path, index=False)
    out = tmp_path / "k.json"
    assert main(base + ["--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["variance_ci"] == [] and any("profile CIs" in w and "not computed" in w for w in res["warnings"])
    capsys.readouterr()


@pytest.mark.parametrize("name", ["C", "item", "y", "a1", "formality"])
def test_simple_naming_no_factor_is_one_line_exit_2(tmp_path, capsys, name):
    path = tmp_path / "d.csv"
    _data().to_csv(path, index=False)
    out = tmp_path / "s.json"
    code = main(["stats", str(path), "--dv", "y", "--factor", "A", "--factor", "B", "--item", "item",
                 "--simple", "A", "--simple", name, "--json", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--simple" in err[0] and f"'{name}'" in err[0] and "(A, B)" in err[0]
    assert not out.exists()


def test_report_simple_effects_come_from_the_tests_own_fits(tmp_path, monkeypatch):
    """The report's simple effects of significant primary interactions are contrasts of the fit each test already
    had (Analysis.simple): the same numbers as a refit, and no LMM is fitted again to get them."""
    from test_report_verdict import _run

    from fis_interventions.reports.analysis import KEYS, analyze_run
    from fis_interventions.reports.simple_effects import primary_simple_effects
    from fis_interventions.reports.runfolder import load_run

    run = load_run(_run(tmp_path / "r"))
    analysis = analyze_run(run, workers=1)
    refit = primary_simple_effects(run, analysis.tests, KEYS)
    assert refit and not analysis.simple.empty

    def no_refit(*args, **kwargs):
        raise AssertionError("the primary LMM was refitted for simple effects")

    monkeypatch.setattr(lmm_module, "lmm_design", no_refit)
    stored = primary_simple_effects(run, analysis.tests, KEYS, stored=analysis.simple)
    assert len(stored) == len(refit)
    for s, r in zip(stored, refit):
        assert s["test"] == r["test"] and s["factor"] == r["factor"] and s["at"] == r["at"]
        for k in ("estimate", "se", "df", "p", "p_holm", "ci_low", "ci_high"):
            assert s[k] == pytest.approx(r[k], rel=1e-6, abs=1e-12), k



@pytest.mark.parametrize("items,seed", [(100, 1), (150, 0), (200, 2)])
def test_a_zero_variance_that_is_a_saddle_is_left(items, seed):
    """From lme4's start L-BFGS-B stopped at zero relative SDs on crossed designs like bench/stats_speed.py's
    (the deviance is even in a relative SD, so its gradient is exactly 0 at 0): fits 2-30 logLik units below
    the optimum were called singular and simplified (on the 600-item benchmark design the item A:B slope was
    dropped, logLik 0.497 too low). Now each zero is probed and left when the deviance falls: the default fit
    reaches the optimum that several other starts reach."""
    from fis_interventions.stats.lmm import _problem

    design = prepare_2x2(crossed_design(seed=seed, items=items), "y", "A", "B", item="item", extra_random="prompt")
    problem = _problem(design.data, initial_structure(design.data, "uncorrelated", "item", "prompt"))
    fit = mixed.fit_mixed(None, None, None, df=False, problem=problem)
    assert fit.optimizers["L-BFGS-B"]["boundary_restarts"] >= 1
    others = [mixed.fit_mixed(None, None, None, df=False, problem=problem, start=np.full(8, v)).loglik
              for v in (0.2, 0.5, 2.0)]
    assert fit.loglik == pytest.approx(max(others), abs=1e-4)
    assert fit.loglik >= max(others) - 1e-6


def test_a_true_zero_variance_is_kept_with_no_restart():
    """Data without any slope variance: the probes find nothing lower, the fit stays singular and is simplified."""
    res = lmm_2x2(_data(), "y", "A", "B", "item")
    assert res.simplification and "boundary_restarts" not in res.optimizers["L-BFGS-B"]
