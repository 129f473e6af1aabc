"""Loading pydantic configs from YAML with one-line errors that name the file, line, field and fix.

Every YAML the user writes (training configs, stimulus designs, batteries) goes through :func:`load_yaml`
and :func:`validate`, so all of them report mistakes the same way.
"""

from __future__ import annotations

import stat
from pathlib import Path
import types
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from .errors import FisError
from .safe_yaml import read_yaml_file

M = TypeVar("M", bound=BaseModel)


MAX_SEED = 2**32 - 1  # numpy's legacy seeding takes 0 .. 2**32 - 1; one rule for every stage
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, description="random seed, 0 .. 2**32 - 1")]


def _parts(annotation: Any) -> list[Any]:
    """The plain types an annotation admits (unions and ``Annotated`` unwrapped; a list's element type kept as
    ``("list", element)``)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _parts(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [p for arg in get_args(annotation) for p in _parts(arg)]
    if origin in (list, tuple, set):
        args = get_args(annotation)
        return [("list", args[0] if args else Any)]
    return [annotation]


def _bool_for_number(annotation: Any, value: Any) -> bool:
    """Whether ``value`` is true/false (or a list holding one) where only numbers are meant: pydantic would
    read ``k: true`` as k = 1."""
    parts = _parts(annotation)
    if isinstance(value, bool):
        return bool(parts) and all(p in (int, float) or p is type(None) for p in parts) and any(
            p in (int, float) for p in parts)
    if isinstance(value, list):
        elements = [p[1] for p in parts if isinstance(p, tuple)]
        return len(elements) == 1 and any(_bool_for_number(elements[0], v) for v in value)
    return False


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, so a typo never silently falls back to a default;
    NaN and infinity are refused in every float field, and true/false where a number is meant."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name) if isinstance(name, str) else None
                if field is not None and _bool_for_number(field.annotation, value):
                    raise PydanticCustomError("bool_for_number", "true/false given where a number is meant",
                                              {"key": name})
        return data


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
        fix = None
        if first["type"] == "bool_for_number":
            loc = (*loc, first["ctx"]["key"])
            fix = "write the number (YAML reads true as 1)"
        elif first["type"] == "finite_number":
            fix = "write a finite number (NaN and infinity are refused)"
        line = line_of(node, loc)
        where = f"line {line}: " if line else ""
        kind = first["type"]
        msg = first["msg"]
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
