"""SAELens SAEs in (standard, topk, jumprelu), our SAEs out; fixtures written by SAELens itself.

tests/data/saelens/<arch>/ was written by ``bench/make_saelens_fixtures.py`` in the SAELens venv: the folder
``SAE.save_model`` wrote and ``expected.safetensors`` with SAELens' ``encode``/``decode`` on fixed inputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from fis_interventions.attach import attach
from fis_interventions.cli import main
from fis_interventions.errors import FisError
from fis_interventions.sae import JointArch, JointSAE, SAEArch, load_checkpoint, save_checkpoint
from fis_interventions.sae.model import SparseLatents
from fis_interventions.tiny_models import family_bridge
from tiny_activations import harvest_sentences

DATA = Path(__file__).parent / "data" / "saelens"
ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("standard", "topk", "jumprelu")
HOOK = "blocks.1.hook_resid_post"


def _sparse(dense: torch.Tensor) -> SparseLatents:
    width = max(int((dense != 0).sum(-1).max()), 1)
    values, indices = dense.topk(width, dim=-1)
    return SparseLatents(values, indices, dense.shape[-1])


@pytest.mark.parametrize("arch", ARCHS)
def test_loader_reproduces_saelens_encode_decode(arch):
    ckpt = load_checkpoint(DATA / arch)
    expected = load_file(str(DATA / arch / "expected.safetensors"))
    assert ckpt.hook == HOOK and ckpt.model.nfm is None and ckpt.meta["format"] == "saelens"
    assert not any(p.requires_grad for p in ckpt.model.parameters())
    out = ckpt.model(expected["x"], "sae")
    torch.testing.assert_close(out.latents.dense(), expected["latents"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.recon, expected["recon"], rtol=1e-5, atol=1e-5)
    # decoding SAELens' own latents gives SAELens' reconstruction
    torch.testing.assert_close(ckpt.model.sae.decode(_sparse(expected["latents"])), expected["recon"],
                               rtol=1e-5, atol=1e-5)
    l0 = (expected["latents"] != 0).sum(-1)
    assert (l0 == 8).all() if arch == "topk" else l0.float().std() > 0  # variable L0 is kept, not truncated


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    return family_bridge("gpt2", tokenizer)


@pytest.fixture(scope="module")
def acts(tmp_path_factory, gpt2) -> Path:
    return harvest_sentences(tmp_path_factory.mktemp("sl"), gpt2, "Sentence {i} talks about cats, dogs and the "
                             "weather today.", 200, model="tiny-gpt2", hook=HOOK, tokens=2500, context_length=32)


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_sae_in_eval_screen_and_battery(gpt2, acts, tmp_path, arch):
    from fis_interventions.evaluation import evaluate
    from fis_interventions.interventions import BatteryConfig, battery, read_results
    from fis_interventions.screening import screen

    attached = attach(gpt2, DATA / arch)
    assert attached.hook == HOOK and attached.split.path == "fast:gpt2"
    ev = evaluate(DATA / arch, acts, bridge=gpt2, max_contexts=4, progress=False, out=tmp_path / "ev")
    assert 0 < ev.summary["spliced"]["sae"]["kl"] and "fvu" in ev.summary["reconstruction"]["sae"]
    design = ROOT / "stimuli" / "negation_sentiment.yaml"
    res = screen(DATA / arch, design, bridge=gpt2, out=tmp_path / "screen", progress=False)
    assert set(res.table["point"]) == {"sae.hook_latents"}
    cfg = BatteryConfig.model_validate(dict(
        name="sl", model="tiny-gpt2", checkpoint=DATA / arch, designs=[design], device="cpu", max_items=2,
        features=[{"point": "sae.hook_latents", "index": 3, "role": "top"}],
        interventions=[{"kind": "scale", "values": [1.0, 8.0]}], batch_size=8, out=tmp_path / "bat"))
    battery(cfg, bridge=gpt2, progress=False)
    df = read_results(tmp_path / "bat" / "results.sqlite")
    assert (df[df.value == 1.0]["shift"] == 0).all()


def test_feature_cards_of_a_saelens_sae(gpt2, acts):
    """`fis features` and the report's cards take the SAELens SAEs the battery splices (raw activations)."""
    from fis_interventions.cards import FeatureKey, build_cards

    keys = [FeatureKey("sae.hook_latents", i) for i in range(128)]
    cards = build_cards(DATA / "topk", keys, activations=acts, bridge=gpt2, top=1, split="all")
    assert [c["feature"] for c in cards] == list(range(128))
    assert any(c["top_contexts"] for c in cards), "a top-k SAE fires somewhere on the harvest"


