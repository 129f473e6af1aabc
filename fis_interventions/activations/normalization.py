"""Activation normalisation that travels with the data (paper flaw 2: z-scored training, raw evaluation).

The statistics are computed once while harvesting, saved in the shard manifest, copied into every checkpoint,
and applied/inverted by the same object everywhere (training, evaluation, splicing, clamping).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

NormKind = Literal["expected_norm", "zscore", "none"]


@dataclass
class RunningStats:
    """Streaming per-dimension mean/variance and mean L2 norm, in float64 (exact sums, order-independent)."""

    d: int
    count: int = 0
    total: torch.Tensor = field(default=None)  # type: ignore[assignment]
    total_sq: torch.Tensor = field(default=None)  # type: ignore[assignment]
    norm_sum: float = 0.0

    def __post_init__(self) -> None:
        if self.total is None:
            self.total = torch.zeros(self.d, dtype=torch.float64)
        if self.total_sq is None:
            self.total_sq = torch.zeros(self.d, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        x64 = x.detach().to("cpu", torch.float64)
        self.count += x64.shape[0]
        self.total += x64.sum(0)
        self.total_sq += (x64 * x64).sum(0)
        self.norm_sum += float(x64.norm(dim=-1).sum())

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def std(self) -> torch.Tensor:
        var = self.total_sq / max(self.count, 1) - self.mean**2
        return var.clamp_min(0).sqrt()

    def to_dict(self) -> dict[str, Any]:
        return {"d": self.d, "count": self.count, "total": self.total.tolist(), "total_sq": self.total_sq.tolist(),
                "norm_sum": self.norm_sum}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunningStats:
        return cls(d=data["d"], count=data["count"], total=torch.tensor(data["total"], dtype=torch.float64),
                   total_sq=torch.tensor(data["total_sq"], dtype=torch.float64), norm_sum=data["norm_sum"])


@dataclass
class Normalizer:
    """``apply`` maps raw activations to the SAE's input space; ``invert`` maps reconstructions back.

    - ``expected_norm`` (SAELens' scaling, default): x * scale with scale = sqrt(d) / E||x||, so the average
      input has norm sqrt(d); one scalar, the direction of every vector is kept.
    - ``zscore`` (the paper): (x - mean) / std per dimension.
    - ``none``: identity.
    """

    kind: NormKind = "expected_norm"
    scale: float = 1.0
    mean: list[float] | None = None
    std: list[float] | None = None

    @classmethod
    def from_stats(cls, stats: RunningStats, kind: NormKind = "expected_norm") -> Normalizer:
        if kind == "expected_norm":
            mean_norm = stats.norm_sum / max(stats.count, 1)
            return cls(kind, scale=float(stats.d**0.5 / mean_norm) if mean_norm > 0 else 1.0)
        if kind == "zscore":
            std = stats.std.clamp_min(1e-8)
            return cls(kind, mean=stats.mean.tolist(), std=std.tolist())
        return cls("none")

    def _vec(self, values: list[float] | None, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "expected_norm":
            return x * self.scale
        if self.kind == "zscore":
            return (x - self._vec(self.mean, x)) / self._vec(self.std, x)
        return x

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "expected_norm":
            return y / self.scale
        if self.kind == "zscore":
            return y * self._vec(self.std, y) + self._vec(self.mean, y)
        return y

    def invert_delta(self, dy: torch.Tensor) -> torch.Tensor:
        """Map a *difference* of normalised vectors back (no mean shift): used for error-term splicing."""
        if self.kind == "expected_norm":
            return dy / self.scale
        if self.kind == "zscore":
            return dy * self._vec(self.std, dy)
        return dy

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "scale": self.scale, "mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalizer:
        return cls(kind=data["kind"], scale=data.get("scale", 1.0), mean=data.get("mean"), std=data.get("std"))
