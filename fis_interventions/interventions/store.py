"""The results store: SQLite, one transaction per finished unit of work, so an interrupted battery resumes
without duplicated or lost rows. Shards write their own files; :func:`merge` combines them."""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import FisError
from ..io import atomic_path, refuse_link

COLUMNS = ["design", "item", "cell", "a", "b", "prompt_id", "point", "feature", "role", "intervention", "value",
           "position", "readout", "readout_kind", "score_clean", "score_edited", "shift"]
_TYPES = {"prompt_id": "TEXT", "feature": "TEXT", "value": "REAL", "score_clean": "REAL", "score_edited": "REAL",
          "shift": "REAL"}
_KEY = ["design", "item", "cell", "prompt_id", "point", "feature", "intervention", "value", "position", "readout"]


def _schema() -> str:
    cols = ", ".join(f"{c} {_TYPES.get(c, 'TEXT')}" for c in COLUMNS)
    return (f"CREATE TABLE IF NOT EXISTS results ({cols}, PRIMARY KEY ({', '.join(_KEY)}));"
            "CREATE TABLE IF NOT EXISTS done (unit TEXT PRIMARY KEY, n_rows INTEGER);"
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);")


@contextmanager
def sqlite_errors(path: Path, doing: str) -> Iterator[None]:
    """No ``sqlite3`` exception reaches a user: a corrupt, locked or foreign file is one line naming it."""
    try:
        yield
    except sqlite3.IntegrityError as err:
        raise FisError(f"results store refused a row while {doing}: the row is already there ({err})", source=path,
                       fix="if another battery is writing to the same out folder, let it finish; otherwise rerun "
                           "into a new out folder and report this (the config should have been refused)") from None
    except (sqlite3.Error, pd.errors.DatabaseError) as err:  # pandas wraps sqlite3's errors in its own
        reason = str(err.__cause__ or err)
        raise FisError(f"results store cannot be read or written while {doing} ({reason})", source=path,
                       fix="if the file is damaged, move it away and rerun the battery (or pass --overwrite); "
                           "if another process holds it, wait for it") from None


def _unit_group(unit: str) -> tuple[str, str, str]:
    """(design, point, feature) of a unit key ``fingerprint|design|batch|point|feature``."""
    _, design, _, point, feature = unit.rsplit("|", 4) if unit.count("|") >= 4 else ("", "", "", "", unit)
    return design, point, feature


def count_problem(conn: sqlite3.Connection, schema: str = "main") -> str | None:
    """Whether the rows agree with the finished units' recorded row counts, per (design, point, feature):
    rows deleted (or added) behind the store's back make a resumed or merged run silently short."""
    cols = [row[1] for row in conn.execute(f"PRAGMA {schema}.table_info(done)")]
    if "n_rows" not in cols:  # a store written before units recorded their row counts: nothing to check
        return None
    expected: Counter[tuple[str, str, str]] = Counter()
    unknown = False
    for unit, n in conn.execute(f"SELECT unit, n_rows FROM {schema}.done"):
        if n is None:
            unknown = True
            continue
        expected[_unit_group(unit)] += int(n)
    if unknown:
        return None
    found = Counter({(d, p, f): int(n) for d, p, f, n in conn.execute(
        f"SELECT design, point, feature, COUNT(*) FROM {schema}.results GROUP BY design, point, feature")})
    for group in sorted(set(expected) | set(found)):
        if expected[group] != found[group]:
            design, point, feature = group
            return (f"design {design!r}, {point} feature {feature}: {found[group]} result rows, but its finished "
                    f"units recorded {expected[group]}")
    return None


@dataclass(frozen=True)
class StoreMeta:
    """Which run a store belongs to: the battery's fingerprint, its shard, and how many units it must hold."""

    fingerprint: str
    shard: int = 0
    shards: int = 1
    units: int = 0

    @classmethod
    def read(cls, conn: sqlite3.Connection, schema: str = "main") -> StoreMeta | None:
        try:
            rows = dict(conn.execute(f"SELECT key, value FROM {schema}.meta").fetchall())
        except sqlite3.OperationalError:  # a store written before stores carried their run's fingerprint
            return None
        if "fingerprint" not in rows:
            return None
        return cls(rows["fingerprint"], int(rows["shard"]), int(rows["shards"]), int(rows["units"]))


