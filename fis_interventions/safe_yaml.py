"""Reading user YAML in bounded time and memory: one parse, hostile files refused in one line.

``yaml.safe_load`` is safe from code execution but not from denial of service: a 1 KB "billion laughs" alias
bomb makes every later walk of the data exponential, a recursive alias (``&r [*r]``) and 10,000 levels of
nesting end in ``RecursionError``, and a 50 MB file is read whole by the pure-Python parser. Here:

1. the file size is checked before the file is read (devices and FIFOs are refused unopened), and the number
   of values written is bounded before composing (composing costs ~6 us a value);
2. the text is composed into a node tree ONCE, by libyaml in C when it is installed (libyaml caps nesting at
   1,000 levels itself, and composing never follows an alias, so this step is bounded), else by an iterative
   composer fed PyYAML's events (PyYAML's own composer recurses);
3. :func:`check_tree` walks the tree without recursion (hand-written: PyYAML has no limits to configure): it
   bounds the nesting depth (counted through aliases: an alias brings the depth of what it refers to), refuses
   recursive aliases, counts the values and the bytes of text the document would have with every alias
   expanded, and rejects duplicate keys with their line;
4. PyYAML's ``SafeConstructor`` builds the Python data from a tree now known to be small and shallow.

The node tree is returned with the data, for line-numbered errors.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from .errors import FisError

MAX_DEPTH = 64
MIN_VALUE_BUDGET = 1_000_000  # values after alias expansion: at least this many ...
ALIAS_EXPANSION = 4  # ... or this many times the values written, whichever is larger
MAX_VALUES_WRITTEN = 1_000_000  # values in the text itself (estimated before composing)
_MERGE_TAG = "tag:yaml.org,2002:merge"


def max_bytes() -> int:
    """Largest YAML file read, and most text its aliases may expand to (``FIS_MAX_YAML_MB``, default 16 MiB:
    a 20,000-item design is ~2.3 MB)."""
    raw = os.environ.get("FIS_MAX_YAML_MB", "16")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (0 < value <= 4096):
        raise FisError(f"FIS_MAX_YAML_MB={raw!r} is not a size in MiB between 0 and 4096",
                       fix="set it to a number such as 16, or unset it")
    return int(value * 2**20)


def _line(mark: Any) -> str:
    return f"line {mark.line + 1}: " if mark is not None else ""


def _invalid(err: yaml.YAMLError, source: str) -> FisError:
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = _line(getattr(err, "problem_mark", None))
    if "nesting depth" in problem:  # libyaml's own cap (1,000 levels), met before ours
        return _too_deep(where, source)
    return FisError(f"{where}invalid YAML: {problem}", source=source, fix="check indentation and quoting")


def _too_deep(where: str, source: str, *, through_alias: bool = False) -> FisError:
    how = " (counting the levels that aliases bring in)" if through_alias else ""
    return FisError(f"{where}nesting deeper than {MAX_DEPTH} levels{how}", source=source,
                    fix="flatten the file (configs and designs need a few levels)")


def _children(node: yaml.Node, loc: tuple[Any, ...]) -> list[tuple[yaml.Node, tuple[Any, ...]]]:
    """A collection's children with where each sits (a mapping's keys sit at the mapping itself)."""
    if isinstance(node, yaml.SequenceNode):
        return [(child, (*loc, i)) for i, child in enumerate(node.value)]
    if isinstance(node, yaml.MappingNode):
        return [pair for key, value in node.value
                for pair in ((key, loc), (value, (*loc, getattr(key, "value", "?"))))]
    return []


def _check_keys(node: yaml.MappingNode, source: str, loc: tuple[Any, ...]) -> None:
    from .config import format_loc

    seen: dict[str, int] = {}
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
            if key.value in seen:
                raise FisError(f"{_line(key.start_mark)}key '{key.value}' appears twice in the same mapping (first "
                               f"on line {seen[key.value]})", source=source, field=format_loc((*loc, key.value)),
                               fix="remove or rename one of them")
            seen[key.value] = key.start_mark.line + 1


def check_tree(root: yaml.Node, source: str) -> None:
    """Depth, recursion, alias expansion and duplicate keys of a composed tree; iterative, linear in its size."""
    from .config import format_loc

    sizes: dict[int, int] = {}  # id -> values below and including the node, aliases expanded
    heights: dict[int, int] = {}  # id -> levels below and including the node, aliases expanded
    text_bytes: dict[int, int] = {}  # id -> bytes of scalar text below and including the node, aliases expanded
    byte_budget = max_bytes()
    written = 0
    stack: list[tuple[yaml.Node, list[tuple[yaml.Node, tuple[Any, ...]]]]] = []  # open nodes, children to visit
    open_ids: set[int] = set()

    def enter(node: yaml.Node, loc: tuple[Any, ...]) -> None:
        nonlocal written
        written += 1
        if id(node) in open_ids:
            raise FisError(f"{_line(node.start_mark)}an alias refers to a value that contains it (a recursive "
                           "alias)", source=source, field=format_loc(loc) if loc else None,
                           fix="remove the self-reference")
        if id(node) in sizes:  # an alias of a finished value: counted again, not walked again ...
            if len(stack) + heights[id(node)] > MAX_DEPTH:  # ... but its depth counts where it is used
                raise _too_deep(_line(node.start_mark), source, through_alias=True)
            return
        if len(stack) >= MAX_DEPTH:
            raise _too_deep(_line(node.start_mark), source)
        if isinstance(node, yaml.MappingNode):
            _check_keys(node, source, loc)
        kids = _children(node, loc)
        if not kids:
            sizes[id(node)] = heights[id(node)] = 1
            text_bytes[id(node)] = len(node.value) if isinstance(node, yaml.ScalarNode) else 0
            return
        stack.append((node, kids[::-1]))
        open_ids.add(id(node))

    enter(root, ())
    scalar = yaml.ScalarNode
    while stack:
        node, pending = stack[-1]
        if pending:
            child, loc = pending.pop()
            if type(child) is scalar and id(child) not in sizes:  # the common case, inlined
                written += 1
                sizes[id(child)] = heights[id(child)] = 1
                text_bytes[id(child)] = len(child.value)
            else:
                enter(child, loc)
            continue
        stack.pop()
        open_ids.discard(id(node))
        kids = node.value if isinstance(node, yaml.SequenceNode) else [n for pair in node.value for n in pair]
        total = 1 + sum(sizes[id(child)] for child in kids)
        heights[id(node)] = 1 + max(heights[id(child)] for child in kids)
        n_bytes = text_bytes[id(node)] = sum(text_bytes[id(child)] for child in kids)
        budget = max(MIN_VALUE_BUDGET, ALIAS_EXPANSION * written)
        if total > budget:
            raise FisError(f"{_line(node.start_mark)}aliases expand the document to more than {budget:,} values "
                           "(an alias bomb?)", source=source, fix="write the values out, or use fewer aliases")
        if n_bytes > byte_budget:
            raise FisError(f"{_line(node.start_mark)}aliases expand the document to more than "
                           f"{byte_budget / 2**20:.0f} MiB of text (an alias bomb?)", source=source,
                           fix="write the values out, use fewer aliases, or raise FIS_MAX_YAML_MB")
        sizes[id(node)] = total


class _EventComposer:
    """PyYAML's events -> node tree, iteratively (used only without libyaml; checks come after)."""

    def __init__(self) -> None:
        self.resolver = yaml.resolver.Resolver()
        self.anchors: dict[str, yaml.Node] = {}
        self.stack: list[yaml.Node] = []
        self.keys: list[yaml.Node | None] = []
        self.root: yaml.Node | None = None

    def _tag(self, kind: type, event: Any, value: str | None) -> str:
        if event.tag is None or event.tag == "!":
            return self.resolver.resolve(kind, value, event.implicit)
        return event.tag

    def _add(self, node: yaml.Node) -> None:
        if not self.stack:
            self.root = node
        elif isinstance(self.stack[-1], yaml.SequenceNode):
            self.stack[-1].value.append(node)
        elif self.keys[-1] is None:
            self.keys[-1] = node
        else:
            self.stack[-1].value.append((self.keys[-1], node))
            self.keys[-1] = None

    def feed(self, event: Any) -> None:
        if isinstance(event, yaml.ScalarEvent):
            node: yaml.Node = yaml.ScalarNode(self._tag(yaml.ScalarNode, event, event.value), event.value,
                                              event.start_mark, event.end_mark, style=event.style)
        elif isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            kind = yaml.SequenceNode if isinstance(event, yaml.SequenceStartEvent) else yaml.MappingNode
            node = kind(self._tag(kind, event, None), [], event.start_mark, None, flow_style=event.flow_style)
            if event.anchor is not None:
                self.anchors[event.anchor] = node
            self.stack.append(node)
            self.keys.append(None)
            return
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            node = self.stack.pop()
            self.keys.pop()
            node.end_mark = event.end_mark
            self._add(node)
            return
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor not in self.anchors:
                raise yaml.composer.ComposerError(None, None, f"found undefined alias {event.anchor!r}",
                                                  event.start_mark)
            node = self.anchors[event.anchor]
        elif isinstance(event, yaml.DocumentStartEvent) and self.root is not None:
            raise yaml.composer.ComposerError(None, None, "but found another document",
                                              event.start_mark)
        else:
            return
        if getattr(event, "anchor", None) is not None:
            self.anchors[event.anchor] = node
        self._add(node)


