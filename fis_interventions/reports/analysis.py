"""The report's statistics: one 2x2 analysis per design x feature x intervention x value x contrast readout.

Every test goes through :func:`fis_interventions.stats.analyze_2x2` (Type III ANOVA, by-item RM-ANOVA,
interaction contrast, and the primary test: the LMM with maximal uncorrelated by-item random effects, prompts
as a fixed factor below 5 prompts and crossed random effects from 5, a singular fit simplified by the rule
of :mod:`fis_interventions.stats.structure`). BH q-values are computed over every confirmatory test in the
run (one family); F1 and F2 are descriptive columns. Tests of a feature chosen by a screening on the very
items it is tested on (a battery with ``items: all``) are labelled "exploratory: selected and tested on the
same items" and corrected in a family of their own, never counted as significant findings.
"""

from __future__ import annotations

import logging
import re
import warnings as pywarnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..errors import FisError
from ..stats import add_qvalues, analyze_2x2
from ..stats.structure import MIN_RANDOM_LEVELS
from .inference import (FAMILIES, groups, is_primary, manipulation_check, primary_of, verdicts,
                        vs_controls)
from .parallel import pmap
from .runfolder import Run

log = logging.getLogger(__name__)

ALPHA = 0.05
NEAR = 0.10  # primary p below this gets a "how many items" line (significant or near-significant)
POWER_GRID = (4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
KEYS = ["design", "point", "feature", "role", "intervention", "value", "position", "readout"]
FAMILY = ("BH within each family: primary tests of the features; primary tests of the controls; feature minus "
          "matched controls; secondary tests (other clamps and readouts); exploratory tests (features selected and "
          "tested on the same items). No-op checks are in no family (null checks of the splice)")


EXPLORATORY = "exploratory: selected and tested on the same items"
CONFIRMATORY = "confirmatory: selected on other (discovery) items"
NOT_SCREENED = "not selected by a screening"


def selections(run: Run) -> dict[tuple[str, str], dict[str, Any]]:
    """(point, feature label) -> ``{"design", "items"}``: the design and discovery items a feature chosen by a
    screening was selected on (``selected_on`` in run.json, written by the battery)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for f in run.info.features:
        sel = (f.model_extra or {}).get("selected_on")
        if isinstance(sel, dict) and sel.get("design") is not None:
            out[(f.point, str(f.feature))] = {"design": sel["design"], "items": set(map(str, sel["discovery_items"]))}
    return out


def selection(selected: dict, design: str, point: str, feature: str, items: set[str]) -> str:
    """How a test's feature was chosen relative to the items it is tested on (see :data:`EXPLORATORY`)."""
    sel = selected.get((point, feature))
    if sel is None:
        return NOT_SCREENED
    if sel["design"] == design and sel["items"] & items:
        return EXPLORATORY
    return CONFIRMATORY


def is_noop(intervention: str, value: float) -> bool:
    """Clamps that leave the feature unchanged (scale 1, add 0): their effects must be nil."""
    return (intervention == "scale" and value == 1.0) or (intervention == "add" and value == 0.0)


@dataclass
class Analysis:
    """Everything the report shows: the tidy tests table and the long detail tables, plus warnings."""

    tests: pd.DataFrame
    anova: pd.DataFrame
    rm_anova: pd.DataFrame
    lmm: pd.DataFrame
    cells: pd.DataFrame
    kl: pd.DataFrame
    warnings: dict[str, list[str]] = field(default_factory=dict)  # warning -> tests it came from
    random: pd.DataFrame = field(default_factory=pd.DataFrame)  # every variance / covariance per test
    family: str = FAMILY
    primary: dict[str, Any] = field(default_factory=dict)  # the primary clamp and readout
    manipulation: pd.DataFrame = field(default_factory=pd.DataFrame)  # clean readout by cell, per readout
    vs_controls: pd.DataFrame = field(default_factory=pd.DataFrame)  # feature minus matched controls
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    simple: pd.DataFrame = field(default_factory=pd.DataFrame)  # simple effects of both factors, every test's LMM


# Library warnings a reader cannot act on in the library's words, said in ours (pattern -> our sentence).
_OUR_WORDS: list[tuple[str, str]] = [
    (r"covariance of constraints does not have full rank",
     "an OLS contrast had no variance (every shift of one test equal, as with a no-op clamp): that test's "
     "OLS numbers (F1) are not meaningful"),
]


def _in_our_words(category: str, message: str) -> str:
    """A library warning as a reader of the report should see it: translated when we know it, else as is."""
    for pattern, ours in _OUR_WORDS:
        if re.search(pattern, message):
            return ours
    return f"{category}: {message}"


@contextmanager
def _quiet_engine() -> Iterator[list[str]]:
    """Collect (not print) the engine's per-test warnings: the report lists them, grouped."""
    logger = logging.getLogger("fis_interventions.stats")
    old = logger.level
    logger.setLevel(logging.ERROR)
    caught_msgs: list[str] = []
    try:
        with pywarnings.catch_warnings(record=True) as caught:
            pywarnings.simplefilter("always")
            yield caught_msgs
        caught_msgs += [_in_our_words(w.category.__name__, str(w.message).splitlines()[0]) for w in caught
                        if not issubclass(w.category, (DeprecationWarning, FutureWarning))]
    finally:
        logger.setLevel(old)


def _test_job(sub: pd.DataFrame, key: dict[str, Any], a: str, b: str, levels: dict[str, list[str]],
              crossed: bool) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]], list[str], list[str]]:
    """One test as a worker runs it (:func:`.parallel.pmap`): :func:`_one_test` plus the Python warnings it
    raised, caught here because a worker process cannot hand them to the parent's catcher."""
    with _quiet_engine() as caught:
        row, detail, notes = _one_test(sub, key, a, b, levels, crossed)
    return row, detail, notes, caught


