"""Peak memory of `fis train` on a shard set larger than the memory it is allowed: training must stream.

Writes ``--gb`` of synthetic float32 activations as harvest-format shards (+ manifest) into a temporary
folder, trains one pass over them in a child process and reports that process's peak RSS
(``getrusage(RUSAGE_CHILDREN).ru_maxrss``) against ``--limit-gb``. The child also reports its RSS right after
importing torch and the toolkit, so the cost of the data path is visible on its own.

    python bench/memory.py                      # 0.5 GB of shards, limit 1.5 GB (a few minutes on 2 cores)
    python bench/memory.py --gb 2 --limit-gb 1.5  # the documented run: data larger than the limit
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

D_MODEL, CTX_LEN = 576, 64


def write_shards(folder: Path, gb: float, shard_mb: int, seed: int = 0) -> int:
    """Synthetic activations (sparse features + noise) in shards of about ``shard_mb``; returns the token count."""
    from fis_interventions.activations.shards import write_tensor_folder

    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(2048, D_MODEL, generator=g) / D_MODEL**0.5
    ctx_per_shard = max(1, shard_mb * 2**20 // (CTX_LEN * D_MODEL * 4))
    n_shards = max(1, round(gb * 2**30 / (ctx_per_shard * CTX_LEN * D_MODEL * 4)))

    def shards():
        for _ in range(n_shards):
            idx = torch.randint(0, 2048, (ctx_per_shard * CTX_LEN, 16), generator=g)
            acts = torch.nn.functional.embedding_bag(idx, dictionary, mode="sum")
            yield acts + 0.05 * torch.randn(acts.shape, generator=g)

    return write_tensor_folder(folder, shards(), CTX_LEN)["token_count"]


def child(config: str, out: str) -> None:
    """Runs in the measured process: import, record RSS, train, print JSON."""
    from fis_interventions.training import train

    after_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    result = train(Path(config), Path(out), progress=False)
    print(json.dumps({"import_rss_kb": after_import, "steps": result.step, "seconds": time.perf_counter() - t,
                      "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=0.5, help="size of the shard set")
    ap.add_argument("--limit-gb", type=float, default=1.5, help="peak RSS the training process must stay under")
    ap.add_argument("--shard-mb", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--expansion", type=int, default=2, help="small SAE: this measures the data path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None, help="write the shards and run here instead of a tmp dir")
    ap.add_argument("--child", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(*args.child)
        return
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        t = time.perf_counter()
        tokens = write_shards(root / "acts", args.gb, args.shard_mb)
        on_disk = sum(p.stat().st_size for p in (root / "acts").glob("*.safetensors"))
        write_s = time.perf_counter() - t
        train_tokens = int(tokens * 0.85) // args.batch * args.batch  # one pass over the training split
        cfg = dict(activations=str(root / "acts"), expansion=args.expansion, k=32, mode="sae",
                   batch_size=args.batch, tokens=train_tokens, warmup_steps=0, eval_every=10**6,
                   checkpoint_every=10**6, heldout_fraction=0.1, lr=1e-3)
        (root / "train.yaml").write_text(yaml.safe_dump(cfg))
        proc = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--child",
                               str(root / "train.yaml"), str(root / "run")], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"training failed:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    peak_gb = res["peak_rss_kb"] / 2**20
    print(f"shards: {on_disk / 2**30:.2f} GB on disk ({tokens} tokens x {D_MODEL} fp32, {args.shard_mb} MB shards; "
          f"written in {write_s:.0f} s)")
    print(f"training: {res['steps']} steps of {args.batch} tokens (one pass) in {res['seconds']:.0f} s")
    print(f"RSS after imports: {res['import_rss_kb'] / 2**20:.2f} GB; peak RSS while training: {peak_gb:.2f} GB "
          f"(limit {args.limit_gb:.2f} GB, data {on_disk / 2**30:.2f} GB)")
    ok = peak_gb < args.limit_gb
    print("PASS: peak RSS below the limit" if ok else "FAIL: peak RSS above the limit")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
