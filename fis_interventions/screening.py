"""`fis screen`: which features of a checkpoint respond to a 2x2 design, with FDR over everything screened.

Why this exists: the paper ranked 7,500 secondary features by a one-way ANOVA and reported the best one with no
correction (flaw 6). Here every feature at every requested named point of the joint SAE gets a two-way
ANOVA (:func:`~fis_interventions.stats.screen.screen_features`) on the design's two factors: for matched items
the within-item model (by-item repeated-measures ANOVA: the four cells of an item are one sentence frame, so the
item is a block), for cell lists a Type III OLS over the stimuli. The interaction q-values are
Benjamini-Hochberg over ALL features of ALL points together (the family is written into ``screen.json``);
within-point q-values are kept for reference.

What is measured: each unique stimulus of the design (the stimulus text alone, after BOS; the prompts are for
intervention batteries) is run through the model prefix up to the checkpoint's hook, normalised with the
checkpoint's statistics and passed through the joint SAE at the positions the checkpoint's exclusion rule
keeps (flaws 1-2: same hook, same normalisation, same rule as training). A named point's value is averaged
over those positions (``mean``) or read at the last kept position (``last``).

Only the *discovery* items are screened (by default half, seeded; :mod:`fis_interventions.holdout`), and
``screen.json`` records the split, the checkpoint's and the design's content hashes: a battery on the chosen
features then runs on the held-out confirmation items, so selection and test never share data.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from . import recorded_paths
from .errors import FisError
from .fingerprint import Fingerprint, check_output, checkpoint_identity, package_version, replace_folder
from .holdout import DEFAULT_FRACTION, all_items, check_fraction, design_identity, split_items
from .stats.screen import MODELS

DEFAULT_POINTS: tuple[str, ...] = ("sae.hook_latents", "nfm.hook_hidden", "secondary.hook_latents")
AGGREGATES = ("last", "max", "mean", "critical")
DEFAULT_AGGREGATE = "last"
ALPHA = 0.05
Aggregate = Literal["last", "max", "mean", "critical"]
DEFAULT_PERMUTATIONS = 1000


@dataclass
class ScreenResult:
    """The screening table (one row per feature per point, sorted by interaction p), the top features, and
    every warning; ``activations`` holds the aggregated [n_stimuli, n_features] matrix of each point and
    ``stimuli`` the matching design rows (kept for analyses and tests)."""

    table: pd.DataFrame
    top: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    activations: dict[str, np.ndarray] = field(default_factory=dict)
    stimuli: pd.DataFrame | None = None
    cards: list[dict[str, Any]] = field(default_factory=list)  # feature cards of the top features (``cards=N``)


def stimulus_rows(design: Any) -> pd.DataFrame:
    """One row per (item, cell) of the expanded design: the stimuli, without the prompt copies."""
    from .designs import expand

    rows = expand(design)
    rows = rows.drop_duplicates(["item", "cell"], keep="first").reset_index(drop=True)
    return rows.drop(columns=["prompt_id", "prompt", "text", "readout_start", "readout_end"])


def stimulus_tokens(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """``[BOS] + tokens(text)`` for each text, as the bridge tokenises a single text."""
    bos = tokenizer.bos_token_id
    if bos is None:
        raise FisError("the tokenizer has no BOS token", field="model", fix="use a model with a BOS token")
    return [[bos, *tokenizer(t, add_special_tokens=False)["input_ids"]] for t in texts]


def resolve_points(joint: Any, points: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """The points to screen and the warnings for skipped defaults; an explicitly requested absent point is an
    error naming the available ones."""
    available = joint.hook_points()
    if points is None:
        chosen = [p for p in DEFAULT_POINTS if p in available]
        skipped = [p for p in DEFAULT_POINTS if p not in available]
        warnings = [f"point {p} is not in this checkpoint (no {p.split('.')[0]} module), skipped" for p in skipped]
        if not chosen:
            raise FisError("none of the default points is in this checkpoint", field="points",
                           fix=f"pass --point with one of: {', '.join(sorted(available))}")
        return chosen, warnings
    chosen = list(dict.fromkeys(points))
    if not chosen:
        raise FisError("no points requested", field="points", fix=f"use one of: {', '.join(sorted(available))}")
    for p in chosen:
        if p not in available:
            raise FisError(f"point {p!r} is not in this checkpoint", field="points",
                           fix=f"use one of: {', '.join(sorted(available))}")
    return chosen, []


@dataclass
class Collected:
    """Aggregated values per point of the checkpoint (``values``) and of each extra joint model (``extra``), and
    the number of kept positions of every stimulus (``tokens``)."""

    values: dict[str, np.ndarray]
    tokens: np.ndarray
    extra: list[dict[str, np.ndarray]] = field(default_factory=list)
    # with ``token_features``: point -> one [len(tokens of stimulus), k] array per stimulus (NaN where the
    # exclusion rule drops the position), the value of each requested feature at every position
    per_token: dict[str, list[np.ndarray]] = field(default_factory=dict)


def _aggregate(value: torch.Tensor, row: torch.Tensor, counts: torch.Tensor, b: int, aggregate: str) -> torch.Tensor:
    """``[b, width]``: the kept positions' values (``value`` [n_kept, width], ``row`` their stimulus) reduced."""
    if aggregate in ("mean", "critical"):  # critical: the mean over the critical region's kept tokens
        agg = value.new_zeros(b, value.shape[-1]).index_add_(0, row, value)
        return agg / counts.to(agg.device, agg.dtype).unsqueeze(1)
    if aggregate == "max":
        index = row.unsqueeze(1).expand_as(value)
        return value.new_zeros(b, value.shape[-1]).scatter_reduce_(0, index, value, "amax", include_self=False)
    # last: the last kept position of each stimulus is the highest flat index with that row
    flat = torch.arange(len(row), device=row.device)
    last = torch.full((b,), -1, dtype=torch.long, device=row.device).scatter_reduce_(0, row, flat, reduce="amax")
    return value[last]


