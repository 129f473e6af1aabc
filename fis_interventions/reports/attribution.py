"""The report's attribution block: for each clamped feature, what the attribution screen estimated (the readout
contrast's shift under zero ablation, per cell and its interaction) next to the activation screen's p.

Why a separate block: the battery measures what a clamp does; the screening table (``screening.csv`` in the run
folder, from ``fis screen --method activation,attribution``) holds the estimate that selected or ranked the
feature, so a reader can see whether the estimate and the measurement agree. Nothing is shown for a screening
without attribution columns.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from ..screening_attribution import attribution_of
from .render import Doc
from .runfolder import Run


def _levels(run: Run) -> dict[str, list[str]] | None:
    for design in run.info.designs.values():
        return {k: list(v) for k, v in design.factors.items()}
    return None


def attach_to_cards(run: Run, cards: dict[tuple[str, int], dict[str, Any]] | None) -> None:
    """Give every report card its attribution per cell (from the run's screening table), where there is one."""
    levels = _levels(run)
    if not cards or run.screening is None or levels is None:
        return
    for (point, index), card in cards.items():
        att = attribution_of(run.screening, point, index, levels)
        if att is not None:
            card["attribution"] = att


def attribution_section(doc: Doc, run: Run) -> None:
    """A small section: one row per clamped feature with both screens' statistics and the estimated shifts."""
    levels = _levels(run)
    if run.screening is None or levels is None:
        return
    rows = []
    for f in run.info.features:
        for label in str(f.feature).split(","):
            if not label.isdigit():
                continue
            att = attribution_of(run.screening, f.point, int(label), levels)
            if att is None:
                return  # no attribution columns in this screening
            rows.append({"point": f.point, "feature": int(label), "role": f.role,
                         "activation p_ab": att["activation_p_ab"], "attribution effect": att["effect"],
                         "attribution p_ab": att["p_ab"], "attribution q_ab": att["q_ab"],
                         **{f"est. {cell}": v for cell, v in att["cells"].items()}})
    if not rows:
        return
    doc.h(1, "Attribution screen")
    doc.p("The screening's first-order estimate of each clamped feature's effect on the readout contrast "
          "(zero ablation; gradient x change, mean over the discovery stimuli of each cell and the prompts), its "
          "2x2 interaction and q (BH over every feature screened), next to the activation screen's interaction "
          "p. Compare with the measured shifts above; see docs/attribution.md for the validation.")
    doc.table(pd.DataFrame(rows), "Attribution estimates of the clamped features (screening.csv).")
