"""Feature organisation: does a latent's identity-path weight predict its integration-path weight? (flaw 5)

Why the paper's statistic was circular: it correlated a latent's decoder norm ``d_i`` with a ratio such as
``n_i / (d_i + n_i)`` (the share of the latent's weight in the integration path), and the two shares sum to 1.
Because ``d_i`` sits in the denominator of the ratio, the correlation is strongly negative even when ``d_i``
and ``n_i`` are independent random numbers (:func:`circular_statistic` shows it; a test checks it). Here we
correlate quantities that are SEPARATE parameters (decoder row norm vs. interaction embedding norm
``||V_i||``, vs. linear-part norm), by Spearman rank correlation, and compare each with its own shuffled
baseline (permutation test: pairings shuffled), so the null is "no association", not "zero".
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy import stats

from ..compat import scipy_rng
from .model import JointSAE


@torch.no_grad()
def feature_norms(model: JointSAE) -> pd.DataFrame:
    """Per SAE latent: decoder squared norm, linear/interaction norms, and descriptive weight shares.

    The shares (``share_linear``, ``share_interaction``) divide squared norms by their sum over the three
    paths; they are descriptive only (and sum to 1 with ``share_decoder`` by construction: never correlate
    them with each other or with their own terms).
    """
    if model.nfm is None:
        raise ValueError("feature organisation needs a model with an integration module")
    dec = model.sae.W_dec.double().square().sum(-1)
    lin = model.nfm.W_lin.double().square().sum(-1)
    emb = model.nfm.V.double().square().sum(-1)
    total = dec + lin + emb
    return pd.DataFrame({
        "latent": np.arange(dec.numel()),
        "decoder_sq_norm": dec.cpu().numpy(),
        "linear_norm": lin.sqrt().cpu().numpy(),
        "embedding_norm": emb.sqrt().cpu().numpy(),
        "share_decoder": (dec / total).cpu().numpy(),
        "share_linear": (lin / total).cpu().numpy(),
        "share_interaction": (emb / total).cpu().numpy(),
    })


def rank_association(x: np.ndarray, y: np.ndarray, *, n_permutations: int = 2000,
                     seed: int = 0) -> dict[str, float]:
    """Spearman rho between x and y with a permutation p-value and the shuffled baseline's 95% range."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if _constant(x) or _constant(y):
        # e.g. unit-norm decoders: every decoder norm is 1 (up to rounding), so there is nothing to rank
        return {"rho": float("nan"), "p_perm": float("nan"), "null_low": float("nan"),
                "null_high": float("nan"), "n": int(x.size)}

    def rho(a, b, axis=-1):
        ra = stats.rankdata(a, axis=axis)
        rb = stats.rankdata(b, axis=axis)
        ra = ra - ra.mean(axis=axis, keepdims=True)
        rb = rb - rb.mean(axis=axis, keepdims=True)
        return (ra * rb).sum(axis=axis) / np.sqrt((ra**2).sum(axis=axis) * (rb**2).sum(axis=axis))

    res = stats.permutation_test((x, y), rho, permutation_type="pairings", vectorized=True,
                                 n_resamples=n_permutations, **scipy_rng(stats.permutation_test, seed))
    low, high = np.quantile(res.null_distribution, [0.025, 0.975])
    return {"rho": float(res.statistic), "p_perm": float(res.pvalue), "null_low": float(low),
            "null_high": float(high), "n": int(x.size)}


def _constant(v: np.ndarray) -> bool:
    """Constant up to float rounding: ranking rounding noise would give a meaningless correlation."""
    return bool(np.ptp(v) <= 1e-5 * max(float(np.abs(v).max()), 1e-30))


def organisation_tests(model: JointSAE, alive: torch.Tensor | None = None, *, n_permutations: int = 2000,
                       seed: int = 0) -> pd.DataFrame:
    """Rank associations between separately parameterised per-latent norms (alive latents only if given)."""
    norms = feature_norms(model)
    if alive is not None:
        norms = norms[alive.cpu().numpy().astype(bool)]
    pairs = [("decoder_sq_norm", "embedding_norm"), ("decoder_sq_norm", "linear_norm"),
             ("linear_norm", "embedding_norm")]
    rows = []
    for a, b in pairs:
        rows.append({"x": a, "y": b, **rank_association(norms[a].to_numpy(), norms[b].to_numpy(),
                                                        n_permutations=n_permutations, seed=seed)})
    return pd.DataFrame(rows)


def circular_statistic(decoder_norm: np.ndarray, integration_norm: np.ndarray) -> float:
    """The paper's kind of statistic, kept only to document its flaw: Spearman(d, n / (d + n)).

    It is strongly negative for independent inputs, because the ratio contains ``d``.
    """
    d = np.asarray(decoder_norm, dtype=float)
    n = np.asarray(integration_norm, dtype=float)
    return float(stats.spearmanr(d, n / (d + n)).statistic)
