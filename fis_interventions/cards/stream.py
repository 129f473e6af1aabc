"""One pass over a harvest's shards for every requested feature at once, in bounded memory.

Why: a card needs the contexts where a feature fires hardest, its activation histogram and its firing rate,
over a harvest that may be gigabytes. We read one shard at a time (only the rows of the chosen split, via
safetensors slices), run the joint SAE on ``batch_size`` rows at a time, and keep per feature only:

- the top-N contexts by the feature's maximum over the context (one entry per context, at its argmax
  position), with a window of tokens and the feature's values around that position, and for integration
  features the SAE code and NFM gate pattern at that token (for the pair analysis);
- firing count, sum, maximum, and a histogram of the non-zero values in fixed log-spaced bins
  (:data:`HIST_PER_DECADE` per decade from 1e-6 to 1e6: exact counts, no pass to find the range first).

Memory is O(shard rows x features + batch x d_sae + features x N x window), independent of the harvest size.
The shard format is documented in :mod:`fis_interventions.activations.shards` (``acts`` rows are the kept
positions of ``tokens``, row-major).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

CONTEXT_LEFT = 12  # tokens shown before the firing token
CONTEXT_RIGHT = 4  # and after it
HIST_LOG_MIN, HIST_LOG_MAX, HIST_PER_DECADE = -6, 6, 32
N_FINE_BINS = (HIST_LOG_MAX - HIST_LOG_MIN) * HIST_PER_DECADE


def fine_edges() -> torch.Tensor:
    """Edges of the fixed log-spaced histogram bins (values outside [1e-6, 1e6] fall into the end bins)."""
    return 10.0 ** (HIST_LOG_MIN + torch.arange(N_FINE_BINS + 1, dtype=torch.float64) / HIST_PER_DECADE)


@dataclass(frozen=True)
class FeatureKey:
    """One feature: a named point of the joint SAE and an index there."""

    point: str
    index: int


@dataclass
class ShardRows:
    """The rows of one shard that belong to the chosen split, with where each row came from."""

    acts: torch.Tensor  # [rows, d] float32, raw (not normalised)
    row_ctx: torch.Tensor  # [rows] local context index
    row_pos: torch.Tensor  # [rows] position in the context
    tokens: torch.Tensor  # [n_ctx, T] long
    context_ids: torch.Tensor  # [n_ctx] global context ids


def read_split(path: Path, want: Callable[[torch.Tensor], torch.Tensor]) -> ShardRows:
    """Read only the contexts ``want(context_ids)`` selects; their activation rows are sliced, not all loaded."""
    with safe_open(str(path), framework="pt") as f:
        ctx = f.get_tensor("context_ids").long()
        keep = f.get_tensor("keep").bool()
        tokens = f.get_tensor("tokens").long()
        mask = want(ctx)
        counts = keep.sum(1)
        ends = counts.cumsum(0)
        starts = ends - counts
        if bool(mask.all()):
            acts = f.get_tensor("acts")
        else:
            sl = f.get_slice("acts")
            parts = [sl[int(s):int(e)] for s, e in zip(starts[mask].tolist(), ends[mask].tolist()) if e > s]
            d = sl.get_shape()[1]
            acts = torch.cat(parts) if parts else torch.empty(0, d)
    keep = keep[mask]
    row_ctx, row_pos = keep.nonzero(as_tuple=True)  # row-major: the order of the rows of ``acts``
    return ShardRows(acts.float(), row_ctx, row_pos, tokens[mask], ctx[mask])


def _sparse_pick(values: torch.Tensor, indices: torch.Tensor, slot: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] dense values of the wanted latents from top-k codes (0 where inactive), in O(B * k).

    ``slot`` maps a latent index to its column among the wanted ones, -1 for the others; no [B, d_sae] tensor
    is formed. Top-k indices are distinct within a row, so each wanted column is written at most once; the
    others all land in a spare column n, dropped."""
    col = slot[indices]
    col = torch.where(col >= 0, col, torch.full_like(col, n))
    return values.new_zeros(len(values), n + 1).scatter_(1, col, values)[:, :n]


