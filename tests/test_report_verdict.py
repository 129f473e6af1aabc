"""The report's manipulation check, feature-vs-matched-controls test, families and verdict (synthetic runs)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
from scipy import stats as sps
import pandas as pd
import pytest

from fis_interventions.reports.analysis import analyze_run
from fis_interventions.reports.inference import detectable, power_at, readout_factor, verdicts
from fis_interventions.reports.runfolder import load_run
from fis_interventions.reports.synthetic import write_synthetic_run


def _run(root: Path, *, matched: bool = True, flip_clean: bool = False, primary: dict | None = None,
         hit_control: bool = False) -> Path:
    run = write_synthetic_run(root, seed=0, n_items=8, n_prompts=2, values=(4.0,))
    info = json.loads((run / "run.json").read_text())
    if matched:  # the no-effect feature 345 as the matched control of the top feature 12
        info["features"][1].update(role="matched_control", matched_to="12")
    if primary is not None:
        info["primary"] = primary
    (run / "run.json").write_text(json.dumps(info))
    if flip_clean or matched:
        with sqlite3.connect(run / "results.sqlite") as con:
            df = pd.read_sql_query("SELECT * FROM results", con)
            if matched:
                df.loc[df["feature"] == "345", "role"] = "matched_control"
            if flip_clean:  # the formality readout goes the wrong way on the clean model
                df.loc[df["readout"] == "formal_vs_casual", "score_clean"] *= -1
            df.to_sql("results", con, index=False, if_exists="replace")
        con.close()
    if hit_control:
        s = pd.read_csv(run / "screening.csv")
        s.loc[s["feature"] == 7, "q_ab"] = 0.01
        s.to_csv(run / "screening.csv", index=False)
    return run


def test_feature_beats_matched_controls_yes(tmp_path):
    a = analyze_run(load_run(_run(tmp_path / "r")))
    vs = a.vs_controls
    assert len(vs) == 1 and vs["feature"].iloc[0] == "12" and vs["controls"].iloc[0] == "345"
    truth = 3.0  # (4 - 1) x 1.0 planted in the feature, 0 in the control
    assert vs["ci_low"].iloc[0] < truth < vs["ci_high"].iloc[0] and vs["q"].iloc[0] < 0.05
    assert vs["kl_feature"].iloc[0] > 0 and vs["kl_controls"].iloc[0] > 0
    [v] = a.verdicts
    assert v["answer"] == "yes" and v["manipulation"] == "passed"
    assert "80% power for |effect| >=" in v["detail"]
    # a "yes" whose difference is smaller than the named smallest effect of interest says so
    run = load_run(tmp_path / "r")
    [big] = verdicts(run, a.tests, a.vs_controls, a.manipulation, {**a.primary, "sesoi": 100.0})
    assert big["answer"] == "yes" and "smaller than the smallest effect of interest (100)" in big["reason"], big
    [small] = verdicts(run, a.tests, a.vs_controls, a.manipulation, {**a.primary, "sesoi": 0.5})
    assert small["answer"] == "yes" and "smaller than" not in small["reason"]
    m = a.manipulation.set_index("readout")
    assert (m["status"] == "passed").all() and m.loc["formal_vs_casual", "factor"] == "formality"
    assert m.loc["formal_vs_casual", "formality_effect"] < 0 < m.loc["emotional_vs_neutral", "emotion_effect"]
    fams = a.tests.set_index("feature")["family"].to_dict()
    assert fams["12"] == "primary" or a.tests.query("feature == '12' and primary")["family"].iloc[0] == "primary"
    assert set(a.tests.query("feature == '345' and primary")["family"]) == {"controls"}


def test_manipulation_check_failure_makes_the_tests_uninterpretable(tmp_path):
    a = analyze_run(load_run(_run(tmp_path / "r", flip_clean=True)))
    m = a.manipulation.set_index("readout")
    assert m.loc["formal_vs_casual", "status"] == "failed" and "wrong way" in m.loc["formal_vs_casual", "note"]
    assert not a.tests.query("readout == 'formal_vs_casual'")["interpretable"].any()
    assert a.tests.query("readout == 'emotional_vs_neutral'")["interpretable"].all()
    [v] = a.verdicts
    assert v["answer"] == "inconclusive" and "manipulation check" in v["reason"]


def test_no_with_a_sesoi_and_a_screen_hit_control_is_an_alternative(tmp_path):
    # primary on the readout with no planted effect: the feature does not beat its control; with a generous
    # smallest effect of interest the CI lies inside it -> "no"
    primary = {"intervention": "scale", "value": 4.0, "position": "all", "readout": "emotional_vs_neutral",
               "sesoi": 20.0, "default": False}
    a = analyze_run(load_run(_run(tmp_path / "r", primary=primary, hit_control=True)))
    [v] = a.verdicts
    assert v["answer"] == "no", v
    groups = a.tests.drop_duplicates("feature").set_index("feature")["group"]
    assert groups["7"] == "alternative" and groups["345"] == "control" and groups["12"] == "feature"
    assert set(a.tests.query("feature == '7'")["family"]) == {"secondary"}
    run = load_run(tmp_path / "r")
    [v] = verdicts(run, a.tests, a.vs_controls, a.manipulation, {**primary, "sesoi": None})
    assert v["answer"] == "inconclusive" and "primary.sesoi" in v["reason"]


def _as_direction_control(run: Path, copy_of: str | None = None) -> None:
    """Feature 7 becomes a norm-matched random direction of feature 12 (``copy_of``: its rows are replaced by
    a copy of that feature's, labelled 12:dir0: a direction control that moves the readout exactly as the
    feature does)."""
    info = json.loads((run / "run.json").read_text())
    label = "12:dir0" if copy_of else "7"
    info["features"][2].update(feature=label, role="direction_control", matched_to="12",
                               control_kind="random_direction", direction=0, direction_seed=1)
    (run / "run.json").write_text(json.dumps(info))
    with sqlite3.connect(run / "results.sqlite") as con:
        df = pd.read_sql_query("SELECT * FROM results", con)
        if copy_of:
            twin = df[df["feature"] == copy_of].assign(feature=label, role="direction_control")
            df = pd.concat([df[df["feature"] != "7"], twin], ignore_index=True)
        else:
            df.loc[df["feature"] == "7", "role"] = "direction_control"
        df.to_sql("results", con, index=False, if_exists="replace")
    con.close()


def test_direction_controls_are_a_control_kind_of_their_own_and_must_be_beaten_too(tmp_path):
    run = _run(tmp_path / "r")
    _as_direction_control(run)
    a = analyze_run(load_run(run))
    vs = a.vs_controls.set_index("control_kind")
    assert set(vs.index) == {"matched_latent", "random_direction"} and set(vs["feature"]) == {"12"}
    assert vs.loc["random_direction", "controls"] == "7" and vs.loc["matched_latent", "controls"] == "345"
    assert (a.vs_controls["q_family_size"] == 2).all()  # one vs_controls family over both kinds
    assert (vs["q"] < 0.05).all()
    assert set(a.tests.query("feature == '7' and primary")["family"]) == {"controls"}
    [v] = a.verdicts
    assert v["answer"] == "yes" and "norm-matched random directions" in v["reason"], v
    # a direction control that moves the readout exactly as the feature does: the feature still beats its
    # matched latent, but not its direction, so no "yes"
    run2 = _run(tmp_path / "r2")
    _as_direction_control(run2, copy_of="12")
    b = analyze_run(load_run(run2))
    row = b.vs_controls.set_index("control_kind").loc["random_direction"]
    assert not row["q"] < 0.05  # a zero difference (the fit is degenerate: estimate NaN or 0)
    assert np.isnan(row["estimate"]) or abs(row["estimate"]) < 1e-9
    [v2] = b.verdicts
    assert v2["answer"] == "inconclusive", v2


def test_readout_factor_and_power_helpers():
    factors = {"formality": ["formal", "informal"], "emotion": ["neutral", "emotional"]}
    assert readout_factor("formality", "formal - casual", factors) == ("formality", -1)
    assert readout_factor("emotion", "emotional - neutral", factors) == ("emotion", 1)
    assert readout_factor("x", "a - b", factors) is None
    assert readout_factor("emotion", "a - b", factors) == ("emotion", None)
    mde = detectable(1.0, 1e6, 1)
    assert mde == pytest.approx(1.959964 + 0.841621, rel=1e-4)
    assert power_at(mde, 1.0, 1e6, 1) == pytest.approx(0.8, abs=2e-3)
    assert detectable(1.0, 1e6, 10) > mde  # a larger family needs a larger effect
    assert np.isclose(power_at(0.0, 1.0, 1e6, 1), 0.05, atol=1e-3)
    # a precise test of an effect far above its SE: power 1, not NaN (scipy's nct.cdf underflows there)
    for df in (2.2, 4.7, 11.0, 200.0):
        for nc in (10.0, 25.0, 40.0, -25.0):
            assert power_at(nc, 1.0, df, 3) == pytest.approx(1.0, abs=0.12 if df < 3 else 1e-3)
    # both tails: the same as the textbook sum where scipy's cdf is finite
    crit = sps.t.ppf(1 - 0.05 / 6, 8.0)
    assert power_at(1.5, 1.0, 8.0, 3) == pytest.approx(sps.nct.sf(crit, 8.0, 1.5) + sps.nct.cdf(-crit, 8.0, 1.5),
                                                       rel=1e-9)


def test_report_shows_simple_effects_of_significant_primary_interactions(tmp_path):
    from fis_interventions.reports.analysis import KEYS
    from fis_interventions.reports.simple_effects import primary_simple_effects
    from fis_interventions.reports.writer import report

    folder = _run(tmp_path / "r")
    run = load_run(folder)
    a = analyze_run(run)
    effects = primary_simple_effects(run, a.tests, KEYS)
    sig = a.tests[(a.tests["family"] == "primary") & (a.tests["q"] < 0.05)]
    assert len(sig) >= 1
    # two factors x two levels of the other factor, for every significant primary test, and no other test
    assert len(effects) == 4 * len(sig)
    assert {e["test"].split()[2] for e in effects} == set(sig["feature"].astype(str))
    assert all(e["df"] > 0 and e["ci_low"] <= e["estimate"] <= e["ci_high"] for e in effects)
    out = Path(report(folder, out=tmp_path / "rep", cards=False))
    md = (out / "report.md").read_text() if out.is_dir() else out.read_text()
    assert "Simple effects of each significant primary interaction" in md
