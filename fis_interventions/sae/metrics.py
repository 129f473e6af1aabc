"""Reconstruction and spliced-evaluation metrics, each with a written definition and a hand-checked test.

Definitions (all on the tensors given; the caller decides the space, normally the normalised one):

- ``mse``: per token, mean over the d features of ``(x - x_hat)^2``.
- ``fvu``: fraction of variance unexplained, ``sum (x - x_hat)^2 / sum (x - mean_batch(x))^2``, where the
  mean is taken per feature over the batch (SAELens' "explained variance" is ``1 - fvu`` per token; ours is
  pooled over the batch, so it is not dominated by low-variance tokens).
- ``l0``: mean number of non-zero latents per token.
- ``kl_per_token``: ``KL(clean || spliced)`` in nats, per position.
- ``ce_loss``: cross-entropy against the TRUE next token (flaw 7: the paper scored the clean argmax).
- ``ce_loss_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean)`` and
  ``kl_score = 1 - kl_spliced / kl_zero``, as SAELens defines them (1 = perfect, 0 = as bad as zero-ablation).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from ..compat import scipy_rng
from .model import JointSAE, SparseLatents


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-token MSE: mean over the last dimension; shape ``x.shape[:-1]``."""
    return (x - x_hat).square().mean(-1)


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained over a batch [N, d] (see module docstring)."""
    x2 = x.reshape(-1, x.shape[-1])
    err = (x2 - x_hat.reshape(x2.shape)).square().sum()
    return err / (x2 - x2.mean(0)).square().sum().clamp_min(torch.finfo(x.dtype).tiny)


def l0(latents: SparseLatents | torch.Tensor) -> torch.Tensor:
    """Mean number of non-zero latents per token (sparse latents or a dense [..., d_sae] tensor)."""
    count = latents.l0() if isinstance(latents, SparseLatents) else (latents != 0).sum(-1)
    return count.float().mean()


class DeadLatentTracker:
    """Tokens since each latent last fired; a latent is dead when that exceeds a window (in tokens)."""

    def __init__(self, d_sae: int, device: torch.device | str = "cpu") -> None:
        self.since = torch.zeros(d_sae, dtype=torch.long, device=device)

    def fired(self, latents: SparseLatents) -> torch.Tensor:
        """[d_sae] bool: which latents fired in this batch. A scatter, not a boolean gather, so that the
        counters never wait for the device (a gather's output size is data-dependent: a host sync)."""
        d_sae = self.since.shape[0]
        idx = torch.where(latents.values > 0, latents.indices, d_sae).reshape(-1)
        return torch.zeros(d_sae + 1, dtype=torch.bool, device=idx.device).scatter_(0, idx, True)[:d_sae]

    def update(self, latents: SparseLatents) -> None:
        n_tokens = latents.values.reshape(-1, latents.values.shape[-1]).shape[0]
        self.since += n_tokens
        self.since.masked_fill_(self.fired(latents), 0)

    def dead(self, window: int) -> torch.Tensor:
        return self.since >= window

    def state_dict(self) -> dict:
        return {"since": self.since.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.since.copy_(state["since"])


def dead_fraction(since_fired: torch.Tensor, window: int) -> float:
    """Share of latents that have not fired in the last ``window`` tokens."""
    return float((since_fired >= window).float().mean())


def param_counts(model: JointSAE) -> dict[str, int]:
    """Number of parameters per component (sae, linear, interaction, secondary) and the total."""
    counts = {name: sum(p.numel() for p in params) for name, params in model.param_groups().items()}
    counts["total"] = sum(counts.values())
    return counts


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over positions where ``mask`` is True (all positions when ``mask`` is None)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def kl_per_token(clean_logits: torch.Tensor, spliced_logits: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(clean || spliced)`` in nats per position [batch, pos]; 0 where ``mask`` is False."""
    # float32 at least (bf16 logits are upcast); float64 over a 49k vocabulary at every position costs
    # seconds per batch for no accuracy that matters at the reported precision
    log_p = F.log_softmax(_at_least_fp32(clean_logits), dim=-1)
    log_q = F.log_softmax(_at_least_fp32(spliced_logits), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).to(clean_logits.dtype)
    return kl if mask is None else kl * mask.to(kl.dtype)


def ce_per_token(logits: torch.Tensor, tokens: torch.Tensor,
                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the TRUE next token: logits at t predict ``tokens[:, t+1]``.

    ``mask`` [batch, pos] marks real tokens (an attention mask); a prediction counts when both its position
    and the next are real. Returns ``(ce [batch, pos-1], valid [batch, pos-1])`` with 0 where not valid.
    """
    logp = F.log_softmax(_at_least_fp32(logits[:, :-1]), dim=-1)
    ce = -logp.gather(-1, tokens[:, 1:, None].long()).squeeze(-1).to(logits.dtype)
    if mask is None:
        valid = torch.ones_like(ce, dtype=torch.bool)
    else:
        valid = mask[:, :-1].bool() & mask[:, 1:].bool()
    return ce * valid.to(ce.dtype), valid


def ce_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) over valid positions."""
    ce, valid = ce_per_token(logits, tokens, mask)
    return masked_mean(ce, valid)


def ce_loss_recovered(ce_clean: float, ce_spliced: float, ce_zero: float) -> float:
    """SAELens' CE loss score: ``(ce_zero - ce_spliced) / (ce_zero - ce_clean)``."""
    return (ce_zero - ce_spliced) / (ce_zero - ce_clean)


def kl_score(kl_spliced: float, kl_zero: float) -> float:
    """SAELens' KL score: ``1 - kl_spliced / kl_zero``."""
    return 1.0 - kl_spliced / kl_zero


def bootstrap_relative_improvement(baseline: np.ndarray, method: np.ndarray, *, n_resamples: int = 2000,
                                   confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Relative improvement ``(mean(baseline) - mean(method)) / mean(baseline)`` with a bootstrap CI.

    ``baseline`` and ``method`` are per-context values (e.g. mean KL of each held-out context) on the SAME
    contexts; contexts are resampled in pairs (scipy's BCa bootstrap, numpy RNG seeded by ``seed``).
    """
    a = np.asarray(baseline, dtype=float)
    b = np.asarray(method, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError("baseline and method must be 1-D arrays of the same length >= 2")

    def rel(x, y, axis=-1):
        mx = x.mean(axis=axis)
        return (mx - y.mean(axis=axis)) / mx

    res = stats.bootstrap((a, b), rel, paired=True, vectorized=True, n_resamples=n_resamples,
                          confidence_level=confidence, method="BCa", **scipy_rng(stats.bootstrap, seed))
    return {"estimate": float(rel(a, b)), "low": float(res.confidence_interval.low),
            "high": float(res.confidence_interval.high), "n_contexts": int(a.size)}
