"""`fis screen`: activations per stimulus equal a hand computation, FDR over all points, outputs, CLI codes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fis_interventions.activations import ExclusionRule, Normalizer
from fis_interventions.cli import main
from fis_interventions.errors import FisError
from fis_interventions.sae import JointArch, JointSAE, NFMArch, SAEArch, save_checkpoint
from fis_interventions.screening import screen, screen_table, stimulus_rows, top_features
from fis_interventions.stats.fdr import fdr_bh

HOOK = "blocks.1.hook_resid_post"
DESIGN = Path(__file__).resolve().parents[1] / "stimuli" / "negation_sentiment.yaml"
SCALE = 0.37


def _checkpoint(path: Path, tokenizer, *, nfm: bool = True, secondary: bool = True,
                model_name: str = "tiny-random") -> Path:
    torch.manual_seed(0)
    joint = JointSAE(JointArch(sae=SAEArch(d_in=64, d_sae=128, k=8),
                               nfm=NFMArch(emb_dim=16, hidden=32) if nfm else None, secondary=None))
    if secondary:
        joint.attach_secondary(64, 4)
    norm = {**Normalizer("expected_norm", scale=SCALE).to_dict(),
            "exclusion": ExclusionRule.for_tokenizer(tokenizer).to_dict()}
    return save_checkpoint(path, joint, model_name=model_name, hook=HOOK, normalization=norm)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_bridge) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ck") / "joint", tiny_bridge.tokenizer)


@pytest.fixture(scope="module")
def result(ckpt, tiny_bridge):
    return screen(ckpt, DESIGN, bridge=tiny_bridge, batch_size=7, progress=False, discover=None, aggregate="mean")


def test_table_has_one_row_per_feature_per_point(result):
    t = result.table
    assert result.summary["points"] == ["sae.hook_latents", "nfm.hook_hidden", "secondary.hook_latents"]
    sizes = t.groupby("point").size().to_dict()
    assert sizes == {"sae.hook_latents": 128, "nfm.hook_hidden": 32, "secondary.hook_latents": 64}
    for col in ["point", "feature", "F_a", "p_a", "F_b", "p_b", "F_ab", "p_ab", "q_ab", "q_ab_within_point",
                "partial_eta2_ab", "degenerate", "mean_affirmed_positive", "mean_negated_negative"]:
        assert col in t.columns
    assert sorted(t.loc[t.point == "nfm.hook_hidden", "feature"]) == list(range(32))
    p = t["p_ab"].to_numpy()
    assert np.all(np.diff(p[np.isfinite(p)]) >= 0) and np.isnan(p[np.isfinite(p).sum():]).all()
    assert result.summary["n_stimuli"] == 96 and result.activations["sae.hook_latents"].shape == (96, 128)
    assert all("constant" in w or "exploratory" in w or "aggregate=mean" in w for w in result.warnings)


def test_fdr_family_is_every_feature_of_every_point(result):
    t = result.table
    assert np.allclose(t["q_ab"], fdr_bh(t["p_ab"]), equal_nan=True)
    assert result.summary["family_size"] == int(t["p_ab"].notna().sum()) > 100
    for _, part in t.groupby("point"):
        assert np.allclose(part["q_ab_within_point"], fdr_bh(part["p_ab"]), equal_nan=True)
    assert result.summary["n_q_below_alpha"] == int((t["q_ab"] < 0.05).sum())


def _manual(tiny_bridge, ckpt_path: Path, stimulus: str, last: bool = False) -> dict[str, np.ndarray]:
    """Independent path: bridge.run_with_cache at the hook, normalise, joint forward, mean over 1..n."""
    from fis_interventions.sae import load_checkpoint

    joint = load_checkpoint(ckpt_path).model
    tokens = tiny_bridge.to_tokens(stimulus)
    _, cache = tiny_bridge.run_with_cache(tokens, names_filter=lambda n: n == HOOK)
    x = cache[HOOK][0, 1:] * SCALE
    with torch.no_grad():
        out = joint(x, "full")
    vals = {"sae.hook_latents": out.latents.dense(), "nfm.hook_hidden": out.hidden,
            "secondary.hook_latents": out.secondary_latents.dense()}
    if last == "max":
        return {k: v.max(0).values.numpy() for k, v in vals.items()}
    return {k: (v[-1] if last else v.mean(0)).numpy() for k, v in vals.items()}


def test_activations_equal_manual_computation(result, ckpt, tiny_bridge):
    rows = result.stimuli
    lengths = rows["stimulus"].map(lambda s: len(tiny_bridge.to_tokens(s)[0]))
    # a stimulus shorter than the longest of its batch of 7, so right padding is exercised
    batch0 = lengths[:7]
    i = int(batch0.idxmin())
    assert batch0[i] < batch0.max()
    for j in (i, 50):
        manual = _manual(tiny_bridge, ckpt, rows["stimulus"][j])
        for point, value in manual.items():
            assert np.abs(result.activations[point][j] - value).max() < 1e-4, point
    assert np.abs(manual["sae.hook_latents"]).sum() > 0


def test_aggregate_last_is_last_token(ckpt, tiny_bridge, result):
    points = ["sae.hook_latents", "nfm.hook_hidden"]
    last = screen(ckpt, DESIGN, bridge=tiny_bridge, aggregate="last", points=points, batch_size=16,
                  progress=False, discover=None)
    assert list(last.activations) == points
    got = last.activations["sae.hook_latents"]
    mean = result.activations["sae.hook_latents"]
    assert np.abs(got - mean).max() > 0.1 * np.abs(mean).max()
    # last token: at most k=8 active latents per stimulus; the mean over ~6 tokens has more
    assert (got != 0).sum(1).max() <= 8 < (mean != 0).sum(1).max()
    for j in (5, 95):
        manual = _manual(tiny_bridge, ckpt, last.stimuli["stimulus"][j], last=True)
        for point in points:
            assert np.abs(last.activations[point][j] - manual[point]).max() < 1e-4, point


def test_aggregate_max_is_max_over_kept_tokens(ckpt, tiny_bridge):
    """The max over the stimulus tokens, right padding included (batch of 7), equals a hand computation."""
    res = screen(ckpt, DESIGN, bridge=tiny_bridge, aggregate="max", points=["sae.hook_latents", "nfm.hook_hidden"],
                 batch_size=7, progress=False, discover=None, permutations=0, random_init=False)
    for j in (3, 50):
        manual = _manual(tiny_bridge, ckpt, res.stimuli["stimulus"][j], last="max")
        for point in res.activations:
            assert np.abs(res.activations[point][j] - manual[point]).max() < 1e-4, point


def test_other_model_checkpoint_refused(tmp_path, tiny_bridge):
    other = _checkpoint(tmp_path / "other", tiny_bridge.tokenizer, model_name="smollm2-135m")
    with pytest.raises(FisError, match="trained on model 'smollm2-135m', not 'tiny-random'"):
        screen(other, DESIGN, bridge=tiny_bridge, progress=False)
    with pytest.raises(FisError, match="trained on model 'smollm2-135m', not 'tiny-random'"):
        screen(other, DESIGN, model="tiny-random", progress=False)  # refused before any model is loaded


def test_unknown_and_absent_points(tmp_path, ckpt, tiny_bridge):
    with pytest.raises(FisError, match=r"'sae.hook_nope'.*sae.hook_latents"):
        screen(ckpt, DESIGN, bridge=tiny_bridge, points=["sae.hook_nope"], progress=False)
    plain = _checkpoint(tmp_path / "plain", tiny_bridge.tokenizer, nfm=False, secondary=False)
    res = screen(plain, DESIGN, bridge=tiny_bridge, progress=False)
    assert res.summary["points"] == ["sae.hook_latents"]
    assert sum("not in this checkpoint" in w for w in res.warnings) == 2
    with pytest.raises(FisError, match="'nfm.hook_hidden' is not in this checkpoint"):
        screen(plain, DESIGN, bridge=tiny_bridge, points=["nfm.hook_hidden"], progress=False)


def test_planted_interaction_found_and_screening_is_fast():
    """5000 features x 100 stimuli in well under a few seconds; a planted interaction ranks first."""
    from fis_interventions.designs import design_from_dict

    cells = {c: [f"sentence {c} {i}" for i in range(25)] for c in ("x.p", "x.q", "y.p", "y.q")}
    rows = stimulus_rows(design_from_dict({"name": "t", "factors": {"f": ["x", "y"], "g": ["p", "q"]},
                                           "cells": cells}))
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 5000)).astype(np.float32)
    inter = np.where(rows["f"].astype(str) == rows["g"].map({"p": "x", "q": "y"}).astype(str), 1.0, -1.0)
    X[:, 3234] += 1.5 * inter
    acts = {"a.point": X[:, :3000], "b.point": X[:, 3000:]}
    t0 = time.perf_counter()
    table = screen_table(acts, rows, "f", "g", {"f": ["x", "y"], "g": ["p", "q"]})
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0
    top = top_features(table, 3)
    assert top[0]["point"] == "b.point" and top[0]["feature"] == 234 and top[0]["q_ab"] < 1e-6
    assert len(table) == 5000 and (table["q_ab"] < 0.05).sum() == 1


def test_outputs_written(tmp_path, ckpt, tiny_bridge):
    out = tmp_path / "screen"
    res = screen(ckpt, DESIGN, bridge=tiny_bridge, out=out, top=5, points=["sae.hook_latents"], progress=False,
                 discover=None)
    assert sorted(p.name for p in out.iterdir()) == ["fingerprint.json", "screen.json", "screening.csv",
                                                     "screening.parquet", "top.json"]
    csv = pd.read_csv(out / "screening.csv")
    pq = pd.read_parquet(out / "screening.parquet")
    assert len(csv) == len(pq) == 128 and np.allclose(csv["p_ab"], pq["p_ab"], equal_nan=True)
    top = json.loads((out / "top.json").read_text())
    assert top == res.top and len(top) == 5
    assert set(top[0]) == {"point", "feature", "F_ab", "p_ab", "q_ab", "p_perm", "p_perm_fwer", "p_random_init"}
    assert top[0]["p_ab"] == pytest.approx(float(pq["p_ab"].iloc[0]))
    summary = json.loads((out / "screen.json").read_text())
    assert summary["family_size"] == int(pq["p_ab"].notna().sum()) and summary["hook"] == HOOK
    assert summary["n_stimuli"] == 96 and summary["aggregate"] == "last" and "family" in summary
    assert summary["provenance"]["config"]["points"] == ["sae.hook_latents"]
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(FisError, match="did not write .mine.txt"):
        screen(ckpt, DESIGN, bridge=tiny_bridge, out=out, points=["sae.hook_latents"], progress=False)
    assert (out / "mine.txt").exists()


def test_cli_exit_codes(tmp_path, ckpt, tiny_bridge, monkeypatch, capsys):
    import fis_interventions.models as models

    loaded = []
    monkeypatch.setattr(models, "load_model", lambda name, **kw: loaded.append(name) or tiny_bridge)
    base = ["screen", "--checkpoint", str(ckpt)]
    assert main(base + ["--design", str(tmp_path / "missing.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(base + ["--design", str(DESIGN), "--model", "smollm2-135m"]) == 2
    assert "trained on model 'tiny-random'" in capsys.readouterr().err
    assert main(base + ["--design", str(DESIGN), "--point", "nfm.hook_nope"]) == 2
    assert "nfm.hook_nope" in capsys.readouterr().err
    assert main(base + ["--design", str(DESIGN), "--aggregate", "median"]) == 2
    assert loaded == []
    out = tmp_path / "cli"
    code = main(base + ["--design", str(DESIGN), "--point", "nfm.hook_hidden", "--top", "3", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0 and loaded == ["tiny-random"], captured.err
    assert "features with interaction q < 0.05" in captured.out and "nfm.hook_hidden (32)" in captured.out
    assert "label-permutation null (1000 relabellings, within items): median" in captured.out
    assert "random-init checkpoint (seed 0)" in captured.out and "aggregate=last" in captured.out
    assert main(base + ["--design", str(DESIGN), "--permutations", "-1"]) == 2
    assert "--permutations must be >= 0" in capsys.readouterr().err
    assert len(json.loads((out / "top.json").read_text())) == 3
