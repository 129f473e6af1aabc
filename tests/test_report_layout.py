"""The report's HTML at 1280 px (issue 23, item 3): no table is wider than its container and the page has no
horizontal scroll, measured after layout in headless Chromium (a probe script writes the widths into the DOM,
read back with --dump-dom: no DevTools client or extra Python package)."""

from __future__ import annotations

import pytest

from fis_interventions.reports import report, write_synthetic_run
from fis_interventions.reports.browser import chromium_binary, probe_html


@pytest.mark.browser
def test_no_table_overflows_at_1280_px(tmp_path):
    if chromium_binary() is None:
        pytest.skip("the chromium binary is not installed (apt-get install chromium)")
    run = write_synthetic_run(tmp_path / "run", n_items=6, n_prompts=1, values=(1.0, 4.0))
    out = report(run, tmp_path / "report", cards=False)
    result = probe_html(out / "report.html", width=1280)
    assert result["title"] == "fis-probe-ok" and result["errors"] == [], result
    assert result["page"]["innerWidth"] == 1280
    assert result["page"]["scrollWidth"] <= 1280, "the page scrolls sideways"
    tables = result["tables"]
    assert len(tables) >= 10  # verdict, primary, manipulation, per-feature tables, null checks, methods ...
    wide = [t for t in tables if t["width"] > t["container"] + 1 or t["right"] > 1280]
    assert wide == [], f"tables wider than their container at 1280 px: {wide}"
    # report.md stays short: each feature's tests table is on its own page, linked from its section
    md = (out / "report.md").read_text(encoding="utf-8")
    pages = sorted((out / "features").glob("*.md"))
    assert len(pages) == 3
    for page in pages:
        assert f"](features/{page.name})" in md
        text = page.read_text(encoding="utf-8")
        assert "| intervention | value | position | readout | estimate |" in text and "](../report.md)" in text
    assert "| intervention | value | position | readout | estimate |" not in md.split("## Features")[1]
