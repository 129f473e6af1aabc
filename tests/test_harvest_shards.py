"""`fis harvest --shard i/n`: ranks harvest disjoint slices into one folder that equals a single-process harvest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fis_interventions.activations import ActivationStore, harvest
from fis_interventions.activations import sharded
from fis_interventions.errors import FisError

HOOK = "blocks.1.hook_resid_post"
KW = dict(model="tiny-random", hook=HOOK, tokens=2400, context_length=32, contexts_per_shard=8, batch_size=4,
          norm_multiple=1.3, progress=False)  # a low multiple, so massive-activation exclusions happen


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text(" ".join(f"Sentence {i} is about cats, dogs and the weather." for i in range(300)))
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_bridge, corpus) -> Path:
    out = tmp_path_factory.mktemp("one") / "acts"
    harvest(bridge=tiny_bridge, corpus=[str(corpus)], out=out, **KW)
    return out


def _same_store(a: Path, b: Path) -> None:
    one, two = ActivationStore(a), ActivationStore(b)
    assert [s["file"] for s in one.manifest["shards"]] == [s["file"] for s in two.manifest["shards"]]
    for key in ("token_count", "excluded", "exclusion", "n_contexts_planned"):
        assert one.manifest[key] == two.manifest[key], key
    assert one.manifest["excluded"]["massive"] > 0
    assert two.manifest["normalization"]["scale"] == pytest.approx(one.manifest["normalization"]["scale"], rel=1e-12)
    for split in ("train", "heldout"):
        x, y = one.activations(split, normalized=False), two.activations(split, normalized=False)
        assert x.shape == y.shape and (x - y).abs().max().item() <= 1e-6


def test_slices_in_any_order_equal_one_process_and_resume(single, tiny_bridge, corpus, tmp_path, monkeypatch):
    out = tmp_path / "acts"
    real = sharded.write_shard
    calls = {"n": 0}

    def crash_after_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sharded, "write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        harvest(bridge=tiny_bridge, corpus=[str(corpus)], out=out, shard="1/2", **KW)
    monkeypatch.setattr(sharded, "write_shard", real)
    assert not (out / "manifest.json").exists()
    part = harvest(bridge=tiny_bridge, corpus=[str(corpus)], out=out, shard="1/2", **KW)  # resumes its 2 shards
    assert part["rank"] == 1 and part["complete"] and not (out / "manifest.json").exists()
    merged = harvest(bridge=tiny_bridge, corpus=[str(corpus)], out=out, shard="0/2", **KW)
    assert merged["shard_of"] == 2 and "rank" not in merged
    _same_store(single, out)
    with pytest.raises(FisError, match="2 process"):
        harvest(bridge=tiny_bridge, corpus=[str(corpus)], out=out, shard="0/3", **KW)
    with pytest.raises(FisError, match="bad shard"):
        harvest(bridge=tiny_bridge, corpus=[str(corpus)], out=tmp_path / "x", shard="a/b", **KW)


def _fis() -> list[str]:
    exe = Path(sys.executable).with_name("fis")
    return [str(exe)] if exe.exists() else [shutil.which("fis") or "fis"]


def test_two_torchrun_ranks_equal_one_process_and_train_as_one_store(single, corpus, tmp_path):
    from fis_interventions.sae import TrainConfig
    from fis_interventions.training import train

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "acts"
    args = ["harvest", "--model", "tiny-random", "--hook", HOOK, "--corpus", str(corpus), "--out", str(out),
            "--tokens", "2400", "--context-length", "32", "--contexts-per-shard", "8", "--batch-size", "4",
            "--norm-multiple", "1.3", "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
           *_fis(), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in out.glob("manifest*.json")} == {"manifest.json", "manifest.rank-0-of-2.json",
                                                             "manifest.rank-1-of-2.json"}
    _same_store(single, out)
    cfg = TrainConfig.model_validate(dict(activations=str(out), d_sae=128, k=8, mode="sae", batch_size=64,
                                          tokens=64 * 6, lr=1e-3, warmup_steps=2, eval_every=3,
                                          checkpoint_every=3, heldout_fraction=0.1))
    result = train(cfg, tmp_path / "train", progress=False)
    assert result.complete and result.step == 6
    torch.testing.assert_close(ActivationStore(out).activations("heldout")[:5],
                               ActivationStore(single).activations("heldout")[:5])
