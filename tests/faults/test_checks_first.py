"""Every stage checks its inputs before the expensive work (docs/input-checks.md, "Order of checks").

Each test makes one input bad, counts the stage's expensive passes (by replacing the function that does them with
a counting wrapper) and asserts the stage refused with a one-line error having run none of them. A check moved
after the work makes the count non-zero and the test fails, whatever the machine's speed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fis_interventions.errors import FisError

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
from tiny_activations import harvest_sentences  # noqa: E402
from tiny_checkpoints import save_tiny_joint_checkpoint  # noqa: E402

ROOT = TESTS.parent
HOOK = "blocks.1.hook_resid_post"


class Counter:
    """Wraps a function and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_bridge) -> Path:
    return save_tiny_joint_checkpoint(tmp_path_factory.mktemp("first") / "checkpoint", tiny_bridge.tokenizer, seed=0)


def _battery_cfg(ckpt: Path, out: Path, **kw) -> dict:
    base = dict(name="t", model="tiny-random", checkpoint=str(ckpt),
                designs=[str(ROOT / "stimuli/negation_sentiment.yaml")],
                features=[{"point": "secondary.hook_latents", "index": 21, "role": "top"},
                          {"matched": 1, "tolerance": 0.9}],
                interventions=[{"kind": "zero"}], primary={"intervention": "zero", "readout": "valence"},
                batch_size=8, out=str(out), max_items=2, device="cpu")
    base.update(kw)
    return base


@pytest.mark.parametrize("folder", ["foreign", "other_settings"])
def test_battery_refuses_its_out_folder_before_the_control_passes(tiny_bridge, tiny_ckpt, tmp_path, monkeypatch,
                                                                  folder):
    import importlib

    from fis_interventions.interventions import BatteryConfig, battery

    battery_module = importlib.import_module("fis_interventions.interventions.battery")

    out = tmp_path / "run"
    if folder == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:  # a finished battery with other settings
        battery(BatteryConfig.model_validate(_battery_cfg(tiny_ckpt, out, features=[
            {"point": "secondary.hook_latents", "index": 21, "role": "top"}])), bridge=tiny_bridge, progress=False)
    passes = Counter(battery_module._activation_stats)
    monkeypatch.setattr(battery_module, "_activation_stats", passes)
    with pytest.raises(FisError) as err:
        battery(BatteryConfig.model_validate(_battery_cfg(tiny_ckpt, out)), bridge=tiny_bridge, progress=False)
    assert ("did not write" in str(err.value)) if folder == "foreign" else ("other settings" in str(err.value))
    assert passes.calls == 0, "the output folder was checked after the matched-control passes"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny_bridge):
    from fis_interventions.sae import TrainConfig
    from fis_interventions.training import train

    root = tmp_path_factory.mktemp("evalfirst")
    acts = harvest_sentences(root, tiny_bridge, "Line {i} says the river is cold.", 200, hook=HOOK, tokens=3000,
                             context_length=32)
    cfg = TrainConfig.model_validate(dict(activations=str(acts), d_sae=128, k=8, mode="sae", batch_size=128,
                                          tokens=128 * 4, lr=1e-3, warmup_steps=2, eval_every=2,
                                          checkpoint_every=2, heldout_fraction=0.1))
    return acts, train(cfg, root / "run", progress=False).checkpoint


