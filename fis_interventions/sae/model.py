"""The joint SAE: a TopK SAE (identity path) plus a Neural Factorization Machine (integration path).

One :meth:`JointSAE.forward` serves training, evaluation, splicing and clamping (flaw 3 of the paper: the
analysis there recomputed the integration term with a different formula). Everything is computed from the
ACTIVE latents only: decoding and the linear part are ``embedding_bag`` sums over the top-k indices, and the
bi-interaction pooling uses ``0.5 * ((sum f_i v_i)^2 - sum (f_i v_i)^2)`` over the same k rows, so no
[batch, d_sae] dense product or pairwise matrix is ever formed on the normal path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field, PositiveInt
from torch import nn

from ..config import StrictModel
from ..errors import FisError
from .hooks import HookedModule, HookPoint
from .host_shortcuts import host_shortcuts
from .sparse_ops import CodePattern, EncoderPre, GatherPre, bi_interaction_pool, fast_backward, sparse_decode

Components = Literal["sae", "sae+linear", "sae+interaction", "full"]
COMPONENTS: tuple[str, ...] = ("sae", "sae+linear", "sae+interaction", "full")
AUXK_COEF = 1.0 / 32.0  # Gao et al. 2024, section 2.4


class NFMArch(StrictModel):
    """Shape of the integration module."""

    emb_dim: PositiveInt = 64
    hidden: PositiveInt = 64
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    linear_bias: bool = True
    top_m: PositiveInt | None = None


SAEActivation = Literal["topk", "relu", "jumprelu"]


class SAEArch(StrictModel):
    """Shape of a TopK SAE (also used for the secondary SAE on the NFM hidden layer).

    ``activation`` and ``apply_b_dec_to_input`` exist for SAEs brought from SAELens (loaded frozen, never
    trained here): ``relu`` (SAELens ``standard``) and ``jumprelu`` keep every latent above zero / its threshold,
    so their L0 varies per token and ``k`` is only an upper bound (``d_sae``).
    """

    d_in: PositiveInt
    d_sae: PositiveInt
    k: PositiveInt
    aux_k: PositiveInt | None = None
    normalize_decoder: bool = True
    activation: SAEActivation = "topk"
    apply_b_dec_to_input: bool = True


class JointArch(StrictModel):
    """Everything needed to rebuild a :class:`JointSAE` from a checkpoint (stored in ``cfg.json``)."""

    sae: SAEArch
    nfm: NFMArch | None = None
    secondary: SAEArch | None = None


@dataclass
class SparseLatents:
    """Top-k latents per token: ``values`` and ``indices`` are [batch, k]; zero values are padding."""

    values: torch.Tensor
    indices: torch.Tensor
    d_sae: int
    _pattern: CodePattern | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def pattern(self) -> CodePattern:
        """The sparsity pattern, shared by every backward pass through these codes (see :mod:`.sparse_ops`)."""
        if self._pattern is None:
            self._pattern = CodePattern(self.indices, self.d_sae)
        return self._pattern

    def dense(self) -> torch.Tensor:
        """The [batch, d_sae] tensor (for edits, tests and analysis; never on the training path)."""
        out = self.values.new_zeros(*self.values.shape[:-1], self.d_sae)
        return out.scatter(-1, self.indices, self.values)

    def l0(self) -> torch.Tensor:
        """Number of non-zero latents per token."""
        return (self.values != 0).sum(-1)

    def top(self, m: int) -> SparseLatents:
        """Keep the m largest by absolute value (absolute, so a negative clamp is not silently dropped)."""
        if m >= self.values.shape[-1]:
            return self
        _, pos = self.values.abs().topk(m, dim=-1)
        return SparseLatents(self.values.gather(-1, pos), self.indices.gather(-1, pos), self.d_sae)

    def with_dense(self, dense: torch.Tensor) -> SparseLatents:
        """Sparse form of an edited dense tensor, keeping this object's index order for unchanged entries.

        Keeping the order makes a no-op edit bit-identical (the same sums in the same order); entries that
        became non-zero outside the top-k (``set latent 17 to 5.0``) are appended, zero-padded per row.
        """
        values = dense.gather(-1, self.indices)
        extra = dense != 0
        extra = extra.scatter(-1, self.indices, False)
        n_new = int(extra.sum(-1).max()) if extra.numel() else 0
        if n_new == 0:
            return SparseLatents(values, self.indices, self.d_sae)
        _, new_idx = extra.to(dense.dtype).topk(n_new, dim=-1)
        new_vals = dense.gather(-1, new_idx) * extra.gather(-1, new_idx)
        return SparseLatents(torch.cat([values, new_vals], -1), torch.cat([self.indices, new_idx], -1),
                             self.d_sae)


class TopKSAE(HookedModule):
    """TopK SAE (Gao et al. 2024): ``x -> topk(relu(W_enc (x - b_dec) + b_enc)) -> W_dec f + b_dec``.

    ``W_dec`` is stored as [d_sae, d_in] so that a latent's decoder direction is a row and decoding is an
    ``embedding_bag`` over the active rows.
    """

    def __init__(self, d_in: int, d_sae: int, k: int, normalize_decoder: bool = True,
                 aux_k: int | None = None, activation: SAEActivation = "topk",
                 apply_b_dec_to_input: bool = True) -> None:
        super().__init__()
        if k > d_sae:
            raise FisError(f"k={k} is larger than d_sae={d_sae}", field="k", fix="use k <= d_sae")
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        self.normalize_decoder, self.aux_k = normalize_decoder, aux_k
        self.activation, self.apply_b_dec_to_input = activation, apply_b_dec_to_input
        w = torch.randn(d_sae, d_in)
        w = w / w.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w.clone())
        self.W_enc = nn.Parameter(w.T.clone().contiguous())  # tied init, as in Gao et al. / sparsify
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if activation == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae))
        self.hook_pre = HookPoint()
        self.hook_latents = HookPoint()
        self.hook_recon = HookPoint()
        self.setup_hooks()

    @classmethod
    def from_arch(cls, arch: SAEArch) -> TopKSAE:
        """Build from every field of ``arch`` (so ``TopKSAE.from_arch(a).arch == a``)."""
        return cls(arch.d_in, arch.d_sae, arch.k, arch.normalize_decoder, arch.aux_k, arch.activation,
                   arch.apply_b_dec_to_input)

    @property
    def arch(self) -> SAEArch:
        return SAEArch(d_in=self.d_in, d_sae=self.d_sae, k=self.k, aux_k=self.aux_k,
                       normalize_decoder=self.normalize_decoder, activation=self.activation,
                       apply_b_dec_to_input=self.apply_b_dec_to_input)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations. ``b_dec @ W_enc`` is subtracted separately: equal to encoding ``x - b_dec``
        but the gradient for ``b_dec`` then costs a vector-matrix product, not a batch-sized matmul."""
        return self.hook_pre(self.raw_pre_acts(x))

    def raw_pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """``addmm`` exactly as the training fast path (:class:`EncoderPre`) computes it: the bias enters the
        same fused product on both paths, so a no-op edit at ``hook_pre``/``hook_latents`` (which leaves the fast
        path) is bit-identical to the unedited pass at any thread count (``x @ W + b`` rounds differently)."""
        bias = self.b_enc if not self.apply_b_dec_to_input else self.b_enc - self.b_dec @ self.W_enc
        return torch.addmm(bias, x, self.W_enc) if x.ndim == 2 else x @ self.W_enc + bias

    def topk(self, pre: torch.Tensor) -> SparseLatents:
        """Top-k then ReLU: the same values as ReLU then top-k (ReLU is monotone) without a dense ReLU pass;
        only the indices of zero-valued padding can differ. ``sorted=True`` is measured ~2x faster on CPU."""
        if self.activation != "topk":
            return self._threshold_latents(pre)
        values, indices = pre.topk(self.k, dim=-1, sorted=True)
        return SparseLatents(torch.relu(values), indices, self.d_sae)

    def _threshold_latents(self, pre: torch.Tensor) -> SparseLatents:
        """ReLU / JumpReLU (SAELens' ``standard`` / ``jumprelu``): every latent above zero (its threshold),
        packed into as many columns as the busiest row needs; the other rows are zero-padded."""
        acts = torch.relu(pre)
        if self.activation == "jumprelu":
            acts = acts * (pre > self.threshold).to(acts.dtype)
        width = max(int((acts != 0).sum(-1).max()), 1) if acts.numel() else 1
        values, indices = acts.topk(width, dim=-1, sorted=True)
        return SparseLatents(values, indices, self.d_sae)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, SparseLatents]:
        """Pre-activations and (possibly edited) top-k latents."""
        if self._sparse_backward(x):
            return self._encode_sparse(x)
        pre = self.pre_acts(x)
        return pre, apply_sparse_hook(self.hook_latents, self.topk(pre))

    def _sparse_backward(self, x: torch.Tensor) -> bool:
        """Training fast path on CPU: same values, gradients by sparse products (no hooks may be active)."""
        return (fast_backward(x) and self.W_enc.requires_grad and self.activation == "topk"
                and not (self.hook_pre.active or self.hook_latents.active))

    def _encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, SparseLatents]:
        """The top-k values are gathered from the dense pre-activations by :class:`GatherPre`, whose backward
        is a scatter into k encoder columns per row; ``pre`` itself (for AuxK) has a sparse-aware backward
        (see :mod:`.sparse_ops`)."""
        bias = self.b_enc - self.b_dec @ self.W_enc
        pre = EncoderPre.apply(x, self.W_enc, bias)
        with torch.no_grad():
            indices = pre.topk(self.k, dim=-1, sorted=True).indices
        pattern = CodePattern(indices, self.d_sae)
        latents = SparseLatents(torch.relu(GatherPre.apply(x, self.W_enc, bias, pre.detach(), pattern)), indices,
                                self.d_sae)
        latents._pattern = pattern
        return pre, latents

    def decode(self, latents: SparseLatents, bias: bool = True) -> torch.Tensor:
        """Sparse decode from the active rows of ``W_dec``."""
        out = sparse_decode(latents.pattern, latents.values, self.W_dec)
        return out + self.b_dec if bias else out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, SparseLatents, torch.Tensor]:
        """``(pre, latents, recon)``."""
        pre, latents = self.encode(x)
        return pre, latents, self.hook_recon(self.decode(latents))

    def auxk_loss(self, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
        """AuxK loss (Gao et al. 2024): the top-``aux_k`` DEAD latents must reconstruct what is left over.

        Normalised by the residual's variance and scaled down while few latents are dead (as in sparsify);
        the caller multiplies by :data:`AUXK_COEF`. ``residual`` should be detached.
        """
        if not self.aux_k or (host_shortcuts(dead) and not bool(dead.any())):  # CPU: skip when none
            return pre.new_zeros((), dtype=torch.float32)
        # always aux_k columns: with fewer dead latents the rest are zeros of live ones, which add exactly 0, so
        # the count never has to reach the host (a sync per step on a GPU)
        n_dead = dead.sum()
        scale = (n_dead.float() / self.aux_k).clamp(max=1.0)
        masked = torch.where(dead, torch.relu(pre), torch.zeros((), dtype=pre.dtype, device=pre.device))
        values, indices = masked.topk(min(self.aux_k, self.d_sae), dim=-1, sorted=False)
        e_hat = self.decode(SparseLatents(values, indices, self.d_sae), bias=False).float()
        residual = residual.float()
        total = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
        return scale * (e_hat - residual).pow(2).sum() / total

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out the gradient component along each unit decoder row (keeps the step on the sphere)."""
        if self.normalize_decoder and self.W_dec.grad is not None:
            w, g = self.W_dec, self.W_dec.grad
            g.addcmul_(torch.linalg.vecdot(g, w).unsqueeze(-1), w, value=-1.0)  # in place, no [d_sae, d] temp

    @torch.no_grad()
    def renormalize_decoder(self) -> None:
        """Project decoder rows back to unit norm after an optimiser step."""
        if self.normalize_decoder:
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def apply_sparse_hook(point: HookPoint, latents: SparseLatents) -> SparseLatents:
    """Run a latents hook on the dense form (so an edit can set an inactive latent); free when unhooked."""
    if not point.active:
        return latents
    return latents.with_dense(point(latents.dense()))


class IntegrationNFM(HookedModule):
    """Neural Factorization Machine (He & Chua 2017) on the sparse SAE latents.

    ``linear`` is a second sparse decoder; ``bi`` is the bi-interaction pooling (the sum of all pairwise
    products ``f_i f_j v_i * v_j``) computed in O(k * emb_dim) from the active latents; ``interaction`` is the
    MLP ``emb_dim -> hidden -> ReLU -> dropout -> d_out`` applied to it.
    """

    def __init__(self, d_sae: int, d_out: int, emb_dim: int, hidden: int, dropout: float = 0.0,
                 linear_bias: bool = True, top_m: int | None = None) -> None:
        super().__init__()
        self.d_sae, self.d_out, self.top_m = d_sae, d_out, top_m
        self.W_lin = nn.Parameter(torch.randn(d_sae, d_out) * 0.01)
        self.b_lin = nn.Parameter(torch.zeros(d_out)) if linear_bias else None
        self.V = nn.Parameter(torch.randn(d_sae, emb_dim) * emb_dim**-0.5)
        self.mlp_in = nn.Linear(emb_dim, hidden)
        self.mlp_out = nn.Linear(hidden, d_out)
        nn.init.zeros_(self.mlp_out.weight)  # start as the plain SAE; the optimiser grows the interaction
        nn.init.zeros_(self.mlp_out.bias)
        self.dropout = nn.Dropout(dropout)
        self.hook_linear = HookPoint()
        self.hook_bi = HookPoint()
        self.hook_hidden = HookPoint()
        self.hook_interaction = HookPoint()
        self.setup_hooks()

    @property
    def arch(self) -> NFMArch:
        """The shape as built (read from the module, so a field lost on the way in shows up here)."""
        return NFMArch(emb_dim=self.V.shape[1], hidden=self.mlp_in.out_features, dropout=self.dropout.p,
                       linear_bias=self.b_lin is not None, top_m=self.top_m)

    def select(self, latents: SparseLatents) -> SparseLatents:
        return latents.top(self.top_m) if self.top_m else latents

    def linear(self, latents: SparseLatents) -> torch.Tensor:
        out = sparse_decode(latents.pattern, latents.values, self.W_lin)
        return self.hook_linear(out + self.b_lin if self.b_lin is not None else out)

    def bi_interaction(self, latents: SparseLatents) -> torch.Tensor:
        """``0.5 * ((sum_i f_i v_i)^2 - sum_i (f_i v_i)^2)``, elementwise over the embedding dimension."""
        return self.hook_bi(bi_interaction_pool(latents.pattern, latents.values, self.V))

    def hidden_acts(self, bi: torch.Tensor) -> torch.Tensor:
        return self.hook_hidden(torch.relu(self.mlp_in(bi)))

    def interaction_out(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.hook_interaction(self.mlp_out(self.dropout(hidden)))


@dataclass
class JointOutput:
    """Every named value of one forward pass; parts that a component setting skips are ``None``."""

    pre: torch.Tensor
    latents: SparseLatents
    sae_recon: torch.Tensor | None  # None only from a training forward with ``parts=False``
    recon: torch.Tensor
    linear: torch.Tensor | None = None
    bi: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    interaction: torch.Tensor | None = None
    secondary_latents: SparseLatents | None = None


class JointSAE(HookedModule):
    """SAE + integration module with one forward for training, evaluation, splicing and clamping.

    Hook points: ``sae.hook_pre``, ``sae.hook_latents`` (edits see a dense [batch, d_sae] tensor),
    ``sae.hook_recon``, ``nfm.hook_linear``, ``nfm.hook_bi``, ``nfm.hook_hidden``, ``nfm.hook_interaction``,
    ``hook_recon`` and, with a secondary SAE attached, ``secondary.hook_pre``/``hook_latents``/``hook_recon``.
    """

    def __init__(self, cfg: JointArch) -> None:
        super().__init__()
        self.cfg = cfg
        s = cfg.sae
        self.sae = TopKSAE.from_arch(s)
        self.nfm = None
        if cfg.nfm is not None:
            n = cfg.nfm
            self.nfm = IntegrationNFM(s.d_sae, s.d_in, n.emb_dim, n.hidden, n.dropout, n.linear_bias, n.top_m)
        self.secondary: TopKSAE | None = None
        if cfg.secondary is not None:  # every field of its arch (aux_k was dropped here: resumes lost AuxK)
            self._attach(cfg.secondary)
        self.hook_recon = HookPoint()
        self.setup_hooks()

    def attach_secondary(self, d_sae: int, k: int, aux_k: int | None = None) -> TopKSAE:
        """Add a TopK SAE on the NFM hidden layer; its latents become clampable integration features."""
        if self.nfm is None:
            raise FisError("a secondary SAE needs the integration module", field="secondary",
                           fix="use mode 'joint' or 'sequential'")
        return self._attach(SAEArch(d_in=self.nfm.mlp_in.out_features, d_sae=d_sae, k=k, aux_k=aux_k))

    def _attach(self, arch: SAEArch) -> TopKSAE:
        if self.nfm is None:
            raise FisError("a secondary SAE needs the integration module", field="secondary",
                           fix="use mode 'joint' or 'sequential'")
        if arch.d_in != self.nfm.mlp_in.out_features:
            raise FisError(f"secondary SAE d_in {arch.d_in} is not the NFM hidden size "
                           f"{self.nfm.mlp_in.out_features}", field="secondary.d_in",
                           fix="the checkpoint's cfg.json was edited or is damaged: retrain the secondary SAE")
        self.secondary = TopKSAE.from_arch(arch)
        self.cfg = self.cfg.model_copy(update={"secondary": self.secondary.arch})
        self.setup_hooks()
        return self.secondary

    def forward(self, x: torch.Tensor, components: Components = "full", edit=None, parts: bool = True) -> JointOutput:
        """Run the model; ``edit`` maps hook names to ``fn(value) -> value`` for this call only.

        ``parts=False`` lets the training fast path skip ``sae_recon`` and ``linear`` (left ``None``) when only
        ``recon`` enters the loss; every other path computes them anyway.
        """
        if components not in COMPONENTS:
            raise FisError(f"unknown components {components!r}", field="components",
                           fix=f"use one of: {', '.join(COMPONENTS)}")
        if components != "sae" and self.nfm is None:
            raise FisError(f"components {components!r} need the integration module, this is a plain SAE",
                           field="components", fix="use components='sae'")
        with self.edits(edit):
            return self._forward(x, components, parts)

    def _forward(self, x: torch.Tensor, components: str, parts: bool = True) -> JointOutput:
        if self._can_fuse(components):
            return self._forward_fused(x, components, parts)
        pre, latents, sae_recon = self.sae(x)
        out = JointOutput(pre=pre, latents=latents, sae_recon=sae_recon, recon=sae_recon)
        recon = sae_recon
        if components in ("sae+linear", "full"):
            out.linear = self.nfm.linear(self.nfm.select(latents))
            recon = recon + out.linear
        if components in ("sae+interaction", "full"):
            selected = self.nfm.select(latents)
            out.bi = self.nfm.bi_interaction(selected)
            hidden = self.nfm.hidden_acts(out.bi)
            if self.secondary is not None:
                hidden, out.secondary_latents = self._through_secondary(hidden)
            out.hidden = hidden
            out.interaction = self.nfm.interaction_out(hidden)
            recon = recon + out.interaction
        out.recon = self.hook_recon(recon)
        return out

    def _can_fuse(self, components: str) -> bool:
        return (self.training and torch.is_grad_enabled() and components in ("sae+linear", "full")
                and self.nfm.top_m is None and not any(p.active for p in self.hook_points().values()))

    def _forward_fused(self, x: torch.Tensor, components: str, parts: bool) -> JointOutput:
        """Training fast path, same values and gradients up to float rounding.

        ``sae_recon + linear = codes @ (W_dec + W_lin) + biases``: one sparse decode (and one backward, the
        expensive part on CPU) instead of two. ``sae_recon`` is then recomputed without gradient (unless
        ``parts=False``) and ``linear`` carries the gradient. (The same identity shows that, trained jointly, the
        linear part is just a free-norm correction of the unit-norm decoder: see flaw 4.)
        """
        pre, latents = self.sae.encode(x)
        bias = self.sae.b_dec + self.nfm.b_lin if self.nfm.b_lin is not None else self.sae.b_dec
        both = sparse_decode(latents.pattern, latents.values, self.sae.W_dec, self.nfm.W_lin) + bias
        out = JointOutput(pre=pre, latents=latents, sae_recon=None, recon=both)
        if parts:
            with torch.no_grad():
                out.sae_recon = self.sae.decode(latents)
            out.linear = both - out.sae_recon
        if components == "full":
            out.bi = self.nfm.bi_interaction(latents)
            out.hidden = self.nfm.hidden_acts(out.bi)
            if self.secondary is not None:
                _, out.secondary_latents = self._through_secondary(out.hidden)
            out.interaction = self.nfm.interaction_out(out.hidden)
            out.recon = both + out.interaction
        return out

    def _through_secondary(self, hidden: torch.Tensor) -> tuple[torch.Tensor, SparseLatents]:
        """Encode ``hidden``; if its latents were edited, add the change of reconstruction (error-term trick).

        ``hidden + (recon(edited) - recon(original))``: with no edit the hidden layer is returned untouched,
        so attaching a secondary SAE never changes the output by itself.
        """
        sec = self.secondary
        if not any(point.active for point in sec.hook_points().values()):
            return hidden, sec.topk(sec.raw_pre_acts(hidden))
        raw = sec.raw_pre_acts(hidden)
        base = sec.decode(sec.topk(raw))
        edited = apply_sparse_hook(sec.hook_latents, sec.topk(sec.hook_pre(raw)))
        new = sec.hook_recon(sec.decode(edited))
        return hidden + (new - base), edited

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters per component, for parameter counts and the fairness of comparisons (flaw 4)."""
        groups: dict[str, list[nn.Parameter]] = {"sae": list(self.sae.parameters())}
        if self.nfm is not None:
            lin = [self.nfm.W_lin] + ([self.nfm.b_lin] if self.nfm.b_lin is not None else [])
            groups["linear"] = lin
            groups["interaction"] = [self.nfm.V, *self.nfm.mlp_in.parameters(), *self.nfm.mlp_out.parameters()]
        if self.secondary is not None:
            groups["secondary"] = list(self.secondary.parameters())
        return groups
