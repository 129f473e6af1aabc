"""``fis power``: read a pilot (battery run, ``fis stats`` JSON, or numbers), simulate, write the power curve.

The statistics live in :mod:`fis_interventions.stats.power` (model-free); this module only gathers the
pilot's variance components and interaction, and writes ``power.json``, ``power.csv`` and ``power.png``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import FisError
from .stats.power import PowerSpec, items_needed, power_curve, spec_dict, spec_from_stats

log = logging.getLogger(__name__)

DEFAULT_ITEMS = (8, 12, 16, 24, 32, 48, 64, 96, 128)
SELECTORS = ("design", "feature", "intervention", "value", "position", "readout")


def pilot_from_run(folder: Path, select: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The primary analysis of one test of a battery run (selected by ``select``) and its prompt count."""
    from .reports.analysis import KEYS
    from .reports.runfolder import load_run
    from .stats import analyze_2x2

    run = load_run(folder)
    res = run.results
    rows = res[res["readout_kind"] == "contrast"]
    for key, value in select.items():
        if value is None:
            continue
        col = rows[key]
        wanted = float(value) if key == "value" else str(value)
        rows = rows[(col.astype(float) if key == "value" else col.astype(str)) == wanted]
        if rows.empty:
            raise FisError(f"the pilot run has no contrast test with {key} = {value}", source=folder,
                           field=f"--{key}", fix=f"pick a {key} present in the run's results")
    groups = rows.groupby(KEYS, sort=True)
    if groups.ngroups != 1:
        shown = "; ".join(" ".join(f"{k}={v}" for k, v in zip(KEYS, g) if k in SELECTORS)
                          for g in list(groups.groups)[:3])
        raise FisError(f"{groups.ngroups} tests of the pilot run match (e.g. {shown})", source=folder,
                       field="--feature/--readout/--value", fix="select exactly one test with those options")
    key, sub = next(iter(groups))
    design = run.info.designs[str(dict(zip(KEYS, key))["design"])]
    a, b = design.names
    prompts = int(sub["prompt_id"].nunique())
    data = sub.rename(columns={"a": a, "b": b})
    result = analyze_2x2(data, "shift", a, b, item="item", levels={a: design.factors[a], b: design.factors[b]},
                         prompt="prompt_id" if prompts > 1 else None)
    return result, prompts


def dropped_terms(result: dict[str, Any]) -> list[str]:
    """The variance terms the pilot's fit dropped or estimated at zero (singular fit): power computed with them
    at zero is optimistic, the item x interaction variance above all."""
    lmm = result.get("lmm") or {}
    notes = list(lmm.get("simplification") or [])
    zero = [f"{r['term1']} ({r['group']})" for r in lmm.get("random_effects") or []
            if r.get("term2") is None and r.get("group") != "Residual" and not (r.get("vcov") or 0.0) > 0]
    if zero:
        notes.append("variance estimated at 0: " + ", ".join(zero))
    if lmm.get("singular") and not notes:
        notes.append("singular fit")
    return notes


def _dropped_note(result: dict[str, Any]) -> list[str]:
    dropped = dropped_terms(result)
    if not dropped:
        return []
    return ["the pilot's fit dropped variance terms (" + "; ".join(dropped) + "): the simulation takes them as 0, "
            "so power is optimistic; pass --var-ab (and --var-a/--var-b) with plausible values"]


def _run_json(folder: Path) -> dict[str, Any]:
    file = folder / "run.json"
    data = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    return data if isinstance(data, dict) else {}


def selection_warning(folder: Path, select: dict[str, Any], n_tests: int) -> str | None:
    """Why the pilot's effect may be inflated (winner's curse): the test is one of several the run made (a clamp,
    readout or feature picked by its p-value) rather than the run's named (pre-registered) primary test."""
    primary = _run_json(folder).get("primary")
    if isinstance(primary, dict) and not primary.get("default") and n_tests > 0:
        same = (str(select.get("intervention", primary["intervention"])) == str(primary["intervention"])
                and float(select.get("value", primary["value"])) == float(primary["value"])
                and str(select.get("readout", primary["readout"])) == str(primary["readout"]))
        if same:
            return None
    return (f"the pilot effect comes from one of {n_tests} tests of the run, not from a pre-registered primary "
            "test: if it was chosen because it was (nearly) significant its effect is inflated and the power too "
            "optimistic; pass the smallest effect of interest with --sesoi instead")