def test_eval_checks_contexts_and_output_before_the_reconstruction_pass(tiny_bridge, small_run, tmp_path,
                                                                        monkeypatch):
    from fis_interventions import evaluation

    acts, ckpt = small_run
    passes = Counter(evaluation._reconstruction)
    monkeypatch.setattr(evaluation, "_reconstruction", passes)
    with pytest.raises(FisError, match="no held-out contexts"):
        evaluation.evaluate(ckpt, bridge=tiny_bridge, max_contexts=0, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FisError, match="is a file"):
        evaluation.evaluate(ckpt, bridge=tiny_bridge, max_contexts=2, progress=False, out=blocker)
    link = tmp_path / "linked"
    link.mkdir()
    (link / "eval.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(FisError, match="symbolic link"):
        evaluation.evaluate(ckpt, bridge=tiny_bridge, max_contexts=2, progress=False, out=link)
    with pytest.raises(FisError, match="is a folder"):
        evaluation.evaluate_many([ckpt], bridge=tiny_bridge, max_contexts=2, progress=False, json_out=tmp_path)
    assert passes.calls == 0, "an input was checked after the reconstruction pass"


def test_eval_records_its_inputs_absolute_and_relative(tiny_bridge, small_run, tmp_path):
    from fis_interventions import evaluation, recorded_paths

    acts, ckpt = small_run
    out = tmp_path / "ev"
    evaluation.evaluate(ckpt, bridge=tiny_bridge, max_contexts=2, progress=False, out=out, organisation=False)
    meta = json.loads((out / "eval.json").read_text())
    assert meta["inputs"]["checkpoint"]["absolute"] == str(ckpt.resolve())
    assert recorded_paths.resolve_input(out, meta, "activations", marker="manifest.json") == acts.resolve()


def test_screen_records_its_inputs_absolute_and_relative(tiny_bridge, tiny_ckpt, tmp_path):
    """A screen folder moved together with its inputs still finds them (and alone, by the absolute path)."""
    import shutil

    from fis_interventions import recorded_paths
    from fis_interventions.screening import screen

    tree = tmp_path / "tree"
    shutil.copytree(tiny_ckpt, tree / "ckpt")
    shutil.copy(ROOT / "stimuli/negation_sentiment.yaml", tree / "design.yaml")
    screen(tree / "ckpt", tree / "design.yaml", bridge=tiny_bridge, out=tree / "screen", progress=False,
           permutations=0, random_init=False)
    meta = json.loads((tree / "screen" / "screen.json").read_text())
    assert meta["inputs"]["checkpoint"] == {"absolute": str((tree / "ckpt").resolve()), "relative": "../ckpt"}
    assert meta["inputs"]["design"]["relative"] == "../design.yaml" and Path(meta["design"]).is_absolute()
    moved = tmp_path / "moved"
    shutil.move(str(tree), str(moved))
    assert recorded_paths.resolve_input(moved / "screen", meta, "checkpoint", marker="cfg.json") == \
        moved / "screen" / "../ckpt"
    assert recorded_paths.resolve_input(moved / "screen", meta, "design").resolve() == (moved / "design.yaml")


def test_report_with_required_cards_checks_the_checkpoint_before_the_analysis(tmp_path, monkeypatch):
    from fis_interventions.reports import writer
    from fis_interventions.reports.synthetic import write_synthetic_run

    run = write_synthetic_run(tmp_path / "run", seed=0, n_items=4, n_prompts=1)
    fits = Counter(writer.analyze_run)
    monkeypatch.setattr(writer, "analyze_run", fits)
    with pytest.raises(FisError, match="checkpoint not found"):
        writer.report(run, tmp_path / "out", cards=True)
    assert fits.calls == 0, "--cards inputs were checked after the analysis"
    assert not (tmp_path / "out").exists()


def test_power_refuses_a_folder_with_other_settings_before_simulating(tmp_path, monkeypatch):
    from fis_interventions import planning

    out = tmp_path / "power"
    kw = dict(items=[8], sims=20, effect=1.0, var_resid=1.0)
    planning.power(out=out, **kw)
    sims = Counter(planning.power_curve)
    monkeypatch.setattr(planning, "power_curve", sims)
    with pytest.raises(FisError, match="other settings"):
        planning.power(out=out, **{**kw, "sims": 21})
    assert sims.calls == 0, "the output folder was checked after the simulation"
    planning.power(out=out, **kw)  # the same settings: recomputed and rewritten
    assert sims.calls == 1
