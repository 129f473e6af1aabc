"""`fis report RUN`: statistics, figures and a Markdown + HTML report for an intervention battery run."""

from __future__ import annotations

from pathlib import Path

import typer

from ..cli import app


@app.command("report")
def report_command(
    run: Path = typer.Argument(..., help="Run folder written by the battery (run.json + results.sqlite)."),
    out: Path | None = typer.Option(None, "--out", help="Report folder (default: reports/<run name>)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a report of other results in --out "
                                   "(only a folder that fis wrote is ever replaced)."),
    cards: bool | None = typer.Option(None, "--cards/--no-cards", help="Feature cards for every clamped feature "
                                      "(default: where the checkpoint and its harvest are found, else a warning; "
                                      "--cards makes them required)."),
    activations: Path | None = typer.Option(None, "--activations", help="Harvest folder for the cards (default: "
                                            "the checkpoint's)."),
    card_top: int = typer.Option(10, "--card-top", help="Top-activating contexts per card."),
) -> None:
    """Analyse every clamp of a battery run (ANOVA, by-item ANOVA, LMM, BH over the run) and write a report.

    Writes report.md, a self-contained report.html, tables/*.csv and figures/*.png; the folder is replaced
    only when the whole report succeeds, and only if fis wrote it.
    """
    from ..reports import report

    folder = report(run, out, overwrite=overwrite, cards=cards, activations=activations, card_top=card_top)
    typer.echo(f"wrote {folder / 'report.html'}")
