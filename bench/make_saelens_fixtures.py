"""Regenerate tests/data/saelens/: small SAE folders written by SAELens itself, with SAELens' own outputs.

Run in the SAELens venv (``make -C bench saelens-venv``), never in the project's venv:

    bench/.venv-saelens/bin/python bench/make_saelens_fixtures.py

For each architecture (``standard`` with ``apply_b_dec_to_input: false``, ``topk`` with
``rescale_acts_by_decoder_norm: true``, ``jumprelu`` at a ``hook_resid_pre``) a seeded random SAE with
d_in 64 (the tiny test models' d_model) and d_sae 128 is saved with ``SAE.save_model``; ``expected.safetensors``
holds fixed inputs ``x`` and what SAELens computed: ``latents = sae.encode(x)`` and ``recon = sae.decode(latents)``.
The project's loader must reproduce them (tests/test_saelens.py); the fixtures test SAELens, not our reading of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import sae_lens
import torch
from safetensors.torch import save_file
from sae_lens import SAE, JumpReLUSAEConfig, StandardSAEConfig, TopKSAEConfig

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "saelens"
D_IN, D_SAE = 64, 128


def _meta(hook: str) -> dict:
    return {"model_name": "tiny-gpt2", "hook_name": hook, "context_size": 32, "prepend_bos": True}


def configs() -> dict[str, object]:
    from sae_lens.saes.sae import SAEMetadata

    return {
        "standard": StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False,
                                      metadata=SAEMetadata(**_meta("blocks.1.hook_resid_post"))),
        "topk": TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=8, rescale_acts_by_decoder_norm=True,
                              metadata=SAEMetadata(**_meta("blocks.1.hook_resid_post"))),
        "jumprelu": JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE,
                                      metadata=SAEMetadata(**_meta("blocks.2.hook_resid_pre"))),
    }


def main() -> None:
    for i, (arch, cfg) in enumerate(configs().items()):
        torch.manual_seed(100 + i)
        sae = SAE.from_dict(cfg.to_dict())
        with torch.no_grad():  # random but not degenerate: non-zero biases, uneven decoder norms, thresholds
            sae.W_enc.normal_(0, 0.2)
            sae.W_dec.normal_(0, 0.2)
            sae.b_enc.normal_(0, 0.1)
            sae.b_dec.normal_(0, 0.1)
            if arch == "jumprelu":
                sae.threshold.uniform_(0.05, 0.3)
        folder = OUT / arch
        sae.save_model(folder)
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(16, D_IN, generator=gen) * 2.0
        with torch.no_grad():
            latents = sae.encode(x)
            recon = sae.decode(latents)
        save_file({"x": x, "latents": latents.contiguous(), "recon": recon.contiguous()},
                  str(folder / "expected.safetensors"))
        (folder / "provenance.json").write_text(json.dumps(
            {"sae_lens": sae_lens.__version__, "torch": torch.__version__, "script": "bench/make_saelens_fixtures.py",
             "l0_mean": float((latents != 0).float().sum(-1).mean())}, indent=2) + "\n")
        print(f"{arch:9} -> {folder} (mean L0 {float((latents != 0).float().sum(-1).mean()):.1f})")


if __name__ == "__main__":
    main()
