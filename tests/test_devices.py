"""Device correctness and precision on any machine: weights go where they are asked to, every stage's outputs
stay on the device of its inputs, bf16 trains with fp32 master weights and resumes exactly.

Without a GPU the wiring is checked on the ``meta`` device (shapes and devices, no data): a model "loaded on
meta" must have every weight there, and the split forward and the joint SAE must keep meta inputs on meta.
The same checks on a real CUDA device are the ``gpu``-marked tests (and ``bench/gpu_check.sh``).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import accelerator
from fis_interventions import models
from fis_interventions.errors import FisError
from fis_interventions.sae import JointArch, JointSAE, NFMArch, SAEArch, TrainConfig, load_checkpoint, train
from fis_interventions.sae.synthetic import SyntheticActivations

TINY = dict(d_sae=24, k=4, emb_dim=6, hidden=8, lr=3e-3, warmup_steps=3, batch_size=32, eval_every=7,
            checkpoint_every=5, heldout_fraction=0.05, model="toy-model", hook="blocks.0.hook_resid_post",
            corpus="toy")


def _devices(module: torch.nn.Module) -> set[torch.device]:
    return {p.device for p in module.parameters()} | {b.device for b in module.buffers()}


def test_load_model_cpu_puts_every_weight_on_cpu(tiny_bridge):
    assert _devices(tiny_bridge.original_model) == {torch.device("cpu")}
    assert tiny_bridge.cfg.device == "cpu" and models.weights_device(tiny_bridge) == torch.device("cpu")


@pytest.fixture(scope="module")
def meta_bridge():
    """``load_model`` with the device resolved to ``meta``: where the weights end up is all that is checked."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "resolve_device", lambda device="auto": torch.device("meta"))
        bridge = models.load_model("tiny-random", device="cuda")
    return bridge


def test_load_model_moves_weights_to_the_requested_device(meta_bridge):
    # the bug: transformer-lens leaves a pre-loaded HF model on the CPU and only records the device in cfg.device
    assert {p.device.type for p in meta_bridge.original_model.parameters()} == {"meta"}
    assert meta_bridge.cfg.device == "meta" and models.weights_device(meta_bridge).type == "meta"


def test_model_info_reports_where_the_weights_are(monkeypatch):
    monkeypatch.setattr(models, "resolve_device", lambda device="auto": torch.device("meta"))
    info = models.model_info("tiny-random", device="cuda")  # asked for cuda, the weights went to "meta"
    assert info["device"] == "meta" and info["dtype"] == "float32" and info["folder"] is None  # tiny-random


def test_split_forward_and_joint_sae_stay_on_the_input_device(meta_bridge):
    from fis_interventions.splice import SplitModel

    split = SplitModel(meta_bridge, "blocks.1.hook_resid_post")
    tokens = torch.ones(2, 5, dtype=torch.long)  # on the CPU: the split forward moves them next to the weights
    resid, state = split.prefix(tokens)
    logits = split.suffix(resid, state, torch.zeros(2, 1, dtype=torch.long))
    assert resid.device.type == "meta" and logits.device.type == "meta" and logits.shape[:2] == (2, 1)
    joint = JointSAE(JointArch(sae=SAEArch(d_in=64, d_sae=128, k=8), nfm=NFMArch(emb_dim=16, hidden=32)))
    joint.attach_secondary(64, 4)
    joint.to("meta")
    out = joint(resid.reshape(-1, 64), "full")
    for name in ("pre", "sae_recon", "linear", "bi", "hidden", "interaction", "recon"):
        assert getattr(out, name).device.type == "meta", name
    assert out.latents.values.device.type == "meta" and out.secondary_latents.indices.device.type == "meta"


def test_resolve_device_uses_the_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert models.resolve_device("cuda") == torch.device("cuda", 3)
    assert models.resolve_device("auto") == torch.device("cuda", 3)
    assert models.resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(FisError, match="LOCAL_RANK 5 has no GPU"):
        models.resolve_device("cuda")
    monkeypatch.delenv("LOCAL_RANK")
    assert models.resolve_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(FisError, match="only 4 CUDA devices"):
        models.resolve_device("cuda:7")


def test_device_auto_in_a_train_config(tmp_path):
    src = SyntheticActivations(d_in=8, n_features=16, batch_size=32, seed=5)
    cfg = TrainConfig(**TINY, mode="sae", tokens=32 * 4, device="auto")
    result = train(cfg, src.seekable(), tmp_path / "a", progress=False, normalization={"kind": "none"})
    assert result.complete
    assert _devices(result.model) == {models.resolve_device("auto")}


