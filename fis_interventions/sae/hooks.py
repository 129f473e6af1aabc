"""Named hook points: every intermediate value of the joint SAE has a stable dotted name.

A small equivalent of ``transformer_lens.hook_points.HookPoint`` (importing TransformerLens costs seconds, and
we need only "read or replace this value"). A hook is ``fn(value) -> value | None``: returning ``None`` keeps
the value (an observer), returning a tensor replaces it and everything downstream is recomputed from it. The
same names serve harvest, splice and clamp, so an intervention is always "this value at this named point".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import FisError

HookFn = Callable[[torch.Tensor], "torch.Tensor | None"]


class HookPoint(nn.Module):
    """Identity module that applies the hook functions registered on it, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.name = ""
        self._fns: list[HookFn] = []

    @property
    def active(self) -> bool:
        """Whether any function is registered (lets callers skip work, e.g. densifying sparse latents)."""
        return bool(self._fns)

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        for fn in self._fns:
            out = fn(value)
            if out is not None:
                if not isinstance(out, torch.Tensor) or out.shape != value.shape:
                    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise FisError(f"the edit returned {got}, expected a tensor of shape {tuple(value.shape)}",
                                   field=self.name, fix="return a tensor shaped like the value, or None")
                value = out
        return value


class HookedModule(nn.Module):
    """Base for modules with hook points: names them after their module path, and applies edits."""

    def setup_hooks(self) -> None:
        """Give every :class:`HookPoint` its dotted name; call at the end of ``__init__`` and after attaching."""
        for name, mod in self.named_modules():
            if isinstance(mod, HookPoint):
                mod.name = name

    def hook_points(self) -> dict[str, HookPoint]:
        """All hook points by name."""
        return {name: mod for name, mod in self.named_modules() if isinstance(mod, HookPoint)}

    @contextmanager
    def edits(self, fns: Mapping[str, HookFn] | None) -> Iterator[None]:
        """Within the block, ``fns[name](value)`` replaces (or observes) the value at each named point."""
        if not fns:
            yield
            return
        points = self.hook_points()
        unknown = [name for name in fns if name not in points]
        if unknown:
            raise FisError(f"unknown hook point {unknown[0]!r}", field="edits",
                           fix=f"use one of: {', '.join(sorted(points))}")
        added = []
        try:
            for name, fn in fns.items():
                points[name]._fns.append(fn)
                added.append((points[name], fn))
            yield
        finally:
            for point, fn in added:
                point._fns.remove(fn)
