"""Discovery / confirmation split of a design's items, and the identities that tie a battery to its screening.

Why: ranking features on some stimuli and then testing the chosen ones on the same stimuli is circular
("double dipping", Kriegeskorte et al. 2009): noise that made a feature look like an interaction is counted
again as evidence. ``fis screen`` therefore screens on a seeded *discovery* part of the items and writes the
split into ``screen.json``; a battery whose features come ``from_screening`` runs on the held-out
*confirmation* items. The split is by item for matched items (an item's four cells stay together) and by
sentence within each cell for cell-list designs.

The split is a pure function of the item ids, the seed and the fraction: each id is ordered by
``sha256("<seed>:<id>")`` (no dependence on file order, numpy's RNG or the Python version) and the first
``round(fraction x n)`` are discovery. The checkpoint and design identities are content hashes, so a battery can
refuse a screening made on another checkpoint or another version of the design.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import FisError
from .fingerprint import json_digest

MIN_PER_SIDE = 4
DEFAULT_FRACTION = 0.5


def _order_key(seed: int, item: str) -> str:
    return hashlib.sha256(f"{seed}:{item}".encode()).hexdigest()


def _take(ids: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    ordered = sorted(ids, key=lambda i: _order_key(seed, i))
    n_disc = round(fraction * len(ids))
    chosen = set(ordered[:n_disc])
    return [i for i in ids if i in chosen], [i for i in ids if i not in chosen]


def check_fraction(fraction: float) -> float:
    """The discovery fraction must lie strictly between 0 and 1."""
    if not 0.0 < float(fraction) < 1.0:
        raise FisError(f"--discover must lie strictly between 0 and 1, got {fraction}", field="discover",
                       fix="use e.g. 0.5 (or screen every item with --all-items, exploratory)")
    return float(fraction)


def split_items(rows: pd.DataFrame, fraction: float, seed: int = 0, shape: str = "items",
                source: str | None = None) -> dict[str, Any]:
    """``{"fraction", "seed", "unit", "discovery": [ids], "confirmation": [ids]}`` for the design rows.

    ``rows`` has ``item`` and ``cell`` columns (one row per stimulus, or per stimulus x prompt). Matched items
    (``shape="items"``) are split by item; cell lists by sentence within each cell (their item ids are
    ``<cell>:<n>``). Fewer than 4 units on either side (items, or sentences of some cell) is a user error.
    """
    fraction = check_fraction(fraction)
    if shape == "items":
        ids = list(dict.fromkeys(rows["item"].astype(str)))
        disc, conf = _take(ids, fraction, seed)
        smallest = min(len(disc), len(conf))
        what = f"{len(ids)} items split {len(disc)} / {len(conf)}"
    else:
        disc, conf, smallest = [], [], None
        for _, sub in rows.groupby("cell", sort=False, observed=True):
            d, c = _take(list(dict.fromkeys(sub["item"].astype(str))), fraction, seed)
            disc += d
            conf += c
            smallest = min(len(d), len(c)) if smallest is None else min(smallest, len(d), len(c))
        what = f"sentences per cell split with as few as {smallest} on one side"
    if smallest is None or smallest < MIN_PER_SIDE:
        raise FisError(f"too few items to split: {what} (need at least {MIN_PER_SIDE} per side)",
                       source=source, field="discover",
                       fix="add items, change --discover, or screen every item with --all-items (exploratory)")
    return {"fraction": fraction, "seed": int(seed), "unit": "item" if shape == "items" else "sentence per cell",
            "discovery": disc, "confirmation": conf}


def all_items(rows: pd.DataFrame) -> dict[str, Any]:
    """The 'split' of a screening on every item (exploratory: nothing is held out)."""
    return {"fraction": 1.0, "seed": None, "unit": "none (every item screened)",
            "discovery": list(dict.fromkeys(rows["item"].astype(str))), "confirmation": []}


def design_identity(design: Any) -> str:
    """SHA-256 of the design's validated content (canonical JSON): comments and layout do not change it."""
    data = design.model_dump(mode="json")
    if data.get("critical") is None:  # a field added later: designs without it keep their identity
        data.pop("critical", None)
    return json_digest(data)


def check_same_origin(screening: dict[str, Any], source: Path, checkpoint: Path | str, checkpoint_id: str,
                      designs: dict[str, Any]) -> str:
    """The name of the battery design the screening was made on; a one-line error if its checkpoint or design
    is not the battery's. ``checkpoint_id``: the battery checkpoint's
    :func:`~fis_interventions.fingerprint.checkpoint_identity`; ``designs`` maps design name -> design identity
    of every battery design.

    Kept small and separate so a general fingerprint rule can replace its body later.
    """
    want_ck = screening.get("checkpoint_sha256")
    if want_ck is None:
        raise FisError("the screening records no checkpoint identity (made by an older fis screen)",
                       source=source, field="features.from_screening", fix="rerun `fis screen`")
    if want_ck != checkpoint_id:
        raise FisError(f"the screening was made on another checkpoint ({screening.get('checkpoint')}), not "
                       f"{checkpoint}", source=source, field="features.from_screening",
                       fix="screen this checkpoint, or point the battery at the screened one")
    want_design = screening.get("design_sha256")
    matches = [name for name, ident in designs.items() if ident == want_design]
    if not matches:
        raise FisError(f"the screening was made on design {screening.get('design_name')!r} "
                       f"({screening.get('design')}), which is not among the battery's designs (or was edited "
                       "since)", source=source, field="features.from_screening",
                       fix="list that design file unchanged in `designs`, or rescreen the edited design")
    return matches[0]
