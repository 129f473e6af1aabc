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


def read_pilot(pilot: str | Path, select: dict[str, Any]) -> PowerSpec:
    """A :class:`PowerSpec` from a battery run folder or a ``fis stats`` JSON file."""
    path = Path(pilot)
    if not path.exists():
        raise FisError("pilot not found", source=path, fix="pass a battery run folder or a fis stats --json file")
    if path.is_dir():
        result, prompts = pilot_from_run(path, select)
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


def power(pilot: str | Path | None = None, out: str | Path | None = None, items: Sequence[int] = DEFAULT_ITEMS,
          sims: int = 1000, seed: int = 0, alpha: float = 0.05, engine: str = "auto",
          select: dict[str, Any] | None = None, overwrite: bool = False, **overrides: Any) -> dict[str, Any]:
    """Python API of ``fis power``: power of the primary interaction test over a grid of item counts.

    ``pilot``: a battery run folder (select one test with ``select`` = design/feature/intervention/value/
    position/readout) or a ``fis stats --json`` file; ``overrides`` (``effect``, ``var_item``, ``var_a``,
    ``var_b``, ``var_ab``, ``var_resid``, ``reps``, ``prompts``, ``var_prompt``) replace pilot values or,
    without a pilot, give the whole model. Returns the JSON written to ``out/power.json`` (if ``out``), a
    folder replaced only under the fingerprint rule (same settings, or ``overwrite``; never a folder fis did
    not write).
    """
    from .fingerprint import Fingerprint, check_output, package_version, replace_folder

    overrides = {k: v for k, v in overrides.items() if v is not None}
    target = Path(out) if out is not None else None
    if target is not None:  # a folder fis did not write is refused before any work (the fingerprint rule)
        check_output(target, Fingerprint("power", {}), overwrite=True)
    if pilot is not None:
        spec = replace(read_pilot(pilot, select or {}), **overrides)
    else:
        missing = [k for k in ("effect", "var_resid") if k not in overrides]
        if missing:
            raise FisError(f"without a pilot, --{missing[0].replace('_', '-')} is required", field=f"--{missing[0]}",
                           fix="pass a pilot (run folder or fis stats JSON) or the effect and variances")
        spec = PowerSpec(**overrides)
    if engine == "fit" or (engine == "auto" and spec.prompts >= 5):
        log.warning("%d prompts are crossed random effects: no closed form, %d full REML fits (about 1 s each)",
                    spec.prompts, sims * len(items))
    started = time.perf_counter()
    curve = power_curve(spec, items, n_sims=sims, seed=seed, alpha=alpha, engine=engine)
    seconds = time.perf_counter() - started
    used = "fit" if engine == "fit" or (engine == "auto" and spec.prompts >= 5) else "closed"
    result = {"spec": spec_dict(spec), "pilot": None if pilot is None else str(pilot), "select": select or {},
              "alpha": alpha, "n_sims": sims, "seed": seed, "engine": used,
              "model": "shift ~ A*B" + (" + prompt" if 1 < spec.prompts < 5 else "")
                       + " + (1 + A + B" + (" + A:B" if spec.reps * spec.prompts > 1 else "") + " || item)"
                       + (" + crossed prompt effects" if spec.prompts >= 5 else "")
                       + ", REML, Satterthwaite df; singular fits simplified by the fixed rule",
              "curve": curve.to_dict(orient="records"),
              "items_for_80": items_needed(curve, 0.8), "items_for_90": items_needed(curve, 0.9),
              "seconds": seconds}
    if target is not None:
        from .provenance import provenance

        fp = Fingerprint("power", {k: v for k, v in result.items() if k not in ("curve", "seconds", "items_for_80",
                                                                            "items_for_90")}
                         | {"items": list(items), "package": package_version()})
        with replace_folder(target, fp, overwrite=overwrite) as tmp:
            curve.to_csv(tmp / "power.csv", index=False)
            power_figure(curve, spec, tmp / "power.png")
            (tmp / "power.json").write_text(json.dumps({**result, "provenance": provenance(
                seed, {k: v for k, v in result.items() if k != "curve"})}, indent=2, default=str) + "\n",
                encoding="utf-8")
        log.info("wrote %s", target)
    return result
