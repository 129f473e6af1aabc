"""The device the ``gpu``-marked tests check, and how they count host syncs.

Normally that device is CUDA, and the tests skip without one. ``FIS_TEST_ACCEL=cpu`` is the rehearsal: the
CPU stands in for the GPU, so every line of the GPU script runs (and is fixed) on any machine before the first
session with a GPU spends its device time on it. A rehearsal's CPU-vs-"GPU" comparisons compare the CPU with
itself, so they prove the script, not the GPU; its sync counts come from a proxy (below), not from CUDA.
"""

from __future__ import annotations

import contextlib
import os
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from fis_interventions.sae.host_shortcuts import accelerator_branches

ACCEL = os.environ.get("FIS_TEST_ACCEL", "cuda")
REHEARSAL = ACCEL != "cuda"
AVAILABLE = REHEARSAL or torch.cuda.is_available()
needs_accel = pytest.mark.skipif(not AVAILABLE, reason="needs a CUDA device (FIS_TEST_ACCEL=cpu rehearses on the CPU)")
gpu = [pytest.mark.gpu, needs_accel]



@contextmanager
def on_accelerator() -> Iterator[None]:
    """Work meant for the accelerator: in a rehearsal the CPU takes the GPU's branches (no CPU shortcuts)."""
    with accelerator_branches() if REHEARSAL else contextlib.nullcontext():
        yield


# what makes the host wait for a GPU: values read on the host, copies to the host, data-dependent output sizes
# (torch's own sync check flags the same calls). Copies from the host to the device cannot be told from no-op
# ``.to`` calls when the "device" is the CPU itself, so the proxy leaves them out; it also counts ``.numpy()`` of
# a tensor already copied to the host: an approximation of CUDA's count.
_READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"}
_DATA_DEPENDENT = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive"}


def _is_bool_index(index: object) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _syncs(name: str, args: tuple, kwargs: dict) -> bool:
    if name in _READS or name in _DATA_DEPENDENT:
        return True
    if name == "__getitem__":
        return len(args) > 1 and _is_bool_index(args[1])
    if name == "repeat_interleave":
        return "output_size" not in kwargs
    if name == "to":  # an explicit copy to the host
        target = kwargs.get("device") or next((a for a in args[1:] if isinstance(a, str | torch.device)), None)
        return target is not None and torch.device(target).type == "cpu" and ACCEL != "cpu"
    return False


class _SyncProxy(TorchFunctionMode):
    """Counts, on the CPU, the calls that would make the host wait for a GPU."""

    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if _syncs(name, args, kwargs):
            caller = next((f for f in reversed(traceback.extract_stack()[:-1]) if "torch" not in f.filename), None)
            where = f"{Path(caller.filename).name}:{caller.lineno}" if caller else "?"
            self.seen.append(f"{name} at {where}")
        return func(*args, **kwargs)


@contextmanager
def count_syncs() -> Iterator[list[str]]:
    """The synchronising calls inside the block: CUDA's own count (``set_sync_debug_mode("warn")`` warns once
    per call) on a GPU, the proxy's in a rehearsal."""
    seen: list[str] = []
    if REHEARSAL:
        with _SyncProxy(seen):
            yield seen
        return
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
        finally:
            torch.cuda.set_sync_debug_mode("default")
    seen.extend(str(w.message) for w in caught if "synchroniz" in str(w.message).lower())
