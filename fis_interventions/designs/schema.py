"""The pydantic schema of a factorial stimulus design (one YAML file in ``stimuli/``).

Only the *shape* of the file is checked here (types, required and unknown keys); rules that need the whole
design (every item has every cell, slots cover the template, contrasts name defined sets) live in
:mod:`.checks`, where each error can point at its own line. Counts (two factors, two levels) are checked by
a rule, not by the types, so bigger designs can be allowed later without changing the file format.
"""

from __future__ import annotations

import functools
import itertools
import string
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, PrivateAttr

from ..config import StrictModel

CELL_SEP = "."
"""Cell names join one level per factor, in factor order: ``formal.emotional``."""


def _id_to_str(value: Any) -> Any:
    """Item ids like ``7`` are common in YAML; keep them as text (bools stay errors)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _slot_value(value: Any) -> Any:
    """One clear message instead of pydantic's per-branch union errors."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return value
    raise ValueError("a slot value must be a text, or a mapping {level: text} or {cell: text} of texts "
                     "(quote numbers and words like on/off/yes/no)")


def _prompts(value: Any) -> Any:
    """Prompts are a list of texts or a mapping prompt_id -> text; say so rather than list union branches."""
    if isinstance(value, list | dict):
        return value
    raise ValueError("prompts must be a list of texts, or a mapping prompt_id -> text")


ItemId = Annotated[str, BeforeValidator(_id_to_str), Field(min_length=1)]
Text = Annotated[str, Field(min_length=1)]
SlotValue = Annotated[str | dict[str, str], BeforeValidator(_slot_value)]


class Item(StrictModel):
    """One matched item: either its text in every cell, or slot values for the template."""

    id: ItemId
    cells: dict[str, str] | None = Field(
        default=None, description="text per cell, keyed by cell name (``formal.emotional``)")
    template: str | None = Field(default=None, description="overrides the design's template for this item")
    slots: dict[str, SlotValue] | None = Field(
        default=None, description="slot -> text (same in every cell), {level: text} or {cell: text}")


class Readout(StrictModel):
    """Where and how the effect of an intervention is read."""

    position: str = Field(default="last", description="'last' token of the input, or a template slot name")
    prompts: Annotated[list[Text] | dict[str, Text], BeforeValidator(_prompts)] = Field(
        default_factory=list, description="neutral continuations appended after the stimulus")
    join: str = Field(default=" ", description="inserted between stimulus and prompt")
    targets: dict[str, list[str]] = Field(default_factory=dict, description="named target word sets")
    contrasts: dict[str, str] = Field(default_factory=dict, description="name -> 'setA - setB'")
    score: Literal["logit", "logprob"] = "logit"
    multi_token: Literal["first_token", "sum_logprob"] = "first_token"
    leading_space: bool = Field(default=True, description="score ' word' (it follows a prompt), not 'word'")

    def prompt_items(self) -> list[tuple[str, str]]:
        """(prompt_id, text) pairs; a list gets ids p1, p2, ...; no prompts gives one empty prompt."""
        if isinstance(self.prompts, dict):
            pairs = [(k, v.strip()) for k, v in self.prompts.items()]
        else:
            pairs = [(f"p{i + 1}", v.strip()) for i, v in enumerate(self.prompts)]
        return pairs or [("", "")]

    def contrast_terms(self) -> dict[str, tuple[str, str]]:
        """name -> (plus set, minus set); the syntax was checked when the design was loaded."""
        out = {}
        for name, expr in self.contrasts.items():
            plus, _, minus = expr.partition("-")
            out[name] = (plus.strip(), minus.strip())
        return out