def _label(key: dict[str, Any]) -> str:
    return (f"{key['design']} {key['point']}#{key['feature']} {key['intervention']}={key['value']:g} "
            f"[{key['position']}] {key['readout']}")


def _term_rows(table: list[dict[str, Any]] | None, key: dict[str, Any], a: str, b: str,
               model: str | None = None) -> list[dict[str, Any]]:
    names = {a: "A", b: "B", f"{a}:{b}": "A:B", "Intercept": "Intercept"}
    out = []
    for row in table or []:
        extra = {"model": model} if model else {}
        out.append({**key, **extra, "effect": names.get(row["term"], row["term"]), **row})
    return out


def _one_test(sub: pd.DataFrame, key: dict[str, Any], a: str, b: str, levels: dict[str, list[str]],
              crossed: bool) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]], list[str]]:
    data = sub.rename(columns={"a": a, "b": b})
    res = analyze_2x2(data, "shift", a, b, item="item", levels=levels, prompt="prompt_id" if crossed else None,
                      compare=False,  # the report shows no likelihood-ratio test of a simplification
                      simple=(a, b), simple_below=ALPHA)  # contrasts of this fit, for significant ones (no refit)
    notes = list(res["warnings"])
    inter_term = f"{a}:{b}"
    anova = {r["term"]: r for r in res["anova"]}
    rm = {r["term"]: r for r in (res["rm_anova"] or [])}
    lmm = res["lmm"] or {}
    lmm_fixed = {r["term"]: r for r in lmm.get("fixed", [])}
    inter = res["contrast"]["interaction"]
    model = "items+prompts" if crossed else "items"
    structure = (lmm.get("structure") or "").replace(a, "A").replace(b, "B").replace("prompt_id", "prompt")
    row: dict[str, Any] = {
        **key, "null_check": is_noop(key["intervention"], key["value"]), "factor_a": a, "factor_b": b,
        "n": res["n"], "n_items": res["n_items"], "n_prompts": int(sub["prompt_id"].nunique()),
        "mean_abs_shift": float(sub["shift"].abs().mean()),
        "F_anova": anova[inter_term]["F"], "p_anova": anova[inter_term]["p"],
        "partial_eta2": anova[inter_term]["partial_eta2"],
        "F_f2": rm.get(inter_term, {}).get("F"), "p_f2": rm.get(inter_term, {}).get("p"),
        "p_lmm": lmm_fixed.get(inter_term, {}).get("p"),
        "standardized": res["contrast"]["effect_sizes"]["standardized_interaction"],
        "random_structure": structure or None, "prompts": lmm.get("prompts"),
        "prompt_reason": lmm.get("prompt_reason"),
        "simplified": "; ".join(lmm.get("simplification") or []) or None}
    detail = {"anova": _term_rows(res["anova"], key, a, b), "rm_anova": _term_rows(res["rm_anova"], key, a, b),
              "lmm": _term_rows(lmm.get("fixed"), key, a, b, model=model),
              "random": [{**key, **r} for r in lmm.get("random_effects") or []],
              "cells": [{**key, "A": c[a], "B": c[b], **{k: v for k, v in c.items() if k not in (a, b)}}
                        for c in res["contrast"]["cells"]],
              "simple": [{**key, **r} for r in res.get("simple_effects") or []]}
    primary = {k: inter[k] for k in ("estimate", "se", "df", "ci_low", "ci_high", "p")}
    row.update(primary_model="lmm_items_prompts" if crossed else "lmm_items", estimate=primary["estimate"],
               se=primary["se"], df=primary["df"], ci_low=primary["ci_low"], ci_high=primary["ci_high"],
               p=primary["p"], items_for_80=_items_for_80(res, row["n_prompts"], primary["p"]))
    return row, detail, notes


