"""The training loop: phases of small trainers over a stream of normalised activation batches.

``train(cfg, batches, out_dir)`` takes float32 batches [B, d_in] (already normalised by the caller, whose
normalisation dict is stored in the checkpoint), reserves the first batches as held-out, and runs the phases
of ``cfg.mode`` (sae | joint | sequential = sae then NFM on the frozen SAE), then the optional secondary SAE.
Output folder::

    metrics.jsonl   one JSON line per logged step (train) and per evaluation (heldout)
    checkpoint/     the latest checkpoint (see :mod:`.checkpoint`), rewritten atomically

Resuming restores weights, optimiser, dead-latent counters, the torch RNG and the data position, so on CPU an
interrupted and resumed run ends bit-for-bit where an uninterrupted one does.

Under ``torchrun`` (a process group initialised, see :mod:`fis_interventions.distributed`) each rank passes
its own slice of every global batch; the trainers average gradients, and only rank 0 evaluates and writes
metrics, progress and checkpoints. ``tokens_seen`` counts the global batch.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..errors import FisError
from ..fingerprint import own
from ..io import atomic_path, refuse_link
from ..model_identity import ModelId
from ..models import resolve_device
from ..provenance import seed_everything
from .checkpoint import load_checkpoint, load_train_state, save_checkpoint
from .config import TrainConfig
from .metrics import l0
from .model import COMPONENTS, JointArch, JointSAE
from .trainers import (JointTrainer, NonFiniteLoss, SAETrainer, SecondaryTrainer, SequentialTrainer,
                       Trainer, stats_to_floats)

log = logging.getLogger(__name__)

Batches = Iterable[torch.Tensor] | Callable[[int], Iterable[torch.Tensor]]
TRAINERS: dict[str, type[Trainer]] = {"sae": SAETrainer, "joint": JointTrainer, "sequential": SequentialTrainer,
                                      "secondary": SecondaryTrainer}
MAX_HELDOUT_BATCHES = 16  # held-out set kept in memory: enough batches for stable MSE/FVU, bounded RAM
LOG_EVERY = 10


@dataclass
class TrainResult:
    """Where the checkpoint is, the trained model, and whether the whole budget was used."""

    checkpoint: Path
    model: JointSAE
    step: int
    complete: bool
    metrics: dict[str, Any] = field(default_factory=dict)


def phases(cfg: TrainConfig) -> list[tuple[str, int]]:
    """(phase name, steps) in order; ``tokens`` is the budget of each main phase."""
    steps = cfg.steps()
    if cfg.mode == "sequential":
        out = ([] if cfg.sae_checkpoint else [("sae", steps)]) + [("sequential", steps)]
    else:
        out = [(cfg.mode, steps)]
    if cfg.secondary is not None:
        out.append(("secondary", cfg.secondary.steps))
    return out


@torch.no_grad()
def evaluate_reconstruction(model: JointSAE, batches: Iterable[torch.Tensor],
                            components: Iterable[str] | None = None, invert: Any = None
                            ) -> dict[str, dict[str, float]]:
    """Pooled MSE (mean per element), FVU and L0 of each component setting over the given batches.

    ``mse`` is in the model's input space (normalised for our checkpoints, raw for a SAELens SAE); with
    ``invert`` (the normaliser's inverse) ``mse_raw`` is added, in the residual stream's own units, the one MSE
    that compares across checkpoints."""
    if components is None:
        components = COMPONENTS if model.nfm is not None else ("sae",)
    was_training = model.training
    model.eval()
    sums: dict[str, list[float]] = {c: [0.0, 0.0, 0.0, 0.0, 0.0] for c in components}  # sq err, sq dev, l0, n, raw
    xs = list(batches)
    mean = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double().mean(0)
    for x in xs:
        for comp in components:
            out = model(x, comp)
            s = sums[comp]
            s[0] += float((out.recon - x).double().square().sum())
            s[1] += float((x.double() - mean).square().sum())
            s[2] += float(l0(out.latents)) * x.shape[0]
            s[3] += x.shape[0]
            if invert is not None:
                s[4] += float((invert(out.recon) - invert(x)).double().square().sum())
    model.train(was_training)
    d = xs[0].shape[-1]
    return {c: {"mse": s[0] / (s[3] * d), "fvu": s[0] / s[1], "l0": s[2] / s[3],
                **({"mse_raw": s[4] / (s[3] * d)} if invert is not None else {})} for c, s in sums.items()}


def _take(it: Iterator[torch.Tensor], n: int) -> list[torch.Tensor]:
    return list(itertools.islice(it, n))


class _Stream:
    """Held-out batches first, then training batches from a data position (seekable when ``batches`` is a
    callable ``start -> iterable``; a plain iterable is read and skipped)."""

    def __init__(self, batches: Batches, n_heldout: int, position: int) -> None:
        if callable(batches):
            self.heldout = _take(iter(batches(0)), n_heldout)
            self.it = iter(batches(max(position, n_heldout)))
        else:
            self.it = iter(batches)
            self.heldout = _take(self.it, n_heldout)
            for _ in itertools.islice(self.it, max(0, position - n_heldout)):
                pass


def _check_batch(x: Any, d_in: int | None, position: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise FisError(f"batch {position} is {got}, expected a [batch, d_in] tensor", field="activations")
    if d_in is not None and x.shape[1] != d_in:
        raise FisError(f"batch {position} has width {x.shape[1]}, expected d_in={d_in}", field="activations",
                       fix="all shards must come from the same hook point")
    return x


class _MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, lines after the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        refuse_link(path)
        own(path.parent, [path.name])
        if resume_step is None:
            with atomic_path(path) as tmp:
                tmp.write_text("", encoding="utf-8")
        elif path.exists():
            keep = [ln for ln in path.read_text(encoding="utf-8").splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            with atomic_path(path) as tmp:
                tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def train(cfg: TrainConfig, batches: Batches, out_dir: Path, *, resume: bool = False, progress: bool = True,
          normalization: dict[str, Any] | None = None, heldout: list[torch.Tensor] | None = None,
          model_name: str | None = None, hook: str | None = None, model_sha256: str | None = None) -> TrainResult:
    """Train ``cfg.mode`` on normalised batches; write ``out_dir/metrics.jsonl`` and ``out_dir/checkpoint``.

    ``batches``: an iterable of [B, d_in] float tensors, or a callable ``start -> iterable`` that starts at
    batch ``start`` (lets a shard reader seek on resume). If ``heldout`` is not given, the first
    ``ceil(heldout_fraction * steps)`` batches (at most 16) are held out and never trained on.
    ``model_name``/``hook`` (default ``cfg.model``/``cfg.hook``) are recorded in the checkpoint; training from
    a shard folder passes the ones in its manifest (with ``model_sha256``, the model's content identity).
    """
    model_name = model_name or cfg.model
    expected = ModelId(model_name, model_sha256)  # a resumed or frozen checkpoint must be of this model
    hook = hook or cfg.hook
    world = distributed.current()
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoint"
    # master weights, optimiser state and batches are float32 whatever cfg.dtype (bf16 = autocast, trainers.py)
    device, dtype = resolve_device(cfg.device), torch.float32
    plan = phases(cfg)
    total = sum(n for _, n in plan)

    state: dict[str, Any] | None = None
    if resume:
        if not (ckpt_dir / "cfg.json").exists():
            raise FisError("nothing to resume: no checkpoint in this folder", source=out_dir,
                           fix="run without --resume to start")
        ckpt = load_checkpoint(ckpt_dir, expect_model=expected, expect_hook=hook, device=device)
        if ckpt.train_config != cfg.model_dump(mode="json"):
            raise FisError("the config differs from the one this checkpoint was trained with", source=out_dir,
                           fix="resume with the same config, or start a new run in another folder")
        model, state = ckpt.model, load_train_state(ckpt_dir)
        normalization = ckpt.normalization if normalization is None else normalization
        if state["step"] >= total:
            log.info("checkpoint is already complete (%d steps)", state["step"])
            return TrainResult(ckpt_dir, model, state["step"], True, ckpt.meta)
    elif (ckpt_dir / "cfg.json").exists():
        raise FisError("already holds a checkpoint", source=out_dir,
                       fix="pass --resume to continue it, or choose another output folder")

    n_heldout = 0 if heldout is not None else min(MAX_HELDOUT_BATCHES,
                                                  math.ceil(cfg.heldout_fraction * cfg.steps()))
    position = state["position"] if state else n_heldout  # counts held-out batches read from the stream
    stream = _Stream(batches, n_heldout, position)
    held = [(_check_batch(x, None, i)).to(device, dtype) for i, x in enumerate(heldout or stream.heldout)]
    pending: list[torch.Tensor] = []
    if held:
        d_in = held[0].shape[1]
    else:
        first = next(stream.it, None)
        if first is None:
            raise FisError("no activation batches were given", field="activations")
        d_in = _check_batch(first, None, position).shape[1]
        pending = [first]
    it = itertools.chain(pending, stream.it)
    for i, x in enumerate(held):
        _check_batch(x, d_in, i)

    if state is None:
        seed_everything(cfg.seed)
        model = JointSAE(_arch(cfg, d_in, expected, hook)).to(device, dtype)
        if cfg.sae_checkpoint is not None:
            _load_frozen_sae(model, cfg, d_in, expected, hook, normalization)
        step = 0
    else:
        step = state["step"]
        torch.set_rng_state(state["rng"])
    distributed.broadcast_parameters(model.state_dict().values())
    if model.cfg.sae.d_in != d_in:
        raise FisError(f"activations have d_in={d_in}, the checkpoint expects {model.cfg.sae.d_in}",
                       field="activations", fix="use activations from the checkpoint's hook point")

    metrics_log = _MetricsLog(out_dir / "metrics.jsonl", step if state else None) if world.is_main else None
    tokens_seen = state["tokens_seen"] if state else 0
    last_ckpt = step if state else None
    trainer: Trainer | None = None
    last: dict[str, Any] = {}
    bar = tqdm(total=total, initial=step, disable=not (progress and world.is_main), desc=cfg.mode, unit="step")
    t0, tokens_t0 = time.perf_counter(), tokens_seen

    def save(complete: bool) -> None:
        nonlocal last_ckpt
        if not world.is_main:
            last_ckpt = step
            return
        train_state = {"step": step, "position": position, "tokens_seen": tokens_seen,
                       "rng": torch.get_rng_state(),
                       "phase": trainer.phase if trainer else None,
                       "trainer": trainer.state_dict() if trainer else None}
        save_checkpoint(ckpt_dir, model, model_name=model_name, model_sha256=model_sha256, hook=hook,
                        normalization=normalization,
                        cfg=cfg, step=step, tokens_seen=tokens_seen, complete=complete, metrics=last,
                        train_state=train_state)
        last_ckpt = step

    try:
        while step < total:
            phase, local, phase_steps = _locate(plan, step)
            if trainer is None or trainer.phase != phase:
                if phase == "secondary" and model.secondary is None:
                    model.attach_secondary(cfg.secondary.d_sae, cfg.secondary.k, cfg.aux_k)
                    model.to(device, dtype)
                trainer = TRAINERS[phase](model, cfg, phase_steps)
                if state is not None and state.get("phase") == phase and state.get("trainer"):
                    trainer.load_state_dict(state["trainer"])
                    state = None
            x = next(it, None)
            if x is None:
                log.warning("activations ran out at step %d of %d; saved an incomplete checkpoint", step, total)
                save(complete=False)
                distributed.barrier()
                bar.close()
                return TrainResult(ckpt_dir, model, step, False, last)
            x = _check_batch(x, d_in, position).to(device, dtype)
            position += 1
            try:
                stats = trainer.update(local, x)
            except NonFiniteLoss as err:
                kept = f"the last good checkpoint (step {last_ckpt}) is kept" if last_ckpt is not None \
                    else "no checkpoint had been written yet"
                raise FisError(f"loss became {err.value} at step {step} ({phase} phase): training stopped, {kept}",
                               source=out_dir, fix="lower lr, keep grad_clip, check the activations for NaN/Inf"
                               ) from None
            step += 1
            tokens_seen += x.shape[0] * world.world_size
            bar.update(1)
            if step % LOG_EVERY == 0 or step == total:
                stats = stats_to_floats(stats)  # the only device-to-host copy of the metrics
                rate = (tokens_seen - tokens_t0) / max(time.perf_counter() - t0, 1e-9)
                last = {"step": step, "split": "train", "phase": phase, "tokens": tokens_seen,
                        "tokens_per_s": rate, **stats}
                if metrics_log is not None:
                    metrics_log.write(last)
                bar.set_postfix(loss=f"{stats['loss']:.4g}", fvu=f"{stats['fvu']:.3f}", l0=f"{stats['l0']:.1f}",
                                tok_s=f"{rate:.0f}")
            if held and world.is_main and (step % cfg.eval_every == 0 or step == total):
                row = {"step": step, "split": "heldout", "phase": phase,
                       **_flatten(evaluate_reconstruction(model, held))}
                metrics_log.write(row)
                last = {**last, **row}
            if step % cfg.checkpoint_every == 0 and step < total:
                save(complete=False)
        save(complete=True)
        distributed.barrier()  # every rank returns once the checkpoint exists
    finally:
        bar.close()
    model.eval()
    return TrainResult(ckpt_dir, model, step, True, last)


def _arch(cfg: TrainConfig, d_in: int, model_name: ModelId, hook: str | None) -> JointArch:
    if cfg.sae_checkpoint is None:
        return cfg.arch(d_in)
    frozen = load_checkpoint(cfg.sae_checkpoint, expect_model=model_name, expect_hook=hook)
    return cfg.arch(d_in).model_copy(update={"sae": frozen.model.cfg.sae})


def _load_frozen_sae(model: JointSAE, cfg: TrainConfig, d_in: int, model_name: ModelId,
                     hook: str | None, normalization: dict[str, Any] | None = None) -> None:
    from .saelens import fold_input_scale

    frozen = load_checkpoint(cfg.sae_checkpoint, expect_model=model_name, expect_hook=hook)
    if frozen.d_in != d_in:
        raise FisError(f"sae_checkpoint has d_in={frozen.d_in}, the activations have {d_in}",
                       field="sae_checkpoint", fix="train the SAE on the same hook point")
    state = frozen.model.sae.state_dict()
    if frozen.meta.get("format") == "saelens":  # it reads raw activations; ours arrive normalised
        state = fold_input_scale(state, normalization, frozen.path)
    model.sae.load_state_dict(state)


def _locate(plan: list[tuple[str, int]], step: int) -> tuple[str, int, int]:
    start = 0
    for name, n in plan:
        if step < start + n:
            return name, step - start, n
        start += n
    raise AssertionError("step beyond the plan")


def _flatten(evals: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{comp}/{key}": value for comp, vals in evals.items() for key, value in vals.items()}
