"""Hostile YAML is refused in bounded time and memory (exit 2, one line); every YAML we read rejects duplicate
keys; a large valid design still loads. Files are generated on the fly (tests/hostile_yaml.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from hostile_yaml import HOSTILE, big_design

from fis_interventions.cli import main
from fis_interventions.config import load_config
from fis_interventions.designs import load_design
from fis_interventions.errors import FisError
from fis_interventions.interventions import BatteryConfig
from fis_interventions.safe_yaml import MAX_DEPTH, parse_yaml
from fis_interventions.sae import TrainConfig

EXPECTED = {
    "alias bomb in unknown key": "alias bomb",
    "alias bomb in description": "alias bomb",
    "alias bomb in targets": "alias bomb",
    "recursive alias (list)": "recursive alias",
    "recursive alias (mapping)": "recursive alias",
    "10,000-level flow nesting": f"nesting deeper than {MAX_DEPTH} levels",
    "3,000-level block nesting": f"nesting deeper than {MAX_DEPTH} levels",
    "50 MB file": "MiB limit",
    "duplicate key": "key 'name' appears twice",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_file_is_one_line_exit_2_quickly(name, tmp_path, capsys):
    path = HOSTILE[name](tmp_path / "hostile.yaml")
    capsys.readouterr()
    start = time.perf_counter()
    code = main(["stimuli", "validate", "--no-tokenizer", str(path)])
    elapsed = time.perf_counter() - start
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith(f"error: {path}") and EXPECTED[name] in err[0], err[0]
    # a hang guard, not a benchmark: before this change these took minutes or ended in RecursionError
    assert elapsed < 5.0, f"{name} took {elapsed:.1f} s"


def test_expected_table_covers_every_generator():
    assert set(EXPECTED) == set(HOSTILE)


def test_aliases_within_budget_and_merge_keys_still_work():
    data, _ = parse_yaml("base: &b {lr: 0.1, k: 8}\nrun: {<<: *b, k: 4}\nlist: &l [1, 2]\nagain: *l\n", "t.yaml")
    assert data == {"base": {"lr": 0.1, "k": 8}, "run": {"lr": 0.1, "k": 4}, "list": [1, 2], "again": [1, 2]}


@pytest.mark.parametrize("text, match", [
    ("a: 1\nb: [*nope]\n", "undefined alias"),
    ("a: 1\n---\nb: 2\n", "another document"),
    ("a: [1, 2\n", "invalid YAML"),
    ("a: !!python/object:os.system ls\n", "invalid YAML"),
])
def test_malformed_yaml_is_one_line(text, match):
    with pytest.raises(FisError, match=match) as err:
        parse_yaml(text, "t.yaml")
    assert "\n" not in str(err.value)


def test_duplicate_keys_are_rejected_in_train_and_battery_configs(tmp_path):
    train = tmp_path / "train.yaml"
    train.write_text("mode: sae\nk: 8\nlr: 0.001\nk: 16\n", encoding="utf-8")
    with pytest.raises(FisError, match="line 4: key 'k' appears twice") as err:
        load_config(TrainConfig, train)
    assert err.value.field == "k"
    battery = tmp_path / "battery.yaml"
    battery.write_text("name: b\ncheckpoint: c\ndesigns: [d.yaml]\nfeatures: [{point: p, index: 1}]\n"
                       "interventions:\n  - {kind: scale, values: [4], kind: set}\n", encoding="utf-8")
    with pytest.raises(FisError, match="line 6: key 'kind' appears twice") as err:
        load_config(BatteryConfig, battery)
    assert err.value.field == "interventions[0].kind"


def test_large_valid_design_loads_and_matches_safe_load(tmp_path):
    path = big_design(tmp_path / "big.yaml", n_items=2_000)
    design = load_design(path)
    assert len(design.items) == 2_000 and design.items[-1].id == "it1999"
    from fis_interventions.safe_yaml import read_yaml_file

    data, _ = read_yaml_file(path)
    assert data == yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def test_size_limit_is_configurable(tmp_path, monkeypatch):
    path = big_design(tmp_path / "big.yaml", n_items=200)
    monkeypatch.setenv("FIS_MAX_YAML_MB", "0.001")
    with pytest.raises(FisError, match="FIS_MAX_YAML_MB"):
        load_design(path)


@pytest.mark.parametrize("name", ["recursive alias (list)", "alias bomb in targets", "3,000-level block nesting",
                                  "duplicate key"])
def test_without_libyaml_the_same_limits_hold(name, tmp_path, monkeypatch):
    """The pure-Python path (no libyaml) composes iteratively and gives the same trees and the same refusals."""
    good = big_design(tmp_path / "good.yaml", n_items=300).read_text(encoding="utf-8")
    with_c = parse_yaml(good, "g")[0]
    path = HOSTILE[name](tmp_path / "bad.yaml")
    monkeypatch.setattr(yaml, "__with_libyaml__", False)
    assert parse_yaml(good, "g")[0] == with_c
    with pytest.raises(FisError, match=EXPECTED[name].split(" (")[0]):
        parse_yaml(path.read_text(encoding="utf-8"), str(path))
