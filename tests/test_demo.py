"""The demo pipeline end to end on the tiny random model (the real model runs in `make demo`)."""

from __future__ import annotations

import json

from fis_interventions.demo import demo
from fis_interventions.interventions import read_results


def test_demo_quick_end_to_end(tmp_path):
    lines: list[str] = []
    res = demo(out=tmp_path / "demo", quick=True, model="tiny-random", report_dir=tmp_path / "report",
               echo=lines.append, progress=False)
    assert res["report"].exists() and res["report"].name == "report.html"
    df = read_results(res["battery"])
    roles = set(df["role"])
    assert {"top", "random_control", "linear_control"} <= roles
    noop = df[(df.intervention == "scale") & (df.value == 1.0)]
    assert (noop["shift"] == 0).all()
    table = json.loads((tmp_path / "demo" / "eval.json").read_text())
    comps = {(r["checkpoint"], r["components"]) for r in table["table"]}
    assert ("sae", "sae") in comps and ("joint", "full") in comps
    assert any("interaction gain" in c for _, c in comps)
    assert any("screened" in line and "held out for the battery" in line for line in lines)
    split = json.loads((tmp_path / "demo" / "screen" / "screen.json").read_text())["split"]
    tested = set(df["item"])
    assert tested and tested <= set(split["confirmation"]) and not tested & set(split["discovery"])
