"""Which pairs of SAE latents drive an integration feature: exact per-token decomposition of its pre-activation.

The NFM's bi-interaction is ``bi = sum_{a<b} f_a f_b (v_a * v_b)`` over the active latents (elementwise
product of embedding rows ``V``), and hidden unit h has pre-activation ``c_h + w_h . bi`` (``w_h`` a row of
``mlp_in``). So on one token

    pre_h = c_h + sum_{a<b} f_a f_b * sum_e u_e V[a, e] V[b, e]      with u = w_h,

an exact sum over pairs. A secondary-SAE latent j reads the post-ReLU hidden layer linearly
(``pre_j = b_j + sum_h W_enc[h, j] hidden_h``); on a token the ReLU gates are fixed, so the same identity holds
with ``u = sum_{h on} W_enc[h, j] w_h`` and a constant that collects the biases of the gated-on units.

Weights alone do not say which pairs matter: most pairs never co-occur. The card therefore averages each
pair's contribution ``f_a f_b u.(v_a*v_b)`` over the tokens where the feature fires most (its top contexts'
firing tokens), and reports it with its share of the mean pre-activation and how often the pair is present;
for an NFM unit the weight-only coupling ``u.(v_a*v_b)`` is given too.
"""

from __future__ import annotations

from typing import Any

import torch

DEFINITION = {
    "nfm.hook_hidden": (
        "pre-activation of hidden unit h on a token = mlp_in.bias[h] + sum over active latent pairs a<b of "
        "f_a f_b * sum_e mlp_in.weight[h, e] V[a, e] V[b, e] (exact: the bi-interaction is a sum over pairs). "
        "contribution = that pair term, averaged over the feature's top-activating tokens (0 where the pair is "
        "absent); share = contribution / mean pre-activation over the same tokens; weight = the coupling "
        "sum_e mlp_in.weight[h, e] V[a, e] V[b, e] without the activations."),
    "secondary.hook_latents": (
        "pre-activation of secondary latent j on a token = b_j + sum_h W_enc_sec[h, j] hidden_h, and with the "
        "token's NFM ReLU gates fixed, hidden_h = mlp_in.bias[h] + sum over active latent pairs a<b of "
        "f_a f_b * sum_e mlp_in.weight[h, e] V[a, e] V[b, e] for the units that are on; so pre_j = constant + "
        "sum over pairs of f_a f_b * sum_e u_e V[a, e] V[b, e] with u = sum_{h on} W_enc_sec[h, j] "
        "mlp_in.weight[h] (exact per token). contribution = that pair term averaged over the feature's "
        "top-activating tokens (0 where absent); share = contribution / mean pre-activation."),
}


@torch.no_grad()
def pair_contributions(joint: Any, point: str, index: int, code_val: torch.Tensor, code_idx: torch.Tensor,
                       gates: torch.Tensor, n_pairs: int = 10) -> dict[str, Any]:
    """Top pairs of one integration feature over the given tokens (rows of ``code_*``/``gates``).

    Returns ``{"pairs": [...], "constant_mean", "preactivation_mean", "n_tokens"}``; ``preactivation_mean`` is
    the mean of ``constant + sum of all pair terms``, which equals the feature's pre-activation (tested).
    """
    nfm = joint.nfm
    V = nfm.V.detach().float().cpu()
    w_in = nfm.mlp_in.weight.detach().float().cpu()  # [hidden, emb]
    b_in = nfm.mlp_in.bias.detach().float().cpu()
    n = code_val.shape[0]
    if point == "nfm.hook_hidden":
        u = w_in[index].expand(n, -1)
        const = b_in[index].expand(n)
    else:
        sec = joint.secondary
        w = sec.W_enc.detach().float().cpu()[:, index]  # [hidden]
        g = gates.float() * w
        u = g @ w_in
        const = (sec.b_enc.detach().float().cpu()[index] - sec.b_dec.detach().float().cpu() @ w) + g @ b_in
    F = code_val.float().unsqueeze(-1) * V[code_idx]  # [n, k, emb]
    M = torch.einsum("nae,ne,nbe->nab", F, u, F)  # pair terms
    k = code_idx.shape[1]
    a_i, b_i = torch.triu_indices(k, k, offset=1)
    terms = M[:, a_i, b_i]  # [n, pairs]
    present = (code_val[:, a_i] != 0) & (code_val[:, b_i] != 0)
    lo = torch.minimum(code_idx[:, a_i], code_idx[:, b_i])
    hi = torch.maximum(code_idx[:, a_i], code_idx[:, b_i])
    key = (lo * joint.sae.d_sae + hi)[present]
    uniq, inv = torch.unique(key, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, terms[present].double())
    counts = torch.bincount(inv, minlength=len(uniq))
    pre = const.double() + (terms * present).double().sum(1)
    pre_mean = float(pre.mean()) if n else 0.0
    order = torch.argsort(sums, descending=True)[:n_pairs]
    pairs = []
    for j in order[sums[order] > 0].tolist():  # the pairs that drive it up; a zero-coupling pair is no driver
        a, b = divmod(int(uniq[j]), joint.sae.d_sae)
        mean = float(sums[j]) / max(n, 1)
        row = {"latents": [a, b], "contribution": mean, "share": mean / pre_mean if pre_mean else None,
               "tokens_present": int(counts[j]), "tokens": n}
        if point == "nfm.hook_hidden":
            row["weight"] = float((w_in[index] * V[a] * V[b]).sum())
        pairs.append(row)
    return {"pairs": pairs, "constant_mean": float(const.double().mean()) if n else 0.0,
            "preactivation_mean": pre_mean, "n_tokens": n, "preactivation": pre.float()}
