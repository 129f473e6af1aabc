"""Reading a battery run folder (``run.json`` + ``results.sqlite`` [+ ``screening.csv``, ``eval.json``]).

The folder is written by the intervention battery; this module checks it once, so the analysis and the
report can trust what they get. Anything wrong with the folder is a one-line :class:`FisError`.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, field_validator

from ..config import validate
from ..errors import FisError

RESULT_COLUMNS = ["design", "item", "cell", "a", "b", "prompt_id", "point", "feature", "role", "intervention",
                  "value", "position", "readout", "readout_kind", "score_clean", "score_edited", "shift"]


class DesignInfo(BaseModel):
    """One design as the battery records it; ``factors`` is ordered: first factor is column ``a``."""

    model_config = ConfigDict(extra="allow")

    factors: dict[str, list[str]]
    file: str | None = None
    n_items: int | None = None
    prompts: list[str] = []
    contrasts: dict[str, str] = {}

    @field_validator("factors")
    @classmethod
    def _two_by_two(cls, factors: dict[str, list[str]]) -> dict[str, list[str]]:
        if len(factors) != 2 or any(len(v) != 2 or len(set(v)) != 2 for v in factors.values()):
            raise ValueError("a report needs a 2x2 design: two factors with two different levels each")
        return factors

    @property
    def names(self) -> tuple[str, str]:
        a, b = self.factors
        return a, b


class FeatureInfo(BaseModel):
    """A clamped feature and why it was chosen (``role``); ``screen`` holds its screening statistics."""

    model_config = ConfigDict(extra="allow")

    point: str
    feature: int | str  # the battery's label: an index, or "i,j" for features edited together
    role: str
    screen: dict[str, Any] | None = None


class RunInfo(BaseModel):
    """``run.json``. Extra keys are kept (not an error): the battery may record more than a report reads."""

    model_config = ConfigDict(extra="allow")

    name: str
    model: str
    hook: str
    checkpoint: str
    seed: int | None = None
    provenance: dict[str, Any] = {}
    config: dict[str, Any] = {}
    designs: dict[str, DesignInfo]
    features: list[FeatureInfo] = []
    warnings: list[str] = []

    @field_validator("name")
    @classmethod
    def _usable_name(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("the run name is empty")
        return name


@dataclass
class Run:
    """A checked run folder: its metadata, the results table and the optional extras."""

    folder: Path
    info: RunInfo
    results: pd.DataFrame
    screening: pd.DataFrame | None = None
    eval_table: pd.DataFrame | None = None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FisError(f"not valid JSON: {str(err).splitlines()[0]}", source=path,
                       fix="the battery writes this file; rerun it if the file was cut short") from None


def read_results(path: Path) -> pd.DataFrame:
    """The ``results`` table of ``results.sqlite``, with every column the battery writes."""
    if not path.is_file():
        raise FisError("results table not found", source=path,
                       fix="run the battery to completion (it writes results.sqlite last)")
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
            names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "results" not in names:
                raise FisError("no table 'results' in the database", source=path,
                               fix="pass the folder of a finished battery run")
            table = pd.read_sql_query("SELECT * FROM results", con)
        con.close()
    except sqlite3.DatabaseError as err:
        raise FisError(f"cannot read SQLite database: {err}", source=path) from None
    missing = [c for c in RESULT_COLUMNS if c not in table.columns]
    if missing:
        raise FisError(f"results table lacks columns {missing}", source=path,
                       fix="the file is from another version of the battery; rerun it")
    if table.empty:
        raise FisError("results table is empty", source=path, fix="rerun the battery")
    # feature labels ("12" or "12,40") and prompt ids are identifiers, whatever type the store gave them
    for col in ("feature", "prompt_id", "item"):
        table[col] = table[col].astype(str)
    try:
        table["value"] = pd.to_numeric(table["value"], errors="raise")
    except (ValueError, TypeError):
        raise FisError("column 'value' holds non-numbers", source=path, field="value") from None
    return table


def load_run(folder: str | Path) -> Run:
    """Read and check a run folder; raise :class:`FisError` (one line) for anything missing or malformed."""
    folder = Path(folder)
    if not folder.exists():
        raise FisError("run folder not found", source=folder, fix="pass the folder the battery wrote")
    if not folder.is_dir():
        raise FisError("is a file, expected a run folder", source=folder, fix="pass the folder, not a file in it")
    meta = folder / "run.json"
    if not meta.is_file():
        raise FisError("run.json not found: not a battery run folder", source=folder,
                       fix="pass the folder the battery wrote")
    data = _read_json(meta)
    if not isinstance(data, dict):
        raise FisError("run.json must be a JSON object", source=meta)
    info = validate(RunInfo, data, source=meta)
    results = read_results(folder / "results.sqlite")
    unknown = sorted(set(results["design"].astype(str)) - set(info.designs))
    if unknown:
        raise FisError(f"results name designs not described in run.json: {unknown[:5]}",
                       source=folder / "results.sqlite", fix="the run folder is inconsistent; rerun the battery")
    screening = None
    if (folder / "screening.csv").is_file():
        try:
            screening = pd.read_csv(folder / "screening.csv")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise FisError(f"cannot read CSV: {str(err).splitlines()[0]}", source=folder / "screening.csv") from None
    eval_table = None
    if (folder / "eval.json").is_file():
        ev = _read_json(folder / "eval.json")
        rows = ev.get("table") if isinstance(ev, dict) else None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise FisError("eval.json must hold {'table': [row objects]}", source=folder / "eval.json",
                           field="table")
        eval_table = pd.DataFrame(rows)
    return Run(folder=folder, info=info, results=results, screening=screening, eval_table=eval_table)
