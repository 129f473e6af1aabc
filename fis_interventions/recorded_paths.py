"""Paths an output records of its inputs, so that folders can be moved.

A checkpoint or run folder records each input folder twice: absolute, and relative to the output folder
itself (``{"absolute": ..., "relative": ...}`` under ``inputs`` in its ``cfg.json`` / ``run.json``). A reader
resolves it from either: the absolute path when it still exists (the output was moved alone), else the
relative one (the output and its inputs were moved or copied together, e.g. a whole ``runs/`` tree).

Folders written before this recorded one path, relative to where the stage ran (``runs/demo/activations``);
those are tried as given (from the current folder) and then against each folder above the output, which
finds them again from any working directory as long as the tree is intact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def record(path: Path | str, folder: Path | str) -> dict[str, str]:
    """``{"absolute", "relative"}`` for ``path``, relative to the output ``folder`` that records it."""
    target = Path(path).expanduser().resolve()
    try:
        relative = os.path.relpath(target, Path(folder).expanduser().resolve())
    except ValueError:  # another drive (Windows): only the absolute path means anything
        relative = str(target)
    return {"absolute": str(target), "relative": Path(relative).as_posix()}


def resolve(folder: Path | str, recorded: dict[str, Any] | None = None, legacy: str | Path | None = None,
            marker: str | None = None) -> Path | None:
    """The first existing candidate for an input recorded by the output ``folder`` (see the module doc);
    ``marker``: a file the input must hold (``manifest.json`` for a harvest). ``None`` if nothing was
    recorded; the first candidate (for the error message) if none exists."""
    folder = Path(folder).expanduser()
    candidates: list[Path] = []
    if isinstance(recorded, dict):
        for key in ("absolute", "relative"):
            if recorded.get(key):
                value = Path(str(recorded[key]))
                candidates.append(value if value.is_absolute() else folder / value)
    if legacy:
        value = Path(str(legacy)).expanduser()
        candidates.append(value)
        if not value.is_absolute():
            candidates += [parent / value for parent in [folder, *folder.resolve().parents]]
    for candidate in candidates:
        if (candidate / marker).is_file() if marker else candidate.exists():
            return candidate
    return candidates[0] if candidates else None


def record_all(paths: dict[str, Path | str | None], folder: Path | str) -> dict[str, dict[str, str]]:
    """:func:`record` of each named input that is set (the ``inputs`` entry of a run folder's JSON)."""
    return {name: record(value, folder) for name, value in paths.items() if value is not None}


def resolve_input(folder: Path | str, meta: dict[str, Any], name: str, marker: str | None = None) -> Path | None:
    """Input ``name`` of the run folder ``folder`` whose JSON is ``meta``: from ``inputs`` (absolute, then
    relative to the folder), else the path recorded as given under ``name`` (older folders)."""
    return resolve(folder, (meta.get("inputs") or {}).get(name), meta.get(name), marker)
