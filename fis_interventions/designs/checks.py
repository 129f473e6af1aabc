"""Rules a design must satisfy beyond its types; each error names the file, line, field and a fix.

:func:`check_design` raises :class:`FisError` for the first problem; :func:`design_warnings` lists problems
that do not stop a run (unbalanced cells, an item whose cells share a text, ...).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, NoReturn

import yaml

from ..config import format_loc, line_of
from ..errors import FisError
from .schema import CELL_SEP, Design, Item, template_fields

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
SET_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
CONTRAST_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*-\s*([A-Za-z_][A-Za-z0-9_]*)\s*$")
RESERVED = {"design", "item", "cell", "stimulus", "prompt", "prompt_id", "text", "readout_start",
            "readout_end"}
N_FACTORS, N_LEVELS = 2, 2  # this version runs 2x2 designs; the file format allows more


def fail(design: Design | None, loc: tuple[Any, ...], message: str, fix: str | None = None, *,
         source: str | None = None, node: yaml.Node | None = None) -> NoReturn:
    """Raise a FisError pointing at ``loc`` (a path of keys and list indices) in the design's file."""
    if design is not None:
        source = source or design.source
        node = node if node is not None else design._node
    line = line_of(node, loc) if node is not None else None
    where = f"line {line}: " if line else ""
    raise FisError(f"{where}{message}", source=source or "<design>", field=format_loc(loc), fix=fix)


_BOOL_TAG = "tag:yaml.org,2002:bool"
KL_READOUT = "__kl__"  # the battery's KL row (interventions/battery.py)


def check_yaml_booleans(node: yaml.Node | None, source: str, loc: tuple[Any, ...] = ()) -> None:
    """YAML 1.1 reads bare on/off/yes/no as booleans: 'link: on' would not be the word "on". Make it an error.

    Iterative, and each node is checked once however many aliases reach it (the tree was bounded by
    :func:`..safe_yaml.check_tree`, but walking every alias expansion would still multiply the work)."""
    seen: set[int] = set()
    todo: list[tuple[yaml.Node | None, tuple[Any, ...]]] = [(node, loc)]
    while todo:
        node, loc = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _BOOL_TAG and node.value.lower() not in ("true", "false"):
                raise FisError(f"line {node.start_mark.line + 1}: YAML reads the bare word '{node.value}' as a "
                               "boolean, not as text", source=source,
                               field=format_loc(loc) if loc else node.value,
                               fix=f"quote it: \"{node.value}\" (or write true/false for a switch)")
        elif isinstance(node, yaml.MappingNode):
            for key, value in reversed(node.value):
                todo.append((value, (*loc, getattr(key, "value", "?"))))
                todo.append((key, loc))
        elif isinstance(node, yaml.SequenceNode):
            todo.extend((value, (*loc, i)) for i, value in reversed(list(enumerate(node.value))))


def check_design(design: Design) -> None:
    """Raise FisError for the first rule the design breaks."""
    _check_factors(design)
    _check_stimuli(design)
    _check_readout(design)
    _check_critical(design)


def _check_factors(d: Design) -> None:
    if len(d.factors) != N_FACTORS:
        fail(d, ("factors",), f"a design needs exactly {N_FACTORS} factors, got {len(d.factors)} "
             f"({', '.join(d.factors) or 'none'})", "this version runs 2x2 designs: keep two factors")
    seen: dict[str, str] = {}
    for factor, levels in d.factors.items():
        loc = ("factors", factor)
        if not NAME_RE.match(factor):
            fail(d, loc, f"factor name '{factor}' is not a plain name", "use letters, digits, _ or -")
        if factor in RESERVED:
            fail(d, loc, f"factor name '{factor}' is reserved (a column of the expanded table)",
                 f"rename it; reserved: {', '.join(sorted(RESERVED))}")
        if len(levels) != N_LEVELS:
            fail(d, loc, f"factor '{factor}' needs exactly {N_LEVELS} levels, got {len(levels)} "
                 f"({', '.join(levels) or 'none'})", "list two levels, e.g. [formal, informal]")
        for i, level in enumerate(levels):
            if not NAME_RE.match(level):
                fail(d, (*loc, i), f"level '{level}' is not a plain name (no dots or spaces)",
                     "use letters, digits, _ or -")
            if level in seen:
                fail(d, (*loc, i), f"level '{level}' is used twice (also in factor '{seen[level]}')",
                     "level names must be unique across all factors, since cells are named by levels")
            seen[level] = factor


