"""Harvesting: shards, manifest, normalisation, exclusion, resume and bad inputs, on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fis_interventions.activations import (ActivationStore, ExclusionRule, HarvestConfig, Normalizer, RunningStats,
                                           capture_hook, harvest)
from fis_interventions.activations import shards as shards_mod
from fis_interventions.cli import main
from fis_interventions.errors import FisError

HOOK = "blocks.1.hook_resid_post"


def _harvest(bridge, out: Path, corpus: Path, **kw):
    args = dict(model="tiny-random", hook=HOOK, corpus=[str(corpus)], out=out, tokens=400, context_length=32,
                batch_size=4, contexts_per_shard=4)
    args.update(kw)
    return harvest(bridge=bridge, progress=False, **args)


def test_manifest_and_shards(tiny_bridge, text_corpus, tmp_path):
    m = _harvest(tiny_bridge, tmp_path / "a", text_corpus)
    assert m["complete"] and m["hook"] == HOOK and m["hook_canonical"] == "blocks.1.hook_out"
    assert m["layer"] == 1 and m["d_model"] == 64 and m["context_length"] == 32
    n_ctx = sum(s["n_contexts"] for s in m["shards"])
    assert n_ctx == m["n_contexts_planned"] == -(-400 // 31)
    # every context's BOS is excluded, so at most 31 kept tokens per context
    assert m["excluded"]["special"] >= n_ctx
    assert m["token_count"] + m["excluded"]["special"] + m["excluded"]["massive"] == n_ctx * 32
    assert m["token_count"] == sum(s["n_tokens"] for s in m["shards"])
    for key in ("versions", "git"):
        assert key in m["provenance"]
    assert "torch" in m["provenance"]["versions"]
    assert m["exclusion"]["median_norm"] > 0 and m["normalization"]["kind"] == "expected_norm"
    assert not list((tmp_path / "a").glob(".*tmp"))


def test_harvested_values_equal_run_with_cache(tiny_bridge, text_corpus, tmp_path):
    _harvest(tiny_bridge, tmp_path / "a", text_corpus)
    store = ActivationStore(tmp_path / "a")
    from safetensors.torch import load_file

    shard = load_file(str(store.shard_paths()[0]))
    tokens = shard["tokens"].long()
    keep = shard["keep"].bool()
    _, cache = tiny_bridge.run_with_cache(tokens, names_filter=lambda n: n == "blocks.1.hook_out")
    expected = cache["blocks.1.hook_out"][keep]
    assert torch.allclose(shard["acts"], expected, atol=1e-5)
    assert not keep[:, 0].any(), "BOS positions must be excluded"


def test_normalisation_roundtrip_and_expected_norm(tiny_bridge, text_corpus, tmp_path):
    _harvest(tiny_bridge, tmp_path / "a", text_corpus)
    store = ActivationStore(tmp_path / "a")
    raw = torch.cat([store.activations("train", normalized=False), store.activations("heldout", normalized=False)])
    norm = store.normalizer
    x = norm.apply(raw)
    assert x.norm(dim=-1).mean().item() == pytest.approx(64**0.5, rel=1e-4)
    assert torch.allclose(norm.invert(x), raw, atol=1e-4)


def test_zscore_normalizer_hand_computed():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    stats = RunningStats(2)
    stats.update(x)
    z = Normalizer.from_stats(stats, "zscore")
    assert z.mean == pytest.approx([2.0, 4.0]) and z.std == pytest.approx([1.0, 2.0])
    assert torch.allclose(z.apply(x), torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    assert torch.allclose(z.invert(z.apply(x)), x)
    assert torch.allclose(z.invert_delta(torch.ones(2)), torch.tensor([1.0, 2.0]))
    e = Normalizer.from_stats(stats, "expected_norm")
    mean_norm = (5**0.5 + 45**0.5) / 2
    assert e.scale == pytest.approx(2**0.5 / mean_norm)
    assert Normalizer.from_dict(e.to_dict()) == e


def test_exclusion_rule_special_and_massive():
    rule = ExclusionRule(special_ids=[1, 2], norm_multiple=10.0)
    tokens = torch.tensor([[1, 5, 6, 2, 7]])
    acts = torch.ones(1, 5, 3)
    acts[0, 4] *= 100.0  # a massive activation
    rule.calibrate(tokens, acts)
    assert rule.median_norm == pytest.approx(3**0.5)
    keep = rule.keep_mask(tokens, acts)
    assert keep.tolist() == [[False, True, True, False, False]]
    assert ExclusionRule.from_dict(rule.to_dict()).keep_mask(tokens, acts).tolist() == keep.tolist()


def test_resume_after_interruption_matches_uninterrupted(tiny_bridge, text_corpus, tmp_path, monkeypatch):
    full = _harvest(tiny_bridge, tmp_path / "full", text_corpus)
    real_write = shards_mod.write_shard
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)

    import fis_interventions.activations.harvester as harvest_mod

    monkeypatch.setattr(harvest_mod, "write_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        _harvest(tiny_bridge, tmp_path / "part", text_corpus)
    partial = json.loads((tmp_path / "part" / "manifest.json").read_text())
    assert len(partial["shards"]) == 2 and not partial["complete"]
    assert sorted(p.name for p in (tmp_path / "part").glob("shard_*")) == ["shard_00000.safetensors",
                                                                         "shard_00001.safetensors"]
    monkeypatch.setattr(harvest_mod, "write_shard", real_write)
    resumed = _harvest(tiny_bridge, tmp_path / "part", text_corpus)
    assert resumed["token_count"] == full["token_count"]
    assert resumed["normalization"] == full["normalization"]
    a = ActivationStore(tmp_path / "full").activations("train", normalized=False)
    b = ActivationStore(tmp_path / "part").activations("train", normalized=False)
    assert torch.equal(a, b)


def test_rerun_with_other_settings_is_refused(tiny_bridge, text_corpus, tmp_path):
    _harvest(tiny_bridge, tmp_path / "a", text_corpus)
    with pytest.raises(FisError, match="context_length"):
        _harvest(tiny_bridge, tmp_path / "a", text_corpus, context_length=16)


def test_batches_are_deterministic_and_resumable(tiny_bridge, text_corpus, tmp_path):
    _harvest(tiny_bridge, tmp_path / "a", text_corpus)
    store = ActivationStore(tmp_path / "a")
    it = store.iter_batches(16, seed=3)
    first = [next(it) for _ in range(6)]
    later = store.iter_batches(16, seed=3, start_batch=4)
    assert torch.equal(next(later), first[4]) and torch.equal(next(later), first[5])
    other = next(store.iter_batches(16, seed=4))
    assert not torch.equal(other, first[0])
    # train and held-out splits share no context
    held = store.contexts("heldout")
    train = store.contexts("train")
    assert len(held) > 0 and len(train) > 0
    assert len(held) + len(train) == store.manifest["n_contexts_planned"]


def test_capture_hook_stops_early(tiny_bridge):
    tokens = tiny_bridge.to_tokens(["hello there"])
    seen = []
    for i in range(4):
        tiny_bridge.hook_dict[f"blocks.{i}.hook_out"].add_hook(lambda x, hook: seen.append(hook.name) or x)
    try:
        capture_hook(tiny_bridge, tokens, "blocks.1.hook_out", 2)
    finally:
        tiny_bridge.reset_hooks()
    assert "blocks.3.hook_out" not in seen and "blocks.1.hook_out" in seen


@pytest.mark.parametrize("kwargs,match", [
    (dict(corpus=["/nonexistent/corpus.txt"]), "corpus not found"),
    (dict(hook="blocks.99.hook_resid_post"), "unknown hook point"),
    (dict(hook="hook_embed_nope"), "unknown hook point"),
])
def test_bad_inputs(tiny_bridge, tmp_path, kwargs, match):
    args = dict(model="tiny-random", out=tmp_path / "x", tokens=100, context_length=16)
    args.update(kwargs)
    with pytest.raises(FisError, match=match):
        harvest(bridge=tiny_bridge, progress=False, **args)
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_empty_corpus(tiny_bridge, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n", encoding="utf-8")
    with pytest.raises(FisError, match="has no text"):
        harvest(bridge=tiny_bridge, progress=False, model="tiny-random", corpus=[str(empty)], out=tmp_path / "x",
                tokens=100, context_length=16)


def test_jsonl_corpus_and_bad_jsonl(tiny_bridge, tmp_path):
    good = tmp_path / "c.jsonl"
    good.write_text("\n".join(json.dumps({"text": "A sentence about cats and dogs. " * 20}) for _ in range(3)))
    m = harvest(bridge=tiny_bridge, progress=False, model="tiny-random", corpus=[str(good)], out=tmp_path / "g",
                tokens=200, context_length=16, hook=HOOK)
    assert m["token_count"] > 0
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"txt": "no text field"}\n')
    with pytest.raises(FisError, match="line 1: each JSON line needs a string 'text' field"):
        harvest(bridge=tiny_bridge, progress=False, model="tiny-random", corpus=[str(bad)], out=tmp_path / "b",
                tokens=200, context_length=16)


def test_cli_errors_exit_2_without_traceback(capsys, tmp_path):
    assert main(["harvest", "--model", "no-such-model", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["harvest", "--model", "tiny-random", "--hook", "blocks.50.hook_resid_post", "--out",
                 str(tmp_path / "o")]) == 2
    assert "unknown hook point" in capsys.readouterr().err


def test_cli_model_info(capsys):
    assert main(["model", "info", "tiny-random", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_layers"] == 4 and info["d_model"] == 64 and info["tokenizer"]["bos"] == "<|im_start|>"
    assert "hook_resid_post" in info["hook_points_per_block"]