@torch.no_grad()
def collect(attached: Any, token_lists: Sequence[Sequence[int]], points: Sequence[str],
            aggregate: Aggregate = DEFAULT_AGGREGATE, batch_size: int = 16, progress: bool = False,
            extra_joints: Sequence[Any] = (), regions: Sequence[Sequence[int]] | None = None,
            on_batch: Any = None, token_features: dict[str, Sequence[int]] | None = None) -> Collected:
    """Each point's value per stimulus over its kept positions, for the checkpoint and for ``extra_joints``
    (e.g. a random-init model of the same shapes) from ONE model forward pass per batch up to the hook.
    ``regions`` (with ``aggregate="critical"``): the token positions of each stimulus's critical region (index
    into its token list); only those positions are kept. ``token_features`` (point -> feature indices) also
    keeps those features' values at every kept position of every stimulus (``Collected.per_token``): the
    feature cards' token-level view of the design's stimuli, from this same pass.

    Batches are right-padded; the exclusion rule (and padding) decides the kept positions, exactly as when the
    checkpoint is spliced into the model. Results are written batch by batch into preallocated arrays.
    ``on_batch(start, ids, mask, resid, state, out)``: called with each batch's prefix pass and the checkpoint's
    clean joint forward at the exclusion rule's kept positions (``out`` is None under ``regions``), so the
    attribution screen reuses this pass (:func:`~fis_interventions.screening_attribution.shared_pass`).
    """
    from tqdm.auto import tqdm

    from .splice import pad_right

    check_aggregate(aggregate)
    if (aggregate == "critical") != (regions is not None):
        raise FisError("aggregate 'critical' needs the critical regions, and only it uses them", field="aggregate")
    if batch_size < 1:
        raise FisError(f"batch size must be positive, got {batch_size}", field="batch_size", fix="use e.g. 16")
    split, splice, joint = attached.split, attached.splice, attached.joint
    tok = split.bridge.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    joints = [joint, *extra_joints]
    n = len(token_lists)
    outs: list[dict[str, np.ndarray]] = [{} for _ in joints]
    tokens = np.zeros(n, dtype=np.int64)
    per_token: dict[str, list[np.ndarray]] = {p: [] for p in (token_features or {})}
    for start in tqdm(range(0, n, batch_size), disable=not progress, desc="screen", unit="batch"):
        seqs = [list(s) for s in token_lists[start:start + batch_size]]
        ids, mask = pad_right(seqs, pad_id)
        resid, state = split.prefix(ids, mask)
        keep = splice.keep_mask(ids, resid, mask)
        unrestricted = keep
        if regions is not None:
            region = torch.zeros_like(keep)
            for r, positions in enumerate(regions[start:start + len(seqs)]):
                region[r, list(positions)] = True
            keep = keep & region
        counts = keep.sum(1)
        if bool((counts == 0).any()):
            bad = start + int((counts == 0).nonzero()[0, 0])
            what = "of its critical region " if regions is not None else ""
            raise FisError(f"stimulus {bad} has no position {what}left after the exclusion rule "
                           "(only special tokens or massive activations)", field="design",
                           fix="check the stimulus text")
        b = len(seqs)
        tokens[start:start + b] = counts.cpu().numpy()
        kept_at = keep.nonzero()
        row = kept_at[:, 0]  # the stimulus of each kept position, in position order
        x = splice.inputs(resid[keep])
        clean = None
        for model, out in zip(joints, outs, strict=True):
            seen: dict[str, torch.Tensor] = {}

            def observer(name: str, seen: dict[str, torch.Tensor] = seen):
                def fn(value: torch.Tensor) -> None:
                    seen[name] = value.detach()
                return fn

            components = "full" if model.nfm is not None else "sae"
            result = model(x, components, edit={p: observer(p) for p in points})
            if clean is None:
                clean = result
            for p in points:
                if p not in seen:
                    raise FisError(f"point {p!r} was not reached by a forward pass with components "
                                   f"{components!r}", field="points", fix="choose a point on the forward path")
                value = seen[p].float()
                agg = _aggregate(value, row, counts, b, aggregate)
                if model is joint and p in per_token:
                    _keep_tokens(per_token[p], value[:, list(token_features[p])], kept_at, seqs)
                if p not in out:
                    out[p] = np.empty((n, value.shape[-1]), dtype=np.float32)
                out[p][start:start + b] = agg.cpu().numpy()
        if on_batch is not None:
            on_batch(start, ids, mask, resid, state, clean if keep is unrestricted else None)
    return Collected(outs[0], tokens, outs[1:], per_token)


