"""`fis harvest`: stream activations at one named hook point into shards, stopping the forward pass there."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from tqdm.auto import tqdm

from ..config import StrictModel, validate
from ..corpus import DEFAULT_CORPUS, ContextBatcher, describe
from ..errors import FisError
from ..fingerprint import Fingerprint, claim, package_version, releases_locks
from ..limits import check_context_length
from ..splice import check_spliceable
from ..model_identity import key, of_bridge
from ..models import (DEFAULT_MODEL, default_hook, load_model, model_name, prepended_token, resolve_hook,
                      weights_device)
from ..provenance import provenance
from .exclusion import ExclusionRule
from .normalization import Normalizer, NormKind
from .shards import (MANIFEST, ActivationStore, new_manifest, read_manifest, shard_name, stats_from_manifest,
                     write_manifest, write_shard)

log = logging.getLogger(__name__)


class HarvestConfig(StrictModel):
    """What to harvest; every field is also a `fis harvest` option."""

    model: str = DEFAULT_MODEL
    hook: str | None = Field(None, description="hook point; default: the middle layer's hook_resid_post")
    corpus: list[str] = Field(default_factory=lambda: [DEFAULT_CORPUS])
    out: Path = Path("runs/activations")
    tokens: int = Field(50_000, gt=0, description="token budget (before exclusions)")
    context_length: int = Field(128, ge=2)
    batch_size: int = Field(16, gt=0, description="contexts per forward pass")
    contexts_per_shard: int = Field(64, gt=0)
    dtype: str = "float32"
    store_dtype: str = Field("float32", description="dtype of the saved activations (float32, bfloat16, float16)")
    device: str = "auto"
    normalization: NormKind = "expected_norm"
    norm_multiple: float | None = Field(10.0, gt=0, description="exclude positions with norm > this x median; null: off")


def capture_hook(bridge: Any, tokens: torch.Tensor, hook_name: str, stop_at_layer: int) -> torch.Tensor:
    """The value at ``hook_name`` for ``tokens``, running only the blocks needed to produce it."""
    captured: dict[str, torch.Tensor] = {}

    def grab(value: torch.Tensor, hook: Any) -> torch.Tensor:
        captured["x"] = value.detach()
        return value

    with torch.no_grad():
        bridge.run_with_hooks(tokens, fwd_hooks=[(hook_name, grab)], stop_at_layer=stop_at_layer)
    return captured["x"]


# What a harvest writes into its out folder (a sharded harvest adds one manifest per rank).
_STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def store_dtype_of(name: str) -> torch.dtype:
    """The torch dtype of ``store_dtype``; an unknown name is a one-line error."""
    dtype = _STORE_DTYPES.get(name)
    if dtype is None:
        raise FisError(f"unknown store_dtype '{name}'", field="store_dtype", fix="use float32, bfloat16 or float16")
    return dtype


def planned_contexts(cfg: HarvestConfig, tokenizer: Any) -> tuple[torch.Tensor, int]:
    """The BOS-led contexts a harvest of ``cfg.tokens`` covers (the same list for every rank), and how many
    were asked for (more than the corpus holds when it runs out)."""
    n_contexts = math.ceil(cfg.tokens / (cfg.context_length - 1))
    return ContextBatcher(tokenizer, cfg.context_length).contexts(cfg.corpus, max_contexts=n_contexts), n_contexts


def fresh_manifest(cfg: HarvestConfig, bridge: Any, hook: Any, contexts: torch.Tensor, n_requested: int,
                   fp: Fingerprint, **extra: Any) -> dict[str, Any]:
    """The manifest of a harvest that has not written a shard yet (``extra``: a rank's own fields)."""
    return new_manifest(model=model_name(bridge), model_sha256=of_bridge(bridge).sha256, hook=hook.name,
                        hook_canonical=hook.canonical,
                        layer=hook.layer, d_model=int(bridge.cfg.d_model), context_length=cfg.context_length,
                        corpus=cfg.corpus, corpus_description=describe(cfg.corpus), dtype=cfg.dtype,
                        store_dtype=cfg.store_dtype, norm_multiple=cfg.norm_multiple,
                        contexts_per_shard=cfg.contexts_per_shard, n_contexts_planned=len(contexts),
                        tokens_requested=cfg.tokens, corpus_exhausted=len(contexts) < n_requested,
                        bos_handling=bos_handling(bridge), prepended_token=prepended_token(bridge),
                        config=cfg.model_dump(mode="json"), provenance=provenance(), fingerprint=fp.digest,
                        **extra)


def bos_handling(bridge: Any) -> str:
    """The manifest's sentence on position 0, naming the token really prepended."""
    first = prepended_token(bridge)
    what = "BOS" if first["kind"] == "bos" else "EOS (the tokenizer has no BOS token)"
    return (f"every context starts with {what} {first['token']!r} (id {first['id']}) at position 0; "
            "BOS/EOS/pad excluded")


def harvest_fingerprint(cfg: HarvestConfig, model: str, hook: str) -> Fingerprint:
    """Everything that decides the harvested numbers. Not ``tokens``: a larger budget extends the same harvest."""
    settings = cfg.model_dump(mode="json", include={"corpus", "context_length", "contexts_per_shard", "dtype",
                                                    "store_dtype", "normalization", "norm_multiple"})
    return Fingerprint("harvest", {**settings, "model": model, "hook": hook, "package": package_version()})


def shard_pass(bridge: Any, hook: Any, rule: ExclusionRule, stats: Any, excluded: dict[str, int],
               shard_tokens: torch.Tensor, batch_size: int, store_dtype: torch.dtype, bar: Any = None
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One shard's kept activations, keep mask and position count; updates ``stats`` and ``excluded``.

    The exclusion rule is calibrated on the first batch it sees if it is not calibrated yet.
    """
    device = weights_device(bridge)
    acts_parts, keep_parts, positions = [], [], 0
    for b in range(0, len(shard_tokens), batch_size):
        batch = shard_tokens[b:b + batch_size].to(device)
        acts = capture_hook(bridge, batch, hook.canonical, hook.stop_at_layer)
        if rule.median_norm is None:
            rule.calibrate(batch, acts)
        keep = rule.keep_mask(batch, acts)
        special = rule.special_mask(batch)
        excluded["special"] += int(special.sum())
        excluded["massive"] += int((~keep & ~special).sum())
        kept = acts[keep].to("cpu", torch.float32)
        stats.update(kept)
        acts_parts.append(kept.to(store_dtype))
        keep_parts.append(keep.cpu())
        positions += int(keep.numel())
        if bar is not None:
            bar.update(len(batch))
    return torch.cat(acts_parts), torch.cat(keep_parts), positions


@releases_locks
def harvest(config: HarvestConfig | None = None, *, progress: bool = True, bridge: Any = None,
            overwrite: bool = False, shard: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Harvest activations into ``config.out``; resume from the last complete shard; return the manifest.

    ``out`` follows the fingerprint rule: the same settings resume (a larger ``tokens`` extends), other
    settings are refused unless ``overwrite`` replaces the earlier harvest. ``shard="i/n"`` (or RANK /
    WORLD_SIZE under ``torchrun``) harvests only this rank's slice of the contexts into the same folder (see
    :mod:`.sharded`; the same fingerprint rule, without ``overwrite``).
    """
    cfg = validate(HarvestConfig, {**(config.model_dump() if config else {}), **overrides}, source="fis harvest")
    from ..distributed import parse_shard

    shard_i, shard_n = parse_shard(shard)
    if shard_n > 1:
        from .sharded import harvest_slice

        if overwrite:
            raise FisError("--overwrite cannot be combined with --shard (ranks would delete each other's work)",
                           field="--overwrite", fix="clear the folder with one `fis harvest --overwrite` first, "
                           "or use a new --out")
        return harvest_slice(cfg, shard_i, shard_n, bridge=bridge, progress=progress)
    bridge = bridge if bridge is not None else load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    hook = resolve_hook(bridge, cfg.hook or default_hook(bridge))
    check_spliceable(bridge, hook)
    check_context_length(bridge, cfg.context_length)
    tokenizer = bridge.tokenizer
    store_dtype = store_dtype_of(cfg.store_dtype)
    contexts, n_requested = planned_contexts(cfg, tokenizer)
    out = Path(cfg.out)
    fp = harvest_fingerprint(cfg, key(of_bridge(bridge)), hook.canonical)
    fresh = fresh_manifest(cfg, bridge, hook, contexts, n_requested, fp)
    state = claim(out, fp, overwrite=overwrite)
    if state == "resume" and (out / MANIFEST).exists():
        manifest = read_manifest(out)
        if manifest.get("complete") and manifest.get("n_contexts_planned") == len(contexts):
            return manifest
        manifest["n_contexts_planned"] = len(contexts)
        manifest["complete"] = False
    else:
        manifest = fresh
    rule = (ExclusionRule.from_dict(manifest["exclusion"]) if "exclusion" in manifest
            else ExclusionRule.for_tokenizer(tokenizer, cfg.norm_multiple))
    stats = stats_from_manifest(manifest, int(bridge.cfg.d_model))
    done_contexts = sum(s["n_contexts"] for s in manifest["shards"])
    shard_index = len(manifest["shards"])

    bar = tqdm(total=len(contexts), initial=done_contexts, unit="ctx", disable=not progress, desc="harvest")
    start = time.perf_counter()
    harvested_now = 0
    for shard_start in range(done_contexts, len(contexts), cfg.contexts_per_shard):
        shard_tokens = contexts[shard_start:shard_start + cfg.contexts_per_shard]
        acts_all, keep_all, n_pos = shard_pass(bridge, hook, rule, stats, manifest["excluded"], shard_tokens,
                                               cfg.batch_size, store_dtype, bar)
        harvested_now += n_pos
        bar.set_postfix(tok_s=f"{harvested_now / (time.perf_counter() - start):.0f}")
        ids = torch.arange(shard_start, shard_start + len(shard_tokens))
        digest = write_shard(out, shard_index, acts_all, shard_tokens, keep_all, ids)
        manifest["shards"].append({"file": shard_name(shard_index), "n_contexts": len(shard_tokens),
                                   "n_tokens": int(acts_all.shape[0]), "sha256": digest})
        manifest["token_count"] += int(acts_all.shape[0])
        manifest["exclusion"] = rule.to_dict()
        manifest["running_stats"] = stats.to_dict()
        manifest["normalization"] = Normalizer.from_stats(stats, cfg.normalization).to_dict()
        manifest["activation_mean_norm"] = stats.norm_sum / max(stats.count, 1)
        write_manifest(out, manifest)
        shard_index += 1
    bar.close()
    manifest["complete"] = True
    manifest["positions_total"] = len(contexts) * cfg.context_length
    write_manifest(out, manifest)
    return manifest


def open_activations(folder: Path, heldout_fraction: float = 0.1) -> ActivationStore:
    """Open a harvest folder for reading (see :class:`ActivationStore`)."""
    return ActivationStore(Path(folder), heldout_fraction=heldout_fraction)
