"""`fis stats`: exit codes, printed tables, JSON content and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fis_interventions.cli import main

GOLDEN = Path(__file__).resolve().parent / "golden"
CSV = GOLDEN / "factorial_items.csv"
BASE = ["stats", str(CSV), "--dv", "logit_shift", "--factor", "formality", "--factor", "emotion"]


@pytest.fixture(scope="module", autouse=True)
def _golden_present():
    assert CSV.is_file(), f"golden data missing at {GOLDEN}"


def test_full_run_writes_json(tmp_path, capsys):
    out = tmp_path / "res" / "stats.json"
    assert main(BASE + ["--item", "item", "--random", "intercept", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Type III ANOVA" in text and "By-item" in text and "LMM" in text and "warnings: none" in text
    assert "formality:emotion" in text
    result = json.loads(out.read_text())
    ref = json.loads((GOLDEN / "factorial_items.r.json").read_text())
    assert result["anova"][0]["F"] == pytest.approx(ref["anova_type3_ols"][0]["F"], rel=1e-6)
    assert result["rm_anova"][2]["F"] == pytest.approx(ref["rm_anova_by_item"][2]["F"], rel=1e-6)
    assert result["lmm"]["method"] == "REML" and result["lmm"]["loglik"] == pytest.approx(-284.7625615, rel=1e-8)
    assert result["n"] == 240 and result["n_items"] == 30 and result["warnings"] == []
    prov = result["provenance"]
    assert prov["config"]["dv"] == "logit_shift" and "statsmodels" in prov["versions"]
    assert [p.name for p in out.parent.iterdir()] == ["stats.json"]  # no temp files left


def test_ml_and_levels(tmp_path):
    out = tmp_path / "ml.json"
    code = main(BASE + ["--item", "item", "--ml", "--random", "intercept", "--levels", "formality=informal,formal",
                        "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["lmm"]["method"] == "ML"
    assert result["lmm"]["loglik"] == pytest.approx(-279.9733133689, rel=1e-8)
    assert result["levels"]["formality"] == ["informal", "formal"]
    assert result["lmm"]["fixed"][1]["estimate"] == pytest.approx(-0.79779761667, rel=1e-6)


def test_parquet_without_items(tmp_path, capsys):
    path = tmp_path / "d.parquet"
    pd.read_csv(CSV).to_parquet(path)
    out = tmp_path / "p.json"
    assert main(["stats", str(path), "--dv", "logit_shift", "--factor", "formality", "--factor", "emotion",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["lmm"] is None and result["rm_anova"] is None
    assert "By-item" not in capsys.readouterr().out


def test_warnings_are_printed(tmp_path, capsys):
    df = pd.read_csv(CSV)
    df.loc[:3, "logit_shift"] = np.nan
    path = tmp_path / "nan.csv"
    df.to_csv(path, index=False)
    assert main(["stats", str(path), "--dv", "logit_shift", "--factor", "formality", "--factor", "emotion",
                 "--item", "item"]) == 0
    assert "dropped 4 rows" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["stats", "missing.csv", "--dv", "y", "--factor", "a", "--factor", "b"], "file not found"),
    (BASE[:2] + ["--dv", "nope", "--factor", "formality", "--factor", "emotion"], "column 'nope' not found"),
    (BASE[:2] + ["--dv", "item", "--factor", "formality", "--factor", "emotion"], "not numeric"),
    (BASE[:2] + ["--dv", "logit_shift", "--factor", "formality", "--factor", "item"], "exactly two levels"),
    (BASE[:2] + ["--dv", "logit_shift", "--factor", "formality"], "exactly two factors"),
    (BASE + ["--levels", "formality:formal"], "cannot parse --levels"),
    (BASE + ["--levels", "formality=formal,casual"], "not among its levels"),
])
def test_user_errors_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "never.json"
    assert main(args + ["--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1
    assert not out.exists()


def test_help_mentions_r(capsys):
    assert main(["stats", "--help"]) == 0
    text = capsys.readouterr().out
    assert "lmerTest" in text and "--levels" in text and "--reml" in text


def test_default_is_maximal_and_json_lists_every_variance(tmp_path, capsys):
    out = tmp_path / "slopes.json"
    data = GOLDEN / "factorial_slopes.csv"
    assert main(["stats", str(data), "--dv", "logit_shift", "--factor", "formality", "--factor", "emotion",
                 "--item", "item", "--levels", "formality=formal,informal", "--levels", "emotion=neutral,emotional",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "(1 + formality + emotion + formality:emotion || item)" in text and "random effects" in text
    lmm = json.loads(out.read_text())["lmm"]
    assert lmm["random"] == "uncorrelated" and lmm["structure"].endswith("|| item)")
    assert len(lmm["random_effects"]) == 5 and lmm["simplification"] == [] and lmm["singular"] is False
    assert set(lmm["optimizers"]) == {"L-BFGS-B"}  # converged: COBYQA runs only on trouble
    assert lmm["fixed"][3]["df"] == pytest.approx(38.4939452886, rel=1e-3)


def test_bad_random_option_exits_2(capsys):
    assert main(BASE + ["--item", "item", "--random", "maximal"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--random" in err and len(err.splitlines()) == 1
