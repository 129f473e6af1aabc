"""CPU time of the primary LMM (`fis stats` default: maximal uncorrelated, Satterthwaite df) against lme4.

R is not installed here: lme4 + lmerTest times are the ones stated in issue 24 (measured by its author on the
same kind of machine), stored in :data:`R_REFERENCE` and printed as such. fis is measured in this run, as
process CPU time of `fis_interventions.stats.lmm_2x2` (repeats interleaved across the designs; median shown).

    python bench/stats_speed.py                 # both designs, 3 repeats
    python bench/stats_speed.py --only crossed --repeats 1
    python bench/stats_speed.py --old-leg [--old-rev 6cba802]  # also the old code's fit, in turns (subprocess)
    python bench/stats_speed.py --startup [--old-rev 6cba802]   # `fis stats` start-up, new vs old code

``--startup`` times fresh processes of ``fis stats --help`` and of a small fit (``tests/golden/factorial_items.csv``,
240 rows, ``--item``: ANOVA, by-item ANOVA, maximal LMM simplified once with its likelihood-ratio test), each with
this checkout's code and with ``--old-rev``'s (exported by ``git archive`` to a temporary folder), in turns;
it prints the median wall and CPU (user + sys) seconds of each leg and the median old/new ratio, and the floor: a
process that only imports the third-party packages a fit needs (typer with its pydantic adapters, pandas,
scipy.optimize, which brings scipy.linalg, .sparse and .special).

Designs (simulated with by-item and by-prompt random slopes, seed 0):
* ``one``: one grouping factor, 80,000 rows (2,000 items x 4 cells x 10 observations);
* ``crossed``: 600 items crossed with 24 prompts (random from 5 levels), every item in every cell under
  4 of the prompts (9,600 rows), maximal uncorrelated slopes for both factors;
* ``crossed-correlated``: the same data, ``--random correlated``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core, as lme4 runs; idle BLAS threads would bill spin time as CPU

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

# lme4 1.1 + lmerTest (Satterthwaite) CPU seconds, from issue 24's text (not measured here: no R).
R_REFERENCE = {"one": 22.0, "crossed": 4.3, "crossed-correlated": 12.0}
R_SOURCE = ("issue 24: lme4+lmerTest 4.3 s crossed/600 items, 12 s correlated; 22 s for 84,667 rows, "
            "one factor")


def one_factor(seed: int = 0, items: int = 2000, reps: int = 10) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    it = np.repeat(np.arange(items), 4 * reps)
    cell = np.tile(np.repeat(np.arange(4), reps), items)
    xa, xb = np.where(cell >= 2, 0.5, -0.5), np.where(cell % 2 == 1, 0.5, -0.5)
    u = rng.normal(size=(items, 4)) * [1.0, 0.5, 0.4, 0.3]
    y = (0.3 * xa + 0.2 * xb + 0.1 * xa * xb + u[it, 0] + u[it, 1] * xa + u[it, 2] * xb
         + u[it, 3] * xa * xb + rng.normal(size=it.size))
    return pd.DataFrame({"item": it, "A": np.where(xa > 0, "a2", "a1"), "B": np.where(xb > 0, "b2", "b1"),
                         "y": y})


def crossed(seed: int = 0, items: int = 600, prompts: int = 24, per_item: int = 4) -> pd.DataFrame:
    """The crossed benchmark design (items x prompts, by-item and by-prompt slopes): tests/synthetic_designs.py,
    which the tests fit too."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from synthetic_designs import crossed_design

    return crossed_design(seed, items, prompts, per_item)


from fis_interventions.stats import lmm_2x2  # noqa: E402  (imported before timing: R's times exclude loading lme4)


def fit(name: str, data: pd.DataFrame) -> tuple[float, dict]:
    random = "correlated" if name == "crossed-correlated" else "uncorrelated"
    prompt = "prompt" if name.startswith("crossed") else None
    start = time.process_time()
    res = lmm_2x2(data, "y", "A", "B", "item", extra_random=prompt, random=random)
    cpu = time.process_time() - start
    return cpu, {"structure": res.structure, "loglik": res.loglik, "df_AB": float(res.fixed["df"].iloc[3])}


ROOT = Path(__file__).resolve().parent.parent
SMALL_FIT = ["stats", str(ROOT / "tests" / "golden" / "factorial_items.csv"), "--dv", "logit_shift",
             "--factor", "formality", "--factor", "emotion", "--item", "item"]


def _run_cli(code_root: Path, argv: list[str]) -> tuple[float, float]:
    """Wall and CPU (user + sys) seconds of ``python -m fis_interventions.cli ARGV`` importing ``code_root``'s
    package (run from there: ``-m`` puts the working folder first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fis_interventions.cli", *argv], check=True, capture_output=True,
                   cwd=code_root, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


FLOOR = "import typer, typer._adapters, pandas, scipy.optimize"  # third-party imports a fit cannot skip


def _run_floor() -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", FLOOR], check=True, capture_output=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _export(rev: str, into: Path) -> None:
    """``rev``'s package (``git archive``) into ``into``, for an old leg run in a subprocess."""
    archive = subprocess.run(["git", "archive", rev, "fis_interventions"], check=True, cwd=ROOT,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)


