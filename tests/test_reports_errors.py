"""`fis report` on bad run folders: one-line errors with exit code 2, and no half-written report folder."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from fis_interventions.cli import main
from fis_interventions.errors import FisError
from fis_interventions.reports import load_run, report
from fis_interventions.reports.synthetic import run_info, synthetic_results


def _run(folder: Path, table: pd.DataFrame | None = None, info: dict | None = None) -> Path:
    """A tiny valid run folder (2 values, 4 items, 1 prompt); pass ``table``/``info`` to corrupt it."""
    folder.mkdir(parents=True)
    table = synthetic_results(seed=1, n_items=4, n_prompts=1, values=(1.0, 4.0)) if table is None else table
    info = run_info(4, 1, (1.0, 4.0), 1) if info is None else info
    (folder / "run.json").write_text(json.dumps(info), encoding="utf-8")
    with sqlite3.connect(folder / "results.sqlite") as con:
        table.to_sql("results", con, index=False)
    con.close()
    return folder


def _cli_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_missing_folder_and_file_instead_of_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "run folder not found" in _cli_error(["report", str(tmp_path / "nope")], capsys)
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert "expected a run folder" in _cli_error(["report", str(f)], capsys)
    (tmp_path / "empty").mkdir()
    assert "run.json not found" in _cli_error(["report", str(tmp_path / "empty")], capsys)


def test_bad_run_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _run(tmp_path / "a")
    (folder / "run.json").write_text("{not json", encoding="utf-8")
    assert "not valid JSON" in _cli_error(["report", str(folder)], capsys)
    info = run_info(4, 1, (1.0, 4.0), 1)
    del info["hook"]
    folder = _run(tmp_path / "b", info=info)
    err = _cli_error(["report", str(folder)], capsys)
    assert "run.json: hook: required key is missing" in err
    info = run_info(4, 1, (1.0, 4.0), 1)
    info["designs"]["formality_emotion"]["factors"]["formality"].append("neutralish")
    with pytest.raises(FisError, match="2x2 design"):
        load_run(_run(tmp_path / "c", info=info))


def test_missing_or_bad_results_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _run(tmp_path / "a")
    (folder / "results.sqlite").unlink()
    assert "results table not found" in _cli_error(["report", str(folder)], capsys)
    with sqlite3.connect(folder / "results.sqlite") as con:
        con.execute("CREATE TABLE other (x INTEGER)")
    con.close()
    assert "no table 'results'" in _cli_error(["report", str(folder)], capsys)
    table = synthetic_results(seed=1, n_items=4, n_prompts=1, values=(1.0,)).drop(columns=["shift"])
    assert "lacks columns ['shift']" in _cli_error(["report", str(_run(tmp_path / "b", table=table))], capsys)
    table = synthetic_results(seed=1, n_items=4, n_prompts=1, values=(1.0,))
    table = table[table["readout_kind"] != "contrast"]
    assert "no contrast readouts" in _cli_error(["report", str(_run(tmp_path / "c", table=table))], capsys)
    table = synthetic_results(seed=1, n_items=4, n_prompts=1, values=(1.0,)).assign(design="other")
    assert "not described in run.json" in _cli_error(["report", str(_run(tmp_path / "d", table=table))], capsys)


def test_failed_report_leaves_no_folder_and_keeps_the_old_one(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from fis_interventions.reports import writer as report_module

    table = synthetic_results(seed=1, n_items=4, n_prompts=1, values=(4.0,))
    folder = _run(tmp_path / "run", table=table[table["feature"] == "12"])
    out = tmp_path / "reports" / "synthetic"

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("figure failed")

    monkeypatch.setattr(report_module, "dose_plot", boom)
    with pytest.raises(RuntimeError, match="figure failed"):
        report(folder, out)
    assert not out.exists() and list(out.parent.iterdir()) == []  # no temp folder left either
    monkeypatch.undo()
    report(folder, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    monkeypatch.setattr(report_module, "dose_plot", boom)
    with pytest.raises(RuntimeError):
        report(folder, out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # the old report is kept whole
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "old.txt").write_text("previous report")
    with pytest.raises(FisError, match="did not write"):
        report(folder, theirs)
    assert [p.name for p in theirs.iterdir()] == ["old.txt"]


def test_default_out_folder_is_reports_run_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = run_info(4, 1, (1.0, 4.0), 1)
    info["name"] = "my run/1"
    # keys the battery writes beyond the documented ones, and a group label for features clamped together
    info["features"] = [{**info["features"][0], "feature": "12,40", "max_activation": 3.2}]
    info["shards"] = 1
    info["designs"]["formality_emotion"]["score"] = "logit"
    table = synthetic_results(seed=1, n_items=4, n_prompts=1, values=(4.0,))
    table = table[table["feature"] == "12"].assign(feature="12,40")
    folder = _run(tmp_path / "run", table=table, info=info)
    monkeypatch.chdir(tmp_path)
    out = report(folder)
    assert out == Path("reports") / "my_run_1"
    assert (tmp_path / out / "report.html").is_file() and (tmp_path / out / "provenance.json").is_file()
    # no eval.json / screening.csv: those sections are left out, and one prompt means no crossed LMM
    md = (tmp_path / out / "report.md").read_text(encoding="utf-8")
    assert "## Checkpoint evaluation" not in md
    tests = pd.read_csv(tmp_path / out / "tables" / "tests.csv")
    assert (tmp_path / out / "figures" / "dose_formality_emotion_secondary.hook_latents_12_40.png").is_file()
    assert len(tests) == 2 and set(tests["feature"]) == {"12,40"} and set(tests["primary_model"]) == {"lmm_items"}
    assert not tests["random_structure"].str.contains("prompt").any()
