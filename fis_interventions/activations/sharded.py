"""`fis harvest --shard i/n`: several processes (or ``torchrun`` ranks) harvest disjoint slices into one folder.

Why: on big models harvesting is the expensive stage, and it parallelises perfectly. The contexts are the
same list as a single-process harvest, cut into the same global shards (``contexts_per_shard`` each, file
``shard_<g>``); rank i takes every shard g with ``g % n == i``. So the union of the ranks' files is exactly the
single-process folder, shard for shard, and training reads it as one store.

Each rank keeps its own ``manifest.rank-<i>-of-<n>.json`` (its complete shards, exclusion counts, running
statistics), rewritten after every shard, so each rank resumes on its own. The exclusion rule is calibrated
on the first batch of the global context list by every rank (one extra forward pass each), so all ranks use
the rule a single process would. When the last rank finishes, it writes ``manifest.json``: every rank's shards
in global order, summed counts, the normalisation from the pooled statistics (float64 sums, so the result
equals a single process's up to summation order). No collective is needed: ranks never wait for each other.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import FisError
from ..fingerprint import claim, own
from ..io import write_json
from ..limits import check_context_length
from ..splice import check_spliceable
from ..model_identity import key as model_key, of_bridge
from ..models import default_hook, load_model, resolve_hook
from .exclusion import ExclusionRule
from .normalization import Normalizer, RunningStats
from .shards import MANIFEST, read_manifest, shard_name, stats_from_manifest, write_manifest, write_shard

# What a rank's manifest must agree on beyond the harvest's fingerprint (checked first, by the folder's claim):
# the token budget (not fingerprinted, a larger one extends a harvest) and the number of ranks.
_RANK_KEYS = ("n_contexts_planned", "shard_of")


def rank_manifest_name(i: int, n: int) -> str:
    return f"manifest.rank-{i}-of-{n}.json"


def harvest_slice(cfg: Any, shard_i: int, shard_n: int, *, bridge: Any = None, progress: bool = True
                  ) -> dict[str, Any]:
    """Harvest rank ``shard_i`` of ``shard_n``; return the merged manifest if this rank finished last, else its own."""
    from .harvester import (fresh_manifest, harvest_fingerprint, planned_contexts, shard_pass,
                            store_dtype_of)

    out = Path(cfg.out)
    bridge = bridge if bridge is not None else load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    hook = resolve_hook(bridge, cfg.hook or default_hook(bridge))
    check_spliceable(bridge, hook)
    check_context_length(bridge, cfg.context_length)
    fp = harvest_fingerprint(cfg, model_key(of_bridge(bridge)), hook.canonical)
    claim(out, fp, shared=True)  # every rank: the same digest; the ranks share the folder's lock
    if (out / MANIFEST).exists():
        merged = read_manifest(out)
        if merged.get("shard_of") != shard_n:
            raise FisError(f"holds a harvest made with {merged.get('shard_of') or 1} process(es), not {shard_n}",
                           source=out, field="--shard", fix="use another --out folder, or the same shard count")
        return merged
    store_dtype = store_dtype_of(cfg.store_dtype)
    contexts, n_requested = planned_contexts(cfg, bridge.tokenizer)
    fresh = fresh_manifest(cfg, bridge, hook, contexts, n_requested, fp, shard_of=shard_n, rank=shard_i)
    mine_file = out / rank_manifest_name(shard_i, shard_n)
    own(out, [mine_file.name])
    manifest = json.loads(mine_file.read_text(encoding="utf-8")) if mine_file.exists() else fresh
    for key in _RANK_KEYS:
        if manifest.get(key) != fresh.get(key):
            raise FisError(f"holds a rank manifest with {key}={manifest.get(key)!r}, not {fresh.get(key)!r}",
                           source=mine_file, field=key, fix="rerun with the same settings, or use another --out")
    if "exclusion" in manifest:
        rule = ExclusionRule.from_dict(manifest["exclusion"])
    else:  # the rule a single process would calibrate: on the first batch of the global list
        rule = ExclusionRule.for_tokenizer(bridge.tokenizer, cfg.norm_multiple)
        first = contexts[:min(cfg.batch_size, cfg.contexts_per_shard)]
        shard_pass(bridge, hook, rule, RunningStats(int(bridge.cfg.d_model)), {"special": 0, "massive": 0},
                   first, cfg.batch_size, store_dtype)
    stats = stats_from_manifest(manifest, int(bridge.cfg.d_model))
    done = {s["index"] for s in manifest["shards"]}
    n_global = math.ceil(len(contexts) / cfg.contexts_per_shard)
    todo = [g for g in range(shard_i, n_global, shard_n) if g not in done]
    bar = tqdm(total=len(todo), unit="shard", disable=not progress, desc=f"harvest {shard_i}/{shard_n}")
    for g in todo:
        start = g * cfg.contexts_per_shard
        shard_tokens = contexts[start:start + cfg.contexts_per_shard]
        acts, keep, _ = shard_pass(bridge, hook, rule, stats, manifest["excluded"], shard_tokens, cfg.batch_size,
                                   store_dtype)
        digest = write_shard(out, g, acts, shard_tokens, keep, torch.arange(start, start + len(shard_tokens)))
        manifest["shards"].append({"file": shard_name(g), "index": g, "n_contexts": len(shard_tokens),
                                   "n_tokens": int(acts.shape[0]), "sha256": digest})
        manifest["token_count"] += int(acts.shape[0])
        manifest["exclusion"] = rule.to_dict()
        manifest["running_stats"] = stats.to_dict()
        write_json(mine_file, manifest)
        bar.update(1)
    bar.close()
    manifest["complete"] = True
    manifest["exclusion"] = rule.to_dict()
    manifest["running_stats"] = stats.to_dict()
    write_json(mine_file, manifest)
    merged = merge_rank_manifests(out, shard_n, cfg.normalization)
    return merged if merged is not None else manifest


def merge_rank_manifests(out: Path, shard_n: int, normalization: str) -> dict[str, Any] | None:
    """Write ``manifest.json`` once every rank's manifest is complete; None while some rank is still running."""
    ranks = []
    for i in range(shard_n):
        file = Path(out) / rank_manifest_name(i, shard_n)
        if not file.exists():
            return None
        ranks.append(json.loads(file.read_text(encoding="utf-8")))
        if not ranks[-1].get("complete"):
            return None
    merged = {k: v for k, v in ranks[0].items() if k not in ("rank", "running_stats")}
    merged["shards"] = sorted((s for r in ranks for s in r["shards"]), key=lambda s: s["index"])
    merged["token_count"] = sum(r["token_count"] for r in ranks)
    merged["excluded"] = {k: sum(r["excluded"][k] for r in ranks) for k in ("special", "massive")}
    d = int(merged["d_model"])
    pooled = RunningStats(d)
    for r in ranks:
        part = stats_from_manifest(r, d)
        pooled.count += part.count
        pooled.total += part.total
        pooled.total_sq += part.total_sq
        pooled.norm_sum += part.norm_sum
    merged["running_stats"] = pooled.to_dict()
    merged["normalization"] = Normalizer.from_stats(pooled, normalization).to_dict()  # type: ignore[arg-type]
    merged["activation_mean_norm"] = pooled.norm_sum / max(pooled.count, 1)
    merged["positions_total"] = merged["n_contexts_planned"] * merged["context_length"]
    merged["merged_from"] = [rank_manifest_name(i, shard_n) for i in range(shard_n)]
    merged["complete"] = True
    write_manifest(Path(out), merged)
    return merged
