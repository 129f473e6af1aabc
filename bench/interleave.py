"""Ratios that hold on a shared machine: legs timed in turns on the same inputs, the median ratio and its spread.

Why: on a machine shared with other jobs, timing leg A and then leg B measures the neighbours' load as much as
the code (README once showed 4.67x where a quiet run gives 2.7x). Here the legs take turns (A, B, A, B, ...),
each round's ratio is computed from the two legs of that round, and the benchmark reports the median of those
ratios with its inter-quartile range and min-max, next to the load average while it ran. Every benchmark
under ``bench/`` that prints a ratio uses this module (one copy of the rule).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def load_average() -> str:
    """The 1-minute load average and the core count, e.g. ``load 3.1 on 2 cores`` (printed beside a ratio)."""
    try:
        one = os.getloadavg()[0]
    except OSError:  # pragma: no cover - platforms without getloadavg
        return "load n/a"
    return f"load {one:.1f} on {os.cpu_count()} cores"


def interleave(legs: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
               sync: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter
               ) -> dict[str, list[float]]:
    """Seconds of every leg per round, the legs called in turns (A, B, A, B, ...) on the same inputs.

    ``warmup`` untimed rounds first (first-call costs); ``sync`` (e.g. ``torch.cuda.synchronize``) runs before
    and after each timed call so that a timer reads work done, not work queued. ``clock``: wall time by
    default; ``time.process_time`` (this process's CPU seconds) for single-threaded legs on a loaded machine,
    where the time other jobs hold the cores would otherwise count.
    """
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    for _ in range(warmup):
        for fn in legs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in legs}
    for _ in range(rounds):
        for name, fn in legs.items():
            if sync:
                sync()
            start = clock()
            fn()
            if sync:
                sync()
            times[name].append(clock() - start)
    return times


@dataclass(frozen=True)
class Ratio:
    """Per-round ratios ``numerator / denominator`` of two interleaved legs, summarised."""

    median: float
    q1: float
    q3: float
    low: float
    high: float
    n: int
    load: str

    def __str__(self) -> str:
        return (f"{self.median:.2f}x (median of {self.n} interleaved rounds; IQR {self.q1:.2f}-{self.q3:.2f}, "
                f"min-max {self.low:.2f}-{self.high:.2f}; {self.load})")


def ratio(numerator: list[float], denominator: list[float]) -> Ratio:
    """The median and spread of ``numerator[i] / denominator[i]`` over rounds i (same round = same load)."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("two legs of the same, non-zero number of rounds are needed")
    per_round = sorted(a / b for a, b in zip(numerator, denominator, strict=True))
    if len(per_round) >= 2:
        q1, _, q3 = statistics.quantiles(per_round, n=4, method="inclusive")
    else:
        q1 = q3 = per_round[0]
    return Ratio(statistics.median(per_round), q1, q3, per_round[0], per_round[-1], len(per_round), load_average())
