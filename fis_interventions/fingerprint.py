"""One rule for every stage's output folder: a fingerprint of what determines its numbers.

Harvest, train, refit, screen, battery and report each compute a :class:`Fingerprint` of everything that
decides their results (their config, the fingerprints of the folders they read, the checkpoint's hash, the
model, the package version where it matters) and write it as ``fingerprint.json`` into their output folder
before anything else. The rule, enforced by :func:`claim` (resumable stages) and :func:`replace_folder`
(stages that write their folder whole):

* absent or empty folder: ours now;
* our fingerprint, same digest: resume (or rewrite the same result);
* our fingerprint, another digest: refused in one line naming what differs, unless ``overwrite`` is set;
* anything else (files and no fingerprint, another stage's folder, a file): refused, never deleted.

So a rerun with other settings never mixes old and new results, and nothing we did not write is removed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import fnmatch
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FisError
from .io import atomic_dir, write_json

FINGERPRINT_FILE = "fingerprint.json"
FORMAT = "fis-fingerprint/1"


def canonical_json(obj: Any) -> str:
    """Key-sorted, compact JSON: equal inputs give byte-equal text, hence equal digests."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def json_digest(obj: Any) -> str:
    """sha256 of an object's canonical JSON (a content identity: key order and layout do not count)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, streamed (weights files can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def package_version() -> str:
    try:
        return importlib.metadata.version("fis-interventions")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a bare source tree
        return "unknown"


@functools.lru_cache(maxsize=1)
def code_identity() -> dict[str, str]:
    """The code's own identity: the package version and a sha256 over the installed package's Python source
    (relative paths and bytes, sorted), so any change to the code changes every fingerprint (the version
    alone stayed 0.1.0 across every commit). Computed once per process (~100 small files)."""
    return {"version": package_version(), "source": source_digest(Path(__file__).resolve().parent)}


def source_digest(root: Path) -> str:
    """sha256 over every ``*.py`` under ``root``: relative path and content hash, in sorted order."""
    h = hashlib.sha256()
    for file in sorted(Path(root).rglob("*.py")):
        h.update(file.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(file.read_bytes()).digest())
    return h.hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    """What decides a stage's numbers, and its sha256 digest."""

    stage: str
    inputs: dict[str, Any]
    digest: str = field(init=False)
    code: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        clean = json.loads(canonical_json(self.inputs))  # paths, tuples -> JSON types, so reads compare equal
        object.__setattr__(self, "inputs", clean)
        object.__setattr__(self, "code", code_identity())
        object.__setattr__(self, "digest", json_digest({"format": FORMAT, "stage": self.stage, "inputs": clean,
                                                        "code": self.code}))

    @property
    def short(self) -> str:
        return self.digest[:16]

    def record(self) -> dict[str, Any]:
        return {"format": FORMAT, "stage": self.stage, "digest": self.digest, "written_by":
                f"fis-interventions {package_version()}", "code": self.code, "inputs": self.inputs}


def read_fingerprint(folder: Path) -> dict[str, Any] | None:
    """The fingerprint record of ``folder``, or None when it has none."""
    file = Path(folder) / FINGERPRINT_FILE
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise FisError(f"{FINGERPRINT_FILE} is unreadable", source=folder,
                       fix="this folder was damaged; write to a new --out folder") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or "digest" not in record:
        raise FisError(f"{FINGERPRINT_FILE} is not a fis fingerprint", source=folder,
                       fix="write to a new --out folder")
    return record


def write_fingerprint(folder: Path, fp: Fingerprint) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / FINGERPRINT_FILE, fp.record())


def differences(old: dict[str, Any], new: dict[str, Any], limit: int = 3) -> list[str]:
    """``key: old -> new`` for the first ``limit`` dotted keys whose values differ."""
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            out: dict[str, Any] = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
            return out
        return {prefix: d}

    a, b = flat(old), flat(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))
    shown = [f"{k}: {_short(a.get(k, '<unset>'))} -> {_short(b.get(k, '<unset>'))}" for k in keys[:limit]]
    if len(keys) > limit:
        shown.append(f"and {len(keys) - limit} more")
    return shown


def _code_change(record: dict[str, Any], fp: Fingerprint) -> str:
    """Why two fingerprints with equal inputs differ: the fis code that wrote the folder changed."""
    old = record.get("code") or {}
    if old.get("version") != fp.code["version"]:
        return f"written by fis-interventions {old.get('version', 'of an older format')}, this is {fp.code['version']}"
    if old.get("source") != fp.code["source"]:
        return (f"written by other fis code (source {str(old.get('source'))[:12]}, this is "
                f"{fp.code['source'][:12]}): results from two codes would mix")
    return "fingerprint format"