class FeatureReader:
    """Feature values of many features at once from ONE joint forward per batch.

    The values are read off :class:`~fis_interventions.sae.model.JointOutput` (the same tensors the hook
    points ``sae.hook_latents``, ``nfm.hook_hidden`` and ``secondary.hook_latents`` carry, tested equal), so
    no dense [batch, d_sae] latents tensor is formed.
    """

    def __init__(self, joint: Any, keys: Sequence[FeatureKey]) -> None:
        self.joint = joint
        self.keys = list(keys)
        # the NFM runs only when an integration feature is asked for (its codes and gates feed the pair analysis)
        self.integration = joint.nfm is not None and any(k.point != "sae.hook_latents" for k in self.keys)
        self.components = "sae+interaction" if self.integration else "sae"
        device = joint.sae.W_dec.device
        self.groups: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for point in dict.fromkeys(k.point for k in self.keys):
            cols = [i for i, k in enumerate(self.keys) if k.point == point]
            idx = torch.tensor([self.keys[i].index for i in cols], device=device)
            width = joint.sae.d_sae if point == "sae.hook_latents" else (
                joint.secondary.d_sae if point == "secondary.hook_latents" else 0)
            slot = torch.full((width,), -1, dtype=torch.long, device=device)
            if width:
                slot[idx] = torch.arange(len(idx), device=device)
            self.groups[point] = (torch.tensor(cols, device=device), idx, slot)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """``(values [B, F], out)`` for normalised inputs ``x``; ``out`` is the JointOutput."""
        out = self.joint(x, self.components)
        values = x.new_zeros(x.shape[0], len(self.keys), dtype=torch.float32)
        for point, (cols, idx, slot) in self.groups.items():
            if point == "sae.hook_latents":
                v = _sparse_pick(out.latents.values, out.latents.indices, slot, len(idx))
            elif point == "nfm.hook_hidden":
                v = out.hidden[:, idx]
            else:
                v = _sparse_pick(out.secondary_latents.values, out.secondary_latents.indices, slot, len(idx))
            values[:, cols] = v.float()
        return values, out


@dataclass
class StreamResult:
    """What the pass keeps per feature (dimension 0 follows ``keys``); see the module docstring."""

    keys: list[FeatureKey]
    n_tokens: int
    n_contexts: int
    n_fire: torch.Tensor  # [F]
    total: torch.Tensor  # [F] sum of positive values
    vmax: torch.Tensor  # [F]
    hist: torch.Tensor  # [F, N_FINE_BINS]
    top_val: torch.Tensor  # [F, N]  (-inf where fewer contexts)
    top_ctx: torch.Tensor  # [F, N]  global context id
    top_pos: torch.Tensor  # [F, N]
    win_tok: torch.Tensor  # [F, N, W] token ids, -1 outside the context
    win_act: torch.Tensor  # [F, N, W] feature values, NaN at excluded positions / outside
    code_val: torch.Tensor | None  # [F, N, k] NFM input codes at the top token (integration checkpoints)
    code_idx: torch.Tensor | None
    gates: torch.Tensor | None  # [F, N, hidden] NFM hidden > 0 at the top token
    max_batch_rows: int = 0  # largest batch sent through the joint model (tests check the bound)


class _Top:
    """Running top-N per feature of several aligned tensors, merged shard by shard."""

    def __init__(self, n_feat: int, n: int) -> None:
        self.n = n
        self.val = torch.full((n_feat, 0), float("-inf"))
        self.extra: dict[str, torch.Tensor] = {}

    def merge(self, val: torch.Tensor, extra: dict[str, torch.Tensor]) -> None:
        val = torch.cat([self.val, val], 1)
        extra = {k: torch.cat([self.extra[k], v], 1) if k in self.extra else v for k, v in extra.items()}
        keep = min(self.n, val.shape[1])
        self.val, order = val.topk(keep, dim=1)
        self.extra = {k: v.gather(1, order.view(*order.shape, *([1] * (v.dim() - 2))).expand(-1, -1, *v.shape[2:]))
                      for k, v in extra.items()}


