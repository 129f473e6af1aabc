"""Every registered model family (and the generic fallback) through the split forward and the whole pipeline.

Tiny random-init models of each family (4 layers, d_model 64, the default tokenizer's vocabulary) are built
from ``transformers`` config classes, offline. For each: prefix == the bridge's hook value, prefix + suffix ==
the bridge's logits, a padded batch == each stimulus alone, a no-op edit == clean logits and a real edit
moves them identically on the fast and the generic path; then harvest -> train -> eval -> screen -> battery ->
report end to end from a local HF folder. The generic path is forced on GPT-2 for the same checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fis_interventions.activations import ExclusionRule, Normalizer
from fis_interventions.interventions.features import Condition, Target, make_edit
from fis_interventions.sae import JointArch, JointSAE, NFMArch, SAEArch
from fis_interventions.splice import JointSplice, SplitModel, pad_right
from fis_interventions.tiny_models import FAMILY_NAMES, family_bridge, save_family_folder

HOOK = "blocks.1.hook_resid_post"
TEXTS = ["Hello there, friend.", "A much longer sentence goes here now, with a clause or two.", "Hi"]
CASES = [(f, "auto") for f in FAMILY_NAMES] + [("gpt2", "generic")]
IDS = [f if p == "auto" else f"{f}-generic" for f, p in CASES]
ATOL = 1e-4


@pytest.fixture(scope="module")
def bridges(tokenizer):
    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = family_bridge(family, tokenizer)
        return cache[family]

    return get


def _seqs(tok) -> list[list[int]]:
    return [[tok.bos_token_id, *tok(t)["input_ids"]] for t in TEXTS]


@pytest.mark.parametrize(("family", "path"), CASES, ids=IDS)
def test_prefix_and_suffix_equal_the_bridge(bridges, family, path):
    bridge = bridges(family)
    split = SplitModel(bridge, HOOK, path=path)
    assert split.path == ("generic" if path == "generic" else f"fast:{family}")
    tokens = torch.tensor(_seqs(bridge.tokenizer)[1:2])
    resid, state = split.prefix(tokens)
    _, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n == split.hook.canonical)
    assert (resid - cache[split.hook.canonical]).abs().max().item() <= ATOL
    with torch.no_grad():
        full = bridge(tokens)
    assert (split.suffix(resid, state) - full).abs().max().item() <= ATOL


@pytest.mark.parametrize(("family", "path"), CASES, ids=IDS)
def test_padded_batch_equals_single_stimuli(bridges, family, path):
    bridge = bridges(family)
    split = SplitModel(bridge, HOOK, path=path)
    seqs = _seqs(bridge.tokenizer)
    tokens, mask = pad_right(seqs, bridge.tokenizer.pad_token_id)
    resid, state = split.prefix(tokens, mask)
    last = mask.sum(1, keepdim=True) - 1
    batched = split.suffix(resid, state, positions=last)[:, 0]
    stacked = split.suffix(resid.repeat(3, 1, 1), state.repeat(3), positions=last.repeat(3, 1))[:, 0]
    with torch.no_grad():
        for i, seq in enumerate(seqs):
            alone = bridge(torch.tensor([seq]))[0, -1]
            assert (batched[i] - alone).abs().max().item() <= ATOL
    assert (stacked[2 * len(seqs):] - batched).abs().max().item() <= 1e-6


def _splice(bridge) -> JointSplice:
    torch.manual_seed(1)
    d = int(bridge.cfg.d_model)
    joint = JointSAE(JointArch(sae=SAEArch(d_in=d, d_sae=2 * d, k=8), nfm=NFMArch(emb_dim=8, hidden=16))).eval()
    return JointSplice(joint, Normalizer("expected_norm", scale=1.0), ExclusionRule.for_tokenizer(bridge.tokenizer,
                                                                                                   None))


@pytest.mark.parametrize(("family", "path"), CASES, ids=IDS)
def test_noop_edit_is_clean_and_edits_agree_with_generic_path(bridges, family, path):
    bridge = bridges(family)
    split = SplitModel(bridge, HOOK, path=path)
    other = SplitModel(bridge, HOOK, path="generic" if path == "auto" else "auto")
    splice = _splice(bridge)
    tokens, mask = pad_right(_seqs(bridge.tokenizer), bridge.tokenizer.pad_token_id)
    resid, state = split.prefix(tokens, mask)
    keep = splice.keep_mask(tokens, resid, mask)
    clean = split.suffix(resid, state)
    noop = make_edit(Target("sae.hook_latents", (0,), "x"), Condition("scale", 1.0, "all", 1.0))
    assert (split.suffix(splice.edit(resid, keep, {"sae.hook_latents": noop}), state) - clean).abs().max() == 0
    big = make_edit(Target("sae.hook_latents", (0, 1, 2), "x"), Condition("set", 20.0, "all", 20.0))
    edited = splice.edit(resid, keep, {"sae.hook_latents": big})
    moved = split.suffix(edited, state)
    real = mask.bool()
    assert (moved - clean)[real].abs().max().item() > 1e-3, "a real clamp must move the logits"
    resid2, state2 = other.prefix(tokens, mask)
    assert (resid2 - resid)[real].abs().max().item() <= ATOL
    assert (other.suffix(edited, state2) - moved)[real].abs().max().item() <= ATOL


@pytest.mark.parametrize(("family", "path"), CASES, ids=IDS)
def test_pipeline_end_to_end_from_a_local_folder(tokenizer, tmp_path, monkeypatch, family, path):
    """harvest -> train -> eval -> screen -> battery -> report on a local HF folder of the family."""
    from fis_interventions import demo as demo_mod
    from fis_interventions.interventions import read_results

    if path == "generic":
        monkeypatch.setenv("FIS_SPLIT_PATH", "generic")
    monkeypatch.setitem(demo_mod.SIZES["quick"], "max_items", 2)  # a two-item design
    model = save_family_folder(family, tokenizer, tmp_path / "model")
    res = demo_mod.demo(out=tmp_path / "run", quick=True, model=str(model), report_dir=tmp_path / "report",
                        echo=lambda _: None, progress=False)
    assert res["report"].exists()
    df = read_results(res["battery"])
    assert df["item"].nunique() == 2
    noop = df[(df.intervention == "scale") & (df.value == 1.0)]
    assert len(noop) > 0 and (noop["shift"] == 0).all()
    moved = df[(df.intervention == "scale") & (df.value == 4.0) & (df.readout_kind == "kl")]
    assert moved["shift"].max() > 0
    meta = json.loads((Path(res["battery"]).parent / "run.json").read_text())
    assert meta["split_path"] == ("generic" if path == "generic" else f"fast:{family}")
    assert meta["model"] == str(model.resolve())
