"""The fingerprint rule, stage by stage: changed settings refused (one line, what differs, the fix), same settings
resumed, --overwrite replaces only what fis wrote, and nothing fis did not write is ever deleted.
(Batteries: tests/test_battery_reliability.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fis_interventions.activations import ActivationStore
from fis_interventions.cli import main
from fis_interventions.errors import FisError
from fis_interventions.fingerprint import FINGERPRINT_FILE, Fingerprint, claim, differences, own, replace_folder
from fis_interventions.reports import report
from fis_interventions.reports.synthetic import write_synthetic_run
from fis_interventions.screening import screen
from fis_interventions.training import refit
from tiny_activations import harvest_tiny

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.1.hook_resid_post"
DESIGN = ROOT / "stimuli" / "negation_sentiment.yaml"


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def test_digest_is_canonical_and_differences_name_the_keys():
    a = Fingerprint("x", {"config": {"lr": 1e-3, "k": 8}, "path": Path("/a")})
    b = Fingerprint("x", {"path": "/a", "config": {"k": 8, "lr": 0.001}})
    assert a.digest == b.digest and len(a.digest) == 64
    c = Fingerprint("x", {"config": {"k": 4, "lr": 1e-3}, "path": "/a"})
    assert c.digest != a.digest and Fingerprint("y", a.inputs).digest != a.digest
    assert differences(a.inputs, c.inputs) == ["config.k: 8 -> 4"]


def test_claim_and_replace_rules(tmp_path):
    fp, other = Fingerprint("s", {"v": 1}), Fingerprint("s", {"v": 2})
    out = tmp_path / "o"
    assert claim(out, fp) == "new" and (out / FINGERPRINT_FILE).is_file()
    own(out, ["data.bin"])  # a stage lists a file in its fingerprint before it writes it
    (out / "data.bin").write_bytes(b"1")
    assert claim(out, fp) == "resume"
    with pytest.raises(FisError, match=r"other settings \(v: 1 -> 2\).*--overwrite"):
        claim(out, other)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FisError, match="did not write .notes.txt"):
        claim(out, other, overwrite=True)
    (out / "notes.txt").unlink()
    assert claim(out, other, overwrite=True) == "new" and not (out / "data.bin").exists()
    with pytest.raises(FisError, match="holds a s output, not a t"):
        claim(out, Fingerprint("t", {}), overwrite=True)
    # another process's claim in flight (its fingerprint not renamed into place yet) is a new folder, not a foreign one
    racing = tmp_path / "r"
    racing.mkdir()
    (racing / f".{FINGERPRINT_FILE}.x1y2.tmp").write_text("")
    assert claim(racing, fp) == "new" and (racing / FINGERPRINT_FILE).is_file()
    (racing / FINGERPRINT_FILE).unlink()
    (racing / ".other.tmp").write_text("")
    with pytest.raises(FisError, match="did not write"):
        claim(racing, fp)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FisError, match="is a file"):
        claim(tmp_path / "file", fp)
    # whole-folder stages: the fingerprint lists the files, so a user's file blocks a replacement
    whole = tmp_path / "w"
    with replace_folder(whole, fp) as tmp:
        (tmp / "a.txt").write_text("1")
    assert json.loads((whole / FINGERPRINT_FILE).read_text())["files"] == ["a.txt"]
    with replace_folder(whole, fp) as tmp:  # same settings: replaced
        (tmp / "a.txt").write_text("2")
    (whole / "keep.txt").write_text("user")
    with pytest.raises(FisError, match="did not write .keep.txt"), replace_folder(whole, fp):
        pass
    assert (whole / "a.txt").read_text() == "2" and (whole / "keep.txt").exists()



@pytest.mark.parametrize("change", [{"normalization": "zscore"}, {"store_dtype": "bfloat16"},
                                    {"norm_multiple": 5.0}, {"context_length": 16}])
def test_harvest_refuses_other_settings(tiny_bridge, corpus, tmp_path, change):
    out = tmp_path / "acts"
    harvest_tiny(tiny_bridge, out, corpus)
    before = _snapshot(out)
    with pytest.raises(FisError, match=next(iter(change))):
        harvest_tiny(tiny_bridge, out, corpus, **change)
    assert _snapshot(out) == before
    harvest_tiny(tiny_bridge, out, corpus, overwrite=True, **change)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fingerprint"] == json.loads((out / FINGERPRINT_FILE).read_text())["digest"]


def test_harvest_same_settings_resume_and_extend(tiny_bridge, corpus, tmp_path):
    out = tmp_path / "acts"
    first = harvest_tiny(tiny_bridge, out, corpus)
    before = _snapshot(out)
    assert harvest_tiny(tiny_bridge, out, corpus)["token_count"] == first["token_count"]
    assert _snapshot(out) == before  # complete and the same: nothing rewritten
    more = harvest_tiny(tiny_bridge, out, corpus, tokens=4000)  # a larger budget extends the same harvest
    assert more["token_count"] > first["token_count"]
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "data.csv").write_text("1,2")
    with pytest.raises(FisError, match="did not write"):
        harvest_tiny(tiny_bridge, theirs, corpus, overwrite=True)
    assert [p.name for p in theirs.iterdir()] == ["data.csv"]


def _train_cfg(acts: Path, **kw) -> dict:
    cfg = dict(activations=str(acts), d_sae=64, k=4, mode="sae", batch_size=64, tokens=64 * 6, lr=1e-3,
               warmup_steps=2, eval_every=3, checkpoint_every=3, heldout_fraction=0.1)
    return {**cfg, **kw}


def test_train_refit_screen_report_follow_the_rule(tiny_bridge, corpus, tmp_path, capsys):
    acts = tmp_path / "acts"
    harvest_tiny(tiny_bridge, acts, corpus, tokens=4000)
    cfg_file = tmp_path / "t.yaml"
    cfg_file.write_text(yaml.safe_dump(_train_cfg(acts)))
    run = tmp_path / "sae"
    assert main(["train", str(cfg_file), "--out", str(run), "--no-progress"]) == 0
    cfg_file.write_text(yaml.safe_dump(_train_cfg(acts, lr=3e-3)))
    before = _snapshot(run)
    assert main(["train", str(cfg_file), "--out", str(run), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.lr: 0.001 -> 0.003" in err[0] and "--overwrite" in err[0]
    assert _snapshot(run) == before
    assert main(["train", str(cfg_file), "--out", str(run), "--overwrite", "--no-progress"]) == 0
    assert json.loads((run / "checkpoint" / "cfg.json").read_text())["train_config"]["lr"] == 0.003

    # refit: redoing the same refit is fine; a refit of another checkpoint into the same folder is refused
    refit(run, tmp_path / "refit")
    refit(run, tmp_path / "refit")
    other = tmp_path / "sae2"
    cfg_file.write_text(yaml.safe_dump(_train_cfg(acts, seed=5)))
    assert main(["train", str(cfg_file), "--out", str(other), "--no-progress"]) == 0
    with pytest.raises(FisError, match="checkpoint"):
        refit(other, tmp_path / "refit")
    refit(other, tmp_path / "refit", overwrite=True)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "checkpoint").mkdir()
    (theirs / "checkpoint" / "notes.md").write_text("mine")
    with pytest.raises(FisError, match="did not write"):
        refit(other, theirs, overwrite=True)
    assert (theirs / "checkpoint" / "notes.md").read_text() == "mine"

    # screen: other points are refused before any work; overwrite replaces; a user's file blocks it
    scr = tmp_path / "screen"
    screen(run, DESIGN, bridge=tiny_bridge, out=scr, points=["sae.hook_latents"], progress=False, top=3)
    with pytest.raises(FisError, match="config.top: 3 -> 4"):
        screen(run, DESIGN, bridge=tiny_bridge, out=scr, points=["sae.hook_latents"], progress=False, top=4)
    screen(run, DESIGN, bridge=tiny_bridge, out=scr, points=["sae.hook_latents"], progress=False, top=4,
           overwrite=True)
    assert len(json.loads((scr / "top.json").read_text())) == 4

    # report: same run and rows rewrite the report; changed rows need --overwrite
    battery_run = write_synthetic_run(tmp_path / "run", seed=1, n_items=4, n_prompts=1, values=(4.0,))
    rep = tmp_path / "rep"
    report(battery_run, rep)
    report(battery_run, rep)
    (battery_run / "results.sqlite").unlink()
    write_synthetic_run(battery_run, seed=2, n_items=4, n_prompts=1, values=(4.0,))
    with pytest.raises(FisError, match="results"):
        report(battery_run, rep)
    report(battery_run, rep, overwrite=True)
    assert (rep / "report.html").is_file()


def test_no_stage_output_is_left_without_its_fingerprint(tiny_bridge, corpus, tmp_path):
    acts = tmp_path / "acts"
    harvest_tiny(tiny_bridge, acts, corpus)
    store = ActivationStore(acts)
    assert json.loads((acts / FINGERPRINT_FILE).read_text())["stage"] == "harvest" and store.d_model == 64
