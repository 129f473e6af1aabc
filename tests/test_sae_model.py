"""Joint SAE model: shapes, sparse maths against brute force, components, hook edits, decoder norm, AuxK."""

from __future__ import annotations

import itertools

import pytest
import torch

from fis_interventions.errors import FisError
from fis_interventions.sae import JointArch, JointSAE, NFMArch, SAEArch, SparseLatents, TrainConfig
from fis_interventions.sae.metrics import DeadLatentTracker
from fis_interventions.sae.model import IntegrationNFM
from fis_interventions.sae.synthetic import SyntheticActivations
from fis_interventions.sae.trainers import SAETrainer

D_IN, D_SAE, K = 12, 40, 5


def make(secondary: bool = True, top_m: int | None = None) -> JointSAE:
    torch.manual_seed(0)
    m = JointSAE(JointArch(sae=SAEArch(d_in=D_IN, d_sae=D_SAE, k=K),
                           nfm=NFMArch(emb_dim=6, hidden=10, top_m=top_m)))
    with torch.no_grad():  # make every part non-trivial (mlp_out starts at zero by design)
        m.nfm.mlp_out.weight.normal_()
        m.nfm.mlp_out.bias.normal_()
        m.sae.b_dec.normal_()
    if secondary:
        m.attach_secondary(16, 3)
    return m.eval()


