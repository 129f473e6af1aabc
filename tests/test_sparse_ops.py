"""The hand-written sparse backwards (CPU training fast path) give plain autograd's gradients."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fis_interventions.sae import sparse_ops
from fis_interventions.sae.model import JointArch, JointSAE, NFMArch, SAEArch


def _codes(batch: int, d_sae: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(d_sae, generator=g)[:k] for _ in range(batch)])
    values = torch.rand(batch, k, generator=g, dtype=torch.float64)
    values[:, -1] = 0.0  # ReLU padding: zero codes must not break the sparse products
    return indices, values


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1)))
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("with_extra", [False, True])
def test_sparse_decode_gradients_equal_autograd(with_extra):
    indices, values = _codes(40, 30, 5)
    table = torch.randn(30, 7, dtype=torch.float64)
    extra = torch.randn(30, 7, dtype=torch.float64)
    args = (values, table, extra) if with_extra else (values, table)

    def fast(v, t, e=None):
        return sparse_ops._SparseDecode.apply(v, sparse_ops.CodePattern(indices, 30), t, e)

    def slow(v, t, e=None):
        return sparse_ops.bag_sum(indices, v, t if e is None else t + e)

    out_fast, g_fast = _grads(fast, *args)
    out_slow, g_slow = _grads(slow, *args)
    assert torch.equal(out_fast, out_slow)  # one forward on both paths
    for a, b in zip(g_fast, g_slow, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    if with_extra:  # both tables get the gradient, in separate storage (the decoder's is edited in place)
        assert g_fast[1].data_ptr() != g_fast[2].data_ptr()


def test_bi_pool_gradients_equal_autograd_and_pairwise_definition():
    indices, values = _codes(40, 30, 6)
    emb = torch.randn(30, 4, dtype=torch.float64)
    pattern = sparse_ops.CodePattern(indices, 30)
    out_fast, g_fast = _grads(lambda v, e: sparse_ops._BiPool.apply(v, pattern, e), values, emb)

    def pairwise(v, e):  # the definition: sum over pairs i < j of f_i f_j v_i * v_j
        fv = v.unsqueeze(-1) * e[indices]
        return sum(fv[:, i] * fv[:, j] for i, j in itertools.combinations(range(indices.shape[1]), 2))

    out_slow, g_slow = _grads(pairwise, values, emb)
    torch.testing.assert_close(out_fast, out_slow, atol=1e-12, rtol=1e-10)
    for a, b in zip(g_fast, g_slow, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("components", ["sae", "sae+linear", "full"])
def test_joint_model_fast_path_equals_autograd(monkeypatch, components):
    """The whole training forward/backward (encoder, AuxK, fused decode, bi-interaction, MLP)."""
    torch.manual_seed(0)
    m = JointSAE(JointArch(sae=SAEArch(d_in=16, d_sae=64, k=4, aux_k=8), nfm=NFMArch(emb_dim=8, hidden=8))).double()
    m.train()
    torch.nn.init.normal_(m.nfm.mlp_out.weight)  # zero at init: V would get no gradient to compare
    x = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True

    def run(fast: bool):
        monkeypatch.setattr(sparse_ops, "FAST_BACKWARD", fast)
        m.zero_grad()
        x.grad = None
        out = m(x, components)
        aux = m.sae.auxk_loss(out.pre, (x - out.recon).detach(), dead)
        ((out.recon - x).square().mean() + aux).backward()
        return out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, x.grad.clone()

    fast_out, fast, fast_x = run(True)
    slow_out, slow, slow_x = run(False)
    assert torch.equal(fast_out.latents.indices, slow_out.latents.indices)
    torch.testing.assert_close(fast_out.recon, slow_out.recon, atol=1e-13, rtol=0)
    assert fast.keys() == slow.keys() and "sae.W_enc" in fast
    for name in slow:
        torch.testing.assert_close(fast[name], slow[name], atol=1e-12, rtol=1e-10, msg=name)
    torch.testing.assert_close(fast_x, slow_x, atol=1e-12, rtol=1e-10)
    if components == "full":
        assert float(slow["nfm.V"].abs().sum()) > 0 and float(slow["nfm.W_lin"].abs().sum()) > 0


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 12), d_sae=st.integers(2, 20), k_frac=st.floats(0.0, 1.0), dim=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_sparse_backwards_equal_autograd_for_any_shape(batch, d_sae, k_frac, dim, seed):
    """Edge shapes: one row, k = 1, k = d_sae (every latent active), one embedding dimension."""
    k = max(1, round(k_frac * d_sae))
    indices, values = _codes(batch, d_sae, k, seed)
    table = torch.randn(d_sae, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    pattern = sparse_ops.CodePattern(indices, d_sae)
    for fast, slow in [(lambda v, t: sparse_ops._SparseDecode.apply(v, pattern, t, None),
                        lambda v, t: sparse_ops.bag_sum(indices, v, t)),
                       (lambda v, t: sparse_ops._BiPool.apply(v, pattern, t),
                        lambda v, t: sparse_ops.bi_pool(indices, v, t))]:
        out_fast, g_fast = _grads(fast, values, table)
        out_slow, g_slow = _grads(slow, values, table)
        assert torch.equal(out_fast, out_slow)
        for a, b in zip(g_fast, g_slow, strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
