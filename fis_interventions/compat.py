"""Differences between the library versions pyproject allows, kept in one place (tested by ``make test-lowest``)."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np


def scipy_rng(fn: Any, seed: int) -> dict[str, np.random.Generator]:
    """The seeded generator keyword of a ``scipy.stats`` resampling function: ``rng`` from scipy 1.15 on,
    ``random_state`` before (same generator, same numbers)."""
    name = "rng" if "rng" in inspect.signature(fn).parameters else "random_state"
    return {name: np.random.default_rng(seed)}
