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

ROOT = Path(__file__).resolve().parents[1]
POINT = "secondary.hook_latents"



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


def test_direction_controls_are_norm_matched_per_token_and_applied(tiny_bridge, tiny_ckpt, tmp_path, monkeypatch):
    """Random residual directions: each block adds, at every edited token, its unit direction times the norm
    of the change the feature's clamp writes there (recorded from the battery's own stacked pass)."""
    import torch

    import importlib

    from fis_interventions.interventions.features import direction_seed, unit_direction

    battery_mod = importlib.import_module("fis_interventions.interventions.battery")

    seen: list[tuple[torch.Tensor, torch.Tensor, list]] = []
    real = battery_mod.direction_deltas

    def spy(deltas, targets):
        out = real(deltas, targets)
        seen.append((deltas.clone(), out.clone(), list(targets)))
        return out

    monkeypatch.setattr(battery_mod, "direction_deltas", spy)
    out = tmp_path / "dirs"
    # latent 11 of the SAE fires on ~1/3 of the tokens (the tiny checkpoint's NFM output starts at zero, so
    # secondary latents change nothing there)
    cfg = _cfg(tiny_ckpt, out, features=[{"point": "sae.hook_latents", "index": 11, "role": "top"}, {"directions": 2}],
               interventions=[{"kind": "zero"}, {"kind": "scale", "values": [4.0]}], seed=3)
    battery(BatteryConfig.model_validate(cfg), bridge=tiny_bridge, progress=False)
    info = json.loads((out / "run.json").read_text())
    dirs = info["features"][1:]
    assert [d["feature"] for d in dirs] == ["11:dir0", "11:dir1"]
    for k, d in enumerate(dirs):
        assert d["role"] == "direction_control" and d["matched_to"] == "11" and d["control_kind"] == "random_direction"
        assert d["direction"] == k and d["direction_seed"] == direction_seed(3, "sae.hook_latents", "11", k)
    assert dirs[0]["direction_seed"] != dirs[1]["direction_seed"]

    assert seen, "the battery's stacked pass never went through direction_deltas"
    checked = 0
    for before, after, targets in seen:
        for b, t in enumerate(targets):
            if t.direction is None:
                assert torch.equal(after[b], before[b])  # features are untouched
                continue
            f = next(i for i, u in enumerate(targets) if u.direction is None and u.indices == t.indices
                     and i % 2 == b % 2)  # the feature's block under the same condition (zero, scale 4)
            norm_f = before[f].double().norm(dim=-1)
            assert torch.equal(before[b], before[f])  # it started from the feature's own change
            torch.testing.assert_close(after[b].double().norm(dim=-1), norm_f, rtol=1e-5, atol=1e-6)
            on = norm_f > 0
            assert not (after[b][~on] != 0).any()  # same tokens
            if not on.any():  # the feature is silent on this batch: nothing to match
                continue
            u = unit_direction(t.direction_seed, after.shape[-1])
            torch.testing.assert_close(after[b][on].double(), norm_f[on, None] * u, rtol=1e-4, atol=1e-6)
            assert not torch.allclose(after[b][on], before[f][on])  # another direction than the feature's
            checked += 1
    assert checked >= 4, [(t.label, float(bf.norm())) for bf, _, ts in seen for t, bf in zip(ts, bf, strict=True)]

    df = read_results(out / "results.sqlite")
    kl = df[(df["readout_kind"] == "kl") & (df["intervention"] == "zero")].pivot_table(
        index=["item", "cell", "prompt_id"], columns="feature", values="shift")
    assert (kl["11:dir0"] > 0).any() and (kl["11:dir1"] > 0).any()  # applied: the output moves
    assert not np.allclose(kl["11:dir0"], kl["11"]) and not np.allclose(kl["11:dir0"], kl["11:dir1"])
    silent = kl["11"] == 0  # where the feature's clamp changes nothing, neither does its direction
    assert (kl.loc[silent, "11:dir0"] == 0).all()


def test_direction_deltas_unit():
    import torch

    from fis_interventions.interventions.features import Target, direction_deltas, unit_direction

    d = torch.tensor([[[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]], [[3.0, 4.0, 0.0], [1.0, 0.0, 0.0]]])
    feat = Target("p", (1,), "top")
    ctrl = Target("p", (1,), "direction_control", matched_to="1", direction=0, direction_seed=11)
    out = direction_deltas(d, [feat, ctrl])
    assert torch.equal(out[0], d[0])
    u = unit_direction(11, 3).float()
    torch.testing.assert_close(out[1], torch.stack([5.0 * u, 1.0 * u]))
    assert abs(float(unit_direction(11, 3).norm()) - 1) < 1e-12
    assert torch.equal(unit_direction(11, 3), unit_direction(11, 3))  # seeded


@pytest.mark.parametrize("features,message", [
    ([{"point": POINT, "index": 21, "role": "top"}, {"directions": 0}], "features[1].directions"),
    ([{"point": POINT, "index": 21, "role": "top"}, {"directions": 2, "role": "top"}], "must contain 'control'"),
    ([{"point": POINT, "index": 21, "role": "top"}, {"directions": 2, "matched": 1}], "exactly one of"),
    ([{"point": POINT, "index": 21, "role": "feature"}, {"directions": 2}], "direction controls: no feature has role"),
])
def test_bad_direction_controls_exit_2_one_line_nothing_written(tiny_ckpt, tmp_path, capsys, features, message):
    code, out = _cli(tmp_path, _cfg(tiny_ckpt, tmp_path / "bad", features=features))
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()
