"""Least-squares decoder refit on frozen sparse codes (a baseline: how much of the error is the decoder's?)."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch

from .model import TopKSAE


@torch.no_grad()
def refit_decoder_lstsq(sae: TopKSAE, batches: Iterable[torch.Tensor], ridge: float = 1e-6) -> TopKSAE:
    """A copy of ``sae`` whose ``W_dec`` and ``b_dec`` minimise the squared error given the frozen codes.

    Solves the normal equations ``[F 1]^T [F 1] [W; b] = [F 1]^T X`` accumulated in float64 over all
    batches (hand-written because the codes are sparse and the data streamed; the d_sae x d_sae Gram matrix
    is small). A tiny ridge (relative to the mean diagonal) keeps dead latents solvable; their rows keep the
    old decoder. The encoder, including its use of ``b_dec``, is left as it was: the refit SAE encodes with
    the original encoder, so the returned SAE has ``normalize_decoder=False`` and a separate encoder shift.
    """
    d_sae, d_in = sae.d_sae, sae.d_in
    gram = torch.zeros(d_sae + 1, d_sae + 1, dtype=torch.float64)
    cross = torch.zeros(d_sae + 1, d_in, dtype=torch.float64)
    for x in batches:
        _, latents = sae.encode(x)
        codes = torch.cat([latents.dense(), torch.ones(x.shape[0], 1, dtype=x.dtype)], 1).double()
        gram += codes.T @ codes
        cross += codes.T @ x.double()
    fired = gram.diagonal()[:d_sae] > 0
    lam = ridge * float(gram.diagonal().mean())
    solution = torch.linalg.solve(gram + lam * torch.eye(d_sae + 1, dtype=torch.float64), cross)
    new = copy.deepcopy(sae)
    new.normalize_decoder = False
    w = solution[:d_sae].to(sae.W_dec.dtype)
    new.W_dec.copy_(torch.where(fired[:, None], w, sae.W_dec))
    # the encoder subtracts b_dec before encoding; keep that shift by folding the old b_dec into b_enc
    new.b_enc.copy_(sae.b_enc - sae.b_dec @ sae.W_enc + solution[d_sae].to(sae.b_enc.dtype) @ sae.W_enc)
    new.b_dec.copy_(solution[d_sae].to(sae.b_dec.dtype))
    return new
