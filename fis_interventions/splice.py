"""A forward pass we own, split at a block output, for splicing and interventions.

Why: an intervention battery runs many edited conditions on the same stimuli. The prefix (embedding and
blocks 0..L) is the same for all of them, so we compute it once; only the suffix (blocks L+1.., final norm,
unembedding) runs per condition, and the unembedding only at the readout positions. TransformerBridge's
``start_at_layer`` gives the right logits but still pays for the prefix, so for the families registered in
:mod:`fis_interventions.model_adapters` (Llama/Mistral/SmolLM, Qwen2, Gemma-2, Phi-3, GPT-2, GPT-NeoX) we run
the wrapped Hugging Face blocks directly, with the masks, position ids and position embeddings they need.

Any other architecture the bridge can boot takes the generic path (:class:`BridgeHookPath`): the prefix is
the bridge's forward stopped after block L, the suffix a full bridge forward per call whose hook at the split
point returns the given residual. Correct for every model, slower; warned once per process and reported as
``split_path`` in ``run.json``. Tests check prefix == the bridge's hook value and prefix+suffix == the full
forward for every family and for the generic path.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from .errors import FisError
from .model_adapters import FamilyAdapter, family_for, segment_mask
from .models import HookSpec, hf_model_of, resolve_hook, weights_device

FORCE_GENERIC_ENV = "FIS_SPLIT_PATH"  # "generic": take the bridge-hook path even for registered families
log = logging.getLogger(__name__)
_warned: set[str] = set()


def _map_tensors(value: Any, fn: Any) -> Any:
    """``fn`` applied to every tensor of a tensor / tuple / dict tree (the layout of a :class:`PrefixState`)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


@dataclass
class PrefixState:
    """What the suffix needs besides the residual: the batch's tokens, masks and position embeddings."""

    tokens: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] 1 = real token
    position_ids: torch.Tensor  # [B, T]
    masks: dict[str, Any]  # per mask kind (full / sliding window); empty on the generic path
    position_embeddings: Any = None  # rotary (cos, sin) or None

    def _per_row(self, fn: Any, broadcast_ok: bool = True) -> PrefixState:
        """``fn`` on every per-row tensor; a batch-size-1 tensor of the masks and position embeddings broadcasts
        against any batch and is left as it is (``broadcast_ok``)."""
        n = self.tokens.shape[0]
        per_token = ("tokens", "attention_mask", "position_ids")

        def apply(name: str) -> Any:
            keep_one = broadcast_ok and name not in per_token
            return _map_tensors(getattr(self, name), lambda t: t if t.dim() == 0 or (keep_one and t.shape[0] == 1)
                                or t.shape[0] != n else fn(t))
        return replace(self, **{f.name: apply(f.name) for f in fields(self)})

    def repeat(self, n: int) -> PrefixState:
        """The same state for ``n`` stacked copies of the batch (conditions batched together)."""
        return self._per_row(lambda t: t.repeat(n, *([1] * (t.dim() - 1))))

    def take(self, rows: torch.Tensor) -> PrefixState:
        """The state of the batch rows ``rows`` (repeats allowed): chosen rows stacked for one suffix pass."""
        return self._per_row(lambda t: t.index_select(0, rows.to(t.device)), broadcast_ok=False)


@dataclass
class Packing:
    """Rows that share a token prefix, packed into one sequence: the prefix once (segment 0), then each row's
    tail (segments 1, 2, ...) at the positions it has in its own row. With :func:`~fis_interventions.
    model_adapters.segment_mask` every tail attends to the prefix and itself only, so each position's value is
    the one it has in its row alone (causal model), for a fraction of the positions."""

    position_ids: torch.Tensor  # [B, T]
    segments: torch.Tensor  # [B, T] 0 shared, k >= 1 the k-th row's tail, -1 padding