def _keep_tokens(out: list[np.ndarray], values: torch.Tensor, kept_at: torch.Tensor, seqs: list[list[int]]) -> None:
    """Append one ``[len(seq), k]`` array per stimulus of the batch: the kept positions' values, NaN elsewhere."""
    vals, rows, pos = values.cpu().numpy(), kept_at[:, 0].cpu().numpy(), kept_at[:, 1].cpu().numpy()
    for r, seq in enumerate(seqs):
        arr = np.full((len(seq), vals.shape[1]), np.nan, dtype=np.float32)
        mine = rows == r
        arr[pos[mine]] = vals[mine]
        out.append(arr)


def collect_activations(attached: Any, token_lists: Sequence[Sequence[int]], points: Sequence[str],
                        aggregate: Aggregate = DEFAULT_AGGREGATE, batch_size: int = 16, progress: bool = False
                        ) -> dict[str, np.ndarray]:
    """``{point: [n_stimuli, n_features]}``: each point's value per stimulus (see :func:`collect`)."""
    return collect(attached, token_lists, points, aggregate, batch_size, progress).values


def check_aggregate(aggregate: str) -> None:
    if aggregate not in AGGREGATES:
        raise FisError(f"unknown aggregate {aggregate!r}", field="aggregate",
                       fix=f"use one of: {', '.join(AGGREGATES)}")


def critical_regions(design: Any, rows: pd.DataFrame, tokenizer: Any) -> list[list[int]]:
    """Token positions (in ``[BOS] + tokens``) of the design's critical slot in each row's stimulus.

    Refuses (one line, the item's line in the design file) an item whose critical region has different token
    counts in its cells: a mean over it would depend on length again, so the cells cannot be aligned."""
    from .designs.checks import fail

    slot = design.critical
    if slot is None:
        raise FisError(f"design {design.name!r} names no critical region", source=design.source, field="critical",
                       fix="add `critical: <slot>` (a slot of the template) to the design, or use --aggregate last")
    index = {str(it.id): (i, it) for i, it in enumerate(design.items or [])}
    positions: list[list[int]] = []
    counts: dict[str, dict[str, int]] = {}
    for item_id, cell in zip(rows["item"].astype(str), rows["cell"].astype(str), strict=True):
        _, item = index[item_id]
        text, spans = design.render(item, cell)
        lo, hi = spans[slot]
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if "offset_mapping" not in enc:
            raise FisError("the tokenizer gives no character offsets, so the critical region cannot be found",
                           field="aggregate", fix="use --aggregate last, or a model with a fast tokenizer")
        pos = [j + 1 for j, (a, b) in enumerate(enc["offset_mapping"]) if a < hi and b > lo]
        positions.append(pos)
        counts.setdefault(item_id, {})[cell] = len(pos)
    for item_id, by_cell in counts.items():
        if len(set(by_cell.values())) > 1:
            shown = ", ".join(f"{c} {n}" for c, n in by_cell.items())
            fail(design, ("items", index[item_id][0]), f"item '{item_id}': the critical region '{slot}' has "
                 f"different token counts in its cells ({shown}), so the cells cannot be aligned for "
                 "--aggregate critical", f"give '{slot}' the same number of tokens in every cell of the item "
                 "(or use --aggregate last)")
    return positions


def length_warning(tokens: np.ndarray, rows: pd.DataFrame, cells: list[str], item: str | None) -> str | None:
    """A warning when the cells differ in kept-token count (which a ``mean`` aggregate divides by), else None."""
    frame = pd.DataFrame({"cell": rows["cell"].astype(str).to_numpy(), "n": tokens})
    by_cell = frame.groupby("cell")["n"].mean().reindex(cells)
    differ_items = 0
    if item is not None:
        frame["item"] = rows[item].astype(str).to_numpy()
        differ_items = int((frame.groupby("item")["n"].nunique() > 1).sum())
        n_items = int(frame["item"].nunique())
        if not differ_items:
            return None
        where = f"{differ_items} of {n_items} items have cells of different lengths"
    else:
        if by_cell.nunique() <= 1:
            return None
        where = "the cells' mean lengths differ"
    shown = ", ".join(f"{c} {v:.1f}" for c, v in by_cell.items())
    return (f"aggregate=mean divides each feature by its stimulus's token count, and {where} (mean tokens per "
            f"cell: {shown}): a feature firing on a phrase shared by some cells then differs between cells by "
            "length alone (an artifact the screen ranks as an effect); use --aggregate last or max")


