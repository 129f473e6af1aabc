"""The report's speed-ups change no number (issue 23, item 5): tests fitted on worker processes equal the serial
fits, and the power curve stopped at the target gives the same rows and items-for-80% as the full grid."""

from __future__ import annotations

import pandas as pd
import pytest

from fis_interventions.reports.analysis import POWER_GRID, analyze_run
from fis_interventions.reports.parallel import pmap, report_workers
from fis_interventions.reports.runfolder import load_run
from fis_interventions.reports.synthetic import write_synthetic_run
from fis_interventions.stats.power import PowerSpec, items_needed, power_curve


def test_parallel_analysis_equals_serial(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "run", n_items=8, n_prompts=2, values=(1.0, 4.0)))
    serial, parallel = analyze_run(run, workers=1), analyze_run(run, workers=2)
    assert len(serial.tests) == 12 and serial.tests["items_for_80"].notna().any()  # power was simulated
    pd.testing.assert_frame_equal(serial.tests, parallel.tests)
    for name in ("lmm", "anova", "rm_anova", "random", "cells"):
        pd.testing.assert_frame_equal(getattr(serial, name), getattr(parallel, name))
    assert set(serial.warnings) == set(parallel.warnings)


def test_power_curve_stops_at_target_with_the_same_rows():
    spec = PowerSpec(effect=0.8, var_item=0.2, var_resid=1.0, reps=2)
    full = power_curve(spec, POWER_GRID[:10], n_sims=200, seed=0)
    short = power_curve(spec, POWER_GRID[:10], n_sims=200, seed=0, stop_at=0.8)
    assert 1 < len(short) < len(full)
    pd.testing.assert_frame_equal(short, full.iloc[:len(short)])
    assert items_needed(short, 0.8) == items_needed(full, 0.8) is not None


def test_workers_from_environment(monkeypatch):
    monkeypatch.setenv("FIS_REPORT_WORKERS", "3")
    assert report_workers() == 3
    monkeypatch.setenv("FIS_REPORT_WORKERS", "many")
    from fis_interventions.errors import FisError

    with pytest.raises(FisError, match="FIS_REPORT_WORKERS"):
        report_workers()
    assert pmap(divmod, [(7, 2), (9, 4)], workers=2) == [(3, 1), (2, 1)]
