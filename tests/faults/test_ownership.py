"""Nothing outside --out is touched, nothing inside it that fis did not write: ownership is the exact file list
in the fingerprint (hidden names, look-alike names, links, files inside our sub-folders are not ours), deletes
never follow a link, writes never go through one. The rule first on small folders, then a test per stage
(harvest, train, screen, battery, report, export, features, power, stats --json, eval)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tiny_checkpoints

from tiny_checkpoints import save_tiny_joint_checkpoint  # noqa: E402
from tiny_activations import harvest_tiny  # noqa: E402

from fis_interventions.cli import main  # noqa: E402
from fis_interventions.errors import FisError  # noqa: E402
from fis_interventions.fingerprint import (FINGERPRINT_FILE, LOCK_FILE, Fingerprint, claim, classify,  # noqa: E402
                                           own, replace_folder)
from fis_interventions.io import remove_listed  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HOOK = "blocks.1.hook_resid_post"
DESIGN = ROOT / "stimuli" / "negation_sentiment.yaml"
FP, OTHER = Fingerprint("s", {"v": 1}), Fingerprint("s", {"v": 2})


def _tree(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (links not followed) with its content or link target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(folder))
            out[rel] = ("-> " + os.readlink(p)) if p.is_symlink() else ("dir" if p.is_dir() else p.read_bytes().hex())
    return out


def _user_entries(out: Path, outside: Path) -> dict[str, object]:
    """What a user might keep in an output folder; each must block --overwrite and survive it."""
    def hidden(o):
        (o / ".notes").write_text("mine")

    def git(o):
        (o / ".git").mkdir()
        (o / ".git" / "config").write_text("[core]")

    def link(o):
        (o / "link.txt").symlink_to(outside)

    def dir_link(o):
        (o / "elsewhere").symlink_to(outside.parent, target_is_directory=True)

    return {".notes": hidden, ".git": git, "link.txt": link, "elsewhere": dir_link}


# --- the rule on small folders ---------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", [".notes", ".git", "link.txt", "elsewhere", "data-mine.bin", "sub/mine.txt"])
def test_anything_unlisted_blocks_overwrite_and_survives(tmp_path, entry):
    outside = tmp_path / "outside" / "precious.txt"
    outside.parent.mkdir()
    outside.write_text("precious")
    out = tmp_path / "o"
    claim(out, FP)
    own(out, ["data.bin", "sub/part.bin"])
    (out / "data.bin").write_text("1")
    (out / "sub").mkdir()
    (out / "sub" / "part.bin").write_text("2")
    makers = {**_user_entries(out, outside), "data-mine.bin": lambda o: (o / "data-mine.bin").write_text("x"),
              "sub/mine.txt": lambda o: (o / "sub" / "mine.txt").write_text("x")}
    makers[entry](out)
    before = _tree(out)
    with pytest.raises(FisError, match=r"did not write|symbolic links") as err:
        claim(out, OTHER, overwrite=True)
    assert entry.split("/")[0] in str(err.value) or entry in str(err.value)
    assert "\n" not in str(err.value)
    assert _tree(out) == before and outside.read_text() == "precious"


def test_overwrite_deletes_exactly_the_listed_files(tmp_path):
    out = tmp_path / "o"
    claim(out, FP)
    own(out, ["a.bin", "checkpoint/weights.safetensors", "activations/"])
    (out / "a.bin").write_text("1")
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "weights.safetensors").write_text("w")
    (out / ".a.bin.x1y2z3.tmp").write_text("in flight")  # a temporary of a listed file, left by a kill
    nested = out / "activations"
    claim(nested, Fingerprint("harvest", {}))  # a nested fis folder: its own fingerprint lists its files
    own(nested, ["shard_00000.safetensors"])
    (nested / "shard_00000.safetensors").write_text("s")
    owned, foreign = classify(out, json.loads((out / FINGERPRINT_FILE).read_text())["files"])
    assert foreign == [] and {"a.bin", "checkpoint/weights.safetensors", "activations/shard_00000.safetensors",
                              ".a.bin.x1y2z3.tmp", FINGERPRINT_FILE, LOCK_FILE} <= set(owned)
    assert claim(out, OTHER, overwrite=True) == "new"
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, FINGERPRINT_FILE]
    # a user's file inside the nested fis folder is not ours either
    claim(out, FP, overwrite=True)
    own(out, ["activations/"])
    claim(nested, Fingerprint("harvest", {}))
    (nested / "mine.txt").write_text("x")
    with pytest.raises(FisError, match="activations/mine.txt"):
        claim(out, OTHER, overwrite=True)


def test_deletes_never_follow_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.bin").write_text("precious")
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.bin").symlink_to(outside / "a.bin")  # listed name, but a link: neither it nor its target goes
    (folder / "sub").symlink_to(outside, target_is_directory=True)
    left = remove_listed(folder, ["a.bin", "sub/a.bin", "../outside/a.bin"])
    assert sorted(left) == ["a.bin", "sub"] and (outside / "a.bin").read_text() == "precious"


def test_an_out_folder_that_is_a_link_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "out").symlink_to(real, target_is_directory=True)
    with pytest.raises(FisError, match="symbolic link"):
        claim(tmp_path / "out", FP)
    with pytest.raises(FisError, match="symbolic link"), replace_folder(tmp_path / "out", FP):
        pass
    assert list(real.iterdir()) == []


# --- stage by stage ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def acts(tiny_bridge, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("acts") / "acts"
    harvest_tiny(tiny_bridge, out, corpus, tokens=3000)
    return out


@pytest.fixture(scope="module")
def ckpt(tiny_bridge, tmp_path_factory) -> Path:
    return save_tiny_joint_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint", tiny_bridge.tokenizer, seed=0)


def test_harvest_lookalike_names_are_not_ours(tiny_bridge, corpus, tmp_path):
    out = tmp_path / "acts"
    harvest_tiny(tiny_bridge, out, corpus)
    listed = json.loads((out / FINGERPRINT_FILE).read_text())["files"]
    assert "manifest.json" in listed and any(f.startswith("shard_") for f in listed)
    for name in ("shard_my_notes.safetensors", "manifest.rank-mine.json", ".my_hidden"):
        (out / name).write_text("mine")
        with pytest.raises(FisError, match=f"did not write .*{name}"):
            harvest_tiny(tiny_bridge, out, corpus, overwrite=True, norm_multiple=5.0)
        assert (out / name).read_text() == "mine"
        (out / name).unlink()
    harvest_tiny(tiny_bridge, out, corpus, overwrite=True, norm_multiple=5.0)
    assert json.loads((out / "manifest.json").read_text())["complete"]


def _train_cfg(acts: Path, **kw) -> dict:
    cfg = dict(activations=str(acts), d_sae=64, k=4, mode="sae", batch_size=64, tokens=64 * 4, lr=1e-3,
               warmup_steps=1, eval_every=2, checkpoint_every=2, heldout_fraction=0.1)
    return {**cfg, **kw}


def test_train_user_file_in_checkpoint_and_refused_runs_claim_nothing(acts, tmp_path, capsys):
    cfg_file = tmp_path / "t.yaml"
    run = tmp_path / "run"
    # refused runs (a missing harvest; k > d_sae) leave no fingerprint, so the fixed config is not "other settings"
    for bad in (_train_cfg(tmp_path / "missing"), _train_cfg(acts, k=100)):
        cfg_file.write_text(yaml.safe_dump(bad))
        assert main(["train", str(cfg_file), "--out", str(run), "--no-progress"]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
        assert not run.exists()
    cfg_file.write_text(yaml.safe_dump(_train_cfg(acts)))
    assert main(["train", str(cfg_file), "--out", str(run), "--no-progress"]) == 0
    listed = json.loads((run / FINGERPRINT_FILE).read_text())["files"]
    assert "checkpoint/weights.safetensors" in listed and "metrics.jsonl" in listed
    (run / "checkpoint" / "my_notes.txt").write_text("mine")
    cfg_file.write_text(yaml.safe_dump(_train_cfg(acts, lr=3e-3)))
    assert main(["train", str(cfg_file), "--out", str(run), "--overwrite", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint/my_notes.txt" in err[0]
    assert (run / "checkpoint" / "my_notes.txt").read_text() == "mine"


def test_screen_same_settings_rerun_keeps_hidden_files_and_the_sibling_old_folder(tiny_bridge, ckpt, tmp_path):
    from fis_interventions.screening import screen

    out = tmp_path / "OUT"
    sibling = tmp_path / ".OUT.old"  # a user's folder that happens to have the old swap's name
    sibling.mkdir()
    (sibling / "thesis.tex").write_text("precious")
    args = dict(bridge=tiny_bridge, batch_size=16, progress=False, out=out, points=["sae.hook_latents"])
    screen(ckpt, DESIGN, **args)
    (out / ".my_hidden").write_text("mine")
    with pytest.raises(FisError, match="did not write .*my_hidden"):
        screen(ckpt, DESIGN, **args)
    assert (out / ".my_hidden").read_text() == "mine"
    (out / ".my_hidden").unlink()
    screen(ckpt, DESIGN, **args)  # same settings, nothing of the user's inside: rewritten
    assert (sibling / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".OUT.old", "OUT"]


@pytest.fixture(scope="module")
def battery_run(tiny_bridge, ckpt, tmp_path_factory):
    from fis_interventions.interventions import BatteryConfig, battery

    def cfg(out, **kw):
        base = dict(name="t", model="tiny-random", checkpoint=ckpt, designs=[DESIGN],
                    features=[{"point": "sae.hook_latents", "index": 1, "role": "top"}],
                    interventions=[{"kind": "scale", "values": [0.0, 2.0]}], batch_size=16, out=out, max_items=1,
                    device="cpu")
        return BatteryConfig.model_validate({**base, **kw})

    out = tmp_path_factory.mktemp("bat") / "run"
    battery(cfg(out), bridge=tiny_bridge, progress=False)
    return out, cfg


def test_battery_lookalike_stores_and_a_linked_csv(tiny_bridge, battery_run, tmp_path):
    from fis_interventions.interventions import battery

    out, cfg = battery_run
    for name in ("results_mine.sqlite", "results-notes.sqlite"):
        (out / name).write_text("mine")
        with pytest.raises(FisError, match=f"did not write .*{name}"):
            battery(cfg(out, seed=1), bridge=tiny_bridge, progress=False, overwrite=True)
        assert (out / name).read_text() == "mine"
        (out / name).unlink()
    outside = tmp_path / "elsewhere.csv"
    outside.write_text("precious")
    csv = out / "results.csv"
    saved = csv.read_bytes()
    csv.unlink()
    csv.symlink_to(outside)
    try:
        with pytest.raises(FisError, match="symbolic link"):
            battery(cfg(out), bridge=tiny_bridge, progress=False)  # a same-settings rerun would re-export
        assert outside.read_text() == "precious" and csv.is_symlink()
    finally:
        csv.unlink()
        csv.write_bytes(saved)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory) -> Path:
    from fis_interventions.reports.synthetic import write_synthetic_run

    return write_synthetic_run(tmp_path_factory.mktemp("syn") / "run", seed=0, n_items=8, n_prompts=2,
                               values=(4.0,), extras=False)


def test_report_same_settings_rerun_keeps_user_files_and_sibling(synthetic_run, tmp_path):
    from fis_interventions.reports import report

    out = tmp_path / "OUT"
    sibling = tmp_path / ".OUT.old"
    sibling.mkdir()
    (sibling / "keep.txt").write_text("precious")
    report(synthetic_run, out=out)
    for rel in ("figures/my_notes.txt", ".my_hidden"):
        (out / rel).write_text("mine")
        with pytest.raises(FisError, match="did not write"):
            report(synthetic_run, out=out)
        assert (out / rel).read_text() == "mine"
        (out / rel).unlink()
    report(synthetic_run, out=out)
    assert (sibling / "keep.txt").read_text() == "precious" and (out / "report.md").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".OUT.old", "OUT"]


def test_power_rerun_keeps_user_files(synthetic_run, tmp_path):
    from fis_interventions.planning import power
    from fis_interventions.reports.synthetic import PLANTED

    out = tmp_path / "p"
    select = {"feature": PLANTED["feature"], "readout": PLANTED["readout"]}
    power(synthetic_run, out=out, items=[8], sims=20, select=select)
    (out / ".my_hidden").write_text("mine")
    with pytest.raises(FisError, match="did not write"):
        power(synthetic_run, out=out, items=[8], sims=20, select=select)
    assert (out / ".my_hidden").read_text() == "mine"


def test_features_rerun_keeps_user_files(tiny_bridge, ckpt, acts, tmp_path):
    from fis_interventions.cards import features

    out = tmp_path / "cards"
    args = dict(activations=acts, out=out, bridge=tiny_bridge, progress=False, top=3)
    features(ckpt, "sae.hook_latents", [1, 2], **args)
    (out / ".my_hidden").write_text("mine")
    with pytest.raises(FisError, match="did not write"):
        features(ckpt, "sae.hook_latents", [1, 2], **args)
    assert (out / ".my_hidden").read_text() == "mine"


def test_export_refuses_user_folders_and_links(ckpt, tmp_path):
    from fis_interventions.sae.saelens import export

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / ".notes").write_text("mine")
    with pytest.raises(FisError, match="not empty"):
        export(ckpt, theirs)
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    with pytest.raises(FisError, match="symbolic link"):
        export(ckpt, tmp_path / "link")
    assert list(real.iterdir()) == [] and [p.name for p in theirs.iterdir()] == [".notes"]
    assert (export(ckpt, tmp_path / "new") / "cfg.json").is_file()


def test_stats_json_through_a_link_is_refused(tmp_path, capsys):
    outside = tmp_path / "precious.json"
    outside.write_text("{}")
    link = tmp_path / "out.json"
    link.symlink_to(outside)
    csv = ROOT / "tests" / "golden" / "factorial_items.csv"
    code = main(["stats", str(csv), "--dv", "logit_shift", "--factor", "formality", "--factor", "emotion",
                 "--json", str(link)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "symbolic link" in err[0]
    assert outside.read_text() == "{}" and link.is_symlink()


def test_eval_does_not_write_through_a_link(tiny_bridge, ckpt, acts, tmp_path):
    from fis_interventions.evaluation import evaluate

    out = tmp_path / "ev"
    out.mkdir()
    outside = tmp_path / "precious.json"
    outside.write_text("{}")
    (out / "eval.json").symlink_to(outside)
    with pytest.raises(FisError, match="symbolic link"):
        evaluate(ckpt, acts, bridge=tiny_bridge, max_contexts=4, progress=False, out=out)
    assert outside.read_text() == "{}"
