"""Environment faults in every stage that writes: disk full (ENOSPC), read-only folder (EROFS), permission denied
(EACCES; tests run as root, so a chmod'ed folder would not stop them: the write is made to fail instead), a locked
file (EBUSY) and a name too long (ENAMETOOLONG). Each ends in ONE line on stderr, exit 1 (2 for a name too
long, which the user fixes), no traceback, no temporary left behind, and a rerun without the fault completes:
nothing was half-written, and a refused first run did not claim its folder.

The fault is injected where every fis write ends: the rename that puts a finished file or folder in place
(``os.replace`` and the atomic exchange), for paths under this test's ``disk/`` folder only, after ``after``
successful ones (so the fault also strikes in the middle of a run)."""

from __future__ import annotations

import errno
import os
import sqlite3
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tiny_checkpoints

from tiny_checkpoints import save_tiny_joint_checkpoint  # noqa: E402

import fis_interventions.io as fio  # noqa: E402
from fis_interventions.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HOOK = "blocks.1.hook_resid_post"
DESIGN = ROOT / "stimuli" / "negation_sentiment.yaml"
KINDS = {"ENOSPC": (errno.ENOSPC, 1, "no space left"), "EROFS": (errno.EROFS, 1, "read-only"),
         "EACCES": (errno.EACCES, 1, "permission denied"), "EBUSY": (errno.EBUSY, 1, "locked"),
         "ENAMETOOLONG": (errno.ENAMETOOLONG, 2, "too long")}


def inject(monkeypatch, disk: Path, code: int, after: int = 0) -> None:
    """Make the (after+1)-th and later renames into ``disk`` fail with ``code``."""
    real_replace, real_exchange = os.replace, fio._exchange
    seen = [0]

    def hit(dst) -> bool:
        if not str(Path(dst)).startswith(str(disk)):
            return False
        seen[0] += 1
        return seen[0] > after

    def replace(src, dst, **kw):
        if hit(dst):
            raise OSError(code, os.strerror(code), str(dst))
        return real_replace(src, dst, **kw)

    def exchange(a, b):
        if hit(b):
            raise OSError(code, os.strerror(code), str(b))
        return real_exchange(a, b)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(fio, "_exchange", exchange)


def leftovers(disk: Path) -> list[str]:
    return sorted(str(p.relative_to(disk)) for p in disk.rglob("*")
                  if p.name.endswith(".tmp") or ".fis-new-" in p.name or ".fis-old-" in p.name)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_bridge):
    """A corpus, a harvest, a checkpoint, a train config, a battery config and a synthetic battery run."""
    from fis_interventions.activations import harvest
    from fis_interventions.reports.synthetic import write_synthetic_run

    root = tmp_path_factory.mktemp("inputs")
    corpus = root / "c.txt"
    corpus.write_text(" ".join(f"Sentence number {i} talks about cats, dogs and the weather today." for i in range(300)))
    acts = root / "acts"
    harvest(bridge=tiny_bridge, model="tiny-random", hook=HOOK, corpus=[str(corpus)], out=acts, tokens=3000,
            context_length=32, contexts_per_shard=16, progress=False)
    ckpt = save_tiny_joint_checkpoint(root / "ckpt" / "checkpoint", tiny_bridge.tokenizer, seed=0)
    run = write_synthetic_run(root / "run", seed=0, n_items=8, n_prompts=2, values=(4.0,), extras=False)
    return {"corpus": corpus, "acts": acts, "ckpt": ckpt, "run": run, "root": root}


def stage_args(stage: str, inputs: dict, disk: Path) -> list[str]:
    """The command line of ``stage`` writing under ``disk``."""
    if stage == "harvest":
        return ["harvest", "--model", "tiny-random", "--hook", HOOK, "--corpus", str(inputs["corpus"]), "--out",
                str(disk / "acts"), "--tokens", "1500", "--context-length", "32", "--contexts-per-shard", "16",
                "--device", "cpu", "--no-progress"]
    if stage == "train":
        cfg = disk.parent / "train.yaml"
        cfg.write_text(yaml.safe_dump(dict(activations=str(inputs["acts"]), d_sae=64, k=4, mode="sae",
                                           batch_size=64, tokens=256, warmup_steps=1, eval_every=2,
                                           checkpoint_every=2, heldout_fraction=0.1)))
        return ["train", str(cfg), "--out", str(disk / "sae"), "--no-progress"]
    if stage == "battery":
        cfg = disk.parent / "battery.yaml"
        cfg.write_text(yaml.safe_dump(dict(
            name="t", model="tiny-random", checkpoint=str(inputs["ckpt"]), designs=[str(DESIGN)],
            features=[{"point": "sae.hook_latents", "index": 1}], interventions=[{"kind": "scale", "values": [0.0]}],
            max_items=1, batch_size=16, device="cpu", out=str(disk / "bat"))))
        return ["battery", str(cfg), "--no-progress"]
    if stage == "screen":
        return ["screen", "--checkpoint", str(inputs["ckpt"]), "--design", str(DESIGN), "--model", "tiny-random",
                "--point", "sae.hook_latents", "--device", "cpu", "--out", str(disk / "screen")]
    if stage == "report":
        return ["report", str(inputs["run"]), "--out", str(disk / "report")]
    if stage == "export":
        return ["export", str(inputs["ckpt"]), "--out", str(disk / "export")]
    if stage == "features":
        return ["features", str(inputs["ckpt"]), "--point", "sae.hook_latents", "--ids", "1,2", "--top", "3",
                "--activations", str(inputs["acts"]), "--device", "cpu", "--out", str(disk / "cards")]
    if stage == "power":
        return ["power", "--out", str(disk / "power"), "--items", "8", "--sims", "20", "--effect", "1",
                "--var-resid", "1"]
    if stage == "stats":
        return ["stats", str(ROOT / "tests" / "golden" / "factorial_items.csv"), "--dv", "logit_shift", "--factor",
                "formality", "--factor", "emotion", "--json", str(disk / "stats.json")]
    if stage == "eval":
        return ["eval", str(inputs["ckpt"]), "--activations", str(inputs["acts"]), "--max-contexts", "4",
                "--device", "cpu", "--json", str(disk / "eval.json"), "--no-progress"]
    raise AssertionError(stage)


