"""`fis power`: how many items detect the pilot's interaction, by simulating and refitting the primary model."""

from __future__ import annotations

from pathlib import Path

import typer

from ..cli import app
from ..errors import FisError


def parse_items(text: str) -> list[int]:
    """``"12,24,48"`` -> ``[12, 24, 48]``, one-line error otherwise."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise FisError(f"cannot parse --items {text!r}", field="--items", fix="write --items 12,24,48") from None
    if not values:
        raise FisError("--items is empty", field="--items", fix="write --items 12,24,48")
    return values


@app.command("power")
def power_command(
    pilot: Path | None = typer.Argument(None, help="Battery run folder or `fis stats --json` file (optional)."),
    out: Path | None = typer.Option(None, "--out", help="Folder for power.json, power.csv and power.png."),
    items: str = typer.Option("8,12,16,24,32,48,64,96,128", "--items", help="Item counts to simulate."),
    sims: int = typer.Option(1000, "--sims", help="Simulated data sets per item count."),
    seed: int = typer.Option(0, "--seed", help="Random seed (recorded in the output)."),
    alpha: float = typer.Option(0.05, "--alpha", help="Significance level of the interaction test."),
    effect: float | None = typer.Option(None, "--effect", help="Interaction (difference of differences)."),
    var_item: float | None = typer.Option(None, "--var-item", help="By-item intercept variance."),
    var_a: float | None = typer.Option(None, "--var-a", help="By-item slope variance of A."),
    var_b: float | None = typer.Option(None, "--var-b", help="By-item slope variance of B."),
    var_ab: float | None = typer.Option(None, "--var-ab", help="By-item slope variance of A:B."),
    var_resid: float | None = typer.Option(None, "--var-resid", help="Residual variance."),
    reps: int | None = typer.Option(None, "--reps", help="Observations per item x cell x prompt."),
    prompts: int | None = typer.Option(None, "--prompts", help="Prompts per item x cell (fixed below 5)."),
    var_prompt: float | None = typer.Option(None, "--var-prompt", help="Prompt intercept variance."),
    design: str | None = typer.Option(None, "--design", help="Pilot run: the design of the test."),
    feature: str | None = typer.Option(None, "--feature", help="Pilot run: the clamped feature."),
    intervention: str | None = typer.Option(None, "--intervention", help="Pilot run: the intervention."),
    value: float | None = typer.Option(None, "--value", help="Pilot run: the clamp value."),
    position: str | None = typer.Option(None, "--position", help="Pilot run: the clamp position."),
    readout: str | None = typer.Option(None, "--readout", help="Pilot run: the contrast readout."),
    sesoi: float | None = typer.Option(None, "--sesoi", help="Smallest effect of interest: used as the effect "
                                       "(a pilot effect picked for its p-value is inflated)."),
    family_size: int | None = typer.Option(None, "--family-size", help="Tests the confirmatory test is corrected "
                                           "with (default: the run's non-control features, else 1)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a power analysis of other settings in --out."),
) -> None:
    """Power of the A x B interaction test (primary mixed model) over a grid of item counts, with 95% CIs.

    Variance components and the effect come from the pilot (a battery run's test, or a fis stats JSON) or
    from the options, which also override the pilot. Prints the curve and the items needed for 80% / 90%.
    """
    from ..planning import power
    from .stats_cmds import format_table

    select = {"design": design, "feature": feature, "intervention": intervention, "value": value,
              "position": position, "readout": readout}
    result = power(pilot, out, parse_items(items), sims=sims, seed=seed, alpha=alpha,
                   select={k: v for k, v in select.items() if v is not None}, effect=effect, var_item=var_item,
                   var_a=var_a, var_b=var_b, var_ab=var_ab, var_resid=var_resid, reps=reps, prompts=prompts,
                   var_prompt=var_prompt, overwrite=overwrite, sesoi=sesoi, family_size=family_size)
    spec = result["spec"]
    for note in result["warnings"]:
        typer.echo(f"warning: {note}", err=True)
    typer.echo(f"model: {result['model']}")
    typer.echo("pilot: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in spec.items()))
    typer.echo(format_table(result["curve"], ["n_items", "power", "ci_low", "ci_high", "median_df"]))
    if result["family_size"] > 1:
        typer.echo(f"alpha {result['alpha']:g} / family of {result['family_size']} = {result['alpha_used']:.3g}")
    typer.echo(f"items for 80% power: {result['items_for_80'] or 'more than the grid'}; "
               f"for 90%: {result['items_for_90'] or 'more than the grid'} "
               f"({result['n_sims']} simulations each, seed {result['seed']}, "
               f"{'closed-form' if result['engine'] == 'closed' else 'full'} REML fits, "
               f"{result['seconds']:.1f} s)")
    if out is not None:
        typer.echo(f"wrote {out / 'power.json'}")
