"""Integrity on every read: a harvest's shards carry their SHA-256 in the manifest (checked on a shard's first
use), manifest entries stay inside their folder, counts must match; corrupt shards, manifests, cfg.json,
weights (NaN included), optimizer.pt and a fake .gguf are one line (exit 2 through the CLI), nothing written."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: shared tiny helpers

from tiny_activations import harvest_sentences  # noqa: E402
from tiny_checkpoints import save_tiny_joint_checkpoint  # noqa: E402

from fis_interventions.activations import ActivationStore  # noqa: E402
from fis_interventions.cli import main  # noqa: E402
from fis_interventions.errors import FisError  # noqa: E402
from fis_interventions.sae import load_checkpoint  # noqa: E402
from fis_interventions.sae.checkpoint import load_train_state  # noqa: E402

FIX = "harvest again into a new --out"


@pytest.fixture(scope="module")
def harvest_folder(tmp_path_factory, tiny_bridge) -> Path:
    return harvest_sentences(tmp_path_factory.mktemp("h"), tiny_bridge, "Sentence {i} is short.", 80,
                             tokens=1024, context_length=32, contexts_per_shard=8)


@pytest.fixture()
def acts(harvest_folder, tmp_path) -> Path:
    folder = tmp_path / "acts"
    shutil.copytree(harvest_folder, folder)
    return folder


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _read_all(folder: Path) -> None:
    ActivationStore(folder).activations()


def test_every_shard_carries_its_hash_and_an_intact_harvest_reads(acts):
    shards = _manifest(acts)["shards"]
    assert len(shards) >= 2 and all(len(s["sha256"]) == 64 for s in shards)
    _read_all(acts)


def test_a_bit_flipped_shard_is_refused_on_first_use(acts, tmp_path, capsys):
    shard = acts / _manifest(acts)["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # inside the activations: a silent change of one value
    shard.write_bytes(bytes(data))
    with pytest.raises(FisError, match="does not match the SHA-256 in manifest.json") as err:
        _read_all(acts)
    assert str(shard) in str(err.value) and FIX in str(err.value)
    config = tmp_path / "t.yaml"
    config.write_text(f"activations: {acts}\nd_sae: 16\nk: 4\ntokens: 2048\nbatch_size: 32\nmode: sae\n"
                      "heldout_fraction: 0.2\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["train", str(config), "--out", str(tmp_path / "out")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "SHA-256" in err[0], err


@pytest.mark.parametrize("entry", ["../../acts/shard_00000.safetensors", "/etc/passwd", "sub/shard_00000.safetensors",
                                   ".."])
def test_manifest_entries_must_stay_inside_the_folder(entry, acts):
    manifest = _manifest(acts)
    manifest["shards"][0]["file"] = entry
    _write_manifest(acts, manifest)
    with pytest.raises(FisError, match="is not a file name inside the harvest folder"):
        ActivationStore(acts)


@pytest.mark.parametrize("change, match", [
    (lambda m: m["shards"][0].update(n_tokens=m["shards"][0]["n_tokens"] + 7), "token_count is"),
    (lambda m: (m["shards"][0].update(n_tokens=m["shards"][0]["n_tokens"] + 7), m.update(
        token_count=m["token_count"] + 7)), "shard does not match manifest.json: .* manifest n_tokens"),
    (lambda m: m["shards"][0].update(n_contexts=m["shards"][0]["n_contexts"] + 1), "manifest n_contexts"),
    (lambda m: m["shards"][0].update(n_tokens="many"), "not a count"),
    (lambda m: m["shards"][0].update(n_tokens=True), "not a count"),
    (lambda m: m.update(d_model=-4), "d_model is -4"),
    (lambda m: m.pop("normalization"), "no normalization record"),
    (lambda m: m["shards"].append(dict(m["shards"][0])), "listed twice"),
    (lambda m: m["shards"][0].update(sha256="abc"), "not a SHA-256"),
])
def test_counts_and_structure_must_match(change, match, acts):
    manifest = _manifest(acts)
    change(manifest)
    _write_manifest(acts, manifest)
    with pytest.raises(FisError, match=match):
        _read_all(acts)


def test_missing_and_truncated_shards_and_broken_manifests_are_one_line(acts):
    shards = _manifest(acts)["shards"]
    (acts / shards[0]["file"]).unlink()
    with pytest.raises(FisError, match="shard listed in manifest.json is missing"):
        _read_all(acts)
    for entry in shards:
        entry.pop("sha256")  # without hashes a damaged file is still caught by its reader
    _write_manifest(acts, {**_manifest(acts), "shards": shards[1:], "token_count": sum(s["n_tokens"]
                                                                                     for s in shards[1:])})
    shard = acts / shards[1]["file"]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(FisError, match="shard cannot be read"):
        _read_all(acts)
    (acts / "manifest.json").write_text("{not json")
    with pytest.raises(FisError, match="manifest.json is not valid JSON"):
        ActivationStore(acts)
    (acts / "manifest.json").write_text("[1, 2]")
    with pytest.raises(FisError, match="manifest.json is damaged: no list of shards"):
        ActivationStore(acts)


def test_old_manifest_without_hashes_reads_with_a_warning(acts, caplog):
    manifest = _manifest(acts)
    for entry in manifest["shards"]:
        entry.pop("sha256")
    _write_manifest(acts, manifest)
    with caplog.at_level(logging.WARNING):
        _read_all(acts)
    assert "no shard hashes" in caplog.text


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_bridge) -> Path:
    return save_tiny_joint_checkpoint(tmp_path_factory.mktemp("c") / "checkpoint", tiny_bridge.tokenizer, seed=0)


@pytest.fixture()
def ckpt(checkpoint, tmp_path) -> Path:
    folder = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, folder)
    return folder


def test_nan_weights_are_refused_on_load(ckpt):
    state = load_file(str(ckpt / "weights.safetensors"))
    name = sorted(state)[0]
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(ckpt / "weights.safetensors"))
    with pytest.raises(FisError, match=f"weights hold NaN or infinity \\({name}"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("damage, match", [
    (lambda c: (c / "weights.safetensors").write_bytes((c / "weights.safetensors").read_bytes()[:200]),
     "weights cannot be read"),
    (lambda c: (c / "cfg.json").write_text(json.dumps({**json.loads((c / "cfg.json").read_text()),
                                                       "architecture": {"sae": {"d_in": "x"}}})),
     "cfg.json is damaged or incomplete"),
    (lambda c: (c / "cfg.json").write_text(json.dumps({k: v for k, v in json.loads(
        (c / "cfg.json").read_text()).items() if k != "d_in"})), "cfg.json is damaged or incomplete \\(no 'd_in'"),
    (lambda c: (c / "cfg.json").write_text("{"), "cfg.json is not valid JSON"),
])
def test_damaged_checkpoints_are_one_line(damage, match, ckpt):
    damage(ckpt)
    with pytest.raises(FisError, match=match):
        load_checkpoint(ckpt)


def test_damaged_optimizer_state_is_one_line(ckpt):
    (ckpt / "optimizer.pt").write_bytes(b"PK\x03\x04 not a torch file")
    with pytest.raises(FisError, match="optimizer.pt cannot be read"):
        load_train_state(ckpt)


def test_damaged_checkpoint_through_the_battery_cli_writes_nothing(ckpt, tmp_path, capsys):
    (ckpt / "weights.safetensors").write_bytes(b"\x00" * 64)
    design = Path(__file__).resolve().parents[2] / "stimuli/negation_sentiment.yaml"
    config = tmp_path / "b.yaml"
    config.write_text(f"name: b\nmodel: tiny-random\ncheckpoint: {ckpt}\ndesigns: [{design}]\n"
                      "features: [{point: sae.hook_latents, index: 1}]\ninterventions: [{kind: zero}]\n"
                      f"out: {tmp_path / 'out'}\ndevice: cpu\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["battery", "run", str(config)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "weights cannot be read" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"GGUFjunk", b"\x00" * 64, b""])
def test_fake_gguf_is_one_line(content, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FIS_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(content)
    capsys.readouterr()
    assert main(["model", "info", str(fake)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "not a GGUF file" in err[0], err


def test_corrupt_gguf_with_a_valid_magic_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FIS_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (5).to_bytes(8, "little") + (9).to_bytes(8, "little")
                     + b"garbage")
    capsys.readouterr()
    assert main(["model", "info", str(fake)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "cannot be read as a GGUF model" in err[0], err
