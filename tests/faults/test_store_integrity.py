"""The battery store takes every valid config and trusts nothing it reads: conditions that differ only in
relative_to_max, a word in two target sets, two designs named alike, contrasts named like a word or the KL
readout; rows deleted behind its back (resume and merge), a corrupt results.sqlite. Each refusal: exit 2 via
the CLI, one line, nothing written before the config is known to be valid."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the battery fixtures

from test_battery import ROOT, _cfg, _run  # noqa: E402

from fis_interventions.cli import main  # noqa: E402
from fis_interventions.designs import load_design  # noqa: E402
from fis_interventions.errors import FisError  # noqa: E402
from fis_interventions.interventions import battery, merge_shards, read_results  # noqa: E402

DESIGN = ROOT / "stimuli/negation_sentiment.yaml"


def _design_variant(tmp_path: Path, name: str, old: str, new: str) -> Path:
    text = DESIGN.read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / f"{name}.yaml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


def test_relative_and_absolute_set_of_one_value_are_two_conditions(tiny_bridge, tiny_ckpt, tmp_path):
    sets = [{"kind": "set", "values": [1.0], "relative_to_max": True}, {"kind": "set", "values": [1.0]}]
    df = _run(tiny_bridge, _cfg(tiny_ckpt, tmp_path / "r", interventions=sets, features=[
        {"point": "sae.hook_latents", "index": 1}]))
    assert set(df["intervention"]) == {"set", "set_relative_to_max"}
    per = df.groupby("intervention").size()
    assert per["set"] == per["set_relative_to_max"] > 0


def test_word_in_two_target_sets_is_scored_once_and_used_by_both(tiny_bridge, tiny_ckpt, tmp_path):
    design = _design_variant(tmp_path, "overlap", "negative: [bad,", "negative: [good, bad,")
    df = _run(tiny_bridge, _cfg(tiny_ckpt, tmp_path / "r", designs=[design], features=[
        {"point": "sae.hook_latents", "index": 1}], interventions=[{"kind": "scale", "values": [4]}]))
    first = df.iloc[0]
    one = df[(df["item"] == first["item"]) & (df["cell"] == first["cell"]) & (df["prompt_id"] == first["prompt_id"])]
    assert (one["readout"] == "good").sum() == 1
    words = one[one["readout_kind"] == "word"].set_index("readout")["score_edited"]
    pos = ["good", "great", "excellent", "wonderful", "pleasant", "lovely", "perfect", "nice"]
    neg = ["good", "bad", "terrible", "awful", "horrible", "unpleasant", "poor", "disappointing", "boring"]
    valence = one[one["readout"] == "valence"]["score_edited"].iloc[0]
    assert valence == pytest.approx(words[pos].mean() - words[neg].mean(), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("contrast", ["good", "__kl__"])
def test_contrast_named_like_a_word_or_the_kl_readout_is_a_design_error(contrast, tmp_path):
    design = _design_variant(tmp_path, "clash", "valence: positive - negative", f"{contrast}: positive - negative")
    with pytest.raises(FisError, match=f"contrast '{contrast}' has the same name as") as err:
        load_design(design)
    assert "rename the contrast" in str(err.value)


def test_two_designs_with_one_name_are_refused_before_writing(tiny_bridge, tiny_ckpt, tmp_path):
    other = _design_variant(tmp_path, "copy", "valence: positive - negative", "val2: positive - negative")
    out = tmp_path / "r"
    with pytest.raises(FisError, match="have the same name") as err:
        battery(_cfg(tiny_ckpt, out, designs=[DESIGN, other]), bridge=tiny_bridge, progress=False)
    assert "own `name:`" in str(err.value)
    assert not out.exists()


def _delete_rows(store: Path, n: int) -> None:
    with sqlite3.connect(store) as conn:
        conn.execute(f"DELETE FROM results WHERE rowid IN (SELECT rowid FROM results LIMIT {n})")


def test_rows_deleted_behind_the_store_are_refused_on_resume(tiny_bridge, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "r"
    cfg = _cfg(tiny_ckpt, out, max_items=1)
    _run(tiny_bridge, cfg)
    _delete_rows(out / "results.sqlite", 5)
    run_json = (out / "run.json").stat().st_mtime_ns
    with pytest.raises(FisError, match="results store is damaged: .* result rows, but its finished units recorded"):
        battery(cfg, bridge=tiny_bridge, progress=False)
    assert (out / "run.json").stat().st_mtime_ns == run_json, "run.json rewritten before the store was checked"


def test_unit_count_differing_from_what_it_should_produce_is_refused(tiny_bridge, tiny_ckpt, tmp_path):
    out = tmp_path / "r"
    cfg = _cfg(tiny_ckpt, out, max_items=1)
    _run(tiny_bridge, cfg)
    with sqlite3.connect(out / "results.sqlite") as conn:  # rows and counts both cut: consistent but short
        unit, n = conn.execute("SELECT unit, n_rows FROM done LIMIT 1").fetchone()
        _, design, _, point, feature = unit.split("|")
        rowids = [r[0] for r in conn.execute("SELECT rowid FROM results WHERE design=? AND point=? AND feature=? "
                                             "LIMIT 3", (design, point, feature))]
        conn.execute(f"DELETE FROM results WHERE rowid IN ({','.join(map(str, rowids))})")
        conn.execute("UPDATE done SET n_rows = n_rows - 3 WHERE unit = ?", (unit,))
    with pytest.raises(FisError, match=f"recorded {n - 3} rows, it should have {n}"):
        battery(cfg, bridge=tiny_bridge, progress=False)


def test_merge_refuses_a_shard_with_rows_deleted(tiny_bridge, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "r"
    for i in range(2):
        battery(_cfg(tiny_ckpt, out, max_items=1), bridge=tiny_bridge, progress=False, shard=f"{i}/2")
    _delete_rows(out / "results.shard-1-of-2.sqlite", 4)
    assert main(["battery", "merge", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shard store is damaged" in err[0] and "Traceback" not in err[0]
    assert not (out / "results.sqlite").exists()


def test_corrupt_results_store_is_one_line(tiny_bridge, tiny_ckpt, tmp_path):
    out = tmp_path / "r"
    cfg = _cfg(tiny_ckpt, out, max_items=1)
    _run(tiny_bridge, cfg)
    (out / "results.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(FisError, match="results store cannot be read or written") as err:
        battery(cfg, bridge=tiny_bridge, progress=False)
    assert "move it away" in str(err.value)
    with pytest.raises(FisError, match="results store cannot be read"):
        read_results(out / "results.sqlite")
    with pytest.raises(FisError):
        merge_shards(out)
