"""A checkpoint is spliced exactly at the hook it was harvested at, on every path, or refused in one line.

Why: the fast adapters run whole blocks, so they can only split on the residual stream between two blocks. A
checkpoint harvested at ``hook_mlp_out`` used to be fed the residual after block L (a different quantity,
silently). For every family and for the hooks users harvest at, the split's prefix must equal what the harvester
captured at that hook, and prefix + suffix must equal the bridge's full forward; hooks that are not one d_model
vector per token (``attn.hook_pattern``) are refused before anything is written.
"""

from __future__ import annotations

import pytest
import torch

from fis_interventions.activations.harvester import capture_hook, harvest
from fis_interventions.errors import FisError
from fis_interventions.splice import SplitModel, pad_right
from fis_interventions.tiny_models import FAMILY_NAMES

HOOKS = ("blocks.1.hook_resid_pre", "blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out", "blocks.1.hook_attn_out",
         "blocks.1.ln1.hook_out", "blocks.2.hook_resid_post")
TEXTS = ["Hello there, friend.", "A much longer sentence goes here now, with a clause.", "Hi"]
ATOL = 1e-5



@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_hook_splices_exactly_what_was_harvested(bridges, family):
    bridge = bridges(family)
    tok = bridge.tokenizer
    tokens, mask = pad_right([[tok.bos_token_id, *tok(t)["input_ids"]] for t in TEXTS], tok.pad_token_id)
    real = mask.bool()
    with torch.no_grad():
        full = bridge(tokens, attention_mask=mask)
    for hook in HOOKS:
        split = SplitModel(bridge, hook)
        inside = not hook.split(".", 2)[2].startswith(("hook_resid_pre", "hook_resid_post"))
        assert split.path == ("generic" if inside else f"fast:{family}"), hook
        harvested = capture_hook(bridge, tokens, split.hook.canonical, split.hook.stop_at_layer)
        resid, state = split.prefix(tokens, mask)
        assert resid.shape == harvested.shape, hook
        assert (resid - harvested)[real].abs().max().item() <= ATOL, f"{family} {hook}: prefix != harvested value"
        assert (split.suffix(resid, state) - full)[real].abs().max().item() <= 1e-4, f"{family} {hook}: logits"
        # a changed value at the hook must change the logits (the splice really writes at that hook)
        moved = split.suffix(resid + 0.5 * torch.randn_like(resid), state)
        assert (moved - full)[real].abs().max().item() > 1e-3, f"{family} {hook}: splice had no effect"


@pytest.mark.parametrize("path", ["auto", "generic"])
def test_fast_and_generic_paths_agree_at_resid_pre(bridges, path):
    bridge = bridges("llama")
    tokens = torch.tensor([[bridge.tokenizer.bos_token_id, 5, 6, 7, 8]])
    split = SplitModel(bridge, "blocks.2.hook_resid_pre", path=path)
    _, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n == "blocks.2.hook_in")
    resid, state = split.prefix(tokens)
    assert (resid - cache["blocks.2.hook_in"]).abs().max().item() <= ATOL
    # resid_pre of block 2 is resid_post of block 1: the same numbers
    post, _ = SplitModel(bridge, "blocks.1.hook_resid_post", path=path).prefix(tokens)
    assert (resid - post).abs().max().item() <= ATOL


def test_attention_pattern_is_refused_in_one_line(bridges, tmp_path, text_corpus):
    bridge = bridges("llama")
    with pytest.raises(FisError, match="not one 64-dim vector per token") as err:
        SplitModel(bridge, "blocks.1.attn.hook_pattern")
    assert "\n" not in str(err.value)
    out = tmp_path / "acts"
    with pytest.raises(FisError, match="hook_pattern"):
        harvest(bridge=bridge, model="tiny-llama", hook="blocks.1.attn.hook_pattern", corpus=[str(text_corpus)],
                out=str(out), tokens=200, context_length=16, progress=False)
    assert not out.exists(), "nothing may be written before the hook is known to be usable"