def screen_blocks(blocks: dict[Any, np.ndarray], rows: pd.DataFrame, a: str, b: str,
                  levels: dict[str, list[str]], item: str | None = None) -> dict[Any, pd.DataFrame]:
    """:func:`~fis_interventions.stats.screen.screen_features` of every block ([n_stimuli, width], e.g. one per
    point, or per point x method x clamp) in ONE vectorised call on their concatenation (the design is parsed
    and the contrasts solved once for all features), split back per block: ``feature`` counts from 0 within a
    block and ``q_ab`` is BH within the block. The activation and the attribution screens both use it."""
    from .stats.fdr import fdr_bh
    from .stats.screen import screen_features

    keys = list(blocks)
    widths = [blocks[k].shape[1] for k in keys]
    X = np.concatenate([np.asarray(blocks[k], dtype=float) for k in keys], axis=1) if keys else np.empty((len(rows), 0))
    table = screen_features(X, rows, a, b, levels=levels, item=item)
    out: dict[Any, pd.DataFrame] = {}
    stop = 0
    for key, width in zip(keys, widths, strict=True):
        start, stop = stop, stop + width
        part = table.iloc[start:stop].reset_index(drop=True)
        part["feature"] = np.arange(width)
        part["q_ab"] = fdr_bh(part["p_ab"].to_numpy())
        part.attrs = dict(table.attrs)
        out[key] = part
    return out


def screen_table(activations: dict[str, np.ndarray], rows: pd.DataFrame, a: str, b: str,
                 levels: dict[str, list[str]], item: str | None = None) -> pd.DataFrame:
    """Concatenate per-point screens; ``q_ab`` is BH over every non-degenerate feature of every point.

    ``item``: the item column of matched designs (within-item model, item as a block); None for cell lists
    (two-way OLS over the stimuli). ``artifact_flags`` lists why a feature is more likely an artifact than an effect
    (:mod:`~fis_interventions.stats.screen_flags`: a factor level exactly zero, an F shared by many features,
    very few stimuli firing); ``flagged`` features are kept in the table but are not ``hit`` s and are never
    among the top features."""
    from .stats.fdr import fdr_bh
    from .stats.screen_flags import join_flags, level_and_rarity_flags, shared_statistic_groups

    parts = []
    for point, part in screen_blocks(activations, rows, a, b, levels, item).items():
        part = part.rename(columns={"q_ab": "q_ab_within_point"})
        part.insert(0, "point", point)
        part["artifact_flags"] = level_and_rarity_flags(activations[point], rows, levels)
        parts.append(part)
    table = pd.concat(parts, ignore_index=True)
    table.insert(table.columns.get_loc("q_ab_within_point"), "q_ab", fdr_bh(table["p_ab"].to_numpy()))
    shared = shared_statistic_groups(table["F_ab"].to_numpy())
    table["artifact_flags"] = join_flags(table["artifact_flags"].tolist(),
                                         [f"shared_F({n})" if n else "" for n in shared])
    table.loc[table["p_ab"].isna(), "artifact_flags"] = ""  # degenerate features are out of the family already
    table["flagged"] = table["artifact_flags"] != ""
    table["hit"] = (table["q_ab"] < ALPHA) & ~table["flagged"]
    return table.sort_values(["p_ab", "point", "feature"], na_position="last", kind="stable").reset_index(drop=True)


def top_features(table: pd.DataFrame, n: int = 10) -> list[dict[str, Any]]:
    """The ``n`` non-degenerate, unflagged features with the smallest interaction p (the table is sorted by
    p_ab)."""
    ok = table["p_ab"].notna() & ~table["degenerate"]
    if "flagged" in table.columns:
        ok &= ~table["flagged"].astype(bool)
    return [_top_entry(r) for r in table[ok].head(n).itertuples()]


def flagged_features(table: pd.DataFrame, n: int = 20) -> list[dict[str, Any]]:
    """The ``n`` flagged features with the smallest interaction p: listed apart, never hits."""
    if "flagged" not in table.columns:
        return []
    flagged = table[table["flagged"].astype(bool)].head(n)
    return [{**_top_entry(r), "artifact_flags": str(r.artifact_flags)} for r in flagged.itertuples()]


def _top_entry(r: Any) -> dict[str, Any]:
    entry = {"point": str(r.point), "feature": int(r.feature), "F_ab": float(r.F_ab), "p_ab": float(r.p_ab),
             "q_ab": float(r.q_ab)}
    for col in ("p_perm", "p_perm_fwer", "p_random_init"):
        value = getattr(r, col, None)
        if value is not None and np.isfinite(value):
            entry[col] = float(value)
    return entry


