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
from fis_interventions.tiny_models import FAMILY_NAMES, save_family_folder

HOOK = "blocks.1.hook_resid_post"
ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Hello there, friend.", "A much longer sentence goes here now, with a clause or two.", "Hi"]
CASES = [(f, "auto") for f in FAMILY_NAMES] + [("gpt2", "generic")]
IDS = [f if p == "auto" else f"{f}-generic" for f, p in CASES]
ATOL = 1e-4



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
    # padded wider, with the suffix's state rebuilt without a prefix pass (the attribution screen merges short
    # batches that way): the same logits at the real positions
    extra = 3
    wide_tokens = torch.cat([tokens, tokens.new_full((len(seqs), extra), bridge.tokenizer.pad_token_id)], 1)
    wide_mask = torch.cat([mask, mask.new_zeros(len(seqs), extra)], 1)
    wide = torch.cat([resid, resid.new_zeros(len(seqs), extra, resid.shape[-1])], 1)
    merged = split.suffix(wide, split.state_for(wide_tokens, wide_mask), positions=last)[:, 0]
    assert (merged - batched).abs().max().item() <= 1e-5
    # a few columns of the unembedding (the attribution screen's logit readouts) equal those of the full logits
    vocab = torch.tensor([5, 0, 17, 3])
    columns = split.suffix(resid, state, positions=last, vocab=vocab)[:, 0]
    assert columns.shape == (len(seqs), len(vocab))
    assert (columns - batched[:, vocab]).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("family", "path"), CASES, ids=IDS)
def test_packed_rows_equal_each_row_alone(bridges, family, path):
    """Rows sharing a prefix packed into one sequence (the prefix once, then each row's tail at its own positions,
    a segment mask): the residual at every position and the logits at each tail's last position equal the row's
    own; the generic path and too short a sliding window refuse to pack."""
    from fis_interventions.splice import Packing

    bridge = bridges(family)
    split = SplitModel(bridge, HOOK, path=path)
    tok = bridge.tokenizer
    shared = [tok.bos_token_id, *tok("The letter from the lawyers")["input_ids"]]
    tails = [tok(" was short.")["input_ids"], tok(" arrived late, again and again")["input_ids"], []]
    rows = [shared + t for t in tails]
    packed = shared + [i for t in tails for i in t]
    L = len(shared)
    positions = list(range(L)) + [L + j for t in tails for j in range(len(t))]
    segments = [0] * L + [k + 1 for k, t in enumerate(tails) for _ in t]
    width = len(packed) + 2  # right padding after the packed sequence
    tokens = torch.tensor([packed + [tok.pad_token_id] * 2])
    mask = torch.tensor([[1] * len(packed) + [0] * 2])
    packing = Packing(torch.tensor([positions + [0, 0]]), torch.tensor([segments + [-1, -1]]))
    if not split.can_pack(width):
        assert path == "generic" or family in ("gemma2", "qwen2", "phi3")
        with pytest.raises(ValueError, match="can_pack"):
            split.prefix(tokens, mask, packing)
        return
    resid, state = split.prefix(tokens, mask, packing)
    ends, start = [], L
    for t in tails:  # a row with no tail (the shared prefix itself) reads at the prefix's last position
        start += len(t)
        ends.append(start - 1 if t else L - 1)
    logits = split.suffix(resid, state, positions=torch.tensor([ends]))[0]
    offset = L
    for k, row in enumerate(rows):
        alone_resid, alone_state = split.prefix(torch.tensor([row]))
        alone = split.suffix(alone_resid, alone_state)[0, -1]
        assert (logits[k] - alone).abs().max().item() <= ATOL
        assert (resid[0, :L] - alone_resid[0, :L]).abs().max().item() <= ATOL
        n = len(tails[k])
        if n:
            assert (resid[0, offset:offset + n] - alone_resid[0, L:]).abs().max().item() <= ATOL
        offset += n


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
    """harvest -> train -> eval -> screen -> battery -> report from a local HF folder, two items of a design."""
    import yaml

    from fis_interventions import api
    from fis_interventions.interventions import read_results

    if path == "generic":
        monkeypatch.setenv("FIS_SPLIT_PATH", "generic")
    from fis_interventions.interventions import BatteryConfig
    from fis_interventions.models import load_model

    model = str(save_family_folder(family, tokenizer, tmp_path / "model"))
    bridge = load_model(model, device="cpu")  # loaded once from the folder, shared by the stages
    acts = tmp_path / "acts"
    api.harvest(bridge=bridge, model=model, hook=HOOK, out=acts, tokens=1200, context_length=32, progress=False)
    train_cfg = dict(activations=str(acts), d_sae=128, k=8, mode="joint", emb_dim=8, hidden=8, batch_size=128,
                     tokens=128 * 6, lr=1e-3, warmup_steps=2, eval_every=3, checkpoint_every=3,
                     heldout_fraction=0.1, secondary={"d_sae": 32, "k": 4, "steps": 3})
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train_cfg))
    ckpt = api.train(tmp_path / "train.yaml", tmp_path / "joint", progress=False).checkpoint
    table, _ = api.eval([ckpt], bridge=bridge, max_contexts=2, progress=False, organisation=False)
    assert any(r["components"] == "full" for r in table["table"])
    design = ROOT / "stimuli" / "negation_sentiment.yaml"
    api.screen(ckpt, design, bridge=bridge, out=tmp_path / "screen", progress=False)
    battery_cfg = dict(name="fam", model=model, checkpoint=str(ckpt), designs=[str(design)], max_items=2,
                       features=[{"from_screening": str(tmp_path / "screen"), "point": "secondary.hook_latents",
                                  "top": 1, "role": "top"},
                                 {"point": "sae.hook_latents", "index": 0, "role": "control"}],
                       interventions=[{"kind": "scale", "values": [1.0]}, {"kind": "set", "values": [20.0]}],
                       batch_size=16,
                       out=str(tmp_path / "battery"), device="cpu")
    store = api.battery(BatteryConfig.model_validate(battery_cfg), bridge=bridge, progress=False)
    report = api.report(tmp_path / "battery", out=tmp_path / "report")
    assert (Path(report) / "report.html").exists()
    df = read_results(store)
    assert df["item"].nunique() == 2
    noop = df[df.intervention == "scale"]
    assert len(noop) > 0 and (noop["shift"] == 0).all()
    moved = df[(df.intervention == "set") & (df.readout_kind == "kl")]
    assert moved.groupby("point")["shift"].max().min() > 0  # a clamp moves the readout at both points
    meta = json.loads((tmp_path / "battery" / "run.json").read_text())
    assert meta["split_path"] == ("generic" if path == "generic" else f"fast:{family}")
    assert meta["model"] == str((tmp_path / "model").resolve())


