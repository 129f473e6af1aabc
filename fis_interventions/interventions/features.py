"""Resolve feature selectors into concrete (point, indices) targets, and make the edit functions."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import FisError
from .config import FeatureSpec, InterventionSpec


@dataclass(frozen=True)
class Target:
    """One thing to intervene on: a named point and the feature indices edited together."""

    point: str
    indices: tuple[int, ...]
    role: str
    source: str | None = None  # the screening folder it was selected from (from_screening), else None
    matched_to: str | None = None  # matched controls: the label of the feature they are matched to
    direction: int | None = None  # random-direction controls: which of the feature's directions (0, 1, ...)
    direction_seed: int | None = None  # ... and the seed of its unit vector (:func:`unit_direction`)

    @property
    def label(self) -> str:
        base = ",".join(map(str, self.indices))
        return base if self.direction is None else f"{base}:dir{self.direction}"

    @property
    def key(self) -> tuple[str, tuple[int, ...], int | None]:
        """What makes a target distinct: a direction control edits its feature's indices but is its own target."""
        return self.point, self.indices, self.direction


def point_widths(joint: torch.nn.Module, d_in: int) -> dict[str, int]:
    """Width of every named point, read off one forward pass with observers."""
    widths: dict[str, int] = {}
    x = torch.zeros(1, d_in, dtype=next(joint.parameters()).dtype, device=next(joint.parameters()).device)

    def observer(name: str) -> Callable[[torch.Tensor], None]:
        def fn(value: torch.Tensor) -> None:
            widths[name] = int(value.shape[-1])
        return fn

    points = joint.hook_points()
    comps = "full" if getattr(joint, "nfm", None) is not None else "sae"
    with torch.no_grad():
        joint(x, comps, edit={name: observer(name) for name in points})
    return widths


def _check_point(point: str, widths: dict[str, int]) -> int:
    if point not in widths:
        raise FisError(f"unknown point '{point}' for this checkpoint", field="features.point",
                       fix=f"use one of: {', '.join(sorted(widths))}")
    return widths[point]


def _from_screening(spec: FeatureSpec) -> list[Target]:
    """Top features of a screening: from its full table (ranked within ``point`` when given; degenerate and
    flagged features skipped), else top.json."""
    import pandas as pd

    path = Path(spec.from_screening)
    table = path / "screening.csv" if path.is_dir() else None
    if table is not None and table.exists():
        df = pd.read_csv(table)
        if spec.point is not None:
            df = df[df["point"] == spec.point]
        ranked_by = _ranked_by(path)
        if ranked_by == "activation":
            if "degenerate" in df.columns:
                df = df[~df["degenerate"].astype(bool)]
            if "flagged" in df.columns:  # likely artifacts (fis screen's artifact_flags) are never selected as top
                df = df[~df["flagged"].astype(bool)]
            df = df.sort_values("p_ab", kind="stable").head(spec.top)
        else:  # the order the screen ranked by (its top.json): an attribution screen's own p, not the activation's
            from ..screening_attribution import ranked_top

            df = pd.DataFrame(ranked_top(df, ranked_by, spec.top), columns=["point", "feature"])
        top = df[["point", "feature"]].to_dict("records")
    else:
        file = path / "top.json" if path.is_dir() else path
        if not file.exists():
            raise FisError("screening results not found", source=file, field="features.from_screening",
                           fix="run `fis screen --out FOLDER` first and pass that folder")
        top = json.loads(file.read_text(encoding="utf-8"))
        if spec.point is not None:
            top = [t for t in top if t["point"] == spec.point]
        top = top[:spec.top]
    if not top:
        raise FisError(f"the screening has no feature{' at ' + spec.point if spec.point else ''}",
                       source=path, field="features.from_screening", fix="screen that point, or drop `point`")
    return [Target(t["point"], (int(t["feature"]),), spec.role, str(spec.from_screening)) for t in top]


