"""Screens that artifacts cannot fool: flags, the label-permutation null, the random-init baseline, aggregates."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fis_interventions.screening import flagged_features, screen, screen_table, stimulus_rows, top_features
from fis_interventions.stats.design import prepare_2x2
from fis_interventions.stats.screen import screen_features
from fis_interventions.stats.screen_flags import level_and_rarity_flags, shared_statistic_groups
from fis_interventions.stats.screen_null import (PERMUTED_CONTRASTS, item_cell_means, ols_permuted_F,
                                                 permutation_null, within_item_F)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_screening import DESIGN, _checkpoint  # noqa: E402

LEVELS = {"f": ["x", "y"], "g": ["p", "q"]}
CELLS = ["x.p", "x.q", "y.p", "y.q"]


def _items(m: int) -> pd.DataFrame:
    """m matched items x 4 cells, one row each, cells in level order within each item."""
    rows = [{"item": f"i{i}", "cell": c, "f": c[0], "g": c[2]} for i in range(m) for c in CELLS]
    return pd.DataFrame(rows)


def _cells(n: int) -> pd.DataFrame:
    return pd.DataFrame([{"item": f"{c}{i}", "cell": c, "f": c[0], "g": c[2]} for c in CELLS for i in range(n)])


def test_within_item_permuted_F_equals_the_screen_on_relabelled_data():
    """Each relabelling (a permutation of the 4 cells within each item) through the two-product shortcut gives
    exactly the F of the within-item screen run on the relabelled rows."""
    rng = np.random.default_rng(1)
    m, k = 6, 40
    rows = _items(m)
    X = rng.normal(size=(len(rows), k)) + rng.normal(size=(m, 1)).repeat(4, 0)
    prepared = prepare_2x2(rows.assign(_y=0.0), "_y", "f", "g", item="item", levels=LEVELS)
    means = item_cell_means(X, prepared)
    D = np.einsum("jc,ick->ijk", PERMUTED_CONTRASTS, means)
    centred = means - means.mean(axis=(0, 1))
    tss = np.einsum("ick,ick->k", centred, centred)
    for _ in range(3):
        perms = [rng.permutation(4) for _ in range(m)]
        relabelled = rows.copy()
        W = np.zeros((1, m, 3))
        for i, perm in enumerate(perms):  # the row in cell c of item i gets cell perm[c]'s labels
            relabelled.loc[4 * i:4 * i + 3, ["f", "g"]] = rows.loc[4 * i + perm, ["f", "g"]].to_numpy()
            w = PERMUTED_CONTRASTS[0][perm]  # the interaction weight each cell's mean now carries
            j = int(np.flatnonzero((PERMUTED_CONTRASTS * w[0] == w).all(axis=1))[0])  # w = sign * contrast j
            W[0, i, j] = w[0]
        expected = screen_features(X, relabelled, "f", "g", levels=LEVELS, item="item")["F_ab"].to_numpy()
        assert np.allclose(within_item_F(D, W, tss)[0], expected, rtol=1e-9)


def test_ols_permuted_F_equals_the_screen_on_relabelled_data():
    rng = np.random.default_rng(2)
    rows = _cells(6)
    X = rng.normal(size=(len(rows), 30)) * rng.uniform(0.1, 100, size=30) + 50
    prepared = prepare_2x2(rows.assign(_y=0.0), "_y", "f", "g", levels=LEVELS)
    d = prepared.data
    D = np.column_stack([np.ones(len(rows)), d["xa"], d["xb"], d["xab"]])
    perms = np.stack([rng.permutation(len(rows)) for _ in range(4)])
    got = ols_permuted_F(X, D, perms)
    for p, perm in enumerate(perms):
        relabelled = rows.copy()
        relabelled[["f", "g"]] = rows[["f", "g"]].to_numpy()[perm]
        expected = screen_features(X, relabelled, "f", "g", levels=LEVELS)["F_ab"].to_numpy()
        assert np.allclose(got[p], expected, rtol=1e-8)


@pytest.mark.parametrize("item", ["item", None])
def test_permutation_null_is_calibrated_and_finds_a_planted_interaction(item):
    """No effect: p_perm < .05 for ~5% of features and the BH count sits inside its null distribution. A planted
    interaction: the smallest attainable p_perm, p_perm_fwer < .05, and an observed count above the null's."""
    rng = np.random.default_rng(3)
    rows = _items(12) if item else _cells(12)
    k = 2000
    X = rng.standard_t(df=3, size=(len(rows), k))  # heavy tails: the permutation null does not assume normality
    inter = np.where(rows["f"].map({"x": 0, "y": 1}) == rows["g"].map({"p": 0, "q": 1}), 1.0, -1.0)
    X[:, :5] += 4.0 * inter[:, None]
    table = screen_features(X, rows, "f", "g", levels=LEVELS, item=item)
    null = permutation_null(X, rows, "f", "g", table["F_ab"].to_numpy(), levels=LEVELS, item=item, n_perm=400,
                            seed=0)
    noise = null.p_perm[5:]
    assert 0.035 < (noise < 0.05).mean() < 0.065
    assert np.all(null.p_perm[:5] == 1 / 401) and np.all(null.p_perm_fwer[:5] < 0.05)
    assert (null.p_perm_fwer[5:] < 0.05).mean() < 0.01
    observed = int((table["q_ab"] < 0.05).sum())
    summary = null.hits_summary(observed)
    assert observed >= 5 > summary["null_q95"] and summary["p_count"] < 0.05
    assert np.median(null.null_hits) == 0
    # the same seed gives the same null
    again = permutation_null(X, rows, "f", "g", table["F_ab"].to_numpy(), levels=LEVELS, item=item, n_perm=400,
                             seed=0)
    assert np.array_equal(again.p_perm, null.p_perm) and np.array_equal(again.null_hits, null.null_hits)


