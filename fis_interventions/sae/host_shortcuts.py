"""Shortcuts that pay off only where reading a tensor's value is free: on the host (CPU).

On the CPU a few places look at a value to skip work (no dead latents: no AuxK pass; a gradient norm under the
bound: no rescale) or take the hand-written sparse backwards. On a GPU the same look would make the host wait for
the device every step, so there the work runs unconditionally, with identical results. One predicate decides,
so the GPU rehearsal (``tests/accelerator.py``) can put the CPU on the GPU's branches and test them anywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

ENABLED = True


def host_shortcuts(t: torch.Tensor) -> bool:
    """Whether work on ``t`` may read values on the host (it lives on the CPU, and shortcuts are on)."""
    return ENABLED and t.device.type == "cpu"


@contextmanager
def accelerator_branches() -> Iterator[None]:
    """Inside the block, CPU tensors take the branches a GPU takes (no value read on the host)."""
    global ENABLED
    before, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = before
