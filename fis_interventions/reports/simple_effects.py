"""Report hook: simple effects for every significant primary interaction (issue 24).

A significant A x B interaction says the effect of A differs between the levels of B; a reader then asks
what the effect of A *is* at each level. The battery analysis (:func:`..reports.analysis.analyze_run`)
computes the simple effects of both factors from each test's own primary LMM (contrasts of that fit,
:func:`fis_interventions.stats.simple.simple_effects_records`) and :func:`primary_simple_effects` keeps those
of the tests whose primary interaction is significant (``q < alpha``), refitting nothing.
:func:`simple_effects_for_tests` does the same from the rows alone (one refit per significant test) for
callers without stored effects.
The report's writer renders them (:mod:`fis_interventions.reports.writer`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd

ALPHA = 0.05


def simple_effects_for_test(data: pd.DataFrame, a: str, b: str, levels: dict[str, list[str]],
                            prompt: str | None = None, dv: str = "shift", item: str = "item"
                            ) -> list[dict[str, Any]]:
    """Simple effects of both factors for one test's rows (columns ``dv``, ``a``, ``b``, ``item``[, prompt])."""
    from ..stats.design import prepare_2x2
    from ..stats.lmm import lmm_design
    from ..stats.simple import simple_effects_records

    design = prepare_2x2(data, dv, a, b, item=item, levels=levels, extra_random=prompt)
    lmm = lmm_design(design, extra_random=prompt, compare=False)
    return simple_effects_records(design, lmm, [a, b]) if lmm.converged else []


def simple_effects_for_tests(tests: pd.DataFrame, rows_of: Callable[[pd.Series], tuple[pd.DataFrame, dict]],
                             alpha: float = ALPHA, q_column: str = "q") -> list[dict[str, Any]]:
    """Simple effects for every significant primary interaction in ``tests``.

    ``rows_of(test_row)`` returns that test's data (with ``shift``, the two factor columns, ``item`` and
    optionally ``prompt_id``) and ``{"a":, "b":, "levels":, "prompt":}``. Each output row is a simple effect
    tagged with the test's ``label`` (or its index).
    """
    out: list[dict[str, Any]] = []
    significant = tests[pd.to_numeric(tests[q_column], errors="coerce") < alpha]
    for idx, row in significant.iterrows():
        data, spec = rows_of(row)
        for eff in simple_effects_for_test(data, spec["a"], spec["b"], spec["levels"], spec.get("prompt")):
            out.append({"test": row.get("label", idx), **eff})
    return out


def primary_simple_effects(run: Any, tests: pd.DataFrame, keys: list[str], alpha: float = ALPHA,
                           stored: pd.DataFrame | None = None) -> list[dict[str, Any]]:
    """Simple effects for every significant test of the primary family of a battery run (``tests`` from
    :func:`..reports.analysis.analyze_run`; ``keys`` the columns that identify one test's rows).

    ``stored``: the simple effects :func:`..reports.analysis.analyze_run` computed from each test's own fit
    (``Analysis.simple``); they are used as they are (no refit). Without them each significant test's LMM is
    refitted."""
    if tests.empty or "family" not in tests:
        return []
    primary = tests[(tests["family"] == "primary")]
    if stored is not None and not stored.empty and alpha <= ALPHA:  # stored for interactions with p < ALPHA
        return _stored_effects(primary, stored, keys, alpha)
    contrasts = run.results[run.results["readout_kind"] == "contrast"]

    def rows_of(row: pd.Series) -> tuple[pd.DataFrame, dict[str, Any]]:
        design = run.info.designs[str(row["design"])]
        a, b = design.names
        sub = contrasts
        for k in keys:
            col = sub[k].astype(str) if k == "feature" else sub[k]
            sub = sub[col == (str(row[k]) if k == "feature" else row[k])]
        prompt = "prompt_id" if sub["prompt_id"].nunique() > 1 else None
        return (sub.rename(columns={"a": a, "b": b}),
                {"a": a, "b": b, "levels": {a: design.factors[a], b: design.factors[b]}, "prompt": prompt})

    labelled = primary.assign(label=[_label(r) for _, r in primary.iterrows()])
    return simple_effects_for_tests(labelled, rows_of, alpha=alpha)


def _none_if_nan(v: Any) -> Any:
    return None if isinstance(v, float) and v != v else v


def _label(row: pd.Series) -> str:
    return f"{row['design']} {row['point']} {row['feature']} ({row['readout']})"


def _stored_effects(primary: pd.DataFrame, stored: pd.DataFrame, keys: list[str], alpha: float
                    ) -> list[dict[str, Any]]:
    """The stored simple effects of the primary tests whose interaction is significant (``q < alpha``)."""
    out: list[dict[str, Any]] = []
    significant = primary[pd.to_numeric(primary["q"], errors="coerce") < alpha]
    columns = [c for c in stored.columns if c not in keys]
    for _, row in significant.iterrows():
        mask = pd.Series(True, index=stored.index)
        for k in keys:
            mask &= stored[k] == row[k]
        for _, eff in stored[mask].iterrows():
            out.append({"test": _label(row), **{c: _none_if_nan(eff[c]) for c in columns}})
    return out
