"""`fis battery`: clamp features of a joint SAE inside the forward pass and record logit shifts.

For every stimulus batch the model prefix (up to the checkpoint's hook) runs once; every condition of every
feature reuses it: the edited residual is ``clean + invert(recon_edited) - invert(recon)`` (error-term trick).
All features x conditions of the batch, plus one clean copy, are stacked into one joint-SAE pass and one
suffix pass (split into chunks of at most ``max_batch_rows`` rows), logits are only computed at the readout
position, and the scores come back in one device-to-host copy per pass. The clean readout is copy 0 of the
same pass, so ``scale: 1`` reproduces the clean scores exactly on any device. A random-direction control
(``directions:``) is a block that runs its feature's clamp and then has its residual change replaced, token by
token, by a seeded random unit vector times that change's norm (:func:`.features.direction_deltas`). One work unit = (design,
stimulus batch, feature); its rows are committed in one SQLite transaction, so rerunning resumes where it
stopped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..attach import Attached, attach
from ..config import load_config
from ..designs import expand, load_design, target_tokens
from ..designs.checks import KL_READOUT
from ..distributed import parse_shard
from .. import recorded_paths
from ..errors import FisError
from ..fingerprint import (Fingerprint, check_output, checkpoint_identity, claim, file_digest, folder_identity,
                           lock_folder, own, package_version, refuse_links_inside, releases_locks)
from ..holdout import design_identity
from ..io import atomic_path, write_json
from ..limits import check_stimuli_fit
from ..model_identity import key, of_bridge
from ..models import load_model, model_name
from ..provenance import provenance, seed_everything
from ..splice import PrefixState, pad_right
from .config import BatteryConfig
from .features import (ActivationStats, Condition, Target, conditions, direction_deltas, resolve_features,
                       screened_designs, stacked_edit)
from .store import ResultStore, StoreMeta, merge, read_results

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """Token ids of a batch of stimulus x prompt rows, with the positions the battery needs."""

    tokens: torch.Tensor  # [B, T] right-padded
    mask: torch.Tensor  # [B, T]
    readout: torch.Tensor  # [B] readout position
    stimulus_mask: torch.Tensor  # [B, T] positions inside the stimulus text

    def to(self, device: torch.device) -> Encoded:
        """The batch on ``device``: each tensor copied there once per batch (a no-op where it already is)."""
        return Encoded(*(t.to(device) for t in (self.tokens, self.mask, self.readout, self.stimulus_mask)))


def encode_rows(rows: pd.DataFrame, tokenizer: Any) -> Encoded:
    """Tokenise ``text`` with BOS first; find the readout token (holding char readout_end-1) and stimulus span."""
    seqs, readouts, stim_spans = [], [], []
    for text, stim, end in zip(rows["text"], rows["stimulus"], rows["readout_end"], strict=True):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        target_char = int(end) - 1
        pos = max(i for i, (s, _) in enumerate(offsets) if s <= target_char)
        n_stim = sum(1 for s, _ in offsets if s < len(stim))
        seqs.append([tokenizer.bos_token_id, *enc["input_ids"]])
        readouts.append(pos + 1)
        stim_spans.append(n_stim)
    tokens, mask = pad_right(seqs, tokenizer.pad_token_id)
    stim = torch.zeros_like(mask, dtype=torch.bool)
    for i, n in enumerate(stim_spans):
        stim[i, 1:1 + n] = True
    return Encoded(tokens, mask, torch.tensor(readouts), stim)


@dataclass
class Readouts:
    """What is read at the readout position: the design's scored token ids, sets and contrasts.

    With ``multi_token: sum_logprob`` a split word's score is the sum of the log-probabilities of all its tokens
    by teacher forcing: the first token is read at the readout position; the rest come from an extended copy of
    each stimulus with the word's earlier tokens appended (``continuations``), run under the same edit.
    """

    word_ids: list[tuple[str, int]]  # (word, first token id) in set order
    sets: dict[str, list[int]]  # set name -> positions in word_ids
    contrasts: dict[str, tuple[str, str]]
    score: str  # logit | logprob
    continuations: dict[int, tuple[int, ...]] = field(default_factory=dict)  # word index -> all its token ids
    warnings: list[str] = field(default_factory=list)  # from tokenising the target words

    @classmethod
    def for_design(cls, design: Any, tokenizer: Any) -> Readouts:
        sets = target_tokens(design, tokenizer)
        word_ids: list[tuple[str, int]] = []
        positions: dict[str, list[int]] = {}
        continuations: dict[int, tuple[int, ...]] = {}
        index: dict[str, int] = {}  # a word in two sets is scored once (one result row) and used by both
        for name, words in sets.items():
            positions[name] = []
            for w in words:
                if w.word in index:
                    positions[name].append(index[w.word])
                    continue
                index[w.word] = len(word_ids)
                positions[name].append(len(word_ids))
                if len(w.token_ids) > 1:
                    continuations[len(word_ids)] = tuple(w.token_ids)
                word_ids.append((w.word, w.token_ids[0]))
        if continuations and design.readout.position != "last":
            raise FisError("multi_token: sum_logprob needs the readout at the last token (the word is appended)",
                           source=design.source, field="readout.position", fix="use position: last")
        return cls(word_ids, positions, design.readout.contrast_terms(), design.readout.score, continuations,
                   list(sets.warnings))

    def _index_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Word ids and continuation columns on ``device``, built and copied once per run (not once per pass)."""
        cache = self.__dict__.setdefault("_on_device", {})
        key = str(device)
        if key not in cache:
            cache[key] = (torch.tensor([i for _, i in self.word_ids], device=device),
                          torch.tensor(list(self.continuations), dtype=torch.long, device=device))
        return cache[key]

    def scores(self, logits: torch.Tensor, extra: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-word scores [N, n_words] and per-contrast scores (mean of set A - mean of set B).

        ``extra`` [N, n_continuations]: log-probabilities of the later tokens of split words, added to their
        first token's log-probability (``sum_logprob``)."""
        base = logits.float().log_softmax(-1) if self.score == "logprob" else logits.float()
        ids, cols = self._index_tensors(logits.device)
        words = base[:, ids]
        if extra is not None and self.continuations:
            words = words.index_add(1, cols, extra.to(words))
        return words, self.contrast_scores(words)

    def contrast_scores(self, words: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-contrast scores from the per-word scores [N, n_words] (mean of set A - mean of set B)."""
        return {name: words[:, self.sets[a]].mean(1) - words[:, self.sets[b]].mean(1)
                for name, (a, b) in self.contrasts.items()}

    def contrast_columns(self, device: torch.device) -> torch.Tensor | None:
        """The token ids whose raw logits give every contrast exactly, so a caller that needs the contrasts only
        may compute those columns of the unembedding and :meth:`contrast_scores` of them. With single-token
        words a contrast is the mean over set A minus the mean over set B: the log-softmax normaliser of
        ``score: logprob`` is in both means with weight 1 and cancels, so logit and logprob give the same
        contrast. None when a split word's later tokens are scored (``sum_logprob``)."""
        if self.continuations:
            return None
        return self._index_tensors(device)[0]


@dataclass
class Extended:
    """Each stimulus of a batch with a split word's tokens appended (all but the last), one copy per word."""

    enc: Encoded  # rows ordered word-major: copy m of row i is row m * B + i
    positions: torch.Tensor  # [B*M, P] positions whose logits predict the word's later tokens
    targets: torch.Tensor  # [B*M, P] those tokens
    valid: torch.Tensor  # [B*M, P]
    n_words: int  # M

    def to(self, device: torch.device) -> Extended:
        return Extended(self.enc.to(device), self.positions.to(device), self.targets.to(device),
                        self.valid.to(device), self.n_words)


def extend_rows(enc: Encoded, continuations: dict[int, tuple[int, ...]], pad_id: int) -> Extended:
    seqs, readouts, stim, pos, tgt = [], [], [], [], []
    lengths = enc.mask.sum(1).tolist()
    width = max(len(ids) for ids in continuations.values()) - 1
    for ids in continuations.values():
        for i, n in enumerate(lengths):
            seqs.append(enc.tokens[i, :n].tolist() + list(ids[:-1]))
            readouts.append(int(enc.readout[i]))
            stim.append(enc.stimulus_mask[i, :n])
            p = [n + j for j in range(len(ids) - 1)]  # position n holds ids[0]; its logits predict ids[1]
            pos.append(p + [n] * (width - len(p)))
            tgt.append(list(ids[1:]) + [pad_id] * (width - len(p)))
    tokens, mask = pad_right(seqs, pad_id)
    stim_mask = torch.zeros_like(mask, dtype=torch.bool)
    for r, m in enumerate(stim):
        stim_mask[r, :len(m)] = m
    positions = torch.tensor(pos)
    valid = torch.tensor([[j < len(ids) - 1 for j in range(width)] for ids in continuations.values()
                          for _ in lengths])
    return Extended(Encoded(tokens, mask, torch.tensor(readouts), stim_mask), positions, torch.tensor(tgt), valid,
                    len(continuations))


WHERE = ("all", "stimulus", "readout")


@dataclass
class Prepared:
    """A stimulus batch after its prefix pass: what every stacked suffix pass over it reuses."""

    enc: Encoded
    resid: torch.Tensor  # [B, T, d] residual at the hook
    state: PrefixState  # what the suffix needs besides the residual
    keep_idx: torch.Tensor  # [n] flat positions (b * T + t) that the splice edits
    x: torch.Tensor  # [n, d_in] the joint model's inputs at those positions
    where: dict[str, torch.Tensor]  # where kind -> [n] bool, which kept positions a condition edits


@torch.no_grad()
def kept_inputs(attached: Attached, tokens: torch.Tensor, mask: torch.Tensor, resid: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep_idx, x)``: the flat positions (b * T + t) the splice edits, and the joint model's inputs there."""
    keep_idx = attached.splice.keep_mask(tokens, resid, mask).reshape(-1).nonzero().squeeze(1)
    return keep_idx, attached.splice.inputs(resid.reshape(-1, resid.shape[-1]).index_select(0, keep_idx))


@torch.no_grad()
def _prepare(attached: Attached, enc: Encoded, prefix: tuple[torch.Tensor, PrefixState] | None = None
             ) -> Prepared:
    """Prefix pass, kept positions and where-masks of a batch: its one host sync (the number of kept
    positions is data-dependent); every condition after it reuses these tensors. The batch's tensors reach
    the device here, once (tokens, mask, readout and stimulus positions). ``prefix``: the ``(resid, state)``
    of the same tokens from a pass already made (the screen shares its pass with the attribution)."""
    enc = enc.to(attached.split.device)
    resid, state = prefix if prefix is not None else attached.split.prefix(enc.tokens, enc.mask)
    keep_idx, x = kept_inputs(attached, enc.tokens, enc.mask, resid)
    readout = torch.zeros_like(enc.mask, dtype=torch.bool)
    readout[torch.arange(len(readout), device=readout.device), enc.readout] = True
    masks = torch.stack([enc.mask.bool(), enc.stimulus_mask, readout])
    masks = masks.reshape(len(WHERE), -1).index_select(1, keep_idx)
    return Prepared(enc, resid, state, keep_idx, x, dict(zip(WHERE, masks, strict=True)))


Block = tuple[Target, Condition]


@torch.no_grad()
def _stacked_logits(attached: Attached, prep: Prepared, positions: torch.Tensor, blocks: list[Block]
                    ) -> torch.Tensor:
    """Logits at ``positions`` [B, P] for the clean batch (copy 0) and every (feature, condition) block:
    [(len(blocks) + 1) * B, P, V], from ONE joint pass and ONE suffix pass.

    Only the edited rows whose residual differs from the clean one (in any bit, at any position) go through
    the suffix, next to the clean rows; the others (``scale: 1``, a feature inactive on that stimulus, an edit
    that rounds away) ARE the clean run and get its logits. So a no-op is exactly 0 on any device, and it costs
    nothing. The rows to run are data-dependent: one host sync per pass."""
    n_blocks = len(blocks)
    points = dict.fromkeys(t.point for t, _ in blocks)
    edits = {p: stacked_edit(blocks, p, len(prep.x)) for p in points}
    deltas = attached.splice.stacked_deltas(prep.x, n_blocks, edits)  # [blocks, n, d]
    deltas = direction_deltas(deltas, [t for t, _ in blocks])  # random-direction controls: same norm per token
    where = torch.stack([prep.where[c.where] for _, c in blocks]).unsqueeze(-1)  # [blocks, n, 1]
    deltas = torch.where(where, deltas, torch.zeros((), dtype=deltas.dtype, device=deltas.device))
    b, t, d = prep.resid.shape
    kept = prep.resid.reshape(b * t, d).index_select(0, prep.keep_idx)  # [n, d]
    new = kept.unsqueeze(0) + deltas.to(kept.dtype)  # [blocks, n, d]
    moved = (new != kept.unsqueeze(0)).any(-1).to(torch.int32)  # [blocks, n]
    row_of = torch.div(prep.keep_idx, t, rounding_mode="floor")
    changed = torch.zeros(n_blocks, b, dtype=torch.int32, device=moved.device).index_add_(1, row_of, moved) > 0
    run = changed.reshape(-1).nonzero().squeeze(1)  # edited rows (block * B + row) that need the suffix
    stacked = prep.resid.reshape(1, b * t, d).repeat(n_blocks, 1, 1)
    stacked[:, prep.keep_idx] = new
    resid = torch.cat([prep.resid, stacked.view(n_blocks * b, t, d).index_select(0, run)])
    rows = torch.cat([torch.arange(b, device=run.device), torch.remainder(run, b)])
    logits = attached.split.suffix(resid, prep.state.take(rows),
                                   positions.to(resid.device).index_select(0, rows))
    out = logits[:b].repeat(n_blocks + 1, *([1] * (logits.dim() - 1)))
    out[b + run] = logits[b:]
    return out


@torch.no_grad()
def _chunk_scores(attached: Attached, prep: Prepared, ext: tuple[Prepared, Extended] | None,
                  readouts: Readouts, blocks: list[Block]) -> torch.Tensor:
    """[len(blocks) + 1, B, n_words + n_contrasts + 1] on the host: word scores, contrasts and KL to the clean
    copy (0 for copy 0), copied from the device in one transfer."""
    logits = _stacked_logits(attached, prep, prep.enc.readout.unsqueeze(1), blocks)[:, 0]
    extra = None
    if ext is not None:  # sum_logprob: the split words' later tokens, under the same edits
        prep_e, extended = ext
        extra = _continuation_logprobs(_stacked_logits(attached, prep_e, extended.positions, blocks), extended,
                                       len(blocks) + 1)
    words, con = readouts.scores(logits, extra)
    n_copies, n = len(blocks) + 1, len(prep.enc.readout)
    lp = logits.float().log_softmax(-1).view(n_copies, n, -1)
    kl = F.kl_div(lp, lp[:1].expand_as(lp), log_target=True, reduction="none").sum(-1)  # KL(clean || copy)
    cols = [words.view(n_copies, n, -1), *(v.view(n_copies, n, 1) for v in con.values()), kl.unsqueeze(-1)]
    return torch.cat(cols, -1).double().cpu()


def _rows_frame(meta: pd.DataFrame, blocks: list[Block], readouts: Readouts, scores: torch.Tensor, a: str, b: str
                ) -> pd.DataFrame:
    """Result rows of a chunk, built column-wise: one per block x stimulus row x readout (words, contrasts, KL)."""
    names = [w for w, _ in readouts.word_ids] + list(readouts.contrasts) + [KL_READOUT]
    kinds = ["word"] * len(readouts.word_ids) + ["contrast"] * len(readouts.contrasts) + ["kl"]
    vals = scores.numpy()
    n_blocks, n, n_read = len(blocks), vals.shape[1], vals.shape[2]
    blk = np.repeat(np.arange(n_blocks), n * n_read)
    row = np.tile(np.repeat(np.arange(n), n_read), n_blocks)
    col = np.tile(np.arange(n_read), n_blocks * n)
    clean = vals[0, row, col]
    clean[col == n_read - 1] = 0.0  # KL: measured against the clean run itself
    edited = vals[1 + blk, row, col]
    take = lambda values: np.asarray(values, dtype=object)[row]  # noqa: E731
    per_block = lambda f: np.asarray([f(t, c) for t, c in blocks], dtype=object)[blk]  # noqa: E731
    return pd.DataFrame({
        "design": take(meta["design"]), "item": take(meta["item"].astype(str)), "cell": take(meta["cell"]),
        "a": take(meta[a].astype(str)), "b": take(meta[b].astype(str)),
        "prompt_id": take(meta["prompt_id"].astype(str)),
        "point": per_block(lambda t, c: t.point), "feature": per_block(lambda t, c: t.label),
        "role": per_block(lambda t, c: t.role), "intervention": per_block(lambda t, c: c.label),
        "value": np.asarray([c.value for _, c in blocks], dtype=np.float64)[blk],
        "position": per_block(lambda t, c: c.where),
        "readout": np.asarray(names, dtype=object)[col], "readout_kind": np.asarray(kinds, dtype=object)[col],
        "score_clean": clean, "score_edited": edited, "shift": edited - clean,
        "_block": blk,
    })


def chunks(n_blocks: int, per_feature: int, rows_per_copy: int, max_rows: int) -> list[range]:
    """Consecutive block ranges such that (blocks + the clean copy) x rows stays within ``max_rows`` when it
    can (a block alone always runs); whole features per chunk whenever a feature fits."""
    per = max(1, max_rows // max(rows_per_copy, 1) - 1)
    if per >= per_feature:
        per -= per % per_feature
    return [range(s, min(s + per, n_blocks)) for s in range(0, n_blocks, per)]


@torch.no_grad()
def _kept_inputs(attached: Attached, batches: list[Encoded]) -> Iterator[torch.Tensor]:
    """The joint model's inputs at the kept positions of every stimulus batch (one prefix pass each)."""
    for enc in batches:
        yield _prepare(attached, enc).x


@torch.no_grad()
def _feature_max(attached: Attached, targets: list[Target], batches: list[Encoded]) -> dict[Target, float]:
    """Largest activation of each target (max over its indices) on the kept positions of the stimuli."""
    best: dict[Target, torch.Tensor] = {}
    points = {t.point for t in targets}
    for x in _kept_inputs(attached, batches):
        seen: dict[str, torch.Tensor] = {}
        attached.joint(x, "full" if attached.joint.nfm is not None else "sae",
                       edit={p: (lambda p: lambda v: seen.__setitem__(p, v.detach()))(p) for p in points})
        for t in targets:  # kept on the device: one copy at the end, not one per target and batch
            m = seen[t.point][:, list(t.indices)].max()
            best[t] = m if t not in best else torch.maximum(best[t], m)
    values = torch.stack([best[t] for t in targets]).tolist() if best else [float("-inf")] * len(targets)
    return {t: float(v) for t, v in zip(targets, values, strict=True)}


@torch.no_grad()
def _point_values(attached: Attached, batches: list[Encoded], points: set[str]) -> Iterator[dict[str, torch.Tensor]]:
    """The values at ``points`` on every kept position of every stimulus batch (one joint pass per batch)."""
    for x in _kept_inputs(attached, batches):
        seen: dict[str, torch.Tensor] = {}
        attached.joint(x, "full" if attached.joint.nfm is not None else "sae",
                       edit={p: (lambda p: lambda v: seen.__setitem__(p, v.detach()))(p) for p in points})
        yield seen


def _activation_stats(attached: Attached, batches: list[Encoded], point: str) -> ActivationStats:
    """Firing rate and mean activation when firing of every latent of ``point`` on the stimuli."""
    fired = total = None
    n = 0
    for seen in _point_values(attached, batches, {point}):
        v = seen[point].double()
        on = v > 0
        fired = on.sum(0) if fired is None else fired + on.sum(0)
        total = (v * on).sum(0) if total is None else total + (v * on).sum(0)
        n += v.shape[0]
    fired, total = fired.cpu().numpy(), total.cpu().numpy()
    mean = np.divide(total, fired, out=np.zeros_like(total), where=fired > 0)
    return ActivationStats(fired / max(n, 1), mean)


def _active_values(attached: Attached, targets: list[Target], batches: list[Encoded]) -> dict[Target, np.ndarray]:
    """Every non-zero activation of each target on the stimuli (what quantile clamps are calibrated on)."""
    parts: dict[Target, list[torch.Tensor]] = {t: [] for t in targets}
    for seen in _point_values(attached, batches, {t.point for t in targets}):
        for t in targets:
            v = seen[t.point][:, list(t.indices)].reshape(-1)
            parts[t].append(v[v > 0].float().cpu())
    return {t: torch.cat(v).numpy() if v else np.zeros(0) for t, v in parts.items()}


def _quantile_fn(values: np.ndarray) -> Any:
    return lambda q: float(np.quantile(values, q)) if len(values) else 0.0


def primary_test(cfg: BatteryConfig, designs: list[Any]) -> dict[str, Any]:
    """The pre-registered primary test (clamp and contrast readout), checked against the config and designs; the
    documented default (first real clamp, first contrast of the first design) when none is named."""
    kind, value, where = cfg.primary_condition()
    contrasts = [list(d.readout.contrast_terms()) for d in designs]
    if cfg.primary is None:
        readout = contrasts[0][0] if contrasts and contrasts[0] else None
        return {"intervention": kind, "value": value, "position": where, "readout": readout, "sesoi": None,
                "default": True}
    for d, names in zip(designs, contrasts, strict=True):
        if cfg.primary.readout not in names:
            raise FisError(f"primary readout {cfg.primary.readout!r} is not a contrast of design {d.name!r}",
                           field="primary.readout", fix=f"use one of: {', '.join(names) or '(none defined)'}")
    return {"intervention": kind, "value": value, "position": where, "readout": cfg.primary.readout,
            "sesoi": cfg.primary.sesoi, "default": False}


def store_path(out: Path, shard: tuple[int, int]) -> Path:
    i, n = shard
    return out / ("results.sqlite" if n == 1 else f"results.shard-{i}-of-{n}.sqlite")


def _store_files(path: Path) -> list[str]:
    """A SQLite store and the journals SQLite itself writes beside it."""
    return [path.name, *(f"{path.name}-{s}" for s in ("journal", "wal", "shm"))]


@releases_locks
def battery(config: BatteryConfig | Path | str, *, shard: str | None = None, bridge: Any = None,
            progress: bool = True, overwrite: bool = False, max_batch_rows: int | None = None) -> Path:
    """Run (or resume) a battery; return the results store path. See the module docstring.

    ``cfg.out`` follows the fingerprint rule (:mod:`fis_interventions.fingerprint`): the same settings resume,
    other settings are refused unless ``overwrite`` replaces the earlier run. ``max_batch_rows`` overrides the
    config's bound on the rows of one stacked suffix pass (memory, not results: the scores do not depend on it
    beyond float rounding on GPUs, so it is not part of the fingerprint)."""
    cfg = config if isinstance(config, BatteryConfig) else load_config(BatteryConfig, Path(config))
    if max_batch_rows is not None:
        cfg = cfg.model_copy(update={"max_batch_rows": max_batch_rows})
    seed_everything(cfg.seed)
    shard_i, shard_n = parse_shard(shard)
    designs = [load_design(p) for p in cfg.designs]
    _check_design_names(designs, cfg.designs)
    checkpoint_id = checkpoint_identity(cfg.checkpoint)  # hashed once: the screenings' check and the fingerprint
    design_ids = {d.name: design_identity(d) for d in designs}
    screened = screened_designs(cfg.features, cfg.checkpoint, checkpoint_id, design_ids)  # before anything is written
    if cfg.items == "confirmation" and not screened:
        raise FisError("items: confirmation needs a feature selected from_screening (nothing is held out)",
                       field="items", fix="drop `items`, or select features from_screening")
    out = Path(cfg.out)
    bridge = bridge if bridge is not None else load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    attached = attach(bridge, cfg.checkpoint)
    fp = battery_fingerprint(cfg, key(of_bridge(bridge)), checkpoint_id, list(design_ids.values()))
    check_output(out, fp, overwrite=overwrite)  # not ours / other settings: refused before any pass
    tokenizer = bridge.tokenizer

    plans = []
    all_batches: list[Encoded] = []
    selection: dict[str, dict[str, Any]] = {}
    for design in designs:
        rows = expand(design)
        rows, selection[design.name] = _select_items(rows, design.name, screened.get(design.name), cfg.items)
        if cfg.max_items is not None:
            keep_items = list(dict.fromkeys(rows["item"]))[:cfg.max_items]
            rows = rows[rows["item"].isin(keep_items)]
        rows = rows.reset_index(drop=True)
        batches = [(rows.iloc[s:s + cfg.batch_size], encode_rows(rows.iloc[s:s + cfg.batch_size], tokenizer))
                   for s in range(0, len(rows), cfg.batch_size)]
        all_batches += [enc for _, enc in batches]
        plans.append((design, rows, batches, Readouts.for_design(design, tokenizer)))
        _check_fit(bridge, design, batches, plans[-1][3])

    primary = primary_test(cfg, designs)
    active = None
    if any(f.top_linear for f in cfg.features):
        active = _active_latents(attached, all_batches)
    stats_cache: dict[str, ActivationStats] = {}

    def stats(point: str) -> ActivationStats:
        if point not in stats_cache:
            stats_cache[point] = _activation_stats(attached, all_batches, point)
        return stats_cache[point]

    targets = resolve_features(cfg.features, attached.joint, attached.checkpoint.d_in, cfg.seed, active, stats)
    claim(out, fp, overwrite=overwrite, shared=shard_n > 1)  # the folder is created now, every input checked
    # the largest activation per feature costs a prefix pass over every stimulus: only when a clamp needs it
    needs_max = any(spec.relative_to_max for spec in cfg.interventions)
    fmax = _feature_max(attached, targets, all_batches) if needs_max else {t: None for t in targets}
    needs_q = any(spec.quantile for spec in cfg.interventions)
    qvals = _active_values(attached, targets, all_batches) if needs_q else {}
    qfun = {t: _quantile_fn(qvals[t]) if needs_q else None for t in targets}
    warnings = []
    if primary["default"]:
        warnings.append(f"no primary test named in the config: the default is used ({primary['intervention']} "
                        f"{primary['value']:g} [{primary['position']}] on {primary['readout']!r}); name it under "
                        "`primary:` before the run (pre-registration)")
    run_meta = {
        "name": cfg.name, "model": model_name(bridge), "model_sha256": of_bridge(bridge).sha256,
        "hook": attached.hook, "checkpoint": str(cfg.checkpoint),
        "inputs": {"checkpoint": recorded_paths.record(cfg.checkpoint, out)},  # the folder can be moved
        "split_path": attached.split.path,
        "seed": cfg.seed, "config": cfg.model_dump(mode="json"), "fingerprint": fp.digest,
        "provenance": provenance(cfg.seed),
        "designs": {d.name: {**selection[d.name], "items_used": list(dict.fromkeys(r["item"].astype(str))),
                             "factors": {k: list(v) for k, v in d.factors.items()}, "file": str(p),
                             "n_items": int(r["item"].nunique()), "prompts": [t for _, t in d.readout.prompt_items()],
                             "contrasts": dict(d.readout.contrasts), "score": d.readout.score}
                    for (d, r, _, _), p in zip(plans, cfg.designs, strict=True)},
        "features": [{"point": t.point, "feature": t.label, "role": t.role, "max_activation": fmax[t],
                      **_match_record(t, stats_cache), **_selected_on(t, screened),
                      **({"clamps": {f"{c.kind} {c.value:g} [{c.where}]": c.amount
                                     for c in conditions(cfg.interventions, fmax[t] or 1.0, qfun[t])}} if needs_q else {})}
                     for t in targets],
        "primary": primary,
        "warnings": warnings + [w for plan in plans for w in plan[3].warnings],
        "shards": shard_n,
    }
    units = [(di, bi, ti) for di, plan in enumerate(plans) for bi in range(len(plan[2])) for ti in range(len(targets))]
    mine = [u for k, u in enumerate(units) if k % shard_n == shard_i]
    own(out, _store_files(store_path(out, (shard_i, shard_n))))
    store = ResultStore(store_path(out, (shard_i, shard_n)),  # a damaged store is refused before run.json
                        StoreMeta(fingerprint=fp.digest, shard=shard_i, shards=shard_n, units=len(mine)))
    _check_unit_rows(store, {_unit_key(fp, plans, targets, u): _unit_size(plans, cfg, u) for u in mine})
    own(out, ["run.json"])
    write_json(out / "run.json", run_meta)

    done = store.done_units()
    todo = [u for u in mine if _unit_key(fp, plans, targets, u) not in done]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), disable=not progress, desc=f"battery {cfg.name}",
               unit="unit")
    by_batch: dict[tuple[int, int], list[int]] = {}
    for di, bi, ti in todo:
        by_batch.setdefault((di, bi), []).append(ti)
    for (di, bi), tis in by_batch.items():
        design, _, batches, readouts = plans[di]
        meta, enc = batches[bi]
        for ti, rows in _run_batch(attached, enc, meta, readouts, [targets[ti] for ti in tis], tis, cfg, fmax,
                                   list(design.factors), tokenizer.pad_token_id, qfun):
            store.commit_unit(_unit_key(fp, plans, targets, (di, bi, ti)), rows)
            bar.update(1)
    bar.close()
    store.close()
    if shard_n == 1:
        export(out)
    return store_path(out, (shard_i, shard_n))


def _check_fit(bridge: Any, design: Any, batches: list[tuple[pd.DataFrame, Encoded]], readouts: Readouts) -> None:
    """Every stimulus row, with a split word's appended tokens, fits the model's context (else refused)."""
    extra = max((len(ids) - 1 for ids in readouts.continuations.values()), default=0)
    for meta, enc in batches:
        labels = [f"design {design.name!r}: item {i}, cell {c}, prompt {p}"
                  for i, c, p in zip(meta["item"], meta["cell"], meta["prompt_id"], strict=True)]
        check_stimuli_fit(bridge, [n + extra for n in enc.mask.sum(1).tolist()], labels, source=design.source)


def _unit_size(plans: list, cfg: BatteryConfig, unit: tuple[int, int, int]) -> int:
    """Rows a unit writes: its stimulus rows x conditions x readouts (words, contrasts, KL)."""
    di, bi, _ = unit
    readouts = plans[di][3]
    n_conds = sum(len(spec.values) for spec in cfg.interventions)
    return len(plans[di][2][bi][0]) * n_conds * (len(readouts.word_ids) + len(readouts.contrasts) + 1)


def _check_unit_rows(store: ResultStore, expected: dict[str, int]) -> None:
    """On resume: every finished unit recorded the rows it should have produced."""
    for unit, n in store.unit_rows().items():
        if n is not None and unit in expected and n != expected[unit]:
            store.close()
            raise FisError(f"results store is damaged: unit {unit.split('|', 1)[1]} recorded {n} rows, it should "
                           f"have {expected[unit]}", source=store.path,
                           fix="rerun with --overwrite, or into a new out folder")


def _check_design_names(designs: list[Any], paths: list[Path]) -> None:
    """Results are keyed by design name: two files with one ``name:`` would write the same rows twice."""
    first: dict[str, Path] = {}
    for design, path in zip(designs, paths, strict=True):
        if design.name in first:
            raise FisError(f"designs {first[design.name]} and {path} have the same name '{design.name}'",
                           field="designs", fix="give each design file its own `name:`")
        first[design.name] = path


def _select_items(rows: pd.DataFrame, name: str, screened: dict[str, Any] | None, items: str | None
                  ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The rows a design runs on, and how they were chosen: a design some feature was screened on runs on the
    items its screenings held out (``items: confirmation``, the default) or on every item (``items: all``,
    exploratory); other designs run on every item (no feature was selected on them)."""
    if screened is None:
        return rows, {"item_selection": "all (no feature was selected on this design)"}
    discovery = set(screened["discovery"])
    if items == "all":
        return rows, {"item_selection": "all (exploratory: includes the discovery items of the screening)",
                      "discovery_items": screened["discovery"]}
    kept = rows[~rows["item"].astype(str).isin(discovery)]
    if kept.empty:
        raise FisError(f"design {name!r}: the screening held out no items (it screened every item)",
                       source=screened["screenings"][0], field="items",
                       fix="rescreen with --discover 0.5, or set `items: all` (exploratory)")
    return kept, {"item_selection": "confirmation (items held out from the screening)",
                  "discovery_items": screened["discovery"]}


def _match_record(target: Target, stats: dict[str, ActivationStats]) -> dict[str, Any]:
    """run.json's record of a feature's activation statistics on the stimuli (where computed) and, for a
    matched control, the feature it is matched to; for a random-direction control, its feature, index and seed."""
    out: dict[str, Any] = {}
    if target.direction is not None:  # it edits its feature's indices: their statistics are the feature's
        return {"matched_to": target.matched_to, "control_kind": "random_direction", "direction": target.direction,
                "direction_seed": target.direction_seed}
    st = stats.get(target.point)
    if st is not None and len(target.indices) == 1:
        i = target.indices[0]
        out.update(firing_rate=float(st.firing[i]), mean_activation=float(st.mean_active[i]))
    if target.matched_to is not None:
        out["matched_to"] = target.matched_to
    return out


def _selected_on(target: Target, screened: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """run.json's record of where a feature was selected: the screening, its design and discovery items."""
    if target.source is None:
        return {}
    for name, entry in screened.items():
        if target.source in entry["screenings"]:
            return {"selected_on": {"screening": target.source, "design": name,
                                    "discovery_items": entry["discovery"]}}
    return {"selected_on": {"screening": target.source, "design": None, "discovery_items": []}}


def _run_batch(attached: Attached, enc: Encoded, meta: pd.DataFrame, readouts: Readouts, targets: list[Target],
               target_ids: list[int], cfg: BatteryConfig, fmax: dict[Target, float | None], factors: list[str],
               pad_id: int, qfun: dict[Target, Any] | None = None) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Every (feature, condition) of one stimulus batch, stacked into as few passes as ``max_batch_rows``
    allows; yields ``(target id, rows)`` per feature once all its conditions are scored."""
    prep = _prepare(attached, enc)
    ext = None
    if readouts.continuations:
        extended = extend_rows(enc, readouts.continuations, pad_id).to(attached.split.device)  # built on the host
        ext = (_prepare(attached, extended.enc), extended)
    qfun = qfun or {}
    per_target = [conditions(cfg.interventions, fmax[t] if fmax[t] is not None else 1.0, qfun.get(t))
                  for t in targets]
    blocks = [(t, c) for t, conds in zip(targets, per_target, strict=True) for c in conds]
    owner = np.repeat(np.arange(len(targets)), [len(c) for c in per_target])
    rows_per_copy = len(enc.readout) * (1 + (ext[1].n_words if ext else 0))
    frames: list[pd.DataFrame] = []
    remaining = [len(c) for c in per_target]
    a, b = factors
    for chunk in chunks(len(blocks), len(per_target[0]), rows_per_copy, cfg.max_batch_rows):
        part = [blocks[i] for i in chunk]
        frame = _rows_frame(meta, part, readouts, _chunk_scores(attached, prep, ext, readouts, part), a, b)
        frame["_owner"] = owner[np.asarray(chunk)][frame.pop("_block").to_numpy()]
        frames.append(frame)
        for k in dict.fromkeys(owner[list(chunk)]):
            remaining[k] -= int((owner[list(chunk)] == k).sum())
            if remaining[k] == 0:
                rows = pd.concat([f[f["_owner"] == k] for f in frames]).drop(columns="_owner")
                yield target_ids[k], rows.to_dict("records")


def _unit_key(fp: Fingerprint, plans: list, targets: list[Target], unit: tuple[int, int, int]) -> str:
    """A work unit's key; it starts with the run's fingerprint, so units of other settings never count as done."""
    di, bi, ti = unit
    t = targets[ti]
    return f"{fp.short}|{plans[di][0].name}|{bi}|{t.point}|{t.label}"


def battery_fingerprint(cfg: BatteryConfig, model: str, checkpoint_id: str, design_ids: list[str]) -> Fingerprint:
    """Everything that decides a battery's numbers: the config (not where it is written or on which device),
    the checkpoint's weights, the designs' and screenings' contents, the model and the package version."""
    config = cfg.model_dump(mode="json", exclude={"out", "device", "max_batch_rows"})
    screenings = sorted({str(f.from_screening) for f in cfg.features if f.from_screening is not None})
    return Fingerprint("battery", {
        "config": config, "model": model, "package": package_version(),
        "checkpoint": checkpoint_id, "designs": design_ids,
        "screenings": {s: _screening_identity(Path(s)) for s in screenings},
    })


def _screening_identity(path: Path) -> str:
    folder = path if path.is_dir() else path.parent
    if (folder / "fingerprint.json").exists():
        return folder_identity(folder)
    return file_digest(path if path.is_file() else folder / "top.json")


def _continuation_logprobs(logits: torch.Tensor, ext: Extended, n_conds: int) -> torch.Tensor:
    """Summed log-probabilities of each split word's later tokens: [n_conds * B, M] from [n_conds*M*B, P, V]."""
    targets = ext.targets.to(logits.device).repeat(n_conds, 1)
    valid = ext.valid.to(logits.device).repeat(n_conds, 1)
    lp = logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    total = (lp * valid).sum(1)
    n_words = ext.n_words
    n_rows = total.numel() // (n_conds * n_words)
    return total.view(n_conds, n_words, n_rows).permute(0, 2, 1).reshape(n_conds * n_rows, n_words)


@torch.no_grad()
def _active_latents(attached: Attached, batches: list[Encoded]) -> torch.Tensor:
    """Which SAE latents fire anywhere on the stimuli (a scatter on the device, one copy at the end)."""
    d_sae = attached.joint.sae.d_sae
    active = None
    for x in _kept_inputs(attached, batches):
        lat = attached.joint(x, "sae").latents
        if active is None:
            active = torch.zeros(d_sae + 1, dtype=torch.bool, device=x.device)
        active.scatter_(0, torch.where(lat.values > 0, lat.indices, d_sae).reshape(-1), True)
    return active[:d_sae].cpu() if active is not None else torch.zeros(d_sae, dtype=torch.bool)


def export(out: Path) -> Path:
    """Write ``results.parquet`` (and ``results.csv``) from the store, for pandas users."""
    out = Path(out)
    df = read_results(out / "results.sqlite")
    own(out, ["results.parquet", "results.csv"])
    with atomic_path(out / "results.parquet") as tmp:  # a disk-full export leaves the old file or none
        df.to_parquet(tmp, index=False)
    with atomic_path(out / "results.csv") as tmp:
        df.to_csv(tmp, index=False)
    return out / "results.parquet"


@releases_locks
def merge_shards(out: Path, *, partial: bool = False) -> int:
    """`fis battery merge`: combine ``results.shard-*.sqlite`` into ``results.sqlite`` and export.

    Every shard must come from the same run and be complete (``partial`` merges what is there)."""
    out = Path(out)
    refuse_links_inside(out)
    lock_folder(out)
    sources = sorted(out.glob("results.shard-*-of-*.sqlite"))
    own(out, [*_store_files(out / "results.sqlite"), "run.json"])
    n = merge(sources, out / "results.sqlite", partial=partial)
    export(out)
    meta = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    meta["merged_from"] = [s.name for s in sources]
    meta["merged_partial"] = partial
    write_json(out / "run.json", meta)
    return n