def _cell_key_fix(d: Design, key: str) -> str:
    """Suggest the canonical cell name for a key with the levels in another order, or list the cells."""
    parts = key.split(CELL_SEP)
    for cell in d.cell_names:
        if sorted(cell.split(CELL_SEP)) == sorted(parts):
            return f"write it as '{cell}' (levels in factor order: {', '.join(d.factors)})"
    return f"cells are: {', '.join(d.cell_names)}"


def _check_cell_keys(d: Design, keys: list[str], loc: tuple[Any, ...], what: str) -> None:
    for key in keys:
        if key not in d.cell_names:
            fail(d, (*loc, key), f"'{key}' is not a cell of this design", _cell_key_fix(d, key))
    missing = [c for c in d.cell_names if c not in keys]
    if missing:
        fail(d, loc, f"{what} has no text for cell(s) {', '.join(missing)}",
             f"add {', '.join(missing)}: every cell needs a text")


def _check_stimuli(d: Design) -> None:
    if (d.items is None) == (d.cells is None):
        both = "both 'items' and 'cells'" if d.items is not None else "neither 'items' nor 'cells'"
        fail(d, ("cells",) if d.items is not None else (), f"the design has {both}",
             "give matched 'items' (one text per cell each) or 'cells' (a list of sentences per cell)")
    if d.cells is not None:
        for key in ("template", "slots"):
            if getattr(d, key) is not None:
                fail(d, (key,), f"'{key}' is only used with 'items'", "remove it or use 'items'")
        _check_cell_keys(d, list(d.cells), ("cells",), "'cells'")
        for cell, texts in d.cells.items():
            if not texts:
                fail(d, ("cells", cell), f"cell '{cell}' has no sentences", "add sentences to it")
            for i, text in enumerate(texts):
                if not text.strip():
                    fail(d, ("cells", cell, i), "empty sentence", "remove it or write the sentence")
        return
    assert d.items is not None
    if not d.items:
        fail(d, ("items",), "'items' is empty", "add at least one item")
    if d.template is not None:
        _check_template(d, d.template, ("template",))
    used = {f for it in d.items for f in template_fields(d.item_template(it) or "")
            if d.item_template(it) is not None and _parses(d.item_template(it))}
    for slot in d.slots or {}:
        if slot not in used:
            fail(d, ("slots", slot), f"shared slot '{slot}' is not used by any template",
                 "remove it or check its spelling")
    ids: dict[str, int] = {}
    for i, item in enumerate(d.items):
        if item.id in ids:
            fail(d, ("items", i, "id"), f"item id '{item.id}' is used twice (also items[{ids[item.id]}])",
                 "give every item a unique id")
        ids[item.id] = i
        _check_item(d, item, ("items", i))


def _parses(template: str | None) -> bool:
    try:
        template_fields(template or "")
        return True
    except ValueError:
        return False


def _check_template(d: Design, template: str, loc: tuple[Any, ...]) -> list[str]:
    try:
        fields = template_fields(template)
    except ValueError as err:
        fail(d, loc, f"bad template: {err}", "write slots as {name}")
    if not fields:
        fail(d, loc, "the template has no {slot}", "add slots, e.g. '{subject} {verb} the report.'")
    return fields


