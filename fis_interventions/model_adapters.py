"""How to run one model family's forward pass in pieces: one small adapter per family, in one registry.

Why: the split forward (:mod:`fis_interventions.splice`) runs the wrapped Hugging Face blocks directly, so that
the prefix is computed once and only the suffix runs per intervention condition. Families differ in exactly
three places, and an adapter says only those:

- **embed**: token embedding, plus learned absolute positions (GPT-2); Gemma's sqrt(d_model) scale lives in
  its embedding module (``Gemma2ScaledWordEmbedding``), so calling that module applies it;
- **call a block**: which keyword arguments the block takes (mask, position ids, rotary position embeddings)
  and which attention mask each layer needs (full or sliding window, from ``config.layer_types``); GPT-NeoX's
  parallel attention lives inside its layer, so calling the layer is enough;
- **finish**: final norm, unembedding and, where the config sets it, Gemma-2's final logit soft-capping.

Every architecture not in :data:`FAMILIES` goes through :class:`fis_interventions.splice.BridgeHookPath`:
full forward passes through the bridge with a hook that writes the residual (correct, slower).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch

ROTARY = ("attention_mask", "position_ids", "position_embeddings")


def _every_pair(batch_idx: torch.Tensor, head_idx: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
                ) -> torch.Tensor:
    """A mask function that masks nothing (every index is >= 0): AND-ed with the causal mask it changes no value."""
    return kv_idx >= 0


@functools.lru_cache(maxsize=4)
def _no_causal_skip(maker: Any) -> dict[str, Any]:
    """The keyword that makes ``maker`` always materialise the mask: ``allow_is_causal_skip=False`` where the
    installed transformers has it (newer than 5.9, the lowest version allowed); in 5.9 an ``and_mask_function``
    that masks nothing, which also turns the skip off (the skip check reads the padding mask on the host: one
    more host sync per batch on a GPU, ``tests/test_gpu.py`` counts them)."""
    params = inspect.signature(maker).parameters
    if "allow_is_causal_skip" in params:
        return {"allow_is_causal_skip": False}
    return {"and_mask_function": _every_pair} if "and_mask_function" in params else {}


@dataclass(frozen=True)
class Family:
    """Where a family keeps its parts (attribute names) and what its blocks are called with."""

    name: str
    architectures: tuple[str, ...]  # HF class names (``config.architectures`` / ``type(model).__name__``)
    base: str  # the decoder inside the causal-LM wrapper
    embed: str  # token embedding, inside ``base``
    layers: str
    norm: str
    # the unembedding on the causal-LM wrapper; the first name present wins (a family renamed it across the
    # transformers versions allowed: GPT-NeoX's is ``embed_out`` in 5.9, ``lm_head`` in 5.25)
    heads: tuple[str, ...] = ("lm_head",)
    pos_embed: str | None = None  # learned absolute position embedding (GPT-2)
    rotary: str | None = "rotary_emb"
    block_kwargs: tuple[str, ...] = ROTARY
    notes: str = ""


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("LlamaForCausalLM", "MistralForCausalLM"), "model", "embed_tokens", "layers", "norm",
           notes="rotary, RMSNorm (also Mistral, SmolLM)"),
    Family("qwen2", ("Qwen2ForCausalLM",), "model", "embed_tokens", "layers", "norm",
           notes="rotary, optional sliding-window layers"),
    Family("gemma2", ("Gemma2ForCausalLM",), "model", "embed_tokens", "layers", "norm",
           notes="rotary, sqrt(d_model) embedding scale, alternating sliding/full attention, logit soft-capping"),
    Family("phi3", ("Phi3ForCausalLM",), "model", "embed_tokens", "layers", "norm",
           notes="rotary, fused qkv, optional sliding window"),
    Family("gpt2", ("GPT2LMHeadModel",), "transformer", "wte", "h", "ln_f", pos_embed="wpe", rotary=None,
           block_kwargs=("attention_mask",), notes="learned absolute positions, LayerNorm"),
    Family("gpt_neox", ("GPTNeoXForCausalLM",), "gpt_neox", "embed_in", "layers", "final_layer_norm",
           heads=("lm_head", "embed_out"), notes="rotary, parallel attention + MLP (Pythia)"),
)
_BY_ARCH = {arch: fam for fam in FAMILIES for arch in fam.architectures}


def head_name(hf_model: Any, family: Family) -> str | None:
    """Which of the family's unembedding names this model has (None: none of them, so no fast path)."""
    return next((n for n in family.heads if hasattr(hf_model, n)), None)


def family_for(hf_model: Any) -> Family | None:
    """The registered family of an HF causal LM, or None (then the generic bridge-hook path is used)."""
    fam = _BY_ARCH.get(type(hf_model).__name__)
    if fam is None or head_name(hf_model, fam) is None:
        return None
    parts = [(hf_model, fam.base)]
    base = getattr(hf_model, fam.base, None)
    parts += [(base, n) for n in (fam.embed, fam.layers, fam.norm, fam.pos_embed, fam.rotary) if n]
    return fam if all(obj is not None and hasattr(obj, n) for obj, n in parts) else None


