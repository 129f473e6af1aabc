"""``validate`` and ``show``: what the ``fis stimuli`` commands print, returned as data."""

from __future__ import annotations

import functools
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FisWarning
from ..safe_yaml import gc_paused
from .checks import design_warnings
from .expand import expand
from .load import read_design
from .schema import Design
from .tokens import TargetSets, target_tokens


@functools.cache
def default_tokenizer() -> Any:
    """The default model's tokenizer, loaded once per process from its ``tokenizer.json`` (no torch, no
    transformers: validating a design takes well under a second; see :mod:`..file_tokenizer`)."""
    from ..file_tokenizer import FileTokenizer
    from ..models import DEFAULT_MODEL, resolve_model

    return FileTokenizer(resolve_model(DEFAULT_MODEL).folder)


@dataclass
class ValidationReport:
    """The result of validating one design file."""

    path: str
    design: Design
    items_per_cell: dict[str, int]
    n_prompts: int
    n_rows: int
    targets: TargetSets | None
    warnings: list[str] = field(default_factory=list)

    @property
    def n_split_words(self) -> int:
        """How many target words the tokenizer splits (0 when not tokenised)."""
        if self.targets is None:
            return 0
        return sum(w.split for words in self.targets.values() for w in words)


def _tokenize_quietly(design: Design, tokenizer: Any) -> TargetSets:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FisWarning)
        return target_tokens(design, tokenizer)


def validate(path: str | Path, tokenizer: Any = None, *, tokenize: bool = True) -> ValidationReport:
    """Check a design file, including its target words against the tokenizer; raise FisError if broken.

    Warnings are returned in the report (not emitted), so the caller decides how to show them.
    """
    with gc_paused():  # tens of thousands of items build large object trees: see safe_yaml.gc_paused
        design = read_design(path)
        found = design_warnings(design)
    targets = None
    if tokenize and design.readout.targets:
        targets = _tokenize_quietly(design, tokenizer if tokenizer is not None else default_tokenizer())
    # a checked design has every item in every cell: the counts need no expansion (`expand` builds the rows)
    counts = ({c: len(design.items) for c in design.cell_names} if design.items is not None
              else {c: len(design.cells.get(c, [])) for c in design.cell_names})
    n_rows = sum(counts.values()) * len(design.readout.prompt_items())
    return ValidationReport(str(path), design, counts, len(design.readout.prompts), n_rows, targets,
                            found + (targets.warnings if targets else []))


@dataclass
class ShowData:
    """Everything ``fis stimuli show`` prints: the design, per-cell table, prompts and target tokenisation."""

    report: ValidationReport
    cells: list[dict[str, Any]]
    prompts: list[tuple[str, str]]
    targets: list[dict[str, Any]]
    contrasts: dict[str, tuple[str, str]]


def show(path: str | Path, tokenizer: Any = None, *, tokenize: bool = True, examples: int = 2) -> ShowData:
    """Summarise a design: per cell the item count, token lengths (min/mean/max) and example texts."""
    report = validate(path, tokenizer, tokenize=tokenize)
    if tokenize and tokenizer is None:
        tokenizer = default_tokenizer()
    design = report.design
    stimuli = expand(design).drop_duplicates(["item", "cell"])
    cells = []
    for cell in design.cell_names:
        texts = stimuli.loc[stimuli["cell"] == cell, "stimulus"].tolist()
        row: dict[str, Any] = {"cell": cell, **design.cell_levels(cell), "n": len(texts),
                               "examples": texts[:examples]}
        if tokenize:
            lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
            row.update(tokens_min=min(lengths), tokens_mean=statistics.fmean(lengths), tokens_max=max(lengths))
        cells.append(row)
    targets = []
    if report.targets is not None:
        for name, words in report.targets.items():
            for w in words:
                targets.append({"set": name, "word": w.word, "tokens": list(w.tokens), "ids": list(w.all_ids),
                                "scored_ids": list(w.token_ids), "split": w.split})
    else:
        targets = [{"set": n, "word": w, "tokens": None, "ids": None, "scored_ids": None, "split": None}
                   for n, ws in design.readout.targets.items() for w in ws]
    prompts = [p for p in design.readout.prompt_items() if p[1]]
    return ShowData(report, cells, prompts, targets, design.readout.contrast_terms())
