"""`fis screen`: screen a checkpoint's features against a 2x2 design (by-item RM-ANOVA or OLS each, FDR over all)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..cli import app
from .stats_cmds import format_table


@app.command("screen")
def screen_command(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="checkpoint folder (or training output folder)")],
    design: Annotated[Path, typer.Option("--design", help="design YAML, e.g. stimuli/formality_emotion.yaml")],
    model: Annotated[str | None, typer.Option("--model", help="model name or path; default: the one the "
                                              "checkpoint was trained on")] = None,
    point: Annotated[list[str] | None, typer.Option("--point", help="named point to screen (repeatable); "
                                                    "default: sae.hook_latents, nfm.hook_hidden, "
                                                    "secondary.hook_latents where present")] = None,
    aggregate: Annotated[str, typer.Option("--aggregate", help="last kept token (default), max over the kept "
                                           "tokens, mean over them (depends on sentence length: warned when "
                                           "cells differ in length), or critical: mean over the tokens of the "
                                           "design's `critical` slot (same token count in every cell of an "
                                           "item, else exit 2)")] = "last",
    top: Annotated[int, typer.Option("--top", help="features listed and written to top.json")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", help="stimuli per forward pass")] = 16,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps")] = "auto",
    discover: Annotated[float, typer.Option("--discover", help="fraction of the items screened (discovery, "
                                            "seeded); the rest are held out for the battery")] = 0.5,
    all_items: Annotated[bool, typer.Option("--all-items", help="screen every item (exploratory: a battery "
                                            "on these features cannot be confirmatory)")] = False,
    split_seed: Annotated[int, typer.Option("--split-seed", help="seed of the discovery/confirmation split")
                          ] = 0,
    out: Annotated[Path | None, typer.Option("--out", help="output folder (screening.csv/.parquet, screen.json, "
                                             "top.json), written atomically")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a screening with other settings in "
                                            "--out")] = False,
    cards: Annotated[int, typer.Option("--cards", help="feature cards for the N best features over every point "
                                       "screened (so mostly SAE latents, the most numerous; name --point "
                                       "secondary.hook_latents for integration features): top contexts, logit "
                                       "lens, driving pairs, in OUT/cards/")] = 0,
    cards_activations: Annotated[Path | None, typer.Option("--cards-activations", help="harvest folder for the "
                                                           "cards; default: the checkpoint's")] = None,
    method: Annotated[str, typer.Option("--method", help="activation, attribution (gradient x change: the "
                                        "estimated effect of clamping each feature on the readout contrast), ig "
                                        "(integrated gradients over the whole point's ablation path: each "
                                        "feature's share of ablating the point, not its single clamp; see "
                                        "docs/attribution.md), or a comma-separated list; the first ranks")
                      ] = "activation",
    steps: Annotated[int, typer.Option("--steps", help="integrated-gradient points (--method ig)")] = 16,
    clamp: Annotated[list[float] | None, typer.Option("--clamp", help="clamp value attributed besides zero "
                                                      "(repeatable)")] = None,
    contrast: Annotated[str | None, typer.Option("--contrast", help="readout contrast attributed; default: the "
                                                 "design's first")] = None,
    precision: Annotated[str, typer.Option("--precision", help="of the attribution's suffix pass: float32, or "
                                           "bfloat16 (about half its cost on hardware with bfloat16 units; "
                                           "estimates within ~1% of float32's, docs/attribution.md)")] = "float32",
    permutations: Annotated[int, typer.Option("--permutations", help="label-permutation null: relabellings of "
                                              "the cells (within items for matched designs); 0 skips it")] = 1000,
    random_init: Annotated[bool, typer.Option("--random-init/--no-random-init", help="also screen a seeded "
                                              "random-init model of the checkpoint's shapes (same forward pass)")
                           ] = True,
    null_seed: Annotated[int, typer.Option("--null-seed", help="seed of the permutations and the random-init "
                                           "model")] = 0,
) -> None:
    """Which features respond to the design? One 2x2 test per feature, BH-FDR over all points.

    Only the discovery items are screened (--discover, default half, seeded); screen.json lists them and the
    held-out confirmation items, on which a battery `from_screening` then tests the chosen features. Matched
    items are screened with the within-item model (by-item repeated-measures ANOVA), cell lists with OLS.
    Each unique stimulus (BOS + stimulus text, no prompt) is run to the checkpoint's hook, normalised and passed
    through the joint SAE; feature values are read at the last kept token (default; or max / mean over them).
    Features that look like artifacts (a factor level exactly zero, an F shared by many features, very few
    stimuli firing) are flagged and listed apart, never as top features. Prints the top features by interaction
    p, how many have q < 0.05 over the whole family screened, and the same count under a label-permutation null
    and on a random-init model of the same shapes (docs/screening.md).
    """
    from ..screening import ALPHA, screen

    result = screen(checkpoint, design, model=model, points=point or None,
                    aggregate=aggregate,  # type: ignore[arg-type]  (checked by screen: one-line error)
                    batch_size=batch_size, device=device, out=out, top=top, overwrite=overwrite,
                    discover=None if all_items else discover, split_seed=split_seed, cards=cards,
                    cards_activations=cards_activations, method=method, steps=steps, clamps=clamp or (),
                    contrast=contrast, permutations=permutations, random_init=random_init, null_seed=null_seed,
                    precision=precision)
    s = result.summary
    split = s["split"]
    if split["confirmation"]:
        typer.echo(f"{s['design_name']}: screened {len(split['discovery'])} discovery items, "
                   f"{len(split['confirmation'])} held out for confirmation ({split['unit']}, seed {split['seed']}); "
                   f"model: {s['screen_model']}")
    else:
        typer.echo(f"{s['design_name']}: screened all {len(split['discovery'])} items (exploratory: none held out); "
                   f"model: {s['screen_model']}")
    typer.echo(f"{s['design_name']}: {s['n_stimuli']} stimuli, aggregate={s['aggregate']}, hook {s['hook']}, "
               f"points {', '.join(f'{p} ({n})' for p, n in s['features_per_point'].items())}")
    null_cols = [c for c in ("p_perm", "p_perm_fwer", "p_random_init") if c in result.table.columns]
    if result.top:
        typer.echo(format_table(result.top, ["point", "feature", "F_ab", "p_ab", "q_ab", *null_cols]))
    elif top:
        typer.echo("no unflagged feature varies across the stimuli")
    if s["flagged"]:
        shown = s["flagged"][:top or 10]
        typer.echo(f"flagged as likely artifacts, not hits ({s['n_flagged']} in all, {s['n_flagged_q_below_alpha']} "
                   f"with q < {ALPHA}; first {len(shown)} by p):")
        typer.echo(format_table(shown, ["point", "feature", "F_ab", "q_ab", "artifact_flags"]))
    typer.echo(f"{s['baseline']} (BH over all points)")
    typer.echo(f"{s['n_hits']} hits: q < {ALPHA} and not flagged")
    if "attribution" in s:
        from ..screening_attribution import echo_attribution

        echo_attribution(s)
    for w in result.warnings:
        typer.echo(f"warning: {w}", err=True)
    for card in result.cards:
        promoted = ", ".join(repr(t["token"]) for t in card["output_direction"]["promoted"][:5])
        ctx = card["top_contexts"][0]["text"] if card["top_contexts"] else "(never fires)"
        typer.echo(f"card {card['point']} {card['feature']}: fires on {card['activation']['frequency']:.2%} of "
                   f"tokens; top context: {ctx}; promotes {promoted}")
    if out is not None:
        typer.echo(f"wrote {out}")