@pytest.mark.parametrize("argv, match", [
    (["model", "info", "tiny-random", "--device", "cuda"], "no CUDA device is available"),
    (["model", "info", "tiny-random", "--device", "tpu9"], "unknown device"),
])
def test_bad_device_is_one_line_exit_2(argv, match):
    if torch.cuda.is_available() and "cuda" in argv:
        pytest.skip("this machine has CUDA")
    run = subprocess.run([sys.executable, "-m", "fis_interventions.cli", *argv], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in run.stderr


def test_float16_training_is_refused_in_one_line(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("expansion: 2\nmode: sae\ndtype: float16\n")
    run = subprocess.run([sys.executable, "-m", "fis_interventions.cli", "train", str(path), "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "float16" in lines[0] and "bfloat16" in lines[0]
    assert not (tmp_path / "out").exists()


def test_bf16_keeps_fp32_master_weights_and_resumes_exactly(tmp_path):
    cfg = TrainConfig(**TINY, mode="joint", aux_k=4, dead_tokens=64, tokens=32 * 24, dtype="bfloat16")
    src = SyntheticActivations(d_in=8, n_features=16, batch_size=32, seed=5)
    full = train(cfg, src.seekable(), tmp_path / "a", progress=False, normalization={"kind": "none"})
    assert full.complete
    assert {p.dtype for p in full.model.parameters()} == {torch.float32}
    state = torch.load(tmp_path / "a" / "checkpoint" / "optimizer.pt", weights_only=True)
    moments = [t for s in state["trainer"]["optimizer"]["state"].values() for k, t in s.items() if k != "step"]
    assert moments and {t.dtype for t in moments} == {torch.float32}
    rows = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    # killed after 13 training batches (the data runs out), then resumed: the same weights, bit for bit
    n_held = math.ceil(cfg.heldout_fraction * cfg.steps())
    part = train(cfg, src.stream(0, n_held + 13), tmp_path / "b", progress=False, normalization={"kind": "none"})
    assert not part.complete
    done = train(cfg, src.stream(0), tmp_path / "b", resume=True, progress=False)
    assert done.complete and done.step == full.step
    a, b = full.model.state_dict(), load_checkpoint(tmp_path / "b").model.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_bf16_autocast_runs_the_matmuls_in_bf16():
    """The forward under the trainer's autocast produces bf16 matmul outputs while the weights stay fp32."""
    from fis_interventions.sae.trainers import JointTrainer

    cfg = TrainConfig(**TINY, mode="joint", tokens=64, dtype="bfloat16")
    model = JointSAE(cfg.arch(8))
    trainer = JointTrainer(model, cfg, 2)
    x = torch.randn(32, 8)
    with trainer.autocast(x):
        out = model(x, "full")
    assert out.hidden.dtype == torch.bfloat16 and out.recon.dtype == torch.float32  # the NFM's Linear ran in bf16
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    stats = trainer.update(0, x)
    assert all(isinstance(v, torch.Tensor) for v in stats.values())  # converted only on logging steps


@pytest.mark.gpu
@accelerator.needs_accel
def test_load_model_cuda_puts_every_weight_on_cuda():
    bridge = models.load_model("tiny-random", device=accelerator.ACCEL)
    assert {p.device.type for p in bridge.original_model.parameters()} == {accelerator.ACCEL}
    assert bridge.cfg.device == str(models.weights_device(bridge))
    assert isinstance(models.greedy_continuation(bridge, "The capital of France is", 3), str)
    info = models.model_info("tiny-random", device=accelerator.ACCEL)
    assert info["device"].startswith(accelerator.ACCEL)


@pytest.mark.gpu
@accelerator.needs_accel
def test_bf16_resume_on_cuda(tmp_path):
    cfg = TrainConfig(**TINY, mode="joint", tokens=32 * 24, dtype="bfloat16", device=accelerator.ACCEL)
    src = SyntheticActivations(d_in=8, n_features=16, batch_size=32, seed=5)
    full = train(cfg, src.seekable(), tmp_path / "a", progress=False, normalization={"kind": "none"})
    n_held = math.ceil(cfg.heldout_fraction * cfg.steps())
    train(cfg, src.stream(0, n_held + 13), tmp_path / "b", progress=False, normalization={"kind": "none"})
    done = train(cfg, src.stream(0), tmp_path / "b", resume=True, progress=False)
    a, b = full.model.state_dict(), done.model.state_dict()
    for name in a:  # cuBLAS may choose other kernels after a restart: a tolerance, not bit-equality
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
