"""Discovery / confirmation split: disjoint and seeded; the battery tests screened features on held-out items,
refuses a screening of another checkpoint or design; the report labels same-item tests exploratory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fis_interventions.cli import main
from fis_interventions.designs import design_from_dict, read_design
from fis_interventions.errors import FisError
from fis_interventions.fingerprint import checkpoint_identity
from fis_interventions.holdout import design_identity, split_items
from fis_interventions.interventions import BatteryConfig, battery, read_results
from fis_interventions.reports import report
from fis_interventions.reports.analysis import CONFIRMATORY, EXPLORATORY
from fis_interventions.screening import screen, stimulus_rows
from tiny_checkpoints import save_tiny_joint_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "stimuli" / "negation_sentiment.yaml"
HOOK = "blocks.1.hook_resid_post"


def _cell_design(n_per_cell: int):
    cells = {c: [f"sentence {c} number {i}" for i in range(n_per_cell)] for c in ("x.p", "x.q", "y.p", "y.q")}
    return design_from_dict({"name": "c", "factors": {"f": ["x", "y"], "g": ["p", "q"]}, "cells": cells})


def test_item_split_is_disjoint_complete_and_seeded():
    rows = stimulus_rows(read_design(DESIGN))
    ids = list(dict.fromkeys(rows["item"]))
    s0 = split_items(rows, 0.5, seed=0)
    assert not set(s0["discovery"]) & set(s0["confirmation"])
    assert sorted(s0["discovery"] + s0["confirmation"]) == sorted(ids) and len(s0["discovery"]) == 12
    assert split_items(rows, 0.5, seed=0) == s0                                  # same seed, same split
    assert split_items(rows.iloc[::-1], 0.5, seed=0)["discovery"] != [] and set(
        split_items(rows.iloc[::-1], 0.5, seed=0)["discovery"]) == set(s0["discovery"])  # not file order
    assert set(split_items(rows, 0.5, seed=1)["discovery"]) != set(s0["discovery"])
    assert len(split_items(rows, 0.25, seed=0)["discovery"]) == 6
    # an item's four cells stay on one side
    by_item = rows.groupby("item")["cell"].nunique()
    assert (by_item == 4).all()


def test_cell_list_split_is_by_sentence_within_each_cell():
    rows = stimulus_rows(_cell_design(10))
    s = split_items(rows, 0.5, seed=3, shape="cells")
    assert s["unit"] == "sentence per cell" and not set(s["discovery"]) & set(s["confirmation"])
    disc = rows[rows["item"].isin(s["discovery"])]
    assert disc.groupby("cell").size().to_dict() == {"x.p": 5, "x.q": 5, "y.p": 5, "y.q": 5}
    assert len(s["discovery"]) + len(s["confirmation"]) == 40


def test_bad_fraction_and_too_few_items():
    rows = stimulus_rows(read_design(DESIGN))
    for bad in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(FisError, match="strictly between 0 and 1"):
            split_items(rows, bad)
    with pytest.raises(FisError, match="too few items to split: 24 items split 2 / 22"):
        split_items(rows, 0.1)
    with pytest.raises(FisError, match="too few items to split"):
        split_items(stimulus_rows(_cell_design(6)), 0.5, shape="cells")


def test_identities_follow_content(tmp_path):
    d = read_design(DESIGN)
    edited = tmp_path / "edited.yaml"
    edited.write_text("# a comment changes nothing\n" + DESIGN.read_text(encoding="utf-8"), encoding="utf-8")
    assert design_identity(read_design(edited)) == design_identity(d)
    edited.write_text(DESIGN.read_text(encoding="utf-8").replace("truly delicious", "truly tasty")
                      .replace("delicious", "tasty"), encoding="utf-8")
    assert design_identity(read_design(edited)) != design_identity(d)


# --- end to end on the tiny model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bridge):
    root = tmp_path_factory.mktemp("holdout")
    ckpt = save_tiny_joint_checkpoint(root / "ckpt", tiny_bridge.tokenizer, seed=0, hook=HOOK)
    res = screen(ckpt, DESIGN, bridge=tiny_bridge, out=root / "screen", points=["sae.hook_latents"],
                 progress=False)
    return {"root": root, "ckpt": ckpt, "screen": root / "screen", "result": res}


def _cfg(setup, out: Path, **kw) -> BatteryConfig:
    base = dict(name="h", model="tiny-random", checkpoint=setup["ckpt"], designs=[DESIGN],
                features=[{"from_screening": setup["screen"], "point": "sae.hook_latents", "top": 1,
                           "role": "top"}],
                interventions=[{"kind": "set", "values": [3.0]}, {"kind": "scale", "values": [1.0]}], batch_size=16,
                out=out, device="cpu")
    base.update(kw)
    return BatteryConfig.model_validate(base)


def test_screen_uses_discovery_items_and_records_split(setup):
    summary = json.loads((setup["screen"] / "screen.json").read_text())
    split = summary["split"]
    assert len(split["discovery"]) == len(split["confirmation"]) == 12
    assert set(setup["result"].stimuli["item"]) == set(split["discovery"])
    assert summary["n_stimuli"] == 48 and summary["n_items"] == 12
    assert "repeated-measures" in summary["screen_model"]
    assert summary["checkpoint_sha256"] == checkpoint_identity(setup["ckpt"])
    assert summary["design_sha256"] == design_identity(read_design(DESIGN))


def test_battery_runs_on_confirmation_items_only(setup, tiny_bridge):
    cfg = _cfg(setup, setup["root"] / "conf", max_items=3)
    battery(cfg, bridge=tiny_bridge, progress=False)
    df = read_results(Path(cfg.out) / "results.sqlite")
    split = json.loads((setup["screen"] / "screen.json").read_text())["split"]
    items = set(df["item"])
    assert len(items) == 3 and items <= set(split["confirmation"]) and not items & set(split["discovery"])
    run = json.loads((Path(cfg.out) / "run.json").read_text())
    assert run["designs"]["negation_sentiment"]["item_selection"].startswith("confirmation")
    assert set(run["designs"]["negation_sentiment"]["items_used"]) == items
    assert run["features"][0]["selected_on"]["discovery_items"] == split["discovery"]
    rep = report(cfg.out, out=setup["root"] / "rep_conf")
    tests = pd.read_csv(rep / "tables" / "tests.csv")
    assert (tests["selection"] == CONFIRMATORY).all()
    assert EXPLORATORY not in (rep / "report.md").read_text(encoding="utf-8").split("## Methods")[0]


def test_items_all_is_labelled_exploratory_and_left_out_of_the_family(setup, tiny_bridge):
    cfg = _cfg(setup, setup["root"] / "all", items="all", max_items=6,
               features=[{"from_screening": setup["screen"], "point": "sae.hook_latents", "top": 1,
                          "role": "top"}, {"point": "sae.hook_latents", "random": 1, "role": "control"}])
    battery(cfg, bridge=tiny_bridge, progress=False)
    df = read_results(Path(cfg.out) / "results.sqlite")
    split = json.loads((setup["screen"] / "screen.json").read_text())["split"]
    assert set(df["item"]) & set(split["discovery"])          # precondition: screened items are tested again
    rep = report(cfg.out, out=setup["root"] / "rep_all")
    tests = pd.read_csv(rep / "tables" / "tests.csv")
    top = tests[(tests["role"] == "top") & ~tests["null_check"]]
    control = tests[(tests["role"] == "control") & ~tests["null_check"]]
    assert (top["selection"] == EXPLORATORY).all() and len(top) == 1
    assert (control["selection"] != EXPLORATORY).all()
    assert not top["significant"].any()
    assert top["q_family"].str.startswith("exploratory").all()
    # the confirmatory family holds only the control's real test; the exploratory one is corrected alone
    assert control["q_family_size"].iloc[0] == 1 and top["q_family_size"].iloc[0] == 1
    assert control["q"].iloc[0] == pytest.approx(control["p"].iloc[0])
    md = (rep / "report.md").read_text(encoding="utf-8")
    assert f"**{EXPLORATORY}**" in md.split("## Features")[0] and "1 exploratory tests" in md


def test_battery_refuses_other_checkpoint_design_or_no_holdout(setup, tiny_bridge, tmp_path):
    other = save_tiny_joint_checkpoint(tmp_path / "other", tiny_bridge.tokenizer, seed=1, hook=HOOK)
    with pytest.raises(FisError, match="another checkpoint"):
        battery(_cfg(setup, tmp_path / "o", checkpoint=other), bridge=tiny_bridge, progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(setup["ckpt"], copy)                           # a copy is the same checkpoint
    assert checkpoint_identity(copy) == checkpoint_identity(setup["ckpt"])
    with pytest.raises(FisError, match="not among the battery's designs"):
        battery(_cfg(setup, tmp_path / "d", designs=[ROOT / "stimuli" / "agreement_attractor.yaml"]),
                bridge=tiny_bridge, progress=False)
    every = tmp_path / "every"
    screen(setup["ckpt"], DESIGN, bridge=tiny_bridge, out=every, points=["sae.hook_latents"],
           discover=None, progress=False)
    with pytest.raises(FisError, match="held out no items"):
        battery(_cfg(setup, tmp_path / "e", features=[{"from_screening": every, "top": 1}]), bridge=tiny_bridge,
                progress=False)
    with pytest.raises(FisError, match="items: confirmation needs"):
        battery(_cfg(setup, tmp_path / "n", items="confirmation",
                     features=[{"point": "sae.hook_latents", "index": 1}]), bridge=tiny_bridge, progress=False)
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


def test_cli_discover_errors(setup, tiny_bridge, monkeypatch, capsys):
    import fis_interventions.models as models

    monkeypatch.setattr(models, "load_model", lambda name, **kw: tiny_bridge)
    base = ["screen", "--checkpoint", str(setup["ckpt"]), "--design", str(DESIGN)]
    for bad in ("0", "1", "1.5"):
        assert main(base + ["--discover", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert "strictly between 0 and 1" in err and len(err.splitlines()) == 1
    assert main(base + ["--discover", "0.1"]) == 2
    assert "too few items to split" in capsys.readouterr().err
    assert main(base + ["--point", "sae.hook_latents", "--split-seed", "4"]) == 0
    assert "screened 12 discovery items, 12 held out" in capsys.readouterr().out



def test_selection_bench_shows_the_bias_and_holdout_removes_it():
    """bench/selection.py's simulation, small: circular testing rejects most null top features, held-out
    testing about alpha (the bench itself runs >= 500 repetitions)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("selection_bench", ROOT / "bench" / "selection.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.simulate(reps=150, n_features=300, top=2, chunk=50, seed=1)
    assert res["tests"] == 300
    assert res["same_f2"] > 0.5
    assert res["held_f2"] < 0.11


def test_screen_models_follow_the_design_shape(tmp_path, setup, tiny_bridge):
    """Matched items: the within-item model (equal to the RM-ANOVA on the screened activations); cell lists:
    the two-way OLS (equal to anova_2x2)."""
    import yaml

    from fis_interventions.stats import anova_2x2, rm_anova_by_item
    from fis_interventions.stats.screen import screen_features

    res = setup["result"]
    X = res.activations["sae.hook_latents"]
    ref = screen_features(X, res.stimuli, "negation", "sentiment", item="item")
    table = res.table.sort_values("feature").reset_index(drop=True)
    np.testing.assert_allclose(table["p_ab"], ref["p_ab"], rtol=1e-10, equal_nan=True)
    j = int(np.nanargmin(ref["p_ab"]))
    aov, _ = rm_anova_by_item(res.stimuli.assign(y=X[:, j].astype(float)), "y", "negation", "sentiment", item="item")
    assert table.loc[j, "F_ab"] == pytest.approx(aov.set_index("term").loc["negation:sentiment", "F"], rel=1e-8)

    words = ["cats", "dogs", "birds", "fish", "trees", "rivers", "hills", "roads", "lamps", "doors"]
    cells = {f"{a}.{b}": [f"The {w} were {a} and {b} today." for w in words]
             for a in ("calm", "loud") for b in ("red", "blue")}
    data = {"name": "cells", "factors": {"noise": ["calm", "loud"], "colour": ["red", "blue"]}, "cells": cells,
            "readout": {"targets": {"x": ["good"], "y": ["bad"]}, "contrasts": {"c": "x - y"}}}
    path = tmp_path / "cells.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    cl = screen(setup["ckpt"], path, bridge=tiny_bridge, points=["sae.hook_latents"], progress=False)
    assert cl.summary["screen_model"].startswith("two-way Type III") and cl.summary["split"]["unit"] == \
        "sentence per cell"
    assert len(cl.stimuli) == 20 and cl.stimuli.groupby("cell").size().eq(5).all()
    Xc = cl.activations["sae.hook_latents"]
    t = cl.table.sort_values("feature").reset_index(drop=True)
    k = int(np.nanargmin(t["p_ab"]))
    ref = anova_2x2(cl.stimuli.assign(y=Xc[:, k].astype(float)), "y", "noise", "colour").set_index("term")
    assert t.loc[k, "F_ab"] == pytest.approx(ref.loc["noise:colour", "F"], rel=1e-8)


def test_cli_battery_refusal_is_one_line_exit_2(setup, tiny_bridge, tmp_path, capsys):
    """Refused before any model is loaded or anything written."""
    import yaml

    other = save_tiny_joint_checkpoint(tmp_path / "other", tiny_bridge.tokenizer, seed=2, hook=HOOK)
    cfg = _cfg(setup, tmp_path / "out", checkpoint=other).model_dump(mode="json")
    path = tmp_path / "battery.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    assert main(["battery", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "another checkpoint" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
