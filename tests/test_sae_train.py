"""Training loop: resume bit-for-bit, NaN stop, checkpoints, config errors, joint vs SAE, decoder refit."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fis_interventions.config import load_config
from fis_interventions.errors import FisError
from fis_interventions.sae import (JointArch, JointSAE, NFMArch, SAEArch, TrainConfig, evaluate_reconstruction,
                                   load_checkpoint, refit_decoder_lstsq, save_checkpoint, train)
from fis_interventions.sae.metrics import fvu
from fis_interventions.sae.synthetic import SyntheticActivations

TINY = dict(d_sae=24, k=4, emb_dim=6, hidden=8, lr=3e-3, warmup_steps=3, batch_size=32, eval_every=7,
            checkpoint_every=5, heldout_fraction=0.05, model="toy-model", hook="blocks.0.hook_resid_post",
            corpus="toy")


def data(**kw) -> SyntheticActivations:
    return SyntheticActivations(d_in=8, n_features=16, batch_size=32, seed=5, **kw)


@pytest.mark.parametrize("extra", [
    dict(mode="joint", dropout=0.2, aux_k=4, dead_tokens=64, tokens=32 * 30),
    dict(mode="sequential", tokens=32 * 12, secondary={"d_sae": 12, "k": 2, "steps": 8}),
])
def test_resume_is_bit_for_bit(tmp_path, extra):
    cfg = TrainConfig(**TINY, **extra)
    src = data()
    full = train(cfg, src.seekable(), tmp_path / "a", progress=False, normalization={"kind": "none"})
    assert full.complete
    # interrupted: the data runs out after 2 held-out + 17 training batches (a plain iterable, re-read on resume)
    part = train(cfg, src.stream(0, 19), tmp_path / "b", progress=False, normalization={"kind": "none"})
    assert not part.complete and part.step == 19 - math.ceil(cfg.heldout_fraction * cfg.steps())
    done = train(cfg, src.stream(0), tmp_path / "b", resume=True, progress=False)
    assert done.complete and done.step == full.step
    a, b = full.model.state_dict(), done.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows_a = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    assert [r.get("loss") for r in rows_a] == [r.get("loss") for r in rows_b]
    assert load_checkpoint(tmp_path / "b").normalization == {"kind": "none"}


def test_metrics_and_checkpoint_contents(tmp_path):
    cfg = TrainConfig(**TINY, mode="joint", tokens=32 * 14)
    res = train(cfg, data().seekable(), tmp_path, progress=False, normalization={"mean": [0.0] * 8})
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    held = [r for r in rows if r["split"] == "heldout"]
    assert [r["step"] for r in train_rows] == [10, 14]
    assert [r["step"] for r in held] == [7, 14]
    assert {"loss", "fvu", "l0", "tokens_per_s", "lr", "dead_frac"} <= set(train_rows[0])
    assert train_rows[0]["l0"] == 4.0
    assert {"sae/fvu", "full/fvu", "sae+linear/mse", "sae+interaction/l0"} <= set(held[0])
    ckpt = tmp_path / "checkpoint"
    assert {p.name for p in ckpt.iterdir()} == {"cfg.json", "weights.safetensors", "metrics.json", "optimizer.pt"}
    meta = json.loads((ckpt / "cfg.json").read_text())
    assert meta["model_name"] == "toy-model" and meta["hook"] == "blocks.0.hook_resid_post"
    assert meta["d_in"] == 8 and meta["complete"] and meta["step"] == 14
    assert meta["normalization"] == {"mean": [0.0] * 8}
    assert "torch" in meta["provenance"]["versions"]
    loaded = load_checkpoint(tmp_path, expect_model="toy-model", expect_hook="blocks.0.hook_resid_post")
    x = data().batch(999)
    assert torch.equal(loaded.model(x).recon, res.model(x).recon)
    with pytest.raises(FisError, match="already holds a checkpoint"):
        train(cfg, data().seekable(), tmp_path, progress=False)


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = TrainConfig(**TINY, mode="joint", tokens=32 * 30)
    src = data()

    def poisoned(start):
        for i, x in enumerate(src.stream(start, 40), start=start):
            if i == 14:  # 2 held-out batches, so this is training step 12
                x = x.clone()
                x[3, 1] = float("nan")
            yield x

    with pytest.raises(FisError) as err:
        train(cfg, poisoned, tmp_path, progress=False)
    msg = str(err.value)
    assert "loss became nan at step 12" in msg and "last good checkpoint (step 10) is kept" in msg
    assert "\n" not in msg
    kept = load_checkpoint(tmp_path)
    assert kept.meta["step"] == 10 and not kept.meta["complete"]
    assert all(torch.isfinite(p).all() for p in kept.model.parameters())


def test_checkpoint_mismatch_is_one_line_error(tmp_path):
    m = JointSAE(JointArch(sae=SAEArch(d_in=8, d_sae=16, k=2), nfm=NFMArch(emb_dim=4, hidden=4)))
    save_checkpoint(tmp_path / "ck", m, model_name="SmolLM2-135M", hook="blocks.9.hook_resid_post")
    with pytest.raises(FisError, match="trained on model 'SmolLM2-135M', not 'gpt2'") as err:
        load_checkpoint(tmp_path / "ck", expect_model="gpt2")
    assert "\n" not in str(err.value)
    with pytest.raises(FisError, match="hook point 'blocks.9.hook_resid_post', not 'blocks.10.hook_resid_post'"):
        load_checkpoint(tmp_path / "ck", expect_model="SmolLM2-135M", expect_hook="blocks.10.hook_resid_post")
    with pytest.raises(FisError, match="not a checkpoint folder"):
        load_checkpoint(tmp_path)
    with pytest.raises(FisError, match="checkpoint folder not found"):
        load_checkpoint(tmp_path / "missing")
    ok = load_checkpoint(tmp_path / "ck", expect_model="SmolLM2-135M", expect_hook="blocks.9.hook_resid_post")
    assert all(torch.equal(ok.model.state_dict()[k], v) for k, v in m.state_dict().items())


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of d_sae and expansion"):
        TrainConfig(d_sae=8, expansion=2)
    with pytest.raises(ValueError, match="model, hook and corpus"):
        TrainConfig(d_sae=8, model="gpt2")
    path = tmp_path / "train.yaml"
    path.write_text("expansion: 8\nk: 32\nmode: joint\nlearning_rate: 0.001\n")
    with pytest.raises(FisError, match=r"line 4: unknown key") as err:
        load_config(TrainConfig, path)
    assert "learning_rate" in str(err.value)
    path.write_text("expansion: 8\nmode: joint\nsecondary:\n  d_sae: 64\n  k: 4\n")
    cfg = load_config(TrainConfig, path)
    assert cfg.arch(576).sae.d_sae == 4608 and cfg.secondary.k == 4


def test_joint_beats_sae_only_with_planted_interaction(tmp_path):
    src = SyntheticActivations(seed=1, interaction=3.0, p_active=0.15, batch_size=256)
    held = [src.batch(10**6 + i) for i in range(4)]
    base = dict(d_sae=32, k=8, emb_dim=16, hidden=32, lr=3e-3, warmup_steps=20, batch_size=256, tokens=256 * 300,
                eval_every=1000, checkpoint_every=1000)
    fvus = {}
    for mode in ("sae", "joint"):
        res = train(TrainConfig(**base, mode=mode), src.seekable(), tmp_path / mode, progress=False, heldout=held)
        fvus[mode] = evaluate_reconstruction(res.model, held)
    sae_only, joint = fvus["sae"]["sae"]["fvu"], fvus["joint"]
    assert joint["full"]["fvu"] < 0.93 * sae_only
    assert joint["full"]["fvu"] < 0.9 * joint["sae+linear"]["fvu"]  # the interaction path does real work


def test_evaluate_matches_pooled_fvu():
    m = JointSAE(JointArch(sae=SAEArch(d_in=8, d_sae=16, k=3)))
    xs = [data().batch(i) for i in range(3)]
    ev = evaluate_reconstruction(m, xs)
    x = torch.cat(xs)
    assert ev["sae"]["fvu"] == pytest.approx(float(fvu(x, m(x, "sae").recon.detach())), rel=1e-5)
    assert ev["sae"]["l0"] <= 3


def test_refit_decoder_lstsq():
    torch.manual_seed(0)
    sae_model = JointSAE(JointArch(sae=SAEArch(d_in=8, d_sae=16, k=3)))
    sae = sae_model.sae
    xs = [data().batch(i) for i in range(6)]
    refit = refit_decoder_lstsq(sae, xs)
    x = torch.cat(xs)
    with torch.no_grad():
        _, lat_old, rec_old = sae(x)
        _, lat_new, rec_new = refit(x)
    assert torch.equal(lat_old.indices, lat_new.indices)  # same codes: the encoder is unchanged
    torch.testing.assert_close(lat_old.values, lat_new.values, atol=1e-5, rtol=1e-5)
    assert float(fvu(x, rec_new)) < 0.9 * float(fvu(x, rec_old))
    # the same fit by numpy's least squares on the dense codes plus a constant column
    import numpy as np
    codes = torch.cat([lat_old.dense(), torch.ones(x.shape[0], 1)], 1).double().numpy()
    sol, *_ = np.linalg.lstsq(codes, x.double().numpy(), rcond=None)
    best = ((codes @ sol - x.double().numpy()) ** 2).sum()
    assert float((rec_new - x).double().square().sum()) == pytest.approx(best, rel=1e-3)
    assert not refit.normalize_decoder and sae.normalize_decoder
