"""A card as document blocks: the same blocks become the card's Markdown and a section of the HTML report.

Reuses the report's tiny document model (:class:`~fis_interventions.reports.render.Doc`), so a card reads
the same in ``fis features`` output and in ``report.md``/``report.html``. The histogram is a table with text
bars (no image needed, so the card stays one Markdown file).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from ..reports.render import Doc, fmt, to_markdown
from .stimuli import explained_share

BAR_WIDTH = 30


def _tok(text: Any) -> str:
    """A token in quotes with its whitespace visible (idempotent on the already-escaped context tokens)."""
    text = str(text).replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    return f"'{text}'"


def _bar(count: int, peak: int) -> str:
    """A fixed-width text bar (full cells then dots), readable in Markdown and in right-aligned HTML cells."""
    n = round(BAR_WIDTH * count / peak) if count else 0
    return "#" * n + "." * (BAR_WIDTH - n)


def card_doc(card: dict[str, Any], level: int | None = None, title: str | None = None) -> Doc:
    """Blocks of one card. Standalone (``level=None``) the title is the document's and sections are level 1;
    inside a report the card opens with a heading at ``level`` and its sections are one deeper."""
    doc = Doc(title or f"Feature {card['feature']} at {card['point']}")
    act, h = card["activation"], card["harvest"]
    if level is None:
        level = 0
    else:
        doc.h(level, title or f"Card: feature {card['feature']} at {card['point']}")
    doc.p(f"Checkpoint `{card['checkpoint']}` (model `{card['model']}`, hook `{card['hook']}`); point "
          f"`{card['point']}` (width {card['width']}). Harvest `{h['folder']}`: {h['split_rule']}, "
          f"{h['contexts']} contexts, {h['tokens']} kept tokens.")
    doc.p(f"Fires (value > 0) on {act['firing']} of {act['tokens']} tokens (frequency {fmt(act['frequency'])}); "
          f"max {fmt(act['max'])}, mean when firing {fmt(act['mean_when_firing'])}.")
    hist = act["histogram"]
    if hist["counts"]:
        peak = max(hist["counts"])
        rows = [{"from": lo, "to": hi, "tokens": c, "": _bar(c, peak)}
                for lo, hi, c in zip(hist["edges"][:-1], hist["edges"][1:], hist["counts"])]
        doc.table(pd.DataFrame(rows), "Histogram of the non-zero activations (log-spaced bins, exact counts).")
    doc.h(level + 1, "Top-activating contexts")
    if card["top_contexts"]:
        doc.table(pd.DataFrame([{"#": c["rank"], "activation": c["activation"], "token": _tok(c["token"]),
                                 "context": c["text"]} for c in card["top_contexts"]]),
                  card["context_definition"] + ".")
    else:
        doc.p("The feature never fires on this split.")
    od = card["output_direction"]
    doc.h(level + 1, "Output direction (logit lens)")
    doc.p(f"How it reaches the residual stream: {od['derivation']} Norm of the direction per unit of activation "
          f"(residual units): {fmt(od['norm'])}.")
    doc.p(f"Definition: {od['lens_definition']}")
    n = max(len(od["promoted"]), len(od["suppressed"]))
    doc.table(pd.DataFrame([{"promoted": _tok(p["token"]), "logit +": p["logit"],
                             "suppressed": _tok(s["token"]), "logit -": s["logit"]}
                            for p, s in zip(od["promoted"][:n], od["suppressed"][:n])]),
              "The tokens the direction promotes and suppresses most.")
    if od.get("linear_part"):
        lp = od["linear_part"]
        doc.p(f"Linear part of the joint model for this latent: |W_lin[i]| / |W_dec[i]| = {fmt(lp['norm_ratio'])}, "
              f"cosine with the decoder row {fmt(lp['cosine_with_decoder'])} ({lp['note']}).")
    if card.get("attribution"):
        attribution_block(doc, card["attribution"], level + 1)
    if card.get("stimuli"):
        stimuli_block(doc, card["stimuli"], level + 1)
    integ = card.get("integration")
    if integ is not None:
        doc.h(level + 1, "What it integrates: top contributing pairs of SAE latents")
        doc.p(f"Definition: {integ['definition']} Tokens used: {integ['n_tokens']} "
              f"({integ['tokens_used']}); mean pre-activation {fmt(integ['preactivation_mean'])}, of which "
              f"the bias terms {fmt(integ['constant_mean'])}.")
        if integ["pairs"]:
            rows = []
            for p in integ["pairs"]:
                a, b = p["latents"]
                tags = p.get("promotes", {})
                rows.append({"latent a": a, "a promotes": ", ".join(map(_tok, tags.get(str(a), []))),
                             "latent b": b, "b promotes": ", ".join(map(_tok, tags.get(str(b), []))),
                             "contribution": p["contribution"], "share": p["share"],
                             "present": f"{p['tokens_present']}/{p['tokens']}",
                             **({"weight": p["weight"]} if "weight" in p else {})})
            doc.table(pd.DataFrame(rows), "Pairs ranked by mean contribution to the pre-activation; "
                                          "'promotes': top logit-lens tokens of each latent's decoder row.")
            share = explained_share(integ)
            if share is not None:
                doc.p(f"The {len(integ['pairs'])} pairs listed explain {share['listed']:.1%} of the mean "
                      f"pre-activation on these tokens and the bias terms {share['constant']:.1%}; the remaining "
                      f"{share['rest']:.1%} is not explained here (the many other pairs, each small, some "
                      "negative).")
        else:
            doc.p("No active pair adds to the pre-activation on the firing tokens.")
    return doc


def _lead(text: str) -> tuple[str, str]:
    """A token's leading whitespace and the rest (the mark goes around the word, not the space)."""
    core = text.lstrip()
    return text[:len(text) - len(core)], core


