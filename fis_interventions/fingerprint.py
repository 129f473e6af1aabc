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

import fcntl
import functools
import hashlib
import importlib.metadata
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import FisError
from .io import atomic_dir, recover_dir, refuse_link, remove_listed, walk, write_json

FINGERPRINT_FILE = "fingerprint.json"
T = TypeVar("T")
LOCK_FILE = ".fis.lock"  # held by the process writing the folder (see lock_folder)
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
    """Empty, or holding only fis's lock and another process's claim in flight (the temporary file
    ``write_json`` writes before it renames it to the fingerprint): ranks of a ``torchrun`` harvest claim one
    folder at once."""
    in_flight = f".{FINGERPRINT_FILE}."
    return path.is_dir() and not path.is_symlink() and all(
        (p.name == LOCK_FILE or p.name.startswith(in_flight) and p.name.endswith(".tmp")) and p.is_file()
        and not p.is_symlink() for p in path.iterdir())


# --- ownership: a folder's entries are fis's only if its fingerprint lists them -----------------------------

def _is_temporary_of(name: str, base: str) -> bool:
    """``name`` is the in-flight temporary :func:`~fis_interventions.io.atomic_path` makes for file ``base``."""
    return name.startswith(f".{base}.") and name.endswith(".tmp") and len(name) > len(base) + 6


def _is_swap_leftover(name: str, base: str) -> bool:
    """A folder :func:`~fis_interventions.io.atomic_dir` made beside folder ``base`` (killed mid-save)."""
    return name.startswith((f".{base}.fis-new-", f".{base}.fis-old-")) or name == f".{base}.fis-swap"


def classify(folder: Path, files: Sequence[str], *, top: bool = True) -> tuple[list[str], list[str]]:
    """Split the entries of ``folder`` into (files fis wrote, entries it did not), as relative paths.

    Ours: ``fingerprint.json`` and the lock at the top, every regular file the list names (``a/b.json`` for a
    file in a sub-folder), the temporaries of listed files, and for a listed ``name/`` (a nested fis folder,
    e.g. a training run's own harvest) whatever that folder's fingerprint owns. Everything else is not ours:
    unlisted names (hidden ones included), links (never followed), special files."""
    folder = Path(folder)
    listed = set(files)
    owned: list[str] = []
    foreign: list[str] = []
    here = {f.split("/", 1)[0] for f in listed}  # names at this level that the list reaches
    base_names = {f for f in listed if "/" not in f} | {n.rstrip("/") for n in here}
    if top:
        base_names |= {FINGERPRINT_FILE}
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        name = entry.name
        if entry.is_symlink():
            foreign.append(name)
        elif entry.is_file(follow_symlinks=False):
            ours = (name in listed or top and name in (FINGERPRINT_FILE, LOCK_FILE)
                    or any(_is_temporary_of(name, b) for b in base_names)
                    or any(name == f".{b}.fis-swap" for b in base_names))
            (owned if ours else foreign).append(name)
        elif entry.is_dir(follow_symlinks=False):
            if f"{name}/" in listed:  # a nested fis folder: its own fingerprint says what is ours
                record = read_fingerprint(folder / name)
                sub = record.get("files", []) if record else None
                if sub is None:
                    foreign.append(name)
                    continue
                o, f = classify(folder / name, sub, top=True)
            else:
                prefix = next((b for b in base_names if _is_swap_leftover(name, b)), None)
                inner = name if prefix is None else prefix
                sub = [f.split("/", 1)[1] for f in listed if f.startswith(f"{inner}/") and "/" in f]
                if not sub and prefix is None:
                    foreign.append(name)
                    continue
                o, f = classify(folder / name, sub, top=False)
            owned += [f"{name}/{x}" for x in o]
            foreign += [f"{name}/{x}" for x in f]
        else:
            foreign.append(name)
    return owned, foreign


def foreign_entries(out: Path, listed: Sequence[str]) -> list[str]:
    """Entries of ``out`` that fis did not write: not in ``listed`` (hidden names and links included)."""
    return classify(Path(out), listed)[1]


def _listed(record: dict[str, Any] | None) -> list[str]:
    return list(record.get("files", [])) if record else []


