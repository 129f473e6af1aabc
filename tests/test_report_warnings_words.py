"""Library warnings reach the report's Warnings section in our words, not the library's."""

from __future__ import annotations

import warnings

from statsmodels.tools.sm_exceptions import ValueWarning

from fis_interventions.reports.analysis import _quiet_engine


def test_statsmodels_rank_warning_is_translated() -> None:
    # The message statsmodels gives for a contrast of shifts that are all equal (seen in the demo's report).
    with _quiet_engine() as msgs:
        warnings.warn("covariance of constraints does not have full rank. The number of constraints is 1, "
                      "but rank is 0", ValueWarning)
    assert len(msgs) == 1
    assert "ValueWarning" not in msgs[0] and "full rank" not in msgs[0]
    assert "no-op clamp" in msgs[0]


def test_unknown_warning_is_kept_as_is() -> None:
    with _quiet_engine() as msgs:
        warnings.warn("something new happened", UserWarning)
    assert msgs == ["UserWarning: something new happened"]