def _short(value: Any, width: int = 40) -> str:
    text = canonical_json(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _is_empty_dir(path: Path) -> bool:
    """Empty, or holding only another process's claim in flight (the temporary file ``write_json`` writes
    before it renames it to the fingerprint): ranks of a ``torchrun`` harvest claim one folder at once."""
    in_flight = f".{FINGERPRINT_FILE}."
    return path.is_dir() and all(p.name.startswith(in_flight) and p.name.endswith(".tmp") for p in path.iterdir())


def foreign_entries(out: Path, owned: Sequence[str]) -> list[str]:
    """Entries of ``out`` that match none of the ``owned`` name patterns (hidden temporaries are ours too)."""
    return sorted(p.name for p in Path(out).iterdir()
                  if p.name != FINGERPRINT_FILE and not p.name.startswith(".")
                  and not any(fnmatch.fnmatchcase(p.name, pat) for pat in owned))


def check_output(out: Path, fp: Fingerprint, *, overwrite: bool = False, owned: Sequence[str] | None = None,
                 replaces_same: bool = False) -> str:
    """Decide what may happen to ``out`` without touching it: ``"new"``, ``"same"`` or ``"replace"``.

    Raises :class:`FisError` (one line, exit 2) for a folder we did not write, another stage's folder, the
    same stage with other settings when ``overwrite`` is not set, and, whenever the folder would be deleted
    (``"replace"``, or ``"same"`` with ``replaces_same``), for any entry that matches neither ``owned`` nor
    the files the fingerprint records as written: a user's file inside our folder is never deleted either.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FisError("output path exists and is a file", source=out, fix="choose a folder path for --out")
    if not out.exists() or _is_empty_dir(out):
        return "new"
    record = read_fingerprint(out)
    if record is None:
        raise FisError(f"output folder holds files that fis did not write (no {FINGERPRINT_FILE}); nothing was "
                       "changed", source=out, fix="choose a new or empty --out folder")
    if record.get("stage") != fp.stage:
        raise FisError(f"output folder holds a {record.get('stage')} output, not a {fp.stage}", source=out,
                       fix="choose another --out folder")
    if record["digest"] == fp.digest:
        state = "same"
    elif overwrite:
        state = "replace"
    else:
        what = "; ".join(differences(record.get("inputs", {}), fp.inputs)) or _code_change(record, fp)
        raise FisError(f"output folder holds a {fp.stage} run with other settings ({what})", source=out,
                       fix="use a new --out folder, or pass --overwrite to replace it")
    if state == "replace" or replaces_same:
        foreign = foreign_entries(out, [*(owned or ()), *record.get("files", [])])
        if foreign:
            raise FisError(f"output folder holds files that fis did not write ({', '.join(foreign[:3])}); nothing "
                           "was changed", source=out, fix="move them elsewhere, or choose a new --out folder")
    return state


def claim(out: Path, fp: Fingerprint, *, owned: Sequence[str], overwrite: bool = False) -> str:
    """Make ``out`` this run's folder before anything is written; returns ``"new"`` or ``"resume"``.

    ``owned``: name patterns of what the stage writes there. With ``overwrite`` a folder holding our
    fingerprint of the same stage, and only entries we own, is emptied first.
    """
    out = Path(out)
    state = check_output(out, fp, overwrite=overwrite, owned=owned)
    if state == "same":
        return "resume"
    if state == "replace":
        shutil.rmtree(out)  # checked above: our fingerprint, nothing but our own entries
    write_fingerprint(out, fp)
    return "new"


@contextmanager
def replace_folder(out: Path, fp: Fingerprint, *, overwrite: bool = False) -> Iterator[Path]:
    """Write a whole output folder atomically under the rule of :func:`check_output`; the fingerprint written
    with it lists its files, so a later replacement can tell ours from a user's."""
    out = Path(out)
    check_output(out, fp, overwrite=overwrite, replaces_same=True)
    with atomic_dir(out) as tmp:
        yield tmp
        write_json(tmp / FINGERPRINT_FILE, {**fp.record(), "files": sorted(p.name for p in tmp.iterdir())})


def folder_identity(folder: Path) -> str:
    """What a downstream stage records for a folder it reads: its fingerprint digest, or a hash of its files.

    Folders written before fingerprints existed (and hand-made ones) get the sha256 of their defining files.
    """
    folder = Path(folder)
    record = read_fingerprint(folder) if folder.is_dir() else None
    if record is not None:
        if record.get("stage") == "harvest":
            return harvest_identity(folder, record["digest"])
        return record["digest"]
    for name in ("manifest.json", "cfg.json", "run.json"):
        if (folder / name).is_file():
            return file_digest(folder / name)
    return "missing"


def harvest_identity(folder: Path, digest: str) -> str:
    """A harvest's identity for the stages that read it: its settings' digest plus what it holds now (token
    count and the shard list with each shard's size). A harvest extended with a larger ``--tokens`` keeps its
    fingerprint (it resumes) but gets another identity, so a training resumed on it is refused."""
    try:
        manifest = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return digest + ":no-manifest"
    shards = [{k: s.get(k) for k in ("file", "n_contexts", "n_tokens")} for s in manifest.get("shards", [])
              if isinstance(s, dict)]
    return json_digest({"fingerprint": digest, "token_count": manifest.get("token_count"), "shards": shards,
                        "complete": manifest.get("complete")})


def checkpoint_identity(path: Path) -> str:
    """sha256 of a checkpoint's weights and its architecture/normalisation (not its provenance or timings); a
    SAELens SAE folder is identified by its weights and its cfg the same way."""
    from .sae.checkpoint import read_meta, resolve

    path = resolve(Path(path))
    meta = read_meta(path)
    h = hashlib.sha256()
    h.update(canonical_json({k: meta.get(k) for k in ("format", "model_name", "hook", "d_in", "architecture",
                                                      "normalization")}).encode())
    for weights in sorted(path.glob("*.safetensors")):  # ours: weights.safetensors; SAELens: sae_weights...
        h.update(weights.name.encode())
        h.update(file_digest(weights).encode())
    return h.hexdigest()