def own(out: Path, names: Sequence[str]) -> None:
    """Add ``names`` (relative paths; ``name/`` for a nested fis folder) to the file list of ``out``'s
    fingerprint BEFORE writing them, so a later ``--overwrite`` can tell them from a user's files. A no-op
    for a folder without a fingerprint. Several processes (harvest ranks) may call it at once: the update is
    serialised by a lock on the folder itself."""
    out = Path(out)
    if not (out / FINGERPRINT_FILE).is_file():
        return
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        record = read_fingerprint(out)
        if record is None:
            return
        files = _listed(record)
        new = [n for n in names if n not in files]
        if new:
            write_json(out / FINGERPRINT_FILE, {**record, "files": sorted({*files, *new})})
    finally:
        os.close(fd)  # closing releases the lock


# --- one writer per folder ------------------------------------------------------------------------------------

_HELD: dict[str, tuple[int, bool]] = {}


def lock_folder(out: Path, *, shared: bool = False) -> None:
    """Hold ``out/.fis.lock`` for this process: a second fis process writing into ``out`` is refused in one
    line instead of racing. Ranks of one sharded harvest hold it ``shared`` (they write disjoint files); a
    process holds it until :func:`release_folder` or its exit (the kernel drops the lock, so no stale lock
    survives a kill)."""
    out = Path(out)
    key = str(out.resolve())
    if key in _HELD:
        return
    path = out / LOCK_FILE
    if path.is_symlink():
        raise FisError(f"{LOCK_FILE} is a symbolic link", source=out, fix="remove it, or choose another --out")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FisError("another fis process is writing to this folder (its lock .fis.lock is held)", source=out,
                       fix="wait for it to finish, or use another --out") from None
    _HELD[key] = (fd, shared)


def release_folder(out: Path) -> None:
    held = _HELD.pop(str(Path(out).resolve()), None)
    if held is not None:
        os.close(held[0])


@contextmanager
def holding_locks() -> Iterator[None]:
    """Release every folder lock taken inside the block when it ends (a stage run from Python, a notebook)."""
    before = set(_HELD)
    try:
        yield
    finally:
        for key in [k for k in _HELD if k not in before]:
            os.close(_HELD.pop(key)[0])


