"""Expansion of a design into one row per stimulus x prompt: the table every later stage consumes."""

from __future__ import annotations

import pandas as pd

from .checks import check_design
from .schema import Design

COLUMNS = ["design", "item", "cell", "stimulus", "prompt_id", "prompt", "text", "readout_start",
           "readout_end"]


def full_text(stimulus: str, prompt: str, join: str) -> str:
    """The model input: the stimulus, then ``join`` (default one space) and the prompt if there is one."""
    return f"{stimulus}{join}{prompt}" if prompt else stimulus


def expand(design: Design, *, check: bool = True) -> pd.DataFrame:
    """One row per stimulus x prompt, in file order (items, then cells in canonical order, then prompts).

    Columns: ``design, item, cell, <one per factor>, stimulus, prompt_id, prompt, text, readout_start,
    readout_end``. The effect is read at the token holding character ``readout_end - 1`` of ``text``:
    the last character of ``text`` for ``position: last``, the end of the slot for a slot position
    (``readout_start`` is where that region begins). For cell lists, ``item`` is ``<cell>:<n>`` (001, ...)
    and items are not crossed with the design (``df.attrs['shape'] == 'cells'``).
    """
    if check:  # callers that have just checked the design (validate) skip the second pass
        check_design(design)
    r = design.readout
    prompts = r.prompt_items()
    cols = COLUMNS[:3] + list(design.factors) + COLUMNS[3:]
    table: dict[str, list] = {c: [] for c in cols}  # built by column: 20,000 items x 12 rows stay fast
    levels = {cell: design.cell_levels(cell) for cell in design.cell_names}

    def add(item_id: str, cell: str, stimulus: str, spans: dict[str, tuple[int, int]]) -> None:
        for pid, prompt in prompts:
            text = full_text(stimulus, prompt, r.join)
            start, end = spans[r.position] if r.position != "last" else (0, len(text))
            for key, value in (("design", design.name), ("item", item_id), ("cell", cell), *levels[cell].items(),
                               ("stimulus", stimulus), ("prompt_id", pid), ("prompt", prompt), ("text", text),
                               ("readout_start", start), ("readout_end", end)):
                table[key].append(value)

    if design.items is not None:
        for item in design.items:
            for cell in design.cell_names:
                stimulus, spans = design.render(item, cell)
                add(item.id, cell, stimulus, spans)
    else:
        assert design.cells is not None
        for cell in design.cell_names:
            for i, sentence in enumerate(design.cells[cell]):
                add(f"{cell}:{i + 1:03d}", cell, sentence.strip(), {})
    df = pd.DataFrame(table, columns=cols)
    for factor, levels in design.factors.items():
        df[factor] = pd.Categorical(df[factor], categories=levels)
    df.attrs.update({"design": design.name, "shape": design.shape, "factors": dict(design.factors),
                     "cells": design.cell_names})
    return df
