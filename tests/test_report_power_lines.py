"""The report's "how many items" lines say what was computed: a number, "more than the grid", or that the
closed-form power does not apply (5 or more prompts are crossed random effects)."""

from __future__ import annotations

import pandas as pd

from fis_interventions.reports.writer import power_lines


def _row(**kw) -> dict:
    base = {"design": "d", "feature": "7", "intervention": "scale", "value": 4.0, "position": "all",
            "readout": "emotion", "p": 0.01, "null_check": False, "significant": False, "n_items": 8,
            "n_prompts": 2, "items_for_80": 24.0}
    return {**base, **kw}


def test_power_lines_distinguish_computed_beyond_grid_and_not_applicable():
    tests = pd.DataFrame([_row(), _row(feature="8", items_for_80=None), _row(feature="9", n_prompts=5,
                                                                            items_for_80=None),
                          _row(feature="10", p=0.5), _row(feature="11", null_check=True)])
    lines = power_lines(tests)
    assert len(lines) == 3
    assert "80% power with 24 items" in lines[0] and "8 now" in lines[0]
    assert "more than 1024 items" in lines[1]
    assert "not computed" in lines[2] and "5 prompts" in lines[2] and "1024" not in lines[2]
