"""On-disk activation shards and their manifest.

A harvest folder holds ``manifest.json`` and ``shard_00000.safetensors``, ... Each shard has:
``acts`` [n_kept, d_model] (the harvested dtype), ``tokens`` [n_ctx, context_length] int32, ``keep``
[n_ctx, context_length] uint8 (which positions the rows of ``acts`` came from, row-major) and ``context_ids``
[n_ctx] int64 (global context index, used for the train/held-out split).

A shard is written to a temporary name and renamed; the manifest lists only complete shards and is rewritten
atomically after each one, so an interrupted harvest resumes from the last complete shard.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import FisError
from ..fingerprint import own
from ..io import atomic_path, write_json
from .exclusion import ExclusionRule
from .normalization import Normalizer, RunningStats

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def write_shard(folder: Path, index: int, acts: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor,
                context_ids: torch.Tensor) -> Path:
    """Write one shard atomically."""
    path = Path(folder) / shard_name(index)
    own(Path(folder), [path.name])
    with atomic_path(path) as tmp:
        save_file({"acts": acts.contiguous(), "tokens": tokens.to(torch.int32).contiguous(),
                   "keep": keep.to(torch.uint8).contiguous(), "context_ids": context_ids.to(torch.int64)},
                  str(tmp))
    return path


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FisError("no manifest.json: not an activation folder (or the harvest never finished a shard)",
                       source=folder, fix="run `fis harvest --out FOLDER` first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FisError(f"manifest.json is not valid JSON ({err.msg})", source=path) from None


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    own(Path(folder), [MANIFEST])
    write_json(Path(folder) / MANIFEST, manifest)


@dataclass
class ActivationStore:
    """Read access to a harvest folder: the manifest, its normalisation and exclusion rule, and batches.

    Held-out split: a context is held out when ``context_id % heldout_every == 0`` (every 10th context for
    the default fraction 0.1), so held-out tokens come from across the whole corpus, never from a context
    that was also trained on.
    """

    folder: Path
    heldout_fraction: float = 0.1

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self.manifest = read_manifest(self.folder)
        if not self.manifest["shards"]:
            raise FisError("the activation folder has no complete shard", source=self.folder,
                           fix="rerun `fis harvest` to finish it")
        if not 0 < self.heldout_fraction < 1:
            raise FisError("heldout_fraction must be between 0 and 1", field="heldout_fraction")
        self.heldout_every = max(2, round(1 / self.heldout_fraction))

    @property
    def normalizer(self) -> Normalizer:
        return Normalizer.from_dict(self.manifest["normalization"])

    @property
    def exclusion(self) -> ExclusionRule:
        return ExclusionRule.from_dict(self.manifest["exclusion"])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    def shard_paths(self) -> list[Path]:
        return [self.folder / s["file"] for s in self.manifest["shards"]]

    def load_shard(self, path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(activations of the split as float32, the split's context tokens) of one shard."""
        with safe_open(str(path), framework="pt") as f:
            acts = f.get_tensor("acts")
            keep = f.get_tensor("keep").bool()
            ctx = f.get_tensor("context_ids")
            tokens = f.get_tensor("tokens").long()
        held = (ctx % self.heldout_every) == 0
        want = held if split == "heldout" else ~held
        if split not in ("train", "heldout"):
            raise ValueError(f"unknown split {split}")
        counts = keep.sum(1)
        row_ctx = torch.repeat_interleave(torch.arange(len(ctx)), counts)
        rows = want[row_ctx]
        return acts[rows].float(), tokens[want]

    def activations(self, split: str = "train", normalized: bool = True) -> torch.Tensor:
        """All activations of a split in memory (fine for tests and small runs; training streams)."""
        parts = [self.load_shard(p, split)[0] for p in self.shard_paths()]
        acts = torch.cat(parts)
        return self.normalizer.apply(acts) if normalized else acts

    def contexts(self, split: str = "heldout") -> torch.Tensor:
        """Token contexts of a split [n_ctx, context_length], for spliced evaluation."""
        return torch.cat([self.load_shard(p, split)[1] for p in self.shard_paths()])

    def iter_batches(self, batch_size: int, split: str = "train", seed: int = 0, start_batch: int = 0,
                     normalized: bool = True, rank: int = 0, world_size: int = 1) -> Iterator[torch.Tensor]:
        """Endless shuffled batches, deterministic in (seed, batch index): resuming at ``start_batch`` yields
        exactly the batches an uninterrupted run would have seen next. Only one shard is in memory at a time.
        With ``world_size > 1`` each rank takes its own slice of every global batch (data parallelism)."""
        norm = self.normalizer
        paths = self.shard_paths()
        global_batch = batch_size * world_size
        produced = 0
        epoch = 0
        carry = torch.empty(0, self.d_model)
        while True:
            rng = np.random.default_rng([seed, epoch])
            for shard_idx in rng.permutation(len(paths)):
                acts, _ = self.load_shard(paths[shard_idx], split)
                acts = acts[torch.from_numpy(rng.permutation(len(acts)))]
                pool = torch.cat([carry, acts])
                n_full = len(pool) // global_batch
                for b in range(n_full):
                    if produced >= start_batch:
                        batch = pool[b * global_batch:(b + 1) * global_batch]
                        batch = batch[rank * batch_size:(rank + 1) * batch_size]
                        yield norm.apply(batch) if normalized else batch
                    produced += 1
                carry = pool[n_full * global_batch:]
            epoch += 1
            if epoch > 10_000:  # pragma: no cover - a split smaller than one batch would loop forever
                raise FisError(f"the {split} split has fewer tokens than one batch of {global_batch}",
                               source=self.folder, field="batch_size", fix="harvest more tokens")


