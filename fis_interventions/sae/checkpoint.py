"""Checkpoint folders (SAELens style), written atomically: complete or absent.

Layout of a checkpoint folder::

    cfg.json            architecture, model name, hook point, d_in, normalisation, training config, provenance
    weights.safetensors all parameters (secondary SAE under ``secondary.``)
    metrics.json        last training and held-out metrics
    optimizer.pt        optimiser + dead-latent counters + torch RNG + step + data position (for --resume)

The normalisation dict (flaw 2) and the hook point (flaw 1) travel with the weights, and loading for another
model or hook is a one-line :class:`FisError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from .. import recorded_paths
from ..errors import FisError
from ..fingerprint import own
from ..io import atomic_dir, recover_dir, write_json
from ..model_identity import ModelId, check_same_model, of_record
from ..provenance import provenance
from .config import TrainConfig
from .model import JointArch, JointSAE
from .saelens import is_saelens_folder, load_saelens

FORMAT = "fis-joint-sae/1"


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model in eval mode plus everything needed to use it correctly."""

    path: Path
    model: JointSAE
    model_name: str | None
    hook: str | None
    d_in: int
    normalization: dict[str, Any] | None
    train_config: dict[str, Any] | None
    meta: dict[str, Any]


CHECKPOINT_FILES = ("weights.safetensors", "cfg.json", "metrics.json", "optimizer.pt")


def save_checkpoint(path: Path, model: JointSAE, *, model_name: str | None, hook: str | None,
                    model_sha256: str | None = None, normalization: dict[str, Any] | None = None, cfg: TrainConfig | None = None,
                    step: int = 0, tokens_seen: int = 0, complete: bool = True,
                    metrics: dict[str, Any] | None = None, train_state: dict[str, Any] | None = None) -> Path:
    """Write ``path`` atomically (replacing an older checkpoint only once the new one is complete)."""
    meta = {
        "format": FORMAT,
        "model_name": model_name,
        "model_sha256": model_sha256,  # content identity of a model given by path (see model_identity)
        "hook": hook,
        "d_in": model.cfg.sae.d_in,
        "architecture": model.cfg.model_dump(mode="json"),
        "normalization": normalization,
        "train_config": cfg.model_dump(mode="json") if cfg is not None else None,
        "step": step,
        "tokens_seen": tokens_seen,
        "complete": complete,
        "provenance": provenance(cfg.seed if cfg is not None else None),
    }
    path = Path(path)
    meta["inputs"] = _recorded_inputs(path, cfg, normalization)

    def record(tmp: Path) -> None:  # the training folder's fingerprint lists the files before they appear
        own(path.parent, [f"{path.name}/{p.name}" for p in tmp.iterdir()])

    with atomic_dir(path, old_files=CHECKPOINT_FILES, before_swap=record) as tmp:
        weights = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
        save_file(weights, str(tmp / "weights.safetensors"))
        write_json(tmp / "cfg.json", meta)
        write_json(tmp / "metrics.json", metrics or {})
        if train_state is not None:
            torch.save(train_state, tmp / "optimizer.pt")
    return path


def _recorded_inputs(path: Path, cfg: TrainConfig | None, normalization: dict[str, Any] | None
                     ) -> dict[str, dict[str, str]]:
    """The input folders, absolute and relative to the checkpoint (see :mod:`..recorded_paths`)."""
    found = {"activations": (cfg.activations if cfg is not None else None) or (normalization or {}).get("activations"),
             "sae_checkpoint": cfg.sae_checkpoint if cfg is not None else None}
    return {name: recorded_paths.record(value, path) for name, value in found.items() if value}


def recorded_input(ckpt: Checkpoint, name: str, marker: str | None = None) -> Path | None:
    """An input folder the checkpoint records (``activations``, ``sae_checkpoint``), found from any working
    directory: absolute, relative to the checkpoint, or (older checkpoints) the path as it was given."""
    legacy = (ckpt.normalization or {}).get(name) or (ckpt.train_config or {}).get(name)
    return recorded_paths.resolve(ckpt.path, (ckpt.meta.get("inputs") or {}).get(name), legacy, marker)


def resolve(path: Path) -> Path:
    """Accept a checkpoint folder or a training output folder that holds ``checkpoint/``."""
    path = Path(path)
    for folder in (path, path / "checkpoint"):
        recover_dir(folder)  # a save killed between its two renames (where no atomic swap exists)
    if not (path / "cfg.json").exists() and (path / "checkpoint" / "cfg.json").exists():
        return path / "checkpoint"
    return path