def marked_tokens(tokens: Sequence[dict[str, Any]]) -> str:
    """Markdown: every token with a positive activation bold, its value after it: ``**word**(0.53)``."""
    out = []
    for t in tokens:
        text = str(t["text"]).replace("\n", " ")
        lead, core = _lead(text)
        core = core.replace("*", "\\*").replace("_", "\\_").replace("`", "'")
        v = t["activation"]
        out.append(f"{lead}**{core}**({v:.3g})" if v is not None and v > 0 and core else lead + core)
    return "".join(out).strip()


def highlighted_tokens(tokens: Sequence[dict[str, Any]], peak: float) -> str:
    """HTML: each token on a background whose strength is its activation / ``peak`` (orange up, blue down);
    the value in the tooltip; positions the exclusion rule drops are grey."""
    import html

    spans = []
    for t in tokens:
        v = t["activation"]
        text = html.escape(str(t["text"]).replace("\n", " "))
        if v is None:
            spans.append(f'<span class="tok off" title="excluded">{text}</span>')
            continue
        alpha = min(1.0, abs(v) / peak) if peak > 0 else 0.0
        colour = "255,140,0" if v >= 0 else "70,130,230"
        spans.append(f'<span class="tok" style="background:rgba({colour},{alpha:.2f})" title="{v:.4g}">{text}</span>')
    return "".join(spans)


def stimuli_block(doc: Doc, st: dict[str, Any], level: int) -> None:
    """The feature on the design's own stimuli: per-cell activation (mean, 95% CI over items) and a few
    stimuli per cell token by token (HTML: coloured by activation; Markdown: active tokens bold with values)."""
    doc.h(level, f"On the design's stimuli ({st['design']})")
    doc.p(f"Activation per cell over {st['n_stimuli']} stimuli ({st['items']}): {st['definition']}.")
    doc.table(pd.DataFrame([{"cell": c["cell"], "mean": c["mean"], "ci_low": c["ci_low"], "ci_high": c["ci_high"],
                             "items": c["n_items"]} for c in st["cells"]]),
              "Activation by cell (95% CI over items).")
    if not st["examples"]:
        return
    peak = max((abs(t["activation"]) for e in st["examples"] for t in e["tokens"] if t["activation"] is not None),
               default=0.0)
    doc.only("md", [("p", "Token by token: every token with a positive activation is bold, its value after it."),
                    ("ul", [f"{e['cell']}, item `{e['item']}` ({st['aggregate']} {fmt(e['value'])}): "
                            + marked_tokens(e["tokens"]) for e in st["examples"]])])
    rows = "".join(f"<tr><td>{e['cell']}</td><td>{e['item']}</td><td>{fmt(e['value'])}</td>"
                   f"<td class=\"toks\">{highlighted_tokens(e['tokens'], peak)}</td></tr>" for e in st["examples"])
    doc.only("html", [("raw", "<div class=\"scroll\"><table class=\"stimuli\"><caption class=\"caption\">Token by "
                              f"token: background = activation (strongest {fmt(peak)}); hover for the value."
                              f"</caption><thead><tr><th>cell</th><th>item</th><th>{st['aggregate']}</th>"
                              f"<th>stimulus</th></tr></thead><tbody>{rows}</tbody></table></div>")])


def attribution_block(doc: Doc, att: dict[str, Any], level: int) -> None:
    """The feature's estimated effect on the readout contrast per cell of the design (``fis screen --method
    attribution``): what zero-ablating it would change, first-order, in each cell, and its 2x2 interaction."""
    doc.h(level, "Attribution per cell of the design")
    doc.p(f"Estimated shift of the readout contrast when the feature is clamped to {fmt(att['clamp'])} at every kept "
          f"position ({att['method']}: gradient x change, mean over the discovery stimuli of each cell and the "
          f"prompts). Interaction (a1b1 - a1b2 - a2b1 + a2b2) {fmt(att['effect'])}, F = {fmt(att['F_ab'])}, "
          f"p = {fmt(att['p_ab'])}, q = {fmt(att['q_ab'])} (BH over every feature of every point)"
          + (f"; activation screen p = {fmt(att['activation_p_ab'])}" if att.get("activation_p_ab") is not None
             else "") + ".")
    doc.table(pd.DataFrame([{"cell": cell, "estimated shift": value} for cell, value in att["cells"].items()]))


def card_markdown(card: dict[str, Any]) -> str:
    """The standalone Markdown card."""
    return to_markdown(card_doc(card))


def index_markdown(cards: Sequence[dict[str, Any]]) -> str:
    """One line per card: point, feature, frequency, top tokens promoted."""
    doc = Doc("Feature cards")
    rows = [{"card": f"{c['point']}_{c['feature']}.md", "point": c["point"], "feature": c["feature"],
             "frequency": c["activation"]["frequency"], "max": c["activation"]["max"],
             "top token": _tok(c["top_contexts"][0]["token"]) if c["top_contexts"] else "-",
             "promotes": ", ".join(_tok(t["token"]) for t in c["output_direction"]["promoted"][:3])}
            for c in cards]
    doc.table(pd.DataFrame(rows))
    return to_markdown(doc)