def brute_bi(dense: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """sum_{i<j} f_i f_j (v_i * v_j), by explicit pairs."""
    out = torch.zeros(dense.shape[0], V.shape[1], dtype=torch.float64)
    for b in range(dense.shape[0]):
        for i, j in itertools.combinations(range(dense.shape[1]), 2):
            out[b] += dense[b, i].double() * dense[b, j].double() * V[i].double() * V[j].double()
    return out


def test_shapes_and_components():
    m = make()
    x = torch.randn(7, D_IN)
    full = m(x)
    assert full.recon.shape == full.sae_recon.shape == full.linear.shape == full.interaction.shape == (7, D_IN)
    assert full.latents.values.shape == full.latents.indices.shape == (7, K)
    assert full.latents.dense().shape == (7, D_SAE)
    assert full.bi.shape == (7, 6) and full.hidden.shape == (7, 10)
    assert full.secondary_latents.values.shape == (7, 3)
    torch.testing.assert_close(full.recon, full.sae_recon + full.linear + full.interaction)
    sae = m(x, "sae")
    assert sae.linear is None and sae.interaction is None and torch.equal(sae.recon, full.sae_recon)
    lin = m(x, "sae+linear")
    assert lin.interaction is None and torch.equal(lin.recon, full.sae_recon + full.linear)
    inter = m(x, "sae+interaction")
    assert inter.linear is None and torch.equal(inter.recon, full.sae_recon + full.interaction)
    with pytest.raises(FisError, match="unknown components"):
        m(x, "linear")
    plain = JointSAE(JointArch(sae=SAEArch(d_in=D_IN, d_sae=D_SAE, k=K)))
    with pytest.raises(FisError, match="plain SAE"):
        plain(x, "full")


def test_sparse_decode_equals_dense_decode():
    m = make()
    x = torch.randn(9, D_IN)
    out = m(x)
    dense = out.latents.dense()
    assert int((dense != 0).sum(-1).max()) <= K
    torch.testing.assert_close(out.sae_recon, dense @ m.sae.W_dec + m.sae.b_dec)
    torch.testing.assert_close(out.linear, dense @ m.nfm.W_lin + m.nfm.b_lin)
    # encoder: the b_dec refactoring equals encoding x - b_dec
    torch.testing.assert_close(out.pre, (x - m.sae.b_dec) @ m.sae.W_enc + m.sae.b_enc, atol=1e-5, rtol=1e-5)
    expect_vals = torch.relu(out.pre).topk(K).values.sort(-1).values
    torch.testing.assert_close(out.latents.values.sort(-1).values, expect_vals)


def test_bi_interaction_equals_pairwise_sum():
    m = make()
    x = torch.randn(4, D_IN)
    out = m(x)
    expect = brute_bi(out.latents.dense(), m.nfm.V)
    torch.testing.assert_close(out.bi.double(), expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.hidden, torch.relu(m.nfm.mlp_in(out.bi)))


def test_top_m_restricts_to_largest_latents():
    nfm = IntegrationNFM(8, 3, emb_dim=4, hidden=5, top_m=2)
    lat = SparseLatents(torch.tensor([[0.5, 3.0, 1.0, 2.0]]), torch.tensor([[1, 4, 6, 7]]), 8)
    bi = nfm.bi_interaction(nfm.select(lat))
    dense = torch.zeros(1, 8)
    dense[0, 4], dense[0, 7] = 3.0, 2.0  # only the top 2 by value
    torch.testing.assert_close(bi.double(), brute_bi(dense, nfm.V), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nfm.linear(nfm.select(lat)), dense @ nfm.W_lin + nfm.b_lin)


@pytest.mark.parametrize("name", ["sae.hook_pre", "sae.hook_latents", "sae.hook_recon", "nfm.hook_linear",
                                  "nfm.hook_bi", "nfm.hook_hidden", "nfm.hook_interaction", "hook_recon",
                                  "secondary.hook_pre", "secondary.hook_latents", "secondary.hook_recon"])
def test_noop_edit_is_bit_identical(name):
    m = make()
    x = torch.randn(6, D_IN)
    clean = m(x)
    seen = []

    def identity(v):
        seen.append(v.shape)
        return v.clone()

    edited = m(x, edit={name: identity})
    assert seen, f"hook {name} was never called"
    assert torch.equal(edited.recon, clean.recon)
    assert torch.equal(edited.hidden, clean.hidden)


def test_setting_an_inactive_latent():
    m = make(secondary=False)
    x = torch.randn(3, D_IN)
    clean = m(x)
    dense = clean.latents.dense()
    latent = [i for i in range(D_SAE) if not (dense[:, i] != 0).any()][0]  # inactive in every row

    def set_latent(v):
        v = v.clone()
        v[:, latent] = 5.0
        return v

    with m.edits({"sae.hook_latents": set_latent}):
        out = m(x)
    assert not m.hook_points()["sae.hook_latents"].active  # removed after the block
    assert out.latents.values.shape[1] == K + 1
    torch.testing.assert_close(out.sae_recon, clean.sae_recon + 5.0 * m.sae.W_dec[latent])
    torch.testing.assert_close(out.linear, clean.linear + 5.0 * m.nfm.W_lin[latent])
    new_dense = dense.clone()
    new_dense[:, latent] = 5.0
    torch.testing.assert_close(out.bi.double(), brute_bi(new_dense, m.nfm.V), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.interaction, m.nfm.mlp_out(torch.relu(m.nfm.mlp_in(out.bi))))
    assert not torch.allclose(out.interaction, clean.interaction)


def test_secondary_edit_uses_error_term():
    m = make()
    x = torch.randn(4, D_IN)
    clean = m(x)
    sec = m.secondary

    def bump(v):
        v = v.clone()
        v[:, 2] += 1.5
        return v

    out = m(x, edit={"secondary.hook_latents": bump})
    torch.testing.assert_close(out.hidden, clean.hidden + 1.5 * sec.W_dec[2])
    torch.testing.assert_close(out.interaction, m.nfm.mlp_out(out.hidden))
    torch.testing.assert_close(out.sae_recon, clean.sae_recon)
    torch.testing.assert_close(out.linear, clean.linear)


def test_hidden_edit_and_observer_and_errors():
    m = make(secondary=False)
    x = torch.randn(4, D_IN)
    cache = {}
    out = m(x, edit={"nfm.hook_hidden": lambda h: torch.zeros_like(h),
                     "nfm.hook_bi": lambda v: cache.setdefault("bi", v.detach())})
    torch.testing.assert_close(out.interaction, m.nfm.mlp_out.bias.expand(4, D_IN))
    assert torch.equal(cache["bi"], out.bi)
    with pytest.raises(FisError, match="unknown hook point 'nfm.hook_nope'"):
        m(x, edit={"nfm.hook_nope": lambda v: v})
    with pytest.raises(FisError, match="expected a tensor of shape"):
        m(x, edit={"nfm.hook_hidden": lambda h: h[:, :3]})


def test_decoder_rows_stay_unit_norm():
    cfg = TrainConfig(d_sae=32, k=4, mode="sae", lr=5e-2, warmup_steps=0, batch_size=64, tokens=64 * 5)
    torch.manual_seed(0)
    m = JointSAE(cfg.arch(8))
    trainer = SAETrainer(m, cfg, cfg.steps())
    before = m.sae.W_dec.detach().clone()
    for step in range(5):
        trainer.update(step, torch.randn(64, 8) * 3)
    assert not torch.allclose(before, m.sae.W_dec)
    torch.testing.assert_close(m.sae.W_dec.norm(dim=-1), torch.ones(32), atol=1e-6, rtol=0)
    # the parallel gradient component is removed before the step
    m.sae.W_dec.grad = torch.randn_like(m.sae.W_dec)
    m.sae.remove_parallel_grad()
    torch.testing.assert_close((m.sae.W_dec.grad * m.sae.W_dec).sum(-1), torch.zeros(32), atol=1e-5, rtol=0)


def _dead_after_training(aux_k: int | None) -> float:
    data = SyntheticActivations(seed=2, d_in=16, n_features=32, p_active=0.15, interaction=0.0, batch_size=128)
    cfg = TrainConfig(d_sae=64, k=4, aux_k=aux_k, dead_tokens=128 * 5, mode="sae", lr=3e-3, warmup_steps=0,
                      batch_size=128, tokens=128 * 120)
    torch.manual_seed(0)
    m = JointSAE(cfg.arch(16))
    with torch.no_grad():  # half the latents start out losing every top-k competition: dead from the start
        m.sae.W_enc[:, 32:] *= 0.01
    trainer = SAETrainer(m, cfg, cfg.steps())
    for step in range(cfg.steps()):
        trainer.update(step, data.batch(step))
    tracker = DeadLatentTracker(64)
    with torch.no_grad():
        for i in range(10):
            tracker.update(m(data.batch(9000 + i), "sae").latents)
    return float(tracker.dead(128 * 10).float().mean())


def test_auxk_revives_dead_latents():
    without, with_aux = _dead_after_training(None), _dead_after_training(16)
    assert without >= 0.45  # nothing brings the suppressed half back
    assert with_aux < without - 0.2
