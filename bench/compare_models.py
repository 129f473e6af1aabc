"""The fair comparison of issue 3 on one harvest folder: standalone SAE, parameter-matched wide SAE,
unconstrained-decoder SAE, least-squares-refit SAE, sequential and joint models, all with the same token
budget, evaluated on the same held-out contexts (`fis eval`), written to OUT/compare.json and printed.

    python bench/compare_models.py --activations runs/demo/activations --out runs/compare [--steps 300]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from fis_interventions.activations import ActivationStore
from fis_interventions.evaluation import evaluate_many
from fis_interventions.sae import JointSAE, TrainConfig
from fis_interventions.sae.metrics import param_counts
from fis_interventions.training import refit, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--activations", required=True)
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-contexts", type=int, default=32)
    args = ap.parse_args()
    out = Path(args.out)
    d = ActivationStore(Path(args.activations)).d_model
    base = dict(activations=str(Path(args.activations).resolve()), expansion=args.expansion, k=args.k,
                batch_size=args.batch_size, tokens=args.batch_size * args.steps, lr=4e-4, warmup_steps=20,
                lr_decay_to=0.1, grad_clip=1.0, eval_every=100, checkpoint_every=1000, heldout_fraction=0.1,
                seed=args.seed, emb_dim=64, hidden=64)
    joint_params = param_counts(JointSAE(TrainConfig(**{**base, "mode": "joint"}).arch(d)))
    matched = joint_params["sae"] + joint_params["linear"] + joint_params["interaction"]
    wide_d_sae = round((matched - d) / (2 * d + 1))  # a TopK SAE has 2*d*d_sae + d_sae + d parameters
    configs = {
        "sae": {**base, "mode": "sae"},
        "wide": {**{k: v for k, v in base.items() if k != "expansion"}, "d_sae": wide_d_sae, "mode": "sae"},
        "unconstrained": {**base, "mode": "sae", "normalize_decoder": False},
        "joint": {**base, "mode": "joint"},
    }
    ckpts = {}
    for name, cfg in configs.items():
        (out / f"{name}.yaml").parent.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        run = out / name
        ckpts[name] = train(out / f"{name}.yaml", run, resume=(run / "checkpoint" / "cfg.json").exists()).checkpoint
    ckpts["refit"] = refit(ckpts["sae"], out / "refit")
    seq = {**base, "mode": "sequential", "sae_checkpoint": str(ckpts["sae"])}
    (out / "sequential.yaml").write_text(yaml.safe_dump(seq, sort_keys=False))
    run = out / "sequential"
    ckpts["sequential"] = train(out / "sequential.yaml", run,
                                resume=(run / "checkpoint" / "cfg.json").exists()).checkpoint
    order = ["sae", "wide", "unconstrained", "refit", "sequential", "joint"]
    _, text = evaluate_many([ckpts[n] for n in order], json_out=out / "compare.json",
                            max_contexts=args.max_contexts, seed=args.seed)
    print(f"parameter-matched wide SAE: d_sae {wide_d_sae} (joint without secondary: {matched} parameters)")
    print(text)


if __name__ == "__main__":
    main()