def read_meta(path: Path) -> dict[str, Any]:
    path = resolve(path)
    if not path.is_dir():
        raise FisError("checkpoint folder not found", source=path, fix="check the path")
    if is_saelens_folder(path):
        ckpt = load_saelens(path)
        return {**ckpt.meta, "model_name": None, "hook": ckpt.hook, "d_in": ckpt.d_in}
    cfg_file = path / "cfg.json"
    if not cfg_file.exists() or not (path / "weights.safetensors").exists():
        raise FisError("not a checkpoint folder (needs cfg.json and weights.safetensors)", source=path,
                       fix="point to the folder written by 'fis train'")
    try:
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FisError(f"cfg.json is not valid JSON ({err})", source=cfg_file) from None
    if meta.get("format") != FORMAT:
        raise FisError(f"unknown checkpoint format {meta.get('format')!r}, expected {FORMAT!r}", source=cfg_file)
    return meta


def load_checkpoint(path: Path, expect_model: str | ModelId | None = None, expect_hook: str | None = None,
                    device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint; refuse one trained on another model or hook point (flaw 1) in one line.

    The model is compared by content where both sides record a digest (:mod:`..model_identity`: an identical
    copy of the model at another path is the same model), else by name.

    A SAELens SAE folder loads too (frozen, see :mod:`.saelens`); its model name is SAELens' own (often a hub
    name), so only its hook and, when attached, its d_in are checked.
    """
    path = resolve(path)
    if path.is_dir() and is_saelens_folder(path):
        return load_saelens(path, expect_hook=expect_hook, device=device)
    meta = read_meta(path)
    if expect_model is not None:
        expected = expect_model if isinstance(expect_model, ModelId) else ModelId(expect_model)
        check_same_model(of_record(meta), expected, source=path, field="model_name")
    if expect_hook is not None and meta.get("hook") != expect_hook:
        raise FisError(f"checkpoint was trained on hook point {meta.get('hook')!r}, not {expect_hook!r}",
                       source=path, field="hook",
                       fix=f"use a checkpoint trained on {expect_hook!r}, or use hook point {meta.get('hook')!r}")
    try:
        arch = JointArch.model_validate(meta["architecture"])
        int(meta["d_in"])
    except (ValidationError, KeyError, TypeError, ValueError) as err:
        reason = str(err).splitlines()[0] if not isinstance(err, KeyError) else f"no {err}"
        raise FisError(f"cfg.json is damaged or incomplete ({reason})", source=path / "cfg.json",
                       fix="restore it from the run that wrote the checkpoint, or retrain") from None
    model = JointSAE(arch)
    state = _read_weights(path / "weights.safetensors", device)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise FisError(f"weights do not match cfg.json architecture: {first}", source=path) from None
    model.to(device).eval()
    return Checkpoint(path=path, model=model, model_name=meta.get("model_name"), hook=meta.get("hook"),
                      d_in=int(meta["d_in"]), normalization=meta.get("normalization"),
                      train_config=meta.get("train_config"), meta=meta)


def _read_weights(file: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    """The weights, refused in one line when the file is damaged or holds NaN / infinity (a diverged or
    corrupted run would otherwise give NaN result rows with exit 0)."""
    try:
        state = load_file(str(file), device=str(device))
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) for damaged files
        raise FisError(f"weights cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__})",
                       source=file, fix="the file is damaged: restore it, or retrain") from None
    bad = [name for name, t in state.items()
           if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all())]
    if bad:
        raise FisError(f"weights hold NaN or infinity ({bad[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''})",
                       source=file, fix="use an earlier checkpoint of the run; if training diverged, lower lr")
    return state


def load_train_state(path: Path) -> dict[str, Any]:
    """The resume state (optimiser, RNG, step, data position) of a checkpoint."""
    file = resolve(path) / "optimizer.pt"
    if not file.exists():
        raise FisError("checkpoint has no optimizer.pt, cannot resume", source=file.parent,
                       fix="start a new run in another folder")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: pickle, zip or torch errors
        raise FisError(f"optimizer.pt cannot be read ({type(err).__name__})", source=file,
                       fix="the file is damaged: start a new run in another folder, or --overwrite") from None
