"""`fis train CONFIG.yaml`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..cli import app


@app.command("train")
def train_cmd(config: Annotated[Path, typer.Argument(help="training YAML (see README: Training)")],
              out: Annotated[Path, typer.Option(help="run folder: checkpoint/, metrics.jsonl")] = Path("runs/train"),
              resume: Annotated[bool, typer.Option(help="continue the checkpoint in --out")] = False,
              overwrite: Annotated[bool, typer.Option(help="replace a run with other settings in --out")] = False,
              device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps; overrides the "
                                                         "config's device: (default auto)")] = None,
              allow_incomplete: Annotated[bool, typer.Option(
                  help="train on a harvest left incomplete (complete: false in its manifest)")] = False,
              progress: bool = True) -> None:
    """Train a standalone SAE, sequential or joint model (mode in the config) on harvested activations."""
    from ..training import train

    import os

    overrides = {} if device is None else {"device": device}
    result = train(config, out, resume=resume, progress=progress, overwrite=overwrite,
                   allow_incomplete=allow_incomplete, **overrides)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports (and writes)
        state = "complete" if result.complete else f"incomplete (stopped at step {result.step})"
        typer.echo(f"checkpoint {result.checkpoint}: {state}")


@app.command("refit")
def refit_cmd(checkpoint: Annotated[Path, typer.Argument(help="a standalone SAE checkpoint (mode: sae)")],
              out: Annotated[Path, typer.Option(help="run folder for the refitted checkpoint")] = Path("runs/refit"),
              overwrite: Annotated[bool, typer.Option(help="replace a refit of another checkpoint in --out")] = False
              ) -> None:
    """Refit a standalone SAE's decoder by least squares on its frozen codes (a control for the linear part)."""
    from ..training import refit

    typer.echo(f"refitted checkpoint: {refit(checkpoint, out, overwrite=overwrite)}")
