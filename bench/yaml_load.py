"""Hostile and large YAML: how long `fis stimuli validate` takes to accept a big design or refuse a hostile one.

Prints wall times measured in this run (issue 13: a valid 20,000-item design validates in < 3 s on 2 cores;
every hostile file is refused, exit 2, in < 5 s). Run: `python bench/yaml_load.py`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from hostile_yaml import HOSTILE, big_design  # noqa: E402

from fis_interventions.cli import main  # noqa: E402


def timed(args: list[str]) -> tuple[int, float, float]:
    """Exit code, wall seconds and CPU seconds of this process (the CPU time is what a quiet machine's wall
    time would be: on a shared machine the wall time also counts other jobs)."""
    t0, c0 = time.perf_counter(), time.process_time()
    code = main(args)
    return code, time.perf_counter() - t0, time.process_time() - c0


def run() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        big = big_design(folder / "big.yaml", n_items=20_000)
        code, seconds, cpu = timed(["stimuli", "validate", "--no-tokenizer", str(big)])
        print(f"valid design, 20,000 items ({big.stat().st_size / 2**20:.1f} MB): exit {code}, {seconds:.2f} s wall, "
              f"{cpu:.2f} s CPU (target < 3 s)")
        for name, make in HOSTILE.items():
            path = make(folder / f"{name}.yaml")
            code, seconds, cpu = timed(["stimuli", "validate", "--no-tokenizer", str(path)])
            print(f"{name:<28} ({path.stat().st_size / 2**10:>9.1f} KB): exit {code}, {seconds:.3f} s wall, "
                  f"{cpu:.3f} s CPU (target < 5 s)")


if __name__ == "__main__":
    run()
