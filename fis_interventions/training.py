"""`fis train CONFIG.yaml`: wire a training config to harvested activation shards (or harvest on the fly).

The checkpoint records the harvest's model and hook point (flaw 1) and its normalisation + exclusion rule
(flaw 2), so evaluation, screening and batteries splice it back exactly where and how it was trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .activations import ActivationStore, harvest
from .config import load_config
from .errors import FisError
from .sae import TrainConfig
from .sae import train as train_joint
from .sae.train import TrainResult

MAX_HELDOUT_TOKENS = 16_384


def _store_for(cfg: TrainConfig, out: Path, progress: bool) -> ActivationStore:
    if cfg.activations is not None:
        folder = Path(cfg.activations)
    else:
        folder = out / "activations"
        harvest(model=cfg.model, hook=cfg.hook, corpus=[cfg.corpus], out=folder, tokens=cfg.tokens,
                device=cfg.device, progress=progress)
    return ActivationStore(folder, heldout_fraction=max(cfg.heldout_fraction, 0.01))


def train(config: TrainConfig | Path | str, out: Path | str, *, resume: bool = False, progress: bool = True,
          **overrides: Any) -> TrainResult:
    """Train a standalone SAE, a sequential or a joint model (``config.mode``) into ``out/checkpoint``."""
    cfg = config if isinstance(config, TrainConfig) else load_config(TrainConfig, Path(config))
    if overrides:
        cfg = TrainConfig.model_validate({**cfg.model_dump(), **overrides})
    out = Path(out)
    store = _store_for(cfg, out, progress)
    manifest = store.manifest
    heldout = store.activations("heldout")[:MAX_HELDOUT_TOKENS]
    if len(heldout) < cfg.batch_size // 4:
        raise FisError(f"only {len(heldout)} held-out tokens", source=store.folder, field="heldout_fraction",
                       fix="harvest more tokens or raise heldout_fraction")
    held = list(torch.split(heldout, cfg.batch_size))

    def batches(start: int):
        return store.iter_batches(cfg.batch_size, "train", seed=cfg.seed, start_batch=start)

    normalization = {**manifest["normalization"], "exclusion": manifest["exclusion"],
                     "activations": str(store.folder)}
    return train_joint(cfg, batches, out, resume=resume, progress=progress, normalization=normalization,
                       heldout=held, model_name=manifest["model"], hook=manifest["hook"])
