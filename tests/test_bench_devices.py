"""bench/battery.py and bench/split.py move their inputs to the model's device: their code paths run with the
weights on ``meta``.

Why: the first GPU run's step 3 (``bench/gpu_check.sh``) was a device-mismatch error: the warm-up and the naive
loop passed CPU token ids and masks to a CUDA model. Ops on ``meta`` weights do not complain about CPU inputs,
so a rehearsal on ``meta`` alone cannot see this; a torch function mode here records every call whose tensor
arguments live on two devices, and the test fails on any.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from fis_interventions import models
from tiny_checkpoints import save_tiny_joint_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


class DeviceMismatch(TorchFunctionMode):
    """Records torch calls whose (non-scalar) tensor arguments are on more than one device."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        devices = {t.device.type for t in _tensors(args) + _tensors(kwargs) if t.dim() > 0}
        if len(devices) > 1:
            self.seen.append(f"{getattr(func, '__name__', func)} on {sorted(devices)}")
        return func(*args, **kwargs)


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"bench_{name}"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_battery():
    return _bench_module("battery")


@pytest.fixture(scope="module")
def meta_setup(tmp_path_factory):
    from fis_interventions.attach import attach

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "resolve_device", lambda device="auto": torch.device("meta"))
        bridge = models.load_model("tiny-random", device="cuda")
    from fis_interventions.sae import load_checkpoint

    ckpt = save_tiny_joint_checkpoint(tmp_path_factory.mktemp("bench") / "ckpt", bridge.tokenizer, seed=0)
    return bridge, attach(bridge, load_checkpoint(ckpt))  # read on the CPU, moved to meta by attach


def test_the_checker_sees_cpu_inputs_to_a_meta_model(meta_setup):
    bridge, _ = meta_setup
    with DeviceMismatch() as mode, torch.no_grad():
        bridge(torch.tensor([[1, 2, 3]]))
    assert mode.seen, "a CPU token tensor fed to meta weights must be reported"


def test_bench_battery_warm_up_and_naive_loop_move_inputs_to_the_model_device(bench_battery, meta_setup,
                                                                             monkeypatch):
    from fis_interventions.designs import expand, load_design
    from fis_interventions.interventions import BatteryConfig
    from fis_interventions.interventions.battery import Readouts
    from fis_interventions.interventions.features import Target

    bridge, attached = meta_setup
    design = load_design(bench_battery.DESIGN)
    rows = expand(design).iloc[:4].reset_index(drop=True)
    readouts = Readouts.for_design(design, bridge.tokenizer)
    cfg = BatteryConfig.model_validate({
        "name": "b", "model": "tiny-random", "checkpoint": "x", "designs": [str(bench_battery.DESIGN)],
        "features": [{"point": "secondary.hook_latents", "index": 1}], "out": "unused", "batch_size": 4,
        "interventions": [{"kind": "set", "values": [1.0]}]})
    # meta tensors hold no values: the splice's data-dependent indexing and the host-side scoring are stubbed,
    # every other line of the naive loop runs as written
    monkeypatch.setattr(attached.splice, "edit", lambda value, keep, edit: value)
    seen_logits: list[torch.Tensor] = []
    monkeypatch.setattr(Readouts, "scores", lambda self, at: (seen_logits.append(at) or torch.zeros(len(at), 1), {}))
    # the bridge's own forward reads the attention mask on the host (impossible on meta): the model call is
    # replaced by one that checks where its inputs are and returns meta logits of the right shape
    vocab = int(bridge.cfg.d_vocab)

    def model_call(tokens, attention_mask=None, fwd_hooks=(), **kw):
        for t in (tokens, attention_mask):
            if t is not None and t.device != models.weights_device(bridge):
                mode.seen.append(f"model input on {t.device}, weights on {models.weights_device(bridge)}")
        return torch.empty(*tokens.shape, vocab, device=models.weights_device(bridge))

    monkeypatch.setattr(bridge, "forward", model_call)
    monkeypatch.setattr(bridge, "run_with_hooks", model_call)
    with DeviceMismatch() as mode:
        bench_battery.warm_up(bridge, attached, rows, 4)
        bench_battery.naive(bridge, attached, cfg, rows, readouts, [Target("secondary.hook_latents", (1,), "f")])
    assert not mode.seen, mode.seen
    assert seen_logits and all(t.device.type == "meta" for t in seen_logits)


def test_bench_split_moves_tokens_and_positions_to_the_model_device(monkeypatch):
    """Every leg of bench/split.py (full forward, fast suffix at one and all positions, generic suffix) with the
    weights on ``meta`` and the batch built on the CPU, as ``main`` builds it."""
    from fis_interventions.models import default_hook, load_tokenizer
    from fis_interventions.splice import SplitModel
    from fis_interventions.tiny_models import family_bridge

    bench_split = _bench_module("split")
    bridge = family_bridge("llama", load_tokenizer())
    bridge.original_model.to("meta")
    # the generic path reads a value on the host (impossible on meta): both legs take the fast split here, every
    # other line of the bench runs as written
    monkeypatch.setattr(bench_split, "SplitModel", lambda b, h, path=None: SplitModel(b, h))
    tokens = torch.randint(100, 1000, (2, 8))
    readout = torch.full((2, 1), 7)
    with DeviceMismatch() as mode, torch.no_grad():
        outputs = [leg() for leg in bench_split.legs(bridge, default_hook(bridge), tokens, readout).values()]
    assert not mode.seen, mode.seen
    assert len(outputs) == 4
    # and without the move (the old code: the CPU batch as built) the checker sees it
    monkeypatch.setattr(bench_split, "weights_device", lambda b: torch.device("cpu"))
    with DeviceMismatch() as mode, torch.no_grad():
        for leg in bench_split.legs(bridge, default_hook(bridge), tokens, readout).values():
            leg()
    assert mode.seen
