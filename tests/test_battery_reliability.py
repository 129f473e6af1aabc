"""Batteries under the fingerprint rule: resume only the same run, refuse others, merge only what agrees."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
from test_battery import ROOT, _cfg, _run

from fis_interventions.cli import main
from fis_interventions.errors import FisError
from fis_interventions.fingerprint import FINGERPRINT_FILE
from fis_interventions.interventions import battery, merge_shards, read_results


def test_changed_settings_are_refused_and_nothing_changes(tiny_bridge, tiny_ckpt, tmp_path):
    out = tmp_path / "r"
    first = _run(tiny_bridge, _cfg(tiny_ckpt, out))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    for change in ({"interventions": [{"kind": "scale", "values": [2.0]}]}, {"batch_size": 4}, {"max_items": 1},
                   {"seed": 3}):
        with pytest.raises(FisError, match="other settings") as err:
            battery(_cfg(tiny_ckpt, out, **change), bridge=tiny_bridge, progress=False)
        assert "--overwrite" in str(err.value) and next(iter(change)) in str(err.value)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    pd.testing.assert_frame_equal(read_results(out / "results.sqlite"), first)


def test_same_settings_resume_and_overwrite_replaces(tiny_bridge, tiny_ckpt, tmp_path):
    out = tmp_path / "r"
    first = _run(tiny_bridge, _cfg(tiny_ckpt, out))
    again = _run(tiny_bridge, _cfg(tiny_ckpt, out))  # same fingerprint: every unit is done, nothing recomputed
    pd.testing.assert_frame_equal(first, again)
    other = _cfg(tiny_ckpt, out, interventions=[{"kind": "scale", "values": [2.0]}])
    replaced = _run(tiny_bridge, other, overwrite=True)
    assert set(replaced["value"]) == {2.0}, "old rows must not survive an overwrite"
    record = json.loads((out / FINGERPRINT_FILE).read_text())
    assert record["stage"] == "battery" and json.loads((out / "run.json").read_text())["fingerprint"] == record[
        "digest"]


def test_folder_we_did_not_write_is_never_touched(tiny_bridge, tiny_ckpt, tmp_path):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(FisError, match="fis did not write"):
            battery(_cfg(tiny_ckpt, out), bridge=tiny_bridge, progress=False, overwrite=overwrite)
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


def test_repeated_conditions_and_designs_are_one_line_errors_before_writing(tiny_bridge, tiny_ckpt, tmp_path,
                                                                                  capsys):
    out = tmp_path / "dup"
    design = ROOT / "stimuli/negation_sentiment.yaml"
    with pytest.raises(Exception, match="listed twice"):
        _cfg(tiny_ckpt, out, interventions=[{"kind": "scale", "values": [4, 4]}])
    with pytest.raises(Exception, match="listed twice"):
        _cfg(tiny_ckpt, out, designs=[design, design])
    bad_feature = [{"point": "sae.hook_latents", "index": 10_000}]
    with pytest.raises(FisError):
        battery(_cfg(tiny_ckpt, out, features=bad_feature), bridge=tiny_bridge, progress=False)
    assert not out.exists(), "a failed run must not leave its output folder behind"
    # through the CLI: exit 2, one line, no traceback
    yaml_file = tmp_path / "b.yaml"
    yaml_file.write_text(f"name: t\nmodel: tiny-random\ncheckpoint: {tiny_ckpt}\ndesigns: [{design}]\n"
                         "features: [{point: sae.hook_latents, index: 1}]\n"
                         "interventions: [{kind: scale, values: [4, 4]}]\n", encoding="utf-8")
    assert main(["battery", str(yaml_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "listed twice" in err[0] and "Traceback" not in err[0]


def _shards(tiny_bridge, tiny_ckpt, out: Path) -> list[Path]:
    for i in range(2):
        battery(_cfg(tiny_ckpt, out), bridge=tiny_bridge, progress=False, shard=f"{i}/2")
    return sorted(out.glob("results.shard-*.sqlite"))


def test_merge_refuses_conflicts_incomplete_and_foreign_shards(tiny_bridge, tiny_ckpt, tmp_path):
    out = tmp_path / "s"
    shards = _shards(tiny_bridge, tiny_ckpt, out)
    single = _run(tiny_bridge, _cfg(tiny_ckpt, tmp_path / "one"))
    assert merge_shards(out) == len(single)
    pd.testing.assert_frame_equal(read_results(out / "results.sqlite"), single)

    # a conflicting row: the same key with another value, copied into the other shard
    with sqlite3.connect(shards[0]) as a, sqlite3.connect(shards[1]) as b:
        row = a.execute("SELECT * FROM results LIMIT 1").fetchone()
        b.execute(f"INSERT INTO results VALUES ({', '.join('?' * len(row))})",
                  tuple(v + 1.0 if i == len(row) - 1 else v for i, v in enumerate(row)))
    with pytest.raises(FisError, match="shard store is damaged: .* 1 result rows, but its finished units "
                                       "recorded 0"):
        merge_shards(out)  # an added row is caught by the row counts first ...
    with sqlite3.connect(shards[1]) as b:  # ... and with its unit's count raised too, by the value check
        b.execute("INSERT INTO done (unit, n_rows) VALUES (?, 1)", (f"x|{row[0]}|0|{row[6]}|{row[7]}",))
    with pytest.raises(FisError, match="disagree"):
        merge_shards(out)
    with sqlite3.connect(shards[1]) as b:
        b.execute("DELETE FROM results WHERE rowid = (SELECT MAX(rowid) FROM results)")
        b.execute("DELETE FROM done WHERE unit LIKE 'x|%'")

    # an incomplete shard (its last unit never committed: neither its rows nor its done mark): refused unless
    # --partial, which merges what is there
    with sqlite3.connect(shards[1]) as b:
        n_last = b.execute("SELECT n_rows FROM done WHERE rowid = (SELECT MAX(rowid) FROM done)").fetchone()[0]
        b.execute("DELETE FROM done WHERE rowid = (SELECT MAX(rowid) FROM done)")
        b.execute(f"DELETE FROM results WHERE rowid IN (SELECT rowid FROM results ORDER BY rowid DESC LIMIT {n_last})")
    with pytest.raises(FisError, match="incomplete"):
        merge_shards(out)
    assert merge_shards(out, partial=True) == len(single) - n_last

    # a shard of another run (other fingerprint)
    with sqlite3.connect(shards[1]) as b:
        b.execute("UPDATE meta SET value = 'feedface' WHERE key = 'fingerprint'")
    with pytest.raises(FisError, match="different settings"):
        merge_shards(out, partial=True)
    # a missing shard
    shards[1].unlink()
    with pytest.raises(FisError, match="expected shards 0..1"):
        merge_shards(out)
