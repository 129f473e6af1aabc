"""`fis report` on a synthetic run with a planted interaction: statistics, tables, Markdown, HTML, browser."""

from __future__ import annotations

import base64
import re
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fis_interventions.cli import main
from fis_interventions.reports.synthetic import PLANTED, write_synthetic_run
from fis_interventions.stats import anova_2x2

VALUES = (1.0, 4.0)  # scale 1 is the no-op check; scale 4 plants an interaction of 3 x 1.0 on one readout


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report")
    run = write_synthetic_run(root / "run", seed=0, n_items=8, n_prompts=2, values=VALUES)
    out = root / "out"
    assert main(["report", str(run), "--out", str(out)]) == 0
    return {"run": run, "out": out}


@pytest.fixture(scope="module")
def tests_table(made: dict[str, Path]) -> pd.DataFrame:
    return pd.read_csv(made["out"] / "tables" / "tests.csv")


def test_planted_interaction_is_significant_and_close_to_truth(tests_table: pd.DataFrame) -> None:
    row = tests_table[(tests_table["feature"] == PLANTED["feature"]) & (tests_table["value"] == 4.0)
                      & (tests_table["readout"] == PLANTED["readout"])].iloc[0]
    truth = (4.0 - 1.0) * PLANTED["interaction"]
    assert bool(row["significant"]) and row["q"] < 0.05 and row["p"] < 0.01
    assert row["ci_low"] < truth < row["ci_high"]
    assert row["primary_model"] == "lmm_items_prompts" and row["n_prompts"] == 2
    assert row["partial_eta2"] > 0.05 and row["standardized"] > 0.5


def test_controls_are_not_significant(made: dict[str, Path], tests_table: pd.DataFrame) -> None:
    controls = tests_table[tests_table["role"] != "top"]
    assert set(controls["role"]) == {"random_control", "linear_control"}
    assert not controls[~controls["null_check"]]["significant"].any()
    other_readout = tests_table[(tests_table["role"] == "top") & (tests_table["readout"] != PLANTED["readout"])
                                & ~tests_table["null_check"]]
    assert not other_readout["significant"].any()
    verdicts = pd.read_csv(made["out"] / "tables" / "features.csv")
    assert verdicts.set_index("role").loc["top", "significant"] == 1
    assert verdicts[verdicts["role"] != "top"]["control_ok"].all()


def test_tests_table_rows_and_family(tests_table: pd.DataFrame) -> None:
    # 3 features x 2 clamp values x 2 contrast readouts; word and KL rows are not tested
    assert len(tests_table) == 12
    assert set(tests_table["readout"]) == {"formal_vs_casual", "emotional_vs_neutral"}
    assert tests_table["null_check"].sum() == 6
    assert (tests_table["null_check"] == (tests_table["value"] == 1.0)).all()
    assert set(tests_table["factor_a"]) == {"formality"} and set(tests_table["factor_b"]) == {"emotion"}
    # BH within each family (no-op null checks in none): recompute independently
    from statsmodels.stats.multitest import multipletests

    assert tests_table.loc[tests_table["null_check"], "q"].isna().all()
    real = tests_table[~tests_table["null_check"]]
    # primary: scale 4 on the first contrast (the documented default): the top feature; its controls apart
    sizes = real.groupby("family")["q_family_size"].first().to_dict()
    assert sizes == {"primary": 1, "controls": 2, "secondary": 3}
    for _, fam in real.groupby("family"):
        np.testing.assert_allclose(fam["q"], multipletests(fam["p"], method="fdr_bh")[1], rtol=1e-12)
    prim = real[real["primary"]]
    assert set(prim["readout"]) == {"formal_vs_casual"} and set(prim["value"]) == {4.0}
    assert tests_table["interpretable"].all()  # both synthetic readouts move with their own factor


def test_anova_columns_match_the_engine_on_the_raw_rows(made: dict[str, Path], tests_table: pd.DataFrame) -> None:
    with sqlite3.connect(made["run"] / "results.sqlite") as con:
        raw = pd.read_sql_query("SELECT * FROM results WHERE feature = 12 AND value = 4.0 "
                                "AND readout = 'formal_vs_casual'", con)
    con.close()
    table = anova_2x2(raw, "shift", "a", "b", levels={"a": ["formal", "informal"], "b": ["neutral", "emotional"]})
    inter = table.set_index("term").loc["a:b"]
    row = tests_table[(tests_table["feature"] == 12) & (tests_table["value"] == 4.0)
                      & (tests_table["readout"] == "formal_vs_casual")].iloc[0]
    assert row["F_anova"] == pytest.approx(inter["F"], rel=1e-10)
    assert row["p_anova"] == pytest.approx(inter["p"], rel=1e-10)
    assert row["n"] == len(raw) == 8 * 4 * 2


def test_detail_tables(made: dict[str, Path]) -> None:
    tables = made["out"] / "tables"
    assert {p.name for p in tables.iterdir()} >= {"tests.csv", "anova.csv", "rm_anova.csv", "lmm.csv", "cells.csv",
                                                  "kl.csv", "features.csv", "null_checks.csv", "eval.csv",
                                                  "screening.csv"}
    anova = pd.read_csv(tables / "anova.csv")
    assert len(anova) == 12 * 3 and set(anova["term"]) == {"formality", "emotion", "formality:emotion"}
    lmm = pd.read_csv(tables / "lmm.csv")
    assert set(lmm["model"]) == {"items+prompts"} and len(lmm) == 12 * 4  # the primary model only
    random = pd.read_csv(tables / "random_effects.csv")
    assert set(random["group"]) >= {"item", "Residual"} and (random.loc[random["term2"].isna(), "vcov"] >= 0).all()
    cells = pd.read_csv(tables / "cells.csv")
    assert len(cells) == 12 * 4
    checks = pd.read_csv(tables / "null_checks.csv")
    assert len(checks) == 3 and checks["passed"].all()
    assert checks["max_abs_shift_contrast"].max() < 1e-5
    kl = pd.read_csv(tables / "kl.csv")
    assert (kl[kl["value"] == 4.0]["mean_kl"] > 0.1).all() and (kl[kl["value"] == 1.0]["mean_kl"] < 1e-5).all()


