"""`fis features CKPT --point P --ids 60,218`: feature cards (top contexts, histogram, logit lens, pairs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..cli import app


@app.command("features")
def features_command(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint folder (or training output folder)")],
    point: Annotated[str, typer.Option("--point", help="sae.hook_latents, nfm.hook_hidden or "
                                       "secondary.hook_latents")],
    ids: Annotated[str, typer.Option("--ids", help="feature indices, comma-separated, e.g. 60,218")],
    activations: Annotated[Path | None, typer.Option("--activations", help="harvest folder; default: the one the "
                                                     "checkpoint was trained on")] = None,
    top: Annotated[int, typer.Option("--top", help="top-activating contexts per card")] = 20,
    split: Annotated[str, typer.Option("--split", help="heldout (default: contexts never trained on), train "
                                       "or all")] = "heldout",
    out: Annotated[Path | None, typer.Option("--out", help="folder for <point>_<id>.md/.json and index.md "
                                             "(written atomically); default: print the cards")] = None,
    model: Annotated[str | None, typer.Option("--model", help="default: the checkpoint's model")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="harvest rows per joint-SAE forward")] = 2048,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace cards of other settings in --out")] = False,
    design: Annotated[Path | None, typer.Option("--design", help="a 2x2 design YAML: add each feature's activation "
                                                "per cell and a few stimuli token by token")] = None,
    aggregate: Annotated[str, typer.Option("--aggregate", help="with --design: last (default), max, mean "
                                           "(the screen's aggregate over a stimulus's positions)")] = "last",
) -> None:
    """What is this feature? One card per id: top held-out contexts, firing rate and histogram, the tokens its
    output direction promotes and suppresses (logit lens), and for integration features the SAE latent pairs
    that drive it. All features come from one pass over the harvest."""
    from ..cards import card_markdown, features

    cards = features(checkpoint, point, ids, activations=activations, top=top, out=out,
                     split=split,  # type: ignore[arg-type]  (checked: one-line error)
                     model=model, device=device, batch_size=batch_size, progress=False, overwrite=overwrite,
                     design=design, aggregate=aggregate)
    if out is None:
        typer.echo("\n".join(card_markdown(c) for c in cards))
    else:
        typer.echo(f"wrote {len(cards)} card(s) to {out}")