def family_size_of(folder: Path) -> int:
    """Size of the primary family the confirmatory test will be corrected in: one primary test per feature that
    is not a control (run.json ``features``)."""
    feats = _run_json(folder).get("features") or []
    return max(1, sum(1 for f in feats if "control" not in str(f.get("role", ""))))


def read_pilot(pilot: str | Path, select: dict[str, Any], notes: list[str] | None = None) -> PowerSpec:
    """A :class:`PowerSpec` from a battery run folder or a ``fis stats`` JSON file; ``notes`` collects the
    warnings about the pilot (selected by significance, dropped variance terms)."""
    notes = notes if notes is not None else []
    path = Path(pilot)
    if not path.exists():
        raise FisError("pilot not found", source=path, fix="pass a battery run folder or a fis stats --json file")
    if path.is_dir():
        result, prompts = pilot_from_run(path, select)
        from .reports.runfolder import load_run

        res = load_run(path).results
        n_tests = res[res["readout_kind"] == "contrast"].groupby(
            ["design", "point", "feature", "intervention", "value", "position", "readout"]).ngroups
        warn = selection_warning(path, select, n_tests)
        notes += ([warn] if warn else []) + _dropped_note(result)
        spec = spec_from_stats(result, str(path))
        return replace(spec, prompts=prompts, reps=max(1, spec.reps // prompts))
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FisError(f"not a fis stats JSON file: {err}", source=path,
                       fix="pass the file written by fis stats --json") from None
    if not isinstance(result, dict) or "factors" not in result or "lmm" not in result:
        raise FisError("not a fis stats JSON file (no 'factors' / 'lmm')", source=path,
                       fix="pass the file written by fis stats --json")
    dropped = dropped_terms(result)
    if dropped:
        notes.append("the pilot's fit dropped variance terms (" + "; ".join(dropped) + "): the simulation takes "
                     "them as 0, so power is optimistic; pass --var-ab (and --var-a/--var-b) with plausible values")
    notes.append("if this pilot test was chosen because it was (nearly) significant, its effect is inflated: "
                 "prefer the smallest effect of interest (--sesoi)")
    notes += _dropped_note(result)
    notes.append("if this pilot test was chosen because it was (nearly) significant, its effect is inflated: "
                 "prefer the smallest effect of interest (--sesoi)")
    return spec_from_stats(result, str(path))


def power_figure(curve: pd.DataFrame, spec: PowerSpec, path: Path) -> Path:
    """Power against N with 95% Monte-Carlo intervals and the 80% / 90% lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    err = [curve["power"] - curve["ci_low"], curve["ci_high"] - curve["power"]]
    ax.errorbar(curve["n_items"], curve["power"], yerr=err, marker="o", capsize=3)
    for level in (0.8, 0.9):
        ax.axhline(level, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("items")
    ax.set_ylabel("power (95% Monte-Carlo CI)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"A x B interaction {spec.effect:.3g}, {spec.reps} obs/cell, {spec.prompts} prompt(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


MAX_SIMS = 1_000_000  # per item count: more is a typo, not precision (1,000 already gives a 1.6-point SE)


def power(pilot: str | Path | None = None, out: str | Path | None = None, items: Sequence[int] = DEFAULT_ITEMS,
          sims: int = 1000, seed: int = 0, alpha: float = 0.05, engine: str = "auto",
          select: dict[str, Any] | None = None, overwrite: bool = False, sesoi: float | None = None,
          family_size: int | None = None, **overrides: Any) -> dict[str, Any]:
    """Python API of ``fis power``: power of the primary interaction test over a grid of item counts.

    ``pilot``: a battery run folder (select one test with ``select`` = design/feature/intervention/value/
    position/readout) or a ``fis stats --json`` file; ``overrides`` (``effect``, ``var_item``, ``var_a``,
    ``var_b``, ``var_ab``, ``var_resid``, ``reps``, ``prompts``, ``var_prompt``) replace pilot values or,
    without a pilot, give the whole model. Returns the JSON written to ``out/power.json`` (if ``out``), a
    folder replaced only under the fingerprint rule (same settings, or ``overwrite``; never a folder fis did
    not write).

    ``sesoi``: the smallest effect of interest, used as the effect instead of the pilot's (whose estimate is
    inflated when the test was picked for its p-value; the result's ``warnings`` say when). ``family_size``: the
    number of tests the confirmatory test will be BH-corrected with (default: a run's features that are not
    controls, else 1); power is computed at ``alpha / family_size``, BH's threshold when only one test of the
    family has an effect.
    """
    from .fingerprint import Fingerprint, check_output, package_version, replace_folder

    from .provenance import check_seed

    check_seed(seed, "--seed")
    if not 1 <= sims <= MAX_SIMS:
        raise FisError(f"--sims {sims} is out of range ({sims * len(items):,} simulated data sets in all)",
                       field="--sims", fix=f"use 1 .. {MAX_SIMS:,} (1,000 gives power with a standard error of at most 1.6 points)")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    notes: list[str] = []
    if sesoi is not None:
        if sesoi <= 0:
            raise FisError("--sesoi must be positive", field="--sesoi", fix="pass the smallest effect of interest")
        overrides["effect"] = float(sesoi)
    if family_size is not None and family_size < 1:
        raise FisError("--family-size must be at least 1", field="--family-size", fix="pass the number of tests")
    target = Path(out) if out is not None else None
    if target is not None:  # a folder fis did not write is refused before any work (the fingerprint rule)
        check_output(target, Fingerprint("power", {}), overwrite=True)
    if pilot is not None:
        spec = replace(read_pilot(pilot, select or {}, notes), **overrides)
        if "effect" in overrides:  # the effect is the user's, not the (possibly selected) pilot's
            notes = [n for n in notes if "inflated" not in n]
        if family_size is None and Path(pilot).is_dir():
            family_size = family_size_of(Path(pilot))
    else:
        missing = [k for k in ("effect", "var_resid") if k not in overrides]
        if missing:
            raise FisError(f"without a pilot, --{missing[0].replace('_', '-')} is required", field=f"--{missing[0]}",
                           fix="pass a pilot (run folder or fis stats JSON) or the effect and variances")
        spec = PowerSpec(**overrides)
    if engine == "fit" or (engine == "auto" and spec.prompts >= 5):
        log.warning("%d prompts are crossed random effects: no closed form, %d full REML fits (about 1 s each)",
                    spec.prompts, sims * len(items))
    family_size = family_size or 1
    alpha_used = alpha / family_size
    if family_size > 1:
        notes.append(f"power at alpha {alpha:g}/{family_size} = {alpha_used:.3g}: the test will be corrected "
                     f"with {family_size} primary tests (BH's threshold when only one of them has an effect)")
    for note in notes:
        log.warning(note)
    used = "fit" if engine == "fit" or (engine == "auto" and spec.prompts >= 5) else "closed"
    result = {"spec": spec_dict(spec), "pilot": None if pilot is None else str(pilot), "select": select or {},
              "alpha": alpha, "family_size": family_size, "alpha_used": alpha_used,
              "effect_source": "sesoi" if sesoi is not None else ("given" if "effect" in overrides else "pilot"),
              "warnings": notes, "n_sims": sims, "seed": seed, "engine": used,
              "model": "shift ~ A*B" + (" + prompt" if 1 < spec.prompts < 5 else "")
                       + " + (1 + A + B" + (" + A:B" if spec.reps * spec.prompts > 1 else "") + " || item)"
                       + (" + crossed prompt effects" if spec.prompts >= 5 else "")
                       + ", REML, Satterthwaite df; singular fits simplified by the fixed rule"}
    fp = None
    if target is not None:  # what decides the curve is known before the simulation: a folder holding another
        # power run is refused now, not after minutes of fits
        fp = Fingerprint("power", dict(result) | {"items": list(items), "package": package_version()})
        check_output(target, fp, overwrite=overwrite, replaces_same=True)
        if pilot is not None:
            from . import recorded_paths

            result["inputs"] = recorded_paths.record_all({"pilot": pilot}, target)
    started = time.perf_counter()
    curve = power_curve(spec, items, n_sims=sims, seed=seed, alpha=alpha_used, engine=engine)
    result |= {"curve": curve.to_dict(orient="records"),
               "items_for_80": items_needed(curve, 0.8), "items_for_90": items_needed(curve, 0.9),
               "seconds": time.perf_counter() - started}
    if target is not None and fp is not None:
        from .provenance import provenance

        with replace_folder(target, fp, overwrite=overwrite) as tmp:
            curve.to_csv(tmp / "power.csv", index=False)
            power_figure(curve, spec, tmp / "power.png")
            (tmp / "power.json").write_text(json.dumps({**result, "provenance": provenance(
                seed, {k: v for k, v in result.items() if k != "curve"})}, indent=2, default=str) + "\n",
                encoding="utf-8")
        log.info("wrote %s", target)
    return result
