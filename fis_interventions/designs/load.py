"""Reading a design file: YAML -> validated :class:`Design`, with line-numbered errors."""

from __future__ import annotations

import warnings
from pathlib import Path

from ..config import load_yaml, validate
from ..errors import FisWarning
from .checks import check_design, check_yaml_booleans, design_warnings
from .schema import Design


def read_design(path: str | Path) -> Design:
    """Load and check a design without emitting warnings (for tools that report them as data)."""
    data, node = load_yaml(Path(path))
    check_yaml_booleans(node, str(path))
    design = validate(Design, data, source=str(path), node=node)
    design._source = str(path)
    design._node = node
    check_design(design)
    return design


def load_design(path: str | Path) -> Design:
    """Load a design file; raise FisError for any mistake, warn (FisWarning) for unbalanced cells etc."""
    design = read_design(path)
    for message in design_warnings(design):
        warnings.warn(f"{path}: {message}", FisWarning, stacklevel=2)
    return design


def design_from_dict(data: dict, *, source: str = "<design>") -> Design:
    """Build a design from Python data with the same checks as a file (no line numbers)."""
    design = validate(Design, data, source=source)
    design._source = source
    check_design(design)
    return design
