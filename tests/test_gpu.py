"""The GPU checks (``pytest -m gpu``; ``bench/gpu_check.sh`` runs them with the GPU benchmarks). Every test here
needs CUDA and is skipped without it, except in a rehearsal (``FIS_TEST_ACCEL=cpu``, see accelerator.py: the CPU
stands in for the GPU, so the code of these tests runs everywhere; ``make test`` rehearses them). On CPU-only
machines the device wiring itself is covered by test_devices.py (the ``meta`` device).

Tolerances: fp32 CUDA vs CPU 1e-4 (different kernels, same maths); sparse products against a float64 CPU
reference 1e-4 relative; host syncs counted with ``torch.cuda.set_sync_debug_mode("warn")`` (a proxy that counts
the synchronising calls in a rehearsal).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

from accelerator import ACCEL, REHEARSAL, count_syncs, gpu, on_accelerator
from tiny_checkpoints import save_tiny_joint_checkpoint

pytestmark = gpu

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.1.hook_resid_post"
DESIGN = ROOT / "stimuli" / "negation_sentiment.yaml"
# host syncs allowed. A training step: the finiteness check of the loss (ours), plus on CUDA what torch's
# embedding_bag backward does internally (unmeasured before the first GPU run; the rehearsal's proxy sees only
# calls made from Python). A battery stimulus batch: its keep-index, the input copies and one result copy per
# pass, and never one more per condition (the proxy does not see host-to-device copies).
TRAIN_STEP_SYNCS = 1 if REHEARSAL else 4
BATTERY_BATCH_SYNCS = 5 if REHEARSAL else 16


@pytest.fixture(scope="module")
def cpu_bridge():
    from fis_interventions.models import load_model

    return load_model("tiny-random", device="cpu")


@pytest.fixture(scope="module")
def gpu_bridge():
    from fis_interventions.models import load_model

    bridge = load_model("tiny-random", device=ACCEL)
    # the real model loads with sdpa attention (from_pretrained's default); the tiny one is built eager. sdpa's
    # masks are made differently (and may read the padding mask on the host), so the budgets are checked with it
    bridge.original_model.set_attn_implementation("sdpa")
    assert bridge.original_model.config._attn_implementation == "sdpa"
    return bridge


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, cpu_bridge) -> Path:
    return save_tiny_joint_checkpoint(tmp_path_factory.mktemp("gpu") / "checkpoint", cpu_bridge.tokenizer, seed=0,
                                      hook=HOOK)


def _cfg(dtype: str, device: str):
    from fis_interventions.sae import TrainConfig

    return TrainConfig(d_sae=512, k=16, emb_dim=16, hidden=32, lr=2e-3, warmup_steps=3, batch_size=1024,
                       tokens=1024 * 30, mode="joint", aux_k=32, dead_tokens=4096, device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_thirty_joint_steps_on_cuda_have_finite_falling_loss(dtype):
    from fis_interventions.sae import JointSAE
    from fis_interventions.sae.synthetic import SyntheticActivations
    from fis_interventions.sae.trainers import JointTrainer

    cfg = _cfg(dtype, ACCEL)
    torch.manual_seed(0)
    model = JointSAE(cfg.arch(64)).to(ACCEL)
    trainer = JointTrainer(model, cfg, 30)
    src = SyntheticActivations(d_in=64, n_features=128, batch_size=1024, seed=3)
    with on_accelerator():
        losses = [float(trainer.update(i, x.to(ACCEL))["loss"])
                  for i, x in zip(range(30), src.stream(0), strict=False)]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_first_step_gradients_equal_the_cpu_fast_path():
    from fis_interventions.sae import JointSAE
    from fis_interventions.sae.synthetic import SyntheticActivations
    from fis_interventions.sae.trainers import JointTrainer

    cfg = _cfg("float32", "cpu")
    torch.manual_seed(0)
    cpu = JointSAE(cfg.arch(64))
    accel = JointSAE(cfg.arch(64))
    accel.load_state_dict(cpu.state_dict())
    accel.to(ACCEL)
    x = next(iter(SyntheticActivations(d_in=64, n_features=128, batch_size=1024, seed=3).stream(0)))
    grads = {}
    for name, model, data, where in (("cpu", cpu, x, contextlib.nullcontext()),
                                     ("accel", accel, x.to(ACCEL), on_accelerator())):
        model.train()
        with where:
            loss, _ = JointTrainer(model, cfg, 1).loss(data)
            loss.backward()
        grads[name] = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["cpu"].keys() == grads["accel"].keys() and grads["cpu"]
    for n, g in grads["cpu"].items():
        torch.testing.assert_close(grads["accel"][n], g, rtol=1e-4, atol=1e-4 * float(g.abs().max()) + 1e-8,
                                   msg=n)


def test_sparse_ops_on_cuda_match_a_float64_cpu_reference():
    from fis_interventions.sae.model import SparseLatents
    from fis_interventions.sae.sparse_ops import bag_sum, bi_interaction_pool, bi_pool, sparse_decode

    gen = torch.Generator().manual_seed(0)
    b, k, n, d = 256, 16, 512, 64
    idx = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(b)])
    vals = torch.rand(b, k, generator=gen, dtype=torch.float64)
    table = torch.randn(n, d, generator=gen, dtype=torch.float64)
    grad = torch.randn(b, d, generator=gen, dtype=torch.float64)
    for ours, ref in ((sparse_decode, bag_sum), (bi_interaction_pool, bi_pool)):
        v64, t64 = vals.clone().requires_grad_(), table.clone().requires_grad_()
        out64 = ref(idx, v64, t64)
        out64.backward(grad)
        v32 = vals.float().to(ACCEL).requires_grad_()
        t32 = table.float().to(ACCEL).requires_grad_()
        pattern = SparseLatents(v32, idx.to(ACCEL), n).pattern
        out32 = ours(pattern, v32, t32)
        out32.backward(grad.float().to(ACCEL))
        for got, want in ((out32, out64), (v32.grad, v64.grad), (t32.grad, t64.grad)):
            torch.testing.assert_close(got.detach().double().cpu(), want.detach(), rtol=1e-4,
                                       atol=1e-4 * float(want.detach().abs().max()))


def test_harvest_screening_and_spliced_metrics_cuda_equal_cpu(cpu_bridge, gpu_bridge, ckpt, text_corpus, tmp_path):
    from safetensors.torch import load_file

    from fis_interventions.activations import ActivationStore, harvest
    from fis_interventions.attach import attach
    from fis_interventions.evaluation import spliced_metrics
    from fis_interventions.screening import screen

    shards = {}
    for name, bridge in (("cpu", cpu_bridge), ("cuda", gpu_bridge)):
        harvest(bridge=bridge, progress=False, model="tiny-random", hook=HOOK, corpus=[str(text_corpus)],
                out=tmp_path / name, tokens=400, context_length=32, batch_size=4, contexts_per_shard=4)
        shards[name] = [load_file(str(p)) for p in ActivationStore(tmp_path / name).shard_paths()]
    for a, b in zip(shards["cpu"], shards["cuda"], strict=True):
        assert torch.equal(a["keep"], b["keep"])
        torch.testing.assert_close(b["acts"].float(), a["acts"].float(), rtol=1e-4, atol=1e-4)
    res = {n: screen(ckpt, DESIGN, bridge=br, progress=False) for n, br in (("cpu", cpu_bridge), ("cuda", gpu_bridge))}
    for point, acts in res["cpu"].activations.items():
        np.testing.assert_allclose(res["cuda"].activations[point], acts, rtol=1e-4, atol=1e-4)
    contexts = shards["cpu"][0]["tokens"].long()
    metrics = {n: spliced_metrics(attach(br, ckpt), contexts)[0] for n, br in (("cpu", cpu_bridge),
                                                                                  ("cuda", gpu_bridge))}
    for cond, row in metrics["cpu"].items():
        for key, value in row.items():
            assert abs(metrics["cuda"][cond][key] - value) <= 1e-4 * max(1.0, abs(value)), (cond, key)


def test_host_syncs_of_a_training_step_and_a_battery_batch(gpu_bridge, ckpt, tmp_path):
    from fis_interventions.attach import attach
    from fis_interventions.designs import expand, load_design
    from fis_interventions.interventions import BatteryConfig
    from fis_interventions.interventions.battery import Readouts, _run_batch, encode_rows
    from fis_interventions.sae import JointSAE
    from fis_interventions.sae.trainers import JointTrainer

    cfg = _cfg("float32", ACCEL)
    torch.manual_seed(0)
    trainer = JointTrainer(JointSAE(cfg.arch(64)).to(ACCEL), cfg, 30)
    x = torch.randn(1024, 64, device=ACCEL)
    with on_accelerator():
        trainer.update(0, x)  # first call: lazy initialisation (optimiser state) is not a per-step cost
        with count_syncs() as train_syncs:
            trainer.update(1, x)
    how = "counted by the CPU proxy" if REHEARSAL else "CUDA"
    print(f"host syncs in one training step ({how}): {len(train_syncs)} {train_syncs}")
    # at least the finiteness check: a counter that sees nothing would pass any budget
    assert 1 <= len(train_syncs) <= TRAIN_STEP_SYNCS, train_syncs

    attached = attach(gpu_bridge, ckpt)
    design = load_design(DESIGN)
    rows = expand(design).iloc[:8].reset_index(drop=True)
    enc = encode_rows(rows, gpu_bridge.tokenizer)
    readouts = Readouts.for_design(design, gpu_bridge.tokenizer)
    from fis_interventions.interventions.features import Target

    target = Target("secondary.hook_latents", (1,), "top")
    counts = {}
    for n_values in (1, 8):
        bcfg = BatteryConfig.model_validate({
            "name": "s", "model": "tiny-random", "checkpoint": str(ckpt), "designs": [str(DESIGN)],
            "features": [{"point": "secondary.hook_latents", "index": 1}], "out": str(tmp_path / "b"),
            "interventions": [{"kind": "scale", "values": [float(v) for v in range(n_values)]}]})
        with count_syncs() as syncs:
            out = list(_run_batch(attached, enc, rows, readouts, [target], [0], bcfg, {target: None},
                                  list(design.factors), gpu_bridge.tokenizer.pad_token_id))
        assert len(out) == 1
        counts[n_values] = len(syncs)
    print(f"host syncs per battery stimulus batch ({how}; 1 / 8 conditions): {counts[1]} / {counts[8]} {syncs}")
    assert counts[8] == counts[1] <= BATTERY_BATCH_SYNCS