class SplitModel:
    """``prefix(tokens) -> residual at the hook``; ``suffix(residual) -> logits`` (optionally at positions)."""

    def __init__(self, bridge: Any, hook: str | HookSpec, path: str = "auto") -> None:
        self.bridge = bridge
        self.hook = hook if isinstance(hook, HookSpec) else resolve_hook(bridge, hook)
        self.hf = hf_model_of(bridge)
        self.config = self.hf.config
        if path == "auto" and os.environ.get(FORCE_GENERIC_ENV) == "generic":
            path = "generic"
        # the fast adapters run whole blocks: they can split only on the residual stream between two blocks
        self.blocks_before = residual_split(self.hook)
        family = family_for(self.hf) if path != "generic" and self.blocks_before is not None else None
        self.adapter: FamilyAdapter | BridgeHookPath
        if family is not None:
            self.adapter = FamilyAdapter(self.hf, family)
            self.path = f"fast:{family.name}"
        else:
            check_spliceable(bridge, self.hook)
            self.adapter = BridgeHookPath(bridge, self.hook)
            self.path = "generic"
            arch = type(self.hf).__name__
            reason = (f"{self.hook.name} is inside block {self.hook.layer} (the fast split feeds only the residual "
                      "stream between blocks)" if self.blocks_before is None
                      else f"{arch} has no fast split adapter" if family_for(self.hf) is None else None)
            if reason is not None and reason not in _warned:
                _warned.add(reason)
                log.warning("%s: interventions run a full forward pass per condition (correct, slower)", reason)

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    @torch.no_grad()
    def prefix(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
               packing: Packing | None = None) -> tuple[torch.Tensor, PrefixState]:
        """Residual stream after block L for right-padded ``tokens`` [B, T], and the state for the suffix;
        ``packing``: several rows sharing a prefix in one sequence (:class:`Packing`, fast path only)."""
        tokens = tokens.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(tokens)
        attention_mask = attention_mask.to(self.device)
        hidden, state = self._embedded(tokens, attention_mask, packing)
        if isinstance(self.adapter, BridgeHookPath):
            return self.adapter.prefix(state), state
        return self._blocks(hidden, state, range(self.blocks_before or 0)), state

    def can_pack(self, width: int) -> bool:
        """Whether rows packed into sequences of ``width`` positions attend as they would alone (fast path, and
        no sliding window shorter than the width)."""
        return isinstance(self.adapter, FamilyAdapter) and self.adapter.packable(width)

    def _embedded(self, tokens: torch.Tensor, attention_mask: torch.Tensor, packing: Packing | None = None
                  ) -> tuple[torch.Tensor | None, PrefixState]:
        """The embeddings (fast path) and the suffix's state of right-padded ``tokens`` on the model's device."""
        if packing is not None:
            if not self.can_pack(tokens.shape[1]):
                raise ValueError("packed rows need the fast split path and no sliding window shorter than the "
                                 "packed width (SplitModel.can_pack)")
            position_ids = packing.position_ids.to(tokens.device)
        else:  # right padding keeps positions 0..n-1 for real tokens; pads get positions too but are masked out
            position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand(tokens.shape[0], -1)
        if isinstance(self.adapter, BridgeHookPath):
            return None, PrefixState(tokens, attention_mask, position_ids, {})
        ad = self.adapter
        hidden = ad.embed(tokens, position_ids)
        and_mask = segment_mask(packing.segments.to(tokens.device)) if packing is not None else None
        return hidden, PrefixState(tokens, attention_mask, position_ids,
                                   ad.masks(hidden, attention_mask, position_ids, and_mask),
                                   ad.position_embeddings(hidden, position_ids))

    @torch.no_grad()
    def state_for(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> PrefixState:
        """The suffix's state of right-padded ``tokens`` without the prefix pass: for residuals already computed
        in other batches and padded together (the attribution screen merges short batches for its suffix)."""
        return self._embedded(tokens.to(self.device), attention_mask.to(self.device))[1]

    def _blocks(self, hidden: torch.Tensor, state: PrefixState, layers: range) -> torch.Tensor:
        ad = self.adapter
        assert isinstance(ad, FamilyAdapter)
        for i in layers:
            hidden = ad.block(i, hidden, state.masks, state.position_ids, state.position_embeddings)
        return hidden

    @torch.no_grad()
    def suffix(self, resid: torch.Tensor, state: PrefixState, positions: torch.Tensor | None = None,
               vocab: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from a residual at the hook: [B, T, V], or [B, P, V] at ``positions`` [B, P] only; with
        ``vocab`` (token ids on the model's device) only those columns, [..., len(vocab)]."""
        if isinstance(self.adapter, BridgeHookPath):
            logits = self.adapter.suffix(resid, state)
            if positions is not None:
                logits = logits.gather(1, positions.to(logits.device).unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
            return logits if vocab is None else logits.index_select(-1, vocab)
        hidden = self._blocks(resid, state, range(self.blocks_before or 0, self.adapter.n_layers))
        if positions is not None:
            hidden = hidden.gather(1, positions.to(hidden.device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return self.adapter.finish(hidden, vocab)

    def logits(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full forward through prefix and suffix (for tests and unedited runs)."""
        resid, state = self.prefix(tokens, attention_mask)
        return self.suffix(resid, state)


def residual_split(hook: HookSpec) -> int | None:
    """How many blocks run before ``hook`` when it is the residual stream between two blocks (``blocks.L.hook_in``
    = resid_pre: L; ``blocks.L.hook_out`` = resid_post: L + 1); None for a hook inside a block."""
    if hook.canonical == f"blocks.{hook.layer}.hook_out":
        return hook.layer + 1
    if hook.canonical == f"blocks.{hook.layer}.hook_in":
        return hook.layer
    return None


def check_spliceable(bridge: Any, hook: HookSpec) -> None:
    """Refuse (one line) a hook whose value is not one d_model vector per position, e.g. ``attn.hook_pattern``.

    Why: an SAE reads and writes [batch, position, d_model] values; anything else (attention patterns, per-head
    values, MLP hidden units) cannot be harvested for it nor spliced back. Checked on a 2-token probe so that the
    refusal comes before any work is done or any file is written.
    """
    from .activations.harvester import capture_hook

    probe = torch.full((1, 2), int(bridge.tokenizer.bos_token_id or 0), dtype=torch.long,
                       device=weights_device(bridge))
    try:
        value = capture_hook(bridge, probe, hook.canonical, hook.stop_at_layer)
    except KeyError:  # the hook never fired
        value = None
    d = int(bridge.cfg.d_model)
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != (1, 2, d):
        shape = "no value" if not isinstance(value, torch.Tensor) else f"shape {list(value.shape)}"
        raise FisError(f"hook point '{hook.name}' gives {shape}, not one {d}-dim vector per token, so an SAE "
                       "cannot be harvested or spliced there", field="hook",
                       fix=f"use a residual-stream hook such as blocks.{hook.layer}.hook_resid_post, or "
                       f"blocks.{hook.layer}.hook_mlp_out / hook_attn_out")


class BridgeHookPath:
    """The generic split for any architecture the bridge boots, built on the bridge's own hooks.

    The prefix is the bridge's forward stopped after block L with the hook value cached; the suffix is a full
    bridge forward whose hook at the split point returns the given residual (so blocks 0..L run again: the
    cost of not knowing the family's internals). Right padding needs no mask for the real positions of a
    causal model, but the mask is passed on so that the model sees what it would see in the prefix.
    """

    def __init__(self, bridge: Any, hook: HookSpec) -> None:
        self.bridge = bridge
        self.hook = hook

    @property
    def device(self) -> torch.device:
        return weights_device(self.bridge)

    def prefix(self, state: PrefixState) -> torch.Tensor:
        name = self.hook.canonical
        _, cache = self.bridge.run_with_cache(state.tokens, names_filter=lambda n: n == name,
                                              stop_at_layer=self.hook.stop_at_layer,
                                              attention_mask=state.attention_mask)
        return cache[name]

    def suffix(self, resid: torch.Tensor, state: PrefixState) -> torch.Tensor:
        def put(value: torch.Tensor, hook: Any) -> torch.Tensor:
            return resid.to(value.dtype)

        return self.bridge.run_with_hooks(state.tokens, fwd_hooks=[(self.hook.canonical, put)],
                                          attention_mask=state.attention_mask)


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (tokens [B, T], attention_mask [B, T])."""
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        tokens[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, :len(seq)] = 1
    return tokens, mask


class JointSplice:
    """Puts a joint SAE into the residual stream at the hook it was trained on, in the original scale.

    Two operations, both applied only at positions the harvest's exclusion rule kept (BOS/EOS/pad and massive
    activations stay untouched, exactly as they were left out of training):

    - :meth:`reconstruct`: replace the residual by the reconstruction (evaluation: KL/CE of the splice);
    - :meth:`edit` / :meth:`stacked_deltas`: add ``invert(recon_edited) - invert(recon)`` to the clean residual
      (the error-term trick of SAELens), so with no edit the residual, and the logits, are exactly the clean
      ones and only the edit is measured (interventions).

    Exactness on any device: the unedited and the edited reconstructions come from ONE joint pass over stacked
    copies of the inputs (copy 0 unedited), so an edit that changes nothing yields a difference of exactly 0.
    Two separate passes of different batch sizes may round differently (cuBLAS picks kernels by shape).

    Normalisation (paper flaw 2) is applied before the joint model and inverted after it, from the statistics
    stored with the checkpoint.
    """

    def __init__(self, joint: Any, normalizer: Any, rule: Any) -> None:
        self.joint = joint
        self.normalizer = normalizer
        self.rule = rule

    def keep_mask(self, tokens: torch.Tensor, resid: torch.Tensor, attention_mask: torch.Tensor | None = None
                  ) -> torch.Tensor:
        keep = self.rule.keep_mask(tokens.to(resid.device), resid)
        if attention_mask is not None:
            keep &= attention_mask.to(resid.device).bool()
        return keep

    def inputs(self, x_raw: torch.Tensor) -> torch.Tensor:
        """Raw residual vectors -> the joint model's input space (its dtype, the stored normalisation)."""
        return self.normalizer.apply(x_raw.to(next(self.joint.parameters()).dtype))

    def _components(self, components: str) -> str:
        """'full' of a plain SAE (standalone, or from SAELens) is all it has: its SAE path."""
        return "sae" if components == "full" and getattr(self.joint, "nfm", ...) is None else components

    def _run(self, x_raw: torch.Tensor, components: str, edit: Any = None) -> torch.Tensor:
        return self.joint(self.inputs(x_raw), self._components(components), edit=edit).recon

    @torch.no_grad()
    def reconstruct(self, resid: torch.Tensor, keep: torch.Tensor, components: str = "full") -> torch.Tensor:
        out = resid.clone()
        recon = self._run(resid[keep], components)
        out[keep] = self.normalizer.invert(recon).to(resid.dtype)
        return out

    @torch.no_grad()
    def stacked_deltas(self, x: torch.Tensor, n_edits: int, edit: Any, components: str = "full") -> torch.Tensor:
        """Residual changes [n_edits, n, d] (raw scale) of ``n_edits`` edited copies of the inputs ``x`` [n, d]
        (already in the joint model's space, see :meth:`inputs`).

        One joint pass on ``n_edits + 1`` stacked copies; the edit functions receive the stacked value
        [(n_edits + 1) * n, width] and must leave copy 0 as it is: ``delta_c = recon(copy c) - recon(copy 0)``.
        """
        n = x.shape[0]
        recon = self.joint(x.repeat(n_edits + 1, 1), self._components(components), edit=edit).recon
        recon = recon.view(n_edits + 1, n, recon.shape[-1])
        return self.normalizer.invert_delta(recon[1:] - recon[:1])

    @torch.no_grad()
    def edit(self, resid: torch.Tensor, keep: torch.Tensor, edit: Any, components: str = "full") -> torch.Tensor:
        """The residual with one edit spliced in at the kept positions (error-term trick, exact no-op)."""
        out = resid.clone()
        x = resid[keep]
        n = x.shape[0]
        stacked = {name: _on_second_copy(fn, n) for name, fn in (edit or {}).items()}
        delta = self.stacked_deltas(self.inputs(x), 1, stacked, components)[0]
        out[keep] = x + delta.to(resid.dtype)
        return out


def _on_second_copy(fn: Any, n: int) -> Any:
    """An edit of [n, width] values applied to rows n.. of a [2n, width] stack (copy 0 stays unedited)."""
    def stacked(value: torch.Tensor) -> torch.Tensor:
        edited = fn(value[n:])
        if edited is None:  # an observer
            return value
        return torch.cat([value[:n], edited])
    return stacked