def test_length_artifact_is_flagged_and_never_a_top_feature():
    """The issue's artifact: latents firing only on a phrase of the two 'x' cells, zero in the 'y' cells, with the
    value 1/n_tokens of a mean aggregate. They reach a huge F, one F for all of them, and are flagged."""
    rng = np.random.default_rng(4)
    rows = _items(12)
    n_tokens = np.where(rows["g"] == "p", 15.0, 16.0) + rng.integers(0, 1, len(rows))
    phrase = np.where(rows["f"] == "x", 1.0, 0.0) / n_tokens
    scale = rng.uniform(0.5, 3.0, size=15)
    artifact = phrase[:, None] * scale[None, :] * (1 + 1e-3 * rng.normal(size=(12, 1)).repeat(4, 0))
    real = rng.normal(size=(len(rows), 50))
    inter = np.where((rows["f"] == "x") == (rows["g"] == "p"), 1.0, -1.0)
    real[:, 0] += 1.5 * inter
    table = screen_table({"sae.hook_latents": np.concatenate([artifact, real], 1)}, rows, "f", "g", LEVELS,
                         item="item")
    art = table[table["feature"] < 15]
    assert (art["q_ab"] < 1e-6).all() and art["flagged"].all() and not art["hit"].any()
    flags = art["artifact_flags"]
    assert flags.str.contains("zero_level:f=y").all() and flags.str.contains(r"shared_F\(15\)").all()
    top = top_features(table, 3)
    assert top[0]["feature"] == 15 and all(t["feature"] >= 15 for t in top)
    assert table.loc[table["feature"] == 15, "hit"].item()
    assert {f["feature"] for f in flagged_features(table, 50)} >= set(range(15))


def test_flag_rules():
    rows = _items(10)
    X = np.zeros((40, 4))
    X[:, 0] = np.arange(40) + 1.0      # fires everywhere: no flag
    X[[0, 7], 1] = 1.0                 # two stimuli (x.p and y.q of two items): rare only
    X[rows["g"] == "q", 2] = np.arange(20) + 1.0  # silent on g=p: a level exactly zero
    flags = level_and_rarity_flags(X, rows, LEVELS)
    assert flags[0] == "" and flags[1] == "rare(2)" and flags[2] == "zero_level:g=p" and flags[3] == ""
    F = np.array([10.0, 10.0 * (1 + 1e-7), 10.0 * (1 - 2e-7), 10.5, np.nan, 3.0, 3.0])
    assert shared_statistic_groups(F).tolist() == [3, 3, 3, 0, 0, 0, 0]


