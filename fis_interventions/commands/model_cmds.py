"""`fis model info`, `fis harvest`, `fis demo`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..cli import app, model_app


@model_app.command("info")
def info_cmd(model: Annotated[str, typer.Argument(help="built-in name, HF folder or .gguf file")] = "smollm2-135m",
             device: str = "auto", dtype: str = "float32",
             as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Print a model's dimensions, layers, hook points and tokenizer facts."""
    from ..models import model_info

    data = model_info(model, device=device, dtype=dtype)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    tok = data.pop("tokenizer")
    per_block = data.pop("hook_points_per_block")
    other = data.pop("hook_points_other")
    for key, value in data.items():
        typer.echo(f"{key:>14}: {value}")
    typer.echo(f"{'tokenizer':>14}: {tok['class']}, vocab {tok['vocab_size']}, BOS {tok['bos']!r} ({tok['bos_id']}),"
               f" EOS {tok['eos']!r} ({tok['eos_id']}), pad {tok['pad']!r}")
    typer.echo(f"{'special':>14}: {', '.join(tok['special_tokens'])}")
    typer.echo(f"{'hook points':>14}: blocks.<0..{data['n_layers'] - 1}>.{{{', '.join(per_block)}}}")
    typer.echo(f"{'':>14}  {', '.join(other)}")


@app.command("harvest")
def harvest_cmd(
    out: Annotated[Path, typer.Option(help="output folder (rerun to resume)")] = Path("runs/activations"),
    model: str = "smollm2-135m",
    hook: Annotated[Optional[str], typer.Option(help="hook point; default the middle layer's hook_resid_post")] = None,
    corpus: Annotated[Optional[list[str]], typer.Option(help="default, a .txt/.md file, a folder, or .jsonl; repeatable")] = None,
    tokens: int = 50_000,
    context_length: int = 128,
    batch_size: int = 16,
    contexts_per_shard: int = 64,
    dtype: str = "float32",
    store_dtype: str = "float32",
    device: str = "auto",
    normalization: str = "expected_norm",
    norm_multiple: Annotated[float, typer.Option(help="exclude positions with norm > this x median (0: off)")] = 10.0,
    overwrite: Annotated[bool, typer.Option(help="replace a harvest with other settings in --out")] = False,
    shard: Annotated[Optional[str], typer.Option(help="i/n: harvest this process's slice into the same --out "
                                                 "(default: RANK/WORLD_SIZE under torchrun)")] = None,
    progress: bool = True,
) -> None:
    """Harvest activations at a hook point into resumable shards with a manifest (same settings resume)."""
    from ..activations import HarvestConfig, harvest
    from ..config import validate

    cfg = validate(HarvestConfig, dict(out=out, model=model, hook=hook, corpus=corpus or ["default"], tokens=tokens,
                                       context_length=context_length, batch_size=batch_size,
                                       contexts_per_shard=contexts_per_shard, dtype=dtype, store_dtype=store_dtype,
                                       device=device, normalization=normalization,
                                       norm_multiple=norm_multiple or None), source="fis harvest")
    manifest = harvest(cfg, progress=progress, overwrite=overwrite, shard=shard)
    if not manifest.get("complete") or "rank" in manifest:
        typer.echo(f"harvested slice {manifest['rank']}/{manifest['shard_of']}: {manifest['token_count']} tokens "
                   f"into {out}; manifest.json is written when the last slice finishes")
        return
    typer.echo(f"harvested {manifest['token_count']} tokens at {manifest['hook']} of {manifest['model']} into {out} "
               f"(excluded: {manifest['excluded']['special']} special, {manifest['excluded']['massive']} massive)")


@app.command("demo")
def demo_cmd(out: Annotated[Path, typer.Option(help="where the demo writes its runs")] = Path("runs/demo"),
             quick: Annotated[bool, typer.Option(help="tiny sizes (smoke test)")] = False,
             model: Annotated[str, typer.Option(help="model (default: the embedded SmolLM2)")] = "smollm2-135m",
             progress: bool = True) -> None:
    """Run the whole pipeline on the embedded defaults (what `make demo` runs)."""
    from ..demo import demo

    demo(out=out, quick=quick, model=model, echo=typer.echo, progress=progress)
