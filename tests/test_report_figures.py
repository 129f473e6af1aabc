"""Report figures: no empty no-op panels, text large enough to read at 100% zoom."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import pandas as pd

from fis_interventions.reports.figures import FONT, interaction_plot, is_no_op


def _cells(values: list[float]) -> pd.DataFrame:
    rows = []
    for v in values:
        for a in ("x1", "x2"):
            for b in ("y1", "y2"):
                mean = 0.0 if v == 1 else v * (1.0 if (a, b) == ("x2", "y2") else 0.1)
                rows.append({"intervention": "scale", "value": v, "position": "all", "readout": "r",
                             "A": a, "B": b, "mean": mean, "ci_low": mean - 0.1, "ci_high": mean + 0.1})
    return pd.DataFrame(rows)


def test_no_op_clamps_get_no_panel(tmp_path: Path) -> None:
    levels = {"A": ["x1", "x2"], "B": ["y1", "y2"]}
    with_noop = interaction_plot(_cells([-4, 1, 4]), "A", "B", levels, "t", tmp_path / "a.png")
    without = interaction_plot(_cells([-4, 4]), "A", "B", levels, "t", tmp_path / "b.png")
    four = interaction_plot(_cells([-4, 0, 2, 4]), "A", "B", levels, "t", tmp_path / "c.png")
    assert mpimg.imread(with_noop).shape == mpimg.imread(without).shape
    assert mpimg.imread(four).shape[1] > mpimg.imread(without).shape[1]


def test_no_op_rule_and_font_sizes() -> None:
    assert is_no_op("scale", 1.0) and is_no_op("add", 0.0)
    assert not is_no_op("scale", 0.0) and not is_no_op("set", 1.0)
    assert min(v for k, v in FONT.items()) >= 10
