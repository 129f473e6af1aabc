"""Feature cards for 10 features over a 300k-token harvest: one pass, bounded memory (target < 60 s, 2 cores).

Writes a synthetic harvest in the real shard format (SmolLM2 width: d_model 576, 128-token contexts, 64
contexts per shard, float32; activations = sparse sums of a random dictionary + noise, random token ids) and a
random-init joint checkpoint of the demo's shape at 8x (d_sae 4608, k 32, NFM 64/64, secondary 256, k 8), then
times :func:`fis_interventions.cards.build_cards` for 4 SAE latents, 3 NFM units and 3 secondary latents with
the real default model for the logit lens (loaded once, timed apart). ``--split all`` (default) encodes every
harvested token, the worst case; the held-out split reads a tenth of the rows.

    python bench/cards.py                       # 300k tokens, 10 features, 2 threads
    python bench/cards.py --tokens 60000 --split heldout
"""

from __future__ import annotations

import argparse
import math
import resource
import tempfile
import time
from pathlib import Path

import torch

D_MODEL, CTX_LEN, PER_SHARD = 576, 128, 64
MODEL, HOOK = "smollm2-135m", "blocks.14.hook_resid_post"


def write_harvest(folder: Path, tokens: int, seed: int = 0) -> int:
    """Harvest-format shards with real-looking structure; returns the number of kept tokens."""
    from fis_interventions.activations import ExclusionRule, Normalizer
    from fis_interventions.activations.shards import new_manifest, shard_name, write_manifest, write_shard

    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(2048, D_MODEL, generator=g) * 3.0
    n_ctx = math.ceil(tokens / CTX_LEN)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = new_manifest(model=MODEL, hook=HOOK, hook_canonical="blocks.14.hook_out", d_model=D_MODEL,
                            context_length=CTX_LEN, exclusion=ExclusionRule([0, 1, 2], None).to_dict())
    norm_sum = count = 0.0
    for s, start in enumerate(range(0, n_ctx, PER_SHARD)):
        n = min(PER_SHARD, n_ctx - start)
        toks = torch.randint(3, 49152, (n, CTX_LEN), generator=g)
        toks[:, 0] = 1  # BOS, excluded as in a real harvest
        keep = toks != 1
        idx = torch.randint(0, 2048, (int(keep.sum()), 16), generator=g)
        acts = torch.nn.functional.embedding_bag(idx, dictionary, mode="sum")
        acts += 0.5 * torch.randn(acts.shape, generator=g)
        norm_sum += float(acts.norm(dim=-1).sum())
        count += len(acts)
        digest = write_shard(folder, s, acts, toks, keep, torch.arange(start, start + n))
        manifest["shards"].append({"file": shard_name(s), "n_contexts": n, "n_tokens": len(acts), "sha256": digest})
        manifest["token_count"] += len(acts)
    manifest["normalization"] = Normalizer("expected_norm", scale=D_MODEL**0.5 / (norm_sum / count)).to_dict()
    manifest["complete"] = True
    write_manifest(folder, manifest)
    return int(count)


def write_checkpoint(path: Path, harvest: Path) -> Path:
    from fis_interventions.activations.shards import read_manifest
    from fis_interventions.sae import JointArch, JointSAE, NFMArch, SAEArch, save_checkpoint

    torch.manual_seed(0)
    joint = JointSAE(JointArch(sae=SAEArch(d_in=D_MODEL, d_sae=8 * D_MODEL, k=32), nfm=NFMArch(emb_dim=64, hidden=64)))
    joint.attach_secondary(256, 8)
    with torch.no_grad():
        joint.nfm.mlp_out.weight.normal_(0, 0.05)  # zero at init: give the NFM an output direction
    m = read_manifest(harvest)
    norm = {**m["normalization"], "exclusion": m["exclusion"], "activations": str(harvest)}
    return save_checkpoint(path, joint, model_name=MODEL, hook=HOOK, normalization=norm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=300_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--split", default="all", choices=["all", "heldout", "train"])
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=2048)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fis_interventions.cards import FeatureKey, build_cards
    from fis_interventions.models import load_model

    a, b = torch.randn(2048, D_MODEL), torch.randn(D_MODEL, 8 * D_MODEL)
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    gflops = 5 * 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - t) / 1e9

    with tempfile.TemporaryDirectory(prefix="fis-bench-cards-") as tmp:
        t = time.perf_counter()
        n = write_harvest(Path(tmp) / "harvest", args.tokens)
        ckpt = write_checkpoint(Path(tmp) / "ckpt", Path(tmp) / "harvest")
        size = sum(p.stat().st_size for p in (Path(tmp) / "harvest").iterdir()) / 2**20
        n_shards = len(list((Path(tmp) / "harvest").glob("shard_*")))
        print(f"synthetic harvest: {n} kept tokens, {size:.0f} MiB in {n_shards} shards "
              f"(written in {time.perf_counter() - t:.1f} s)")
        t = time.perf_counter()
        bridge = load_model(MODEL, device="cpu")
        load_s = time.perf_counter() - t
        keys = ([FeatureKey("sae.hook_latents", i) for i in (3, 60, 218, 4000)]
                + [FeatureKey("nfm.hook_hidden", i) for i in (0, 17, 63)]
                + [FeatureKey("secondary.hook_latents", i) for i in (5, 140, 255)])
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        t = time.perf_counter()
        cards = build_cards(ckpt, keys, top=args.top, split=args.split, bridge=bridge, batch_size=args.batch_size)
        cards_s = time.perf_counter() - t
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    scanned = cards[0]["harvest"]["tokens"]
    floor = scanned * 2 * D_MODEL * 8 * D_MODEL / (gflops * 1e9)
    print(f"dense matmul measured at {gflops:.1f} GFLOP/s now: the SAE encoder alone needs {floor:.1f} s for "
          f"{scanned} tokens (the floor of any implementation on this machine, now)")
    print(f"model load (once, for the logit lens): {load_s:.1f} s")
    print(f"cards for {len(cards)} features, split {args.split}: {cards_s:.1f} s for {scanned} tokens scanned "
          f"({scanned / cards_s:.0f} tokens/s, {args.threads} threads); target < 60 s: "
          f"{'met' if cards_s < 60 else 'NOT met'} ({cards_s / 60:.2f}x the budget)")
    print(f"peak RSS {rss1:.2f} GB (before the cards {rss0:.2f} GB: model + harvest writer); harvest {size:.0f} MiB")
    for c in cards:
        print(f"  {c['point']:24s} {c['feature']:5d} freq {c['activation']['frequency']:.4f} "
              f"top {len(c['top_contexts'])} contexts, pairs {len((c['integration'] or {}).get('pairs', []))}")


if __name__ == "__main__":
    main()
