"""Interop edges with other tools' SAEs and other models' tokenizers: each is either right or said in one line.

- ``sae_checkpoint:`` takes d_sae / k from the SAE (a contradicting value is a one-line error);
- a SAELens SAE whose ``model_name`` is not the loaded model is used with a warning naming both;
- ``fis eval`` of a SAELens folder writes ``eval.json`` into that folder, not into the parent it shares;
- the evaluation table's MSE is in one unit, the residual stream's own (``mse_raw``);
- a tokenizer without BOS gets its EOS prepended, and the harvest manifest says so.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from fis_interventions.errors import FisError
from fis_interventions.sae import load_checkpoint

DATA = Path(__file__).parent / "data" / "saelens"


def test_sae_checkpoint_shape_is_read_from_the_sae_and_contradictions_are_refused(tmp_path):
    from fis_interventions.sae import TrainConfig
    from fis_interventions.training import with_frozen_sae_shape

    base = dict(activations=str(tmp_path), mode="sequential", sae_checkpoint=str(DATA / "topk"))
    cfg = with_frozen_sae_shape(TrainConfig.model_validate(base))  # neither d_sae nor expansion: allowed
    assert (cfg.d_sae, cfg.expansion, cfg.k) == (128, None, 8)
    assert with_frozen_sae_shape(TrainConfig.model_validate({**base, "d_sae": 128, "k": 8})).d_sae == 128
    for bad, field in (({"d_sae": 256}, "d_sae"), ({"expansion": 4}, "expansion"), ({"k": 32}, "k")):
        with pytest.raises(FisError, match=f"{field}: .* contradicts sae_checkpoint") as err:
            with_frozen_sae_shape(TrainConfig.model_validate({**base, **bad}))
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="exactly one of d_sae and expansion"):
        TrainConfig.model_validate({"activations": str(tmp_path), "mode": "joint"})


def test_saelens_sae_of_another_model_name_is_used_with_a_warning(tokenizer, tmp_path, caplog):
    from fis_interventions.attach import attach
    from fis_interventions.tiny_models import family_bridge

    bridge = family_bridge("gpt2", tokenizer)
    with caplog.at_level(logging.WARNING, logger="fis_interventions.attach"):
        attach(bridge, DATA / "topk")  # trained on "tiny-gpt2": no warning
    assert not [r for r in caplog.records if "was trained on model" in r.getMessage()]
    other = shutil.copytree(DATA / "topk", tmp_path / "topk")
    cfg = json.loads((other / "cfg.json").read_text())
    cfg["metadata"]["model_name"] = "gpt2-xl"
    (other / "cfg.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="fis_interventions.attach"):
        attach(bridge, other)
    msgs = [r.getMessage() for r in caplog.records if "was trained on model" in r.getMessage()]
    assert len(msgs) == 1 and "'gpt2-xl'" in msgs[0] and "'tiny-gpt2'" in msgs[0]


def test_eval_of_a_saelens_folder_writes_into_that_folder():
    from fis_interventions.evaluation import eval_folder

    for arch in ("topk", "jumprelu"):  # siblings: each its own eval.json, none overwrites another
        assert eval_folder(load_checkpoint(DATA / arch)) == DATA / arch


def test_mse_is_reported_in_the_residual_streams_units():
    from fis_interventions.activations import Normalizer
    from fis_interventions.sae import JointArch, JointSAE, SAEArch
    from fis_interventions.sae.train import evaluate_reconstruction

    torch.manual_seed(0)
    model = JointSAE(JointArch(sae=SAEArch(d_in=16, d_sae=32, k=4)))
    norm = Normalizer("expected_norm", scale=0.25)
    x = norm.apply(torch.randn(64, 16) * 4)
    rec = evaluate_reconstruction(model, [x], ("sae",), invert=norm.invert)["sae"]
    assert rec["mse_raw"] == pytest.approx(rec["mse"] / 0.25**2, rel=1e-6)


def test_a_tokenizer_without_bos_gets_eos_and_the_manifest_says_so(tokenizer, tmp_path, text_corpus, caplog):
    from fis_interventions.activations import harvest
    from fis_interventions.models import load_model
    from fis_interventions.tiny_models import save_family_folder

    tok = copy.deepcopy(tokenizer)
    tok.bos_token = None
    folder = save_family_folder("llama", tok, tmp_path / "nobos", n_layers=2, d_model=32)
    with caplog.at_level(logging.WARNING, logger="fis_interventions.models"):
        bridge = load_model(str(folder), device="cpu")
    if bridge.tokenizer.bos_token_id != bridge.tokenizer.eos_token_id:
        pytest.fail("the bridge no longer substitutes EOS for a missing BOS: revisit models.prepended_token")
    assert any("has no BOS token" in r.getMessage() for r in caplog.records)
    manifest = harvest(bridge=bridge, model=str(folder), hook="blocks.0.hook_resid_post", corpus=[str(text_corpus)],
                       out=tmp_path / "acts", tokens=200, context_length=16, progress=False)
    assert manifest["prepended_token"]["kind"].startswith("eos")
    assert "EOS (the tokenizer has no BOS token)" in manifest["bos_handling"]
