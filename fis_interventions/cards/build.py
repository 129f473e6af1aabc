"""Feature cards: what a feature of a joint-SAE checkpoint is (``fis features``, reports, ``fis screen --cards``).

A card holds, for one feature at ``sae.hook_latents``, ``nfm.hook_hidden`` or ``secondary.hook_latents``:
its top-activating contexts from the checkpoint's harvest (held-out contexts by default), firing frequency
and an activation histogram (:mod:`.stream`, one pass for all features), its output direction in the
residual stream with the logit lens (:mod:`.directions`), and for integration features the SAE latent pairs
that drive it (:mod:`.pairs`). Cards are plain dicts (``card.json``) rendered to Markdown by :mod:`.render`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import FisError
from ..model_identity import of_checkpoint, of_record, same_model
from .directions import (CARD_POINTS, DERIVATION, INTEGRATION_POINTS, LENS_DEFINITION, check_ids, logit_lens,
                         point_width, residual_directions, token_texts, top_tokens)
from .pairs import DEFINITION as PAIRS_DEFINITION
from .pairs import pair_contributions
from .stream import CONTEXT_LEFT, CONTEXT_RIGHT, FeatureKey, StreamResult, fine_edges, stream_features

FORMAT = "fis-feature-card/1"
Split = Literal["heldout", "train", "all"]
SPLITS = ("heldout", "train", "all")
N_LENS = 10
DISPLAY_BINS = 20
N_PAIRS = 10


def parse_ids(text: str) -> list[int]:
    """``"60,218"`` -> ``[60, 218]``; a one-line error for anything else."""
    try:
        ids = [int(t) for t in str(text).replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise FisError(f"feature ids must be integers separated by commas, got {text!r}", field="ids",
                       fix="e.g. --ids 60,218") from None
    if not ids:
        raise FisError("no feature ids given", field="ids", fix="e.g. --ids 60,218")
    return list(dict.fromkeys(ids))


def recorded_harvest(ckpt: Any) -> Path | None:
    """The harvest folder the checkpoint was trained on, as recorded in it (may no longer exist)."""
    from ..sae.checkpoint import recorded_input

    return recorded_input(ckpt, "activations", marker="manifest.json") if hasattr(ckpt, "meta") else None


def harvest_folder(ckpt: Any, activations: Path | str | None, flag: str = "--activations") -> Path:
    """The harvest to read: the one given, else the one the checkpoint was trained on (found absolute or
    relative to the checkpoint). ``flag``: the option that gives it on this command, named in the fix."""
    if activations is not None:
        folder = Path(activations)
    else:
        recorded = recorded_harvest(ckpt)
        if recorded is None:
            raise FisError("the checkpoint does not record its harvest folder", source=ckpt.path,
                           field="activations", fix=f"pass {flag} HARVEST_FOLDER")
        folder = recorded
    if not (folder / "manifest.json").is_file():
        raise FisError("harvest folder not found (no manifest.json)", source=folder, field="activations",
                       fix=f"pass {flag} with the folder written by `fis harvest`")
    return folder


def check_harvest(store: Any, ckpt: Any, canonical: str | None = None) -> None:
    """Refuse a harvest of another model, hook point or width than the checkpoint (one line).

    The hook is compared only with ``canonical`` (the bridge's name for the checkpoint's hook), so that an
    alias (``hook_resid_post`` / ``hook_out``) is not mistaken for another hook; without it only the model and
    the width are checked."""
    m = store.manifest
    if ckpt.model_name is not None and not same_model(of_checkpoint(ckpt), of_record(m, "model")):
        raise FisError(f"harvest is of model {of_record(m, 'model').describe()}, the checkpoint of "
                       f"{of_checkpoint(ckpt).describe()}", source=store.folder, field="model",
                       fix="pass a harvest of the checkpoint's model")
    same_hook = m.get("hook") == ckpt.hook or m.get("hook_canonical") == canonical
    if canonical is not None and ckpt.hook is not None and not same_hook:
        raise FisError(f"harvest is of hook {m.get('hook')!r}, the checkpoint was trained at {ckpt.hook!r}",
                       source=store.folder, field="hook", fix="pass a harvest of the checkpoint's hook point")
    if int(m.get("d_model", -1)) != ckpt.d_in:
        raise FisError(f"harvest has d_model {m.get('d_model')}, the checkpoint {ckpt.d_in}", source=store.folder,
                       field="d_model", fix="pass a harvest of the checkpoint's model and hook")


def _split_rule(split: str, every: int):
    if split == "heldout":
        return lambda ctx: ctx % every == 0
    if split == "train":
        return lambda ctx: ctx % every != 0
    return lambda ctx: torch.ones_like(ctx, dtype=torch.bool)


def _histogram(counts: torch.Tensor) -> dict[str, Any]:
    """Merge the fine log bins into at most DISPLAY_BINS display bins over the occupied range (exact counts)."""
    nz = counts.nonzero().flatten()
    if len(nz) == 0:
        return {"scale": "log10", "edges": [], "counts": []}
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    group = math.ceil((hi - lo) / DISPLAY_BINS)
    edges = fine_edges()
    starts = list(range(lo, hi, group))
    return {"scale": "log10", "edges": [float(edges[s]) for s in starts] + [float(edges[min(starts[-1] + group,
                                                                                               len(edges) - 1)])],
            "counts": [int(counts[s:s + group].sum()) for s in starts]}


def _clean(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")


def _contexts(res: StreamResult, f: int, tokenizer: Any) -> list[dict[str, Any]]:
    out = []
    for r in range(res.top_val.shape[1]):
        value = float(res.top_val[f, r])
        if not value > 0:
            continue
        toks = res.win_tok[f, r].tolist()
        acts = res.win_act[f, r].tolist()
        texts = [_clean(t) for t in token_texts(tokenizer, [t for t in toks if t >= 0])]
        it = iter(texts)
        pieces = [next(it) if t >= 0 else None for t in toks]
        before = [p for p in pieces[:CONTEXT_LEFT] if p is not None]
        after = [p for p in pieces[CONTEXT_LEFT + 1:] if p is not None]
        out.append({"rank": len(out) + 1, "activation": value, "context_id": int(res.top_ctx[f, r]),
                    "position": int(res.top_pos[f, r]), "token": pieces[CONTEXT_LEFT],
                    "token_id": toks[CONTEXT_LEFT], "before": before, "after": after,
                    "window_activations": [None if math.isnan(a) else a for a, t in zip(acts, toks) if t >= 0],
                    "text": "".join(before) + "⟦" + str(pieces[CONTEXT_LEFT]) + "⟧" + "".join(after)})
    return out


def _integration(joint: Any, key: FeatureKey, res: StreamResult, f: int, bridge: Any, normalizer: Any,
                 tags: dict[int, list[str]]) -> dict[str, Any] | None:
    if key.point not in INTEGRATION_POINTS or res.code_val is None:
        return None
    firing = res.top_val[f] > 0
    info = pair_contributions(joint, key.point, key.index, res.code_val[f][firing], res.code_idx[f][firing],
                              res.gates[f][firing], n_pairs=N_PAIRS)
    info.pop("preactivation")
    latents = sorted({i for p in info["pairs"] for i in p["latents"]} - set(tags))
    if latents:  # tags of each latent: its decoder row's top lens tokens (memo shared by all cards of a call)
        lens = logit_lens(bridge, residual_directions(joint, normalizer, "sae.hook_latents", latents))
        tags.update({i: [t["token"] for t in top_tokens(row, bridge.tokenizer, 3)[0]] for i, row in zip(latents, lens)})
    if info["pairs"]:
        for p in info["pairs"]:
            p["promotes"] = {str(i): tags[i] for i in p["latents"]}
    info["definition"] = PAIRS_DEFINITION[key.point]
    info["tokens_used"] = "the firing token of each top context listed above"
    return info


def _linear_part(joint: Any, index: int) -> dict[str, Any] | None:
    if joint.nfm is None:
        return None
    dec = joint.sae.W_dec[index].detach().float()
    lin = joint.nfm.W_lin[index].detach().float()
    cos = float(torch.nn.functional.cosine_similarity(dec, lin, dim=0))
    return {"norm_ratio": float(lin.norm() / dec.norm().clamp_min(1e-12)), "cosine_with_decoder": cos,
            "note": "the joint model's linear part adds delta * W_lin[i] for the same latent; it is not in the lens"}


def build_cards(checkpoint: Path | str | Any, keys: Sequence[FeatureKey], *, activations: Path | str | None = None,
                top: int = 20, split: Split = "heldout", bridge: Any = None, model: str | None = None,
                device: str = "auto", batch_size: int = 2048, progress: bool = False, design: Any = None,
                design_items: Sequence[str] | None = None, aggregate: str = "last") -> list[dict[str, Any]]:
    """One card per key, from ONE pass over the harvest (see module docstring). Checks everything first.

    ``design`` (a read design, or a YAML path) adds each feature's activation on the design's own stimuli,
    per cell and token by token (``card["stimuli"]``, :mod:`.stimuli`; ``design_items``: only those items;
    ``aggregate``: the screen's aggregate over a stimulus's positions)."""
    from ..activations import ActivationStore
    from ..attach import checkpoint_preprocessing
    from ..model_identity import check_same_model, model_to_load, of_bridge, of_source
    from ..models import load_model, resolve_hook, weights_device
    from ..sae import Checkpoint, load_checkpoint

    if split not in SPLITS:
        raise FisError(f"unknown split {split!r}", field="split", fix=f"use one of: {', '.join(SPLITS)}")
    if top < 1:
        raise FisError(f"--top must be at least 1, got {top}", field="top", fix="e.g. --top 20")
    if batch_size < 1:
        raise FisError(f"batch size must be positive, got {batch_size}", field="batch_size", fix="e.g. 2048")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(Path(checkpoint))
    joint = ckpt.model.eval()
    keys = list(dict.fromkeys(keys))
    for point in dict.fromkeys(k.point for k in keys):
        check_ids(joint, point, [k.index for k in keys if k.point == point])
    if ckpt.meta.get("format") == "saelens":  # it reads raw activations and records no harvest of its own
        from ..activations import Normalizer

        normalizer = Normalizer.from_dict(ckpt.normalization)
    else:
        normalizer, _ = checkpoint_preprocessing(ckpt.normalization, ckpt.path)
    folder = harvest_folder(ckpt, activations)
    frac = (ckpt.train_config or {}).get("heldout_fraction")  # training read max(frac, 0.01): the same split
    store = ActivationStore(folder, heldout_fraction=0.1 if frac is None else max(float(frac), 0.01))
    check_harvest(store, ckpt)
    if bridge is None:
        # a SAELens SAE names its model only in free form: the model is the harvest's (or --model)
        recorded_model = model_to_load(ckpt.model_name or store.manifest.get("model"), model, source=ckpt.path)
        if model is not None and ckpt.model_name is not None:  # before loading it: by content where recorded
            check_same_model(of_checkpoint(ckpt), of_source(model), source=ckpt.path)
        bridge = load_model(recorded_model, device=device)
    if ckpt.model_name is not None:
        check_same_model(of_checkpoint(ckpt), of_bridge(bridge), source=ckpt.path)
    if ckpt.hook is not None:
        check_harvest(store, ckpt, resolve_hook(bridge, ckpt.hook).canonical)
    if design is not None and not hasattr(design, "factors"):
        from ..designs import read_design

        design = read_design(design)  # a bad design is a one-line error before the harvest pass
    joint = joint.to(weights_device(bridge))  # the pass runs where the model is
    res = stream_features(joint, normalizer, keys, store.shard_paths(), _split_rule(split, store.heldout_every),
                          top=top, batch_size=batch_size, progress=progress, verify=store.verify_shard)
    if res.n_tokens == 0:
        raise FisError(f"the {split} split of the harvest has no tokens", source=folder, field="split",
                       fix="harvest more tokens or use --split all")
    cards = []
    tags: dict[int, list[str]] = {}
    tokenizer = bridge.tokenizer
    recorded = recorded_harvest(ckpt)
    own = recorded is not None and recorded.resolve() == folder.resolve()
    never = ", never trained on" if own else " of a harvest the checkpoint was not trained on"
    split_text = {"heldout": f"held-out contexts (context_id % {store.heldout_every} == 0{never})",
                  "train": f"training contexts (context_id % {store.heldout_every} != 0)",
                  "all": "every context"}[split]
    for f, key in enumerate(keys):
        direction = residual_directions(joint, normalizer, key.point, [key.index])
        lens = logit_lens(bridge, direction)[0]
        promoted, suppressed = top_tokens(lens, tokenizer, N_LENS)
        n_fire = int(res.n_fire[f])
        cards.append({
            "format": FORMAT, "point": key.point, "feature": key.index,
            "width": point_width(joint, key.point),
            "checkpoint": str(ckpt.path), "model": ckpt.model_name, "hook": ckpt.hook,
            "harvest": {"folder": str(folder), "split": split, "split_rule": split_text,
                        "contexts": res.n_contexts, "tokens": res.n_tokens},
            "activation": {"tokens": res.n_tokens, "firing": n_fire, "frequency": n_fire / res.n_tokens,
                           "max": float(res.vmax[f]) if n_fire else 0.0,
                           "mean_when_firing": float(res.total[f]) / n_fire if n_fire else None,
                           "histogram": _histogram(res.hist[f]),
                           "definition": "firing = value > 0 at a kept position of the split; histogram of the "
                                         "non-zero values in log-spaced bins (exact counts)"},
            "top_contexts": _contexts(res, f, tokenizer),
            "context_definition": (f"contexts ranked by the feature's maximum over the context; shown: the "
                                   f"position of that maximum (⟦token⟧) with {CONTEXT_LEFT} tokens before and "
                                   f"{CONTEXT_RIGHT} after"),
            "output_direction": {"derivation": DERIVATION[key.point], "norm": float(direction.norm()),
                                 "lens_definition": LENS_DEFINITION, "promoted": promoted, "suppressed": suppressed,
                                 "linear_part": _linear_part(joint, key.index) if key.point == "sae.hook_latents"
                                 else None},
            "integration": _integration(joint, key, res, f, bridge, normalizer, tags),
        })
    if design is not None:
        from ..attach import attach
        from .stimuli import stimulus_activity

        views = stimulus_activity(attach(bridge, ckpt), design, keys, aggregate=aggregate, items=design_items)
        for card in cards:
            card["stimuli"] = views[(card["point"], card["feature"])]
    return cards


def card_name(card: dict[str, Any]) -> str:
    """File stem of a card: ``secondary.hook_latents_140``."""
    return f"{card['point']}_{card['feature']}"


def write_cards(cards: Sequence[dict[str, Any]], folder: Path) -> None:
    """Write ``<point>_<id>.md`` and ``.json`` per card plus ``index.md`` into an existing folder."""
    from ..io import write_json
    from .render import card_markdown, index_markdown

    folder.mkdir(parents=True, exist_ok=True)
    for card in cards:
        write_json(folder / f"{card_name(card)}.json", card)
        (folder / f"{card_name(card)}.md").write_text(card_markdown(card), encoding="utf-8")
    (folder / "index.md").write_text(index_markdown(cards), encoding="utf-8")


def features(checkpoint: Path | str, point: str, ids: Sequence[int] | str, *, activations: Path | str | None = None,
             top: int = 20, out: Path | str | None = None, split: Split = "heldout", model: str | None = None,
             device: str = "auto", batch_size: int = 2048, bridge: Any = None,
             progress: bool = True, overwrite: bool = False, design: Path | str | None = None,
             aggregate: str = "last") -> list[dict[str, Any]]:
    """Python API of ``fis features``: cards for ``ids`` at ``point``; written into ``out`` when given, under
    the fingerprint rule (:mod:`fis_interventions.fingerprint`: a folder is replaced only if fis wrote it)."""
    from ..fingerprint import (Fingerprint, check_output, checkpoint_identity, file_digest, folder_identity,
                               package_version, replace_folder)

    if point not in CARD_POINTS:
        raise FisError(f"unknown feature point {point!r}", field="point", fix=f"use one of: {', '.join(CARD_POINTS)}")
    id_list = parse_ids(ids) if isinstance(ids, str) else list(dict.fromkeys(int(i) for i in ids))
    fp = None
    if out is not None:
        check_output(Path(out), Fingerprint("features", {}), overwrite=True)  # not ours: refused before work
        fp = Fingerprint("features", {
            "checkpoint": checkpoint_identity(Path(checkpoint)), "point": point, "ids": id_list, "top": top,
            "split": split, "activations": None if activations is None else folder_identity(Path(activations)),
            "package": package_version(),
            **({"design": file_digest(Path(design)), "aggregate": aggregate} if design is not None else {})})
        check_output(Path(out), fp, overwrite=overwrite, replaces_same=True)
    cards = build_cards(checkpoint, [FeatureKey(point, i) for i in id_list], activations=activations, top=top,
                        split=split, bridge=bridge, model=model, device=device, batch_size=batch_size,
                        progress=progress, design=design, aggregate=aggregate)
    if out is not None and fp is not None:
        from .. import recorded_paths
        from ..io import write_json

        with replace_folder(Path(out), fp, overwrite=overwrite) as tmp:
            write_cards(cards, tmp)
            if cards:  # what the cards were made from, absolute and relative to the folder (it can be moved)
                write_json(tmp / "inputs.json", {"inputs": recorded_paths.record_all(
                    {"checkpoint": cards[0]["checkpoint"], "activations": cards[0]["harvest"]["folder"]}, out)})
    return cards
