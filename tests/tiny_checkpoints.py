"""Small saved checkpoints the battery tests clamp (a helper module, not a test file)."""

from __future__ import annotations

from pathlib import Path


def save_tiny_joint_checkpoint(path: Path, tokenizer, seed: int, hook: str = "blocks.1.hook_resid_post") -> Path:
    """A random joint SAE (64 -> 128 latents, k 8, NFM 16/32, secondary 64 k 4) saved as a checkpoint of
    ``tiny-random`` at ``hook``, with an expected-norm scale of 0.5: what the battery tests clamp."""
    import torch

    from fis_interventions.activations import ExclusionRule, Normalizer
    from fis_interventions.sae import JointArch, JointSAE, NFMArch, SAEArch, save_checkpoint

    torch.manual_seed(seed)
    joint = JointSAE(JointArch(sae=SAEArch(d_in=64, d_sae=128, k=8), nfm=NFMArch(emb_dim=16, hidden=32)))
    joint.attach_secondary(64, 4)
    norm = {**Normalizer("expected_norm", scale=0.5).to_dict(),
            "exclusion": ExclusionRule.for_tokenizer(tokenizer, norm_multiple=None).to_dict()}
    return save_checkpoint(path, joint, model_name="tiny-random", hook=hook, normalization=norm)
