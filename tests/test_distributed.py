"""Data-parallel training: 2 CPU ranks (gloo, launched by torchrun) end with the single-process weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fis_interventions.activations.shards import ActivationStore, shard_name, write_tensor_folder
from fis_interventions.errors import FisError
from fis_interventions.training import heldout_sample, train

D, CTX_LEN = 16, 8


def write_synthetic_shards(folder: Path, n_shards: int, ctx_per_shard: int, d: int = D, seed: int = 0) -> Path:
    """A harvest-shaped folder of sparse-ish synthetic activations (every position kept)."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(4 * d, d, generator=g)

    def shards():
        for _ in range(n_shards):
            n = ctx_per_shard * CTX_LEN
            codes = torch.rand(n, 4 * d, generator=g) * (torch.rand(n, 4 * d, generator=g) < 0.05)
            yield codes @ dictionary + 0.01 * torch.randn(n, d, generator=g)

    write_tensor_folder(folder, shards(), CTX_LEN, normalization={"kind": "expected_norm", "scale": 0.5})
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_synthetic_shards(tmp_path_factory.mktemp("dist") / "acts", n_shards=3, ctx_per_shard=40)


def _cfg(shards: Path, **kw) -> dict:
    cfg = dict(activations=str(shards), d_sae=256, k=2, aux_k=8, dead_tokens=64, mode="joint", emb_dim=8,
               hidden=8, batch_size=64, tokens=64 * 14, lr=1e-2, warmup_steps=2, eval_every=5,
               checkpoint_every=5, heldout_fraction=0.1, seed=3)
    cfg.update(kw)
    return cfg


def _fis() -> list[str]:
    exe = Path(sys.executable).with_name("fis")
    return [str(exe)] if exe.exists() else [shutil.which("fis") or "fis"]


def test_two_ranks_match_one_process(shards, tmp_path):
    cfg = _cfg(shards)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
           *_fis(), "train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "ddp"), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    single = train(tmp_path / "c.yaml", tmp_path / "one", progress=False)
    assert single.complete and single.step == 14

    one = load_file(tmp_path / "one" / "checkpoint" / "weights.safetensors")
    ddp = load_file(tmp_path / "ddp" / "checkpoint" / "weights.safetensors")
    assert one.keys() == ddp.keys()
    for k in one:
        assert torch.allclose(one[k], ddp[k], atol=1e-5, rtol=0), (k, float((one[k] - ddp[k]).abs().max()))

    meta_one = json.loads((tmp_path / "one" / "checkpoint" / "cfg.json").read_text())
    meta_ddp = json.loads((tmp_path / "ddp" / "checkpoint" / "cfg.json").read_text())
    assert meta_ddp["tokens_seen"] == meta_one["tokens_seen"] == 64 * 14  # global tokens, not per rank
    # rank 0 alone writes metrics: the same rows as one process, with the global-batch loss
    rows_one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    rows_ddp = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows_one] == [(r["step"], r["split"]) for r in rows_ddp]
    for a, b in zip(rows_one, rows_ddp):
        if a["split"] == "train":
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
            assert b["dead_frac"] == a["dead_frac"]  # dead counters synchronised across ranks
    assert any(r.get("auxk", 0) > 0 and r["dead_frac"] > 0 for r in rows_one)  # the AuxK path was exercised


def test_batch_must_split_evenly(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(FisError, match="not divisible by the 3 ranks"):
        train(_to_cfg(_cfg(shards)), tmp_path / "x", progress=False)


def _to_cfg(d):
    from fis_interventions.sae import TrainConfig

    return TrainConfig.model_validate(d)


def test_heldout_sample_is_bounded_and_streams(shards, monkeypatch):
    store = ActivationStore(shards, heldout_fraction=0.1)
    full = store.activations("heldout")
    loads = []
    real = ActivationStore.load_shard

    def counting(self, path, split):
        loads.append(path.name)
        return real(self, path, split)

    monkeypatch.setattr(ActivationStore, "load_shard", counting)
    first = heldout_sample(store, max_tokens=20)
    assert loads == [shard_name(0)]  # stopped after the first shard had enough rows
    assert torch.equal(first, full[:20])
    everything = heldout_sample(store, max_tokens=10_000)
    assert torch.equal(everything, full)  # 3 shards x 4 held-out contexts x 8 positions
    assert len(everything) == 3 * 4 * CTX_LEN