def _old_fit(code_root: Path, name: str, new_info: dict) -> float:
    """CPU seconds of the old code's fit of ``name`` (a subprocess importing ``code_root``'s package; the
    data are the same seeded simulation). Its logLik must equal the new fit's (to 1e-4)."""
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", name], check=True,
                         capture_output=True, text=True, cwd=code_root, env=env).stdout
    res = json.loads(out.strip().splitlines()[-1])
    if abs(res["loglik"] - new_info["loglik"]) > 1e-4:
        print(f"warning: {name}: old logLik {res['loglik']:.6f} != new {new_info['loglik']:.6f}")
    return float(res["cpu"])


def startup(old_rev: str, repeats: int) -> None:
    """``fis stats --help`` and a small fit in fresh processes, this checkout against ``old_rev``, in turns."""
    with tempfile.TemporaryDirectory() as tmp:
        _export(old_rev, Path(tmp))
        legs = {"fis stats --help": ["stats", "--help"], "fis stats small fit (240 rows, --item)": SMALL_FIT}
        for argv in legs.values():  # warm the file cache (and compile both copies) once
            _run_cli(ROOT, argv), _run_cli(Path(tmp), argv)
        print(f"load average at start {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores); old = {old_rev}")
        for name, argv in legs.items():
            new, old = [], []
            for _ in range(repeats):
                new.append(_run_cli(ROOT, argv))
                old.append(_run_cli(Path(tmp), argv))
            med = {k: [statistics.median(t[i] for t in v) for i in (0, 1)] for k, v in (("new", new), ("old", old))}
            ratio = statistics.median(o[1] / n[1] for n, o in zip(new, old))
            print(f"{name:40s} new wall {med['new'][0]:5.2f} s CPU {med['new'][1]:5.2f} s | old wall "
                  f"{med['old'][0]:5.2f} s CPU {med['old'][1]:5.2f} s | old/new CPU median {ratio:.2f}")
        floor = [_run_floor() for _ in range(repeats)]
        print(f"{'floor: ' + FLOOR:40s} wall {statistics.median(f[0] for f in floor):5.2f} s CPU "
              f"{statistics.median(f[1] for f in floor):5.2f} s (no fis code)")
        print(f"load average at end {os.getloadavg()[0]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(R_REFERENCE), action="append")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--startup", action="store_true", help="time `fis stats` start-up instead (new vs --old-rev)")
    ap.add_argument("--old-rev", default="6cba802", help="git revision of the 'old' legs (--startup, --old-leg)")
    ap.add_argument("--old-leg", action="store_true",
                    help="also time --old-rev's code on each design, in turns with this checkout's")
    ap.add_argument("--worker", choices=sorted(R_REFERENCE), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.startup:
        startup(args.old_rev, max(args.repeats, 5))
        return
    names = args.only or list(R_REFERENCE)
    if args.worker:
        cpu, info = fit(args.worker, one_factor() if args.worker == "one" else crossed())
        print(json.dumps({"cpu": cpu, **info}))
        return
    data = {"one": one_factor(), "crossed": crossed(), "crossed-correlated": None}
    data["crossed-correlated"] = data["crossed"]
    times: dict[str, list[float]] = {n: [] for n in names}
    old: dict[str, list[float]] = {n: [] for n in names}
    info: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.old_leg:
            _export(args.old_rev, Path(tmp))
        for _ in range(args.repeats):  # interleaved: one fit of each design (and its old leg) per round
            for n in names:
                cpu, info[n] = fit(n, data[n])
                times[n].append(cpu)
                if args.old_leg:
                    old[n].append(_old_fit(Path(tmp), n, info[n]))
    print(f"load average {os.getloadavg()[0]:.2f}; R times from {R_SOURCE}")
    print(f"{'design':20s} {'rows':>7s} {'fis CPU s':>10s} {'lme4 CPU s':>10s} {'fis/lme4':>9s}  structure")
    for n in names:
        med = statistics.median(times[n])
        print(f"{n:20s} {len(data[n]):7d} {med:10.2f} {R_REFERENCE[n]:10.1f} {med / R_REFERENCE[n]:9.2f}  "
              f"{info[n]['structure']} (runs {', '.join(f'{t:.2f}' for t in times[n])}; "
              f"logLik {info[n]['loglik']:.4f})")
        if args.old_leg:
            ratio = statistics.median(o / t for o, t in zip(old[n], times[n]))
            print(f"{'':20s} {'':7s} old ({args.old_rev}) {statistics.median(old[n]):.2f} s CPU; old/new median "
                  f"{ratio:.2f} (runs {', '.join(f'{t:.2f}' for t in old[n])})")


if __name__ == "__main__":
    main()
