"""`fis eval`: honest evaluation of joint-SAE checkpoints on held-out tokens, and comparison tables.

Per checkpoint (``eval.json``):
- reconstruction on held-out activations, per component setting (``sae``, ``sae+linear``,
  ``sae+interaction``, ``full``): MSE, FVU, L0; dead-latent fraction (never fired on the held-out tokens);
  parameter count per component;
- spliced into the model at the hook it was trained on (flaw 1), in the original scale (flaw 2), at the
  positions the harvest kept: KL(clean || spliced) per token and CE against the TRUE next token (flaw 7), with
  the zero-ablation baseline and the random-direction baseline of Gurnee 2024 (clean + a random direction with
  the norm of the reconstruction error), and SAELens' CE-loss-recovered and KL score;
- feature organisation (joint/sequential): rank correlations of separately parameterised per-latent norms
  against a shuffled baseline (flaw 5).

Averages: KL over the kept positions, CE over the predictions made at kept positions (the target is the next
token). Per-context values are kept so that relative improvements get bootstrap CIs over contexts.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .activations import ActivationStore
from .attach import Attached, attach
from . import recorded_paths
from .errors import FisError, FisWarning
from .fingerprint import own
from .io import atomic_path, refuse_link, write_json
from .model_identity import model_to_load, of_checkpoint, of_record, same_model
from .models import load_model
from .provenance import provenance
from .sae import COMPONENTS, load_checkpoint
from .sae.checkpoint import recorded_input
from .sae.metrics import bootstrap_relative_improvement, ce_per_token, ce_loss_recovered, kl_per_token, kl_score
from .sae.train import evaluate_reconstruction


@dataclass
class CheckpointEval:
    """Summary numbers plus per-context arrays (for bootstrap CIs across checkpoints)."""

    name: str
    summary: dict[str, Any]
    per_context: dict[str, np.ndarray] = field(default_factory=dict)


def _components(attached: Attached) -> tuple[str, ...]:
    return COMPONENTS if attached.joint.nfm is not None else ("sae",)


def _random_direction_like(err: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    r = torch.randn(err.shape, generator=gen, dtype=err.dtype).to(err.device)
    return r / r.norm(dim=-1, keepdim=True).clamp_min(1e-12) * err.norm(dim=-1, keepdim=True)


@torch.no_grad()
def spliced_metrics(attached: Attached, contexts: torch.Tensor, batch_size: int = 8, seed: int = 0,
                    progress: bool = False) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """KL and CE of every splice condition over ``contexts`` [N, T] (see module docstring)."""
    from tqdm.auto import tqdm

    split, splice = attached.split, attached.splice
    comps = _components(attached)
    gen = torch.Generator().manual_seed(seed)
    sums: dict[str, list[np.ndarray]] = {}

    def record(name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
        per_ctx = (values * mask).sum(1) / mask.sum(1).clamp_min(1)
        sums.setdefault(name, []).append(per_ctx.double().cpu().numpy())
        sums.setdefault(name + "@n", []).append(mask.sum(1).double().cpu().numpy())

    for start in tqdm(range(0, len(contexts), batch_size), disable=not progress, desc="eval"):
        tokens = contexts[start:start + batch_size].to(split.device)
        resid, state = split.prefix(tokens)
        keep = splice.keep_mask(tokens, resid)
        clean = split.suffix(resid, state)
        pred_mask = keep[:, :-1].float()
        conditions: dict[str, torch.Tensor] = {}
        for comp in comps:
            conditions[comp] = splice.reconstruct(resid, keep, comp)
        zero = resid.clone()
        zero[keep] = 0
        conditions["zero"] = zero
        for comp in ("sae", "full") if "full" in comps else ("sae",):
            err = conditions[comp][keep] - resid[keep]
            rand = resid.clone()
            rand[keep] = resid[keep] + _random_direction_like(err, gen)
            conditions[f"random@{comp}"] = rand
        ce_clean, _ = ce_per_token(clean, tokens)
        record("ce/clean", ce_clean, pred_mask)
        for name, edited in conditions.items():
            logits = split.suffix(edited, state)
            record(f"kl/{name}", kl_per_token(clean, logits)[:, :-1], pred_mask)
            ce, _ = ce_per_token(logits, tokens)
            record(f"ce/{name}", ce, pred_mask)
    per_context = {k: np.concatenate(v) for k, v in sums.items()}
    out: dict[str, dict[str, float]] = {}
    weights = per_context["ce/clean@n"]
    pooled = {k: float(np.average(v, weights=weights)) for k, v in per_context.items() if not k.endswith("@n")}
    ce_clean = pooled["ce/clean"]
    for name in [c for c in per_context if c.startswith("kl/") and not c.endswith("@n")]:
        cond = name[3:]
        row = {"kl": pooled[name], "ce": pooled[f"ce/{cond}"]}
        if cond != "zero":
            row["ce_recovered"] = ce_loss_recovered(ce_clean, row["ce"], pooled["ce/zero"])
            row["kl_score"] = kl_score(row["kl"], pooled["kl/zero"])
        out[cond] = row
    out["clean"] = {"kl": 0.0, "ce": ce_clean}
    return out, per_context


def _canonical_hook(hook: str | None) -> str | None:
    """``blocks.L.hook_resid_post`` and its alias ``blocks.L.hook_out`` name the same value."""
    return hook.replace("hook_resid_post", "hook_out") if hook else hook


@torch.no_grad()
def _reconstruction(attached: Attached, store: ActivationStore, batch_size: int, max_tokens: int
                    ) -> tuple[dict[str, dict[str, float]], float, int]:
    joint = attached.joint
    device = next(joint.parameters()).device
    # raw activations through the checkpoint's own normalisation (the harvest's, or none for a SAELens SAE)
    x = attached.splice.inputs(store.activations("heldout", normalized=False)[:max_tokens].to(device))
    if len(x) == 0:
        raise FisError("the held-out split is empty", source=store.folder, fix="harvest more tokens")
    batches = list(torch.split(x, batch_size))
    recon = evaluate_reconstruction(joint, batches, _components(attached), invert=attached.splice.normalizer.invert)
    fired = torch.zeros(joint.sae.d_sae, dtype=torch.bool, device=device)
    for b in batches:
        latents = joint(b, "sae").latents
        fired[latents.indices[latents.values > 0]] = True
    return recon, float((~fired).float().mean()), len(x)


def evaluate(checkpoint: Path | str, activations: Path | str | None = None, *, model: str | None = None,
             bridge: Any = None, max_contexts: int = 64, max_tokens: int = 20_000, batch_size: int = 8,
             seed: int = 0, device: str = "auto", organisation: bool = True, out: Path | None = None,
             progress: bool = True, name: str | None = None) -> CheckpointEval:
    """Evaluate one checkpoint (see module docstring); write ``eval.json`` into the checkpoint folder or ``out``."""
    ckpt = load_checkpoint(Path(checkpoint))
    train_cfg = ckpt.train_config or {}
    acts = activations or recorded_input(ckpt, "activations", marker="manifest.json")
    if not acts:
        raise FisError("no activation folder given or recorded in the checkpoint", source=ckpt.path,
                       field="activations", fix="pass --activations FOLDER")
    store = ActivationStore(Path(acts), heldout_fraction=train_cfg.get("heldout_fraction", 0.1))
    other_model = ckpt.model_name is not None and not same_model(  # None: a SAELens SAE
        of_checkpoint(ckpt), of_record(store.manifest, "model"))
    if _canonical_hook(store.manifest["hook"]) != _canonical_hook(ckpt.hook) or other_model:
        raise FisError(f"activations are from {store.manifest['model']} at {store.manifest['hook']}, the checkpoint "
                       f"from {ckpt.model_name} at {ckpt.hook}", source=acts, field="activations",
                       fix="evaluate on activations harvested at the checkpoint's hook")
    bridge = bridge if bridge is not None else load_model(
        model_to_load(ckpt.model_name or store.manifest["model"], model, source=ckpt.path), device=device)
    attached = attach(bridge, ckpt)
    contexts = store.contexts("heldout")[:max_contexts]  # every input checked before the first pass
    if len(contexts) == 0:
        raise FisError("no held-out contexts to splice (spliced KL/CE need at least 1, their confidence "
                       f"intervals {MIN_CI_CONTEXTS})", source=store.folder, field="heldout_fraction",
                       fix="harvest more tokens, raise heldout_fraction, or pass --max-contexts >= 1")
    target = Path(out) if out else eval_folder(ckpt)
    check_writable(target, ("eval.json", "eval_per_context.npz", "organisation.png"))
    recon, dead, n_heldout = _reconstruction(attached, store, 1024, max_tokens)
    spliced, per_context = spliced_metrics(attached, contexts, batch_size=batch_size, seed=seed, progress=progress)
    from .sae.metrics import param_counts

    summary: dict[str, Any] = {
        "checkpoint": str(Path(ckpt.path).resolve()),
        "name": name or (ckpt.path.parent.name if ckpt.path.name == "checkpoint" else ckpt.path.name),
        "mode": train_cfg.get("mode"), "model": ckpt.model_name, "hook": ckpt.hook,
        "architecture": ckpt.meta.get("architecture"), "params": param_counts(attached.joint),
        "train_config": train_cfg, "refit_of": _refit_of(ckpt.path),
        "reconstruction": recon, "dead_fraction_heldout": dead, "spliced": spliced,
        "n_heldout_tokens": n_heldout,
        "n_heldout_contexts": int(len(contexts)), "seed": seed,
        "definitions": {"fvu": "sum squared error / sum squared deviation from the held-out mean, pooled",
                        "mse_raw": "squared error per element in the residual stream's own units (normalisation "
                                   "inverted; comparable across checkpoints); mse: the same in the SAE's input "
                                   "space (normalised for fis checkpoints, raw for SAELens SAEs)",
                        "kl": "KL(clean || spliced) in nats, mean over kept positions",
                        "ce": "cross-entropy of the true next token, mean over predictions at kept positions",
                        "ce_recovered": "(ce_zero - ce) / (ce_zero - ce_clean)", "kl_score": "1 - kl / kl_zero",
                        "random@c": "clean + random direction with the norm of component c's error"},
    }
    if organisation and attached.joint.nfm is not None:
        from .sae.organisation import organisation_tests

        summary["organisation"] = organisation_tests(attached.joint, n_permutations=1000, seed=seed).to_dict("records")
    summary["provenance"] = provenance(seed)
    summary["inputs"] = recorded_paths.record_all({"checkpoint": ckpt.path, "activations": acts}, target)
    own(target, ["eval.json", "eval_per_context.npz", "organisation.png"])  # a training folder lists them
    if organisation and attached.joint.nfm is not None:
        summary["organisation_figure"] = str(organisation_figure(attached.joint, target / "organisation.png"))
    write_json(target / "eval.json", summary)
    with atomic_path(target / "eval_per_context.npz") as tmp, tmp.open("wb") as fh:
        np.savez(fh, **per_context)
    return CheckpointEval(summary["name"], summary, per_context)


def check_writable(folder: Path, names: tuple[str, ...]) -> None:
    """Refuse, before any work, an output that cannot be written: a link in place of the folder or a file, or
    a path that exists and is not a folder (the write would otherwise fail after the whole evaluation)."""
    folder = Path(folder)
    refuse_link(folder)
    if folder.exists() and not folder.is_dir():
        raise FisError("is a file, not a folder", source=folder, fix="choose another --out folder")
    for name in names:
        refuse_link(folder / name)


def eval_folder(ckpt: Any) -> Path:
    """Where ``eval.json`` goes by default: the run folder of a fis checkpoint (``RUN/checkpoint`` -> ``RUN``);
    a SAELens SAE's own folder (its parent is shared by sibling SAEs, whose evaluations would overwrite each
    other there)."""
    return ckpt.path if ckpt.meta.get("format") == "saelens" else ckpt.path.parent


def organisation_figure(joint: Any, path: Path) -> Path:
    """Histograms of each latent's decoder squared norm, linear-part norm and interaction-embedding norm, and
    the scatter of decoder norm against embedding norm (the association `organisation_tests` quantifies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .sae.organisation import feature_norms

    norms = feature_norms(joint)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, col in zip(axes, ("decoder_sq_norm", "linear_norm", "embedding_norm"), strict=False):
        ax.hist(norms[col], bins=50, color="#4c72b0")
        ax.set_title(col.replace("_", " "))
        ax.set_ylabel("latents")
    axes[3].scatter(norms["decoder_sq_norm"], norms["embedding_norm"], s=3, alpha=0.4)
    axes[3].set_xlabel("decoder squared norm")
    axes[3].set_ylabel("interaction embedding norm")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _refit_of(path: Path) -> str | None:
    metrics = path / "metrics.json"
    if not metrics.exists():
        return None
    try:
        return json.loads(metrics.read_text(encoding="utf-8")).get("refit_of")
    except (json.JSONDecodeError, AttributeError):
        return None


MIN_CI_CONTEXTS = 2  # a bootstrap over contexts needs at least two of them


def _relative_ci(baseline: np.ndarray, method: np.ndarray, seed: int) -> dict[str, float | None]:
    """Bootstrap CI of a relative improvement; identical inputs (e.g. a frozen, shared SAE) give exactly 0.

    With fewer than :data:`MIN_CI_CONTEXTS` held-out contexts there is nothing to resample: the estimate
    stays, the interval is ``None`` (printed empty) and the table's notes say why."""
    if np.array_equal(baseline, method):
        return {"estimate": 0.0, "low": 0.0, "high": 0.0}
    if np.asarray(baseline).size < MIN_CI_CONTEXTS:
        mean = float(np.mean(baseline))
        estimate = (mean - float(np.mean(method))) / mean if mean else float("nan")
        return {"estimate": estimate, "low": None, "high": None}
    return bootstrap_relative_improvement(baseline, method, seed=seed)


def _ci(ci: dict[str, float | None]) -> list[float] | None:
    return None if ci["low"] is None else [ci["low"], ci["high"]]


def _per_ctx(ev: CheckpointEval, key: str) -> np.ndarray:
    return ev.per_context[key]


def comparison_table(evals: list[CheckpointEval], baseline: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Side-by-side table of checkpoints x components, with relative improvements and bootstrap 95% CIs.

    Relative improvements of KL are computed per held-out context (same contexts for every checkpoint) against
    (a) the standalone SAE (``baseline``: the first checkpoint of mode ``sae`` unless named) and (b) the same
    checkpoint's own SAE path (what the paper reported). FVU reductions are pooled ratios. The interaction
    part's marginal gain (full vs sae+linear) gets its own column.
    """
    if not evals:
        raise FisError("nothing to compare", fix="pass one or more checkpoints")
    base = next((e for e in evals if (baseline and e.name == baseline) or (not baseline and e.summary["mode"] == "sae")),
                None)
    rows = []
    for ev in evals:
        s = ev.summary
        for comp, rec in s["reconstruction"].items():
            sp = s["spliced"][comp]
            row = {"checkpoint": ev.name, "mode": s["mode"], "components": comp, "fvu": rec["fvu"],
                   "mse_raw": rec.get("mse_raw"), "l0": rec["l0"], "kl": sp["kl"], "ce": sp["ce"],
                   "ce_recovered": sp["ce_recovered"], "kl_score": sp["kl_score"],
                   "params": _params_for(s["params"], comp)}
            own = s["reconstruction"]["sae"]
            row["fvu_vs_own_sae"] = 1 - rec["fvu"] / own["fvu"] if comp != "sae" else None
            if comp != "sae":
                ci = _relative_ci(_per_ctx(ev, "kl/sae"), _per_ctx(ev, f"kl/{comp}"), seed)
                row["kl_vs_own_sae"], row["kl_vs_own_sae_ci"] = ci["estimate"], _ci(ci)
            if base is not None:
                b_rec = base.summary["reconstruction"]["sae"]
                row["fvu_vs_standalone"] = 1 - rec["fvu"] / b_rec["fvu"]
                if base is not ev or comp != "sae":
                    ci = _relative_ci(_per_ctx(base, "kl/sae"), _per_ctx(ev, f"kl/{comp}"), seed)
                    row["kl_vs_standalone"], row["kl_vs_standalone_ci"] = ci["estimate"], _ci(ci)
            rows.append(row)
        if "full" in s["reconstruction"]:
            full, lin = s["reconstruction"]["full"], s["reconstruction"]["sae+linear"]
            ci = _relative_ci(_per_ctx(ev, "kl/sae+linear"), _per_ctx(ev, "kl/full"), seed)
            rows.append({"checkpoint": ev.name, "mode": s["mode"], "components": "interaction gain (full vs sae+linear)",
                         "fvu": full["fvu"] - lin["fvu"], "kl": s["spliced"]["full"]["kl"] - s["spliced"]["sae+linear"]["kl"],
                         "fvu_vs_own_sae": 1 - full["fvu"] / lin["fvu"], "kl_vs_own_sae": ci["estimate"],
                         "kl_vs_own_sae_ci": _ci(ci)})
    baselines = []
    for ev in evals:
        sp = ev.summary["spliced"]
        for cond in ("zero", "random@sae", "random@full"):
            if cond in sp:
                baselines.append({"checkpoint": ev.name, "condition": cond, "kl": sp[cond]["kl"], "ce": sp[cond]["ce"]})
        baselines.append({"checkpoint": ev.name, "condition": "clean", "kl": 0.0, "ce": sp["clean"]["ce"]})
    few = sorted({int(ev.summary.get("n_heldout_contexts", MIN_CI_CONTEXTS)) for ev in evals
                  if int(ev.summary.get("n_heldout_contexts", MIN_CI_CONTEXTS)) < MIN_CI_CONTEXTS})
    omitted = [f"confidence intervals omitted: {few[0]} held-out context(s), a bootstrap needs at least "
               f"{MIN_CI_CONTEXTS} (harvest more tokens, raise heldout_fraction or --max-contexts)"] if few else []
    if omitted:
        warnings.warn(omitted[0], FisWarning, stacklevel=2)
    return {"baseline": base.name if base else None, "table": rows, "baselines": baselines,
            "seeds": seed_summary(evals),
            "notes": omitted + ["fvu_vs_* and kl_vs_* are relative reductions (positive = better than the reference)",
                      "vs_own_sae: against the same checkpoint's SAE path alone (the paper's reference, flaw 4)",
                      "vs_standalone: against an independently trained SAE of the same size",
                      "the linear part reads the same latents as the SAE decoder: compare it with an "
                      "unconstrained-decoder SAE; nonlinear integration is the 'interaction gain' row"]}


def seed_summary(evals: list[CheckpointEval]) -> list[dict[str, Any]]:
    """Mean and SD over checkpoints that differ only in their seed (same training config otherwise)."""
    groups: dict[str, list[CheckpointEval]] = {}
    for ev in evals:
        cfg = dict(ev.summary.get("train_config") or {})
        cfg.pop("seed", None)
        cfg["refit"] = ev.summary.get("refit_of") is not None  # a refit is a different method, not a seed
        groups.setdefault(json.dumps(cfg, sort_keys=True, default=str), []).append(ev)
    rows = []
    for members in groups.values():
        if len(members) < 2:
            continue
        for comp in members[0].summary["reconstruction"]:
            vals = {m: np.array([_metric(e.summary, comp, m) for e in members]) for m in ("fvu", "kl", "ce")}
            rows.append({"checkpoints": [e.name for e in members], "mode": members[0].summary["mode"],
                         "components": comp, "n_seeds": len(members),
                         **{f"{m}_mean": float(v.mean()) for m, v in vals.items()},
                         **{f"{m}_sd": float(v.std(ddof=1)) for m, v in vals.items()}})
    return rows


def _metric(summary: dict[str, Any], comp: str, metric: str) -> float:
    return summary["reconstruction"][comp]["fvu"] if metric == "fvu" else summary["spliced"][comp][metric]


def _params_for(params: dict[str, int], comp: str) -> int:
    """Parameters a component setting uses (the secondary SAE is an analysis tool, not part of the recon)."""
    total = params.get("sae", 0)
    if "linear" in comp or comp == "full":
        total += params.get("linear", 0)
    if "interaction" in comp or comp == "full":
        total += params.get("interaction", 0)
    return total


def format_table(table: dict[str, Any]) -> str:
    """Plain-text rendering of a comparison table (what `fis eval` prints)."""
    df = pd.DataFrame(table["table"])
    for col in [c for c in df.columns if c.endswith("_ci")]:
        df[col] = df[col].map(lambda v: f"[{v[0]:+.3f}, {v[1]:+.3f}]" if isinstance(v, list) else "")
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format",
                           lambda v: f"{v:.4g}" if not math.isnan(v) else ""):
        text = df.to_string(index=False, na_rep="")
        text += "\n\nbaselines:\n" + pd.DataFrame(table["baselines"]).to_string(index=False)
        if table.get("seeds"):
            text += "\n\nacross seeds (mean, sd):\n" + pd.DataFrame(table["seeds"]).to_string(index=False)
    return text + "\n\n" + "\n".join("note: " + n for n in table["notes"])


def evaluate_many(checkpoints: list[Path], *, activations: Path | None = None, json_out: Path | None = None,
                  device: str = "auto", bridge: Any = None, model: str | None = None,
                  **kwargs: Any) -> tuple[dict[str, Any], str]:
    """`fis eval A B C`: evaluate each checkpoint on the same held-out contexts and build the comparison.
    ``model``: the model (name or path) when the recorded one was moved; checked by content."""
    if json_out is not None:  # before any checkpoint is evaluated
        refuse_link(Path(json_out))
        if Path(json_out).is_dir():
            raise FisError("is a folder", source=json_out, field="--json", fix="name a file, e.g. eval.json")
    evals = []
    for ckpt in checkpoints:
        if bridge is None:
            loaded = load_checkpoint(Path(ckpt))
            name = loaded.model_name
            if name is None and activations is not None:  # a SAELens SAE: the model the activations came from
                name = ActivationStore(Path(activations)).manifest["model"]
            bridge = load_model(model_to_load(name, model, source=loaded.path, default="smollm2-135m"),
                                device=device)
        evals.append(evaluate(ckpt, activations, bridge=bridge, model=model, **kwargs))
    table = comparison_table(evals, seed=kwargs.get("seed", 0))
    if json_out is not None:
        write_json(Path(json_out), {**table, "evals": [e.summary for e in evals], "provenance": provenance()})
    return table, format_table(table)
