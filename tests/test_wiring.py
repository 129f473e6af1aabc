"""Tests that see the wiring, not only the formulas: evaluation scores the true next tokens, `attach` uses the
checkpoint's own normaliser, the fused training forward equals the evaluation forward, and every pair of the
feature-organisation tests is computed from the right columns (paper flaws 2, 5 and 7)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from fis_interventions.activations import ActivationStore, ExclusionRule, Normalizer
from fis_interventions.attach import attach
from fis_interventions.evaluation import spliced_metrics
from fis_interventions.sae import JointArch, JointSAE, NFMArch, SAEArch, save_checkpoint
from fis_interventions.sae.organisation import organisation_tests
from tiny_activations import harvest_sentences

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def acts(tmp_path_factory, tiny_bridge) -> Path:
    return harvest_sentences(tmp_path_factory.mktemp("wiring"), tiny_bridge, "Line {i}: the river runs past the mill "
                             "and the old stone bridge.", 200, hook=HOOK, tokens=1500, context_length=24)


def _checkpoint(path: Path, normalizer: Normalizer, rule: ExclusionRule, nfm: bool = True) -> Path:
    torch.manual_seed(0)
    joint = JointSAE(JointArch(sae=SAEArch(d_in=64, d_sae=96, k=6),
                               nfm=NFMArch(emb_dim=8, hidden=12) if nfm else None))
    return save_checkpoint(path, joint, model_name="tiny-random", hook=HOOK,
                           normalization={**normalizer.to_dict(), "exclusion": rule.to_dict()})


def test_evaluation_ce_scores_the_true_next_tokens(acts, tiny_bridge, tmp_path):
    store = ActivationStore(acts)
    attached = attach(tiny_bridge, _checkpoint(tmp_path / "ck", store.normalizer, store.exclusion))
    tokens = store.contexts("heldout")[:3]
    pooled, _ = spliced_metrics(attached, tokens, batch_size=2)
    # independently: the bridge's own full forward, scored against tokens[t + 1] at every kept position
    logits = tiny_bridge(tokens).float()
    resid, _ = attached.split.prefix(tokens)
    keep = attached.splice.keep_mask(tokens, resid)[:, :-1]
    logp = logits[:, :-1].log_softmax(-1)
    true_ce = -logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    argmax_ce = -logp.max(-1).values
    expected = float(true_ce[keep].mean().detach())
    assert pooled["clean"]["ce"] == pytest.approx(expected, rel=1e-5)
    assert abs(float(argmax_ce[keep].mean().detach()) - expected) > 0.1, "the argmax would give another number"


def test_attach_uses_the_checkpoints_normaliser_not_the_harvests(acts, tiny_bridge, tmp_path):
    store = ActivationStore(acts)
    own = Normalizer("zscore", mean=[0.3] * 64, std=[2.5] * 64)
    assert own.to_dict() != store.normalizer.to_dict()
    attached = attach(tiny_bridge, _checkpoint(tmp_path / "ck", own, store.exclusion))
    assert attached.splice.normalizer.to_dict() == own.to_dict()
    x = torch.randn(5, 64)
    torch.testing.assert_close(attached.splice.inputs(x), (x - 0.3) / 2.5)
    assert not torch.allclose(attached.splice.inputs(x), store.normalizer.apply(x))


@pytest.mark.parametrize("secondary", [False, True])
def test_fused_training_forward_equals_evaluation_forward(secondary):
    torch.manual_seed(1)
    joint = JointSAE(JointArch(sae=SAEArch(d_in=32, d_sae=80, k=6, normalize_decoder=False),
                               nfm=NFMArch(emb_dim=8, hidden=10)))
    if secondary:
        joint.attach_secondary(24, 3)
    with torch.no_grad():  # make every path matter: a linear part and biases far from zero
        joint.nfm.W_lin.normal_(0, 0.2)
        if joint.nfm.b_lin is not None:
            joint.nfm.b_lin.normal_(0, 0.5)
        joint.sae.b_dec.normal_(0, 0.5)
    x = torch.randn(40, 32)
    joint.train()
    assert joint._can_fuse("full"), "the training path under test must be the fused one"
    fused = joint(x, "full")
    joint.eval()
    with torch.no_grad():
        plain = joint(x, "full")
    for name in ("recon", "sae_recon", "linear", "interaction", "hidden", "bi"):
        torch.testing.assert_close(getattr(fused, name).detach(), getattr(plain, name), atol=1e-5, rtol=1e-5,
                                   msg=f"{name} differs between train and eval forward")
    torch.testing.assert_close(fused.latents.dense().detach(), plain.latents.dense())


def test_flaw5_every_organisation_pair_reads_its_own_columns():
    """Planted norms: the linear norm follows the decoder norm, the embedding norm is independent. Each row
    must report exactly the rank correlation of its two columns (a swapped column would move the numbers)."""
    rng = np.random.default_rng(0)
    n = 300
    joint = JointSAE(JointArch(sae=SAEArch(d_in=6, d_sae=n, k=3, normalize_decoder=False),
                               nfm=NFMArch(emb_dim=4, hidden=5)))
    dec = rng.lognormal(size=n)
    lin = np.sqrt(dec) * np.exp(rng.normal(0, 0.1, n))
    emb = rng.lognormal(size=n)
    with torch.no_grad():
        for w, target in ((joint.sae.W_dec, np.sqrt(dec)), (joint.nfm.W_lin, lin), (joint.nfm.V, emb)):
            w.div_(w.norm(dim=-1, keepdim=True)).mul_(torch.as_tensor(target, dtype=w.dtype).unsqueeze(-1))
    table = organisation_tests(joint, n_permutations=300, seed=0)
    columns = {"decoder_sq_norm": dec, "linear_norm": lin, "embedding_norm": emb}
    assert [(r.x, r.y) for r in table.itertuples()] == [("decoder_sq_norm", "embedding_norm"),
                                                        ("decoder_sq_norm", "linear_norm"),
                                                        ("linear_norm", "embedding_norm")]
    for row in table.itertuples():
        expected = stats.spearmanr(columns[row.x], columns[row.y]).statistic
        assert row.rho == pytest.approx(expected, abs=1e-9), (row.x, row.y)
    by_pair = {(r.x, r.y): r for r in table.itertuples()}
    assert by_pair[("decoder_sq_norm", "linear_norm")].rho > 0.9
    assert by_pair[("decoder_sq_norm", "linear_norm")].p_perm < 0.01
    for pair in (("decoder_sq_norm", "embedding_norm"), ("linear_norm", "embedding_norm")):
        assert abs(by_pair[pair].rho) < 0.15 and by_pair[pair].p_perm > 0.01