def releases_locks(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a stage's Python API so that the folder locks it takes are released when it returns."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        with holding_locks():
            return fn(*args, **kwargs)
    return wrapper


def refuse_links_inside(out: Path) -> None:
    """One line if any entry under ``out`` is a symbolic link: fis never writes or deletes through one."""
    links = [rel for rel, kind in walk(out) if kind == "link"] if Path(out).is_dir() else []
    if links:
        raise FisError(f"output folder holds symbolic links ({', '.join(sorted(links)[:3])}); fis does not write "
                       "or delete through links; nothing was changed", source=out,
                       fix="remove the links, or choose another --out folder")


def check_output(out: Path, fp: Fingerprint, *, overwrite: bool = False, replaces_same: bool = False) -> str:
    """Decide what may happen to ``out`` without touching it: ``"new"``, ``"same"`` or ``"replace"``.

    Raises :class:`FisError` (one line, exit 2) for a folder we did not write, another stage's folder, the
    same stage with other settings when ``overwrite`` is not set, a link anywhere inside, and, whenever the
    folder would be deleted (``"replace"``, or ``"same"`` with ``replaces_same``), for any entry the
    fingerprint does not list: a user's file inside our folder is never deleted."""
    out = Path(out)
    refuse_link(out, "--out")
    if out.exists() and not out.is_dir():
        raise FisError("output path exists and is a file", source=out, fix="choose a folder path for --out")
    recover_dir(out)
    if not out.exists() or _is_empty_dir(out):
        return "new"
    record = read_fingerprint(out)
    if record is None:
        raise FisError(f"output folder holds files that fis did not write (no {FINGERPRINT_FILE}); nothing was "
                       "changed", source=out, fix="choose a new or empty --out folder")
    if record.get("stage") != fp.stage:
        raise FisError(f"output folder holds a {record.get('stage')} output, not a {fp.stage}", source=out,
                       fix="choose another --out folder")
    refuse_links_inside(out)
    if record["digest"] == fp.digest:
        state = "same"
    elif overwrite:
        state = "replace"
    else:
        what = "; ".join(differences(record.get("inputs", {}), fp.inputs)) or _code_change(record, fp)
        raise FisError(f"output folder holds a {fp.stage} run with other settings ({what})", source=out,
                       fix="use a new --out folder, or pass --overwrite to replace it")
    if state == "replace" or replaces_same:
        foreign = foreign_entries(out, _listed(record))
        if foreign:
            raise FisError(f"output folder holds files that fis did not write ({', '.join(foreign[:3])}); nothing "
                           "was changed", source=out, fix="move them elsewhere, or choose a new --out folder")
    return state


def claim(out: Path, fp: Fingerprint, *, overwrite: bool = False, shared: bool = False) -> str:
    """Make ``out`` this run's folder before anything is written; returns ``"new"`` or ``"resume"``.

    Takes the folder's lock (``shared`` for the ranks of one sharded harvest), then decides under it. With
    ``overwrite`` a folder holding our fingerprint of the same stage, and only files it lists, is emptied
    first: exactly the listed files are deleted, never a link's target."""
    out = Path(out)
    check_output(out, fp, overwrite=overwrite)  # before creating anything: a refused folder stays untouched
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        lock_folder(out, shared=shared)
        state = check_output(out, fp, overwrite=overwrite)  # again, now that no other process can change it
        if state == "same":
            return "resume"
        if state == "replace":
            owned, _ = classify(out, _listed(read_fingerprint(out)))
            remove_listed(out, [o for o in owned if o != LOCK_FILE])  # checked above: nothing else is inside
        write_fingerprint(out, fp)
    except BaseException:
        if created and not (out / FINGERPRINT_FILE).exists():
            release_folder(out)
            remove_listed(out, [LOCK_FILE])  # a disk fault on the first write leaves no folder behind
        raise
    return "new"


def unclaim(out: Path, fp: Fingerprint) -> None:
    """Undo a fresh :func:`claim` of a run refused before it wrote anything: remove our fingerprint (if it
    is this run's and lists no file) and lock, and the folder if that empties it."""
    out = Path(out)
    record = read_fingerprint(out) if out.is_dir() else None
    if record is None or record["digest"] != fp.digest or _listed(record):
        return
    release_folder(out)
    remove_listed(out, [FINGERPRINT_FILE, LOCK_FILE])


@contextmanager
def replace_folder(out: Path, fp: Fingerprint, *, overwrite: bool = False) -> Iterator[Path]:
    """Write a whole output folder atomically under the rule of :func:`check_output`; the fingerprint written
    with it lists its files, so a later replacement can tell ours from a user's.

    The new folder is built beside ``out`` under a unique temporary name and swapped in at once; of the old
    folder exactly the files its fingerprint lists are deleted afterwards."""
    out = Path(out)
    check_output(out, fp, overwrite=overwrite, replaces_same=True)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    had_lock = (out / LOCK_FILE).exists()
    try:
        lock_folder(out)
        check_output(out, fp, overwrite=overwrite, replaces_same=True)

        def old_files(old: Path) -> list[str]:
            return [*classify(old, _listed(read_fingerprint(old)))[0], LOCK_FILE]

        def list_files(tmp: Path) -> None:
            names = sorted(rel for rel, kind in walk(tmp) if kind == "file" and rel != FINGERPRINT_FILE)
            write_json(tmp / FINGERPRINT_FILE, {**fp.record(), "files": names})

        with atomic_dir(out, old_files=old_files, before_swap=list_files) as tmp:
            yield tmp
    except BaseException:
        if created and out.is_dir() and sorted(p.name for p in out.iterdir()) in ([], [LOCK_FILE]):
            release_folder(out)
            remove_listed(out, [LOCK_FILE])  # a refused or failed first run leaves no folder behind
        elif not had_lock and (out / LOCK_FILE).is_file() and not (out / LOCK_FILE).is_symlink():
            release_folder(out)
            (out / LOCK_FILE).unlink()  # the old result is left exactly as it was
        raise
    finally:
        release_folder(out)


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

