"""Random-init models of every registered family, offline, for tests and benchmarks.

Why: the split forward must be checked against the bridge for each family without downloading anything.
Models are built from ``transformers`` config classes with the default tokenizer's vocabulary, seeded, and
either booted directly as a ``TransformerBridge`` or saved as a local HF folder (what users pass to the CLI).
Small windows (Gemma-2's sliding window of 4 tokens) make the per-layer masks matter even on short stimuli.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FAMILY_NAMES = ("llama", "qwen2", "gemma2", "phi3", "gpt2", "gpt_neox")


def family_config(family: str, tokenizer: Any, n_layers: int = 4, d_model: int = 64) -> Any:
    """A ``transformers`` config of ``family`` with ``n_layers`` x ``d_model`` (heads of 16 dims)."""
    import transformers as tf

    heads = max(1, d_model // 16)
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    rotary = {"hidden_size": d_model, "num_hidden_layers": n_layers, "num_attention_heads": heads,
              "intermediate_size": 2 * d_model, "max_position_embeddings": 512}
    gqa = {"num_key_value_heads": max(1, heads // 2)}
    if family == "llama":
        return tf.LlamaConfig(**rotary, **gqa, **ids, tie_word_embeddings=True)
    if family == "qwen2":
        return tf.Qwen2Config(**rotary, **gqa, **ids)
    if family == "gemma2":
        return tf.Gemma2Config(**rotary, **gqa, **ids, head_dim=16, sliding_window=4)
    if family == "phi3":
        return tf.Phi3Config(**rotary, **gqa, **{**ids, "pad_token_id": 0})
    if family == "gpt2":
        return tf.GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=heads, n_positions=512, **ids)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**rotary, **ids)
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILY_NAMES)}")


def family_hf_model(family: str, tokenizer: Any, n_layers: int = 4, d_model: int = 64, seed: int = 0) -> Any:
    """A seeded random-init HF causal LM of ``family`` in eval mode (fp32)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(family_config(family, tokenizer, n_layers, d_model),
                                                 dtype=torch.float32)
    return model.eval()


def family_bridge(family: str, tokenizer: Any, n_layers: int = 4, d_model: int = 64, seed: int = 0) -> Any:
    """A ``TransformerBridge`` around :func:`family_hf_model` (no folder, no network)."""
    from transformer_lens.model_bridge import TransformerBridge

    hf = family_hf_model(family, tokenizer, n_layers, d_model, seed)
    bridge = TransformerBridge.boot_transformers(hf.config.model_type, hf_model=hf, tokenizer=tokenizer,
                                                 device="cpu", dtype=torch.float32)
    bridge.eval()
    bridge.fis_model_name = f"tiny-{family}"  # type: ignore[attr-defined]
    return bridge


def save_family_folder(family: str, tokenizer: Any, folder: Path, n_layers: int = 4, d_model: int = 64,
                       seed: int = 0) -> Path:
    """Write a local HF folder (config, weights, tokenizer) that ``fis ... --model FOLDER`` loads."""
    folder = Path(folder)
    family_hf_model(family, tokenizer, n_layers, d_model, seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