def test_architecture_without_adapter_takes_the_generic_path(tokenizer):
    """Qwen3 has no adapter: SplitModel picks the bridge-hook path by itself and still equals the bridge."""
    import transformers as tf
    from transformer_lens.model_bridge import TransformerBridge

    cfg = tf.Qwen3Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, head_dim=16, vocab_size=len(tokenizer),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    hf = tf.AutoModelForCausalLM.from_config(cfg).eval()
    bridge = TransformerBridge.boot_transformers("qwen3", hf_model=hf, tokenizer=tokenizer, device="cpu",
                                                 dtype=torch.float32)
    split = SplitModel(bridge, HOOK)
    assert split.path == "generic"
    tokens, mask = pad_right(_seqs(tokenizer), tokenizer.pad_token_id)
    resid, state = split.prefix(tokens, mask)
    last = mask.sum(1, keepdim=True) - 1
    batched = split.suffix(resid, state, positions=last)[:, 0]
    with torch.no_grad():
        for i, seq in enumerate(_seqs(tokenizer)):
            assert (batched[i] - bridge(torch.tensor([seq]))[0, -1]).abs().max().item() <= ATOL


def test_model_info_names_the_split_path(tokenizer, tmp_path):
    from fis_interventions.models import model_info

    folder = save_family_folder("gpt_neox", tokenizer, tmp_path / "neox")
    info = model_info(str(folder), device="cpu")
    assert info["architecture"] == "GPTNeoXForCausalLM" and info["split_path"].startswith("fast:gpt_neox")