def test_sequential_training_on_a_saelens_sae(acts, tmp_path):
    """``sae_checkpoint:`` a SAELens folder: the NFM is fitted on its latents; the harvest's scale is folded in."""
    from fis_interventions.activations import ActivationStore
    from fis_interventions.training import train

    cfg = dict(activations=str(acts), mode="sequential", sae_checkpoint=str(DATA / "jumprelu"),
               emb_dim=8, hidden=8, batch_size=64, tokens=64 * 12, lr=1e-3, warmup_steps=2, eval_every=6,
               checkpoint_every=6, heldout_fraction=0.1)
    (tmp_path / "seq.yaml").write_text(yaml.safe_dump(cfg))
    result = train(tmp_path / "seq.yaml", tmp_path / "seq", progress=False)
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.model.cfg.sae.activation == "jumprelu" and ckpt.normalization["kind"] == "expected_norm"
    # d_sae and k were read from the SAE (none given), and the recorded config says what the SAE is
    assert (ckpt.train_config["d_sae"], ckpt.train_config["k"]) == (ckpt.model.cfg.sae.d_sae, ckpt.model.cfg.sae.k)
    store = ActivationStore(acts)
    raw = store.activations("heldout", normalized=False)[:64]
    ours = ckpt.model(store.normalizer.apply(raw), "sae")
    theirs = load_checkpoint(DATA / "jumprelu").model(raw, "sae")
    torch.testing.assert_close(ours.latents.dense(), theirs.latents.dense(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(store.normalizer.invert(ours.recon), theirs.recon, rtol=1e-4, atol=1e-4)


def test_export_round_trip_through_our_loader(tmp_path):
    torch.manual_seed(0)
    joint = JointSAE(JointArch(sae=SAEArch(d_in=64, d_sae=96, k=6)))
    with torch.no_grad():
        joint.sae.b_enc.normal_(0, 0.1)
        joint.sae.b_dec.normal_(0, 0.1)
    norm = {"kind": "expected_norm", "scale": 0.25, "mean": None, "std": None}
    src = save_checkpoint(tmp_path / "ckpt", joint, model_name="tiny-gpt2", hook=HOOK, normalization=norm)
    assert main(["export", str(src), "--format", "saelens", "--out", str(tmp_path / "exp")]) == 0
    cfg = json.loads((tmp_path / "exp" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 6 and cfg["metadata"]["hook_name"] == HOOK
    back = load_checkpoint(tmp_path / "exp")
    x = torch.randn(32, 64) * 8
    ours = joint(x * 0.25, "sae")
    theirs = back.model(x, "sae")
    torch.testing.assert_close(theirs.latents.dense(), ours.latents.dense(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs.recon, ours.recon / 0.25, rtol=1e-5, atol=1e-5)
    # an existing folder is never overwritten; an unknown format is one line
    assert main(["export", str(src), "--out", str(tmp_path / "exp")]) == 2
    assert main(["export", str(src), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def _broken(tmp_path: Path, arch: str, cfg_edit=None, weights_edit=None) -> Path:
    folder = tmp_path / f"bad-{arch}"
    shutil.copytree(DATA / arch, folder)
    if cfg_edit:
        cfg = json.loads((folder / "cfg.json").read_text())
        cfg_edit(cfg)
        (folder / "cfg.json").write_text(json.dumps(cfg))
    if weights_edit:
        weights_edit(folder)
    return folder


def _shrink(folder: Path) -> None:
    w = load_file(str(folder / "sae_weights.safetensors"))
    small = {"W_enc": w["W_enc"][:32], "W_dec": w["W_dec"][:, :32], "b_enc": w["b_enc"], "b_dec": w["b_dec"][:32],
             "threshold": w["threshold"]}
    save_file({k: v.contiguous() for k, v in small.items()}, str(folder / "sae_weights.safetensors"))


BAD = {
    "unknown architecture": (dict(cfg_edit=lambda c: c.update(architecture="gated")), "architecture"),
    "missing weights": (dict(weights_edit=lambda f: (f / "sae_weights.safetensors").unlink()),
                        "sae_weights.safetensors"),
    "d_in differs": (dict(cfg_edit=lambda c: c.update(d_in=32), weights_edit=_shrink), "d_model"),
    "hook the model lacks": (dict(cfg_edit=lambda c: c["metadata"].update(hook_name="blocks.9.hook_resid_post")),
                             "metadata.hook_name"),
    "attention hook": (dict(cfg_edit=lambda c: c["metadata"].update(hook_name="blocks.1.attn.hook_z")),
                       "metadata.hook_name"),
    "layer norm input": (dict(cfg_edit=lambda c: c.update(normalize_activations="layer_norm")),
                         "normalize_activations"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_saelens_folders_are_one_line_errors(gpt2, tmp_path, case, capsys):
    kwargs, field = BAD[case]
    folder = _broken(tmp_path, "jumprelu", **kwargs)
    with pytest.raises(FisError, match=field.replace(".", r"\.")) as err:
        attach(gpt2, folder)
    assert "\n" not in str(err.value)
    # through the CLI: exit 2, one line on stderr, nothing written
    out = tmp_path / "screen-out"
    code = main(["screen", "--checkpoint", str(folder), "--design", str(ROOT / "stimuli" / "negation_sentiment.yaml"),
                 "--model", "tiny-random", "--out", str(out)])
    assert code == 2 and not out.exists()


def test_pre_v6_saelens_cfg_layout_loads(tmp_path):
    """SAELens < 6 (most pretrained releases): hook_point / activation_fn_str at the top level, no metadata."""
    folder = tmp_path / "old"
    shutil.copytree(DATA / "topk", folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    old = {"d_in": 64, "d_sae": 128, "hook_point": "blocks.2.hook_resid_pre", "model_name": "gpt2",
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": cfg["k"]}, "normalize_activations": False,
           "apply_b_dec_to_input": True, "dtype": "float32"}
    (folder / "cfg.json").write_text(json.dumps(old))
    ckpt = load_checkpoint(folder)
    assert ckpt.hook == HOOK and ckpt.model.sae.k == cfg["k"] and ckpt.meta["saelens_model_name"] == "gpt2"
