"""Safe writes and deletes: an output is complete or absent, a swap leaves the old or the new folder, never
neither, and nothing is written or deleted through a symbolic link.

The one place where fis renames, swaps and removes things on disk (see ``docs/reliability.md``):

* :func:`atomic_path` writes a file under a unique temporary name beside it and renames it over the target;
* :func:`atomic_dir` builds a folder under a unique temporary name and swaps it with the target in ONE atomic
  step (Linux ``renameat2(RENAME_EXCHANGE)``); where that is not available, two renames with a journal file
  that :func:`recover_dir` reads to put the old folder back after a kill between them;
* :func:`remove_listed` deletes exactly the files a fingerprint lists (never a link's target, never an
  unlisted entry), then the folders left empty;
* temporaries carry a random part and are removed only by the process that created them, by exact name.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import FisError

log = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
SWAP_JOURNAL = ".{name}.fis-swap"  # names the folder a two-rename swap moved aside, until the swap is done


def refuse_link(path: Path, what: str = "output") -> None:
    """One-line refusal when ``path`` is a symbolic link: fis never writes or deletes through one."""
    if Path(path).is_symlink():
        raise FisError(f"{what} path is a symbolic link; fis does not write or delete through links",
                       source=path, fix="remove the link, or choose another --out folder")


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` only if the block succeeds."""
    target = Path(target)
    refuse_link(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        refuse_link(target)  # not made a link while we wrote
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists() or tmp_path.is_symlink():
            tmp_path.unlink()  # exact name, created above


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the kernel or filesystem cannot (then two renames are used)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _journal(target: Path) -> Path:
    return target.with_name(SWAP_JOURNAL.format(name=target.name))


def recover_dir(target: Path) -> bool:
    """After a kill between the two renames of a fallback swap, put the old folder back; True if it did.

    Only the folder that the journal (written by this module before the first rename) names is touched."""
    target = Path(target)
    journal = _journal(target)
    if not journal.is_file() or journal.is_symlink():
        return False
    aside = target.with_name(journal.read_text(encoding="utf-8").strip())
    if target.exists() or target.is_symlink():
        journal.unlink()  # the swap completed: the folder aside is the old one, kept for the user to inspect
        return False
    if aside.name.startswith(f".{target.name}.fis-old-") and aside.is_dir() and not aside.is_symlink():
        os.replace(aside, target)
        journal.unlink()
        log.warning("%s: restored the previous folder after an interrupted swap", target)
        return True
    return False


def _unique_sibling(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.fis-{kind}-{secrets.token_hex(6)}")


def swap_dir(new: Path, target: Path) -> Path | None:
    """Put folder ``new`` at ``target``; return where the old folder now is (None if there was none)."""
    if not (target.exists() or target.is_symlink()):
        os.replace(new, target)
        return None
    if _exchange(new, target):
        return new  # the old folder now sits under the temporary's name
    aside = _unique_sibling(target, "old")
    journal = _journal(target)
    journal.write_text(aside.name + "\n", encoding="utf-8")
    os.replace(target, aside)
    os.replace(new, target)  # a kill before this line: recover_dir() renames `aside` back
    journal.unlink()
    return aside


@contextmanager
def atomic_dir(target: Path, *, old_files: Iterable[str] | Callable[[Path], Iterable[str]] = (),
               before_swap: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a new temporary folder beside ``target``; it replaces ``target`` only if the block succeeds.

    ``old_files``: relative paths of the files fis wrote into the folder being replaced (or a function of the
    old folder that lists them); exactly those are deleted afterwards. If anything else is left in it (a
    user's file), the old folder is kept under its unique temporary name and a warning names it.
    ``before_swap(tmp)`` runs once the new folder is complete (e.g. to record its files)."""
    target = Path(target)
    refuse_link(target)
    recover_dir(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.fis-new-", dir=target.parent))
    swapped = False
    try:
        yield tmp
        if before_swap is not None:
            before_swap(tmp)
        refuse_link(target)
        listed = old_files
        if callable(listed) and target.is_dir():
            listed = listed(target)
        old = swap_dir(tmp, target)
        swapped = True
        if old is not None:
            left = remove_listed(old, listed if not callable(listed) else ())
            if left:
                log.warning("%s: kept the previous folder as %s: it holds files fis did not write (%s)",
                            target, old, ", ".join(left[:3]))
    finally:
        if not swapped and tmp.is_dir() and not tmp.is_symlink() and tmp.name.startswith(f".{target.name}.fis-new-"):
            shutil.rmtree(tmp, ignore_errors=True)  # only what this call created and did not swap in


def walk(folder: Path) -> Iterator[tuple[str, str]]:
    """Every entry under ``folder`` as (relative posix path, kind): kind is file, dir, link or other.

    Links are reported, never followed."""
    folder = Path(folder)
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(folder / rel if rel else folder) as it:
            for entry in it:
                path = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_symlink():
                    yield path, "link"
                elif entry.is_dir(follow_symlinks=False):
                    yield path, "dir"
                    stack.append(path)
                elif entry.is_file(follow_symlinks=False):
                    yield path, "file"
                else:
                    yield path, "other"


def remove_listed(folder: Path, files: Iterable[str]) -> list[str]:
    """Delete exactly the regular files ``files`` (relative paths) under ``folder``, then every folder left
    empty, ``folder`` included. Links and unlisted entries are kept. Returns what is left (relative paths)."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return []
    for rel in files:
        path = folder / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            continue
        if _inside_real_folder(folder, path) and path.is_file() and not path.is_symlink():
            path.unlink()
    dirs = sorted((rel for rel, kind in walk(folder) if kind == "dir"), key=lambda r: -r.count("/"))
    for rel in dirs:
        try:
            (folder / rel).rmdir()
        except OSError:
            pass  # not empty: holds something fis did not write
    left = sorted(rel for rel, _ in walk(folder))
    if not left:
        folder.rmdir()
    return left


def _inside_real_folder(folder: Path, path: Path) -> bool:
    """No component between ``folder`` and ``path`` is a link (so an unlink cannot reach outside)."""
    cur = folder
    for part in path.relative_to(folder).parts[:-1]:
        cur = cur / part
        if cur.is_symlink() or not cur.is_dir():
            return False
    return True


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically, with stable key order for diffs."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


# Environment faults: what the CLI prints (one line) for an OSError raised while reading or writing.
_FAULTS = {
    errno.ENOSPC: ("no space left on the device", "free space, or write to another --out on another disk", 1),
    errno.EDQUOT: ("disk quota exceeded", "free space, or write to another --out", 1),
    errno.EROFS: ("the file system is read-only", "write to a folder on a writable disk", 1),
    errno.EACCES: ("permission denied", "check the folder's permissions, or choose another --out", 1),
    errno.EPERM: ("operation not permitted", "check the folder's permissions, or choose another --out", 1),
    errno.EBUSY: ("the file is locked or in use", "close the program holding it and rerun", 1),
    errno.ETXTBSY: ("the file is locked or in use", "close the program holding it and rerun", 1),
    errno.EAGAIN: ("the file is locked or in use", "close the program holding it and rerun", 1),
    errno.ENAMETOOLONG: ("a file name is too long", "use a shorter name (battery `name:`, --out, design name)",
                         2),
    errno.EIO: ("input/output error", "check the disk", 1),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) and rerun", 1),
}


def fault_line(err: OSError) -> tuple[str, int] | None:
    """One line and the exit code for an environment fault (disk full, read-only, locked, name too long);
    None for an OSError that is not one (a bug, reported as such)."""
    if err.errno not in _FAULTS:
        return None
    what, fix, code = _FAULTS[err.errno]
    where = err.filename if err.filename is not None else ""
    where = f"{where}: " if where else ""
    return f"{where}{what}; nothing was half-written, rerun the same command to resume (fix: {fix})", code
