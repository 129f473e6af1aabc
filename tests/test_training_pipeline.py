"""`fis train` on harvested shards, then `fis eval`: checkpoints carry model, hook, normalisation, exclusion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from fis_interventions.activations import harvest
from fis_interventions.cli import main
from fis_interventions.errors import FisError
from fis_interventions.evaluation import comparison_table, evaluate, format_table
from fis_interventions.sae import load_checkpoint
from fis_interventions.training import train
from tiny_activations import harvest_sentences

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_bridge) -> Path:
    return harvest_sentences(tmp_path_factory.mktemp("pipe"), tiny_bridge, "Sentence number {i} talks about cats, "
                             "dogs and the weather today.", 400, hook=HOOK, tokens=6000, context_length=32)


def _cfg(shards: Path, mode: str, **kw) -> dict:
    cfg = dict(activations=str(shards), d_sae=128, k=8, mode=mode, emb_dim=16, hidden=16, batch_size=128,
               tokens=128 * 30, lr=1e-3, warmup_steps=5, eval_every=10, checkpoint_every=10, heldout_fraction=0.1)
    cfg.update(kw)
    return cfg


def test_train_records_model_hook_and_preprocessing(shards, tmp_path):
    result = train(_to_cfg(_cfg(shards, "joint")), tmp_path / "joint", progress=False)
    ck = load_checkpoint(result.checkpoint)
    assert ck.model_name == "tiny-random" and ck.hook == HOOK
    assert ck.normalization["exclusion"]["special_ids"] and ck.normalization["kind"] == "expected_norm"
    lines = [json.loads(x) for x in (tmp_path / "joint" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "heldout" for r in lines)
    with pytest.raises(FisError, match="trained on model 'tiny-random'"):
        load_checkpoint(result.checkpoint, expect_model="smollm2-135m")


def _to_cfg(d: dict):
    from fis_interventions.sae import TrainConfig

    return TrainConfig.model_validate(d)


def test_cli_train_and_eval_compare(shards, tmp_path, tiny_bridge, monkeypatch, capsys):
    for mode in ("sae", "joint"):
        cfg_file = tmp_path / f"{mode}.yaml"
        cfg_file.write_text(yaml.safe_dump(_cfg(shards, mode)))
        assert main(["train", str(cfg_file), "--out", str(tmp_path / mode), "--no-progress"]) == 0
    evs = [evaluate(tmp_path / m / "checkpoint", bridge=tiny_bridge, max_contexts=8, progress=False)
           for m in ("sae", "joint")]
    s = evs[1].summary
    assert set(s["reconstruction"]) == {"sae", "sae+linear", "sae+interaction", "full"}
    for key in ("zero", "random@sae", "random@full", "clean", "full"):
        assert key in s["spliced"]
    assert s["spliced"]["zero"]["kl"] > 0 and s["spliced"]["full"]["kl"] >= 0
    assert 0 < s["reconstruction"]["full"]["fvu"] < 1.5
    table = comparison_table(evs)
    assert table["baseline"] == "sae"
    rows = {(r["checkpoint"], r["components"]): r for r in table["table"]}
    assert ("joint", "interaction gain (full vs sae+linear)") in rows
    full = rows[("joint", "full")]
    assert full["fvu_vs_standalone"] == pytest.approx(1 - s["reconstruction"]["full"]["fvu"] /
                                                      evs[0].summary["reconstruction"]["sae"]["fvu"])
    lo, hi = full["kl_vs_standalone_ci"]
    assert lo <= full["kl_vs_standalone"] <= hi
    assert "interaction gain" in format_table(table)
    assert (tmp_path / "joint" / "eval.json").exists()


def test_resume_via_cli_refuses_other_config(shards, tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(_cfg(shards, "sae")))
    assert main(["train", str(cfg_file), "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    assert main(["train", str(cfg_file), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    cfg_file.write_text(yaml.safe_dump(_cfg(shards, "sae", k=4)))
    assert main(["train", str(cfg_file), "--out", str(tmp_path / "r"), "--resume", "--no-progress"]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**_cfg(shards, "sae"), "learning_rate": 1}))
    assert main(["train", str(bad), "--out", str(tmp_path / "b")]) == 2


def test_spliced_reconstruction_is_exact_with_identity(shards, tiny_bridge):
    """Splicing a perfect reconstruction must give the clean logits: checks scale inversion and hook."""
    from fis_interventions.activations import ActivationStore
    from fis_interventions.splice import JointSplice, SplitModel

    store = ActivationStore(shards)

    class Identity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, components, edit=None):
            return type("O", (), {"recon": x})()

    splice = JointSplice(Identity(), store.normalizer, store.exclusion)
    split = SplitModel(tiny_bridge, HOOK)
    tokens = store.contexts("heldout")[:2]
    resid, state = split.prefix(tokens)
    keep = splice.keep_mask(tokens, resid)
    spliced = splice.reconstruct(resid, keep)
    assert (split.suffix(spliced, state) - split.suffix(resid, state)).abs().max() < 1e-4


@pytest.mark.real_model
def test_real_model_harvest_train_eval(real_bridge, tmp_path):
    """End to end on SmolLM2: harvest, train a joint model briefly, splice it back and evaluate."""
    acts = tmp_path / "acts"
    harvest(bridge=real_bridge, model="smollm2-135m", out=acts, tokens=2500, context_length=64, progress=False)
    cfg = _to_cfg(dict(activations=str(acts), d_sae=1152, k=16, mode="joint", emb_dim=16, hidden=16,
                       batch_size=256, tokens=256 * 30, lr=1e-3, warmup_steps=2, eval_every=5,
                       checkpoint_every=100, heldout_fraction=0.1))
    result = train(cfg, tmp_path / "joint", progress=False)
    ev = evaluate(result.checkpoint, bridge=real_bridge, max_contexts=3, progress=False).summary
    assert ev["hook"] == "blocks.14.hook_resid_post" and ev["model"] == "smollm2-135m"
    sp = ev["spliced"]
    # a trained reconstruction beats zero ablation, and the clean CE of a real LM is far below log(vocab)
    assert sp["full"]["kl"] < sp["zero"]["kl"] and sp["full"]["ce"] < sp["zero"]["ce"]
    assert sp["clean"]["ce"] < 6.0
    held = [json.loads(x) for x in (tmp_path / "joint" / "metrics.jsonl").read_text().splitlines()]
    held = [r["full/fvu"] for r in held if r["split"] == "heldout"]
    assert held[-1] < 0.8 * held[0], held
    assert ev["reconstruction"]["full"]["fvu"] == pytest.approx(held[-1], rel=0.2)


def test_refit_lstsq_checkpoint_lowers_training_error(shards, tmp_path, tiny_bridge):
    cfg_file = tmp_path / "sae.yaml"
    cfg_file.write_text(yaml.safe_dump(_cfg(shards, "sae", tokens=128 * 5)))
    assert main(["train", str(cfg_file), "--out", str(tmp_path / "sae"), "--no-progress"]) == 0
    assert main(["refit", str(tmp_path / "sae" / "checkpoint"), "--out", str(tmp_path / "refit")]) == 0
    from fis_interventions.activations import ActivationStore

    store = ActivationStore(shards)
    x = store.activations("train")
    before = load_checkpoint(tmp_path / "sae" / "checkpoint").model
    after = load_checkpoint(tmp_path / "refit" / "checkpoint").model
    err = lambda m: float((m(x, "sae").recon.detach() - x).square().sum())  # noqa: E731
    assert err(after) < err(before)
    assert not after.cfg.sae.normalize_decoder
    assert main(["refit", str(tmp_path / "refit" / "checkpoint"), "--out", str(tmp_path / "r2")]) == 0


def test_eval_aggregates_seeds(shards, tmp_path, tiny_bridge):
    evs = []
    for seed in (0, 1):
        result = train(_to_cfg(_cfg(shards, "joint", seed=seed, tokens=128 * 5)), tmp_path / f"s{seed}",
                       progress=False)
        evs.append(evaluate(result.checkpoint, bridge=tiny_bridge, max_contexts=4, progress=False, name=f"s{seed}"))
    assert (tmp_path / "s0" / "organisation.png").stat().st_size > 5000
    table = comparison_table(evs)
    rows = {r["components"]: r for r in table["seeds"]}
    assert rows["full"]["n_seeds"] == 2 and rows["full"]["checkpoints"] == ["s0", "s1"]
    fvus = [e.summary["reconstruction"]["full"]["fvu"] for e in evs]
    assert rows["full"]["fvu_mean"] == pytest.approx(sum(fvus) / 2)
    assert rows["full"]["fvu_sd"] == pytest.approx(abs(fvus[0] - fvus[1]) / 2**0.5)
    assert "across seeds" in format_table(table)


def test_small_harvest_with_the_default_heldout_fraction_is_a_clear_error(shards, tmp_path):
    cfg = _cfg(shards, "sae", batch_size=512)
    del cfg["heldout_fraction"]  # the default 0.01 holds out every 100th context: ~2 contexts of this harvest
    with pytest.raises(FisError, match=r"heldout_fraction 0\.01 holds out every 100th context.*batch_size/4 = 128"):
        train(_to_cfg(cfg), tmp_path / "small", progress=False)
    assert not (tmp_path / "small" / "checkpoint").exists()


def test_train_device_defaults_to_auto_and_the_cli_overrides_it(shards, tmp_path, monkeypatch):
    import fis_interventions.training as training

    assert _to_cfg(_cfg(shards, "sae")).device == "auto"  # as harvest, eval, screen and battery
    seen: dict = {}

    def fake_train(config, out, **kw):
        seen.update(kw)
        raise FisError("stop here")

    monkeypatch.setattr(training, "train", fake_train)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(_cfg(shards, "sae")))
    assert main(["train", str(cfg_file), "--out", str(tmp_path / "o"), "--device", "cuda:1", "--no-progress"]) == 2
    assert seen["device"] == "cuda:1"
