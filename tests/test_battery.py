"""Intervention batteries on a tiny random model: error-term identity, batching, resume, shards, errors."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pandas as pd
import pytest
import torch

from fis_interventions.activations import ExclusionRule, Normalizer
from fis_interventions.errors import FisError
from fis_interventions.interventions import BatteryConfig, battery, make_edit, merge_shards, read_results
from fis_interventions.interventions import store as store_mod
from fis_interventions.interventions.features import Condition, Target
from fis_interventions.sae import JointArch, JointSAE, NFMArch, SAEArch, save_checkpoint
import accelerator

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.1.hook_resid_post"



def _cfg(ckpt: Path, out: Path, **kw) -> BatteryConfig:
    base = dict(name="t", model="tiny-random", checkpoint=ckpt, designs=[ROOT / "stimuli/negation_sentiment.yaml"],
                features=[{"point": "secondary.hook_latents", "index": 1, "role": "top"},
                          {"point": "sae.hook_latents", "random": 1, "role": "random_control"}],
                interventions=[{"kind": "scale", "values": [-4, 0, 1, 4]}, {"kind": "set", "values": [2.0],
                                                                              "relative_to_max": True}],
                batch_size=8, out=out, max_items=2, device="cpu")
    base.update(kw)
    return BatteryConfig.model_validate(base)


def _run(bridge, cfg, **kw) -> pd.DataFrame:
    battery(cfg, bridge=bridge, progress=False, **kw)
    return read_results(Path(cfg.out) / "results.sqlite")


def test_scale_one_is_exact_noop_and_rows_complete(tiny_bridge, tiny_ckpt, tmp_path):
    df = _run(tiny_bridge, _cfg(tiny_ckpt, tmp_path / "r"))
    ones = df[(df.intervention == "scale") & (df.value == 1.0)]
    assert len(ones) > 0 and (ones["shift"].abs() == 0).all()
    # 2 items x 4 cells x 3 prompts, 2 features, 5 conditions, readouts = words + contrasts + kl
    n_rows_stim = 2 * 4 * 3
    per = df.groupby(["point", "feature", "intervention", "value"]).size()
    assert (per % n_rows_stim == 0).all() and len(per) == 2 * 5
    assert set(df.readout_kind) == {"word", "contrast", "kl"}
    assert (df[df.readout_kind == "kl"]["shift"] >= -1e-6).all()
    big = df[(df.intervention == "scale") & (df.value == 4.0) & (df.readout_kind == "kl")]
    assert big["shift"].max() > 0, "a real edit must move the distribution"
    assert (Path(tmp_path / "r") / "results.parquet").exists() and (Path(tmp_path / "r") / "run.json").exists()


def test_batched_equals_single(tiny_bridge, tiny_ckpt, tmp_path):
    a = _run(tiny_bridge, _cfg(tiny_ckpt, tmp_path / "b8", batch_size=8))
    b = _run(tiny_bridge, _cfg(tiny_ckpt, tmp_path / "b1", batch_size=1))
    assert len(a) == len(b)
    pd.testing.assert_frame_equal(a.drop(columns=["score_edited", "score_clean", "shift"]),
                                  b.drop(columns=["score_edited", "score_clean", "shift"]))
    for col in ("score_clean", "score_edited", "shift"):
        assert (a[col] - b[col]).abs().max() < 1e-4


def test_resume_after_kill_has_no_duplicates_or_losses(tiny_bridge, tiny_ckpt, tmp_path, monkeypatch):
    full = _run(tiny_bridge, _cfg(tiny_ckpt, tmp_path / "full"))
    real = store_mod.ResultStore.commit_unit
    calls = {"n": 0}

    def dying(self, unit, rows):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, unit, rows)

    monkeypatch.setattr(store_mod.ResultStore, "commit_unit", dying)
    with pytest.raises(KeyboardInterrupt):
        battery(_cfg(tiny_ckpt, tmp_path / "part"), bridge=tiny_bridge, progress=False)
    with sqlite3.connect(tmp_path / "part" / "results.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM done").fetchone()[0] == 2
    monkeypatch.setattr(store_mod.ResultStore, "commit_unit", real)
    resumed = _run(tiny_bridge, _cfg(tiny_ckpt, tmp_path / "part"))
    pd.testing.assert_frame_equal(full, resumed)


def test_two_shards_merge_equals_single_run(tiny_bridge, tiny_ckpt, tmp_path):
    single = _run(tiny_bridge, _cfg(tiny_ckpt, tmp_path / "one"))
    cfg = _cfg(tiny_ckpt, tmp_path / "sharded")
    battery(cfg, bridge=tiny_bridge, progress=False, shard="0/2")
    battery(cfg, bridge=tiny_bridge, progress=False, shard="1/2")
    assert merge_shards(tmp_path / "sharded") == len(single)
    pd.testing.assert_frame_equal(single, read_results(tmp_path / "sharded" / "results.sqlite"))


def test_where_readout_only_and_zero_equals_scale_zero(tiny_bridge, tiny_ckpt, tmp_path):
    cfg = _cfg(tiny_ckpt, tmp_path / "w", features=[{"point": "sae.hook_latents", "indices": [3, 5, 7]}],
               interventions=[{"kind": "zero"}, {"kind": "scale", "values": [0.0]},
                              {"kind": "add", "values": [3.0], "where": "readout"},
                              {"kind": "add", "values": [3.0], "where": "all"}])
    df = _run(tiny_bridge, cfg)
    words = df[df.readout_kind == "word"].set_index(["item", "cell", "prompt_id", "readout"])
    zero = words[words.intervention == "zero"]["shift"]
    scale0 = words[(words.intervention == "scale")]["shift"]
    assert (zero - scale0).abs().max() < 1e-5
    assert set(df.feature) == {"3,5,7"}
    add = words[words.intervention == "add"]
    by_pos = add.groupby("position")["shift"].apply(lambda s: s.abs().sum())
    assert by_pos["readout"] != pytest.approx(by_pos["all"])


def test_edit_functions():
    v = torch.tensor([[1.0, 2.0, 3.0]])
    t = Target("p", (1, 2), "x")
    assert make_edit(t, Condition("scale", -4, "all", -4))(v).tolist() == [[1.0, -8.0, -12.0]]
    assert make_edit(t, Condition("set", 0.5, "all", 5.0))(v).tolist() == [[1.0, 5.0, 5.0]]
    assert make_edit(t, Condition("add", 1, "all", 1))(v).tolist() == [[1.0, 3.0, 4.0]]
    assert make_edit(t, Condition("zero", 0, "all", 0))(v).tolist() == [[1.0, 0.0, 0.0]]
    assert v.tolist() == [[1.0, 2.0, 3.0]], "edits must not modify their input"


@pytest.mark.parametrize("kw,match", [
    (dict(features=[{"point": "nope.hook", "index": 0}]), "unknown point 'nope.hook'"),
    (dict(features=[{"point": "sae.hook_latents", "index": 999}]), "out of range"),
])
def test_bad_features(tiny_bridge, tiny_ckpt, tmp_path, kw, match):
    with pytest.raises(FisError, match=match):
        battery(_cfg(tiny_ckpt, tmp_path / "x", **kw), bridge=tiny_bridge, progress=False)


def test_bad_shard_and_config_errors(tiny_bridge, tiny_ckpt, tmp_path):
    with pytest.raises(FisError, match="bad shard"):
        battery(_cfg(tiny_ckpt, tmp_path / "x"), bridge=tiny_bridge, progress=False, shard="a/b")
    with pytest.raises(Exception, match="exactly one of"):
        _cfg(tiny_ckpt, tmp_path / "x", features=[{"point": "sae.hook_latents", "index": 1, "random": 2}])


def _random_ckpt(bridge, folder: Path, hook: str) -> Path:
    torch.manual_seed(1)
    d = int(bridge.cfg.d_model)
    joint = JointSAE(JointArch(sae=SAEArch(d_in=d, d_sae=2 * d, k=16), nfm=NFMArch(emb_dim=16, hidden=32)))
    joint.attach_secondary(64, 4)
    rule = ExclusionRule.for_tokenizer(bridge.tokenizer, 10.0)
    rule.median_norm = 150.0
    norm = {**Normalizer("expected_norm", scale=d**0.5 / 150.0).to_dict(), "exclusion": rule.to_dict()}
    return save_checkpoint(folder / "ckpt", joint, model_name=bridge.fis_model_name, hook=hook, normalization=norm)


@pytest.mark.real_model
def test_error_term_noop_equals_clean_logits_real_model(real_bridge, tmp_path):
    from fis_interventions.attach import attach
    from fis_interventions.designs import expand, load_design
    from fis_interventions.interventions.battery import encode_rows
    from fis_interventions.interventions.features import Condition

    attached = attach(real_bridge, _random_ckpt(real_bridge, tmp_path, "blocks.14.hook_resid_post"))
    rows = expand(load_design(ROOT / "stimuli/formality_emotion.yaml")).iloc[:6]
    enc = encode_rows(rows, real_bridge.tokenizer)
    resid, state = attached.split.prefix(enc.tokens, enc.mask)
    keep = attached.splice.keep_mask(enc.tokens, resid, enc.mask)
    noop = make_edit(Target("secondary.hook_latents", (0,), "x"), Condition("scale", 1.0, "all", 1.0))
    edited = attached.splice.edit(resid, keep, {"secondary.hook_latents": noop})
    logits = attached.split.suffix(edited, state)
    with torch.no_grad():
        for i in range(len(rows)):
            n = int(enc.mask[i].sum())
            clean = real_bridge(enc.tokens[i:i + 1, :n])
            assert (logits[i, :n] - clean[0]).abs().max().item() <= 1e-4
    # and a real clamp does move the readout logits
    big = make_edit(Target("sae.hook_latents", (0, 1, 2), "x"), Condition("set", 10.0, "all", 10.0))
    moved = attached.split.suffix(attached.splice.edit(resid, keep, {"sae.hook_latents": big}), state)
    assert (moved - logits).abs().max().item() > 1e-2


@pytest.mark.gpu
@accelerator.needs_accel
def test_battery_on_cuda_matches_cpu(tiny_ckpt, tmp_path):
    from fis_interventions.models import load_model

    cpu = _run(load_model("tiny-random", device="cpu"), _cfg(tiny_ckpt, tmp_path / "cpu"))
    gpu_bridge = load_model("tiny-random", device=accelerator.ACCEL)
    gpu = _run(gpu_bridge, _cfg(tiny_ckpt, tmp_path / "gpu", device=accelerator.ACCEL))
    assert len(cpu) == len(gpu)
    assert (cpu["shift"] - gpu["shift"]).abs().max() < 1e-3


def test_torchrun_rank_picks_the_shard(monkeypatch):
    from fis_interventions.interventions.battery import parse_shard, store_path

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert parse_shard(None) == (1, 3)
    assert parse_shard("0/2") == (0, 2)  # an explicit shard wins
    assert store_path(Path("out"), (1, 3)).name == "results.shard-1-of-3.sqlite"
    monkeypatch.delenv("RANK")
    assert parse_shard(None) == (0, 1)
    with pytest.raises(FisError, match="not in 0..1"):
        parse_shard("2/2")


def test_from_screening_ranks_within_the_point(tmp_path):
    from fis_interventions.interventions.config import FeatureSpec
    from fis_interventions.interventions.features import _from_screening

    pd.DataFrame({"point": ["sae.hook_latents", "secondary.hook_latents", "secondary.hook_latents",
                            "secondary.hook_latents"],
                  "feature": [5, 9, 3, 7], "p_ab": [1e-9, 0.2, 0.01, 1e-4],
                  "degenerate": [False, False, False, True]}).to_csv(tmp_path / "screening.csv", index=False)
    spec = FeatureSpec(from_screening=tmp_path, point="secondary.hook_latents", top=2, role="top")
    assert [t.indices for t in _from_screening(spec)] == [(3,), (9,)]
    spec = FeatureSpec(from_screening=tmp_path, top=1)
    assert _from_screening(spec)[0].indices == (5,)
    with pytest.raises(FisError, match="has no feature at nfm.hook_hidden"):
        _from_screening(FeatureSpec(from_screening=tmp_path, point="nfm.hook_hidden"))


SPLIT_DESIGN = """
name: split_words
factors:
  tone: [calm, upset]
  topic: [work, home]
