"""YAML limits that hold through aliases and in bytes: chained anchors (depth counted where an alias is used),
one long string reached through thousands of aliases (expanded text bounded in bytes), a flat list of millions
of values (bounded before composing), special files (devices, FIFOs: refused without reading). Every hostile
file of tests/hostile_yaml.py and each case here: exit 2, one line, nothing written, fast."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: hostile_yaml

from hostile_yaml import HOSTILE  # noqa: E402

from fis_interventions.cli import main  # noqa: E402
from fis_interventions.errors import FisError  # noqa: E402
from fis_interventions.safe_yaml import MAX_DEPTH, parse_yaml  # noqa: E402


def chained_anchors(path: Path, links: int = 40, levels: int = 60) -> Path:
    """Each anchor nests the previous one ``levels`` deep: every node is within the depth limit where it is
    written, but expanding the last alias reaches ``links * levels`` levels (a RecursionError before)."""
    lines = [f"a0: &a0 {'[' * levels}1{']' * levels}"]
    lines += [f"a{i}: &a{i} {'[' * levels}*a{i - 1}{']' * levels}" for i in range(1, links)]
    path.write_text("name: x\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def chained_block_anchors(path: Path, links: int = 30) -> Path:
    """The same in block style with mappings (3.4 KB in the report of issue 21)."""
    body = []
    for i in range(links):
        head = f"l{i}: &l{i}\n" + "".join(f"{'  ' * (j + 1)}k{j}:\n" for j in range(40))
        body.append(head + f"{'  ' * 41}v: {'*l' + str(i - 1) if i else 1}\n")
    path.write_text("name: x\n" + "".join(body), encoding="utf-8")
    return path


def one_string_many_aliases(path: Path, size: int = 2**20, uses: int = 8000) -> Path:
    """One 1 MiB string reached through 8,000 aliases: 8 GB of text once expanded, few values."""
    path.write_text(f"name: x\ns: &s {'a' * size}\nl: [{', '.join(['*s'] * uses)}]\n", encoding="utf-8")
    return path


def flat_list(path: Path, n: int = 3_000_000) -> Path:
    path.write_text("name: x\nl: [" + ",".join(["1"] * n) + "]\n", encoding="utf-8")
    return path


CASES = {
    "chained flow anchors": (chained_anchors, f"nesting deeper than {MAX_DEPTH} levels (counting the levels that "
                                              "aliases bring in)"),
    "chained block anchors": (chained_block_anchors, f"nesting deeper than {MAX_DEPTH} levels"),
    "one string through 8000 aliases": (one_string_many_aliases, "MiB of text (an alias bomb?)"),
    "flat list of 3,000,000 values": (flat_list, "over the 1,000,000 limit for YAML"),
}
CASES.update({f"hostile: {name}": (make, None) for name, make in HOSTILE.items()})


def _one_line_exit_2(argv: list[str], capsys) -> tuple[str, float]:
    capsys.readouterr()
    start = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - start
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0], elapsed


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_yaml_is_refused_in_one_line(name, tmp_path, capsys):
    make, expected = CASES[name]
    path = make(tmp_path / "hostile.yaml")
    before = sorted(tmp_path.iterdir())
    line, elapsed = _one_line_exit_2(["stimuli", "validate", "--no-tokenizer", str(path)], capsys)
    assert line.startswith(f"error: {path}"), line
    if expected is not None:
        assert expected in line, line
    assert sorted(tmp_path.iterdir()) == before  # nothing written
    print(f"{name}: {elapsed * 1000:.0f} ms")  # the 0.1 s target is measured in bench/, not asserted


def test_aliases_that_stay_shallow_and_small_still_load():
    data, _ = parse_yaml("a: &a [[1]]\nb: &b [*a, *a]\nc: [*b, *b]\n", "t.yaml")
    assert data["c"] == [[[[1]], [[1]]], [[[1]], [[1]]]]


def test_depth_through_aliases_is_counted_without_libyaml(tmp_path, monkeypatch):
    import yaml

    path = chained_anchors(tmp_path / "c.yaml")
    monkeypatch.setattr(yaml, "__with_libyaml__", False)
    with pytest.raises(FisError, match="counting the levels that aliases bring in"):
        parse_yaml(path.read_text(encoding="utf-8"), str(path))


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_device_is_refused_without_reading(capsys):
    line, elapsed = _one_line_exit_2(["stimuli", "validate", "--no-tokenizer", "/dev/zero"], capsys)
    assert "not a regular file" in line and elapsed < 5


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_is_refused_without_blocking(tmp_path, capsys):
    fifo = tmp_path / "design.yaml"
    os.mkfifo(fifo)
    line, _ = _one_line_exit_2(["stimuli", "validate", "--no-tokenizer", str(fifo)], capsys)
    assert "not a regular file" in line


def test_fifo_as_a_battery_config_is_refused(tmp_path, capsys):
    fifo = tmp_path / "battery.yaml"
    os.mkfifo(fifo)
    line, _ = _one_line_exit_2(["battery", "run", str(fifo)], capsys)
    assert "not a regular file" in line


@pytest.mark.parametrize("value", ["abc", "-1", "nan"])
def test_bad_yaml_size_variable_is_one_line(value, tmp_path, monkeypatch, capsys):
    path = tmp_path / "d.yaml"
    path.write_text("name: x\n", encoding="utf-8")
    monkeypatch.setenv("FIS_MAX_YAML_MB", value)
    line, _ = _one_line_exit_2(["stimuli", "validate", "--no-tokenizer", str(path)], capsys)
    assert "FIS_MAX_YAML_MB" in line
