"""`fis power`: the balanced closed form equals full REML fits, simulated power equals the exact noncentral-t
power where that is exact, pilots are read from fis stats JSON and battery runs, and bad settings exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from fis_interventions.cli import main
from fis_interventions.errors import FisError
from fis_interventions.planning import power
from fis_interventions.reports.synthetic import PLANTED, write_synthetic_run
from fis_interventions.stats.power import PowerSpec, _fit_test, closed_form_test, power_curve, simulate

GOLDEN = Path(__file__).resolve().parent / "golden"


@pytest.mark.parametrize("spec", [
    PowerSpec(0.3, 1.0, var_item=1.0, var_a=0.5, var_b=0.5, var_ab=0.5, reps=2),
    PowerSpec(0.3, 1.0, var_item=0.1, var_a=0.05, reps=2),                   # slopes pooled with the residual
    PowerSpec(0.3, 1.0, var_item=0.0, var_a=0.1, var_b=0.1, reps=1),          # one observation per cell
    PowerSpec(0.3, 1.0, var_item=0.5, var_a=0.2, var_b=0.2, var_ab=0.1, prompts=3, var_prompt=1.0),
], ids=["maximal", "pooled", "one-per-cell", "fixed-prompts"])
def test_closed_form_equals_full_fits(spec):
    y = simulate(spec, 10, 6, np.random.default_rng(1))
    est, F, df = closed_form_test(y, spec.prompts)
    est2, F2, df2 = _fit_test(y, spec.prompts)
    np.testing.assert_allclose(est, est2, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(F, F2, rtol=1e-5)
    np.testing.assert_allclose(df, df2, rtol=5e-3)  # near-boundary variances move lmerTest's df a little


def test_simulated_power_equals_noncentral_t_power():
    # one observation per cell, large A/B/item variances (never pooled): the primary test is the one-sample t
    # test of the per-item interaction contrasts, whose power is exact (noncentral t, df N - 1)
    n, sims, var_resid = 16, 4000, 1.0
    for k, effect in enumerate([0.0, 0.5, 1.0, 1.6]):
        spec = PowerSpec(effect, var_resid, var_item=20.0, var_a=20.0, var_b=20.0, reps=1)
        curve = power_curve(spec, [n], n_sims=sims, seed=k)
        sd = np.sqrt(4 * var_resid)                     # Var(c_i) = 4 sigma2 for one observation per cell
        nc = effect / (sd / np.sqrt(n))
        crit = sps.t.ppf(0.975, n - 1)
        exact = sps.nct.sf(crit, n - 1, nc) + sps.nct.cdf(-crit, n - 1, nc)
        mc_se = np.sqrt(exact * (1 - exact) / sims)
        assert abs(curve["power"].iloc[0] - exact) < 3.5 * mc_se + 1e-3, (effect, curve["power"].iloc[0], exact)
        assert curve["median_df"].iloc[0] == n - 1
        assert curve["ci_low"].iloc[0] <= curve["power"].iloc[0] <= curve["ci_high"].iloc[0]


def test_power_grows_with_items_and_is_reproducible():
    spec = PowerSpec(0.8, 1.0, var_item=0.5, var_a=0.3, var_b=0.3, var_ab=0.3, reps=2)
    a = power_curve(spec, [8, 24, 64], n_sims=800, seed=3)
    b = power_curve(spec, [8, 24, 64], n_sims=800, seed=3)
    assert a.equals(b)
    assert a["power"].is_monotonic_increasing and a["power"].iloc[-1] > 0.8


def test_cli_from_stats_json(tmp_path, capsys):
    stats_json = tmp_path / "pilot.json"
    assert main(["stats", str(GOLDEN / "factorial_slopes.csv"), "--dv", "logit_shift", "--factor", "formality",
                 "--factor", "emotion", "--item", "item", "--json", str(stats_json)]) == 0
    out = tmp_path / "power"
    assert main(["power", str(stats_json), "--items", "12,40,120", "--sims", "300", "--seed", "7",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "items for 80% power" in text
    result = json.loads((out / "power.json").read_text())
    ref = json.loads((GOLDEN / "factorial_slopes.r.json").read_text())["lmm_slopes_uncorrelated"]
    assert result["seed"] == 7 and result["n_sims"] == 300 and result["engine"] == "closed"
    assert result["spec"]["effect"] == pytest.approx(ref["fixed"][3]["estimate"], rel=1e-5)
    assert result["spec"]["var_ab"] == pytest.approx(ref["varcorr"][3]["vcov"], rel=1e-3)
    assert result["spec"]["reps"] == 3 and [r["n_items"] for r in result["curve"]] == [12, 40, 120]
    assert (out / "power.png").stat().st_size > 1000 and (out / "power.csv").is_file()
    # the fingerprint rule: other settings refused (one line, exit 2) unless --overwrite; a user's file is kept
    args = ["power", str(stats_json), "--items", "12,40", "--sims", "300", "--seed", "7", "--out", str(out)]
    capsys.readouterr()
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert [r["n_items"] for r in json.loads((out / "power.json").read_text())["curve"]] == [12, 40]
    (out / "notes.txt").write_text("mine")
    assert main([*args, "--overwrite"]) == 2 and (out / "notes.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    return write_synthetic_run(tmp_path_factory.mktemp("pilot") / "run", seed=0, n_items=8, n_prompts=2,
                               values=(4.0,), extras=False)


def test_pilot_from_a_battery_run(run_folder):
    select = {"feature": PLANTED["feature"], "readout": PLANTED["readout"]}
    result = power(run_folder, items=[8, 16], sims=200, select=select)
    assert result["spec"]["prompts"] == 2 and result["spec"]["effect"] > 1.0
    assert "prompt" in result["model"] and result["curve"][1]["power"] > 0.5
    # the test was picked among the run's 6 (no pre-registered primary): its effect may be inflated
    assert any("one of 6 tests" in w and "--sesoi" in w for w in result["warnings"])
    assert result["family_size"] == 1 and result["alpha_used"] == 0.05 and result["effect_source"] == "pilot"


def test_sesoi_and_family_size_make_power_honest(run_folder):
    select = {"feature": PLANTED["feature"], "readout": PLANTED["readout"]}
    plain = power(run_folder, items=[16], sims=200, select=select, sesoi=1.0)
    fam = power(run_folder, items=[16], sims=200, select=select, sesoi=1.0, family_size=10)
    assert plain["spec"]["effect"] == 1.0 and plain["effect_source"] == "sesoi"
    assert not any("inflated" in w for w in plain["warnings"])
    assert fam["alpha_used"] == pytest.approx(0.005) and any("0.05/10" in w for w in fam["warnings"])
    assert fam["curve"][0]["power"] < plain["curve"][0]["power"]


def test_dropped_variance_terms_are_named():
    from fis_interventions.planning import dropped_terms

    result = {"lmm": {"simplification": ["dropped A:B slope (zero variance)"], "singular": True,
                      "random_effects": [{"group": "item", "term1": "(Intercept)", "term2": None, "vcov": 0.4},
                                         {"group": "item", "term1": "a:b", "term2": None, "vcov": 0.0},
                                         {"group": "Residual", "term1": None, "term2": None, "vcov": 1.0}]}}
    notes = dropped_terms(result)
    assert notes[0].startswith("dropped A:B") and "a:b (item)" in notes[1]
    assert dropped_terms({"lmm": {"random_effects": [{"group": "item", "term1": "(Intercept)", "term2": None,
                                                      "vcov": 0.4}]}}) == []


@pytest.mark.parametrize("args, field", [
    (["--effect", "0.3", "--var-resid", "1", "--items", "1,12"], "--items"),
    (["--effect", "0.3", "--var-resid", "1", "--var-ab", "-0.1"], "--var-ab"),
    (["--effect", "nan", "--var-resid", "1"], "--effect"),
    (["--var-resid", "1"], "--effect"),
    (["--effect", "0.3", "--var-resid", "0"], "--var-resid"),
    (["--effect", "0.3", "--var-resid", "1", "--items", "a,b"], "--items"),
])
def test_impossible_settings_exit_2(args, field, capsys):
    assert main(["power", *args, "--sims", "50"]) == 2
    err = capsys.readouterr().err.strip()
    assert field in err and len(err.splitlines()) == 1 and "fix:" in err


def test_pilot_run_without_the_contrast_exits_2(run_folder, capsys):
    assert main(["power", str(run_folder), "--readout", "no_such_contrast"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--readout" in err and len(err.splitlines()) == 1
    with pytest.raises(FisError, match="tests of the pilot run match"):
        power(run_folder, sims=20)  # several tests: the pilot must name one


def test_stats_json_without_lmm_is_refused(tmp_path):
    path = tmp_path / "nolmm.json"
    path.write_text(json.dumps({"factors": ["a", "b"], "lmm": None}))
    with pytest.raises(FisError, match="no fitted mixed model"):
        power(path, sims=20)
