"""A model given by path is identified by its content: an identical copy elsewhere is the same model, another
model at the same path is refused (one line naming the checkpoint, the recorded model and the fix); outputs
written before the digest existed are matched by path with a warning."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fis_interventions.cli import main
from fis_interventions.errors import FisError
from fis_interventions.model_identity import ModelId, check_same_model, content_digest
from fis_interventions.models import _tiny_hf_model, load_model, load_tokenizer
from fis_interventions.sae import load_checkpoint
from fis_interventions.training import train
from tiny_activations import harvest_sentences

HOOK = "blocks.1.hook_resid_post"
DESIGN = Path(__file__).resolve().parents[1] / "stimuli" / "negation_sentiment.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model saved as a HF folder, a harvest of it and a checkpoint trained on that harvest."""
    from fis_interventions.sae import TrainConfig

    root = tmp_path_factory.mktemp("identity")
    folder = root / "model"
    tok = load_tokenizer()
    _tiny_hf_model(tok, seed=3).save_pretrained(folder)
    tok.save_pretrained(folder)
    bridge = load_model(str(folder), device="cpu")
    acts = harvest_sentences(root, bridge, "Sentence {i} is about rain and the sea.", 200, model=str(folder),
                             hook=HOOK, tokens=3000, context_length=32)
    cfg = TrainConfig.model_validate(dict(activations=str(acts), d_sae=128, k=8, mode="sae", batch_size=128,
                                          tokens=128 * 6, lr=1e-3, warmup_steps=2, eval_every=3,
                                          checkpoint_every=3, heldout_fraction=0.1))
    ckpt = train(cfg, root / "run", progress=False).checkpoint
    return folder, acts, ckpt


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def _perturb(folder: Path) -> None:
    """Change one weight of the model in place (same path, other content)."""
    file = folder / "model.safetensors"
    state = load_file(str(file))
    name = sorted(n for n in state if n.endswith("weight"))[0]
    state[name] = state[name].clone()
    state[name].view(-1)[0] += 1.0
    save_file(state, str(file), metadata={"format": "pt"})


def test_harvest_and_checkpoint_record_the_content_digest(trained):
    folder, acts, ckpt = trained
    digest = content_digest(folder)
    assert len(digest) == 64
    assert json.loads((acts / "manifest.json").read_text())["model_sha256"] == digest
    meta = json.loads((ckpt / "cfg.json").read_text())
    assert meta["model_name"] == str(folder.resolve()) and meta["model_sha256"] == digest


def test_an_identical_copy_elsewhere_is_accepted(trained, tmp_path, caplog):
    from fis_interventions.attach import attach
    from fis_interventions.screening import screen

    folder, _, ckpt = trained
    copy = _copy(folder, tmp_path / "elsewhere" / "same-model")
    assert content_digest(copy) == content_digest(folder)
    bridge = load_model(str(copy), device="cpu")
    attached = attach(bridge, ckpt)  # was: "checkpoint was trained on model '/.../model', not '/.../same-model'"
    assert attached.checkpoint.path == ckpt
    load_checkpoint(ckpt, expect_model=ModelId(str(copy.resolve()), content_digest(copy)))
    # fis screen --model COPY: checked before loading, by content
    res = screen(ckpt, DESIGN, model=str(copy), device="cpu", progress=False, permutations=0, random_init=False)
    assert res.summary["model_sha256"] == content_digest(folder)


def test_another_model_at_the_same_path_is_refused_in_one_line(trained, tmp_path, capsys):
    folder, acts, ckpt = trained
    moved = _copy(folder, tmp_path / "m")
    run = tmp_path / "run"
    shutil.copytree(ckpt.parent, run)  # a checkpoint recording the copy's path
    cfg = json.loads((run / "checkpoint" / "cfg.json").read_text())
    cfg["model_name"] = str(moved.resolve())
    (run / "checkpoint" / "cfg.json").write_text(json.dumps(cfg))
    _perturb(moved)
    bridge = load_model(str(moved), device="cpu")
    from fis_interventions.attach import attach

    with pytest.raises(FisError) as err:
        attach(bridge, run / "checkpoint")
    msg = str(err.value)
    assert str(run / "checkpoint") in msg and str(moved.resolve()) in msg and cfg["model_sha256"][:12] in msg
    assert "now has sha256" in msg and "fix:" in msg and "\n" not in msg
    # the CLI: one line, exit 2, no traceback
    code = main(["eval", str(run / "checkpoint"), "--activations", str(acts), "--model", str(moved),
                 "--max-contexts", "2", "--no-progress"])
    out = capsys.readouterr().err
    assert code == 2 and "now has sha256" in out and "Traceback" not in out


def test_a_different_model_elsewhere_is_refused_before_loading(trained, tmp_path, capsys):
    folder, _, ckpt = trained
    other = _copy(folder, tmp_path / "other")
    _perturb(other)
    code = main(["screen", "--checkpoint", str(ckpt), "--design", str(DESIGN), "--model", str(other),
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "was trained on model" in err and content_digest(folder)[:12] in err


def test_old_checkpoints_without_the_digest_match_by_path_with_a_note(caplog):
    old = ModelId("/models/m", None)
    with caplog.at_level(logging.WARNING):
        check_same_model(old, ModelId("/models/m", "a" * 64), source="ck")
    assert any("matched by path only" in r.getMessage() for r in caplog.records)
    with pytest.raises(FisError, match="records no content hash"):
        check_same_model(old, ModelId("/copy/m", "a" * 64), source="ck")
    # built-in names are compared by name, as before
    check_same_model(ModelId("tiny-random"), ModelId("tiny-random"), source="ck")
    with pytest.raises(FisError, match="trained on model 'tiny-random', not 'smollm2-135m'"):
        check_same_model(ModelId("tiny-random"), ModelId("smollm2-135m"), source="ck")


def test_the_digest_is_cached_and_follows_changes(tmp_path, monkeypatch):
    import fis_interventions.model_identity as mi

    monkeypatch.setenv("FIS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"w": torch.zeros(4)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"a": 1, "transformers_version": "5.0"}))
    (folder / "README.md").write_text("notes")
    first = content_digest(folder)
    calls = []
    real = mi.file_digest
    monkeypatch.setattr(mi, "file_digest", lambda p: calls.append(p) or real(p))
    assert content_digest(folder) == first and calls == []  # remembered: no file read again
    (folder / "README.md").write_text("other notes")  # not part of the model
    (folder / "config.json").write_text(json.dumps({"transformers_version": "5.9", "a": 1}))  # who wrote it
    assert content_digest(folder) == first
    save_file({"w": torch.ones(4)}, str(folder / "model.safetensors"))
    assert content_digest(folder) != first
