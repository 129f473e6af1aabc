"""`fis export CKPT --format saelens --out DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..cli import app


@app.command("export")
def export_cmd(checkpoint: Annotated[Path, typer.Argument(help="checkpoint folder (standalone SAE or joint model)")],
               out: Annotated[Path, typer.Option(help="new folder for the exported SAE")],
               format: Annotated[str, typer.Option(help="target format")] = "saelens") -> None:  # noqa: A002
    """Write the checkpoint's SAE in another library's format (SAELens: cfg.json + sae_weights.safetensors)."""
    from ..sae.saelens import export

    typer.echo(f"exported SAE: {export(checkpoint, out, format=format)}")
