"""Matched controls, quantile clamps and the pre-registered primary test of a battery (tiny random model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fis_interventions.cli import main
from fis_interventions.errors import FisError
from fis_interventions.interventions import BatteryConfig, battery, read_results
from fis_interventions.interventions.features import ActivationStats, match_distance
from tiny_checkpoints import save_tiny_joint_checkpoint

ROOT = Path(__file__).resolve().parents[1]
POINT = "secondary.hook_latents"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_bridge) -> Path:
    return save_tiny_joint_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint", tiny_bridge.tokenizer, seed=0)


def _cfg(ckpt: Path, out: Path, **kw) -> dict:
    base = dict(name="t", model="tiny-random", checkpoint=str(ckpt),
                designs=[str(ROOT / "stimuli/negation_sentiment.yaml")],
                features=[{"point": POINT, "index": 21, "role": "top"},
                          {"matched": 2, "tolerance": 0.5}],
                interventions=[{"kind": "set", "values": [0.5, 0.9], "quantile": True}, {"kind": "zero"}],
                primary={"intervention": "zero", "readout": "valence"},
                batch_size=8, out=str(out), max_items=2, device="cpu")
    base.update(kw)
    return base




def test_matched_controls_quantile_clamps_and_primary(tiny_bridge, tiny_ckpt, tmp_path):
    out = tmp_path / "r"
    battery(BatteryConfig.model_validate(_cfg(tiny_ckpt, out)), bridge=tiny_bridge, progress=False)
    info = json.loads((out / "run.json").read_text())
    feats = info["features"]
    top, controls = feats[0], feats[1:]
    assert len(controls) == 2 and all(c["role"] == "matched_control" and c["matched_to"] == "21" for c in controls)
    assert top["firing_rate"] > 0 and all(c["firing_rate"] > 0 for c in controls)
    for c in controls:  # within the tolerance asked for
        assert abs(c["firing_rate"] / top["firing_rate"] - 1) <= 0.5
        assert abs(c["mean_activation"] / top["mean_activation"] - 1) <= 0.5
    assert {c["feature"] for c in controls} == {"27", "36"}  # the two closest (54 differs by 62%)
    # quantile clamps: each feature at its own activation quantiles (0.9 above 0.5), zero ablation at 0
    for f in feats:
        assert f["clamps"]["set 0.9 [all]"] >= f["clamps"]["set 0.5 [all]"] > 0 and f["clamps"]["zero 0 [all]"] == 0
    assert info["primary"] == {"intervention": "zero", "value": 0.0, "position": "all", "readout": "valence",
                               "sesoi": None, "default": False}
    df = read_results(out / "results.sqlite")
    assert set(df["role"]) == {"top", "matched_control"}


def test_match_distance_is_the_larger_relative_difference():
    st = ActivationStats(np.array([0.1, 0.12, 0.2, 0.0]), np.array([2.0, 1.0, 2.2, 0.0]))
    d = match_distance(st, 0)
    np.testing.assert_allclose(d[:3], [0.0, 0.5, 1.0])
    assert d[3] == 1.0  # never fires: firing differs by 100%


def test_default_primary_is_recorded_with_a_warning(tiny_bridge, tiny_ckpt, tmp_path):
    out = tmp_path / "d"
    cfg = _cfg(tiny_ckpt, out, primary=None, features=[{"point": POINT, "index": 21, "role": "top"}],
               interventions=[{"kind": "scale", "values": [1.0, 0.0]}])
    battery(BatteryConfig.model_validate(cfg), bridge=tiny_bridge, progress=False)
    info = json.loads((out / "run.json").read_text())
    assert info["primary"]["default"] and info["primary"]["intervention"] == "scale"
    assert info["primary"]["value"] == 0.0  # the first clamp that is not a no-op
    assert any("no primary test named" in w for w in info["warnings"])


def _cli(tmp_path: Path, cfg: dict) -> tuple[int, Path]:
    import yaml

    file = tmp_path / "battery.yaml"
    file.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return main(["battery", str(file)]), Path(cfg["out"])


@pytest.mark.parametrize("change,message", [
    (dict(primary={"intervention": "scale", "value": 4.0, "readout": "valence"}), "primary clamp scale 4"),
    (dict(primary={"intervention": "zero", "readout": "nope"}), "primary readout 'nope'"),
    (dict(features=[{"point": POINT, "index": 21, "role": "top"}, {"matched": 3, "tolerance": 0.5}]),
     "only 2 of 3 latents at secondary.hook_latents match feature 21 within tolerance 0.5"),
])
def test_bad_primary_and_unsatisfiable_matches_exit_2_one_line_nothing_written(tiny_ckpt, tmp_path, capsys,
                                                                                  change, message):
    out = tmp_path / "bad"
    code, out = _cli(tmp_path, _cfg(tiny_ckpt, out, **change))
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()
    if "tolerance" in message:
        assert "closest free latent, 54, differs by 0.62" in err