class ResultStore:
    """Append-only results with a ``done`` table of finished work units and the run's :class:`StoreMeta`."""

    def __init__(self, path: Path, meta: StoreMeta | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        refuse_link(self.path, "results store")  # SQLite would write through it
        with sqlite_errors(self.path, "opening it"):
            self.conn = sqlite3.connect(self.path)
            self.conn.executescript(_schema())
            if "n_rows" not in [row[1] for row in self.conn.execute("PRAGMA table_info(done)")]:
                self.conn.execute("ALTER TABLE done ADD COLUMN n_rows INTEGER")  # older store: units unchecked
            if meta is not None:
                self._check_or_write(meta)
            problem = count_problem(self.conn)
        if problem is not None:
            self.conn.close()
            raise FisError(f"results store is damaged: {problem}", source=self.path,
                           fix="rerun with --overwrite, or into a new out folder (rows were deleted or added "
                               "outside fis)")

    def _check_or_write(self, meta: StoreMeta) -> None:
        old = StoreMeta.read(self.conn)
        has_rows = self.conn.execute("SELECT COUNT(*) FROM done").fetchone()[0] > 0
        if old is None and has_rows or old is not None and (old.fingerprint, old.shard, old.shards) != (
                meta.fingerprint, meta.shard, meta.shards):
            self.conn.close()
            raise FisError("results store belongs to another run (fingerprint or shard differs)", source=self.path,
                           fix="use a new out folder, or the same settings and --shard as the run that wrote it")
        with self.conn:
            self.conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                  [(k, str(v)) for k, v in asdict(meta).items()])

    def done_units(self) -> set[str]:
        with sqlite_errors(self.path, "reading its finished units"):
            return {row[0] for row in self.conn.execute("SELECT unit FROM done")}

    def unit_rows(self) -> dict[str, int | None]:
        """Rows each finished unit recorded (None for units of an older store)."""
        with sqlite_errors(self.path, "reading its finished units"):
            return dict(self.conn.execute("SELECT unit, n_rows FROM done").fetchall())

    def commit_unit(self, unit: str, rows: Iterable[dict[str, Any]]) -> None:
        """Write a unit's rows and mark it done with their count, atomically."""
        values = [tuple(r[c] for c in COLUMNS) for r in rows]
        with sqlite_errors(self.path, f"writing unit {unit}"), self.conn:
            self.conn.executemany(
                f"INSERT INTO results ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", values)
            self.conn.execute("INSERT INTO done (unit, n_rows) VALUES (?, ?)", (unit, len(values)))

    def frame(self) -> pd.DataFrame:
        return read_results(self.path)

    def close(self) -> None:
        self.conn.close()


def read_results(path: Path) -> pd.DataFrame:
    """The results table as a DataFrame, in a stable order."""
    if not Path(path).exists():
        raise FisError("results store not found", source=path, fix="run `fis battery` first")
    with sqlite_errors(Path(path), "reading its results"):
        conn = sqlite3.connect(path)
        try:
            df = pd.read_sql_query(f"SELECT * FROM results ORDER BY {', '.join(_KEY)}", conn)
        finally:
            conn.close()
    return df


def merge(sources: list[Path], target: Path, *, partial: bool = False) -> int:
    """Combine shard stores into ``target`` (rows and done units); returns the number of rows.

    Refused, with nothing written: shards of different runs (fingerprints) or shard counts, a missing or
    repeated shard, an incomplete shard (unless ``partial``), and two shards that disagree on a row's values.
    ``target`` is rebuilt from the shards each time and replaces the old one atomically.
    """
    if not sources:
        raise FisError("no shard stores to merge", source=target.parent, fix="run the shards first")
    metas = []
    for src in sources:
        with sqlite_errors(src, "reading it for the merge"):
            conn = sqlite3.connect(src)
            try:
                meta = StoreMeta.read(conn)
                done = conn.execute("SELECT COUNT(*) FROM done").fetchone()[0]
                problem = count_problem(conn)
            finally:
                conn.close()
        if problem is not None:
            raise FisError(f"shard store is damaged: {problem}", source=src,
                           fix="rerun that shard with --overwrite into its folder, or into a new out folder")
        if meta is None:
            raise FisError("shard store has no run fingerprint (written by an older version)", source=src,
                           fix="rerun that shard with this version into a new out folder")
        if not partial and done < meta.units:
            raise FisError(f"shard {meta.shard}/{meta.shards} is incomplete ({done} of {meta.units} units)",
                           source=src, fix="finish it by rerunning the same command, or pass --partial")
        metas.append(meta)
    if len({m.fingerprint for m in metas}) > 1:
        raise FisError("shards come from runs with different settings (fingerprints differ)", source=target.parent,
                       fix="merge only shards of one battery config")
    n = metas[0].shards
    indices = sorted(m.shard for m in metas)
    if any(m.shards != n for m in metas) or (indices != list(range(n)) and not partial) or len(set(indices)) < len(
            indices):
        raise FisError(f"expected shards 0..{n - 1} of {n} once each, found {indices}", source=target.parent,
                       fix="run the missing shards (or pass --partial to merge what is there)")
    with atomic_path(Path(target)) as tmp, sqlite_errors(Path(target), "merging the shards"):
        out = ResultStore(tmp, StoreMeta(metas[0].fingerprint, 0, 1, sum(m.units for m in metas)))
        key = " AND ".join(f"r.{k} IS s.{k}" for k in _KEY)
        differs = " OR ".join(f"r.{c} IS NOT s.{c}" for c in COLUMNS if c not in _KEY)
        for src in sources:  # ATTACH cannot run inside a transaction: commit after each shard
            out.conn.execute("ATTACH DATABASE ? AS shard", (str(src),))
            clash = out.conn.execute(f"SELECT r.feature, r.item, r.readout FROM results r JOIN shard.results s "
                                     f"ON {key} WHERE {differs} LIMIT 1").fetchone()
            if clash is not None:
                out.close()
                raise FisError(f"shards disagree on a result row (feature {clash[0]}, item {clash[1]}, readout "
                               f"{clash[2]})", source=src, fix="rerun the battery into a new out folder")
            out.conn.execute("INSERT OR IGNORE INTO results SELECT * FROM shard.results")
            out.conn.execute("INSERT OR IGNORE INTO done (unit, n_rows) SELECT unit, n_rows FROM shard.done")
            out.conn.commit()
            out.conn.execute("DETACH DATABASE shard")
        n_rows = out.conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        problem = count_problem(out.conn)
        out.close()
        if problem is not None:
            raise FisError(f"merged store does not add up: {problem}", source=target.parent,
                           fix="rerun the shards into a new out folder")
    return int(n_rows)
