"""Non-finite and out-of-range values are refused when the config is read, before anything is written:
NaN / infinite clamp values, booleans where numbers are meant (``k: true`` was read as k = 1), negative
feature indices, negative or huge seeds, ``--norm-multiple -1`` / ``nan`` (harvested 0 tokens), a context
longer than the model's, ``--sims 1e9``, training sizes beyond this machine's memory, ``tokens`` that are
thousands of passes over a small harvest, a harvest left incomplete, features listed with two roles.
Each case through the CLI: exit 2, one line naming the field and the fix, nothing written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: shared tiny helpers

from tiny_activations import harvest_sentences  # noqa: E402

from fis_interventions.cli import main  # noqa: E402
from fis_interventions.errors import FisError  # noqa: E402
from fis_interventions.training import preflight  # noqa: E402
from fis_interventions.sae import TrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DESIGN = ROOT / "stimuli/negation_sentiment.yaml"


def _one_line(argv: list[str], capsys) -> str:
    capsys.readouterr()
    code = main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


BATTERY_HEAD = f"name: b\nmodel: tiny-random\ncheckpoint: ckpt\ndesigns: [{DESIGN}]\n"
BATTERY_CASES = {
    "values: [.nan]": ("features: [{point: sae.hook_latents, index: 1}]\n"
                       "interventions: [{kind: scale, values: [.nan]}]\n", "interventions[0].values[0]",
                       "finite number"),
    "add .inf": ("features: [{point: sae.hook_latents, index: 1}]\n"
                 "interventions: [{kind: add, values: [.inf]}]\n", "interventions[0].values[0]", "finite number"),
    "indices: [-1]": ("features: [{point: sae.hook_latents, indices: [-1]}]\n"
                      "interventions: [{kind: zero}]\n", "features[0].indices[0]", "greater than or equal to 0"),
    "index: true": ("features: [{point: sae.hook_latents, index: true}]\ninterventions: [{kind: zero}]\n",
                    "features[0].index", "true/false given where a number is meant"),
    "batch_size: true": ("features: [{point: sae.hook_latents, index: 1}]\ninterventions: [{kind: zero}]\n"
                         "batch_size: true\n", "batch_size", "true/false given where a number is meant"),
    "seed: -1": ("features: [{point: sae.hook_latents, index: 1}]\ninterventions: [{kind: zero}]\nseed: -1\n",
                 "seed", "greater than or equal to 0"),
    "seed: 2**40": ("features: [{point: sae.hook_latents, index: 1}]\ninterventions: [{kind: zero}]\n"
                    f"seed: {2**40}\n", "seed", "less than or equal to 4294967295"),
}


@pytest.mark.parametrize("name", sorted(BATTERY_CASES))
def test_battery_config_values_are_refused_before_anything_runs(name, tmp_path, capsys):
    body, field, message = BATTERY_CASES[name]
    config = tmp_path / "b.yaml"
    config.write_text(BATTERY_HEAD + body + f"out: {tmp_path / 'out'}\n", encoding="utf-8")
    line = _one_line(["battery", "run", str(config)], capsys)
    assert f"{config}: {field}: " in line and message in line, line
    assert not (tmp_path / "out").exists()


TRAIN_CASES = {
    "k: true": ("k: true\n", "k", "true/false given where a number is meant"),
    "secondary k: true": ("mode: joint\nsecondary: {d_sae: 8, k: true}\n", "secondary.k", "true/false"),
    "lr: .nan": ("lr: .nan\n", "lr", "finite number"),
    "grad_clip: .inf": ("grad_clip: .inf\n", "grad_clip", "finite number"),
    "seed: -5": ("seed: -5\n", "seed", "greater than or equal to 0"),
}


@pytest.mark.parametrize("name", sorted(TRAIN_CASES))
def test_train_config_values_are_refused_before_anything_is_written(name, tmp_path, capsys):
    body, field, message = TRAIN_CASES[name]
    config = tmp_path / "t.yaml"
    config.write_text(f"activations: {tmp_path / 'acts'}\nd_sae: 16\n" + body, encoding="utf-8")
    line = _one_line(["train", str(config), "--out", str(tmp_path / "out")], capsys)
    assert f"{config}: {field}: " in line and message in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value, message", [("-1", "greater than 0"), ("nan", "finite number")])
def test_norm_multiple_must_be_positive_and_finite(value, message, tmp_path, capsys):
    line = _one_line(["harvest", "--model", "tiny-random", "--out", str(tmp_path / "out"), "--norm-multiple",
                      value], capsys)
    assert "norm_multiple" in line and message in line, line
    assert not (tmp_path / "out").exists()


def test_context_longer_than_the_model_is_refused(tmp_path, capsys):
    line = _one_line(["harvest", "--model", "tiny-random", "--out", str(tmp_path / "out"), "--context-length",
                      "100000"], capsys)
    assert "context_length 100,000 is longer than the model's context of 512 tokens" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--sims", "1000000000"], "--sims 1000000000 is out of range"),
    (["--sims", "0"], "--sims 0 is out of range"),
    (["--seed", "-3"], "seed -3 is out of range"),
    (["--seed", str(2**33)], "is out of range"),
])
def test_power_sizes_and_seeds_are_refused(argv, message, tmp_path, capsys):
    line = _one_line(["power", "--effect", "1", "--var-resid", "1", "--out", str(tmp_path / "out"), *argv], capsys)
    assert message in line, line
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def small_harvest(tmp_path_factory, tiny_bridge) -> Path:
    return harvest_sentences(tmp_path_factory.mktemp("h"), tiny_bridge, "Sentence {i} is short.", 60,
                             tokens=1024, context_length=32)


def test_training_beyond_this_machines_memory_is_refused_with_the_estimate(small_harvest):
    cfg = TrainConfig(activations=small_harvest, expansion=10**8, k=8)
    with pytest.raises(FisError, match=r"training needs about [\d.]+ GiB .*this machine has") as err:
        preflight(cfg)
    assert err.value.field == "expansion"


def test_tokens_far_beyond_the_harvest_are_refused_and_many_passes_warned(small_harvest, caplog):
    with pytest.raises(FisError, match="passes over the harvest") as err:
        preflight(TrainConfig(activations=small_harvest, d_sae=16, k=4, tokens=10**15))
    assert err.value.field == "tokens" and "harvest more" in str(err.value)
    preflight(TrainConfig(activations=small_harvest, d_sae=16, k=4, tokens=500_000))
    assert "passes over the harvest" in caplog.text


def test_a_long_cpu_run_is_warned_with_its_time_estimate(small_harvest, caplog, monkeypatch):
    import fis_interventions.training as training

    cfg = TrainConfig(activations=small_harvest, d_sae=16, k=4, tokens=4096, device="cpu")
    floor = training.train_seconds_lower_bound(cfg, 64)
    assert 0 < floor < 60  # 4k tokens of a 16-latent SAE: well under a second on any CPU
    caplog.clear()
    preflight(cfg)
    assert "takes at least" not in caplog.text
    monkeypatch.setattr(training, "matmul_flops_per_second", lambda: 1.0)  # a machine a billion times slower
    preflight(cfg)
    assert "takes at least ~" in caplog.text and "hours" in caplog.text


def test_incomplete_harvest_is_refused_unless_allowed(small_harvest, tmp_path, capsys):
    import shutil

    acts = tmp_path / "acts"
    shutil.copytree(small_harvest, acts)
    manifest = json.loads((acts / "manifest.json").read_text())
    manifest["complete"] = False
    (acts / "manifest.json").write_text(json.dumps(manifest))
    config = tmp_path / "t.yaml"
    config.write_text(f"activations: {acts}\nd_sae: 16\nk: 4\ntokens: 2048\nbatch_size: 64\nmode: sae\n",
                      encoding="utf-8")
    line = _one_line(["train", str(config), "--out", str(tmp_path / "out")], capsys)
    assert "the harvest is incomplete" in line and "--allow-incomplete" in line, line
    assert not (tmp_path / "out").exists()
    preflight(TrainConfig(activations=acts, d_sae=16, k=4, tokens=2048), allow_incomplete=True)


def test_a_feature_listed_with_two_roles_is_a_config_error(tiny_bridge, tmp_path):
    from fis_interventions.attach import attach
    from fis_interventions.interventions.features import resolve_features
    from tiny_checkpoints import save_tiny_joint_checkpoint

    ckpt = save_tiny_joint_checkpoint(tmp_path / "ckpt", tiny_bridge.tokenizer, seed=0)
    attached = attach(tiny_bridge, ckpt)
    d_in = attached.checkpoint.d_in
    from fis_interventions.interventions.config import FeatureSpec

    twice = [FeatureSpec(point="sae.hook_latents", index=3, role="top"),
             FeatureSpec(point="sae.hook_latents", index=3, role="control")]
    with pytest.raises(FisError, match=r"listed with two roles, 'top' \(features\[0\]\) and 'control'"):
        resolve_features(twice, attached.joint, d_in, seed=0)
    same = [FeatureSpec(point="sae.hook_latents", index=3, role="top")] * 2
    assert len(resolve_features(same, attached.joint, d_in, seed=0)) == 1
    # a random control listed BEFORE the explicit features never draws them, whatever the seed
    width = attached.joint.sae.d_sae
    chosen = [FeatureSpec(point="sae.hook_latents", index=i, role="top") for i in range(width - 2)]
    for seed in range(5):
        targets = resolve_features([FeatureSpec(point="sae.hook_latents", random=2, role="random_control"),
                                    *chosen], attached.joint, d_in, seed=seed)
        roles = {t.indices: t.role for t in targets}
        assert len(roles) == len(targets) == width
        assert [t.role for t in targets[:2]] == ["random_control"] * 2
        assert {t.indices for t in targets[:2]} == {(width - 2,), (width - 1,)}
