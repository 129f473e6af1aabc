"""Factorial stimulus designs: YAML format, validation, expansion into cells, target-word tokenisation.

The API others use: :func:`load_design` -> :class:`Design`; :func:`expand` -> one row per stimulus x prompt;
:func:`target_tokens` -> the token ids of the readout's word sets. :func:`validate` and :func:`show` back the
``fis stimuli`` commands. The file format is documented in ``stimuli/README.md``.
"""

from .checks import design_warnings
from .expand import expand, full_text
from .inspection import ShowData, ValidationReport, show, validate
from .load import design_from_dict, load_design, read_design
from .schema import CELL_SEP, Design, Item, Readout
from .tokens import TargetSets, TargetWord, target_tokens

__all__ = ["CELL_SEP", "Design", "Item", "Readout", "ShowData", "TargetSets", "TargetWord", "ValidationReport",
           "design_from_dict", "design_warnings", "expand", "full_text", "load_design", "read_design", "show",
           "target_tokens", "validate"]
