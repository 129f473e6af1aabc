"""Report hook: simple effects for every significant primary interaction (issue 24).

A significant A x B interaction says the effect of A differs between the levels of B; a reader then asks
what the effect of A *is* at each level. :func:`simple_effects_for_tests` refits nothing it does not need:
it takes the rows the battery analysis tested (one per design x feature x intervention x value x readout) and,
for those whose primary interaction is significant (``q < alpha``), computes the simple effects of both
factors from the same primary LMM (:func:`fis_interventions.stats.simple.simple_effects_records`).
:func:`simple_effects_section` renders them as Markdown lines for the report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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


def simple_effects_section(effects: Iterable[dict[str, Any]]) -> list[str]:
    """Markdown lines: one table of simple effects per significant interaction (nothing when none)."""
    effects = list(effects)
    if not effects:
        return []
    lines = ["## Simple effects of significant interactions", "",
             "Effect of each factor (second level minus first) at each level of the other, from the primary "
             "mixed model: Satterthwaite df, 95% CI; p_holm is Holm-corrected over the two levels of the other "
             "factor (emmeans-compatible estimates and df).", "",
             "| test | effect | at | estimate | 95% CI | df | p | p_holm |", "|---|---|---|---|---|---|---|---|"]

    def f(x: Any, spec: str = ".3g") -> str:
        return "-" if x is None else format(x, spec)

    for e in effects:
        lines.append(f"| {e['test']} | {e['factor']}: {e['contrast']} | {e['at_factor']} = {e['at']} | "
                     f"{f(e['estimate'])} | [{f(e['ci_low'])}, {f(e['ci_high'])}] | {f(e['df'], '.1f')} | "
                     f"{f(e['p'])} | {f(e['p_holm'])} |")
    return lines + [""]


def primary_simple_effects(run: Any, tests: pd.DataFrame, keys: list[str], alpha: float = ALPHA
                           ) -> list[dict[str, Any]]:
    """Simple effects for every significant test of the primary family of a battery run (``tests`` from
    :func:`..reports.analysis.analyze_run`; ``keys`` the columns that identify one test's rows)."""
    if tests.empty or "family" not in tests:
        return []
    primary = tests[(tests["family"] == "primary")]
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

    labelled = primary.assign(label=[f"{r['design']} {r['point']} {r['feature']} ({r['readout']})"
                                     for _, r in primary.iterrows()])
    return simple_effects_for_tests(labelled, rows_of, alpha=alpha)
