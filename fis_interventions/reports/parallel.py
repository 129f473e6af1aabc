"""Run a report's independent jobs (one 2x2 test, one figure) on several cores.

Why: a battery report fits one mixed model (and, for near-significant tests, a power simulation) per design x
feature x clamp x readout, and draws two figures per feature; these are independent and deterministic, so
running them in worker processes changes no number (``bench/report_speed.py --check`` compares the tables of a
serial and a parallel run). Workers are forked (Linux) so they start in milliseconds with the parent's imports;
elsewhere, and with one worker, jobs run in this process. ``FIS_REPORT_WORKERS`` sets the count (default: the
cores this process may use).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

ENV = "FIS_REPORT_WORKERS"

# The running pmap's function and jobs: forked workers inherit them, so only a job's index crosses the pipe
# (a local function or a monkeypatched one cannot be pickled, but it can be inherited).
_CURRENT: tuple[Callable[..., Any], Sequence[tuple[Any, ...]]] | None = None


def report_workers() -> int:
    """Worker processes for a report: ``$FIS_REPORT_WORKERS`` or the cores available to this process."""
    raw = os.environ.get(ENV, "").strip()
    if raw:
        try:
            return max(1, int(raw))
        except ValueError:
            from ..errors import FisError

            raise FisError(f"{ENV}={raw!r} is not a whole number", field=ENV,
                           fix=f"set {ENV} to the number of worker processes, e.g. 2, or unset it") from None
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def pmap(fn: Callable[..., T], jobs: Sequence[tuple[Any, ...]], workers: int | None = None) -> list[T]:
    """``[fn(*job) for job in jobs]``, in order, on up to ``workers`` forked processes."""
    workers = report_workers() if workers is None else workers
    workers = min(workers, len(jobs))
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [fn(*job) for job in jobs]
    global _CURRENT
    previous, _CURRENT = _CURRENT, (fn, jobs)
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = [pool.submit(_run_job, i) for i in range(len(jobs))]  # one per task: costs differ widely
            return [f.result() for f in futures]
    finally:
        _CURRENT = previous


def _run_job(index: int) -> Any:
    """Run job ``index`` of the pmap this worker was forked from."""
    assert _CURRENT is not None, "a report worker was started outside pmap"
    fn, jobs = _CURRENT
    return fn(*jobs[index])
