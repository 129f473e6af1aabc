"""Benjamini-Hochberg q-values: hand-computed values, NaN handling, families."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fis_interventions.stats import add_qvalues, fdr_bh


def bh_by_hand(p: np.ndarray) -> np.ndarray:
    """q_(i) = min over j >= i of p_(j) m / j (the textbook step-up definition)."""
    order = np.argsort(p)
    m = len(p)
    raw = p[order] * m / np.arange(1, m + 1)
    q_sorted = np.minimum.accumulate(raw[::-1])[::-1].clip(max=1)
    out = np.empty(m)
    out[order] = q_sorted
    return out


def test_hand_example_with_nan():
    q = fdr_bh([0.01, 0.04, 0.03, np.nan, 0.2])
    np.testing.assert_allclose(q[[0, 1, 2, 4]], [0.04, 0.16 / 3, 0.16 / 3, 0.2], rtol=1e-12)
    assert np.isnan(q[3])


def test_matches_textbook_definition():
    p = np.random.default_rng(0).uniform(size=200) ** 3
    np.testing.assert_allclose(fdr_bh(p), bh_by_hand(p), rtol=1e-12)
    assert fdr_bh([]).shape == (0,)
    assert np.isnan(fdr_bh([np.nan, np.nan])).all()


def test_add_qvalues_by_family():
    table = pd.DataFrame({"term": ["a", "a", "b", "b", "b"], "p": [0.01, 0.02, 0.01, np.nan, 0.04]})
    out = add_qvalues(table, p_col="p", family_cols=["term"], out="q")
    np.testing.assert_allclose(out["q"].iloc[[0, 1]], [0.02, 0.02])
    np.testing.assert_allclose(out["q"].iloc[[2, 4]], [0.02, 0.04])
    assert np.isnan(out["q"].iloc[3])
    assert list(out["q_family"]) == ["term=a"] * 2 + ["term=b"] * 3
    assert list(out["q_family_size"]) == [2, 2, 2, 2, 2]
    whole = add_qvalues(table)
    assert set(whole["q_family"]) == {"all rows"} and whole["q_family_size"].iloc[0] == 4
    np.testing.assert_allclose(whole["q"].dropna(), bh_by_hand(table["p"].dropna().to_numpy()))
    assert "q" not in table  # input untouched
    with pytest.raises(KeyError):
        add_qvalues(table, family_cols=["nope"])
