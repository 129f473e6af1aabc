"""The flaws of the paper's public code (listed in the project's paper notes) made impossible here: one test per
flaw."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fis_interventions.activations import ActivationStore, ExclusionRule, Normalizer, harvest
from fis_interventions.attach import attach
from fis_interventions.errors import FisError
from fis_interventions.sae import JointArch, JointSAE, NFMArch, SAEArch, SparseLatents, save_checkpoint
from fis_interventions.sae.metrics import ce_loss, kl_per_token
from fis_interventions.splice import JointSplice, SplitModel
from tiny_activations import harvest_sentences

HOOK = "blocks.1.hook_resid_post"


class _Identity(torch.nn.Module):
    """A 'perfect' joint model in normalised space: recon == input."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, components="full", edit=None):
        return type("Out", (), {"recon": x})()


@pytest.fixture(scope="module")
def acts(tmp_path_factory, tiny_bridge) -> Path:
    return harvest_sentences(tmp_path_factory.mktemp("flaws"), tiny_bridge, "The {i}th example sentence mentions "
                             "rivers, maps and music.", 200, hook=HOOK, tokens=2000, context_length=32,
                             normalization="zscore")


def _kl(split, resid, state, edited) -> float:
    """KL of the spliced model's next-token distribution, evaluated in float64 from the float32 logits.

    A perfect reconstruction still moves the residual by float32 rounding (normalise then invert: ~1 ulp), so
    the logits differ by ~1e-6 and the true KL is ~1e-12; evaluated in float32 the KL itself carries ~1e-8 of
    rounding noise, whose size depends on the thread count (it read 2.6e-8 on a loaded machine). In float64
    the 1e-8 bound holds with four orders of margin, and the off-by-one splice (> 1e-3) is unaffected."""
    return float(kl_per_token(split.suffix(resid, state).double(), split.suffix(edited, state).double()).mean())


def test_flaw1_harvest_and_splice_use_the_same_hook(acts, tiny_bridge, tmp_path):
    """A checkpoint is spliced where it was harvested; the off-by-one the paper made changes the model."""
    store = ActivationStore(acts)
    joint = JointSAE(JointArch(sae=SAEArch(d_in=64, d_sae=64, k=4), nfm=None))
    ckpt = save_checkpoint(tmp_path / "ck", joint, model_name="tiny-random", hook=HOOK,
                           normalization={**store.normalizer.to_dict(), "exclusion": store.exclusion.to_dict()})
    attached = attach(tiny_bridge, ckpt)
    assert attached.split.hook.layer == 1 and attached.split.hook.canonical == "blocks.1.hook_out"
    tokens = store.contexts("heldout")[:2]
    # a perfect reconstruction of layer 1 spliced at layer 1 is invisible ...
    split = SplitModel(tiny_bridge, HOOK)
    resid, state = split.prefix(tokens)
    splice = JointSplice(_Identity(), store.normalizer, store.exclusion)
    same = splice.reconstruct(resid, splice.keep_mask(tokens, resid))
    assert _kl(split, resid, state, same) < 1e-8
    # ... while the layer-1 activations written into layer 2's output (the paper's off-by-one) are not
    later = SplitModel(tiny_bridge, "blocks.2.hook_resid_post")
    resid2, state2 = later.prefix(tokens)
    assert _kl(later, resid2, state2, resid) > 1e-3
    # and evaluation refuses activations from another hook point
    from fis_interventions.evaluation import evaluate

    other = tmp_path / "acts2"
    harvest(bridge=tiny_bridge, model="tiny-random", hook="blocks.2.hook_resid_post",
            corpus=[str(Path(acts).parent / "c.txt")], out=other, tokens=500, context_length=32, progress=False)
    with pytest.raises(FisError, match="harvested at the checkpoint's hook"):
        evaluate(ckpt, other, bridge=tiny_bridge, progress=False)


def test_flaw2_normalisation_is_saved_applied_and_inverted(acts, tiny_bridge):
    """z-scored training space: splicing inverts the scaling; forgetting to invert would break the model."""
    store = ActivationStore(acts)
    assert store.manifest["normalization"]["kind"] == "zscore"
    split = SplitModel(tiny_bridge, HOOK)
    tokens = store.contexts("heldout")[:2]
    resid, state = split.prefix(tokens)
    good = JointSplice(_Identity(), store.normalizer, store.exclusion)
    keep = good.keep_mask(tokens, resid)
    assert _kl(split, resid, state, good.reconstruct(resid, keep)) < 1e-8

    class NoInverse(Normalizer):
        def invert(self, y):
            return y

    broken = JointSplice(_Identity(), NoInverse.from_dict(store.manifest["normalization"]), store.exclusion)
    assert _kl(split, resid, state, broken.reconstruct(resid, keep)) > 1e-3


def test_flaw3_one_forward_computes_the_bi_interaction_everywhere():
    """The interaction is the sum of pairwise products f_i f_j v_i*v_j (training AND analysis), not sum f_i v_i."""
    torch.manual_seed(0)
    joint = JointSAE(JointArch(sae=SAEArch(d_in=8, d_sae=16, k=4), nfm=NFMArch(emb_dim=5, hidden=6)))
    values = torch.rand(3, 4)
    indices = torch.stack([torch.randperm(16)[:4] for _ in range(3)])
    lat = SparseLatents(values, indices, 16)
    bi = joint.nfm.bi_interaction(lat)
    V = joint.nfm.V.detach()
    brute = torch.zeros(3, 5)
    for r in range(3):
        for i in range(4):
            for j in range(i + 1, 4):
                brute[r] += values[r, i] * values[r, j] * V[indices[r, i]] * V[indices[r, j]]
    assert torch.allclose(bi, brute, atol=1e-6)
    linear_sum = (values.unsqueeze(-1) * V[indices]).sum(1)
    assert not torch.allclose(bi, linear_sum, atol=1e-3)
    # the value an analysis reads at nfm.hook_bi is the one training uses: same forward, observed by a hook
    seen = {}
    x = torch.randn(3, 8)
    out = joint(x, "full", edit={"nfm.hook_bi": lambda v: seen.update(bi=v.detach().clone())})
    lat_x = out.latents
    assert torch.allclose(seen["bi"], joint.nfm.bi_interaction(joint.nfm.select(lat_x)))


def test_flaw7_cross_entropy_is_against_the_true_next_token():
    """CE scores the true next token, not the argmax of the clean logits."""
    tokens = torch.tensor([[0, 2, 1]])
    logits = torch.full((1, 3, 4), 0.0)
    logits[0, :, 3] = 5.0  # the argmax is always token 3, never the true next token
    expected = -torch.log_softmax(logits[0, 0], -1)[2] - torch.log_softmax(logits[0, 1], -1)[1]
    assert float(ce_loss(logits, tokens)) == pytest.approx(float(expected) / 2, rel=1e-6)
    argmax_ce = -torch.log_softmax(logits[0, 0], -1)[3]
    assert float(ce_loss(logits, tokens)) > float(argmax_ce) + 1


def test_checkpoint_for_another_model_is_refused(acts, tiny_bridge, tmp_path):
    joint = JointSAE(JointArch(sae=SAEArch(d_in=64, d_sae=64, k=4), nfm=None))
    rule = ExclusionRule.for_tokenizer(tiny_bridge.tokenizer)
    ckpt = save_checkpoint(tmp_path / "ck", joint, model_name="smollm2-135m", hook=HOOK,
                           normalization={**Normalizer().to_dict(), "exclusion": rule.to_dict()})
    with pytest.raises(FisError, match="trained on model 'smollm2-135m'"):
        attach(tiny_bridge, ckpt)
