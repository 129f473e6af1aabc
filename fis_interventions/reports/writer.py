"""``fis report RUN``: statistics, figures and a Markdown + self-contained HTML report for a battery run.

The report folder (``reports/<run name>/`` by default) holds ``report.md``, ``report.html`` (images embedded),
``tables/*.csv``, ``figures/*.png`` and ``provenance.json``; it is written atomically, so a failed report
leaves nothing behind. See ``reports/README.md``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..fingerprint import (Fingerprint, check_output, file_digest, folder_identity, package_version,
                           replace_folder)
from .. import recorded_paths
from ..io import write_json
from ..provenance import library_versions, provenance
from ..stats.structure import MIN_RANDOM_LEVELS
from .analysis import ALPHA, EXPLORATORY, KEYS, Analysis, analyze_run, feature_verdicts, is_noop
from .inference import ALTERNATIVE, primary_table, verdict_sentence
from .cards import check_card_inputs, feature_indices, report_cards
from .figures import dose_plot, interaction_plot
from .parallel import pmap
from .render import Doc, fmt, to_html, to_markdown
from .runfolder import Run, load_run
from .simple_effects import primary_simple_effects

log = logging.getLogger(__name__)

NOOP_ABS_TOL = 1e-5
"""A no-op clamp passes its check when every shift is within float noise: at most this (score units) or
1e-3 of the typical effect of the real clamps, whichever is larger."""


def _draw(plot: Any, *args: Any) -> Path:
    """One figure job of :func:`build` (a picklable call for :func:`.parallel.pmap`)."""
    return plot(*args)


def _reading_order(role: str) -> int:
    """A reader looks at the features under test before their controls: top, other tested roles, controls."""
    return 0 if role == "top" else 2 if "control" in role else 1


def slug(text: str) -> str:
    """A file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "run"


def null_checks(run: Run, analysis: Analysis) -> pd.DataFrame:
    """Per no-op clamp (scale 1, add 0): the largest |shift| of any readout, and whether it is float noise."""
    res = run.results
    noop = res[[is_noop(i, float(v)) for i, v in zip(res["intervention"], res["value"])]]
    if noop.empty:
        return pd.DataFrame()
    tests = analysis.tests
    real = tests[~tests["null_check"]] if not tests.empty else tests
    typical = float(real["mean_abs_shift"].median()) if not real.empty else 0.0
    tol = max(NOOP_ABS_TOL, 1e-3 * typical)
    keys = ["design", "point", "feature", "role", "intervention", "value", "position"]
    table = (noop.assign(abs_shift=noop["shift"].abs()).groupby(keys + ["readout_kind"])["abs_shift"]
             .max().unstack("readout_kind").add_prefix("max_abs_shift_").reset_index())
    cols = [c for c in table.columns if c.startswith("max_abs_shift_")]
    table["tolerance"] = tol
    table["passed"] = (table[cols].max(axis=1) <= tol).to_numpy()
    return table


def _interval(row: pd.Series) -> str:
    return (f"{fmt(row['estimate'])} [95% CI {fmt(row['ci_low'])}, {fmt(row['ci_high'])}], partial eta2 "
            f"{fmt(row['partial_eta2'])}, standardized {fmt(row['standardized'])}, q = {fmt(row['q'])}"
            + _items_line(row))


def _items_line(row: pd.Series) -> str:
    """How many items give 80% power for this effect (simulated from the test's own variance components)."""
    n = row.get("items_for_80")
    if n is None or (isinstance(n, float) and np.isnan(n)):
        return ""
    return f"; 80% power with {int(n)} items (this test's variance components, {int(row['n_items'])} now)"


def _clamp_text(primary: dict[str, Any]) -> str:
    if not primary:
        return "none"
    return (f"{primary['intervention']} {float(primary['value']):g} [{primary['position']}] on "
            f"`{primary['readout']}`" + (", the documented default" if primary.get("default") else ""))


def _clamp(row: pd.Series) -> str:
    return f"{row['intervention']}={row['value']:g} [{row['position']}] on `{row['readout']}`"