def new_manifest(**fields: Any) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "complete": False, "shards": [], "token_count": 0,
            "excluded": {"special": 0, "massive": 0}, **fields}


def stats_from_manifest(manifest: dict[str, Any], d: int) -> RunningStats:
    state = manifest.get("running_stats")
    return RunningStats.from_dict(state) if state else RunningStats(d)


def write_tensor_folder(folder: Path, shards: Iterable[torch.Tensor], context_length: int, *,
                        model: str = "synthetic", hook: str = "blocks.0.hook_resid_post",
                        normalization: dict[str, Any] | None = None) -> dict[str, Any]:
    """A harvest-format folder from in-memory activations (every position kept, no special tokens).

    For benchmarks and tests that need shards without running a model; each tensor [n, d] becomes one shard of
    ``n / context_length`` contexts.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] | None = None
    n_ctx_total = 0
    for i, acts in enumerate(shards):
        if acts.shape[0] % context_length:
            raise ValueError("each shard's row count must be a multiple of context_length")
        n_ctx = acts.shape[0] // context_length
        if manifest is None:
            manifest = new_manifest(model=model, hook=hook, d_model=int(acts.shape[1]), context_length=context_length,
                                    normalization=normalization or {"kind": "expected_norm", "scale": 1.0},
                                    exclusion={"special_ids": [0], "norm_multiple": None, "median_norm": None})
        ids = torch.arange(n_ctx_total, n_ctx_total + n_ctx)
        write_shard(folder, i, acts, torch.ones(n_ctx, context_length, dtype=torch.int32),
                    torch.ones(n_ctx, context_length, dtype=torch.uint8), ids)
        manifest["shards"].append({"file": shard_name(i), "n_contexts": n_ctx, "n_tokens": int(acts.shape[0])})
        manifest["token_count"] += int(acts.shape[0])
        n_ctx_total += n_ctx
    if manifest is None:
        raise ValueError("no shards given")
    manifest["complete"] = True
    manifest["n_contexts_planned"] = n_ctx_total
    write_manifest(folder, manifest)
    return manifest
