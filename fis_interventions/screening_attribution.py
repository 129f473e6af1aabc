"""`fis screen --method attribution|ig`: the screening table's causal columns, next to the activation ones.

Why a separate module: :mod:`fis_interventions.screening` owns the activation screen; this adds, for every
feature of every point, the 2x2 interaction of its *estimated effect on the readout contrast*
(:mod:`fis_interventions.attribution`) per stimulus, with the same within-item model (or OLS for cell lists),
on the same discovery items, BH across every feature of every point (one family per method and clamp value).

Columns per method ``m`` (``attribution`` or ``ig``) and clamp label ``L`` (``zero``, ``set_<v>``):
``m_L_effect`` (the interaction contrast of the estimated shift: mean over items of a1b1 - a1b2 - a2b1 + a2b2,
cell means in the design's level order), ``m_L_F_ab``, ``m_L_p_ab``, ``m_L_q_ab``, and ``m_L_mean_<a>_<b>`` (the
estimated shift per cell: what a feature card shows). A stimulus' estimate is the mean over the design's prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from .attribution import (GRADIENT_METHODS, AttributionResult, Attributor, check_precision, check_steps, clamp_label,
                          parse_methods)


def prompt_means(rows: pd.DataFrame, stim_rows: pd.DataFrame) -> np.ndarray:
    """[n_stimuli, n_rows]: the averaging matrix from readout rows (stimulus x prompt) to the stimuli of
    ``stim_rows`` (mean over the prompts of each (item, cell)); one matrix product per estimate."""
    index = {k: i for i, k in enumerate(zip(stim_rows["item"].astype(str), stim_rows["cell"].astype(str),
                                            strict=True))}
    slot = np.array([index[k] for k in zip(rows["item"].astype(str), rows["cell"].astype(str), strict=True)])
    M = np.zeros((len(stim_rows), len(rows)))
    M[slot, np.arange(len(rows))] = 1.0
    counts = M.sum(1, keepdims=True)
    if (counts == 0).any():
        raise ValueError("a stimulus has no readout row")
    return M / counts


def per_stimulus(result: AttributionResult, stim_rows: pd.DataFrame, point: str, value: float) -> np.ndarray:
    """The estimated shift of clamping each feature to ``value`` [n_stimuli, width], averaged over the prompts
    of each (item, cell), in the order of ``stim_rows`` (the activation screen's rows)."""
    return prompt_means(result.rows, stim_rows) @ result.estimate(point, "set", value)


def attribution_table(results: dict[str, AttributionResult], stim_rows: pd.DataFrame, a: str, b: str,
                      levels: dict[str, list[str]], item: str | None, clamps: Sequence[float]) -> pd.DataFrame:
    """``point, feature`` + the columns of every method and clamp value (see the module docstring). Every
    (method, clamp, point) block is tested in one vectorised call (:func:`~fis_interventions.screening.
    screen_blocks`, shared with the activation screen); BH per (method, clamp) over every point."""
    from .screening import screen_blocks
    from .stats.fdr import fdr_bh

    la, lb = levels[a], levels[b]
    blocks: dict[tuple[str, float, str], np.ndarray] = {}
    for method, res in results.items():
        M = prompt_means(res.rows, stim_rows)
        for value in clamps:
            for point in res.A:
                blocks[method, value, point] = M @ res.estimate(point, "set", value)
    tested = screen_blocks(blocks, stim_rows, a, b, levels, item)
    parts: list[pd.DataFrame] = []
    for method, res in results.items():
        for value in clamps:
            prefix = f"{method}_{clamp_label(value)}_"
            per_point = []
            for point in res.A:
                s = tested[method, value, point]
                cell = {(x, y): s[f"mean_{x}_{y}"].to_numpy() for x in la for y in lb}
                effect = cell[la[0], lb[0]] - cell[la[0], lb[1]] - cell[la[1], lb[0]] + cell[la[1], lb[1]]
                part = pd.DataFrame({"point": point, "feature": s["feature"].to_numpy(), "effect": effect,
                                     "F_ab": s["F_ab"].to_numpy(), "p_ab": s["p_ab"].to_numpy()})
                for x in la:
                    for y in lb:
                        part[f"mean_{x}_{y}"] = cell[x, y]
                per_point.append(part)
            block = pd.concat(per_point, ignore_index=True)
            block.insert(block.columns.get_loc("p_ab") + 1, "q_ab", fdr_bh(block["p_ab"].to_numpy()))
            parts.append(block.set_index(["point", "feature"]).add_prefix(prefix))
    return pd.concat(parts, axis=1).reset_index()


def attributors(attached: Any, design: Any, stim_rows: pd.DataFrame, points: Sequence[str],
                methods: Sequence[str], *, steps: int = 16, contrast: str | None = None,
                precision: str = "float32") -> dict[str, Attributor]:
    """One :class:`~fis_interventions.attribution.Attributor` per gradient method over the battery's readout
    rows of the stimuli in ``stim_rows`` (every prompt of every discovery stimulus). Built before any model work:
    a bad contrast, readout or target word is refused here (one line, exit 2)."""
    from .designs import expand

    rows = expand(design)
    keep = set(zip(stim_rows["item"].astype(str), stim_rows["cell"].astype(str), strict=True))
    rows = rows[[(str(i), str(c)) in keep for i, c in zip(rows["item"], rows["cell"], strict=True)]]
    return {m: Attributor(attached, design, rows, points, contrast=contrast, method=m, steps=steps,
                          precision=precision, pack=True)  # the screen needs each stimulus' mean over prompts
            for m in methods if m in GRADIENT_METHODS}


def shared_pass(accs: dict[str, Attributor], stim_rows: pd.DataFrame) -> Any:
    """The callback :func:`~fis_interventions.screening.collect` calls with each batch's prefix pass and clean
    joint forward, when the readout rows ARE the stimuli (a design without prompts: one row per stimulus, in the
    same order), so the attribution reuses the activation screen's pass instead of running its own; ``None``
    otherwise. A batch whose tokens differ from the battery's encoding (e.g. another pad id) is run apart."""
    if not accs:
        return None
    rows = next(iter(accs.values())).rows
    same = (len(rows) == len(stim_rows)
            and (rows["item"].astype(str).to_numpy() == stim_rows["item"].astype(str).to_numpy()).all()
            and (rows["cell"].astype(str).to_numpy() == stim_rows["cell"].astype(str).to_numpy()).all())
    if not same:
        return None

    def on_batch(start: int, ids: torch.Tensor, mask: torch.Tensor, resid: torch.Tensor, state: Any,
                 out: Any) -> None:
        for acc in accs.values():
            enc = acc.encode(start, start + len(ids))
            match = (enc.tokens.shape == ids.shape and torch.equal(enc.tokens.to(ids.device), ids)
                     and torch.equal(enc.mask.to(mask.device).to(mask.dtype), mask))
            acc.batch(start, enc, (resid, state) if match else None, out if match else None)

    return on_batch


def add_attribution(table: pd.DataFrame, accs: dict[str, Attributor], stim_rows: pd.DataFrame, *, a: str, b: str,
                    levels: dict[str, list[str]], item: str | None, steps: int = 16, clamps: Sequence[float] = (),
                    batch_size: int = 16, progress: bool = False) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The activation ``table`` with the attribution columns merged in (same rows), and the summary entries.
    Rows the shared pass did not cover (a design with prompts) are run here, ``batch_size`` at a time."""
    for acc in accs.values():
        acc.run(batch_size, progress)
    results = {m: acc.result() for m, acc in accs.items()}
    values = list(dict.fromkeys([0.0, *map(float, clamps)]))
    first = next(iter(results.values()))
    extra = attribution_table(results, stim_rows, a, b, levels, item, values)
    merged = table.merge(extra, on=["point", "feature"], how="left", validate="one_to_one")
    summary = {"contrast": first.contrast, "clamps": values, "steps": steps if "ig" in results else None,
               "precision": first.precision,
               "packed": any(r.packed for r in results.values()),
               "readout_rows": int(len(first.rows)),
               "estimate": "first-order (attribution) / integrated-gradient (ig) estimate of the battery's "
                           "contrast shift when the feature is set to the clamp value at every kept position; "
                           "per stimulus the mean over the prompts",
               "family": {f"{m}_{clamp_label(v)}": "interaction term of every non-degenerate feature of every "
                          "point" for m in results for v in values},
               "n_q_below_alpha": {f"{m}_{clamp_label(v)}": int((merged[f"{m}_{clamp_label(v)}_q_ab"] < 0.05).sum())
                                   for m in results for v in values},
               # each (method, clamp) is its own BH family: the features whose estimate varies, not the
               # activation screen's family
               "family_size": {f"{m}_{clamp_label(v)}": int(merged[f"{m}_{clamp_label(v)}_p_ab"].notna().sum())
                               for m in results for v in values},
               "warnings": [w for r in results.values() for w in r.warnings]}
    return merged, summary


def rank_column(method: str) -> str:
    """The p-value column a method's ranking uses (zero ablation for the gradient methods)."""
    return "p_ab" if method == "activation" else f"{method}_zero_p_ab"


def ranked_top(table: pd.DataFrame, method: str, n: int) -> list[dict[str, Any]]:
    """The ``n`` features with the smallest interaction p of ``method`` (top.json entries, same keys as the
    activation screen's so a battery ``from_screening`` reads them)."""
    if method == "activation":
        from .screening import top_features

        return top_features(table, n)
    pre = f"{method}_zero_"
    ok = table[table[pre + "p_ab"].notna()].sort_values([pre + "p_ab", "point", "feature"], kind="stable").head(n)
    return [{"point": str(r["point"]), "feature": int(r["feature"]), "F_ab": float(r[pre + "F_ab"]),
             "p_ab": float(r[pre + "p_ab"]), "q_ab": float(r[pre + "q_ab"]), "effect": float(r[pre + "effect"]),
             "ranked_by": method} for _, r in ok.iterrows()]


def check_method_args(method: str | Sequence[str], steps: int, precision: str = "float32") -> list[str]:
    """Validate ``--method``, ``--steps`` and ``--precision`` before anything is loaded."""
    methods = parse_methods(method)
    check_steps(steps)
    check_precision(precision)
    return methods


def echo_attribution(summary: dict[str, Any]) -> None:
    """The CLI's lines for the attribution columns: what was attributed, and the q < alpha counts."""
    import typer

    att = summary["attribution"]
    typer.echo(f"attribution of contrast {att['contrast']!r} ({att['readout_rows']} readout rows, clamps "
               f"{', '.join(f'{v:g}' for v in att['clamps'])}, suffix in {att.get('precision', 'float32')}); "
               f"ranked by {summary['ranked_by']}")
    for key, n in att["n_q_below_alpha"].items():
        size = att.get("family_size", {}).get(key, summary["family_size"])
        typer.echo(f"{key}: {n} of {size} features with interaction q < 0.05 (BH over all points)")


def attribution_of(table: pd.DataFrame, point: str, feature: int, levels: dict[str, list[str]]
                   ) -> dict[str, Any] | None:
    """A feature's attribution per cell of the design (zero ablation, first gradient method in the table):
    what its card shows. ``None`` if the table has no attribution columns."""
    methods = [m for m in GRADIENT_METHODS if f"{m}_zero_p_ab" in table.columns]
    if not methods:
        return None
    row = table[(table["point"] == point) & (table["feature"] == feature)]
    if row.empty:
        return None
    r = row.iloc[0]
    a, b = list(levels)
    out = {"method": methods[0], "clamp": 0.0, "levels": {k: list(v) for k, v in levels.items()}, "cells": {}}
    pre = f"{methods[0]}_zero_"
    for x in levels[a]:
        for y in levels[b]:
            out["cells"][f"{x}.{y}"] = float(r[f"{pre}mean_{x}_{y}"])
    out.update({"effect": float(r[pre + "effect"]), "F_ab": float(r[pre + "F_ab"]), "p_ab": float(r[pre + "p_ab"]),
                "q_ab": float(r[pre + "q_ab"]),
                "activation_p_ab": float(r["p_ab"]) if "p_ab" in r and pd.notna(r["p_ab"]) else None})
    return out


def levels_from_table(table: pd.DataFrame, method: str = "attribution") -> dict[str, list[str]] | None:
    """The design's levels, recovered from the ``<method>_zero_mean_<a>_<b>`` columns (report side, where only
    screening.csv is at hand); ``None`` if absent. Levels must not contain '_' to be recovered."""
    pre = f"{method}_zero_mean_"
    pairs = [c[len(pre):].split("_") for c in table.columns if c.startswith(pre)]
    if len(pairs) != 4 or any(len(p) != 2 for p in pairs):
        return None
    a_levels = list(dict.fromkeys(p[0] for p in pairs))
    b_levels = list(dict.fromkeys(p[1] for p in pairs))
    return {"A": a_levels, "B": b_levels}