def test_battery_never_selects_a_flagged_feature(tmp_path):
    from fis_interventions.interventions.config import FeatureSpec
    from fis_interventions.interventions.features import _from_screening

    table = pd.DataFrame({"point": ["sae.hook_latents"] * 4, "feature": [7, 8, 9, 10],
                          "p_ab": [1e-9, 1e-8, 1e-3, 1e-2], "degenerate": [False] * 4,
                          "artifact_flags": ["zero_level:f=y;shared_F(2)", "shared_F(2)", "", ""],
                          "flagged": [True, True, False, False]})
    table.to_csv(tmp_path / "screening.csv", index=False)
    spec = FeatureSpec(from_screening=tmp_path, top=2, role="top")
    assert [t.indices for t in _from_screening(spec)] == [(9,), (10,)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_bridge) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ck") / "joint", tiny_bridge.tokenizer)


def test_screen_reports_nulls_flags_and_warns_on_mean_with_unequal_lengths(ckpt, tiny_bridge, tmp_path):
    out = tmp_path / "screen"
    res = screen(ckpt, DESIGN, bridge=tiny_bridge, progress=False, discover=None, aggregate="mean",
                 permutations=200, out=out, points=["sae.hook_latents", "secondary.hook_latents"])
    s = json.loads((out / "screen.json").read_text())
    perm, rnd = s["null"]["permutation"], s["null"]["random_init"]
    assert perm["n_permutations"] == 200 and perm["scheme"] == "cell labels permuted within items"
    assert perm["hits"]["observed"] == s["n_q_below_alpha"] and 0 <= perm["hits"]["null_q95"]
    assert rnd["family_size"] > 0 and "random-init checkpoint (seed 0)" in s["baseline"]
    assert "label-permutation null (200 relabellings, within items)" in s["baseline"]
    t = pd.read_csv(out / "screening.csv")
    fam = t["p_ab"].notna()
    assert t.loc[fam, ["p_perm", "p_perm_fwer", "p_random_init"]].notna().all().all()
    assert t.loc[~fam, ["p_perm", "p_perm_fwer"]].isna().all().all()
    assert ((t["p_perm"] >= 1 / 201) & (t["p_perm"] <= 1)).loc[fam].all()
    assert (t.loc[fam, "p_perm_fwer"] >= t.loc[fam, "p_perm"]).all()
    assert s["n_hits"] == int((t["hit"]).sum()) == int(((t["q_ab"] < 0.05) & ~t["flagged"]).sum())
    assert s["n_flagged"] == int(t["flagged"].sum()) > 0
    assert any(w.startswith("aggregate=mean divides") for w in res.warnings)
    # the random-init model is seeded: same p_random_init on a second run; another seed changes it
    again = screen(ckpt, DESIGN, bridge=tiny_bridge, progress=False, discover=None, aggregate="mean",
                   permutations=0, points=["sae.hook_latents"])
    other = screen(ckpt, DESIGN, bridge=tiny_bridge, progress=False, discover=None, aggregate="mean",
                   permutations=0, null_seed=1, points=["sae.hook_latents"])
    first = res.table[res.table.point == "sae.hook_latents"].set_index("feature")["p_random_init"].sort_index()
    assert np.allclose(again.table.set_index("feature")["p_random_init"].sort_index(), first, equal_nan=True)
    assert not np.allclose(other.table.set_index("feature")["p_random_init"].sort_index(), first, equal_nan=True)
    assert "p_perm" not in again.table.columns and "permutation" not in again.summary["null"]