def test_markdown_sections_methods_and_warnings(made: dict[str, Path]) -> None:
    md = (made["out"] / "report.md").read_text(encoding="utf-8")
    assert md.index("## Verdict") < md.index("## Manipulation check") < md.index("## Summary")
    verdict = md.split("## Manipulation check")[0]
    assert "**inconclusive** (no feature was run with matched controls" in verdict  # synthetic: no matched controls
    assert "near-significant" not in md
    for heading in ["## Summary", "## Features", "## KL divergence of the clamps", "## Null checks",
                    "## Checkpoint evaluation", "## Methods", "## Warnings"]:
        assert heading in md
    summary = md.split("## Summary")[1].split("## Features")[0]
    assert "feature 12** (top" in summary and "1 of 2 tests significant" in summary
    assert summary.count("no significant interaction (compare its KL") == 2 and "CONTROL FAILED" not in md
    methods = md.split("## Methods")[1]
    for text in ["synthetic-model", "blocks.6.hook_resid_post", "checkpoints/synthetic", "seed 0",
                 "formality` (formal / informal)", "emotion` (neutral / emotional)", "-0.5", "REML",
                 "Satterthwaite", "Benjamini-Hochberg over one family of", "statsmodels"]:
        assert text in methods, text
    assert "run: synthetic data: no model was run" in md.split("## Warnings")[1]
    figures = sorted((made["out"] / "figures").glob("*.png"))
    assert len(figures) == 6
    for fig in figures:
        assert f"](figures/{fig.name})" in md


def test_html_is_self_contained_with_every_figure(made: dict[str, Path]) -> None:
    page = (made["out"] / "report.html").read_text(encoding="utf-8")
    figures = {p.name: p.read_bytes() for p in (made["out"] / "figures").glob("*.png")}
    imgs = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"[^>]*data-file="figures/([^"]+)"', page)
    assert len(imgs) == len(figures) == 6
    for data, name in imgs:
        assert base64.b64decode(data) == figures[name]
    assert "<script" not in page and "<link" not in page and "http://" not in page and "https://" not in page
    assert page.count("<table>") >= 3 * 3 + 1


@pytest.mark.browser
def test_report_renders_in_headless_chromium(made: dict[str, Path], tmp_path: Path) -> None:
    from PIL import Image, ImageStat

    from fis_interventions.reports.browser import chromium_binary, probe_html, screenshot

    if chromium_binary() is None:
        pytest.skip("the chromium binary is not installed (apt-get install chromium)")
    result = probe_html(made["out"] / "report.html")
    assert result["title"] == "fis-probe-ok", result
    assert result["errors"] == []
    assert len(result["images"]) == 6
    for image in result["images"]:
        assert image["complete"] and image["naturalWidth"] > 100 and image["width"] > 100 and image["height"] > 100
        assert image["std"] > 5, image  # drawn pixels vary: not a blank or broken image
    shot = Image.open(screenshot(made["out"] / "report.html", tmp_path / "shot.png")).convert("L")
    assert ImageStat.Stat(shot).stddev[0] > 10

    # the probe does catch a script error and a broken image (so the assertions above can fail)
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><head><title>x</title></head><body><img src=\"data:image/png;base64,AAAA\">"
                   "<script>undefinedFunction();</script></body></html>", encoding="utf-8")
    broken = probe_html(bad)
    assert any("undefinedFunction" in e for e in broken["errors"])
    assert broken["images"][0]["naturalWidth"] == 0


def test_methods_name_the_fitted_random_effects(made: dict[str, Path], tests_table: pd.DataFrame) -> None:
    md = (made["out"] / "report.md").read_text(encoding="utf-8")
    structures = tests_table["random_structure"].dropna().unique()
    assert len(structures) >= 1
    assert all("prompt (fixed, 2 levels)" in s and s.endswith("item)") for s in structures)
    assert "Random effects fitted: `shift ~ " in md and structures[0] in md
    assert ("Singular fits simplified in" in md) == tests_table["simplified"].notna().any()


def test_how_many_items_line_for_significant_effects(made: dict[str, Path], tests_table: pd.DataFrame) -> None:
    md = (made["out"] / "report.md").read_text(encoding="utf-8")
    sig = tests_table[tests_table["significant"]]
    assert len(sig) and sig["items_for_80"].notna().all()
    assert tests_table.loc[tests_table["p"].isna() | (tests_table["p"] >= 0.1), "items_for_80"].isna().all()
    assert f"80% power with {int(sig['items_for_80'].iloc[0])} items" in md


def test_features_section_puts_top_features_before_controls(made: dict[str, Path]) -> None:
    # The synthetic run's linear control has id 7, below the top feature's 12: id order would put it first.
    text = (made["out"] / "report.md").read_text()
    features = text[text.index(" Features\n"):]
    top = features.index("feature 12 (top")
    assert top < features.index("feature 7 (linear_control") and top < features.index("feature 345 (random_control")
