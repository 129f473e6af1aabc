"""Identity is complete: every checkpoint field round-trips, module by module (the secondary SAE lost
``aux_k`` on load, so a resume in the secondary phase trained without AuxK)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

from fis_interventions.sae import JointArch, JointSAE, NFMArch, SAEArch, load_checkpoint, save_checkpoint
from fis_interventions.sae.config import SecondaryConfig, TrainConfig


def _all_fields_off_default(config: BaseModel) -> None:
    """A round-trip test only proves something for fields that differ from their defaults; a new field added
    to an arch class without a value here fails this check, so the test keeps covering every field."""
    for name, field in type(config).model_fields.items():
        if not field.is_required():
            assert getattr(config, name) != field.get_default(call_default_factory=True), \
                f"{type(config).__name__}.{name} is at its default: give it another value in this test"


def test_every_checkpoint_field_round_trips(tmp_path):
    sae = SAEArch(d_in=12, d_sae=24, k=3, aux_k=5, normalize_decoder=False, activation="relu",
                  apply_b_dec_to_input=False)
    nfm = NFMArch(emb_dim=6, hidden=10, dropout=0.25, linear_bias=False, top_m=2)
    secondary = SAEArch(d_in=10, d_sae=20, k=4, aux_k=7, normalize_decoder=False, activation="jumprelu",
                        apply_b_dec_to_input=False)
    for arch in (sae, nfm, secondary):
        _all_fields_off_default(arch)
    cfg = TrainConfig(d_sae=24, k=3, aux_k=5, secondary=SecondaryConfig(d_sae=20, k=4, steps=3), mode="joint",
                      emb_dim=6, hidden=10, dropout=0.25, top_m=2, linear_bias=False, normalize_decoder=False,
                      lr=3e-4, seed=11, tokens=5000, batch_size=16, device="auto")
    torch.manual_seed(0)
    model = JointSAE(JointArch(sae=sae, nfm=nfm, secondary=secondary))
    norm = {"method": "expected_norm", "scale": 0.5}
    save_checkpoint(tmp_path / "ck", model, model_name="tiny-random", hook="blocks.1.hook_out",
                    normalization=norm, cfg=cfg, step=7, tokens_seen=112)

    loaded = load_checkpoint(tmp_path / "ck")
    back = loaded.model
    # what each module was BUILT with (read from the modules, not from the stored dict)
    assert back.sae.arch == sae
    assert back.nfm.arch == nfm
    assert back.secondary.arch == secondary and back.secondary.aux_k == 7
    assert back.cfg == model.cfg == JointArch(sae=sae, nfm=nfm, secondary=secondary)
    assert TrainConfig.model_validate(loaded.train_config) == cfg
    assert (loaded.model_name, loaded.hook, loaded.d_in, loaded.normalization) == \
        ("tiny-random", "blocks.1.hook_out", 12, norm)
    assert (loaded.meta["step"], loaded.meta["tokens_seen"]) == (7, 112)
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_attach_secondary_keeps_aux_k():
    model = JointSAE(JointArch(sae=SAEArch(d_in=8, d_sae=16, k=2), nfm=NFMArch(emb_dim=4, hidden=6)))
    model.attach_secondary(12, 3, aux_k=4)
    rebuilt = JointSAE(model.cfg)
    assert rebuilt.secondary.aux_k == 4 and rebuilt.cfg.secondary.aux_k == 4


def _fake_eval(name: str, mode: str, kl: dict[str, list[float]]):
    import numpy as np

    from fis_interventions.evaluation import CheckpointEval

    rec = {c: {"fvu": 0.5, "mse": 1.0, "l0": 3.0} for c in kl}
    spliced = {c: {"kl": float(np.mean(v)), "ce": 2.0, "ce_recovered": 0.9, "kl_score": 0.8} for c, v in kl.items()}
    spliced["clean"] = {"ce": 1.5}
    summary = {"mode": mode, "reconstruction": rec, "spliced": spliced, "params": {"sae": 10, "linear": 5},
               "n_heldout_contexts": len(next(iter(kl.values()))), "train_config": {"mode": mode}}
    return CheckpointEval(name, summary, {f"kl/{c}": np.array(v) for c, v in kl.items()})


def test_eval_with_one_heldout_context_omits_the_ci(recwarn):
    """`fis eval` on a tiny harvest with one held-out context died in the bootstrap (ValueError); now the
    estimate stays, the interval is empty and a note plus one warning say why."""
    from fis_interventions.evaluation import comparison_table, format_table

    table = comparison_table([_fake_eval("a", "sae", {"sae": [0.4]}),
                              _fake_eval("b", "joint", {"sae": [0.4], "sae+linear": [0.3]})])
    row = next(r for r in table["table"] if r["checkpoint"] == "b" and r["components"] == "sae+linear")
    assert row["kl_vs_standalone"] == pytest.approx(0.25) and row["kl_vs_standalone_ci"] is None
    assert "confidence intervals omitted: 1 held-out context" in table["notes"][0]
    assert any("at least 2" in str(w.message) for w in recwarn)
    assert "nan" not in format_table(table).split("baselines:")[0].lower()
    # two contexts: an interval again
    table = comparison_table([_fake_eval("a", "sae", {"sae": [0.4, 0.5]}),
                              _fake_eval("b", "joint", {"sae": [0.4, 0.5], "sae+linear": [0.3, 0.45]})])
    row = next(r for r in table["table"] if r["checkpoint"] == "b" and r["components"] == "sae+linear")
    assert len(row["kl_vs_standalone_ci"]) == 2


def test_code_change_refuses_a_resume_in_one_line(tmp_path, monkeypatch):
    """Every fingerprint carries the code's identity (version + source hash): resuming a folder written by
    other fis code is refused, naming the cause and both ways out."""
    from fis_interventions import fingerprint
    from fis_interventions.errors import FisError

    out = tmp_path / "run"
    assert fingerprint.claim(out, fingerprint.Fingerprint("screen", {"a": 1})) == "new"
    assert fingerprint.claim(out, fingerprint.Fingerprint("screen", {"a": 1})) == "resume"
    assert fingerprint.read_fingerprint(out)["code"] == fingerprint.code_identity()
    other = {**fingerprint.code_identity(), "source": "0" * 64}
    monkeypatch.setattr(fingerprint, "code_identity", lambda: other)
    with pytest.raises(FisError) as err:
        fingerprint.claim(out, fingerprint.Fingerprint("screen", {"a": 1}))
    text = str(err.value)
    assert "\n" not in text and "other fis code" in text and "--overwrite" in text and "--out" in text
    assert fingerprint.claim(out, fingerprint.Fingerprint("screen", {"a": 1}),
                             overwrite=True) == "new"


def test_source_digest_sees_every_byte(tmp_path):
    from fis_interventions.fingerprint import source_digest

    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 2\n")
    first = source_digest(tmp_path / "pkg")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 3\n")
    assert source_digest(tmp_path / "pkg") != first
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 2\n")
    assert source_digest(tmp_path / "pkg") == first
    (tmp_path / "pkg" / "sub" / "b.py").rename(tmp_path / "pkg" / "b.py")  # same bytes, another module
    assert source_digest(tmp_path / "pkg") != first


def test_extended_harvest_has_another_identity_and_a_resumed_training_refuses_it(tmp_path, tiny_bridge):
    """`fis harvest --tokens` larger resumes the same harvest (same fingerprint) but changes what it holds:
    the identity a training records covers the token count and the shard list, so the resume is refused."""
    from fis_interventions.activations import harvest
    from fis_interventions.errors import FisError
    from fis_interventions.fingerprint import claim, folder_identity, read_fingerprint
    from fis_interventions.training import train, train_fingerprint

    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(f"Sentence number {i} talks about boats and rain." for i in range(300)))
    kwargs = dict(bridge=tiny_bridge, model="tiny-random", hook="blocks.1.hook_resid_post", corpus=[str(corpus)],
                  out=tmp_path / "acts", progress=False, context_length=32, contexts_per_shard=4)
    harvest(tokens=300, **kwargs)
    before, digest = folder_identity(tmp_path / "acts"), read_fingerprint(tmp_path / "acts")["digest"]
    cfg = TrainConfig(activations=tmp_path / "acts", d_sae=64, k=4, mode="sae", batch_size=32, tokens=64)
    claim(tmp_path / "train", train_fingerprint(cfg))
    harvest(tokens=600, **kwargs)
    assert read_fingerprint(tmp_path / "acts")["digest"] == digest  # the same harvest, extended
    assert folder_identity(tmp_path / "acts") != before
    with pytest.raises(FisError, match=r"activations: .* -> .*--overwrite"):
        train(cfg, tmp_path / "train", resume=True, progress=False)


def _manifest_folder(path):
    path.mkdir(parents=True)
    (path / "manifest.json").write_text("{}")
    return path


def test_checkpoint_finds_its_harvest_after_the_tree_moves(tmp_path, monkeypatch):
    """A checkpoint records its harvest absolute AND relative to itself: the tree copied elsewhere (the
    original gone) still finds it, from any working directory."""
    import shutil

    from fis_interventions.cards.build import harvest_folder

    acts = _manifest_folder(tmp_path / "proj" / "runs" / "acts")
    cfg = TrainConfig(activations=acts, d_sae=16, k=2, mode="sae")
    save_checkpoint(tmp_path / "proj" / "runs" / "sae" / "checkpoint", JointSAE(JointArch(sae=SAEArch(
        d_in=8, d_sae=16, k=2))), model_name="m", hook="h", cfg=cfg)
    shutil.copytree(tmp_path / "proj", tmp_path / "moved")
    shutil.rmtree(tmp_path / "proj")
    monkeypatch.chdir(tmp_path)
    ckpt = load_checkpoint(tmp_path / "moved" / "runs" / "sae" / "checkpoint")
    assert ckpt.meta["inputs"]["activations"]["relative"] == "../../acts"
    assert harvest_folder(ckpt, None).resolve() == (tmp_path / "moved" / "runs" / "acts").resolve()


def test_older_checkpoint_with_a_cwd_relative_harvest_is_found_from_elsewhere(tmp_path, monkeypatch):
    """Checkpoints written before stored `runs/demo/activations` (relative to where training ran): found
    from another working directory by trying the folders above the checkpoint."""
    import json

    from fis_interventions.cards.build import harvest_folder

    _manifest_folder(tmp_path / "runs" / "demo" / "activations")
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(activations=Path("runs/demo/activations"), d_sae=16, k=2, mode="sae")
    path = save_checkpoint(Path("runs/demo/sae/checkpoint"), JointSAE(JointArch(sae=SAEArch(d_in=8, d_sae=16,
                                                                                      k=2))),
                           model_name="m", hook="h", cfg=cfg)
    meta = json.loads((path / "cfg.json").read_text())
    del meta["inputs"]  # as an older fis wrote it
    (path / "cfg.json").write_text(json.dumps(meta))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    ckpt = load_checkpoint(tmp_path / "runs" / "demo" / "sae" / "checkpoint")
    assert harvest_folder(ckpt, None).resolve() == (tmp_path / "runs" / "demo" / "activations").resolve()


def test_missing_harvest_names_the_flag_of_the_command(tmp_path):
    from fis_interventions.cards.build import harvest_folder
    from fis_interventions.errors import FisError

    cfg = TrainConfig(activations=tmp_path / "gone", d_sae=16, k=2, mode="sae")
    save_checkpoint(tmp_path / "ck", JointSAE(JointArch(sae=SAEArch(d_in=8, d_sae=16, k=2))), model_name="m",
                    hook="h", cfg=cfg)
    with pytest.raises(FisError, match="--cards-activations"):
        harvest_folder(load_checkpoint(tmp_path / "ck"), None, flag="--cards-activations")
