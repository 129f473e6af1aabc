"""The split forward we own must equal the bridge: prefix == hook value, prefix+suffix == full logits."""

from __future__ import annotations

import pytest
import torch

from fis_interventions.errors import FisError
from fis_interventions.splice import SplitModel, pad_right


def _check(bridge, hook: str, texts: list[str], atol: float) -> None:
    split = SplitModel(bridge, hook)
    tokens = bridge.to_tokens(texts[:1])
    resid, state = split.prefix(tokens)
    _, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n == split.hook.canonical)
    assert (resid - cache[split.hook.canonical]).abs().max().item() <= atol
    full = bridge(tokens)
    assert (split.suffix(resid, state) - full).abs().max().item() <= atol
    # padded batch == each stimulus alone, at the last real position
    seqs = [bridge.tokenizer(t)["input_ids"] for t in texts]
    seqs = [[bridge.tokenizer.bos_token_id, *s] for s in seqs]
    padded, mask = pad_right(seqs, bridge.tokenizer.pad_token_id)
    resid, state = split.prefix(padded, mask)
    last = mask.sum(1, keepdim=True) - 1
    batched = split.suffix(resid, state, positions=last)[:, 0]
    for i, seq in enumerate(seqs):
        alone = bridge(torch.tensor([seq]))[0, -1]
        assert (batched[i] - alone).abs().max().item() <= atol


def test_split_equals_bridge_tiny(tiny_bridge):
    _check(tiny_bridge, "blocks.1.hook_resid_post", ["Hello there, friend.", "A much longer sentence goes here now.",
                                                      "Hi"], atol=1e-5)


def test_state_repeat_for_conditions(tiny_bridge):
    split = SplitModel(tiny_bridge, "blocks.1.hook_resid_post")
    tokens, mask = pad_right([[1, 5, 6, 7], [1, 8, 9]], 2)
    resid, state = split.prefix(tokens, mask)
    stacked = split.suffix(resid.repeat(3, 1, 1), state.repeat(3))
    single = split.suffix(resid, state)
    assert torch.allclose(stacked[:2], single, atol=1e-6) and torch.allclose(stacked[4:], single, atol=1e-6)


def test_hook_inside_a_block_takes_the_generic_path_and_a_pattern_is_refused(tiny_bridge):
    assert SplitModel(tiny_bridge, "blocks.1.hook_resid_mid").path == "generic"  # exact there (tests/test_splice_hooks)
    with pytest.raises(FisError, match="not one .*-dim vector per token"):
        SplitModel(tiny_bridge, "blocks.1.attn.hook_pattern")


@pytest.mark.real_model
def test_split_equals_bridge_real(real_bridge):
    _check(real_bridge, "blocks.14.hook_resid_post",
           ["The capital of France is", "Dear colleagues, I am delighted to announce the results.", "lol ok"],
           atol=1e-4)