items:
  - id: a
    cells:
      calm.work: "The report is done."
      calm.home: "The dinner is ready."
      upset.work: "The report is late again!"
      upset.home: "The dinner burned again!"
  - id: b
    cells:
      calm.work: "The meeting went fine."
      calm.home: "The garden looks nice."
      upset.work: "The meeting was a disaster!"
      upset.home: "The garden is ruined!"
readout:
  score: logprob
  multi_token: sum_logprob
  targets:
    calmish: [fine, antidisestablishmentarianism]
    upsetish: [awful, catastrophically]
  contrasts:
    mood: calmish - upsetish
"""


def test_sum_logprob_scores_split_words_by_teacher_forcing(tiny_bridge, tiny_ckpt, tmp_path):
    design = tmp_path / "split.yaml"
    design.write_text(SPLIT_DESIGN, encoding="utf-8")
    cfg = _cfg(tiny_ckpt, tmp_path / "s", designs=[design], max_items=None, batch_size=3,
               features=[{"point": "sae.hook_latents", "index": 3}],
               interventions=[{"kind": "scale", "values": [1.0, 5.0]}])
    df = _run(tiny_bridge, cfg)
    tok = tiny_bridge.tokenizer
    word = " antidisestablishmentarianism"
    ids = tok(word, add_special_tokens=False)["input_ids"]
    assert len(ids) > 2
    row = df[(df.readout == "antidisestablishmentarianism") & (df.value == 1.0) & (df.item == "a")
             & (df.cell == "calm.work")].iloc[0]
    text_ids = [tok.bos_token_id, *tok("The report is done.", add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        logp = tiny_bridge(torch.tensor([text_ids + ids[:-1]])).log_softmax(-1)[0]
    n = len(text_ids)
    expected = sum(float(logp[n - 1 + j, ids[j]]) for j in range(len(ids)))
    assert row.score_clean == pytest.approx(expected, abs=1e-4)
    assert row["shift"] == 0.0
    moved = df[(df.readout == "antidisestablishmentarianism") & (df.value == 5.0)]["shift"].abs().max()
    assert moved > 0