STAGES = ["harvest", "train", "battery", "screen", "report", "export", "features", "power", "stats", "eval"]


def _fault_run(monkeypatch, capsys, inputs, tmp_path, stage: str, kind: str, after: int = 0) -> Path:
    disk = tmp_path / "disk"
    disk.mkdir()
    code, exit_code, words = KINDS[kind]
    args = stage_args(stage, inputs, disk)
    capsys.readouterr()
    with monkeypatch.context() as m:
        inject(m, disk, code, after)
        assert main(args) == exit_code, f"{stage} under {kind}"
    err = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in err if ln.startswith("error:")]
    assert len(errors) == 1 and words in errors[0] and "Traceback" not in "\n".join(err), err
    assert leftovers(disk) == []
    assert main(args) == 0, f"{stage}: the rerun after {kind} must complete"
    return disk


@pytest.mark.parametrize("stage", STAGES)
def test_disk_full_in_every_stage(monkeypatch, capsys, inputs, tmp_path, stage):
    _fault_run(monkeypatch, capsys, inputs, tmp_path, stage, "ENOSPC")


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "ENOSPC"])
@pytest.mark.parametrize("stage", ["harvest", "power", "stats", "export"])  # resumable, whole folder, file, swap
def test_every_fault_kind(monkeypatch, capsys, inputs, tmp_path, stage, kind):
    _fault_run(monkeypatch, capsys, inputs, tmp_path, stage, kind)


@pytest.mark.parametrize(("stage", "after"), [("harvest", 3), ("train", 3), ("battery", 2)])
def test_fault_in_the_middle_of_a_run_resumes(monkeypatch, capsys, inputs, tmp_path, stage, after):
    """The fault strikes after some files were written: what was written is complete, the rerun resumes."""
    _fault_run(monkeypatch, capsys, inputs, tmp_path, stage, "ENOSPC", after=after)


def test_export_disk_full_leaves_the_old_csv_whole(tmp_path, monkeypatch, inputs, tiny_bridge):
    """A disk-full export left a results.csv cut mid-row; now the old file stays whole or no file appears."""
    import pandas as pd

    from fis_interventions.interventions import BatteryConfig, battery, export

    out = tmp_path / "disk" / "bat"
    cfg = BatteryConfig.model_validate(dict(
        name="t", model="tiny-random", checkpoint=inputs["ckpt"], designs=[DESIGN],
        features=[{"point": "sae.hook_latents", "index": 1}], interventions=[{"kind": "scale", "values": [0.0]}],
        max_items=1, batch_size=16, device="cpu", out=out))
    battery(cfg, bridge=tiny_bridge, progress=False)
    before = (out / "results.csv").read_bytes()

    def full_disk(self, path, *a, **kw):  # pandas writes half the rows, then the disk is full
        Path(path).write_text("point,feature,item\nsae,1,")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(pd.DataFrame, "to_csv", full_disk)
    with pytest.raises(OSError):
        export(out)
    assert (out / "results.csv").read_bytes() == before
    assert leftovers(tmp_path / "disk") == []


def test_store_disk_full_is_one_line(monkeypatch, capsys, inputs, tmp_path):
    """SQLite reports a full disk or a locked store as sqlite3.OperationalError: one line, exit 1."""
    from fis_interventions.interventions import store

    disk = tmp_path / "disk"
    disk.mkdir()

    def commit(self, unit, rows):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store.ResultStore, "commit_unit", commit)
    assert main(stage_args("battery", inputs, disk)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len([ln for ln in err if ln.startswith("error:")]) == 1 and "disk is full" in err[-1]


def test_bad_environment_variables_are_one_line(tmp_path, monkeypatch, capsys):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("x")
    monkeypatch.setenv("FIS_CACHE", str(not_a_folder))
    assert main(["harvest", "--model", "smollm2-135m", "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FIS_CACHE" in err[0] and not (tmp_path / "a").exists()


def test_a_300_character_battery_name_is_refused_before_anything_is_written(tmp_path, inputs, capsys):
    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump(dict(
        name="n" * 300, model="tiny-random", checkpoint=str(inputs["ckpt"]), designs=[str(DESIGN)],
        features=[{"point": "sae.hook_latents", "index": 1}], interventions=[{"kind": "scale", "values": [0.0]}],
        out=str(tmp_path / "bat"))))
    assert main(["battery", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "name" in err[0] and not (tmp_path / "bat").exists()
