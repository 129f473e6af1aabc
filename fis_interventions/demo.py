"""`fis demo`: the main job on the embedded defaults, end to end, within ~15 minutes on 2 CPU cores."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from .activations import harvest
from .models import DEFAULT_MODEL, greedy_continuation, load_model


def demo(out: Path = Path("runs/demo"), quick: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Load the default model, show it works, harvest activations; later stages extend this."""
    t0 = time.perf_counter()
    bridge = load_model(DEFAULT_MODEL)
    prompt = "The capital of France is"
    echo(f"[model] {DEFAULT_MODEL}: {prompt!r} -> {greedy_continuation(bridge, prompt)!r}")
    manifest = harvest(bridge=bridge, model=DEFAULT_MODEL, out=Path(out) / "activations",
                       tokens=5_000 if quick else 50_000)
    echo(f"[harvest] {manifest['token_count']} tokens at {manifest['hook']} -> {Path(out) / 'activations'}")
    echo(f"[done] {time.perf_counter() - t0:.0f} s")
    return {"manifest": manifest}
