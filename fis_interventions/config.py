"""Loading pydantic configs from YAML with one-line errors that name the file, line, field and fix.

Every YAML the user writes (training configs, stimulus designs, batteries) goes through :func:`load_yaml`
and :func:`validate`, so all of them report mistakes the same way.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import FisError
from .safe_yaml import read_yaml_file

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, so a typo never silently falls back to a default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def read_text_utf8(path: Path, *, limit: int | None = None) -> str:
    """Read a user file as UTF-8, with a clear error for a missing file, a folder, a special file (a device
    such as /dev/zero would be read forever, a FIFO would block), more than ``limit`` bytes or another
    encoding."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FisError("file not found", source=path, fix="check the path") from None
    except OSError as err:
        raise FisError(f"cannot read it ({err.strerror})", source=path, fix="check the path and its permissions") \
            from None
    if stat.S_ISDIR(mode):
        raise FisError("is a folder, expected a file", source=path)
    if not stat.S_ISREG(mode):
        raise FisError("is not a regular file (a device, FIFO or socket): refused without reading it", source=path,
                       fix="save the content to an ordinary file and pass that")
    try:
        with path.open("rb") as fh:
            data = fh.read() if limit is None else fh.read(limit + 1)
    except OSError as err:
        raise FisError(f"cannot read it ({err.strerror})", source=path, fix="check the path and its permissions") \
            from None
    if limit is not None and len(data) > limit:
        raise FisError(f"file is over the {limit / 2**20:.0f} MiB limit for YAML", source=path,
                       fix="split it into smaller files, or raise FIS_MAX_YAML_MB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FisError(f"not valid UTF-8 (byte {err.start})", source=path,
                       fix="save the file as UTF-8") from None


def load_yaml(path: Path) -> tuple[dict[str, Any], yaml.Node | None]:
    """Parse a YAML mapping within size, depth and alias limits (:mod:`.safe_yaml`), rejecting duplicate keys;
    also return the node tree, used to find line numbers."""
    data, node = read_yaml_file(Path(path))
    if not isinstance(data, dict):
        kind = "empty" if data is None else type(data).__name__
        raise FisError(f"the file must be a YAML mapping of keys to values, got {kind}", source=path,
                       fix="start the file with 'name: ...' style keys")
    return data, node


def line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at a pydantic-style location path, or the deepest parent found."""
    line = None
    for key in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            found = None
            for k, v in node.value:
                if k.value == str(key):
                    found = (k, v)
                    break
            if found is None:
                return line
            line = found[0].start_mark.line + 1
            node = found[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    if node is not None and line is None:
        line = node.start_mark.line + 1
    return line


def format_loc(loc: tuple[Any, ...]) -> str:
    """Turn ('items', 3, 'text') into 'items[3].text'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def validate(model: type[M], data: dict[str, Any], *, source: Path | str,
             node: yaml.Node | None = None) -> M:
    """Validate ``data`` against ``model``; the first error becomes a one-line :class:`FisError`."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        line = line_of(node, loc)
        where = f"line {line}: " if line else ""
        kind = first["type"]
        msg = first["msg"]
        fix = None
        if kind == "extra_forbidden":
            msg = "unknown key"
            fix = "remove it or check its spelling against the documented keys"
        elif kind == "missing":
            msg = "required key is missing"
            fix = "add it"
        msg = msg.removeprefix("Value error, ")
        raise FisError(f"{where}{msg}", source=str(source), field=format_loc(loc), fix=fix) from None


def load_config(model: type[M], path: Path) -> M:
    """Load and validate a YAML config file."""
    data, node = load_yaml(Path(path))
    return validate(model, data, source=path, node=node)
