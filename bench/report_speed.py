"""Wall time of ``fis report`` on a newcomer-size battery (issue 23, item 5): 7 features, 4 clamps, 24 items x 4
cells = 96 stimulus rows per test (x prompts), 2 contrast readouts, written as a synthetic run folder in the
battery's exact store format (``fis_interventions.reports.synthetic``; no model needed).

Legs (each a fresh ``fis report`` process, interleaved when both run):

- ``serial``: ``FIS_REPORT_WORKERS=1`` (every test fitted in one process, as before this change, but with
  fits reused);
- ``parallel``: the default (one worker per core, ``FIS_REPORT_WORKERS`` unset).

Prints each leg's median beside the old figure from the issue (3.5 min for a 7-feature battery on a loaded
2-core machine, before fits were reused or parallel) and the load average before and after; with ``--check``
it also asserts that both legs wrote identical ``tables/*.csv`` (same numbers whatever the worker count).

    python bench/report_speed.py [--repeats 1] [--prompts 1] [--items 24] [--check]
"""

from __future__ import annotations

import argparse
import filecmp
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fis_interventions.reports.synthetic import write_synthetic_run  # noqa: E402

OLD_SECONDS = 210.0  # issue 23: "fis report of a 7-feature battery took 3.5 min" (2 loaded cores)
FEATURES = [  # (id, role, main effect of A, planted interaction): 3 top, 2 random controls, 2 linear controls
    (12, "top", 0.3, 1.0), (40, "top", 0.2, 0.0), (77, "top", 0.0, 0.5),
    (345, "random_control", 0.0, 0.0), (346, "random_control", 0.0, 0.0),
    (7, "linear_control", 0.8, 0.0), (8, "linear_control", 0.5, 0.0)]
MATCHED = {345: 12, 346: 12}  # matched controls of feature 12 (the feature-vs-controls test runs)
VALUES = (-4.0, 0.0, 1.0, 4.0)  # 4 clamps, one of them the no-op


def children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes so far (fis report and its workers)."""
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def run_report(run: Path, out: Path, workers: str | None) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FIS_REPORT_WORKERS", None)
    if workers is not None:
        env["FIS_REPORT_WORKERS"] = workers
    t0, c0 = time.perf_counter(), children_cpu()
    subprocess.run([sys.executable, "-m", "fis_interventions.cli", "report", str(run), "--out", str(out),
                    "--no-cards", "--overwrite"], check=True, capture_output=True, env=env, cwd=ROOT)
    return time.perf_counter() - t0, children_cpu() - c0


def same_tables(a: Path, b: Path) -> list[str]:
    """Names of the CSV tables that differ between two report folders (empty: identical numbers)."""
    names = sorted({p.name for p in (a / "tables").glob("*.csv")} | {p.name for p in (b / "tables").glob("*.csv")})
    return [n for n in names if not ((a / "tables" / n).is_file() and (b / "tables" / n).is_file()
                                     and filecmp.cmp(a / "tables" / n, b / "tables" / n, shallow=False))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--items", type=int, default=24)
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--legs", default="parallel,serial", help="comma list of: parallel, serial")
    ap.add_argument("--check", action="store_true", help="assert the legs write identical tables")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fis-report-speed-") as tmp:
        run = write_synthetic_run(Path(tmp) / "run", n_items=args.items, n_prompts=args.prompts, values=VALUES,
                                  features=FEATURES, matched=MATCHED)
        legs = {"parallel": None, "serial": "1"}
        chosen = [leg for leg in args.legs.split(",") if leg in legs]
        print(f"battery: {len(FEATURES)} features, {len(VALUES)} clamps, {args.items} items x 4 cells x "
              f"{args.prompts} prompt(s) = {args.items * 4 * args.prompts} rows per test; {os.cpu_count()} cores")
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        times: dict[str, list[float]] = {leg: [] for leg in chosen}
        cpu: dict[str, list[float]] = {leg: [] for leg in chosen}
        for r in range(args.repeats):
            for leg in chosen:
                wall, used = run_report(run, Path(tmp) / f"report_{leg}", legs[leg])
                times[leg].append(wall)
                cpu[leg].append(used)
                print(f"  repeat {r + 1} {leg:8s} wall {wall:6.1f} s, CPU {used:6.1f} s "
                      f"(load {os.getloadavg()[0]:.2f})")
        for leg in chosen:
            med = statistics.median(times[leg])
            print(f"fis report [{leg:8s}] median wall {med:6.1f} s, CPU {statistics.median(cpu[leg]):6.1f} s | "
                  f"old {OLD_SECONDS:.0f} s wall (issue 23) | old/new {OLD_SECONDS / med:.1f}x")
        print("(wall time on a machine shared by other jobs grows with the load average: compare CPU seconds, "
              "or run on an idle machine; the target is < 60 s wall on 2 idle cores)")
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if args.check and len(chosen) == 2:
            diff = same_tables(Path(tmp) / "report_parallel", Path(tmp) / "report_serial")
            print("tables identical across legs" if not diff else f"TABLES DIFFER: {diff}")
            if diff:
                raise SystemExit(1)


if __name__ == "__main__":
    main()