def segment_mask(segments: torch.Tensor) -> Any:
    """A mask function for packed rows: position ``kv`` is visible to ``q`` when it is shared (segment 0: the
    rows' common prefix) or in ``q``'s own segment (its row's tail). AND-ed with the causal mask, each tail sees
    the shared prefix and itself, as its row alone would."""
    def visible(batch_idx: torch.Tensor, head_idx: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
                ) -> torch.Tensor:
        kv = segments[batch_idx, kv_idx]
        return (kv == 0) | (kv == segments[batch_idx, q_idx])
    return visible


def _mask_kind(config: Any, layer: int) -> str:
    """Which mask a layer attends with: the config's ``layer_types`` if present, else the global sliding window."""
    types = getattr(config, "layer_types", None)
    if types:
        return str(types[layer])
    return "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"


class FamilyAdapter:
    """Embed / call a block / finish for one registered family, on one HF model."""

    def __init__(self, hf_model: Any, family: Family) -> None:
        self.hf = hf_model
        self.family = family
        self.config = hf_model.config
        self.base = getattr(hf_model, family.base)
        self.head = getattr(hf_model, head_name(hf_model, family) or family.heads[0])
        self.layers = getattr(self.base, family.layers)
        self.n_layers = len(self.layers)
        self.kinds = [_mask_kind(self.config, i) for i in range(self.n_layers)]

    @property
    def device(self) -> torch.device:
        return getattr(self.base, self.family.embed).weight.device

    def embed(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        hidden = getattr(self.base, self.family.embed)(tokens)
        if self.family.pos_embed:
            hidden = hidden + getattr(self.base, self.family.pos_embed)(position_ids).to(hidden.device)
        return hidden

    def masks(self, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
              and_mask: Any = None) -> dict[str, Any]:
        """The attention masks the layers need, built as the HF model builds them, always materialised.

        Never skipped (:func:`_no_causal_skip`): with sdpa attention (what ``from_pretrained`` gives the real model)
        HF otherwise checks on the host whether the padding mask is all ones to skip the mask (``is_causal``):
        host syncs per batch on a GPU, for a mask that is identical in value."""
        from transformers import masking_utils

        makers = {"full_attention": masking_utils.create_causal_mask,
                  "sliding_attention": masking_utils.create_sliding_window_causal_mask}
        def extra(maker: Any) -> dict[str, Any]:
            kw = dict(_no_causal_skip(maker))
            if and_mask is not None:  # (any and-mask also turns 5.9's skip off, as _every_pair does)
                kw["and_mask_function"] = and_mask
            return kw

        return {kind: makers[kind](self.config, embeds, attention_mask, None, position_ids=position_ids,
                                   **extra(makers[kind]))
                for kind in sorted(set(self.kinds))}

    def packable(self, width: int) -> bool:
        """Whether a packed sequence of ``width`` positions attends as its rows would: sliding-window layers count
        distances in sequence positions, which packing stretches, so only where the window covers the width."""
        window = getattr(self.config, "sliding_window", None)
        return all(k == "full_attention" for k in self.kinds) or (window is not None and width <= int(window))

    def position_embeddings(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> Any:
        if not self.family.rotary:
            return None
        return getattr(self.base, self.family.rotary)(embeds, position_ids=position_ids)

    def block(self, i: int, hidden: torch.Tensor, masks: dict[str, Any], position_ids: torch.Tensor,
              position_embeddings: Any) -> torch.Tensor:
        given = {"attention_mask": masks[self.kinds[i]], "position_ids": position_ids,
                 "position_embeddings": position_embeddings}
        out = self.layers[i](hidden, use_cache=False, **{k: given[k] for k in self.family.block_kwargs})
        return out[0] if isinstance(out, tuple) else out

    def finish(self, hidden: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``hidden``; with ``vocab`` (token ids) only those columns, [..., len(vocab)]: a readout that
        scores raw logits needs a few columns of the unembedding, not all of them (the attribution screen's
        suffix, forward and backward, would otherwise spend ~10% of its time on the rest)."""
        normed = getattr(self.base, self.family.norm)(hidden)
        head = self.head
        if vocab is None:
            logits = head(normed)
        else:
            linear = getattr(head, "original_component", head)  # the bridge's unembedding calls this Linear
            bias = linear.bias.index_select(0, vocab) if linear.bias is not None else None
            logits = torch.nn.functional.linear(normed, linear.weight.index_select(0, vocab), bias)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


def split_path_name(hf_model: Any) -> str:
    """``fast:<family>`` or ``generic`` (what `fis model info` and ``run.json`` report)."""
    fam = family_for(hf_model)
    return f"fast:{fam.name}" if fam else "generic"
