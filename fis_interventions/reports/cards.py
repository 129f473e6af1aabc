"""Feature cards for a report: one card per clamped feature, built from the run's checkpoint and its harvest.

Why here: the report is where a reader meets "feature 2268: 3 of 6 tests significant" and asks what feature
2268 is. The cards come from :func:`fis_interventions.cards.build_cards` (one pass over the harvest for all
features of the run). Cards need the checkpoint, its harvest and the model: with ``enabled=None`` (the
default) a report of a run whose checkpoint or harvest is not reachable is still written, with a warning;
``enabled=True`` makes that an error and ``False`` skips cards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import recorded_paths
from ..errors import FisError
from .runfolder import Run


def feature_indices(label: Any) -> list[int]:
    """``"12"`` -> [12]; a group edited together, ``"12,40"`` -> [12, 40]; anything else -> []."""
    try:
        return [int(t) for t in str(label).split(",")]
    except ValueError:
        return []


def _run_design(run: Run) -> tuple[Any, list[str] | None, str]:
    """The run's (first) design, read from its recorded file, the items the battery tested, and the aggregate
    of the screening that chose the features (``last``, the screen's default, when none is recorded)."""
    import json

    for name, info in run.info.designs.items():
        if not info.file:
            continue
        path = recorded_paths.resolve(run.folder, None, info.file)
        if path is None or not path.is_file():
            continue
        from ..designs import read_design

        design = read_design(path)
        items = sorted(set(run.results.loc[run.results["design"] == name, "item"].astype(str)))
        aggregate = "last"
        for f in run.info.features:
            screening = ((f.model_extra or {}).get("selected_on") or {}).get("screening")
            summary = Path(str(screening)) / "screen.json" if screening else None
            if summary is not None and summary.is_file():
                aggregate = str(json.loads(summary.read_text(encoding="utf-8")).get("aggregate", "last"))
                break
        return design, items, aggregate
    return None, None, "last"


def report_cards(run: Run, enabled: bool | None = None, activations: str | Path | None = None, bridge: Any = None,
                 top: int = 10) -> tuple[dict[tuple[str, int], dict[str, Any]], list[str]]:
    """``({(point, index): card}, warnings)`` for every feature clamped in the run."""
    from ..cards import FeatureKey, build_cards
    from ..cards.directions import CARD_POINTS

    if enabled is False:
        return {}, []
    pairs = [(f.point, f.feature) for f in run.info.features]
    if not pairs:
        pairs = list(run.results[["point", "feature"]].drop_duplicates().itertuples(index=False, name=None))
    keys = list(dict.fromkeys(FeatureKey(str(p), i) for p, label in pairs for i in feature_indices(label)
                              if p in CARD_POINTS))
    warnings = [f"no card for features at {p}: cards cover {', '.join(CARD_POINTS)}"
                for p in dict.fromkeys(str(p) for p, _ in pairs) if p not in CARD_POINTS]
    if not keys:
        return {}, warnings
    checkpoint = run_checkpoint(run)
    try:
        if not checkpoint.exists():
            raise FisError("checkpoint not found, so the report has no feature cards", source=checkpoint,
                           field="checkpoint", fix="move the checkpoint back beside the run folder, or pass "
                           "--no-cards")
        design, items, aggregate = _run_design(run)
        cards = build_cards(checkpoint, keys, activations=activations, top=top, bridge=bridge, design=design,
                            design_items=items, aggregate=aggregate)
        if design is None and run.info.designs:
            warnings.append("the cards show no activation on the design's stimuli: the design file recorded in "
                            "run.json was not found")
    except FisError as err:
        if enabled:
            raise
        return {}, [*warnings, f"no feature cards: {err}"]
    return {(c["point"], c["feature"]): c for c in cards}, warnings


def run_checkpoint(run: Run) -> Path:
    """The battery's checkpoint: absolute, relative to the run folder, or as the battery was given it."""
    recorded = (run.info.model_extra or {}).get("inputs", {}).get("checkpoint")
    return recorded_paths.resolve(run.folder, recorded, run.info.checkpoint)


def check_card_inputs(run: Run, activations: str | Path | None) -> None:
    """``--cards`` (required cards): the checkpoint and its harvest must be reachable, checked before the
    analysis (minutes of model fits) rather than after it."""
    from ..cards.build import harvest_folder
    from ..sae import load_checkpoint

    checkpoint = run_checkpoint(run)
    if not checkpoint.exists():
        raise FisError("checkpoint not found, so the report cannot have feature cards", source=checkpoint,
                       field="checkpoint", fix="move the checkpoint back beside the run folder, or pass --no-cards")
    harvest_folder(load_checkpoint(checkpoint), activations)