def _check_values_written(text: str, source: str) -> None:
    """Composing costs ~6 us per value (a 16 MiB flat list took 73 s and 2.2 GB): bound the values before it,
    by an upper estimate that costs milliseconds (every value is followed by a comma or a line break)."""
    estimate = text.count(",") + text.count("\n")
    if estimate > MAX_VALUES_WRITTEN:
        raise FisError(f"the file holds about {estimate:,} values (commas and lines), over the "
                       f"{MAX_VALUES_WRITTEN:,} limit for YAML", source=source,
                       fix="split it into smaller files (a 20,000-item design holds about 140,000)")


def compose(text: str, source: str) -> yaml.Node | None:
    """The node tree of one YAML document (see the module docstring, step 2)."""
    _check_values_written(text, source)
    try:
        if yaml.__with_libyaml__:
            return yaml.compose(text, Loader=yaml.CSafeLoader)
        composer = _EventComposer()
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            composer.feed(event)
        return composer.root
    except yaml.YAMLError as err:
        raise _invalid(err, source) from None


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a large tree of new objects is built: its passes over the
    growing heap cost more than the parse itself (measured 3x on a 20,000-item design); nothing built here
    is garbage, and the collector runs as usual afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def parse_yaml(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """Parse one YAML document within the limits above; return the data and its node tree."""
    with gc_paused():
        root = compose(text, source)
        if root is None:
            return None, None
        check_tree(root, source)
        try:
            return yaml.constructor.SafeConstructor().construct_document(root), root
        except yaml.YAMLError as err:  # a bad explicit tag or a malformed merge key
            raise _invalid(err, source) from None


def read_yaml_file(path: Path) -> tuple[Any, yaml.Node | None]:
    """Size-checked read + :func:`parse_yaml`; a missing, special, foreign-encoded or oversized file is one
    line. The size is checked before reading and the read itself stops one byte past the limit (a file that
    grows meanwhile)."""
    from .config import read_text_utf8

    path = Path(path)
    limit = max_bytes()
    if path.is_file() and path.stat().st_size > limit:
        raise FisError(f"file is {path.stat().st_size / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB limit for "
                       "YAML", source=path, fix="split it into smaller files, or raise FIS_MAX_YAML_MB")
    return parse_yaml(read_text_utf8(path, limit=limit), str(path))