def _check_item(d: Design, item: Item, loc: tuple[Any, ...]) -> None:
    label = f"item '{item.id}'"
    if item.cells is not None:
        if item.slots is not None or item.template is not None:
            fail(d, loc, f"{label} has both 'cells' and 'slots'/'template'", "give one or the other")
        _check_cell_keys(d, list(item.cells), (*loc, "cells"), label)
        for cell, text in item.cells.items():
            if not text.strip():
                fail(d, (*loc, "cells", cell), f"{label} has an empty text in cell '{cell}'", "write it")
        return
    template = d.item_template(item)
    if template is None:
        fail(d, loc, f"{label} has neither 'cells' nor a template",
             "give 'cells' (one text per cell) or 'slots' with a template")
    tloc = (*loc, "template") if item.template is not None else ("template",)
    fields = _check_template(d, template, tloc)
    slots = d.item_slots(item)
    for field in fields:
        if field not in slots:
            fail(d, (*loc, "slots") if item.slots is not None else loc,
                 f"{label}: template slot '{field}' has no value", f"add 'slots: {{{field}: ...}}' to the item")
    for slot in item.slots or {}:
        if slot not in fields:
            fail(d, (*loc, "slots", slot), f"{label}: slot '{slot}' is not in the template '{template}'",
                 "remove it or check its spelling")
    _check_slot_values(d, slots, item, loc)


def _check_slot_values(d: Design, slots: dict[str, Any], item: Item, loc: tuple[Any, ...]) -> None:
    label = f"item '{item.id}'"
    levels = d.factor_of_level()
    for slot, value in slots.items():
        own = item.slots is not None and slot in item.slots
        sloc = (*loc, "slots", slot) if own else ("slots", slot)
        if isinstance(value, str):
            continue
        if not value:
            fail(d, sloc, f"{label}: slot '{slot}' has an empty mapping", "give a text or {level: text}")
        keys = list(value)
        if all(k in d.cell_names for k in keys):
            missing = [c for c in d.cell_names if c not in keys]
            if missing:
                fail(d, sloc, f"{label}: slot '{slot}' has no value for cell(s) {', '.join(missing)}",
                     "give a value for every cell, or key the slot by the levels of one factor")
            continue
        for k in keys:
            if k not in levels:
                fail(d, (*sloc, k), f"{label}: slot '{slot}' key '{k}' is not a level or a cell",
                     f"levels are: {', '.join(levels)}")
        factors = {levels[k] for k in keys}
        if len(factors) > 1:
            fail(d, sloc, f"{label}: slot '{slot}' mixes levels of {' and '.join(sorted(factors))}",
                 "key it by the levels of ONE factor, or by cell names like "
                 f"'{d.cell_names[0]}' for every cell")
        factor = factors.pop()
        missing = [lvl for lvl in d.factors[factor] if lvl not in keys]
        if missing:
            fail(d, sloc, f"{label}: slot '{slot}' has no value for level(s) {', '.join(missing)} "
                 f"of factor '{factor}'", f"add {', '.join(missing)}: ...")


def _check_critical(d: Design) -> None:
    """The critical region is a slot every item's template fills, so its tokens can be found in every cell."""
    if d.critical is None:
        return
    if d.items is None:
        fail(d, ("critical",), f"critical region '{d.critical}' needs matched items rendered from a template "
             "(cell lists have no slots)", "remove `critical`, or write the design as items with a template")
    missing = [it.id for it in d.items if d.critical not in template_fields(d.item_template(it) or "")]
    if missing:
        fail(d, ("critical",), f"critical region '{d.critical}' is not a slot of the template of item "
             f"'{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
             "name a {slot} that every item's template contains")


