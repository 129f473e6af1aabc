"""`fis export --format saelens` checked against SAELens itself: load the folder, compare encode/decode.

Two steps in two venvs (SAELens pins transformer-lens < 4, the project needs >= 4.3):

    python bench/saelens_roundtrip.py write DIR          # project venv: a seeded TopK SAE checkpoint, exported,
                                                         #   plus our encode/decode on fixed raw inputs
    bench/.venv-saelens/bin/python bench/saelens_roundtrip.py check DIR   # SAE.load_from_disk + compare

The exported SAE folds our ``expected_norm`` input scale into its weights, so SAELens sees raw activations.
Prints the max absolute differences and exits 1 if either exceeds 1e-5 (relative to the values' scale).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TOL = 1e-5


def write(folder: Path) -> None:
    from fis_interventions.sae import JointArch, JointSAE, NFMArch, SAEArch, save_checkpoint
    from fis_interventions.sae.saelens import export

    torch.manual_seed(0)
    joint = JointSAE(JointArch(sae=SAEArch(d_in=96, d_sae=384, k=12), nfm=NFMArch(emb_dim=8, hidden=8)))
    with torch.no_grad():
        joint.sae.b_enc.normal_(0, 0.05)
        joint.sae.b_dec.normal_(0, 0.3)
    scale = 0.125
    norm = {"kind": "expected_norm", "scale": scale, "mean": None, "std": None}
    ckpt = save_checkpoint(folder / "checkpoint", joint, model_name="bench", hook="blocks.3.hook_resid_post",
                           normalization=norm)
    export(ckpt, folder / "saelens")
    x = torch.randn(256, 96, generator=torch.Generator().manual_seed(1)) * 10
    with torch.no_grad():
        out = joint(x * scale, "sae")
    save_file({"x": x, "latents": out.latents.dense().contiguous(), "recon": (out.recon / scale).contiguous()},
              str(folder / "ours.safetensors"))
    print(f"wrote {folder / 'saelens'} and {folder / 'ours.safetensors'} (joint model's SAE, scale {scale})")


def check(folder: Path) -> int:
    import sae_lens
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(folder / "saelens"))
    ours = load_file(str(folder / "ours.safetensors"))
    with torch.no_grad():
        latents = sae.encode(ours["x"])
        recon = sae.decode(latents)
        recon_of_ours = sae.decode(ours["latents"])
    d_lat = float((latents - ours["latents"]).abs().max() / ours["latents"].abs().max().clamp_min(1))
    d_rec = float((recon - ours["recon"]).abs().max() / ours["recon"].abs().max().clamp_min(1))
    d_dec = float((recon_of_ours - ours["recon"]).abs().max() / ours["recon"].abs().max().clamp_min(1))
    same_support = bool(((latents != 0) == (ours["latents"] != 0)).all())
    print(f"sae-lens {sae_lens.__version__}: loaded {type(sae).__name__} k={sae.cfg.k} d_in={sae.cfg.d_in} "
          f"d_sae={sae.cfg.d_sae} hook={sae.cfg.metadata.hook_name}")
    print(f"encode: max rel diff {d_lat:.2e}, same active latents: {same_support}")
    print(f"decode(encode(x)): max rel diff {d_rec:.2e}; decode(our latents): {d_dec:.2e} (tolerance {TOL:g})")
    ok = same_support and max(d_lat, d_rec, d_dec) <= TOL
    print("round trip OK" if ok else "round trip FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "check"):
        sys.exit(__doc__)
    target = Path(sys.argv[2])
    if sys.argv[1] == "write":
        write(target)
    else:
        sys.exit(check(target))
