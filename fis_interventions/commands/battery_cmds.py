"""`fis battery BATTERY.yaml [--shard i/n]`, `fis battery merge RUN`, `fis eval CKPT...`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from ..cli import app


class _DefaultRun(TyperGroup):
    """`fis battery FILE` means `fis battery run FILE`; `merge` stays a subcommand."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


battery_app = typer.Typer(cls=_DefaultRun, no_args_is_help=True,
                          help="Run intervention batteries (fis battery BATTERY.yaml) and merge shards.")
app.add_typer(battery_app, name="battery")


@battery_app.command("run")
def battery_run_cmd(config: Annotated[Path, typer.Argument(help="battery YAML")],
                    shard: Annotated[Optional[str], typer.Option(help="run shard i of n, e.g. 0/4")] = None,
                    overwrite: Annotated[bool, typer.Option(help="replace an earlier run with other settings "
                                                                 "in the same out folder")] = False,
                    max_batch_rows: Annotated[Optional[int], typer.Option(
                        min=1, help="most rows per stacked suffix pass (overrides the YAML; default 512)")] = None,
                    progress: bool = True) -> None:
    """Run (or resume) a battery: clamp features, record logit shifts into the run's SQLite store.

    Rerunning the same config resumes; another config into the same out folder is refused (see --overwrite)."""
    from ..interventions import battery

    path = battery(config, shard=shard, progress=progress, overwrite=overwrite, max_batch_rows=max_batch_rows)
    typer.echo(f"results: {path}")


@battery_app.command("merge")
def battery_merge_cmd(run: Annotated[Path, typer.Argument(help="battery output folder")],
                      partial: Annotated[bool, typer.Option(help="merge incomplete or missing shards too")] = False
                      ) -> None:
    """Combine the shard stores of a run into results.sqlite (+ parquet/csv export); refuses conflicting or
    incomplete shards."""
    from ..interventions import merge_shards

    typer.echo(f"merged {merge_shards(run, partial=partial)} rows into {run / 'results.sqlite'}")


@app.command("eval")
def eval_cmd(checkpoints: Annotated[list[Path], typer.Argument(help="checkpoint folders (standalone SAE first)")],
             activations: Annotated[Optional[Path], typer.Option(help="harvest folder (default: from checkpoint)")] = None,
             max_contexts: int = 64, max_tokens: int = 20_000, batch_size: int = 8, seed: int = 0,
             device: str = "auto",
             json_out: Annotated[Optional[Path], typer.Option("--json", help="write the comparison table")] = None,
             model: Annotated[Optional[str], typer.Option(help="model name or path; default: the checkpoint's "
                                                          "(a copy elsewhere is accepted: checked by content)")] = None,
             progress: bool = True) -> None:
    """Evaluate checkpoints on held-out tokens (FVU, L0, spliced KL/CE, baselines) and compare them."""
    from ..evaluation import evaluate_many

    table, text = evaluate_many(checkpoints, activations=activations, max_contexts=max_contexts,
                                max_tokens=max_tokens, batch_size=batch_size, seed=seed, device=device,
                                json_out=json_out, progress=progress, model=model)
    typer.echo(text)