@torch.no_grad()
def stream_features(joint: Any, normalizer: Any, keys: Sequence[FeatureKey], shard_paths: Sequence[Path],
                    want: Callable[[torch.Tensor], torch.Tensor], *, top: int = 20, batch_size: int = 2048,
                    progress: bool = False, verify: Callable[[Path], None] | None = None) -> StreamResult:
    """One pass over ``shard_paths`` (rows of the contexts ``want`` selects) for every feature in ``keys``;
    ``verify(path)`` (the store's content-hash check) runs before each shard is read."""
    from tqdm.auto import tqdm

    reader = FeatureReader(joint, keys)
    n_feat = len(keys)
    device = joint.sae.W_dec.device
    dtype = next(joint.parameters()).dtype
    offsets = torch.arange(-CONTEXT_LEFT, CONTEXT_RIGHT + 1)
    feat_ar = torch.arange(n_feat)
    n_fire = torch.zeros(n_feat, dtype=torch.long)
    total = torch.zeros(n_feat, dtype=torch.float64)
    vmax = torch.full((n_feat,), float("-inf"))
    hist = torch.zeros(n_feat * N_FINE_BINS, dtype=torch.long)
    running = _Top(n_feat, top)
    n_tokens = n_contexts = max_rows = 0
    for path in tqdm(shard_paths, disable=not progress, desc="cards", unit="shard"):
        if verify is not None:
            verify(path)
        rows = read_split(path, want)
        n_ctx, width = rows.tokens.shape
        if n_ctx == 0 or len(rows.acts) == 0:
            continue
        parts, codes_v, codes_i, gate_parts = [], [], [], []
        for start in range(0, len(rows.acts), batch_size):
            x = normalizer.apply(rows.acts[start:start + batch_size].to(device, dtype))
            max_rows = max(max_rows, len(x))
            values, out = reader(x)
            parts.append(values.cpu())
            if reader.integration:
                sel = joint.nfm.select(out.latents)
                codes_v.append(sel.values.float().cpu())
                codes_i.append(sel.indices.cpu())
                gate_parts.append((out.hidden > 0).cpu())
        values = torch.cat(parts)  # [rows, F]
        n_tokens += len(values)
        n_contexts += n_ctx
        positive = values > 0
        n_fire += positive.sum(0)
        total += values.clamp_min(0).sum(0, dtype=torch.float64)
        vmax = torch.maximum(vmax, values.max(0).values)
        fr, fc = positive.nonzero(as_tuple=True)
        bins = ((values[fr, fc].double().log10() - HIST_LOG_MIN) * HIST_PER_DECADE).floor().long()
        hist += torch.bincount(fc * N_FINE_BINS + bins.clamp(0, N_FINE_BINS - 1), minlength=hist.numel())

        dense = torch.zeros(n_ctx, width, n_feat)
        dense[rows.row_ctx, rows.row_pos] = values
        kept = torch.zeros(n_ctx, width, dtype=torch.bool)
        kept[rows.row_ctx, rows.row_pos] = True
        row_of = torch.full((n_ctx, width), -1, dtype=torch.long)
        row_of[rows.row_ctx, rows.row_pos] = torch.arange(len(values))
        ctx_max, ctx_arg = dense.max(dim=1)  # [n_ctx, F]
        k_here = min(top, n_ctx)
        tv, tc = ctx_max.T.topk(k_here, dim=1)  # [F, k_here]
        tp = ctx_arg.T.gather(1, tc)
        pos_w = tp.unsqueeze(-1) + offsets  # [F, k_here, W]
        inside = (pos_w >= 0) & (pos_w < width)
        pos_c = pos_w.clamp(0, width - 1)
        ctx_w = tc.unsqueeze(-1).expand_as(pos_c)
        win_tok = torch.where(inside, rows.tokens[ctx_w, pos_c], torch.full_like(pos_c, -1))
        act = dense[ctx_w, pos_c, feat_ar.view(-1, 1, 1).expand_as(pos_c)]
        win_act = torch.where(inside & kept[ctx_w, pos_c], act, torch.full_like(act, float("nan")))
        extra = {"ctx": rows.context_ids[tc], "pos": tp, "win_tok": win_tok, "win_act": win_act}
        if reader.integration:
            row = row_of[tc, tp].clamp_min(0)  # -1 only where the context never fires (value 0, dropped later)
            extra["code_val"] = torch.cat(codes_v)[row]
            extra["code_idx"] = torch.cat(codes_i)[row]
            extra["gates"] = torch.cat(gate_parts)[row]
        running.merge(tv, extra)
    ex = running.extra
    empty = torch.zeros(n_feat, 0, dtype=torch.long)
    return StreamResult(
        keys=list(keys), n_tokens=n_tokens, n_contexts=n_contexts, n_fire=n_fire, total=total, vmax=vmax,
        hist=hist.view(n_feat, N_FINE_BINS), top_val=running.val, top_ctx=ex.get("ctx", empty),
        top_pos=ex.get("pos", empty), win_tok=ex.get("win_tok", empty.unsqueeze(-1)),
        win_act=ex.get("win_act", empty.unsqueeze(-1).float()), code_val=ex.get("code_val"),
        code_idx=ex.get("code_idx"), gates=ex.get("gates"), max_batch_rows=max_rows)
