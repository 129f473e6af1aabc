"""`fis stats`: every 2x2 analysis of one measure in a CSV/Parquet table, printed and optionally saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ..cli import app
from ..errors import FisError


def parse_levels(specs: list[str] | None) -> dict[str, list[str]]:
    """``["formality=formal,informal"]`` -> ``{"formality": ["formal", "informal"]}``."""
    out: dict[str, list[str]] = {}
    for spec in specs or []:
        name, sep, values = spec.partition("=")
        parts = [v.strip() for v in values.split(",")]
        if not sep or not name.strip() or len(parts) != 2 or not all(parts):
            raise FisError(f"cannot parse --levels {spec!r}", field="--levels",
                           fix="write --levels FACTOR=LEVEL1,LEVEL2")
        out[name.strip()] = parts
    return out


def check_output_file(path: Path | None, option: str) -> None:
    """Refuse an output path that is a folder before any work is done (nothing half-written)."""
    if path is not None and path.is_dir():
        raise FisError("is a folder, expected a file name", source=path, field=option,
                       fix=f"pass a file path such as {path / 'out.json'}")


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Plain aligned text (no colour codes, so logs and pipes stay readable)."""
    cells = [columns] + [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
                     for row in cells)


def format_report(result: dict[str, Any]) -> str:
    """Human-readable summary of :func:`fis_interventions.stats.analyze_2x2` output."""
    a, b = result["factors"]
    lines = [f"{result['dv']} ~ {a} x {b}: n = {result['n']}"
             + (f", {result['n_items']} items" if result.get("n_items") is not None else ""),
             f"levels: {a} = {result['levels'][a]}, {b} = {result['levels'][b]} (coded -0.5 / +0.5)", "",
             "Type III ANOVA (OLS)", format_table(result["anova"], ["term", "ss", "df1", "df2", "F", "p",
                                                                    "partial_eta2"])]
    if result.get("rm_anova") is not None:
        lines += ["", "By-item repeated-measures ANOVA (F2, item x cell means)",
                  format_table(result["rm_anova"], ["term", "ss", "df1", "df2", "F", "p", "partial_eta2"])]
    lmm = result.get("lmm")
    if lmm is not None:
        structure = lmm.get("structure") or f"{a}*{b} + (1 | {result['item']})"
        lines += ["", f"LMM {result['dv']} ~ {structure}, {lmm['method']}, "
                      f"converged={_fmt(lmm['converged'])}, optimizer={_fmt(lmm['optimizer'])}, "
                      f"Satterthwaite df"]
        if lmm.get("simplification"):
            lines.append(f"  requested {lmm['random']}: {'; '.join(lmm['simplification'])} (singular fit)")
        for c in lmm.get("comparisons") or []:
            lines.append(f"  likelihood-ratio test (ML refits) {c['simplified']} vs {c['maximal']}: "
                         f"chisq({_fmt(c['df'])}) = {_fmt(c['chisq'])}, p = {_fmt(c['p'])}")
        if lmm.get("prompt_reason"):
            lines.append(f"  {lmm['prompt_reason']}")
        lines += [format_table(lmm["fixed"], ["term", "estimate", "se", "df", "t", "p", "ci_low", "ci_high"])]
        if lmm.get("random_effects"):
            lines += ["random effects", format_table(lmm["random_effects"], ["group", "term1", "term2", "vcov",
                                                                            "sdcor"])]
        lines.append(f"logLik {_fmt(lmm['loglik'])}")
    if result.get("simple_effects"):
        lines += ["", "Simple effects (LMM, Satterthwaite df, 95% CI; p_holm: Holm over the levels of the other "
                      "factor)",
                  format_table(result["simple_effects"], ["factor", "contrast", "at_factor", "at", "estimate", "se",
                                                          "df", "t", "p", "p_holm", "ci_low", "ci_high"])]
    if result.get("variance_ci"):
        lines += ["", "Random-effect SDs: profile-likelihood 95% CIs (ML deviance, as lme4's confint)",
                  format_table(result["variance_ci"], ["group", "term", "sd", "lower", "upper"])]
    contrast = result["contrast"]
    inter = contrast["interaction"]
    lines += ["", f"Interaction (difference of differences, {inter['source']}): {_fmt(inter['estimate'])} "
                  f"[95% CI {_fmt(inter['ci_low'])}, {_fmt(inter['ci_high'])}], "
                  f"standardized {_fmt(contrast['effect_sizes']['standardized_interaction'])}",
              format_table(contrast["cells"], [a, b, "n", "mean", "se", "ci_low", "ci_high"])]
    lines += ["", "warnings:" if result["warnings"] else "warnings: none"]
    lines += [f"  - {w}" for w in result["warnings"]]
    return "\n".join(lines)


@app.command("stats")
def stats_command(
    data: Path = typer.Argument(..., help="CSV or Parquet table, one row per observation."),
    dv: str = typer.Option(..., "--dv", help="Numeric measure column."),
    factor: list[str] = typer.Option(..., "--factor", help="Factor column; give exactly two."),
    item: str | None = typer.Option(None, "--item", help="Item column: adds the by-item ANOVA and the LMM."),
    levels: list[str] | None = typer.Option(None, "--levels",
                                            help="Level order FACTOR=FIRST,SECOND (first is coded -0.5)."),
    reml: bool = typer.Option(True, "--reml/--ml", help="Fit the LMM by REML (default) or ML."),
    random: str = typer.Option("uncorrelated", "--random",
                               help="LMM random effects: intercept, uncorrelated (maximal, default) or "
                                    "correlated; a singular fit is simplified by a fixed rule."),
    prompt: str | None = typer.Option(None, "--prompt", help="Second grouping column (prompts): its role is "
                                                             "--prompt-role."),
    prompt_role: str = typer.Option("auto", "--prompt-role",
                                    help="auto (default: a fixed factor below 5 levels, crossed random effects "
                                         "from 5), fixed, or random (crossed random effects)."),
    simple: list[str] | None = typer.Option(None, "--simple",
                                            help="Simple effects of this factor at each level of the other "
                                                 "(give twice for both); Satterthwaite df, CIs, Holm."),
    variance_ci: bool = typer.Option(False, "--variance-ci",
                                     help="Profile-likelihood 95% CIs of the random-effect SDs (lme4's confint)."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the results (and provenance) here."),
) -> None:
    """Two-way (2x2) statistics of one measure: Type III ANOVA, by-item ANOVA, LMM, interaction, cell means.

    Numbers match R's car::Anova(type=3), afex::aov_car and lmerTest::lmer with -0.5/+0.5 coding.
    """
    from ..io import write_json
    from ..provenance import provenance
    from ..stats import stats

    method = "REML" if reml else "ML"
    check_output_file(json_out, "--json")
    result = stats(data, dv, factor, item=item, levels=parse_levels(levels), method=method, random=random,
                   prompt=prompt, prompt_role=prompt_role, simple=list(simple or []), variance_ci=variance_ci)
    typer.echo(format_report(result))
    if json_out is not None:
        config = {"data": str(data), "dv": dv, "factors": list(factor), "item": item,
                  "levels": parse_levels(levels), "method": method, "random": random, "prompt": prompt,
                  "prompt_role": prompt_role, "simple": list(simple or []), "variance_ci": variance_ci}
        write_json(json_out, {**result, "provenance": provenance(config=config)})
        typer.echo(f"\nwrote {json_out}")