def random_init_joint(joint: Any, seed: int) -> Any:
    """A joint model of the same architecture (SAE, integration module, secondary SAE) with seeded random
    weights, on the trained model's device and dtype: the screen's "no training" baseline."""
    from .sae import JointSAE

    param = next(joint.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = JointSAE(joint.cfg)
    return model.to(device=param.device, dtype=param.dtype).eval()


def add_permutation_null(table: pd.DataFrame, activations: dict[str, np.ndarray], rows: pd.DataFrame, a: str,
                         b: str, levels: dict[str, list[str]], item: str | None, n_perm: int, seed: int) -> Any:
    """Fill ``p_perm`` / ``p_perm_fwer`` of every feature in the FDR family (in place); return the null."""
    from .stats.screen_null import permutation_null

    family = table[table["p_ab"].notna()]
    X = np.concatenate([activations[p][:, family.loc[family["point"] == p, "feature"].to_numpy(int)]
                        for p in activations], axis=1)
    order = np.concatenate([family.index[family["point"] == p].to_numpy() for p in activations])
    null = permutation_null(X, rows, a, b, table.loc[order, "F_ab"].to_numpy(float), levels=levels, item=item,
                            n_perm=n_perm, seed=seed, alpha=ALPHA)
    table["p_perm"] = np.nan
    table["p_perm_fwer"] = np.nan
    table.loc[order, "p_perm"] = null.p_perm
    table.loc[order, "p_perm_fwer"] = null.p_perm_fwer
    return null


def add_random_init_baseline(table: pd.DataFrame, baseline: pd.DataFrame) -> None:
    """``p_random_init`` (in place): the fraction of the random-init model's features at the same point whose
    interaction F is at least this feature's (with the +1 rule of empirical p-values)."""
    table["p_random_init"] = np.nan
    for point, part in table.groupby("point"):
        null_F = np.sort(baseline.loc[baseline["point"] == point, "F_ab"].dropna().to_numpy(float))
        obs = part["F_ab"].to_numpy(float)
        ok = np.isfinite(obs)
        n_ge = len(null_F) - np.searchsorted(null_F, obs[ok] * (1 - 1e-9), side="left")
        table.loc[part.index[ok], "p_random_init"] = (1 + n_ge) / (len(null_F) + 1)


def baseline_line(n_sig: int, family: int, nulls: dict[str, Any]) -> str:
    """One line setting the screen's BH count beside its null baselines' counts."""
    parts = [f"{n_sig} of {family} features with interaction q < {ALPHA}"]
    perm = nulls.get("permutation")
    if perm:
        h = perm["hits"]
        scheme = perm["scheme"].split("permuted ")[-1]
        parts.append(f"label-permutation null ({perm['n_permutations']} relabellings, {scheme}): "
                     f"median {h['null_median']:g}, 95th percentile {h['null_q95']:g} (p = {h['p_count']:.3g}); "
                     f"{perm['n_fwer_below_alpha']} features beat the relabellings' maximum F (p_perm_fwer < {ALPHA})")
    rnd = nulls.get("random_init")
    if rnd:
        parts.append(f"random-init checkpoint (seed {rnd['seed']}): {rnd['n_q_below_alpha']} of {rnd['family_size']}")
    if len(parts) == 1:
        parts.append("no null baseline was run")
    return "; ".join(parts)


def _write_outputs(out: Path, fp: Fingerprint, table: pd.DataFrame, summary: dict[str, Any],
                   top: list[dict[str, Any]], overwrite: bool, cards: list[dict[str, Any]] | None = None) -> None:
    from .io import write_json

    with replace_folder(Path(out), fp, overwrite=overwrite) as tmp:
        table.to_csv(tmp / "screening.csv", index=False)
        table.to_parquet(tmp / "screening.parquet", index=False)
        write_json(tmp / "screen.json", summary)
        write_json(tmp / "top.json", top)
        if cards:
            from .cards import write_cards

            write_cards(cards, tmp / "cards")


def screen_fingerprint(config: dict[str, Any], checkpoint_id: str, design_id: str) -> Fingerprint:
    """What decides a screening: its settings (split included), the checkpoint's weights
    (:func:`~fis_interventions.fingerprint.checkpoint_identity`), the design's validated content
    (:func:`~fis_interventions.holdout.design_identity`: comments and layout do not count), the package."""
    return Fingerprint("screen", {"config": {k: v for k, v in config.items() if k not in ("checkpoint", "design")},
                                  "checkpoint": checkpoint_id, "design": design_id, "package": package_version()})


def screen(checkpoint: Path | str, design: Path | str, model: str | None = None,
           points: Sequence[str] | None = None, aggregate: Aggregate = DEFAULT_AGGREGATE, batch_size: int = 16,
           device: str = "auto", out: Path | str | None = None, bridge: Any = None, progress: bool = True,
           top: int = 10, discover: float | None = DEFAULT_FRACTION, split_seed: int = 0,
           overwrite: bool = False, cards: int = 0, cards_activations: Path | str | None = None,
           method: str = "activation", steps: int = 16, clamps: Sequence[float] = (),
           contrast: str | None = None, permutations: int = DEFAULT_PERMUTATIONS, random_init: bool = True,
           null_seed: int = 0, precision: str = "float32") -> ScreenResult:
    """Screen every feature at ``points`` of ``checkpoint`` against the 2x2 ``design`` (see module docstring).

    ``discover``: the fraction of items screened (the discovery items, seeded by ``split_seed``; see
    :mod:`fis_interventions.holdout`); the rest are held out for a confirmatory battery. ``None`` screens every
    item (exploratory: a battery on those features can only be exploratory).

    ``model`` defaults to the model the checkpoint was trained on; a different one is refused. ``points=None``
    screens the default points the checkpoint has (skipping the others with a warning); named points must
    exist. ``bridge`` reuses an already loaded model (tests, notebooks). ``out`` follows the fingerprint rule:
    a folder is replaced only if it holds a screening with the same settings, or with ``overwrite``.
    ``cards=N`` adds feature cards for the N best features (by interaction p, over all points) from the
    checkpoint's harvest (or ``cards_activations``), written to ``out/cards/`` and kept in ``ScreenResult.cards``.
    ``method``: ``activation`` (default), ``attribution``, ``ig`` or a comma-separated list; the gradient methods
    add the estimated effect of clamping each feature on the readout contrast (zero and ``clamps``) to the table,
    and the first method listed ranks top.json (:mod:`fis_interventions.screening_attribution`). ``precision``:
    of the gradient methods' suffix pass, ``float32`` (default) or ``bfloat16`` (about half the attribution's
    cost where the hardware has bfloat16 units; :func:`~fis_interventions.attribution.check_precision`).

    Null baselines (on by default; ``null_seed`` seeds both): ``permutations`` relabellings of the cells (within
    items for matched designs; 0 skips) give each feature ``p_perm`` and ``p_perm_fwer`` and the BH count the
    relabelled screens reach; ``random_init`` screens a seeded random-init model of the checkpoint's shapes on the
    same forward pass (``p_random_init`` per feature, and its BH count). Features flagged as likely artifacts
    (``artifact_flags``) are listed apart and are not hits (``hit``) nor top features.
    """
    from .attach import attach
    from .designs import design_warnings, read_design
    from .model_identity import check_same_model, key, model_to_load, of_bridge, of_record, of_source
    from .models import DEFAULT_MODEL, load_model, model_name
    from .provenance import provenance
    from .sae import JointArch, JointSAE
    from .sae.checkpoint import read_meta, resolve

    check_aggregate(aggregate)
    if permutations < 0:
        raise FisError(f"--permutations must be >= 0, got {permutations}", field="permutations",
                       fix="use e.g. 1000, or 0 to skip the permutation null")
    if top < 0:
        raise FisError(f"--top must be >= 0, got {top}", field="top", fix="use e.g. 10")
    if discover is not None:
        check_fraction(discover)
    if cards < 0:
        raise FisError(f"--cards must be >= 0, got {cards}", field="cards", fix="use e.g. 5")
    from .screening_attribution import check_method_args

    methods = check_method_args(method, steps, precision)
    from .provenance import check_seed

    check_seed(split_seed, "--split-seed")
    d = read_design(design)
    if methods != ["activation"]:
        from .attribution import choose_contrast

        contrast = choose_contrast(d, contrast)
    if aggregate == "critical" and d.critical is None:  # before a model is loaded
        raise FisError(f"design {d.name!r} names no critical region", source=d.source or str(design),
                       field="critical", fix="add `critical: <slot>` (a slot of the template) to the design, or "
                       "use --aggregate last")
    all_rows = stimulus_rows(d)
    split = (split_items(all_rows, discover, split_seed, d.shape, source=str(design)) if discover is not None
             else all_items(all_rows))
    warnings = [f"design: {m}" for m in design_warnings(d)]
    if precision != "float32" and methods == ["activation"]:
        warnings.append(f"--precision {precision} applies to the gradient methods (attribution, ig) only: ignored")
    meta = read_meta(Path(checkpoint))  # cheap checks before loading a model
    if out is not None:  # a folder we did not write is refused before the model is loaded
        check_output(Path(out), Fingerprint("screen", {}), overwrite=True)
    trained_on = meta.get("model_name")
    with torch.device("meta"):  # the hook names of the architecture, without allocating weights
        skeleton = JointSAE(JointArch.model_validate(meta["architecture"]))
    chosen, point_warnings = resolve_points(skeleton, points)
    if bridge is None:
        wanted = model_to_load(trained_on, model, source=resolve(Path(checkpoint)), default=DEFAULT_MODEL)
        if trained_on is not None and model is not None:  # before loading it; by content where recorded
            check_same_model(of_record(meta), of_source(model), source=resolve(Path(checkpoint)))
        bridge = load_model(wanted, device=device)
    elif model is not None and model != model_name(bridge):
        raise FisError(f"model {model!r} requested but the given bridge is {model_name(bridge)!r}", field="model")
    attached = attach(bridge, checkpoint)
    warnings += point_warnings
    config = {"checkpoint": str(checkpoint), "design": str(design), "model": key(of_bridge(bridge)),
              "points": chosen, "aggregate": aggregate, "batch_size": batch_size, "top": top,
              "discover": discover, "split_seed": split_seed, "cards": cards,
              "cards_activations": None if cards_activations is None else str(cards_activations),
              "permutations": permutations, "random_init": random_init, "null_seed": null_seed}
    if methods != ["activation"]:  # only then: an activation screen keeps its fingerprint
        config.update({"method": methods, "steps": steps, "clamps": [float(c) for c in clamps], "contrast": contrast})
        if precision != "float32":  # only then: a float32 screen keeps the fingerprint it had before the option
            config["precision"] = precision
    checkpoint_id, design_id = checkpoint_identity(checkpoint), design_identity(d)  # hashed once each
    fp = screen_fingerprint(config, checkpoint_id, design_id)
    if out is not None:  # refused before any work is done
        check_output(Path(out), fp, overwrite=overwrite, replaces_same=True)
    if cards:  # check the harvest before the screening runs: nothing is written if the cards cannot be made
        from .activations import ActivationStore
        from .cards.build import check_harvest, harvest_folder

        check_harvest(ActivationStore(harvest_folder(attached.checkpoint, cards_activations,
                                                     flag="--cards-activations")), attached.checkpoint,
                      attached.split.hook.canonical)

    in_discovery = all_rows["item"].astype(str).isin(set(split["discovery"])).to_numpy()
    rows = all_rows[in_discovery].reset_index(drop=True)
    regions = None
    if aggregate == "critical":  # every item is checked for alignment, not only the screened ones
        every = critical_regions(d, all_rows, bridge.tokenizer)
        regions = [r for r, screened in zip(every, in_discovery, strict=True) if screened]
    a, b = list(d.factors)
    levels = {f: list(v) for f, v in d.factors.items()}
    token_lists = stimulus_tokens(bridge.tokenizer, rows["stimulus"].tolist())
    from .limits import check_stimuli_fit

    check_stimuli_fit(bridge, [len(t) for t in token_lists],
                      [f"item {i}, cell {c}" for i, c in zip(rows["item"], rows["cell"], strict=True)],
                      source=str(design))
    accs: dict[str, Any] = {}
    on_batch = None
    if methods != ["activation"]:  # readout, contrast and target words checked before any model work
        from .screening_attribution import attributors, shared_pass

        accs = attributors(attached, d, rows, chosen, methods, steps=steps, contrast=contrast, precision=precision)
        on_batch = shared_pass(accs, rows)
    extra = [random_init_joint(attached.joint, null_seed)] if random_init else []
    collected = collect(attached, token_lists, chosen, aggregate, batch_size, progress, extra_joints=extra,
                        regions=regions, on_batch=on_batch)
    acts = collected.values
    if aggregate == "critical":
        kept = pd.Series(collected.tokens).groupby(rows["item"].astype(str).to_numpy()).nunique()
        if (kept > 1).any():
            raise FisError(f"item {kept.index[kept > 1][0]!r}: the exclusion rule (massive activations) removed "
                           f"tokens of the critical region '{d.critical}' in some cells only, so the cells cannot "
                           "be aligned for --aggregate critical", source=d.source or str(design), field="critical",
                           fix="use --aggregate last")
    item_col = "item" if d.shape == "items" else None
    table = screen_table(acts, rows, a, b, levels, item=item_col)
    if aggregate == "mean":
        length = length_warning(collected.tokens, rows, d.cell_names, item_col)
        if length:
            warnings.append(length)
    family = int(table["p_ab"].notna().sum())
    n_sig = int((table["q_ab"] < ALPHA).sum())
    nulls: dict[str, Any] = {}
    if permutations and family:
        t0 = time.perf_counter()
        null = add_permutation_null(table, acts, rows, a, b, levels, item_col, permutations, null_seed)
        nulls["permutation"] = {
            "scheme": f"cell labels permuted {null.scheme}", "n_permutations": permutations, "seed": null_seed,
            "hits": null.hits_summary(n_sig), "n_fwer_below_alpha": int((table["p_perm_fwer"] < ALPHA).sum()),
            "seconds": round(time.perf_counter() - t0, 3)}
    if random_init:
        t0 = time.perf_counter()
        baseline = screen_table(collected.extra[0], rows, a, b, levels, item=item_col)
        add_random_init_baseline(table, baseline)
        nulls["random_init"] = {
            "seed": null_seed, "n_q_below_alpha": int((baseline["q_ab"] < ALPHA).sum()),
            "n_hits": int(baseline["hit"].sum()), "family_size": int(baseline["p_ab"].notna().sum()),
            "n_q_below_alpha_per_point": {p: int((baseline.loc[baseline["point"] == p, "q_ab"] < ALPHA).sum())
                                          for p in chosen},
            "seconds_stats": round(time.perf_counter() - t0, 3)}
    for point in chosen:
        n_deg = int(table.loc[table["point"] == point, "degenerate"].sum())
        if n_deg:
            warnings.append(f"{n_deg} of {acts[point].shape[1]} features at {point} are constant across the "
                            "stimuli (e.g. never active) or have no interaction error variance, and are left "
                            "out of the FDR family")
    top_list = top_features(table, top)
    if methods != ["activation"]:
        from .screening_attribution import add_attribution, rank_column, ranked_top

        table, attr_summary = add_attribution(table, accs, rows, a=a, b=b, levels=levels, item=item_col,
                                              steps=steps, clamps=clamps, batch_size=batch_size,
                                              progress=progress)
        warnings += attr_summary.pop("warnings")
        table = table.sort_values([rank_column(methods[0]), "point", "feature"], na_position="last",
                                  kind="stable").reset_index(drop=True)
        top_list = ranked_top(table, methods[0], top)
    flagged_list = flagged_features(table)
    flag_kinds = pd.Series([f.split("(")[0].split(":")[0] for fl in table["artifact_flags"] if fl
                            for f in fl.split(";")])
    if discover is None:
        warnings.append("every item was screened (--all-items): a battery on these features tests them on the "
                        "items they were selected on, so its tests can only be exploratory")
    summary = {
        "checkpoint": str(Path(attached.checkpoint.path).resolve()), "checkpoint_sha256": checkpoint_id,
        "model": model_name(bridge), "model_sha256": of_bridge(bridge).sha256, "hook": attached.hook,
        "design": str(Path(design).resolve()), "design_name": d.name, "design_sha256": design_id, "factors": levels,
        "points": chosen, "split": split,
        "screen_model": MODELS["within_item" if item_col else "ols"], "n_items": int(rows["item"].nunique()),
        "features_per_point": {p: int(x.shape[1]) for p, x in acts.items()},
        "aggregate": aggregate, "n_stimuli": len(rows),
        **({"critical_region": d.critical} if aggregate == "critical" else {}),
        "tokens_per_cell": {c: float(v) for c, v in pd.Series(collected.tokens).groupby(
            rows["cell"].astype(str).to_numpy()).mean().items()},
        "input": "BOS + stimulus text (no prompt); positions kept by the checkpoint's exclusion rule",
        "family": "interaction term (p_ab) of every non-degenerate feature of every point screened; "
                  "q_ab_within_point corrects within each point only",
        "family_size": family, "alpha": ALPHA, "n_q_below_alpha": n_sig,
        "n_q_below_alpha_per_point": {p: int((table.loc[table["point"] == p, "q_ab"] < ALPHA).sum())
                                      for p in chosen},
        "n_hits": int(table["hit"].sum()),
        "hits": "q_ab < alpha and not flagged (flags: zero_level, shared_F, rare; see the artifact_flags column)",
        "n_flagged": int(table["flagged"].sum()),
        "n_flagged_q_below_alpha": int((table["flagged"] & (table["q_ab"] < ALPHA)).sum()),
        "flag_counts": {str(k): int(v) for k, v in flag_kinds.value_counts().items()},
        "flagged": flagged_list,
        "null": nulls, "baseline": baseline_line(n_sig, family, nulls),
        "top": top_list, "warnings": warnings, "provenance": provenance(config=config),
    }
    if methods != ["activation"]:
        summary.update({"methods": methods, "ranked_by": methods[0], "attribution": attr_summary})
    card_list: list[dict[str, Any]] = []
    if cards:
        from .cards import FeatureKey, build_cards
        from .cards.directions import CARD_POINTS

        ranked = (top_features(table, len(table)) if methods == ["activation"]
                  else ranked_top(table, methods[0], len(table)))
        best = [t for t in ranked if t["point"] in CARD_POINTS][:cards]
        card_list = build_cards(attached.checkpoint, [FeatureKey(t["point"], t["feature"]) for t in best],
                                activations=cards_activations, bridge=bridge, progress=progress)
        if methods != ["activation"]:
            from .screening_attribution import attribution_of

            for c in card_list:
                c["attribution"] = attribution_of(table, c["point"], c["feature"], levels)
        summary["cards"] = [f"cards/{c['point']}_{c['feature']}.md" for c in card_list]
    if out is not None:
        summary["fingerprint"] = fp.digest
        summary["inputs"] = recorded_paths.record_all({  # absolute and relative to the folder: it can be moved
            "checkpoint": attached.checkpoint.path, "design": design, "cards_activations": cards_activations}, out)
        _write_outputs(Path(out), fp, table, summary, top_list, overwrite, card_list)
    return ScreenResult(table, top_list, warnings, summary, acts, rows, card_list)
