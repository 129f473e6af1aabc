"""Cards on the design's own stimuli (issue 23, item 4): per-cell activation and token-level values equal an
independent computation (bridge.run_with_cache at the hook, normalise, joint forward), and the token view is
highlighted in HTML and marked in Markdown."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fis_interventions.activations import ExclusionRule, Normalizer
from fis_interventions.attach import attach
from fis_interventions.cards.render import marked_tokens, stimuli_block
from fis_interventions.cards.stimuli import explained_share, stimulus_activity
from fis_interventions.cards.stream import FeatureKey
from fis_interventions.designs import read_design
from fis_interventions.reports.render import Doc, to_html, to_markdown
from fis_interventions.sae import JointArch, JointSAE, NFMArch, SAEArch, load_checkpoint, save_checkpoint
from fis_interventions.screening import stimulus_rows

HOOK = "blocks.1.hook_resid_post"
DESIGN = Path(__file__).resolve().parents[1] / "stimuli" / "negation_sentiment.yaml"
SCALE = 0.37


def _manual_tokens(tiny_bridge, joint, stimulus: str) -> dict[str, np.ndarray]:
    """Every position's value (BOS dropped) by the independent path."""
    _, cache = tiny_bridge.run_with_cache(tiny_bridge.to_tokens(stimulus), names_filter=lambda n: n == HOOK)
    with torch.no_grad():
        out = joint(cache[HOOK][0, 1:] * SCALE, "full")
    return {"sae.hook_latents": out.latents.dense().numpy(), "nfm.hook_hidden": out.hidden.numpy(),
            "secondary.hook_latents": out.secondary_latents.dense().numpy()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bridge):
    torch.manual_seed(0)
    joint = JointSAE(JointArch(sae=SAEArch(d_in=64, d_sae=128, k=8), nfm=NFMArch(emb_dim=16, hidden=32)))
    joint.attach_secondary(64, 4)
    norm = {**Normalizer("expected_norm", scale=SCALE).to_dict(),
            "exclusion": ExclusionRule.for_tokenizer(tiny_bridge.tokenizer).to_dict()}
    ckpt = save_checkpoint(tmp_path_factory.mktemp("st") / "joint", joint, model_name="tiny-random", hook=HOOK,
                           normalization=norm)
    design = read_design(DESIGN)
    rows = stimulus_rows(design)
    loaded = load_checkpoint(ckpt).model
    manual = [_manual_tokens(tiny_bridge, loaded, s) for s in rows["stimulus"]]
    # at each point the feature that fires at the last position of the most stimuli: the check is not vacuous
    keys = [FeatureKey(p, int(np.argmax(sum((m[p][-1] > 0).astype(int) for m in manual))))
            for p in ("sae.hook_latents", "nfm.hook_hidden", "secondary.hook_latents")]
    views = stimulus_activity(attach(tiny_bridge, ckpt), design, keys, aggregate="last", per_cell=2, batch_size=5)
    return {"design": design, "rows": rows, "manual": manual, "keys": keys, "views": views}


def test_cell_means_and_tokens_equal_a_direct_computation(setup):
    design, views, rows, manual = setup["design"], setup["views"], setup["rows"], setup["manual"]
    a, b = list(design.factors)
    for key in setup["keys"]:
        view = views[(key.point, key.index)]
        last = np.array([m[key.point][-1, key.index] for m in manual])  # aggregate "last"
        assert (last > 0).sum() > 10, key
        item_cell = rows.assign(v=last).groupby([a, b, "item"])["v"].mean()
        assert len(view["cells"]) == 4 and view["n_stimuli"] == len(rows)
        for cell in view["cells"]:
            per_item = item_cell.loc[(cell[a], cell[b])].to_numpy()
            assert cell["n_items"] == len(per_item)
            assert cell["mean"] == pytest.approx(per_item.mean(), abs=1e-5)
            half = 2.0 * per_item.std(ddof=1) / np.sqrt(len(per_item))  # t(0.975, n-1) is near 2 here
            assert cell["ci_low"] <= cell["mean"] <= cell["ci_high"]
            assert (cell["ci_high"] - cell["ci_low"]) / 2 == pytest.approx(half, rel=0.1, abs=1e-6)
        assert len(view["examples"]) == 8  # 2 items in each of 4 cells
        for ex in view["examples"]:
            r = int(np.flatnonzero((rows["item"] == ex["item"]) & (rows["cell"] == ex["cell"]))[0])
            acts = [t["activation"] for t in ex["tokens"]]
            assert acts[0] is None  # BOS: excluded by the rule
            np.testing.assert_allclose(acts[1:], manual[r][key.point][:, key.index], atol=1e-4)
            assert ex["value"] == pytest.approx(acts[-1], abs=1e-6)


def test_token_view_is_highlighted_in_html_and_marked_in_markdown(setup):
    view = setup["views"][(setup["keys"][0].point, setup["keys"][0].index)]
    doc = Doc("t")
    stimuli_block(doc, view, 1)
    page, md = to_html(doc), to_markdown(doc)
    assert page.count('class="tok"') >= 8 and "background:rgba(255,140,0," in page
    assert "class=\"tok off\"" in page  # the BOS position, dropped by the exclusion rule
    firing = [t for e in view["examples"] for t in e["tokens"] if t["activation"] and t["activation"] > 0]
    assert firing, "the feature should fire on some stimulus token"
    assert f"({firing[0]['activation']:.3g})" in md and "**" in md
    assert "Activation by cell" in md and "Activation by cell" in page
    assert marked_tokens([{"text": "<s>", "activation": None}, {"text": " big", "activation": 0.5},
                          {"text": " dog", "activation": 0.0}]) == "<s> **big**(0.5) dog"


def test_explained_share_of_the_listed_pairs():
    share = explained_share({"preactivation_mean": 2.0, "constant_mean": 0.5,
                             "pairs": [{"contribution": 0.6}, {"contribution": 0.2}]})
    assert share == pytest.approx({"listed": 0.4, "constant": 0.25, "rest": 0.35})