def _check_readout(d: Design) -> None:
    r = d.readout
    loc = ("readout",)
    if r.position != "last":
        if d.items is None or any(
                r.position not in template_fields(d.item_template(it) or "") for it in d.items):
            fail(d, (*loc, "position"), f"position '{r.position}' is neither 'last' nor a slot of every "
                 "item's template", "use 'last', or a {slot} that every item's template contains")
        if r.prompts:
            fail(d, (*loc, "prompts"), f"prompts are appended after the stimulus, so reading at slot "
                 f"'{r.position}' cannot see them (every prompt would give the same observation)",
                 "remove the prompts or read at position 'last'")
    if isinstance(r.prompts, dict):
        for pid in r.prompts:
            if not NAME_RE.match(pid):
                fail(d, (*loc, "prompts", pid), f"prompt id '{pid}' is not a plain name",
                     "use letters, digits, _ or -")
    for i, text in enumerate(r.prompts.values() if isinstance(r.prompts, dict) else r.prompts):
        if not text.strip():
            key = list(r.prompts)[i] if isinstance(r.prompts, dict) else i
            fail(d, (*loc, "prompts", key), "empty prompt", "remove it or write it")
    for name, words in r.targets.items():
        sloc = (*loc, "targets", name)
        if not SET_RE.match(name):
            fail(d, sloc, f"target set name '{name}' is not a plain name", "use letters, digits and _")
        if not words:
            fail(d, sloc, f"target set '{name}' is an empty word list", "add words or remove the set")
        seen: set[str] = set()
        for i, word in enumerate(words):
            if not word.strip():
                fail(d, (*sloc, i), f"target set '{name}' has an empty word", "remove it")
            if word != word.strip():
                fail(d, (*sloc, i), f"word '{word}' has surrounding spaces",
                     "write the bare word; 'leading_space: true' adds the space before scoring")
            if word in seen:
                fail(d, (*sloc, i), f"word '{word}' is listed twice in set '{name}'", "remove one")
            if word == KL_READOUT:
                fail(d, (*sloc, i), f"'{KL_READOUT}' is the name of the battery's KL readout, not a word",
                     "remove it")
            seen.add(word)
    for name, expr in r.contrasts.items():
        cloc = (*loc, "contrasts", name)
        m = CONTRAST_RE.match(expr)
        if not m:
            fail(d, cloc, f"contrast '{name}: {expr}' is not of the form 'setA - setB'",
                 "write e.g. 'formality: formal - casual'")
        for part in m.groups():
            if part not in r.targets:
                fail(d, cloc, f"contrast '{name}' uses target set '{part}', which is not defined",
                     f"define it under readout.targets (defined: {', '.join(r.targets) or 'none'})")
        if m.group(1) == m.group(2):
            fail(d, cloc, f"contrast '{name}' subtracts a set from itself", "use two different sets")
        words = {w for ws in r.targets.values() for w in ws}
        if name in words or name == KL_READOUT:
            what = "the KL readout's reserved name" if name == KL_READOUT else "a target word"
            fail(d, cloc, f"contrast '{name}' has the same name as {what} (results are keyed by readout name)",
                 f"rename the contrast, e.g. '{name}_contrast'")
    if r.multi_token == "sum_logprob" and r.score == "logit":
        fail(d, (*loc, "multi_token"), "multi_token 'sum_logprob' scores log-probabilities, but score is "
             "'logit'", "set 'score: logprob' (or use multi_token: first_token)")


def design_warnings(d: Design) -> list[str]:
    """Problems that do not stop a run but bias or weaken it; each names the field concerned."""
    out: list[str] = []
    if d.cells is not None:
        sizes = {c: len(v) for c, v in d.cells.items()}
        if len(set(sizes.values())) > 1:
            out.append("cells: unbalanced cell sizes ("
                       + ", ".join(f"{c}={n}" for c, n in sizes.items())
                       + "): cell means will have unequal precision")
        texts = Counter(t.strip() for v in d.cells.values() for t in v)
        dup = [t for t, n in texts.items() if n > 1]
        if dup:
            out.append(f"cells: {len(dup)} sentence(s) appear more than once, e.g. '{dup[0]}'")
    if d.items is not None:
        for item in d.items:
            texts = {c: d.render(item, c)[0] for c in d.cell_names}
            same = [c for c in d.cell_names if list(texts.values()).count(texts[c]) > 1]
            if same:
                out.append(f"items: item '{item.id}' has the same text in cells {', '.join(same)}")
    owner: dict[str, str] = {}
    for name, words in d.readout.targets.items():
        for w in words:
            if w in owner:
                out.append(f"readout.targets: word '{w}' is in both '{owner[w]}' and '{name}'")
            owner.setdefault(w, name)
    prompts = [t for _, t in d.readout.prompt_items()]
    if len(set(prompts)) < len(prompts):
        out.append("readout.prompts: the same prompt is listed more than once")
    return out
