"""Which token positions are left out of harvesting, and left untouched when a reconstruction is spliced back.

On SmolLM2 the ``<|endoftext|>`` positions have residual norms around 14,000 and a few position-1 tokens
6,000-29,000 (attention sinks), against a typical ~150. Left in, they dominate the summed squared norm and an
SAE learns nothing else. The rule: special tokens (BOS/EOS/pad and every other special id) plus any position
whose norm exceeds ``norm_multiple`` times the median norm measured on a calibration batch. The *same* rule
object (with the same frozen threshold) is saved in the manifest and checkpoint and used at splice time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ExclusionRule:
    special_ids: list[int]
    norm_multiple: float | None = 10.0
    median_norm: float | None = None  # measured on the calibration batch; frozen afterwards
    # the special ids as a tensor per (device, dtype): built and copied to a GPU once, not once per batch
    _ids: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def norm_threshold(self) -> float | None:
        if self.norm_multiple is None or self.median_norm is None:
            return None
        return self.norm_multiple * self.median_norm

    def special_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        key = (str(tokens.device), tokens.dtype, tuple(self.special_ids))
        ids = self._ids.get(key)
        if ids is None:
            ids = self._ids[key] = torch.tensor(self.special_ids, dtype=tokens.dtype, device=tokens.device)
        return torch.isin(tokens, ids)

    def calibrate(self, tokens: torch.Tensor, acts: torch.Tensor) -> None:
        """Freeze the median norm of the non-special positions of a first batch."""
        norms = acts.float().norm(dim=-1)[~self.special_mask(tokens)]
        self.median_norm = float(norms.median()) if norms.numel() else None

    def keep_mask(self, tokens: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        """True where a position is kept (harvested / reconstructed); same shape as ``tokens``."""
        keep = ~self.special_mask(tokens)
        threshold = self.norm_threshold
        if threshold is not None:
            keep &= acts.float().norm(dim=-1) <= threshold
        return keep

    def to_dict(self) -> dict[str, Any]:
        return {"special_ids": self.special_ids, "norm_multiple": self.norm_multiple,
                "median_norm": self.median_norm, "norm_threshold": self.norm_threshold,
                "description": "special tokens, plus positions whose residual norm exceeds norm_multiple x the "
                               "median norm of a calibration batch"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExclusionRule:
        return cls(special_ids=list(data["special_ids"]), norm_multiple=data.get("norm_multiple"),
                   median_norm=data.get("median_norm"))

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, norm_multiple: float | None = 10.0) -> ExclusionRule:
        ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        ids |= {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}
        return cls(special_ids=sorted(ids), norm_multiple=norm_multiple)
