"""`fis train CONFIG.yaml`: wire a training config to harvested activation shards (or harvest on the fly).

The checkpoint records the harvest's model and hook point (flaw 1) and its normalisation + exclusion rule
(flaw 2), so evaluation, screening and batteries splice it back exactly where and how it was trained.

Memory stays bounded whatever the size of the harvest: training streams one shard at a time and the held-out
set is a bounded sample (:data:`MAX_HELDOUT_TOKENS`) read shard by shard. Under ``torchrun`` (``WORLD_SIZE>1``)
this joins the process group and each rank reads ``batch_size / world_size`` rows of every global batch, so
the effective batch is the configured ``batch_size`` (see ``bench/README.md``, "Scaling out").
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .activations import ActivationStore, harvest
from .config import load_config
from .errors import FisError
from .fingerprint import (Fingerprint, check_output, checkpoint_identity, claim, folder_identity, own, package_version,
                          releases_locks, unclaim)
from .sae import TrainConfig
from .sae import train as train_joint
from .sae.train import TrainResult

log = logging.getLogger(__name__)

MAX_HELDOUT_TOKENS = 16_384


def _store_for(cfg: TrainConfig, out: Path, progress: bool) -> ActivationStore:
    if cfg.activations is not None:
        folder = Path(cfg.activations)
    else:
        folder = out / "activations"
        own(out, ["activations/"])  # a nested harvest folder: its own fingerprint lists its files
        harvest(model=cfg.model, hook=cfg.hook, corpus=[cfg.corpus], out=folder, tokens=cfg.tokens,
                device=cfg.device, progress=progress, shard="0/1")  # every rank reads the whole folder
    return ActivationStore(folder, heldout_fraction=max(cfg.heldout_fraction, 0.01))


def heldout_sample(store: ActivationStore, max_tokens: int = MAX_HELDOUT_TOKENS) -> torch.Tensor:
    """The first ``max_tokens`` normalised held-out rows, reading one shard at a time (never the whole split)."""
    parts, n = [], 0
    for path in store.shard_paths():
        acts = store.load_shard(path, "heldout")[0][:max_tokens - n]
        parts.append(acts.clone())  # clone: do not keep the whole shard alive through a view
        n += len(acts)
        if n >= max_tokens:
            break
    return store.normalizer.apply(torch.cat(parts))


MAX_PASSES = 10_000  # passes over a harvest's training split: beyond this, a typo in `tokens`, not a plan
WARN_PASSES = 100
BYTES_PER_PARAM = 16  # float32 weights, gradients and Adam's two moments


WARN_SECONDS = 2 * 3600  # a CPU run estimated longer than this is warned, with the estimate


@functools.cache
def matmul_flops_per_second() -> float:
    """This machine's measured float32 matmul speed on the CPU (a ~0.1 s probe, once per process): the unit of
    the training-time estimate, so it reflects these cores and their load rather than a guessed constant."""
    import time

    a, b = torch.randn(256, 512), torch.randn(512, 1024)
    torch.mm(a, b)  # warm-up
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < 0.1:
        torch.mm(a, b)
        n += 1
    return 2 * 256 * 512 * 1024 * n / elapsed


def train_seconds_lower_bound(cfg: TrainConfig, d_in: int) -> float:
    """A floor on a CPU training run's time: the dense encoder's matmuls alone (forward, and backward for the
    input weights: 3 x 2 x d_in x d_sae flops per token) at the measured matmul speed. The real run also decodes,
    runs the integration module and reads shards, so it takes longer; the floor is what a warning can promise."""
    return cfg.tokens * 6 * d_in * cfg.arch(d_in).sae.d_sae / matmul_flops_per_second()


def machine_memory() -> int:
    """Physical memory of this machine in bytes (0 when the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def train_bytes(cfg: TrainConfig, d_in: int) -> int:
    """Estimated memory of training: parameters x (weights, gradients, Adam moments) plus one batch's dense
    activations of the widest layer (SAE pre-activations and the decoder's output)."""
    arch = cfg.arch(d_in)
    d_sae = arch.sae.d_sae
    params = 2 * d_in * d_sae + d_sae + d_in
    if arch.nfm is not None:
        params += d_sae * (arch.nfm.emb_dim + d_in) + arch.nfm.emb_dim * arch.nfm.hidden + arch.nfm.hidden * d_in
    if cfg.secondary is not None:
        params += 2 * cfg.hidden * cfg.secondary.d_sae
    return BYTES_PER_PARAM * params + 4 * 3 * cfg.batch_size * (d_sae + d_in)


def preflight(cfg: TrainConfig, *, allow_incomplete: bool = False) -> None:
    """Checks that cost milliseconds and save hours, before anything is written: the harvest's manifest
    (structure, counts, completeness), the memory the model needs against this machine, a floor on the time a
    CPU run takes (warned past :data:`WARN_SECONDS`), and how many passes over the harvest ``tokens`` asks for
    (refused past :data:`MAX_PASSES`, warned past :data:`WARN_PASSES`)."""
    from . import models
    from .activations.shards import check_manifest, read_manifest

    if cfg.activations is None:
        return
    folder = Path(cfg.activations)
    manifest = read_manifest(folder)
    check_manifest(folder, manifest)
    if manifest.get("complete") is False and not allow_incomplete:
        raise FisError(f"the harvest is incomplete (complete: false, {len(manifest['shards'])} shards): a crash or "
                       "an interrupted run left it", source=folder / "manifest.json", field="activations",
                       fix="rerun the same `fis harvest` to finish it, or pass --allow-incomplete to train on it")
    d_in = int(manifest["d_model"])
    need, have = train_bytes(cfg, d_in), machine_memory()
    if have and need > have:
        raise FisError(f"training needs about {need / 2**30:.1f} GiB (d_sae {cfg.arch(d_in).sae.d_sae:,} x d_in "
                       f"{d_in}: weights, gradients, Adam state, one batch), this machine has {have / 2**30:.1f} GiB",
                       field="expansion" if cfg.expansion else "d_sae", fix="use a smaller expansion / d_sae")
    available = sum(s["n_tokens"] for s in manifest["shards"]) * (1 - cfg.heldout_fraction)
    passes = cfg.tokens / max(available, 1.0)
    if passes > MAX_PASSES:
        raise FisError(f"tokens: {cfg.tokens:,} is {passes:,.0f} passes over the harvest's ~{available:,.0f} "
                       f"training tokens ({cfg.steps():,} steps)", field="tokens",
                       fix=f"use at most {int(available * MAX_PASSES):,} tokens, or harvest more")
    if models.resolve_device(cfg.device).type == "cpu":
        floor = train_seconds_lower_bound(cfg, d_in)
        if floor > WARN_SECONDS:
            log.warning("training %s tokens at d_sae %s on this CPU takes at least ~%.1f hours (the encoder's "
                        "matmuls alone at this machine's measured speed); fewer tokens or a GPU "
                        "(device: cuda) shorten it", f"{cfg.tokens:,}", f"{cfg.arch(d_in).sae.d_sae:,}",
                        floor / 3600)
    if passes > WARN_PASSES:
        log.warning("tokens: %s is %.0f passes over the harvest's ~%.0f training tokens (%s steps): expect "
                    "overfitting; harvest more tokens", f"{cfg.tokens:,}", passes, available, f"{cfg.steps():,}")


def train_fingerprint(cfg: TrainConfig) -> Fingerprint:
    """What decides a training run: the config (not the device), the harvest it reads, the frozen SAE it
    starts from, the package version."""
    inputs: dict[str, Any] = {"config": cfg.model_dump(mode="json", exclude={"device"}), "package": package_version()}
    if cfg.activations is not None:
        inputs["activations"] = folder_identity(Path(cfg.activations))
    if cfg.sae_checkpoint is not None:
        inputs["sae_checkpoint"] = checkpoint_identity(Path(cfg.sae_checkpoint))
    return Fingerprint("train", inputs)


def with_frozen_sae_shape(cfg: TrainConfig) -> TrainConfig:
    """``d_sae`` and ``k`` of a sequential run on ``sae_checkpoint:`` are the frozen SAE's: read from it (so the
    recorded config cannot contradict the SAE); values the user gave that differ are a one-line error."""
    if cfg.sae_checkpoint is None:
        return cfg
    from .sae import load_checkpoint

    sae = load_checkpoint(Path(cfg.sae_checkpoint)).model.cfg.sae
    given = cfg.model_fields_set
    wrong = [f"{name}: {value}" for name, value, ok in (
        ("d_sae", cfg.d_sae, cfg.d_sae == sae.d_sae), ("expansion", cfg.expansion,
                                                        (cfg.expansion or 0) * sae.d_in == sae.d_sae),
        ("k", cfg.k, cfg.k == sae.k or sae.activation != "topk")) if name in given and value is not None and not ok]
    if wrong:
        raise FisError(f"{', '.join(wrong)} contradicts sae_checkpoint {cfg.sae_checkpoint} (d_sae {sae.d_sae}, "
                       f"k {sae.k})", field=wrong[0].split(":")[0],
                       fix="leave d_sae / expansion / k out: they are read from the SAE")
    return cfg.model_copy(update={"d_sae": sae.d_sae, "expansion": None, "k": sae.k})


@releases_locks
def train(config: TrainConfig | Path | str, out: Path | str, *, resume: bool = False, progress: bool = True,
          overwrite: bool = False, allow_incomplete: bool = False, **overrides: Any) -> TrainResult:
    """Train a standalone SAE, a sequential or a joint model (``config.mode``) into ``out/checkpoint``.

    ``out`` follows the fingerprint rule: ``resume`` continues a run of the same settings; a folder of other
    settings is refused unless ``overwrite`` replaces it. A harvest left incomplete (``complete: false``, e.g.
    by a crash) is refused unless ``allow_incomplete``; sizes are checked against the machine first
    (:func:`preflight`)."""
    cfg = config if isinstance(config, TrainConfig) else load_config(TrainConfig, Path(config))
    if overrides:
        cfg = TrainConfig.model_validate({**cfg.model_dump(exclude_unset=True), **overrides})
    cfg = with_frozen_sae_shape(cfg)
    preflight(cfg, allow_incomplete=allow_incomplete)
    out = Path(out)
    world = distributed.env_world()
    if cfg.batch_size % world.world_size:
        raise FisError(f"batch_size {cfg.batch_size} is not divisible by the {world.world_size} ranks",
                       field="batch_size", fix="use a batch_size that is a multiple of --nproc_per_node x nnodes")
    if cfg.activations is None and world.distributed:
        raise FisError("on-the-fly harvest is single-process", field="activations",
                       fix="run `fis harvest` first and train on the shard folder under torchrun")
    fp = train_fingerprint(cfg)
    state = "resume"
    if world.rank == 0:
        state = claim(out, fp, overwrite=overwrite)
    else:  # rank 0 writes the fingerprint; the others only check (no race on the folder)
        check_output(out, fp)
    try:
        with distributed.session(cfg.device) as world:
            return _train(cfg, out, resume, progress, world)
    except FisError:
        if state == "new":
            unclaim(out, fp)  # refused before writing anything: the fixed config may use this folder
        raise


def _train(cfg: TrainConfig, out: Path, resume: bool, progress: bool, world: distributed.World) -> TrainResult:
    store = _store_for(cfg, out, progress)
    manifest = store.manifest
    heldout = heldout_sample(store)
    if len(heldout) < cfg.batch_size // 4:
        every = store.heldout_every
        raise FisError(f"only {len(heldout)} held-out tokens (heldout_fraction {cfg.heldout_fraction} holds out "
                       f"every {every}th context; training needs at least batch_size/4 = {cfg.batch_size // 4})",
                       source=store.folder, field="heldout_fraction",
                       fix="raise heldout_fraction (0.1 holds out every 10th context), harvest more tokens, or "
                       "lower batch_size")
    held = list(torch.split(heldout, cfg.batch_size))

    def batches(start: int):
        return store.iter_batches(cfg.batch_size // world.world_size, "train", seed=cfg.seed, start_batch=start,
                                  rank=world.rank, world_size=world.world_size)

    normalization = {**manifest["normalization"], "exclusion": manifest["exclusion"],
                     "activations": str(store.folder)}
    return train_joint(cfg, batches, out, resume=resume, progress=progress, normalization=normalization,
                       heldout=held, model_name=manifest["model"], hook=manifest["hook"],
                       model_sha256=manifest.get("model_sha256"))


@releases_locks
def refit(checkpoint: Path | str, out: Path | str, *, batch_size: int = 4096, overwrite: bool = False) -> Path:
    """`fis refit`: a standalone SAE whose decoder is refitted by least squares on its frozen codes.

    A control for the joint model's linear part: if refitting the decoder of a standalone SAE closes most of the
    gap to the joint model, the integration module was compensating an under-trained decoder. The codes come
    from one pass over the training split of the checkpoint's harvest folder.
    """
    from .sae import JointArch, JointSAE, load_checkpoint, refit_decoder_lstsq, save_checkpoint

    ckpt = load_checkpoint(Path(checkpoint))
    from .sae.checkpoint import recorded_input

    acts = recorded_input(ckpt, "activations", marker="manifest.json")
    if ckpt.model.nfm is not None or not acts:
        raise FisError("refit needs a standalone SAE checkpoint trained on a harvest folder", source=ckpt.path,
                       fix="pass the checkpoint of a `mode: sae` run")
    fp = Fingerprint("refit", {"checkpoint": checkpoint_identity(ckpt.path), "activations": folder_identity(
        Path(acts)), "batch_size": batch_size, "package": package_version()})
    claim(Path(out), fp, overwrite=overwrite)  # the same refit again is simply redone
    store = ActivationStore(Path(acts), heldout_fraction=ckpt.train_config.get("heldout_fraction", 0.1))

    def batches():
        for path in store.shard_paths():
            x = store.normalizer.apply(store.load_shard(path, "train")[0])
            yield from torch.split(x, batch_size)

    sae = refit_decoder_lstsq(ckpt.model.sae, batches())
    arch = JointArch(sae=ckpt.model.cfg.sae.model_copy(update={"normalize_decoder": False}), nfm=None)
    model = JointSAE(arch)
    model.sae.load_state_dict(sae.state_dict())
    cfg = TrainConfig.model_validate({**ckpt.train_config, "normalize_decoder": False, "activations": str(acts)})
    target = Path(out) / "checkpoint"
    save_checkpoint(target, model, model_name=ckpt.model_name, model_sha256=ckpt.meta.get("model_sha256"),
                    hook=ckpt.hook, normalization=ckpt.normalization,
                    cfg=cfg, step=ckpt.meta.get("step", 0), tokens_seen=ckpt.meta.get("tokens_seen", 0),
                    metrics={"refit_of": str(ckpt.path)})
    return target
