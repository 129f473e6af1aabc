"""`fis demo`: the whole pipeline on the embedded defaults, within ~15 minutes on 2 CPU cores.

load model -> harvest -> train a standalone SAE and a joint model (+ secondary SAE) -> evaluate and compare
-> screen the paper's design on its discovery items -> battery on the top integration features and two controls,
on the held-out confirmation items (features are never tested on the items they were selected on) -> report.
Every stage writes its folder under ``out`` (configs as YAML beside the outputs), so each step can be rerun
alone with the CLI; rerunning the demo resumes finished stages instead of recomputing them.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .activations import harvest
from .evaluation import comparison_table, evaluate, format_table
from .fingerprint import own
from .io import atomic_path, write_json
from .models import DEFAULT_MODEL, default_hook, greedy_continuation, load_model, resolve_hook

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "stimuli" / "formality_emotion.yaml"

# Sizes that fit ~15 minutes on 2 CPU cores (full) or well under a minute on tiny-random (quick).
SIZES = {
    "full": dict(tokens=60_000, context_length=128, expansion=8, k=32, batch_size=512, train_tokens=512 * 300,
                 secondary_steps=150, eval_contexts=24, max_items=8, battery_batch=16),
    "quick": dict(tokens=3_000, context_length=32, expansion=2, k=8, batch_size=128, train_tokens=128 * 20,
                  secondary_steps=10, eval_contexts=4, max_items=3, battery_batch=16),
}


def _train_config(folder: Path, mode: str, s: dict[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(activations=str(folder), expansion=s["expansion"], k=s["k"], mode=mode,
                               batch_size=s["batch_size"], tokens=s["train_tokens"], lr=4e-4, warmup_steps=20,
                               lr_decay_to=0.1, grad_clip=1.0, eval_every=50, checkpoint_every=100,
                               heldout_fraction=0.1, seed=0, emb_dim=64, hidden=64)
    if mode == "joint":
        cfg["secondary"] = {"d_sae": 256, "k": 8, "steps": s["secondary_steps"]}
    return cfg


def demo(out: Path = Path("runs/demo"), quick: bool = False, model: str = DEFAULT_MODEL,
         report_dir: Path | None = None, echo: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Run the pipeline; return the paths and headline numbers of every stage."""
    from .interventions import BatteryConfig, battery
    from .reports import report
    from .screening import screen
    from .training import train

    s = SIZES["quick" if quick else "full"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stamp = lambda: f"{time.perf_counter() - t0:5.0f}s"  # noqa: E731

    bridge = load_model(model)
    prompt = "The capital of France is"
    echo(f"[{stamp()}] model {model}: {prompt!r} -> {greedy_continuation(bridge, prompt)!r}")

    acts = out / "activations"
    hook = resolve_hook(bridge, default_hook(bridge)).name
    manifest = harvest(bridge=bridge, model=model, hook=hook, out=acts, tokens=s["tokens"],
                       context_length=s["context_length"], progress=progress)
    echo(f"[{stamp()}] harvested {manifest['token_count']} tokens at {hook} (excluded "
         f"{manifest['excluded']['special']} special, {manifest['excluded']['massive']} massive) -> {acts}")

    ckpts = {}
    for mode in ("sae", "joint"):
        cfg = _train_config(acts, mode, s)
        (out / f"train_{mode}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        run = out / mode
        result = train(out / f"train_{mode}.yaml", run, resume=(run / "checkpoint" / "cfg.json").exists(),
                       progress=progress)
        ckpts[mode] = result.checkpoint
        echo(f"[{stamp()}] trained {mode}: {result.checkpoint}")

    evals = [evaluate(ckpts[m], bridge=bridge, max_contexts=s["eval_contexts"], progress=progress, name=m)
             for m in ("sae", "joint")]
    table = comparison_table(evals)
    write_json(out / "eval.json", {**table, "evals": [e.summary for e in evals]})
    echo(f"[{stamp()}] evaluation on held-out tokens:\n{format_table(table)}")

    screen_dir = out / "screen"
    result = screen(ckpts["joint"], DESIGN, model=model, bridge=bridge, out=screen_dir, progress=progress,
                    overwrite=True)  # the demo owns this folder (it holds our fingerprint, or the rule refuses)
    n_sig = int((result.table["q_ab"] < 0.05).sum())
    split = result.summary["split"]
    echo(f"[{stamp()}] screened {len(result.table)} features on {DESIGN.name} ({len(split['discovery'])} discovery "
         f"items; {len(split['confirmation'])} held out for the battery): {n_sig} with interaction q < 0.05")

    battery_cfg = {
        "name": "demo", "model": model, "checkpoint": str(ckpts["joint"]), "designs": [str(DESIGN)],
        "features": [
            {"from_screening": str(screen_dir), "point": "secondary.hook_latents", "top": 3, "role": "top"},
            {"point": "secondary.hook_latents", "random": 1, "role": "random_control"},
            {"top_linear": 1, "role": "linear_control"},
        ],
        "interventions": [{"kind": "scale", "values": [-4.0, 0.0, 1.0, 4.0]}],
        "seed": 0, "batch_size": s["battery_batch"], "out": str(out / "battery"), "max_items": s["max_items"],
    }
    (out / "battery.yaml").write_text(yaml.safe_dump(battery_cfg, sort_keys=False), encoding="utf-8")
    store = battery(BatteryConfig.model_validate(battery_cfg), bridge=bridge, progress=progress)
    echo(f"[{stamp()}] battery results: {store}")
    own(out / "battery", ["screening.csv", "eval.json"])  # the report reads them beside the results
    with atomic_path(out / "battery" / "screening.csv") as tmp:
        shutil.copy(screen_dir / "screening.csv", tmp)
    write_json(out / "battery" / "eval.json", table)

    rep = report(out / "battery", out=report_dir or (ROOT / "reports" / "demo" if not quick else out / "report"))
    html = Path(rep) / "report.html" if Path(rep).is_dir() else Path(rep)
    echo(f"[{stamp()}] report: {html}")
    return {"activations": acts, "checkpoints": ckpts, "eval": table, "screen": screen_dir, "battery": store,
            "report": html}