class Design(StrictModel):
    """A 2x2 factorial design: factors, stimuli (matched items or cell lists) and the readout."""

    name: Text
    description: str = ""
    factors: dict[str, list[str]] = Field(description="ordered mapping factor -> its levels")
    template: str | None = Field(default=None, description="text with {slot} fields, filled per item")
    slots: dict[str, SlotValue] | None = Field(
        default=None, description="slot values shared by every item (an item's own slots override them)")
    items: list[Item] | None = Field(default=None, description="matched items crossed with the design")
    cells: dict[str, list[str]] | None = Field(default=None, description="independent sentences per cell")
    readout: Readout = Field(default_factory=Readout)
    critical: str | None = Field(
        default=None, description="the template slot whose tokens are the critical region: `fis screen "
        "--aggregate critical` averages a feature over them (they must have the same token count in every cell "
        "of an item)")

    _source: str | None = PrivateAttr(default=None)
    _node: Any = PrivateAttr(default=None)

    @property
    def source(self) -> str | None:
        """The file the design was loaded from, if any (used in error messages)."""
        return self._source

    @property
    def shape(self) -> Literal["items", "cells"]:
        """'items' (items crossed with the design: a random factor) or 'cells' (independent sentences)."""
        return "items" if self.items is not None else "cells"

    @property
    def cell_names(self) -> list[str]:
        """All cells in canonical order: first factor outermost, levels in file order."""
        return [CELL_SEP.join(combo) for combo in itertools.product(*self.factors.values())]

    def cell_levels(self, cell: str) -> dict[str, str]:
        """``'formal.emotional'`` -> ``{'formality': 'formal', 'emotion': 'emotional'}``."""
        return dict(zip(self.factors, cell.split(CELL_SEP), strict=True))

    def factor_of_level(self) -> dict[str, str]:
        """level -> factor (level names are unique across factors)."""
        return {lvl: fac for fac, levels in self.factors.items() for lvl in levels}

    def item_template(self, item: Item) -> str | None:
        """The template an item is rendered from (its own, else the design's), or None for literal cells."""
        if item.cells is not None:
            return None
        return item.template if item.template is not None else self.template

    def item_slots(self, item: Item) -> dict[str, SlotValue]:
        """The slot values an item is rendered with: the design's shared slots, then the item's own."""
        return {**(self.slots or {}), **(item.slots or {})}

    def slot_text(self, item: Item, slot: str, cell: str) -> str:
        """The text of one slot of one item in one cell (assumes a checked design)."""
        return _slot_text(self.item_slots(item)[slot], slot, cell)

    def render(self, item: Item, cell: str) -> tuple[str, dict[str, tuple[int, int]]]:
        """An item's text in one cell, and the character span of every slot in it."""
        template = self.item_template(item)
        if template is None:
            assert item.cells is not None
            return item.cells[cell].strip(), {}
        slots = self.item_slots(item)
        text, spans = "", {}
        for literal, field, _, _ in _parsed(template):
            text += literal
            if field is not None:
                value = _slot_text(slots[field], field, cell)
                spans[field] = (len(text), len(text) + len(value))
                text += value
        stripped = text.lstrip()
        shift = len(text) - len(stripped)
        spans = {k: (a - shift, b - shift) for k, (a, b) in spans.items()}
        return stripped.rstrip(), spans


def _slot_text(value: SlotValue, slot: str, cell: str) -> str:
    """A slot's text in a cell: one string for every cell, or per cell, or per level of either factor."""
    if isinstance(value, str):
        return value
    if cell in value:
        return value[cell]
    for level in cell.split(CELL_SEP):
        if level in value:
            return value[level]
    raise KeyError(f"slot {slot!r} has no value for cell {cell!r}")


@functools.lru_cache(maxsize=4096)
def _parsed(template: str) -> tuple[tuple[Any, ...], ...]:
    """``string.Formatter().parse`` once per distinct template (a 20,000-item design shares a few)."""
    return tuple(string.Formatter().parse(template))


def template_fields(template: str) -> list[str]:
    """Slot names used in a template, in order; raises ValueError for format syntax we do not allow."""
    return list(_template_fields(template))


@functools.lru_cache(maxsize=4096)
def _template_fields(template: str) -> tuple[str, ...]:
    fields = []
    for _, field, spec, conversion in _parsed(template):
        if field is None:
            continue
        if field == "" or not field.isidentifier():
            raise ValueError(f"'{{{field}}}' is not a slot name (use letters, digits and _; write {{{{ for a "
                             "literal brace)")
        if spec or conversion:
            raise ValueError(f"slot '{field}' has a format spec or conversion; only plain {{name}} is allowed")
        fields.append(field)
    return tuple(fields)
