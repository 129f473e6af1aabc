"""The stacked battery: every feature x condition of a stimulus batch in one joint pass and one suffix pass
(chunked under ``max_batch_rows``), the clean readout as copy 0 of the same pass. Checked against the plain
one-condition-at-a-time computation, against itself at other chunk sizes, and for exact no-ops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fis_interventions.attach import attach
from fis_interventions.designs import expand, load_design
from fis_interventions.interventions import BatteryConfig, battery, read_results
from fis_interventions.interventions.battery import Readouts, chunks, encode_rows
from fis_interventions.interventions.features import Condition, Target, make_edit, stacked_edit
import accelerator
from tiny_checkpoints import save_tiny_joint_checkpoint

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.1.hook_resid_post"
DESIGN = ROOT / "stimuli/negation_sentiment.yaml"
FEATURES = [{"point": "secondary.hook_latents", "index": 1, "role": "top"},
            {"point": "sae.hook_latents", "indices": [3, 5], "role": "group"}]
INTERVENTIONS = [{"kind": "scale", "values": [-4, 0, 1, 4]}, {"kind": "set", "values": [2.0]},
                 {"kind": "add", "values": [3.0], "where": "stimulus"}, {"kind": "zero", "where": "readout"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_bridge) -> Path:
    return save_tiny_joint_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint", tiny_bridge.tokenizer, seed=1)


def _cfg(ckpt: Path, out: Path, **kw) -> BatteryConfig:
    base = dict(name="s", model="tiny-random", checkpoint=ckpt, designs=[DESIGN], features=FEATURES,
                interventions=INTERVENTIONS, batch_size=8, out=out, max_items=2, device="cpu")
    return BatteryConfig.model_validate({**base, **kw})


def _run(bridge, cfg: BatteryConfig) -> pd.DataFrame:
    battery(cfg, bridge=bridge, progress=False)
    return read_results(Path(cfg.out) / "results.sqlite")


def test_chunks_respect_the_row_bound_and_keep_features_whole():
    assert chunks(12, 4, 8, 512) == [range(0, 12)]  # 13 copies x 8 rows fit
    assert chunks(12, 4, 8, 48) == [range(0, 4), range(4, 8), range(8, 12)]  # 5 of 6 copies: one feature each
    assert chunks(12, 4, 8, 8) == [range(i, i + 1) for i in range(12)]  # a block alone always runs
    for part in chunks(10, 5, 8, 40):
        assert (len(part) + 1) * 8 <= 40


def test_chunk_size_does_not_change_results(tiny_bridge, ckpt, tmp_path):
    one_pass = _run(tiny_bridge, _cfg(ckpt, tmp_path / "big"))
    per_block = _run(tiny_bridge, _cfg(ckpt, tmp_path / "small", max_batch_rows=8))
    pd.testing.assert_frame_equal(one_pass, per_block, check_exact=False, atol=1e-6, rtol=0)
    for df in (one_pass, per_block):  # the clean copy shares the pass: scale 1 is exactly the clean run
        ones = df[(df.intervention == "scale") & (df.value == 1.0)]
        assert len(ones) and (ones["shift"] == 0).all() and (ones["score_edited"] == ones["score_clean"]).all()


def test_stacked_equals_one_condition_at_a_time(tiny_bridge, ckpt, tmp_path):
    """The reference: for each condition its own splice and suffix pass over the batch, positions selected by a
    boolean mask (the computation before stacking), scored at the readout."""
    cfg = _cfg(ckpt, tmp_path / "r", max_items=1)
    df = _run(tiny_bridge, cfg)
    attached = attach(tiny_bridge, ckpt)
    design = load_design(DESIGN)
    rows = expand(design)
    rows = rows[rows["item"] == rows["item"].iloc[0]].reset_index(drop=True).iloc[:8]
    enc = encode_rows(rows, tiny_bridge.tokenizer)
    readouts = Readouts.for_design(design, tiny_bridge.tokenizer)
    resid, state = attached.split.prefix(enc.tokens, enc.mask)
    keep = attached.splice.keep_mask(enc.tokens, resid, enc.mask)
    masks = {"all": enc.mask.bool(), "stimulus": enc.stimulus_mask,
             "readout": torch.nn.functional.one_hot(enc.readout, enc.mask.shape[1]).bool()}
    pos = enc.readout.unsqueeze(1)
    clean, _ = readouts.scores(attached.split.suffix(resid, state, pos)[:, 0])
    target = Target("sae.hook_latents", (3, 5), "group")
    cases = [Condition("scale", 4.0, "all", 4.0), Condition("set", 2.0, "all", 2.0),
             Condition("add", 3.0, "stimulus", 3.0), Condition("zero", 0.0, "readout", 0.0)]
    for cond in cases:
        edited = attached.splice.edit(resid, keep & masks[cond.where], {target.point: make_edit(target, cond)})
        words, _ = readouts.scores(attached.split.suffix(edited, state, pos)[:, 0])
        got = df[(df.feature == "3,5") & (df.intervention == cond.kind) & (df.value == cond.value)
                 & (df.readout_kind == "word")]
        for i, (item, cell, prompt) in enumerate(zip(rows["item"], rows["cell"], rows["prompt_id"], strict=True)):
            mine = got[(got.item == str(item)) & (got.cell == cell) & (got.prompt_id == str(prompt))]
            order = [w for w, _ in readouts.word_ids]
            mine = mine.set_index("readout").loc[order]
            np.testing.assert_allclose(mine["score_edited"], words[i].double().numpy(), atol=1e-5, rtol=0)
            np.testing.assert_allclose(mine["score_clean"], clean[i].double().numpy(), atol=1e-5, rtol=0)
    assert df[(df.intervention == "scale") & (df.value == 4.0)]["shift"].abs().max() > 0


def test_stacked_deltas_of_identity_copies_are_exactly_zero(tiny_bridge, ckpt):
    attached = attach(tiny_bridge, ckpt)
    x = torch.randn(40, 64) * 3
    blocks = [(Target("sae.hook_latents", (3,), "g"), Condition("scale", 1.0, "all", 1.0)),
              (Target("secondary.hook_latents", (1,), "g"), Condition("scale", 1.0, "all", 1.0)),
              (Target("sae.hook_latents", (3,), "g"), Condition("set", 5.0, "all", 5.0))]
    edits = {p: stacked_edit(blocks, p, len(x)) for p in ("sae.hook_latents", "secondary.hook_latents")}
    deltas = attached.splice.stacked_deltas(x, len(blocks), edits)
    assert deltas.shape == (3, 40, 64)
    assert (deltas[:2] == 0).all() and deltas[2].abs().max() > 0


@pytest.mark.parametrize("dtype", [pytest.param(dtype, marks=accelerator.gpu) for dtype in ("float32", "bfloat16")])
def test_battery_on_cuda_matches_cpu_and_scale_one_is_exact(ckpt, tmp_path, dtype):
    from fis_interventions.models import load_model

    cpu = _run(load_model("tiny-random", device="cpu", dtype=dtype), _cfg(ckpt, tmp_path / "cpu", dtype=dtype))
    gpu_bridge = load_model("tiny-random", device=accelerator.ACCEL, dtype=dtype)
    gpu = _run(gpu_bridge, _cfg(ckpt, tmp_path / "gpu", device=accelerator.ACCEL, dtype=dtype))
    assert len(cpu) == len(gpu)
    tol = 1e-3 if dtype == "float32" else 5e-2  # bf16 weights: CPU and CUDA kernels round differently
    assert (cpu["shift"] - gpu["shift"]).abs().max() < tol
    ones = gpu[(gpu.intervention == "scale") & (gpu.value == 1.0)]
    assert len(ones) and (ones["shift"] == 0).all()


def test_rows_whose_residual_is_unchanged_skip_the_suffix(tiny_bridge, ckpt, tmp_path, monkeypatch):
    """scale 1 leaves every residual bit-identical: only the clean rows run through the suffix, and the edited
    rows get the clean logits (a shift of exactly 0); a real edit runs its rows."""
    from fis_interventions.splice import SplitModel

    seen: list[int] = []
    real = SplitModel.suffix

    def counting(self, resid, state, positions=None):
        seen.append(resid.shape[0])
        return real(self, resid, state, positions)

    monkeypatch.setattr(SplitModel, "suffix", counting)
    noop = _run(tiny_bridge, _cfg(ckpt, tmp_path / "noop", interventions=[{"kind": "scale", "values": [1.0]}]))
    n_rows = noop.groupby(["item", "cell", "prompt_id"]).ngroups
    assert sum(seen) == n_rows and (noop["shift"] == 0).all()
    seen.clear()
    moved = _run(tiny_bridge, _cfg(ckpt, tmp_path / "moved", interventions=[{"kind": "set", "values": [5.0]}]))
    # clean + the SAE group's rows; the secondary feature cannot move anything in this untrained checkpoint
    # (the NFM's output layer starts at zero), so its rows are the clean ones
    assert sum(seen) == 2 * n_rows
    kl = moved[moved.readout_kind == "kl"]
    assert (kl[kl.point == "sae.hook_latents"]["shift"] > 0).all()
    assert (kl[kl.point == "secondary.hook_latents"]["shift"] == 0).all()