def summary_lines(tests: pd.DataFrame, verdicts: pd.DataFrame) -> list[str]:
    """One bullet per clamped feature: significant interactions (with effect sizes) or the control verdict."""
    lines = []
    for _, v in verdicts.iterrows():
        sub = tests[(tests["design"] == v["design"]) & (tests["point"] == v["point"])
                    & (tests["feature"] == v["feature"]) & ~tests["null_check"] & tests["significant"]]
        head = (f"**{v['design']}: feature {v['feature']}** ({v['role']}, `{v['point']}`): "
                f"{v['significant']} of {v['tests']} tests significant")
        if v.get("selection") == EXPLORATORY:
            head += (f" (**{EXPLORATORY}**: its tests are left out of the confirmatory FDR family and never "
                     "count as significant)")
        if v.get("group") == "alternative":
            head += f": **{ALTERNATIVE}**"
        elif v["role"] != "top":
            if v["control_ok"]:
                verdict = "no significant interaction (compare its KL with the feature's: a control that barely moves the output cannot fail)"
            elif "linear" in str(v["role"]):
                # the model after the hook is nonlinear, so a linear-path feature can shift the readouts with an
                # interaction too: a comparison for the integration features, not a null control
                verdict = ("**significant for a linear-path control**: the interaction arises downstream of the "
                           "hook, so integration features must beat this effect, not zero")
            else:
                verdict = "**CONTROL FAILED**: inspect this feature"
            head += f": {verdict}"
        if not sub.empty:
            head += ": " + "; ".join(f"{_clamp(r)}: {_interval(r)}" for _, r in sub.iterrows())
        lines.append(head)
    return lines


