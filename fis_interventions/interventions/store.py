"""The results store: SQLite, one transaction per finished unit of work, so an interrupted battery resumes
without duplicated or lost rows. Shards write their own files; :func:`merge` combines them."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import FisError

COLUMNS = ["design", "item", "cell", "a", "b", "prompt_id", "point", "feature", "role", "intervention", "value",
           "position", "readout", "readout_kind", "score_clean", "score_edited", "shift"]
_TYPES = {"prompt_id": "TEXT", "feature": "TEXT", "value": "REAL", "score_clean": "REAL", "score_edited": "REAL",
          "shift": "REAL"}
_KEY = ["design", "item", "cell", "prompt_id", "point", "feature", "intervention", "value", "position", "readout"]


def _schema() -> str:
    cols = ", ".join(f"{c} {_TYPES.get(c, 'TEXT')}" for c in COLUMNS)
    return (f"CREATE TABLE IF NOT EXISTS results ({cols}, PRIMARY KEY ({', '.join(_KEY)}));"
            "CREATE TABLE IF NOT EXISTS done (unit TEXT PRIMARY KEY);")


class ResultStore:
    """Append-only results with a ``done`` table of finished work units."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path)
        self.conn.executescript(_schema())

    def done_units(self) -> set[str]:
        return {row[0] for row in self.conn.execute("SELECT unit FROM done")}

    def commit_unit(self, unit: str, rows: Iterable[dict[str, Any]]) -> None:
        """Write a unit's rows and mark it done, atomically."""
        with self.conn:
            self.conn.executemany(
                f"INSERT INTO results ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                [tuple(r[c] for c in COLUMNS) for r in rows])
            self.conn.execute("INSERT INTO done (unit) VALUES (?)", (unit,))

    def frame(self) -> pd.DataFrame:
        return read_results(self.path)

    def close(self) -> None:
        self.conn.close()


def read_results(path: Path) -> pd.DataFrame:
    """The results table as a DataFrame, in a stable order."""
    if not Path(path).exists():
        raise FisError("results store not found", source=path, fix="run `fis battery` first")
    with sqlite3.connect(path) as conn:
        df = pd.read_sql_query(f"SELECT * FROM results ORDER BY {', '.join(_KEY)}", conn)
    return df


def merge(sources: list[Path], target: Path) -> int:
    """Combine shard stores into ``target`` (rows and done units); returns the number of rows."""
    if not sources:
        raise FisError("no shard stores to merge", source=target.parent, fix="run the shards first")
    out = ResultStore(target)
    for src in sources:  # ATTACH cannot run inside a transaction: commit after each shard
        out.conn.execute("ATTACH DATABASE ? AS shard", (str(src),))
        out.conn.execute("INSERT OR IGNORE INTO results SELECT * FROM shard.results")
        out.conn.execute("INSERT OR IGNORE INTO done SELECT * FROM shard.done")
        out.conn.commit()
        out.conn.execute("DETACH DATABASE shard")
    n = out.conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    out.close()
    return int(n)
