"""Folder swaps are crash safe: a process killed at any point of a save (before the swap, between the two
renames of the fallback swap, after the swap) leaves the old or the new folder at the target, never neither,
and the next save or read puts an interrupted swap right instead of deleting the old folder.

Kills are real: a child process runs the save with one step replaced by ``os._exit`` (no ``finally`` runs,
exactly as under SIGKILL)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fis_interventions.fingerprint import FINGERPRINT_FILE, Fingerprint, replace_folder
from fis_interventions.io import atomic_dir, recover_dir

ROOT = Path(__file__).resolve().parents[2]


def _killed_save(target: Path, *, kill_at: str, fallback: bool, whole_folder: bool = False) -> int:
    """Run a save of ``target`` (new content "new") in a child process that dies at ``kill_at``:
    ``block`` (while writing the new folder), ``first_rename`` / ``second_rename`` (fallback swap, before the
    nth rename), ``exchange`` (just before the atomic swap), ``cleanup`` (after the swap, before deleting the old)."""
    code = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        import fis_interventions.io as fio
        from fis_interventions.fingerprint import Fingerprint, replace_folder
        kill_at, fallback, whole = {kill_at!r}, {fallback!r}, {whole_folder!r}
        target = Path({str(target)!r})
        real_replace, real_exchange, real_remove = os.replace, fio._exchange, fio.remove_listed
        calls = []
        def replace(a, b):
            calls.append((a, b))
            if kill_at == "first_rename" and len(calls) == 1 or kill_at == "second_rename" and len(calls) == 2:
                os._exit(9)
            return real_replace(a, b)
        def exchange(a, b):
            if kill_at == "exchange":
                os._exit(9)
            return False if fallback else real_exchange(a, b)
        def remove(folder, files):
            if kill_at == "cleanup":
                os._exit(9)
            return real_remove(folder, files)
        fio._exchange, fio.remove_listed = exchange, remove
        if whole:
            ctx = replace_folder(target, Fingerprint("report", {{"v": 1}}))
        else:
            ctx = fio.atomic_dir(target, old_files=["data.txt"])
        with ctx as tmp:
            (tmp / "data.txt").write_text("new")
            if kill_at == "block":
                os._exit(9)
            if not whole:  # only the swap's renames from here on (replace_folder's fingerprint write stays real)
                os.replace = replace
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True).returncode


def _old_folder(target: Path) -> None:
    target.mkdir()
    (target / "data.txt").write_text("old")


def _content(target: Path) -> str | None:
    return (target / "data.txt").read_text() if (target / "data.txt").is_file() else None


@pytest.mark.parametrize(("kill_at", "fallback"), [
    ("block", False), ("exchange", False), ("cleanup", False),  # renameat2(RENAME_EXCHANGE): one atomic step
    ("block", True), ("first_rename", True), ("second_rename", True), ("cleanup", True)])  # no exchange available
def test_a_kill_at_any_point_leaves_the_old_or_the_new_folder(tmp_path, kill_at, fallback):
    target = tmp_path / "checkpoint"
    _old_folder(target)
    assert _killed_save(target, kill_at=kill_at, fallback=fallback) == 9
    recover_dir(target)  # what the next save / read does first
    assert _content(target) in ("old", "new"), f"killed at {kill_at}: the target lost both results"
    if kill_at in ("block", "first_rename", "second_rename", "exchange"):
        assert _content(target) == "old"
    else:
        assert _content(target) == "new"
    # the next save works and does not delete anything it did not create (leftovers stay for inspection)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "checkpoint")
    with atomic_dir(target, old_files=["data.txt"]) as tmp:
        (tmp / "data.txt").write_text("next")
    assert _content(target) == "next"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "checkpoint") == [
        n for n in leftovers if not n.endswith(".fis-swap")]


def test_kill_between_the_two_renames_then_the_next_save_keeps_the_old_result(tmp_path):
    """The case of issue 21: a crash between the renames left only the old folder aside, and the next save
    deleted it. Now the journal names it, and the next save (or a read) renames it back first."""
    target = tmp_path / "checkpoint"
    _old_folder(target)
    assert _killed_save(target, kill_at="second_rename", fallback=True) == 9
    assert not target.exists()
    aside = [p for p in tmp_path.iterdir() if ".fis-old-" in p.name]
    assert len(aside) == 1 and _content(aside[0]) == "old"
    from fis_interventions.sae.checkpoint import resolve

    resolve(target)  # a read repairs it as well
    assert _content(target) == "old" and not aside[0].exists()


def test_checkpoint_save_killed_between_renames_loads_the_previous_checkpoint(tmp_path, tiny_bridge):
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_checkpoints import save_tiny_joint_checkpoint

    from fis_interventions.sae import load_checkpoint

    ckpt = save_tiny_joint_checkpoint(tmp_path / "run" / "checkpoint", tiny_bridge.tokenizer, seed=0)
    before = load_checkpoint(ckpt).model.state_dict()
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        import fis_interventions.io as fio
        from fis_interventions.models import load_model
        from tiny_checkpoints import save_tiny_joint_checkpoint
        fio._exchange = lambda a, b: False
        real, n = os.replace, []
        def replace(a, b):
            if ".fis-old-" in str(b) or n:
                n.append(b)
            if len(n) == 2:
                os._exit(9)
            return real(a, b)
        os.replace = replace
        save_tiny_joint_checkpoint({str(ckpt)!r}, load_model("tiny-random", device="cpu").tokenizer, seed=1)
    """)
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True).returncode == 9
    assert not ckpt.exists()
    after = load_checkpoint(ckpt.parent).model.state_dict()  # the read restores the previous checkpoint
    assert all((before[k] == after[k]).all() for k in before)


@pytest.mark.parametrize("kill_at", ["block", "exchange", "cleanup"])
def test_whole_folder_stage_killed_keeps_old_or_new_result(tmp_path, kill_at):
    out = tmp_path / "report"
    with replace_folder(out, Fingerprint("report", {"v": 1})) as tmp:
        (tmp / "data.txt").write_text("old")
    assert _killed_save(out, kill_at=kill_at, fallback=False, whole_folder=True) == 9
    assert _content(out) in ("old", "new")
    record = json.loads((out / FINGERPRINT_FILE).read_text())
    assert record["files"] == ["data.txt"]
    # a same-settings rerun afterwards works (the leftovers beside it are not ours to delete, and stay)
    siblings = sorted(p.name for p in tmp_path.iterdir())
    with replace_folder(out, Fingerprint("report", {"v": 1})) as tmp:
        (tmp / "data.txt").write_text("again")
    assert _content(out) == "again" and sorted(p.name for p in tmp_path.iterdir()) == siblings