def _ranked_by(folder: Path) -> str:
    """The method a screening folder ranked its features by (``screen.json``'s ``ranked_by``; activation before
    attribution screens existed)."""
    summary = folder / "screen.json"
    if not summary.exists():
        return "activation"
    try:
        data = json.loads(summary.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FisError("screen.json is not valid JSON", source=summary, field="features.from_screening",
                       fix="rerun `fis screen`") from None
    return str((data.get("ranked_by") if isinstance(data, dict) else None) or "activation")


def screening_summary(spec: FeatureSpec) -> tuple[dict, Path]:
    """``screen.json`` of a ``from_screening`` selector (the folder's, or the one beside its top.json)."""
    path = Path(spec.from_screening)
    file = path / "screen.json" if path.is_dir() else path.parent / "screen.json"
    if not file.is_file():
        raise FisError("screen.json not found beside the screening", source=file, field="features.from_screening",
                       fix="pass the folder written by `fis screen --out FOLDER`")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FisError("screen.json is not valid JSON", source=file, field="features.from_screening",
                       fix="rerun `fis screen`") from None
    if not isinstance(data, dict) or not isinstance(data.get("split"), dict):
        raise FisError("screen.json records no discovery/confirmation split (made by an older fis screen)",
                       source=file, field="features.from_screening", fix="rerun `fis screen`")
    return data, file


def screen_hits(specs: list[FeatureSpec], q: float = 0.05) -> set[tuple[str, int]]:
    """(point, feature) of every screen hit (``q_ab`` below ``q``) of the config's screenings: never offered
    as a null control (a hit is an alternative explanation, not a null)."""
    import pandas as pd

    hits: set[tuple[str, int]] = set()
    for spec in specs:
        if spec.from_screening is None:
            continue
        path = Path(spec.from_screening)
        table = path / "screening.csv" if path.is_dir() else path.parent / "screening.csv"
        if not table.is_file():
            continue
        df = pd.read_csv(table)
        if {"point", "feature", "q_ab"} <= set(df.columns):
            sig = df[df["q_ab"] < q]
            hits |= {(str(pt), int(f)) for pt, f in zip(sig["point"], sig["feature"], strict=True)}
    return hits


@dataclass(frozen=True)
class ActivationStats:
    """Per latent of one point, on the battery's stimuli (every kept token position): how often it fires
    and its mean activation when it does; what matched controls are matched on."""

    firing: np.ndarray  # [width] fraction of positions with activation > 0
    mean_active: np.ndarray  # [width] mean activation where > 0 (0 where it never fires)


def match_distance(stats: ActivationStats, feature: int) -> np.ndarray:
    """Largest relative difference (firing rate, mean activation) of every latent to ``feature``."""
    f0, m0 = stats.firing[feature], stats.mean_active[feature]
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.maximum(np.abs(stats.firing / f0 - 1.0), np.abs(stats.mean_active / m0 - 1.0))
    return np.where(np.isfinite(d), d, np.inf)


def matched_controls(spec: FeatureSpec, targets: list[Target], stats: Callable[[str], ActivationStats],
                     exclude: set[tuple[str, int]]) -> list[Target]:
    """``spec.matched`` controls per target of role ``spec.match_role``: the closest latents of the same point
    (firing rate and mean activation within ``spec.tolerance``), never a target, a screen hit or a control
    already taken. Refuses (one line, with the closest distance) when too few latents qualify."""
    wanted = [t for t in targets if t.role == spec.match_role]
    if not wanted:
        raise FisError(f"matched controls: no feature has role '{spec.match_role}' (list it before the controls)",
                       field="features.match_role", fix="set match_role to the role of the features to match")
    out: list[Target] = []
    taken = {(t.point, t.indices) for t in targets}
    for t in wanted:
        if len(t.indices) != 1:
            raise FisError(f"matched controls need single features; {t.label} is a group", field="features.matched",
                           fix="match single features")
        st = stats(t.point)
        f = t.indices[0]
        if st.firing[f] <= 0:
            raise FisError(f"feature {f} at {t.point} never fires on the battery's stimuli: nothing to match",
                           field="features.matched", fix="drop the matched controls for it, or pick another feature")
        dist = match_distance(st, f)
        for i in range(len(dist)):
            if (t.point, (i,)) in taken or (t.point, i) in exclude or i == f:
                dist[i] = np.inf
        order = np.argsort(dist, kind="stable")
        ok = [int(i) for i in order[:spec.matched] if dist[i] <= spec.tolerance]
        if len(ok) < spec.matched:
            free = order[len(ok)] if len(ok) < len(order) else None
            closest = ("no other latent fires" if free is None or not np.isfinite(dist[free]) else
                       f"the closest free latent, {int(free)}, differs by {dist[free]:.2f} (firing "
                       f"{st.firing[free]:.3g} vs {st.firing[f]:.3g}, mean activation {st.mean_active[free]:.3g} "
                       f"vs {st.mean_active[f]:.3g})")
            raise FisError(f"only {len(ok)} of {spec.matched} latents at {t.point} match feature {f} within "
                           f"tolerance {spec.tolerance:g}: {closest}", field="features.matched",
                           fix="raise features.tolerance or ask for fewer matched controls")
        for i in ok:
            taken.add((t.point, (i,)))
            out.append(Target(t.point, (i,), spec.role, matched_to=t.label))
    return out


def direction_seed(seed: int, point: str, feature: str, k: int) -> int:
    """A stable seed per (battery seed, feature, direction): the same config draws the same directions on any
    machine and in any order of the features (Python's ``hash`` is salted per process, so not that)."""
    digest = hashlib.sha256(f"{seed}|{point}|{feature}|{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def unit_direction(seed: int, width: int) -> torch.Tensor:
    """The random unit vector [width] (float64, on the host) of a direction control: isotropic (a normalised
    standard normal draw), so every direction of the residual is equally likely."""
    g = torch.Generator().manual_seed(int(seed))
    v = torch.randn(width, generator=g, dtype=torch.float64)
    return v / v.norm()


def direction_controls(spec: FeatureSpec, targets: list[Target], seed: int) -> list[Target]:
    """``spec.directions`` random residual directions per target of role ``spec.match_role``. Each edits the
    feature's own indices under the same clamp (so the residual change it starts from is the feature's, at the
    same hook and positions) and then replaces that change, token by token, by its unit direction times the
    change's norm (:func:`direction_deltas`)."""
    wanted = [t for t in targets if t.role == spec.match_role and t.direction is None]
    if not wanted:
        raise FisError(f"direction controls: no feature has role '{spec.match_role}' (list it before the controls)",
                       field="features.match_role", fix="set match_role to the role of the features to match")
    return [Target(t.point, t.indices, spec.role, matched_to=t.label, direction=k,
                   direction_seed=direction_seed(seed, t.point, t.label, k))
            for t in wanted for k in range(spec.directions)]


def direction_deltas(deltas: torch.Tensor, targets: list[Target | None]) -> torch.Tensor:
    """Residual changes [blocks, n, d] with every direction control's block replaced by its unit direction
    times the norm of the block's own change at each token, which is the change its feature's clamp writes
    there (the block edits the feature's indices): same tokens, same per-token norm, a random direction. Other
    blocks are returned as they are."""
    picks = [b for b, t in enumerate(targets) if t is not None and t.direction_seed is not None]
    if not picks:
        return deltas
    out = deltas.clone()
    width = deltas.shape[-1]
    for b in picks:
        u = unit_direction(targets[b].direction_seed, width).to(device=deltas.device, dtype=torch.float32)
        norm = deltas[b].float().norm(dim=-1, keepdim=True)  # [n, 1]
        out[b] = (norm * u).to(deltas.dtype)
    return out


def resolve_features(specs: list[FeatureSpec], joint: torch.nn.Module, d_in: int, seed: int,
                     active_latents: torch.Tensor | None = None,
                     stats: Callable[[str], ActivationStats] | None = None) -> list[Target]:
    """Concrete targets, in config order, each with exactly one role.

    Chosen features (index, indices, from_screening) are resolved first; controls (random, top_linear,
    matched) after them, and never pick a chosen feature or an earlier control's, wherever they stand in the
    config (a ``random`` control listed before an explicit feature used to be able to draw it); linear and
    matched controls are never screen hits. A feature chosen twice with the same role is kept once; with two
    roles it is a config error (one row per feature and condition cannot carry two roles). ``stats(point)``:
    activation statistics on the stimuli, needed by matched controls."""
    widths = point_widths(joint, d_in)
    rng = np.random.default_rng(seed)
    hits = screen_hits(specs)
    resolved: dict[int, list[Target]] = {}
    owner: dict[tuple[str, tuple[int, ...], int | None], tuple[str, int]] = {}  # target key -> (role, spec index)

    def keep(i: int, new: list[Target]) -> None:
        kept = []
        for t in new:
            _check_point(t.point, widths)
            key = t.key
            if key in owner:
                role, first = owner[key]
                if role != t.role:
                    raise FisError(f"feature {t.label} at {t.point} is listed with two roles, '{role}' "
                                   f"(features[{first}]) and '{t.role}' (features[{i}])", field=f"features[{i}]",
                                   fix="list each feature once, with one role")
                continue
            owner[key] = (t.role, i)
            kept.append(t)
        resolved[i] = kept

    def so_far() -> list[Target]:
        return [t for i in sorted(resolved) for t in resolved[i]]

    controls = [i for i, spec in enumerate(specs) if spec.random is not None or spec.top_linear is not None
                or spec.matched is not None or spec.directions is not None]
    for i, spec in enumerate(specs):
        if i in controls:
            continue
        if spec.from_screening is not None:
            keep(i, _from_screening(spec))
            continue
        width = _check_point(spec.point, widths)
        idx = tuple(spec.indices) if spec.indices is not None else (int(spec.index),)
        bad = [j for j in idx if j >= width]
        if bad:
            raise FisError(f"feature {bad[0]} is out of range for {spec.point} (width {width})",
                           field=f"features[{i}].index", fix=f"use 0..{width - 1}")
        keep(i, [Target(spec.point, idx, spec.role)])
    for i in controls:
        spec = specs[i]
        if spec.directions is not None:
            keep(i, direction_controls(spec, so_far(), seed))
        elif spec.matched is not None:
            if stats is None:
                raise FisError("matched controls need the stimuli's activation statistics", field="features.matched")
            keep(i, matched_controls(spec, so_far(), stats, hits))
        elif spec.top_linear is not None:
            if getattr(joint, "nfm", None) is None:
                raise FisError("top_linear needs a checkpoint with an integration module", field="features")
            norms = joint.nfm.W_lin.detach().norm(dim=-1).cpu()
            if active_latents is not None:
                norms = torch.where(active_latents.cpu(), norms, torch.full_like(norms, -1.0))
            for pt, f in hits:  # a screen hit is an alternative explanation, not a null control
                if pt == "sae.hook_latents" and f < len(norms):
                    norms[f] = -1.0
            taken = {k[1] for k in owner if k[0] == "sae.hook_latents" and k[2] is None}
            order = [j for j in torch.argsort(norms, descending=True).tolist() if (j,) not in taken]
            keep(i, [Target("sae.hook_latents", (j,), spec.role) for j in order[:spec.top_linear]])
        else:
            width = _check_point(spec.point, widths)
            taken = {k[1] for k in owner if k[0] == spec.point and k[2] is None}
            pool = [j for j in range(width) if (j,) not in taken]
            picks = rng.choice(pool, size=min(spec.random, len(pool)), replace=False)
            keep(i, [Target(spec.point, (int(j),), spec.role) for j in picks])
    return [t for i in range(len(specs)) for t in resolved[i]]


@dataclass(frozen=True)
class Condition:
    """One intervention condition on one target: kind, value, where, and the resolved clamp value."""

    kind: str
    value: float
    where: str
    amount: float  # the number actually used (value x feature max for relative sets)
    variant: str = ""  # "relative_to_max" or "quantile" for sets calibrated per feature

    @property
    def label(self) -> str:
        """The ``intervention`` column: a calibrated set is its own condition ('set_relative_to_max',
        'set_quantile'), so ``{set 1.0 relative_to_max}`` and ``{set 1.0}`` are two rows, not one key twice."""
        return f"{self.kind}_{self.variant}" if self.variant else self.kind


def conditions(specs: list[InterventionSpec], feature_max: float,
               quantiles: Callable[[float], float] | None = None) -> list[Condition]:
    """The conditions of one target; ``quantiles(q)``: the q-quantile of its non-zero activations on the
    stimuli (for ``quantile: true`` sets, 0 if it never fires)."""
    out = []
    for spec in specs:
        for v in spec.values:
            if spec.quantile:
                amount = quantiles(v) if quantiles is not None else 0.0
            else:
                amount = v * feature_max if spec.relative_to_max else v
            out.append(Condition(spec.kind, float(v), spec.where, float(amount), spec.variant))
    return out


def make_edit(target: Target, cond: Condition) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn(value) -> edited copy`` for the target's features under the condition."""
    idx = list(target.indices)

    def fn(value: torch.Tensor) -> torch.Tensor:
        out = value.clone()
        if cond.kind == "scale":
            out[..., idx] = value[..., idx] * cond.amount
        elif cond.kind == "set":
            out[..., idx] = cond.amount
        elif cond.kind == "add":
            out[..., idx] = value[..., idx] + cond.amount
        else:
            out[..., idx] = 0.0
        return out

    return fn


def screened_designs(specs: list[FeatureSpec], checkpoint: Path, checkpoint_id: str, idents: dict[str, str]
                     ) -> dict[str, dict]:
    """For each battery design some ``from_screening`` feature was selected on: its discovery items (union over
    screenings) and the screenings. Refuses (one line) a screening of another checkpoint or design
    (``checkpoint_id``, and ``idents``: design name -> identity; see :func:`..holdout.check_same_origin`)."""
    from ..holdout import check_same_origin

    out: dict[str, dict] = {}
    for spec in specs:
        if spec.from_screening is None:
            continue
        summary, file = screening_summary(spec)
        name = check_same_origin(summary, file, checkpoint, checkpoint_id, idents)
        entry = out.setdefault(name, {"discovery": [], "confirmation": None, "screenings": []})
        entry["discovery"] = list(dict.fromkeys(entry["discovery"] + [str(i) for i in summary["split"]["discovery"]]))
        entry["screenings"].append(str(spec.from_screening))
    return out


def stacked_edit(blocks: list[tuple[Target, Condition]], point: str, n_rows: int
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
    """ONE edit at ``point`` for ``len(blocks) + 1`` stacked copies of ``n_rows`` rows: copy 0 unedited, copy
    ``b + 1`` edited by ``blocks[b]`` (identity where that block targets another point).

    Every copy gets ``value * mul + add`` with per-copy tables (scale: mul = amount; set: mul = 0, add = amount;
    add: add = amount; zero: mul = 0), so all conditions of all features cost one elementwise pass and the
    tables reach the device in one copy. An identity copy is ``value * 1 + 0``, bit-identical to copy 0.
    """
    built: dict[tuple[int, torch.dtype, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def fn(value: torch.Tensor) -> torch.Tensor:
        width = value.shape[-1]
        key = (width, value.dtype, str(value.device))
        if key not in built:
            built[key] = _tables(width, value)
        mul, add = built[key]
        stacked = value.view(len(blocks) + 1, n_rows, width)
        return (stacked * mul + add).view_as(value)

    def _tables(width: int, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tables = torch.zeros(2, len(blocks) + 1, width, dtype=value.dtype)
        tables[0] = 1.0
        for b, (target, cond) in enumerate(blocks, start=1):
            if target.point != point:
                continue
            idx = list(target.indices)
            if cond.kind == "scale":
                tables[0, b, idx] = cond.amount
            elif cond.kind == "set":
                tables[0, b, idx], tables[1, b, idx] = 0.0, cond.amount
            elif cond.kind == "add":
                tables[1, b, idx] = cond.amount
            else:
                tables[0, b, idx] = 0.0
        mul, add = tables.to(value.device).unsqueeze(2)  # [copies, 1, width] each: one copy, built once
        return mul, add

    return fn
