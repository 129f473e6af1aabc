"""The report's document model renders the same content to Markdown and to escaped, self-contained HTML."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pandas as pd

from fis_interventions.reports.render import Doc, fmt, to_html, to_markdown


def test_markdown_and_html_render_every_block(tmp_path: Path) -> None:
    png = tmp_path / "f.png"
    png.write_bytes(b"\x89PNG fake bytes")
    doc = Doc("T <1>")
    doc.h(1, "Summary")
    doc.p("**bold** and `code` & <tag>")
    doc.ul(["one", "two"])
    doc.table(pd.DataFrame({"a|b": [1.234567, np.nan], "c": ["x<y", None]}), "cap")
    doc.fig(png, "figures/f.png", "a figure")
    md = to_markdown(doc)
    assert md.startswith("# T <1>\n") and "## Summary" in md and "- two" in md
    assert "| a\\|b | c |" in md and "| 1.235 | x<y |" in md and "| - | - |" in md
    assert "![a figure](figures/f.png)" in md
    page = to_html(doc)
    assert "<strong>bold</strong> and <code>code</code> &amp; &lt;tag&gt;" in page
    assert "<title>T &lt;1&gt;</title>" in page and "<td>x&lt;y</td>" in page
    assert f"data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}" in page


def test_fmt() -> None:
    assert [fmt(None), fmt(float("nan")), fmt(True), fmt(3), fmt(0.000123456)] == ["-", "-", "yes", "3", "0.0001235"]
