"""Synthetic activations with known structure, for tests and benchmarks (never for results).

``x = sum_i a_i d_i + sum_(i,j) a_i a_j u_ij + noise``: sparse non-negative combinations of random unit
directions plus a planted PAIRWISE interaction term, which an SAE with few latents cannot express but the
NFM's bi-interaction pooling can.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch


class SyntheticActivations:
    """Deterministic, seekable stream: batch ``i`` depends only on ``(seed, i)``."""

    def __init__(self, d_in: int = 32, n_features: int = 32, p_active: float = 0.2, n_pairs: int = 16,
                 interaction: float = 1.5, noise: float = 0.0, batch_size: int = 256, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.d_in, self.batch_size, self.seed = d_in, batch_size, seed
        self.p_active, self.noise = p_active, noise
        self.dirs = torch.nn.functional.normalize(torch.randn(n_features, d_in, generator=g), dim=-1)
        flat = torch.randperm(n_features * n_features, generator=g)
        pairs = torch.stack([flat // n_features, flat % n_features], -1)
        self.pairs = pairs[pairs[:, 0] < pairs[:, 1]][:n_pairs]
        self.pair_dirs = interaction * torch.nn.functional.normalize(torch.randn(len(self.pairs), d_in,
                                                                                 generator=g), dim=-1)

    def batch(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 1)
        n = self.dirs.shape[0]
        active = torch.rand(self.batch_size, n, generator=g) < self.p_active
        amp = active * (0.5 + torch.rand(self.batch_size, n, generator=g))
        x = amp @ self.dirs
        prod = amp[:, self.pairs[:, 0]] * amp[:, self.pairs[:, 1]]
        x = x + prod @ self.pair_dirs
        if self.noise:
            x = x + self.noise * torch.randn(self.batch_size, self.d_in, generator=g)
        return x

    def stream(self, start: int = 0, stop: int | None = None) -> Iterator[torch.Tensor]:
        i = start
        while stop is None or i < stop:
            yield self.batch(i)
            i += 1

    def seekable(self, stop: int | None = None) -> Callable[[int], Iterator[torch.Tensor]]:
        """A ``start -> iterator`` callable, the form ``train`` accepts for seeking on resume."""
        return lambda start: self.stream(start, stop)