def _items_for_80(res: dict[str, Any], prompts: int, p: float | None) -> int | None:
    """Items needed for 80% power to detect this test's own interaction (its variance components, same
    prompts and replication), by :func:`fis_interventions.stats.power.power_curve` (1000 simulations, seed
    0); only for significant or near-significant tests (p < NEAR) with fewer than 5 prompts."""
    from dataclasses import replace

    from ..stats.power import items_needed, power_curve, spec_from_stats

    if p is None or p >= NEAR or prompts >= MIN_RANDOM_LEVELS:  # crossed random prompts: no closed form
        return None
    try:
        spec = spec_from_stats(res)
    except FisError:
        return None
    spec = replace(spec, prompts=prompts, reps=max(1, spec.reps // prompts))
    return items_needed(power_curve(spec, POWER_GRID, n_sims=1000, seed=0, stop_at=0.8), 0.8)


def analyze_run(run: Run, workers: int | None = None) -> Analysis:
    """Run every test of a run folder, the manipulation check and the feature-vs-matched-controls tests, correct
    within each family (BH; see :data:`FAMILY`) and reach the verdicts (:mod:`.inference`). The tests run on
    ``workers`` processes (default :func:`.parallel.report_workers`); the numbers do not depend on it."""
    res = run.results
    rows: list[dict[str, Any]] = []
    details: dict[str, list[dict[str, Any]]] = {"anova": [], "rm_anova": [], "lmm": [], "random": [], "cells": [],
                                                "simple": []}
    warns: dict[str, list[str]] = {}
    contrasts = res[res["readout_kind"] == "contrast"]
    if contrasts.empty:
        raise FisError("the results have no contrast readouts (readout_kind 'contrast'): nothing to test",
                       source=run.folder / "results.sqlite", fix="define contrasts in the design's readout")
    selected = selections(run)
    jobs: list[tuple[Any, ...]] = []
    selections_of: list[str] = []
    primary, primary_notes = primary_of(run)
    for note in primary_notes:
        warns.setdefault(note, []).append("(primary test)")
    with _quiet_engine() as python_warnings:
        manip = manipulation_check(run)
        for design_name, dsub in contrasts.groupby("design", sort=False):
            design = run.info.designs[str(design_name)]
            a, b = design.names
            levels = {a: design.factors[a], b: design.factors[b]}
            for keyvals, sub in dsub.groupby(KEYS, sort=True):
                key = dict(zip(KEYS, keyvals))
                key["feature"], key["value"] = str(key["feature"]), float(key["value"])
                jobs.append((sub, key, a, b, levels, bool(sub["prompt_id"].nunique() > 1)))
                selections_of.append(selection(selected, str(design_name), key["point"], key["feature"],
                                               set(sub["item"].astype(str))))
        # every test is independent and deterministic: fitted on the cores there are, same numbers as serial
        for (_, key, *_), chosen, (row, detail, notes, caught) in zip(jobs, selections_of,
                                                                      pmap(_test_job, jobs, workers)):
            row["selection"] = chosen
            rows.append(row)
            for name, part in detail.items():
                details[name] += part
            for note in dict.fromkeys(notes):
                warns.setdefault(note, []).append(_label(key))
            python_warnings += caught
        vs = vs_controls(run, primary)
    for msg in dict.fromkeys(python_warnings):
        warns.setdefault(msg, []).append("(python warning during the analysis)")
    tests = pd.DataFrame(rows)
    if not tests.empty:
        # The family is every real test of the run; no-op clamps (scale 1, add 0) are null checks of the
        # error-term splice whose p-values describe float noise, so they are kept out of the correction.
        # Tests of features selected on the same items they are tested on are circular (exploratory): they
        # form their own family and are never counted as findings.
        null = tests["null_check"].astype(bool)
        explo = (tests["selection"] == EXPLORATORY) & ~null
        real = ~null & ~explo
        tests["group"] = groups(tests, run)
        tests["primary"] = is_primary(tests, primary) & ~null
        family = np.where(null, None, np.where(explo, "exploratory", np.where(
            tests["primary"] & (tests["group"] == "feature"), "primary",
            np.where(tests["primary"] & (tests["group"] == "control"), "controls", "secondary"))))
        tests["family"] = family
        fam = tests["family"].fillna("(null check)")
        tests = add_qvalues(tests.assign(_p=tests["p"].where(~null), _fam=fam), p_col="_p", out="q",
                            family_cols=["_fam"])
        q_f2 = add_qvalues(tests.assign(_p=tests["p_f2"].where(~null)), p_col="_p", out="tmp",
                           family_cols=["_fam"])  # F1 is descriptive (no q); p_lmm is the primary p, whose q is `q`
        tests["q_f2"] = q_f2["tmp"]
        tests = tests.drop(columns=["_p", "_fam"])
        tests["q_family"] = tests["family"].map(FAMILIES).fillna("none (no-op null check of the splice)")
        tests.loc[null, "q_family_size"] = 0
        bad = set(manip.loc[manip["status"] == "failed", ["design", "readout"]].itertuples(index=False, name=None)) \
            if len(manip) else set()
        tests["interpretable"] = [(d, r) not in bad for d, r in zip(tests["design"], tests["readout"], strict=True)]
        tests["significant"] = (tests["q"] < ALPHA) & real
    log.info("analysed %d tests (%d engine warnings)", len(tests), len(warns))
    kl = res[res["readout_kind"] == "kl"]
    kl_table = (kl.groupby(["design", "point", "feature", "role", "intervention", "value", "position"])["shift"]
                .agg(mean_kl="mean", max_kl="max", n="size").reset_index() if not kl.empty else pd.DataFrame())
    if len(vs) and len(manip):
        bad = set(manip.loc[manip["status"] == "failed", ["design", "readout"]].itertuples(index=False, name=None))
        vs["interpretable"] = [(d, r) not in bad for d, r in zip(vs["design"], vs["readout"], strict=True)]
    verdict = verdicts(run, tests, vs, manip, primary) if not tests.empty else []
    return Analysis(tests=tests, anova=pd.DataFrame(details["anova"]), rm_anova=pd.DataFrame(details["rm_anova"]),
                    lmm=pd.DataFrame(details["lmm"]), cells=pd.DataFrame(details["cells"]), kl=kl_table,
                    simple=pd.DataFrame(details["simple"]),
                    warnings=warns, random=pd.DataFrame(details["random"]), primary=primary, manipulation=manip,
                    vs_controls=vs, verdicts=verdict)


def feature_verdicts(tests: pd.DataFrame) -> pd.DataFrame:
    """Per design x feature: how many (non no-op) tests are significant after FDR, and the largest effect."""
    if tests.empty:
        return pd.DataFrame()
    real = tests[~tests["null_check"]]
    out = []
    for (design, point, feature, role), sub in real.groupby(["design", "point", "feature", "role"], sort=False):
        group = str(sub["group"].iloc[0]) if "group" in sub else ("control" if "control" in str(role) else "feature")
        sig = sub[sub["significant"]]
        best = sig.loc[sig["partial_eta2"].idxmax()] if not sig.empty else None
        out.append({"design": design, "point": point, "feature": feature, "role": role, "group": group,
                    "selection": str(sub["selection"].iloc[0]) if "selection" in sub else NOT_SCREENED,
                    "tests": len(sub),
                    "significant": int(len(sig)), "min_q": float(np.nanmin(sub["q"])) if sub["q"].notna().any()
                    else None, "max_partial_eta2": None if best is None else float(best["partial_eta2"]),
                    "control_ok": None if group != "control" else bool(sig.empty)})
    table = pd.DataFrame(out)
    order = table["group"].map({"feature": 0, "control": 1, "alternative": 2})
    return table.assign(_o=order).sort_values("_o", kind="stable").drop(columns="_o").reset_index(drop=True)
