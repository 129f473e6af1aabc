"""Products with top-k sparse codes, and backwards that exploit the sparsity (the CPU training fast path).

Every forward here is ONE function used on every path (training, evaluation, splicing, clamping), so the
values are identical wherever they are computed (flaw 3 of the paper). What differs on the fast path is the
backward: autograd would form dense [batch, d_sae] or [batch, k, dim] intermediates although only k entries
per row are non-zero, so the autograd functions below compute the same gradients with CSR products of
O(batch * k * dim). They are hand-written because no library offers these fused backwards for CPU (sparsify
writes Triton kernels for GPU). ``tests/test_sparse_ops.py`` checks every gradient against plain autograd.

The fast path is used on CPU (``host_shortcuts``) in float32/float64 when gradients are on; elsewhere (CUDA,
bf16, inference) plain autograd runs on the same forward. ``FAST_BACKWARD = False`` turns it off (tests, debugging).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .host_shortcuts import host_shortcuts

FAST_BACKWARD = True


def fast_backward(x: torch.Tensor) -> bool:
    """Whether the hand-written sparse backwards apply to a computation on ``x`` (a 2-D batch)."""
    return (FAST_BACKWARD and torch.is_grad_enabled() and host_shortcuts(x)
            and x.dtype in (torch.float32, torch.float64) and x.ndim == 2
            and not torch.is_autocast_enabled("cpu"))  # bf16 autocast: plain autograd on the same forward


@contextmanager
def _quiet_csr() -> Iterator[None]:
    """The 2-D float CSR products used here are stable; silence only torch's 'CSR support is in beta' notice."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message=".*sampled_addmm.*")
        yield


