"""On-disk activation shards and their manifest.

A harvest folder holds ``manifest.json`` and ``shard_00000.safetensors``, ... Each shard has:
``acts`` [n_kept, d_model] (the harvested dtype), ``tokens`` [n_ctx, context_length] int32, ``keep``
[n_ctx, context_length] uint8 (which positions the rows of ``acts`` came from, row-major) and ``context_ids``
[n_ctx] int64 (global context index, used for the train/held-out split).

A shard is written to a temporary name and renamed; the manifest lists only complete shards and is rewritten
atomically after each one, so an interrupted harvest resumes from the last complete shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from ..errors import FisError
from ..fingerprint import own
from ..io import atomic_path, write_json
from .exclusion import ExclusionRule
from .normalization import Normalizer, RunningStats

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def write_shard(folder: Path, index: int, acts: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor,
                context_ids: torch.Tensor) -> str:
    """Write one shard atomically; return the SHA-256 of its bytes, for the manifest entry (``sha256``), so
    every reader can check the shard it reads is the one written (hashed in memory: no second read)."""
    path = Path(folder) / shard_name(index)
    own(Path(folder), [path.name])
    data = save_bytes({"acts": acts.contiguous(), "tokens": tokens.to(torch.int32).contiguous(),
                       "keep": keep.to(torch.uint8).contiguous(), "context_ids": context_ids.to(torch.int64)})
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _bad_manifest(folder: Path, what: str) -> FisError:
    return FisError(f"manifest.json is damaged: {what}", source=Path(folder) / MANIFEST,
                    fix="restore the harvest folder, or harvest again into a new --out")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_manifest(folder: Path, manifest: Any) -> None:
    """The manifest's structure, its counts, and that every shard it lists is a plain file name inside the
    folder (an entry such as ``../../acts/shard_00000.safetensors`` would read outside the harvest)."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise _bad_manifest(folder, "no list of shards")
    for key in ("d_model", "context_length"):
        if not _count(manifest.get(key)) or manifest[key] == 0:
            raise _bad_manifest(folder, f"{key} is {manifest.get(key)!r}, not a positive whole number")
    for key in ("normalization", "exclusion"):
        if not isinstance(manifest.get(key), dict):
            raise _bad_manifest(folder, f"no {key} record")
    names: set[str] = set()
    for i, entry in enumerate(manifest["shards"]):
        if not isinstance(entry, dict):
            raise _bad_manifest(folder, f"shards[{i}] is not a record")
        name = entry.get("file")
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..") or "\\" in name:
            raise _bad_manifest(folder, f"shards[{i}].file {name!r} is not a file name inside the harvest folder")
        if name in names:
            raise _bad_manifest(folder, f"shard {name} is listed twice")
        names.add(name)
        for key in ("n_contexts", "n_tokens"):
            if not _count(entry.get(key)):
                raise _bad_manifest(folder, f"shards[{i}].{key} is {entry.get(key)!r}, not a count")
        digest = entry.get("sha256")
        if digest is not None and not (isinstance(digest, str) and len(digest) == 64):
            raise _bad_manifest(folder, f"shards[{i}].sha256 is not a SHA-256 hex digest")
    total = sum(e["n_tokens"] for e in manifest["shards"])
    if "token_count" in manifest and manifest["token_count"] != total:
        raise _bad_manifest(folder, f"token_count is {manifest['token_count']!r} but the shards hold {total}")


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FisError("no manifest.json: not an activation folder (or the harvest never finished a shard)",
                       source=folder, fix="run `fis harvest --out FOLDER` first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FisError(f"manifest.json is not valid JSON ({err.msg})", source=path,
                       fix="restore the harvest folder, or harvest again into a new --out") from None
    except UnicodeDecodeError:
        raise FisError("manifest.json is not UTF-8 text", source=path,
                       fix="restore the harvest folder, or harvest again into a new --out") from None


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
        check_manifest(self.folder, self.manifest)
        self._entries = {self.folder / s["file"]: s for s in self.manifest["shards"]}
        self._verified: set[Path] = set()
        if self.manifest["shards"] and not all("sha256" in s for s in self.manifest["shards"]):
            log.warning("%s: the manifest carries no shard hashes (written before fis checked them): its shards' "
                        "counts are checked, their contents cannot be", self.folder)
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

    def verify_shard(self, path: Path) -> None:
        """Check a listed shard's content hash once per process, streaming the file (for readers that slice
        shards with ``safe_open`` instead of loading them through :meth:`load_shard`, e.g. feature cards)."""
        from ..fingerprint import file_digest

        path = Path(path)
        entry = self._entries.get(path)
        if entry is None:
            raise FisError("shard is not listed in the manifest", source=path, fix="read shards through the manifest")
        if path in self._verified:
            return
        digest = entry.get("sha256")
        try:
            actual = file_digest(path) if digest is not None else None
        except FileNotFoundError:
            raise FisError("shard listed in manifest.json is missing", source=path,
                           fix="restore the harvest folder, or harvest again into a new --out") from None
        if digest is not None and actual != digest:
            raise FisError("shard content does not match the SHA-256 in manifest.json (damaged or changed after the "
                           "harvest)", source=path, fix="restore the harvest folder, or harvest again into a new --out")
        self._verified.add(path)

    def load_shard(self, path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(activations of the split as float32, the split's context tokens) of one shard."""
        acts, keep, ctx, tokens = self._read_shard(Path(path))
        held = (ctx % self.heldout_every) == 0
        want = held if split == "heldout" else ~held
        if split not in ("train", "heldout"):
            raise ValueError(f"unknown split {split}")
        counts = keep.sum(1)
        row_ctx = torch.repeat_interleave(torch.arange(len(ctx)), counts)
        rows = want[row_ctx]
        return acts[rows].float(), tokens[want]

    def _read_shard(self, path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A listed shard's tensors, checked: its content hash on first use (one read: the bytes hashed are the
        bytes loaded), its counts against the manifest on every use. Damage is a one-line error."""
        entry = self._entries.get(path)
        if entry is None:
            raise FisError("shard is not listed in the manifest", source=path, fix="read shards through the manifest")
        try:
            if path not in self._verified:
                data = path.read_bytes()
                digest = entry.get("sha256")
                if digest is not None and hashlib.sha256(data).hexdigest() != digest:
                    raise FisError("shard content does not match the SHA-256 in manifest.json (damaged or changed "
                                   "after the harvest)", source=path,
                                   fix="restore the harvest folder, or harvest again into a new --out")
                t = load_bytes(data)
                del data
                self._verified.add(path)
                acts, keep, ctx, tokens = t["acts"], t["keep"].bool(), t["context_ids"], t["tokens"].long()
            else:
                with safe_open(str(path), framework="pt") as f:
                    acts = f.get_tensor("acts")
                    keep = f.get_tensor("keep").bool()
                    ctx = f.get_tensor("context_ids")
                    tokens = f.get_tensor("tokens").long()
        except FileNotFoundError:
            raise FisError("shard listed in manifest.json is missing", source=path,
                           fix="restore the harvest folder, or harvest again into a new --out") from None
        except (SafetensorError, KeyError, OSError, ValueError) as err:
            raise FisError(f"shard cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})",
                           source=path, fix="restore the harvest folder, or harvest again into a new --out") from None
        problem = None
        if acts.dim() != 2 or acts.shape[1] != self.d_model:
            problem = f"activations are {tuple(acts.shape)}, the manifest says width {self.d_model}"
        elif len(acts) != entry["n_tokens"] or int(keep.sum()) != len(acts):
            problem = f"{len(acts)} activation rows, {int(keep.sum())} kept positions, manifest n_tokens {entry['n_tokens']}"
        elif len(ctx) != entry["n_contexts"] or len(tokens) != len(ctx) or len(keep) != len(ctx):
            problem = f"{len(ctx)} contexts, manifest n_contexts {entry['n_contexts']}"
        if problem is not None:
            raise FisError(f"shard does not match manifest.json: {problem}", source=path,
                           fix="restore the harvest folder, or harvest again into a new --out")
        return acts, keep, ctx, tokens

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
        digest = write_shard(folder, i, acts, torch.ones(n_ctx, context_length, dtype=torch.int32),
                             torch.ones(n_ctx, context_length, dtype=torch.uint8), ids)
        manifest["shards"].append({"file": shard_name(i), "n_contexts": n_ctx, "n_tokens": int(acts.shape[0]),
                                   "sha256": digest})
        manifest["token_count"] += int(acts.shape[0])
        n_ctx_total += n_ctx
    if manifest is None:
        raise ValueError("no shards given")
    manifest["complete"] = True
    manifest["n_contexts_planned"] = n_ctx_total
    write_manifest(folder, manifest)
    return manifest
