"""Where a feature writes: its output direction in the residual stream, read through the logit lens.

Why a module of its own: the three clampable points of the joint SAE reach the residual stream by different
routes, and a card must say exactly which one. Every route is linear in the feature's value (no nonlinearity
sits between these points and the residual), so "the output direction" is exact, not a first-order guess:

- ``sae.hook_latents`` latent i: the SAE reconstruction changes by ``delta * W_dec[i]``.
- ``nfm.hook_hidden`` unit h: the hidden layer feeds only ``mlp_out`` (dropout is the identity in eval), so
  the interaction term changes by ``delta * mlp_out.weight[:, h]``.
- ``secondary.hook_latents`` latent j: an edit adds ``delta * W_dec_sec[j]`` to the NFM hidden layer (the
  error-term splice of :meth:`JointSAE._through_secondary`), which then goes through ``mlp_out`` only:
  ``delta * mlp_out.weight @ W_dec_sec[j]``.

The joint model works in normalised units; the splice adds ``Normalizer.invert_delta`` of the change to the
residual (``/ scale`` for expected-norm, ``* std`` per dimension for z-score), and so do we. Tests check each
direction against the residual change of a real ``add`` clamp through :class:`~fis_interventions.splice.JointSplice`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import FisError

CARD_POINTS: tuple[str, ...] = ("sae.hook_latents", "nfm.hook_hidden", "secondary.hook_latents")
INTEGRATION_POINTS: tuple[str, ...] = ("nfm.hook_hidden", "secondary.hook_latents")

DERIVATION = {
    "sae.hook_latents": (
        "Decoder row: raising latent i by delta changes the SAE reconstruction by delta * W_dec[i] (normalised "
        "units); the splice maps that change to the residual with the normaliser's inverse (invert_delta). In a "
        "joint model the latent also feeds the linear part (delta * W_lin[i], see `linear_part`) and the "
        "bi-interaction; the card's direction is the decoder row alone."),
    "nfm.hook_hidden": (
        "NFM hidden unit h feeds only the output layer of the NFM (dropout is off in eval): raising it by delta "
        "adds delta * mlp_out.weight[:, h] to the interaction term, which is added to the reconstruction; the "
        "splice maps the change to the residual with the normaliser's inverse (invert_delta). Exactly linear."),
    "secondary.hook_latents": (
        "Secondary-SAE latent j: an edit adds delta * W_dec_sec[j] to the NFM hidden layer (error-term splice: "
        "hidden + decode(edited) - decode(original)); the hidden layer feeds only the NFM output layer, so the "
        "interaction term changes by delta * mlp_out.weight @ W_dec_sec[j]; the splice maps that to the "
        "residual with the normaliser's inverse (invert_delta). Exactly linear: no ReLU after the secondary SAE."),
}

LENS_DEFINITION = (
    "logit lens of the direction d: the model's own final norm applied to d alone, then the unembedding matrix "
    "without its bias: W_U norm(d). A norm is scale-invariant, so the ranking does not depend on |d|; the values "
    "are the logits a residual pointing exactly along d would give.")


def point_width(joint: Any, point: str) -> int:
    """Number of features at a card point of this checkpoint; a one-line error for any other point."""
    if point not in CARD_POINTS:
        raise FisError(f"unknown feature point {point!r}", field="point", fix=f"use one of: {', '.join(CARD_POINTS)}")
    if point == "sae.hook_latents":
        return int(joint.sae.d_sae)
    if joint.nfm is None:
        raise FisError(f"point {point!r} needs the integration module; this checkpoint is a plain SAE",
                       field="point", fix="use sae.hook_latents")
    if point == "nfm.hook_hidden":
        return int(joint.nfm.mlp_in.out_features)
    if joint.secondary is None:
        raise FisError(f"point {point!r} is not in this checkpoint (no secondary SAE)", field="point",
                       fix="use sae.hook_latents or nfm.hook_hidden")
    return int(joint.secondary.d_sae)


def check_ids(joint: Any, point: str, ids: list[int]) -> None:
    """Refuse an empty list, negative or out-of-range ids in one line."""
    width = point_width(joint, point)
    if not ids:
        raise FisError("no feature ids given", field="ids", fix="pass e.g. --ids 60,218")
    bad = [i for i in ids if not 0 <= i < width]
    if bad:
        raise FisError(f"feature {bad[0]} is out of range for {point} (width {width})", field="ids",
                       fix=f"use ids in 0..{width - 1}")


@torch.no_grad()
def normalised_directions(joint: Any, point: str, ids: list[int]) -> torch.Tensor:
    """[n, d_in] change of the joint model's reconstruction per unit of each feature (normalised units)."""
    idx = torch.as_tensor(ids, dtype=torch.long, device=joint.sae.W_dec.device)
    if point == "sae.hook_latents":
        return joint.sae.W_dec[idx].float()
    w_out = joint.nfm.mlp_out.weight.float()  # [d_in, hidden]
    if point == "nfm.hook_hidden":
        return w_out[:, idx].T
    return joint.secondary.W_dec[idx].float() @ w_out.T


def residual_directions(joint: Any, normalizer: Any, point: str, ids: list[int]) -> torch.Tensor:
    """[n, d_model] change of the residual stream per unit of each feature (see module docstring)."""
    return normalizer.invert_delta(normalised_directions(joint, point, ids))


def lens_modules(bridge: Any) -> tuple[torch.nn.Module, torch.Tensor]:
    """(final norm module, unembedding weight [vocab, d_model]) of a Llama-family or GPT-2-style HF model."""
    from ..models import hf_model_of

    hf = hf_model_of(bridge)
    unembed = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    inner = getattr(hf, "model", None) or getattr(hf, "transformer", None)
    norm = getattr(inner, "norm", None) or getattr(inner, "ln_f", None) or getattr(inner, "final_layernorm", None)
    if unembed is None or norm is None:
        raise FisError(f"cannot find the final norm and unembedding of {type(hf).__name__}", field="model",
                       fix="use a Llama/Mistral/Qwen2-family or GPT-2-style model")
    return norm, unembed.weight


@torch.no_grad()
def logit_lens(bridge: Any, directions: torch.Tensor) -> torch.Tensor:
    """[n, vocab] logits of each direction: ``W_U norm(d)`` with the model's final norm (see LENS_DEFINITION)."""
    norm, w_u = lens_modules(bridge)
    d = directions.to(w_u.device, w_u.dtype)
    return (norm(d.unsqueeze(0)).squeeze(0) @ w_u.T).float().cpu()


def token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token id decoded on its own (leading spaces kept), so a card shows what the model sees."""
    return [tokenizer.decode([int(i)]) for i in ids]


def top_tokens(logits: torch.Tensor, tokenizer: Any, n: int = 10) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The n most promoted and n most suppressed tokens of one lens row, with their logits."""
    n = min(n, logits.numel())
    up = torch.topk(logits, n)
    down = torch.topk(-logits, n)

    def rows(values: torch.Tensor, idx: torch.Tensor) -> list[dict[str, Any]]:
        ids = idx.tolist()
        return [{"token_id": i, "token": t, "logit": float(v)}
                for i, t, v in zip(ids, token_texts(tokenizer, ids), values.tolist())]

    return rows(up.values, up.indices), rows(-down.values, down.indices)