class CodePattern:
    """Where the non-zero codes are: ``indices`` [batch, k] into ``n_cols`` columns, k entries per row.

    One forward's backward passes (encoder, decoder, linear part, bi-interaction) all multiply by the same
    sparsity pattern with different values, so its transpose (a stable sort of the indices, the costly part of
    a CSR transpose) is built once here and shared: measured 64 ms -> 39 ms per transposed product plus one
    12 ms build at batch 4096, d_sae 9216, one thread.
    """

    def __init__(self, indices: torch.Tensor, n_cols: int) -> None:
        self.indices, self.n_cols = indices, n_cols
        self._crow: torch.Tensor | None = None
        self._transpose: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def rows(self, values: torch.Tensor) -> torch.Tensor:
        """The [batch, n_cols] CSR matrix with ``values[b, j]`` at column ``indices[b, j]``."""
        b, k = self.indices.shape
        if self._crow is None:
            self._crow = torch.arange(0, b * k + 1, k, device=self.indices.device)
        return torch.sparse_csr_tensor(self._crow, self.indices.reshape(-1), values.reshape(-1).contiguous(),
                                       (b, self.n_cols), check_invariants=False)

    def cols(self, values: torch.Tensor) -> torch.Tensor:
        """The transpose of :meth:`rows`, [n_cols, batch], as a CSR matrix (for ``codes.T @ dense``)."""
        b, k = self.indices.shape
        if self._transpose is None:
            flat = self.indices.reshape(-1)
            perm = flat.argsort(stable=True)
            crow = flat.new_zeros(self.n_cols + 1)
            torch.cumsum(torch.bincount(flat, minlength=self.n_cols), 0, out=crow[1:])
            self._transpose = (perm, crow, perm // k)
        perm, crow, col = self._transpose
        return torch.sparse_csr_tensor(crow, col, values.reshape(-1)[perm], (self.n_cols, b), check_invariants=False)

    def rowdots(self, grad: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``out[b, j] = <grad[b], table[indices[b, j]]>`` without gathering the [batch, k, dim] rows."""
        ones = self.rows(torch.ones(self.indices.shape, dtype=grad.dtype, device=grad.device))
        return torch.sparse.sampled_addmm(ones, grad, table.t(), beta=0.0).values().reshape(self.indices.shape)


# --------------------------------------------------------------------------- decoding

def bag_sum(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``sum_j weights[b, j] * table[indices[b, j]]`` for each row b, without a dense [batch, rows] tensor."""
    shape = indices.shape
    # under bf16 autocast the codes come out of a bf16 matmul while the table is an fp32 master weight: the
    # weights follow the table (embedding_bag needs one dtype), so decoding sums in fp32
    out = F.embedding_bag(indices.reshape(-1, shape[-1]), table,
                          per_sample_weights=weights.reshape(-1, shape[-1]).to(table.dtype), mode="sum")
    return out.reshape(*shape[:-1], table.shape[-1])


class _SparseDecode(torch.autograd.Function):
    """``bag_sum(indices, values, W + W_extra)`` with a backward of two CSR products.

    With ``W_extra`` (the NFM's linear part, which reads the same codes) both tables receive the same gradient,
    computed once: the joint model decodes and differentiates once, like the SAE alone.
    """

    @staticmethod
    def forward(ctx, values, pattern, table, extra):
        both = table if extra is None else table + extra
        ctx.save_for_backward(values, both)
        ctx.pattern = pattern
        return bag_sum(pattern.indices, values, both)

    @staticmethod
    def backward(ctx, grad):
        values, both = ctx.saved_tensors
        grad = grad.contiguous()
        with _quiet_csr():
            g_values = ctx.pattern.rowdots(grad, both) if ctx.needs_input_grad[0] else None
            g_table = None
            if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
                g_table = ctx.pattern.cols(values) @ grad
        g_w = g_table if ctx.needs_input_grad[2] else None
        g_extra = None
        if ctx.needs_input_grad[3]:  # a copy: the decoder's gradient is edited in place before the step
            g_extra = g_table.clone() if g_w is not None else g_table
        return g_values, None, g_w, g_extra


def sparse_decode(pattern: CodePattern, values: torch.Tensor, table: torch.Tensor,
                  extra: torch.Tensor | None = None) -> torch.Tensor:
    """Decode top-k codes through ``table`` (+ ``extra``, same shape), sparse backward where it applies."""
    if fast_backward(values):
        return _SparseDecode.apply(values, pattern, table, extra)
    return bag_sum(pattern.indices, values, table if extra is None else table + extra)


# --------------------------------------------------------------------------- bi-interaction pooling

def bi_pool(indices: torch.Tensor, values: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """Bi-interaction pooling ``0.5 * ((sum_i f_i v_i)^2 - sum_i f_i^2 v_i^2)`` over the active latents.

    Equal to the sum over pairs ``i < j`` of ``f_i f_j (v_i * v_j)`` (He & Chua 2017), computed with two
    sparse bags in O(k * emb_dim) per row: no pairwise matrix and no [batch, k, emb_dim] tensor.
    """
    return _bi_parts(indices, values, emb)[1]


def _bi_parts(indices: torch.Tensor, values: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, bi)``: the pooled sum ``s = sum_i f_i v_i`` (kept for the backward) and the pooling."""
    s = bag_sum(indices, values, emb)
    q = bag_sum(indices, values.square(), emb.square())
    return s, 0.5 * (s.square() - q)


class _BiPool(torch.autograd.Function):
    """:func:`bi_pool` with the backward written out: for ``fv_i = f_i v_i`` and ``s = sum_i fv_i``,
    ``d bi / d fv_i = s - fv_i``, so ``grad f_i = <g*s, v_i> - f_i <g, v_i^2>`` and
    ``grad v_i = sum over uses of f_i (g*s) - v_i * sum over uses of f_i^2 g`` (two CSR products)."""

    @staticmethod
    def forward(ctx, values, pattern, emb):
        s, bi = _bi_parts(pattern.indices, values, emb)
        ctx.save_for_backward(values, emb, s)
        ctx.pattern = pattern
        return bi

    @staticmethod
    def backward(ctx, grad):
        values, emb, s = ctx.saved_tensors
        pattern, grad = ctx.pattern, grad.contiguous()
        gs = grad * s
        g_values = g_emb = None
        with _quiet_csr():
            if ctx.needs_input_grad[0]:
                g_values = pattern.rowdots(gs, emb) - values * pattern.rowdots(grad, emb.square())
            if ctx.needs_input_grad[2]:
                g_emb = torch.addcmul(pattern.cols(values) @ gs, emb, pattern.cols(values.square()) @ grad,
                                      value=-1.0)
        return g_values, None, g_emb


def bi_interaction_pool(pattern: CodePattern, values: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """:func:`bi_pool`, with the sparse backward where it applies (same forward either way)."""
    if fast_backward(values):
        return _BiPool.apply(values, pattern, emb)
    return bi_pool(pattern.indices, values, emb)


# --------------------------------------------------------------------------- encoder

def _encoder_grads(x: torch.Tensor, w_enc: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor | None,
                   needs: tuple[bool, ...]):
    """Gradients of ``pre = x @ w_enc + bias`` from a SPARSE ``grad_pre``: ``rows`` is it as a CSR [batch, d_sae]
    matrix, ``cols`` its transpose (``None`` when ``w_enc`` needs no gradient).

    Autograd would form the dense ``x.T @ grad_pre`` (a second full encoder matmul) although only k entries per
    row are non-zero: the CSR product costs O(batch * k * d_in) (as in sparsify's fused encoder). Returns
    (grad_x, grad_w_enc, grad_bias), ``None`` where not needed.
    """
    gx = rows @ w_enc.t() if needs[0] else None
    # the [d_sae, d] product is the fast one (measured); transpose it back contiguous for the optimiser
    gw = (cols @ x).t().contiguous() if needs[1] else None
    gb = w_enc.new_zeros(w_enc.shape[1]).index_add_(0, rows.col_indices(), rows.values()) if needs[2] else None
    return gx, gw, gb


class EncoderPre(torch.autograd.Function):
    """``x @ w_enc + bias`` whose backward expects a mostly-zero ``grad_pre`` (only AuxK's top-k reaches it)."""

    @staticmethod
    def forward(ctx, x, w_enc, bias):
        ctx.save_for_backward(x, w_enc)
        return torch.addmm(bias, x, w_enc)

    @staticmethod
    def backward(ctx, grad):
        x, w_enc = ctx.saved_tensors
        with _quiet_csr():
            g = grad.to_sparse_csr()
            return _encoder_grads(x, w_enc, g, g.t(), ctx.needs_input_grad)


class GatherPre(torch.autograd.Function):
    """``pre[b, indices[b, j]]`` for an already computed ``pre``, differentiable in (x, w_enc, bias) with a
    sparse backward: the top-k values touch k encoder columns per row, so their gradient is a scatter."""

    @staticmethod
    def forward(ctx, x, w_enc, bias, pre, pattern):
        ctx.save_for_backward(x, w_enc)
        ctx.pattern = pattern
        return pre.gather(-1, pattern.indices)

    @staticmethod
    def backward(ctx, grad):
        x, w_enc = ctx.saved_tensors
        pattern, needs = ctx.pattern, ctx.needs_input_grad
        with _quiet_csr():
            cols = pattern.cols(grad) if needs[1] else None
            return (*_encoder_grads(x, w_enc, pattern.rows(grad), cols, needs[:3]), None, None)
