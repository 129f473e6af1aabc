"""A tiny document model rendered twice: Markdown (``report.md``) and self-contained HTML (``report.html``).

Building the content once and rendering it to both formats keeps the two files identical in substance.
Plain Python instead of a template engine: the HTML is a dozen tags, and it must embed every image as
base64 with no external CSS or JavaScript.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

CSS = """body{font-family:system-ui,sans-serif;max-width:1240px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:12px;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 5px;
text-align:right}th{background:#f3f3f3;vertical-align:bottom;overflow-wrap:anywhere}img{max-width:100%;display:block;margin:.5em 0}
figcaption,.caption{font-size:12px;color:#555}code{background:#f3f3f3;padding:0 3px}.scroll{overflow-x:auto}
td.toks,table.stimuli th:last-child{text-align:left;white-space:normal}.tok{border-radius:2px;white-space:pre-wrap}.tok.off{color:#999}"""


@dataclass
class Doc:
    """Ordered blocks: ``("h", level, text)``, ``("p", text)``, ``("ul", [text])``,
    ``("table", DataFrame, caption)``, ``("fig", png path, relative path, caption)``."""

    title: str
    blocks: list[tuple[Any, ...]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def table(self, frame: pd.DataFrame, caption: str = "") -> None:
        self.blocks.append(("table", frame, caption))

    def fig(self, path: Path, rel: str, caption: str) -> None:
        self.blocks.append(("fig", Path(path), rel, caption))

    def only(self, fmt: str, blocks: list[tuple[Any, ...]]) -> None:
        """Blocks shown in one format only (``"md"`` or ``"html"``): the HTML is one self-contained page,
        while ``report.md`` stays short and links the long parts (cards, per-term tables) kept beside it."""
        self.blocks += [("only", fmt, block) for block in blocks]


def _blocks_for(doc: Doc, fmt: str) -> list[tuple[Any, ...]]:
    """The blocks shown in ``fmt``; an ``only`` block inside another (a card's token view inside the report's
    HTML-only card) is shown when both name ``fmt``."""
    out = []
    for block in doc.blocks:
        while block[0] == "only" and block[1] == fmt:
            block = block[2]
        if block[0] != "only":
            out.append(block)
    return out


def fmt(x: Any) -> str:
    """Numbers with 4 significant digits; None/NaN as '-'."""
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (float, np.floating)):
        return f"{float(x):.4g}"
    return str(x)


def _cells(frame: pd.DataFrame) -> list[list[str]]:
    return [[fmt(v) for v in row] for row in frame.itertuples(index=False, name=None)]


def to_markdown(doc: Doc) -> str:
    out = [f"# {doc.title}", ""]
    for block in _blocks_for(doc, "md"):
        kind = block[0]
        if kind == "h":
            out += ["#" * (block[1] + 1) + " " + block[2], ""]
        elif kind == "p":
            out += [block[1], ""]
        elif kind == "ul":
            out += [f"- {t}" for t in block[1]] + [""]
        elif kind == "table":
            frame, caption = block[1], block[2]
            if caption:
                out += [f"*{caption}*", ""]
            esc = [[c.replace("|", "\\|") for c in row] for row in [list(map(str, frame.columns))] + _cells(frame)]
            out += ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(frame.columns)]
            out += ["| " + " | ".join(r) + " |" for r in esc[1:]] + [""]
        elif kind == "fig":
            out += [f"![{block[3]}]({block[2]})", "", f"*{block[3]}*", ""]
    return "\n".join(out).rstrip() + "\n"


def _inline(text: str) -> str:
    """Escape, then the two Markdown marks the report uses: **bold** and `code`."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def to_html(doc: Doc) -> str:
    body = [f"<h1>{html.escape(doc.title)}</h1>"]
    for block in _blocks_for(doc, "html"):
        kind = block[0]
        if kind == "h":
            level = min(block[1] + 1, 6)
            body.append(f"<h{level}>{html.escape(block[2])}</h{level}>")
        elif kind == "p":
            body.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline(t)}</li>" for t in block[1]) + "</ul>")
        elif kind == "table":
            frame, caption = block[1], block[2]
            # long column names (max_abs_shift_contrast) may break after an underscore: tables fit at 1280 px
            head = "".join(f"<th>{html.escape(str(c)).replace('_', '_<wbr>')}</th>" for c in frame.columns)
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                           for row in _cells(frame))
            cap = f"<caption class=\"caption\">{html.escape(caption)}</caption>" if caption else ""
            body.append(f"<div class=\"scroll\"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody>"
                        "</table></div>")
        elif kind == "raw":  # HTML built by the caller (escaped there), e.g. a card's token highlights
            body.append(block[1])
        elif kind == "fig":
            data = base64.b64encode(Path(block[1]).read_bytes()).decode("ascii")
            body.append(f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{html.escape(block[3])}\" "
                        f"data-file=\"{html.escape(block[2])}\"><figcaption>{html.escape(block[3])}</figcaption>"
                        "</figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(doc.title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
