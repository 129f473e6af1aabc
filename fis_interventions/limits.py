"""Size limits checked before allocation: sequences against the model's context length.

A sequence longer than the model's context has positions without an embedding (an index error deep in the
model) or, with rotary models, runs at memory that grows with the square of its length (stimuli of ~4,000
tokens on a 512-token model ran at 13 GB). The rule everywhere: refuse, naming what is too long; never
truncate silently (a truncated stimulus would lose its readout position).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import FisError


def model_context(bridge: Any) -> int | None:
    """The model's context length in tokens (None when the model does not say)."""
    n = getattr(getattr(bridge, "cfg", None), "n_ctx", None)
    return int(n) if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def check_context_length(bridge: Any, length: int, *, what: str = "context_length",
                         source: str | None = None) -> None:
    """A harvest's ``context_length`` must fit the model."""
    limit = model_context(bridge)
    if limit is not None and length > limit:
        raise FisError(f"{what} {length:,} is longer than the model's context of {limit:,} tokens", source=source,
                       field=what, fix=f"use at most {limit:,} tokens")


def check_stimuli_fit(bridge: Any, lengths: Sequence[int], labels: Sequence[str], *, source: str | None) -> None:
    """Every stimulus row (BOS + stimulus + prompt, and any tokens appended to score a split word) must fit
    the model's context; the first that does not is named."""
    limit = model_context(bridge)
    if limit is None:
        return
    for n, label in zip(lengths, labels, strict=True):
        if n > limit:
            raise FisError(f"{label} is {n:,} tokens with BOS and prompt, longer than the model's context of "
                           f"{limit:,} tokens", source=source, field="items",
                           fix="shorten the stimulus or prompt (fis refuses rather than truncates: a cut stimulus "
                               "would lose its readout position)")