def _feature_tables(analysis: Analysis, keys: dict[str, Any], a: str, b: str
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    def pick(frame: pd.DataFrame) -> pd.DataFrame:
        if frame.empty:
            return frame
        mask = np.ones(len(frame), dtype=bool)
        for k, v in keys.items():
            mask &= (frame[k] == v).to_numpy()
        return frame[mask]

    f1, f2 = pick(analysis.anova), pick(analysis.rm_anova)
    on = ["intervention", "value", "position", "readout", "term"]
    anova = f1[on + ["df1", "df2", "F", "p", "partial_eta2"]].rename(
        columns={"df2": "df2_F1", "F": "F1", "p": "p_F1", "partial_eta2": "np2_F1"})
    if not f2.empty:
        anova = anova.merge(f2[on + ["df2", "F", "p", "partial_eta2"]].rename(
            columns={"df2": "df2_F2", "F": "F2", "p": "p_F2", "partial_eta2": "np2_F2"}), on=on, how="left")
    lmm = pick(analysis.lmm)
    lmm = lmm[lmm["term"] != "Intercept"][["intervention", "value", "position", "readout", "model", "term",
                                           "estimate", "se", "df", "t", "p", "ci_low", "ci_high"]]
    return anova, lmm


def random_effects_lines(tests: pd.DataFrame) -> list[str]:
    """Which random-effects structures were fitted, in how many tests, and every simplification applied."""
    if tests.empty or "random_structure" not in tests:
        return []
    counts = tests["random_structure"].fillna("(no model fitted)").value_counts()
    lines = ["Random effects fitted: " + "; ".join(f"`shift ~ {k}` in {v} test(s)" for k, v in counts.items())
             + "."]
    simplified = tests["simplified"].dropna()
    if len(simplified):
        steps = simplified.value_counts()
        lines.append(f"Singular fits simplified in {len(simplified)} test(s) by the fixed rule (drop the "
                     "correlations, then zero-variance slopes in the order A:B, B, A; intercepts kept): "
                     + "; ".join(f"{k} ({v})" for k, v in steps.items()) + ".")
    else:
        lines.append("No fit was singular: no random effect was dropped.")
    return lines


def methods_lines(run: Run, analysis: Analysis) -> list[str]:
    info = run.info
    res = run.results
    lines = [f"Model `{info.model}`, hook point `{info.hook}`, checkpoint `{info.checkpoint}`, seed "
             f"{fmt(info.seed)}."]
    for name, d in info.designs.items():
        (fa, la), (fb, lb) = d.factors.items()
        contrasts = ", ".join(f"`{k}` = {v}" for k, v in d.contrasts.items()) or "none recorded"
        lines.append(f"Design `{name}` ({d.file or 'file not recorded'}): factor A `{fa}` ({la[0]} / {la[1]}) x "
                     f"factor B `{fb}` ({lb[0]} / {lb[1]}); {fmt(d.n_items)} items, each in all four cells; "
                     f"{len(d.prompts)} prompt(s); contrast readouts: {contrasts}.")
    clamps = res.groupby(["intervention", "position"])["value"].unique()
    lines.append("Interventions (clamp of one feature at its named point, in the forward pass): "
                 + "; ".join(f"{k} at {', '.join(f'{v:g}' for v in sorted(vals))} [position {p}]"
                             for (k, p), vals in clamps.items()) + ".")
    lines.append("Measure: `shift` = edited - clean score of each contrast readout, per item x cell x prompt.")
    lines.append("Coding: deviation codes, -0.5 for the first level and +0.5 for the second, so the interaction "
                 "coefficient is the difference of differences (m22 - m12) - (m21 - m11).")
    lines.append("Tests per design x feature x intervention x value x contrast readout: Type III two-way ANOVA "
                 "over all observations (F1, statsmodels; treats item x prompt observations as independent, so "
                 "descriptive only), by-item repeated-measures ANOVA on item x cell means (F2, descriptive), "
                 "and the primary test: a linear mixed model with maximal uncorrelated by-item random effects "
                 "(intercept and the A, B and A:B slopes the design identifies; Barr et al. 2013), prompts as a "
                 f"fixed factor below {MIN_RANDOM_LEVELS} prompts and as crossed random effects (with their "
                 f"slopes) from {MIN_RANDOM_LEVELS}, fitted by REML with Satterthwaite df (lme4/lmerTest-compatible).")
    lines += random_effects_lines(analysis.tests)
    if "prompt_reason" in analysis.tests:  # which role the prompt factor had and why (--prompt-role / the rule)
        for reason in sorted(set(analysis.tests["prompt_reason"].dropna())):
            lines.append(f"Second grouping factor: {reason.replace('prompt_id', 'prompt')}.")
    lines.append("Primary test (columns estimate, CI, p, q of tests.csv): the interaction of that mixed model; "
                 "its random-effects structure per test is the column random_structure, every variance and "
                 "covariance is in tables/random_effects.csv.")
    n = len(analysis.tests)
    conf = analysis.tests[analysis.tests["selection"] != EXPLORATORY] if n else analysis.tests
    fam = int(conf["q_family_size"].max()) if len(conf) else 0
    lines.append(f"Multiple comparisons: Benjamini-Hochberg over one family of {fam} confirmatory tests with a "
                 f"p-value ({n} in all): {analysis.family}; significance at q < {ALPHA}. q_f2 applies the same "
                 "correction to the by-item F2 p-values, for comparison; F1 gets no q (descriptive only).")
    lines.append("Feature selection: features chosen by `fis screen` were ranked on its discovery items; the "
                 "battery tests them on the held-out confirmation items (column `selection` of tests.csv). "
                 f"Tests on items that were also screened are labelled \"{EXPLORATORY}\": they form a BH family "
                 "of their own and are never significant findings (selection on the same data biases p low).")
    lines.append("No-op clamps (scale 1, add 0) are null checks: their shifts must be float noise; they are kept "
                 "in the tests table but left out of the FDR family, since p-values of float noise mean nothing.")
    versions = info.provenance.get("versions") or {}
    if versions:
        lines.append("Software of the run: " + ", ".join(f"{k} {v}" for k, v in versions.items())
                     + (f"; git {info.provenance.get('git')}" if info.provenance.get("git") else "") + ".")
    lines.append("Software of this report: " + ", ".join(f"{k} {v}" for k, v in library_versions().items()) + ".")
    return lines


def build(run: Run, analysis: Analysis, out: Path, cards: dict[tuple[str, int], dict[str, Any]] | None = None) -> Doc:
    """Write figures and tables into ``out`` and return the document that describes them; ``cards`` (from
    :func:`~fis_interventions.reports.cards.report_cards`) go next to each feature's plots."""
    tables, figures = out / "tables", out / "figures"
    tables.mkdir()
    figures.mkdir()
    tests = analysis.tests
    verdicts = feature_verdicts(tests)
    checks = null_checks(run, analysis)
    for name, frame in [("tests", tests), ("anova", analysis.anova), ("rm_anova", analysis.rm_anova),
                        ("lmm", analysis.lmm), ("random_effects", analysis.random), ("cells", analysis.cells),
                        ("kl", analysis.kl),
                        ("features", verdicts), ("null_checks", checks), ("eval", run.eval_table),
                        ("manipulation_check", analysis.manipulation), ("vs_controls", analysis.vs_controls),
                        ("verdicts", pd.DataFrame(analysis.verdicts)),
                        ("screening", run.screening)]:
        if frame is not None and not frame.empty:
            frame.to_csv(tables / f"{name}.csv", index=False)

    doc = Doc(f"Intervention report: {run.info.name}")
    doc.h(1, "Verdict")
    doc.ul([verdict_sentence(v) for v in analysis.verdicts] or ["no tests"])
    manip = analysis.manipulation
    failed = manip[manip["status"] == "failed"] if len(manip) else manip
    if len(failed):
        doc.p("**Manipulation check FAILED** for " + "; ".join(
            f"`{r['readout']}` ({r['design']}: {r['note']})" for _, r in failed.iterrows())
            + ": on the clean model the readout does not measure its factor, so every test on it is "
              "uninterpretable (column `interpretable` of tests.csv).")
    prim = primary_table(tests, analysis.vs_controls) if not tests.empty else pd.DataFrame()
    doc.table(prim, f"Primary tests ({_clamp_text(analysis.primary)}): A x B interaction of the primary LMM "
                    "(estimate, 95% CI, Satterthwaite df, p, BH q within its family); features first, then each "
                    "feature minus its matched controls, then the controls.")
    effects = primary_simple_effects(run, tests, KEYS, stored=analysis.simple)  # significant primary ones only
    if effects:
        doc.table(pd.DataFrame(effects)[["test", "factor", "contrast", "at_factor", "at", "estimate", "ci_low",
                                         "ci_high", "df", "p", "p_holm"]],
                  "Simple effects of each significant primary interaction: the effect of one factor (second level "
                  "minus first) at each level of the other, from the same mixed model (Satterthwaite df, 95% CI; "
                  "p_holm: Holm over the two levels; estimates and df as emmeans gives them).")
    doc.h(1, "Manipulation check")
    doc.p("The clean model's readout by cell (no clamp), and its main effects with 95% CIs (primary LMM on the "
          "clean scores): each readout must move with its own factor, in the expected direction.")
    doc.table(manip, "Clean readout by cell and main effects; status of the check on the readout's own factor.")
    if len(analysis.vs_controls):
        doc.h(1, "Features against matched controls")
        doc.p("Each feature's interaction contrast minus the mean of its controls', by item, at the primary clamp "
              "and readout, per kind of control (`control_kind`): matched_latent (same point, firing rate and "
              "mean activation matched on the stimuli) and random_direction (random residual directions adding, "
              "at every edited token, a vector of the same norm as the feature's clamp writes there); "
              "KL(clean || clamped) of the feature and of its controls side by side: controls that barely move "
              "the output cannot fail, so compare the KLs before reading the test.")
        doc.table(analysis.vs_controls, "Feature minus matched controls (primary LMM on the by-item differences).")
    doc.h(1, "Summary")
    n_null = int(tests["null_check"].sum()) if "null_check" in tests else 0
    n_explo = int(((tests["selection"] == EXPLORATORY) & ~tests["null_check"]).sum()) if "selection" in tests else 0
    doc.p(f"{len(tests)} tests of the A x B interaction on the readout shifts: {len(tests) - n_null - n_explo} "
          f"confirmatory tests BH-corrected within their families (q < {ALPHA}; primary tests of the features, "
          "of the controls, and secondary tests apart), "
          f"{n_null} no-op null checks of the splice kept out of the correction"
          + (f", and {n_explo} exploratory tests ({EXPLORATORY}: features chosen by a screening of the very "
             "items they are tested on, so their p-values are biased low) corrected as a separate family and "
             "not counted as findings" if n_explo else "") + ".")
    doc.ul(summary_lines(tests, verdicts))
    if not checks.empty:
        failed = checks[~checks["passed"]]
        doc.p(f"Null checks (no-op clamps): {len(checks) - len(failed)} of {len(checks)} passed (every shift "
              f"within {fmt(float(checks['tolerance'].iloc[0]))})."
              + (" **FAILED for some clamps: the splice is not exact.**" if len(failed) else ""))
    doc.table(verdicts, "Per feature: tests (no-op checks excluded), significant after FDR, smallest q.")

    from ..cards import card_doc  # lazy: cards render with this package's Doc (import cycle otherwise)
    from .attribution import attach_to_cards

    attach_to_cards(run, cards)

    doc.h(1, "Features")
    if cards:
        first = next(iter(cards.values()))
        doc.p(f"Each feature comes with its card (what the feature is): top-activating contexts and activation "
              f"histogram on the {first['harvest']['split_rule']} of `{first['harvest']['folder']}`, the tokens "
              "its output direction promotes and suppresses (logit lens), and for integration features the SAE "
              "latent pairs that drive it. The cards are also in `cards/` (Markdown and JSON).")
    plots: list[tuple[Any, ...]] = []  # drawn together below, on the cores there are (read only by to_html)
    pages: dict[str, Doc] = {}  # features/<stem>.md: each feature's tests, linked from report.md
    for design_name, design in run.info.designs.items():
        a, b = design.names
        dtests = tests[tests["design"] == design_name]
        groups = list(dtests.groupby(["point", "feature", "role"], sort=False))
        groups.sort(key=lambda g: _reading_order(str(g[0][2])))  # stable: top features first, then controls
        for (point, feature, role), ftests in groups:
            keys = {"design": design_name, "point": point, "feature": feature}
            doc.h(2, f"{design_name}: feature {feature} ({role}, {point})")
            if (ftests["selection"] == EXPLORATORY).any():
                doc.p(f"**{EXPLORATORY}.** This feature was chosen by a screening that included the items it is "
                      "tested on here: every test below is exploratory, its q comes from a separate family, "
                      "and none counts as a finding.")
            stem = slug(f"{design_name}_{point}_{feature}")
            cells = analysis.cells
            fcells = cells[(cells["design"] == design_name) & (cells["point"] == point) & (cells["feature"] == feature)]
            title = f"{design_name}: feature {feature} ({role})"
            p1, p2 = figures / f"interaction_{stem}.png", figures / f"dose_{stem}.png"
            plots += [(interaction_plot, fcells, a, b, design.factors, title, p1), (dose_plot, ftests, title, p2)]
            doc.fig(p1, f"figures/{p1.name}", f"Cell means of the shift with 95% CIs (LMM): x = {a}, one line per "
                    f"{b}; rows: readouts, columns: clamps. Feature {feature}.")
            doc.fig(p2, f"figures/{p2.name}", f"A x B interaction contrast (primary model, 95% CI) across clamp "
                    f"values. Feature {feature}.")
            for index in feature_indices(feature):
                card = (cards or {}).get((point, index))
                if card is not None:
                    doc.only("html", card_doc(card, level=3, title=f"Card: feature {index} ({point})").blocks)
                    doc.only("md", [("p", f"**Card** (what the feature is: top contexts, logit lens, driving pairs): "
                                          f"[cards/{point}_{index}.md](cards/{point}_{index}.md)")])
            caption = "Interaction tests (estimate and CI from the primary model; q: BH over the whole run)."
            doc.only("html", [("table", ftests[["intervention", "value", "position", "readout", "null_check",
                                                "estimate", "ci_low", "ci_high", "F_anova", "p_anova", "F_f2",
                                                "p_f2", "p", "partial_eta2", "standardized", "q"]], caption)])
            real = ftests[~ftests["null_check"].astype(bool)]  # no-op rows: see Null checks
            # report.md stays short (a reader scans it): the tests table is on the feature's own page
            page = Doc(f"{design_name}: feature {feature} ({role}, {point})")
            page.p(f"Back to the [report](../report.md). Figures: [interaction](../figures/{p1.name}), "
                   f"[dose](../figures/{p2.name})"
                   + "".join(f"; [card of feature {i}](../cards/{point}_{i}.md)" for i in feature_indices(feature)
                             if (cards or {}).get((point, i)) is not None) + ".")
            page.table(real[["intervention", "value", "position", "readout", "estimate", "ci_low", "ci_high", "p",
                             "q"]], caption[:-1] + "; F1, F2, effect sizes and the no-op rows: "
                                                   "`../tables/tests.csv`, `../report.html`.")
            page.p("Every term of every fit: `../tables/anova.csv`, `../tables/rm_anova.csv`, `../tables/lmm.csv`.")
            pages[f"{stem}.md"] = page
            n_sig = int(real["significant"].fillna(False).astype(bool).sum()) if "significant" in real else 0
            doc.only("md", [("p", f"Tests ({len(real)}, {n_sig} significant after FDR; estimate, CI, p, q per "
                                  f"clamp and readout): [features/{stem}.md](features/{stem}.md)")])
            anova, lmm = _feature_tables(analysis, keys, a, b)
            doc.only("html", [("table", anova, "ANOVA: F1 = Type III over all observations, F2 = by-item repeated "
                                               "measures."),
                              ("table", lmm, "LMM fixed effects of the primary model (REML, Satterthwaite df).")])

    pmap(_draw, plots)
    if pages:
        (out / "features").mkdir()
        for name, page in pages.items():
            (out / "features" / name).write_text(to_markdown(page), encoding="utf-8")
    if not analysis.kl.empty:
        doc.h(1, "KL divergence of the clamps")
        doc.table(analysis.kl, "KL(clean || edited) of the next-token distribution, per clamp.")
    if not checks.empty:
        doc.h(1, "Null checks")
        doc.table(checks, "Largest |shift| of each no-op clamp, by readout kind.")
    if run.eval_table is not None and not run.eval_table.empty:
        doc.h(1, "Checkpoint evaluation")
        doc.table(run.eval_table, "From eval.json.")
    from .attribution import attribution_section

    attribution_section(doc, run)
    doc.h(1, "Methods")
    doc.ul(methods_lines(run, analysis))
    feats = pd.DataFrame([{"point": f.point, "feature": f.feature, "role": f.role,
                           **{k: v for k, v in (f.screen or {}).items()}} for f in run.info.features])
    if not feats.empty:
        doc.table(feats, "Clamped features and their screening statistics (run.json).")
    doc.h(1, "Warnings")
    doc.ul([f"run: {w}" for w in run.info.warnings]
           + [f"{w} ({len(t)} test(s), e.g. {t[0]})" for w, t in analysis.warnings.items()])
    if not run.info.warnings and not analysis.warnings:
        doc.p("none")
    return doc


def report_fingerprint(run: Run, card_settings: dict[str, Any] | None = None) -> Fingerprint:
    """What decides a report: the battery run (its fingerprint), the rows it holds now, its extras, the card
    settings, the package."""
    rows = pd.util.hash_pandas_object(run.results, index=False).to_numpy().tobytes()
    extras = {name: file_digest(run.folder / name) for name in ("screening.csv", "eval.json")
              if (run.folder / name).is_file()}
    return Fingerprint("report", {"run": folder_identity(run.folder), "results": hashlib.sha256(rows).hexdigest(),
                                  "n_rows": len(run.results), "extras": extras, "cards": card_settings or {},
                                  "package": package_version()})


def report(run: str | Path, out: str | Path | None = None, *, overwrite: bool = False, cards: bool | None = None,
           activations: str | Path | None = None, card_top: int = 10, bridge: Any = None) -> Path:
    """Python API of ``fis report``: analyse the run folder and write the report folder; returns its path.

    An existing report folder is replaced only if it holds our fingerprint: silently for the same run and
    results, with ``overwrite`` when they changed; a folder we did not write is refused, never deleted.
    ``cards``: None (default) adds a card per clamped feature where the checkpoint and its harvest (or
    ``activations``) are reachable and warns otherwise; True requires them; False skips cards.
    """
    loaded = load_run(run)
    target = Path(out) if out is not None else Path("reports") / slug(loaded.info.name)
    fp = report_fingerprint(loaded)
    check_output(target, fp, overwrite=overwrite, replaces_same=True)  # before the analysis (slow)
    if cards:  # required cards: their inputs too
        check_card_inputs(loaded, activations)
    analysis = analyze_run(loaded)
    feature_cards, card_warnings = report_cards(loaded, cards, activations, bridge, card_top)
    for w in card_warnings:
        analysis.warnings.setdefault(w, []).append("(feature cards)")
    with replace_folder(target, fp, overwrite=overwrite) as tmp:
        doc = build(loaded, analysis, tmp, feature_cards)
        if feature_cards:
            from ..cards import write_cards

            write_cards(list(feature_cards.values()), tmp / "cards")
        (tmp / "report.md").write_text(to_markdown(doc), encoding="utf-8")
        (tmp / "report.html").write_text(to_html(doc), encoding="utf-8")
        write_json(tmp / "provenance.json", {
            **provenance(loaded.info.seed, {"run": str(Path(run).resolve()), "out": str(Path(target).resolve())}),
            "inputs": recorded_paths.record_all({"run": loaded.folder, "activations": activations}, target)})
    log.info("wrote %s", target)
    return target
