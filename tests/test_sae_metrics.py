"""Metric formulas against hand computations on tiny tensors, and the organisation statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fis_interventions.sae import JointArch, JointSAE, NFMArch, SAEArch, SparseLatents
from fis_interventions.sae.metrics import (DeadLatentTracker, bootstrap_relative_improvement, ce_loss,
                                           ce_loss_recovered, dead_fraction, fvu, kl_per_token, kl_score, l0,
                                           mse, param_counts)
from fis_interventions.sae.organisation import (circular_statistic, feature_norms, organisation_tests,
                                                rank_association)

X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
X_HAT = torch.ones(2, 2)


def test_mse_per_token():
    # token 0: (0^2 + 1^2) / 2; token 1: (2^2 + 3^2) / 2
    torch.testing.assert_close(mse(X, X_HAT), torch.tensor([0.5, 6.5]))


def test_fvu_pooled_over_batch():
    # squared error 0+1+4+9 = 14; per-dimension mean (2, 3); squared deviation 1+1+1+1 = 4
    assert float(fvu(X, X_HAT)) == pytest.approx(3.5)
    assert float(fvu(X, X)) == 0.0


def test_l0_sparse_and_dense():
    dense = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]])
    assert float(l0(dense)) == 1.5
    sparse = SparseLatents(torch.tensor([[2.0, 1.0], [3.0, 0.0]]), torch.tensor([[2, 0], [2, 1]]), 3)
    assert float(l0(sparse)) == 1.5
    assert torch.equal(sparse.dense(), dense)


def test_dead_latents_over_window():
    tracker = DeadLatentTracker(4)
    tracker.update(SparseLatents(torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.tensor([[0, 1], [2, 1]]), 4))
    assert tracker.since.tolist() == [0, 2, 0, 2]  # latent 1 had value 0: it did not fire
    tracker.update(SparseLatents(torch.tensor([[1.0]]), torch.tensor([[2]]), 4))
    assert tracker.since.tolist() == [1, 3, 0, 3]
    assert dead_fraction(tracker.since, 3) == 0.5
    assert tracker.dead(2).tolist() == [False, True, False, True]


def test_param_counts_by_hand():
    m = JointSAE(JointArch(sae=SAEArch(d_in=4, d_sae=8, k=2), nfm=NFMArch(emb_dim=3, hidden=5)))
    counts = param_counts(m)
    assert counts["sae"] == 4 * 8 * 2 + 8 + 4
    assert counts["linear"] == 8 * 4 + 4
    assert counts["interaction"] == 8 * 3 + (3 * 5 + 5) + (5 * 4 + 4)
    assert counts["total"] == 76 + 36 + 68
    m.attach_secondary(10, 2)
    assert param_counts(m)["secondary"] == 5 * 10 * 2 + 10 + 5


def test_kl_per_token_by_hand():
    clean = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
    spliced = torch.tensor([[[0.0, math.log(3.0)], [1.0, 2.0]]])
    kl = kl_per_token(clean, spliced)
    # p = (.5, .5), q = (.25, .75): .5 ln(.5/.25) + .5 ln(.5/.75) = .5 ln(4/3)
    assert float(kl[0, 0]) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert float(kl[0, 1]) == pytest.approx(0.0, abs=1e-7)
    masked = kl_per_token(clean, spliced, torch.tensor([[False, True]]))
    assert float(masked[0, 0]) == 0.0


def test_ce_against_true_next_token_not_argmax():
    tokens = torch.tensor([[0, 1, 0]])
    # position 0 predicts token 1 with p = .75; position 1 predicts token 0 with p = .1 although the
    # argmax is token 1 (scoring the argmax, as the paper did, would give -ln .9)
    logits = torch.log(torch.tensor([[[0.25, 0.75], [0.1, 0.9], [0.5, 0.5]]]))
    expect = (-math.log(0.75) - math.log(0.1)) / 2
    assert float(ce_loss(logits, tokens)) == pytest.approx(expect, rel=1e-6)
    mask = torch.tensor([[1, 1, 0]])  # last token is padding: only the first prediction counts
    assert float(ce_loss(logits, tokens, mask)) == pytest.approx(-math.log(0.75), rel=1e-6)


def test_saelens_scores():
    assert ce_loss_recovered(ce_clean=2.0, ce_spliced=3.0, ce_zero=5.0) == pytest.approx(2 / 3)
    assert ce_loss_recovered(2.0, 2.0, 5.0) == 1.0 and ce_loss_recovered(2.0, 5.0, 5.0) == 0.0
    assert kl_score(kl_spliced=0.5, kl_zero=2.0) == 0.75


def test_bootstrap_relative_improvement():
    rng = np.random.default_rng(1)
    base = 2.0 + rng.normal(0, 0.2, 60)
    method = 0.75 * base + rng.normal(0, 0.05, 60)
    res = bootstrap_relative_improvement(base, method, n_resamples=1000, seed=3)
    assert res["estimate"] == pytest.approx(1 - method.mean() / base.mean())
    assert res["low"] < res["estimate"] < res["high"]
    assert 0.2 < res["low"] and res["high"] < 0.3
    assert res == bootstrap_relative_improvement(base, method, n_resamples=1000, seed=3)
    with pytest.raises(ValueError):
        bootstrap_relative_improvement(base, method[:10])


def test_circular_statistic_is_negative_for_independent_norms():
    rng = np.random.default_rng(0)
    d, n = rng.lognormal(size=400), rng.lognormal(size=400)
    assert circular_statistic(d, n) < -0.5  # the paper's statistic "finds" organisation in pure noise
    res = rank_association(d, n, n_permutations=500, seed=0)
    assert abs(res["rho"]) < 0.15 and res["p_perm"] > 0.05
    assert res["null_low"] < res["rho"] < res["null_high"]
    dep = rank_association(d, d + rng.normal(0, 0.3, 400), n_permutations=500, seed=0)
    assert dep["rho"] > 0.5 and dep["p_perm"] < 0.01


def test_feature_norms_and_tests():
    torch.manual_seed(0)
    m = JointSAE(JointArch(sae=SAEArch(d_in=6, d_sae=30, k=3, normalize_decoder=False),
                           nfm=NFMArch(emb_dim=4, hidden=5)))
    with torch.no_grad():
        m.sae.W_dec.mul_(torch.rand(30, 1) + 0.5)
    norms = feature_norms(m)
    assert len(norms) == 30
    np.testing.assert_allclose(norms[["share_decoder", "share_linear", "share_interaction"]].sum(axis=1), 1.0)
    np.testing.assert_allclose(norms["embedding_norm"], m.nfm.V.norm(dim=-1).detach().numpy(), rtol=1e-6)
    table = organisation_tests(m, n_permutations=200)
    assert list(table["x"]) == ["decoder_sq_norm", "decoder_sq_norm", "linear_norm"]
    assert table["p_perm"].between(0, 1).all()
    # unit-norm decoders: nothing to rank, reported as NaN rather than a fake number
    unit = JointSAE(JointArch(sae=SAEArch(d_in=6, d_sae=30, k=3), nfm=NFMArch(emb_dim=4, hidden=5)))
    assert math.isnan(organisation_tests(unit, n_permutations=50)["rho"].iloc[0])
