"""`fis stimuli validate` and `fis stimuli show`: check and inspect factorial designs (``stimuli/*.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..cli import app
from ..errors import FisError

stimuli_app = typer.Typer(help="Check and inspect factorial stimulus designs (see stimuli/README.md).",
                          no_args_is_help=True)
app.add_typer(stimuli_app, name="stimuli")

_NO_TOK = typer.Option("--no-tokenizer", help="skip the target-word and token-length checks (no model load)")


@stimuli_app.command("validate")
def validate(files: Annotated[list[Path], typer.Argument(help="design YAML file(s)")],
             no_tokenizer: Annotated[bool, _NO_TOK] = False) -> None:
    """Check design files: structure, cells, slots, target words against the tokenizer. Exit 2 on errors."""
    from ..designs import validate as validate_design

    failed: list[FisError] = []
    for path in files:
        try:
            report = validate_design(path, tokenize=not no_tokenizer)
        except FisError as err:
            if len(files) == 1:
                raise
            typer.echo(f"error: {err}", err=True)
            failed.append(err)
            continue
        d = report.design
        sizes = sorted(set(report.items_per_cell.values()))
        per_cell = str(sizes[0]) if len(sizes) == 1 else "/".join(map(str, report.items_per_cell.values()))
        words = sum(len(w) for w in d.readout.targets.values())
        split = "not tokenised" if report.targets is None else f"{report.n_split_words} split"
        typer.echo(f"ok: {path}: '{d.name}', {len(d.cell_names)} cells x {per_cell} "
                   f"{'items' if d.shape == 'items' else 'sentences'}, {report.n_prompts} prompt(s) -> "
                   f"{report.n_rows} rows; {len(d.readout.targets)} target sets ({words} words, {split})")
        for message in report.warnings:
            typer.echo(f"warning: {path}: {message}", err=True)
    if failed:
        raise FisError(f"{len(failed)} of {len(files)} design file(s) have errors (listed above)")


@stimuli_app.command("show")
def show(file: Annotated[Path, typer.Argument(help="design YAML file")],
         no_tokenizer: Annotated[bool, _NO_TOK] = False,
         examples: Annotated[int, typer.Option(help="example texts per cell")] = 2) -> None:
    """Print a design as tables: cells, item counts, token lengths, examples, target-word tokenisation."""
    from rich.console import Console
    from rich.table import Table

    from ..designs import show as show_design

    data = show_design(file, tokenize=not no_tokenizer, examples=examples)
    d = data.report.design
    console = Console()
    console.print(f"[bold]{d.name}[/bold] ({file}): {d.description.strip()}")
    console.print("factors: " + "; ".join(f"{f} = {' / '.join(lv)}" for f, lv in d.factors.items())
                  + f"; stimuli: {'matched items (crossed with the design)' if d.shape == 'items' else 'cell lists'}")
    cells = Table(title="cells")
    cells.add_column("cell", no_wrap=True)
    cells.add_column("n", justify="right")
    cells.add_column("tokens\nmin/mean/max", no_wrap=True)
    cells.add_column("examples", overflow="fold")
    for row in data.cells:
        toks = (f"{row['tokens_min']}/{row['tokens_mean']:.1f}/{row['tokens_max']}"
                if "tokens_min" in row else "-")
        cells.add_row(row["cell"], str(row["n"]), toks, "\n".join(f"- {t}" for t in row["examples"]))
    console.print(cells)
    r = d.readout
    console.print(f"readout: position {r.position}, score {r.score}, multi_token {r.multi_token}, "
                  f"leading_space {r.leading_space}, join {r.join!r}")
    for pid, text in data.prompts:
        console.print(f"  prompt {pid}: {text!r}")
    if data.targets:
        targets = Table(title="target words")
        for col in ["set", "word", "tokens", "ids", "scored"]:
            targets.add_column(col)
        for t in data.targets:
            flag = "" if not t["split"] else " [red](split)[/red]"
            targets.add_row(t["set"], t["word"], ("-" if t["tokens"] is None else " ".join(t["tokens"])) + flag,
                            "-" if t["ids"] is None else str(t["ids"]),
                            "-" if t["scored_ids"] is None else str(t["scored_ids"]))
        console.print(targets)
    for name, (plus, minus) in data.contrasts.items():
        console.print(f"contrast {name} = mean({plus}) - mean({minus})")
    for message in data.report.warnings:
        console.print(f"[yellow]warning:[/yellow] {message}")
