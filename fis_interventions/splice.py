"""A forward pass we own, split at a block output, for splicing and interventions.

Why: an intervention battery runs many edited conditions on the same stimuli. The prefix (embedding and
blocks 0..L) is the same for all of them, so we compute it once; only the suffix (blocks L+1.., final norm,
unembedding) runs per condition, and the unembedding (49k vocabulary on SmolLM2) only at the readout
positions. TransformerBridge's ``start_at_layer`` gives the right logits but still pays for the prefix, so we
run the wrapped Hugging Face decoder blocks directly, with the rotary embeddings, causal/padding mask and
position ids they need. Tests check prefix == the bridge's hook value and prefix+suffix == the full forward.

Supported: decoder-only HF models laid out as ``model.model.{embed_tokens, layers, norm, rotary_emb}`` plus
``model.lm_head`` (Llama, Mistral, Qwen2, SmolLM, Gemma-style families), split at ``blocks.L.hook_resid_post``
(alias ``blocks.L.hook_out``). Anything else is a clear error naming what is unsupported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import FisError
from .models import HookSpec, hf_model_of, resolve_hook

_BLOCK_OUTPUT = "hook_out"


@dataclass
class PrefixState:
    """What the suffix needs besides the residual: masks and rotary embeddings for this batch."""

    attention_mask: torch.Tensor  # [B, T] 1 = real token
    position_ids: torch.Tensor  # [B, T]
    causal_mask: Any
    position_embeddings: tuple[torch.Tensor, torch.Tensor]

    def repeat(self, n: int) -> PrefixState:
        """The same state for ``n`` stacked copies of the batch (conditions batched together)."""
        cos, sin = self.position_embeddings
        mask = self.causal_mask
        if isinstance(mask, torch.Tensor):
            mask = mask.repeat(n, *([1] * (mask.dim() - 1)))
        return PrefixState(self.attention_mask.repeat(n, 1), self.position_ids.repeat(n, 1), mask,
                           (cos.repeat(n, *([1] * (cos.dim() - 1))), sin.repeat(n, *([1] * (sin.dim() - 1)))))


class SplitModel:
    """``prefix(tokens) -> residual at the hook``; ``suffix(residual) -> logits`` (optionally at positions)."""

    def __init__(self, bridge: Any, hook: str | HookSpec) -> None:
        self.bridge = bridge
        self.hook = hook if isinstance(hook, HookSpec) else resolve_hook(bridge, hook)
        if not self.hook.canonical.endswith(_BLOCK_OUTPUT):
            raise FisError(f"interventions split the model at a block output; '{self.hook.name}' is inside a block",
                           field="hook", fix="use blocks.L.hook_resid_post")
        hf = hf_model_of(bridge)
        inner = getattr(hf, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if inner is None or not all(hasattr(inner, n) for n in needed) or not hasattr(hf, "lm_head"):
            raise FisError(f"architecture {type(hf).__name__} is not supported by the split forward",
                           field="model", fix="use a Llama/Mistral/Qwen2-family decoder model")
        self.hf = hf
        self.inner = inner
        self.config = hf.config

    @property
    def device(self) -> torch.device:
        return self.inner.embed_tokens.weight.device

    def _state(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> PrefixState:
        from transformers.masking_utils import create_causal_mask

        # right padding keeps positions 0..n-1 for real tokens; pads get positions too but are masked out
        position_ids = torch.arange(embeds.shape[1], device=embeds.device).unsqueeze(0).expand(embeds.shape[0], -1)
        causal = create_causal_mask(config=self.config, inputs_embeds=embeds, attention_mask=attention_mask,
                                    past_key_values=None, position_ids=position_ids)
        pos_emb = self.inner.rotary_emb(embeds, position_ids=position_ids)
        return PrefixState(attention_mask, position_ids, causal, pos_emb)

    def _blocks(self, hidden: torch.Tensor, state: PrefixState, layers: range) -> torch.Tensor:
        for i in layers:
            out = self.inner.layers[i](hidden, attention_mask=state.causal_mask,
                                       position_embeddings=state.position_embeddings,
                                       position_ids=state.position_ids, past_key_values=None, use_cache=False)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    @torch.no_grad()
    def prefix(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, PrefixState]:
        """Residual stream after block L for right-padded ``tokens`` [B, T], and the state for the suffix."""
        tokens = tokens.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(tokens)
        attention_mask = attention_mask.to(self.device)
        embeds = self.inner.embed_tokens(tokens)
        state = self._state(embeds, attention_mask)
        return self._blocks(embeds, state, range(self.hook.layer + 1)), state

    @torch.no_grad()
    def suffix(self, resid: torch.Tensor, state: PrefixState, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from a residual at the hook: [B, T, V], or [B, P, V] at ``positions`` [B, P] only."""
        hidden = self._blocks(resid, state, range(self.hook.layer + 1, self.config.num_hidden_layers))
        if positions is not None:
            hidden = hidden.gather(1, positions.to(hidden.device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return self.hf.lm_head(self.inner.norm(hidden))

    def logits(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full forward through prefix and suffix (for tests and unedited runs)."""
        resid, state = self.prefix(tokens, attention_mask)
        return self.suffix(resid, state)


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

    def _run(self, x_raw: torch.Tensor, components: str, edit: Any = None) -> torch.Tensor:
        return self.joint(self.inputs(x_raw), components, edit=edit).recon

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
        recon = self.joint(x.repeat(n_edits + 1, 1), components, edit=edit).recon
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