def test_random_init_model_has_the_checkpoint_shapes(ckpt):
    from fis_interventions.sae import load_checkpoint
    from fis_interventions.screening import random_init_joint

    trained = load_checkpoint(ckpt).model
    rnd = random_init_joint(trained, 12345)  # (the test checkpoint is itself seed-0 random init)
    shapes = {n: p.shape for n, p in trained.named_parameters()}
    assert {n: p.shape for n, p in rnd.named_parameters()} == shapes
    assert any(not np.allclose(p.detach(), q.detach()) for p, q in zip(rnd.parameters(), trained.parameters(),
                                                                        strict=True))


def test_design_rows_have_cells():
    from fis_interventions.designs import read_design

    rows = stimulus_rows(read_design(DESIGN))
    assert set(rows["cell"]) == {"affirmed.positive", "affirmed.negative", "negated.positive", "negated.negative"}


def _with_critical(tmp_path: Path, slot: str) -> Path:
    path = tmp_path / f"negation_{slot}.yaml"
    path.write_text(DESIGN.read_text(encoding="utf-8") + f"critical: {slot}\n", encoding="utf-8")
    return path


def test_critical_region_is_the_mean_over_the_slot_tokens(ckpt, tiny_bridge, tmp_path):
    """'truly' / 'not' are one token each in every cell: the feature's value is the joint model's value there."""
    import torch

    from fis_interventions.sae import load_checkpoint
    from test_screening import HOOK, SCALE

    res = screen(ckpt, _with_critical(tmp_path, "polarity"), bridge=tiny_bridge, aggregate="critical",
                 points=["sae.hook_latents"], batch_size=5, progress=False, discover=None, permutations=0,
                 random_init=False)
    assert res.summary["critical_region"] == "polarity" and set(res.summary["tokens_per_cell"].values()) == {1.0}
    joint = load_checkpoint(ckpt).model
    for j in (0, 37):
        text = res.stimuli["stimulus"][j]
        tokens = tiny_bridge.to_tokens(text)
        words = [tiny_bridge.tokenizer.decode([t]).strip() for t in tokens[0].tolist()]
        pos = [i for i, w in enumerate(words) if w in ("truly", "not")]
        assert len(pos) == 1, words
        _, cache = tiny_bridge.run_with_cache(tokens, names_filter=lambda n: n == HOOK)
        with torch.no_grad():
            expected = joint(cache[HOOK][0, pos] * SCALE, "full").latents.dense().mean(0).numpy()
        assert np.abs(res.activations["sae.hook_latents"][j] - expected).max() < 1e-4


def test_critical_region_that_cannot_be_aligned_is_refused(ckpt, tiny_bridge, tmp_path, monkeypatch, capsys):
    """An adjective pair of different token counts: exit 2, one line with the item's line, nothing written."""
    from fis_interventions.cli import main
    from fis_interventions.errors import FisError

    design = _with_critical(tmp_path, "adjective")
    with pytest.raises(FisError, match=r"line \d+: item '\w+': the critical region 'adjective' has different "
                                       r"token counts .* cannot be aligned"):
        screen(ckpt, design, bridge=tiny_bridge, aggregate="critical", progress=False, discover=None)
    import fis_interventions.models as models

    monkeypatch.setattr(models, "load_model", lambda name, **kw: tiny_bridge)
    out = tmp_path / "out"
    code = main(["screen", "--checkpoint", str(ckpt), "--design", str(design), "--aggregate", "critical",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be aligned" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    # no critical region named: refused before any model is loaded
    monkeypatch.setattr(models, "load_model", lambda name, **kw: pytest.fail("model loaded"))
    code = main(["screen", "--checkpoint", str(ckpt), "--design", str(DESIGN), "--aggregate", "critical"])
    assert code == 2 and "names no critical region" in capsys.readouterr().err


def test_critical_region_must_be_a_template_slot(tmp_path):
    from fis_interventions.designs import read_design
    from fis_interventions.errors import FisError

    with pytest.raises(FisError, match=r"line \d+: critical region 'nope' is not a slot of the template of item "
                                       r"'soup' \(and \d+ more\)"):
        read_design(_with_critical(tmp_path, "nope"))
