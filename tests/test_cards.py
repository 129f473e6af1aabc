"""Feature cards on a planted toy model: contexts, logit lens, output directions, pairs, streaming, bad input.

The harvest is synthetic but in the real format: activation = (embedding of the token + noise), so a latent
whose encoder reads the embedding of token T fires exactly on T. Planted (normalised space, scale 0.5):
SAE latent A fires on T and its decoder row is the unembedding of P_SAE; latent B is always on; NFM unit H0
reads only the (A, B) pair and writes the unembedding of P_NFM; secondary latent J reads H0 and decodes to
unit H1, which writes the unembedding of P_SEC.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fis_interventions.activations import ExclusionRule, Normalizer
from fis_interventions.activations.shards import new_manifest, shard_name, write_manifest, write_shard
from fis_interventions.cards import FeatureKey, build_cards, card_markdown
from fis_interventions.cards.directions import logit_lens, residual_directions
from fis_interventions.cards.pairs import pair_contributions
from fis_interventions.cards.stream import HIST_LOG_MIN, HIST_PER_DECADE, N_FINE_BINS, read_split, stream_features
from fis_interventions.cli import main
from fis_interventions.models import hf_model_of, resolve_hook
from fis_interventions.sae import JointArch, JointSAE, NFMArch, SAEArch, save_checkpoint
from fis_interventions.splice import JointSplice

HOOK = "blocks.1.hook_resid_post"
SCALE = 0.5
A, B, H0, H1, J = 5, 9, 3, 4, 7  # J = 7: the synthetic report run's linear_control feature
CTX_LEN, N_CTX, PER_SHARD = 24, 160, 12  # 14 shards; held-out: every 10th context (16 contexts)


def _tok(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, word
    return ids[0]


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_bridge) -> dict:
    tok = tiny_bridge.tokenizer
    root = tmp_path_factory.mktemp("cards")
    gen = torch.Generator().manual_seed(0)
    T = _tok(tok, " beach")
    P_SAE, P_NFM, P_SEC = _tok(tok, " Paris"), _tok(tok, " river"), _tok(tok, " music")
    vocab = len(tok)
    emb = torch.randn(vocab, 64, generator=gen)
    common = torch.arange(300, 700)
    tokens = common[torch.randint(len(common), (N_CTX, CTX_LEN), generator=gen)]
    tokens[torch.rand(N_CTX, CTX_LEN, generator=gen) < 0.06] = T
    tokens[:, 0] = tok.bos_token_id
    rule = ExclusionRule.for_tokenizer(tok, norm_multiple=None)
    harvest = root / "harvest"
    harvest.mkdir()
    manifest = new_manifest(model="tiny-random", hook=HOOK, hook_canonical=resolve_hook(tiny_bridge, HOOK).canonical,
                            d_model=64, context_length=CTX_LEN, exclusion=rule.to_dict(),
                            normalization=Normalizer("expected_norm", scale=SCALE).to_dict())
    for s, start in enumerate(range(0, N_CTX, PER_SHARD)):
        t = tokens[start:start + PER_SHARD]
        keep = ~rule.special_mask(t)
        acts = emb[t] + 0.1 * torch.randn(*t.shape, 64, generator=gen)
        digest = write_shard(harvest, s, acts[keep], t, keep, torch.arange(start, start + len(t)))
        manifest["shards"].append({"file": shard_name(s), "n_contexts": len(t), "n_tokens": int(keep.sum()),
                                   "sha256": digest})
        manifest["token_count"] += int(keep.sum())
    manifest["complete"] = True
    write_manifest(harvest, manifest)

    w_u = hf_model_of(tiny_bridge).lm_head.weight.detach()
    torch.manual_seed(1)
    joint = JointSAE(JointArch(sae=SAEArch(d_in=64, d_sae=128, k=8), nfm=NFMArch(emb_dim=16, hidden=32)))
    joint.attach_secondary(400, 4)  # wide enough for the synthetic report run's feature ids (7, 12, 345)
    with torch.no_grad():
        sae, nfm, sec = joint.sae, joint.nfm, joint.secondary
        sae.W_enc[:, A] = 3 * _unit(emb[T])
        sae.b_enc[A] = -6.0
        sae.W_enc[:, B] = 0.0
        sae.b_enc[B] = 3.0
        sae.W_dec[A] = _unit(w_u[P_SAE])
        nfm.V[:, 0] = 0.0
        nfm.V[A, 0] = nfm.V[B, 0] = 1.0
        nfm.mlp_in.weight[H0] = 0.0
        nfm.mlp_in.weight[H0, 0] = 1.0
        nfm.mlp_in.bias[H0] = -0.5
        nfm.mlp_out.weight.normal_(0, 0.05)
        nfm.mlp_out.weight[:, H0] = _unit(w_u[P_NFM])
        nfm.mlp_out.weight[:, H1] = _unit(w_u[P_SEC])
        sec.W_enc[:, J] = 0.0
        sec.W_enc[H0, J] = 10.0
        sec.b_enc[J] = -1.0
        sec.W_dec[J] = 0.0
        sec.W_dec[J, H1] = 1.0
    norm = {**Normalizer("expected_norm", scale=SCALE).to_dict(), "exclusion": rule.to_dict(),
            "activations": str(harvest)}
    ckpt = save_checkpoint(root / "ckpt", joint, model_name="tiny-random", hook=HOOK, normalization=norm)
    return {"root": root, "harvest": harvest, "ckpt": ckpt, "joint": joint, "T": T, "P": (P_SAE, P_NFM, P_SEC),
            "tokens": tokens, "rule": rule}


KEYS = [FeatureKey("sae.hook_latents", A), FeatureKey("nfm.hook_hidden", H0),
        FeatureKey("secondary.hook_latents", J), FeatureKey("sae.hook_latents", 100)]


@pytest.fixture(scope="module")
def cards(planted, tiny_bridge) -> list[dict]:
    return build_cards(planted["ckpt"], KEYS, top=8, bridge=tiny_bridge, batch_size=64)


def test_top_contexts_contain_the_planted_token_and_lens_promotes_the_planted_word(planted, cards):
    for card, promoted_id in zip(cards[:3], planted["P"]):
        ctxs = card["top_contexts"]
        assert len(ctxs) == 8, card["point"]
        assert all(c["token_id"] == planted["T"] and c["token"] == " beach" for c in ctxs), card["point"]
        assert all("⟦ beach⟧" in c["text"] for c in ctxs)
        assert [c["activation"] for c in ctxs] == sorted((c["activation"] for c in ctxs), reverse=True)
        assert all(c["context_id"] % 10 == 0 for c in ctxs)  # held-out contexts only
        assert card["output_direction"]["promoted"][0]["token_id"] == promoted_id, card["point"]
        assert len(card["output_direction"]["promoted"]) == len(card["output_direction"]["suppressed"]) == 10
        # fires exactly on the planted token: frequency = share of T among the held-out kept tokens
        held = planted["tokens"][::10, 1:]
        assert card["activation"]["firing"] == int((held == planted["T"]).sum())
        assert card["activation"]["tokens"] == held.numel() == card["harvest"]["tokens"]
        assert sum(card["activation"]["histogram"]["counts"]) == card["activation"]["firing"]
    for card in cards[1:3]:
        top_pair = card["integration"]["pairs"][0]
        assert top_pair["latents"] == [A, B] and top_pair["tokens_present"] == 8
        assert top_pair["share"] == pytest.approx(1.0, rel=0.3)  # the pair is nearly all of it
    assert cards[1]["integration"]["pairs"][0]["weight"] == pytest.approx(1.0)
    assert cards[0]["integration"] is None and cards[0]["output_direction"]["linear_part"] is not None


def test_window_shows_neighbours_and_values(planted, cards):
    c = cards[0]["top_contexts"][0]
    row = planted["tokens"][c["context_id"]]
    pos = c["position"]
    assert row[pos] == planted["T"]
    assert len(c["before"]) == min(pos, 12) and len(c["after"]) == min(CTX_LEN - 1 - pos, 4)
    assert len(c["window_activations"]) == len(c["before"]) + 1 + len(c["after"])
    assert c["window_activations"][len(c["before"])] == pytest.approx(c["activation"])


def test_lens_equals_manual_computation(planted, tiny_bridge):
    joint = planted["joint"]
    norm = Normalizer("expected_norm", scale=SCALE)
    hf = hf_model_of(tiny_bridge)
    for point, idx in [("sae.hook_latents", A), ("nfm.hook_hidden", H0), ("secondary.hook_latents", J)]:
        d = residual_directions(joint, norm, point, [idx])[0]
        if point == "sae.hook_latents":
            manual_d = joint.sae.W_dec[idx] / SCALE
        elif point == "nfm.hook_hidden":
            manual_d = joint.nfm.mlp_out.weight[:, idx] / SCALE
        else:
            manual_d = joint.nfm.mlp_out.weight @ joint.secondary.W_dec[idx] / SCALE
        torch.testing.assert_close(d, manual_d.detach(), rtol=1e-6, atol=1e-7)
        rms = hf.model.norm
        normed = d * torch.rsqrt(d.pow(2).mean() + rms.variance_epsilon) * rms.weight
        manual = (normed @ hf.lm_head.weight.T).detach()
        lens = logit_lens(tiny_bridge, d.unsqueeze(0))[0]
        torch.testing.assert_close(lens, manual, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("point,idx,components", [("sae.hook_latents", A, "sae"), ("nfm.hook_hidden", H0, "full"),
                                                  ("secondary.hook_latents", J, "full"),
                                                  ("secondary.hook_latents", 20, "full")])
def test_direction_is_the_residual_change_of_an_add_clamp(planted, point, idx, components):
    """The derivation in the card is checked against the real splice: add delta at the point, look at the
    residual change."""
    joint = planted["joint"]
    norm = Normalizer("expected_norm", scale=SCALE)
    splice = JointSplice(joint, norm, planted["rule"])
    gen = torch.Generator().manual_seed(3)
    resid = torch.randn(2, 6, 64, generator=gen) * 8
    keep = torch.ones(2, 6, dtype=torch.bool)
    delta = 1.7

    def add(value: torch.Tensor) -> torch.Tensor:
        out = value.clone()
        out[..., idx] += delta
        return out

    change = splice.edit(resid, keep, {point: add}, components) - resid
    d = residual_directions(joint, norm, point, [idx])[0]
    torch.testing.assert_close(change, (delta * d).expand_as(change), rtol=1e-4, atol=1e-4)


def test_pair_decomposition_equals_the_preactivation(planted, tiny_bridge):
    """const + sum of every pair term = the feature's value on its firing tokens (exact identity)."""
    store_norm = Normalizer("expected_norm", scale=SCALE)
    res = stream_features(planted["joint"], store_norm, KEYS[1:3],
                          sorted(planted["harvest"].glob("shard_*.safetensors")), lambda c: c % 10 == 0, top=8)
    for f, key in enumerate(KEYS[1:3]):
        firing = res.top_val[f] > 0
        info = pair_contributions(planted["joint"], key.point, key.index, res.code_val[f][firing],
                                  res.code_idx[f][firing], res.gates[f][firing])
        torch.testing.assert_close(info["preactivation"], res.top_val[f][firing], rtol=1e-4, atol=1e-4)


def _brute_force(planted, keys, split=lambda c: c % 10 == 0):
    """Every activation of the split in memory, values read through the joint model's hook points."""
    joint = planted["joint"]
    norm = Normalizer("expected_norm", scale=SCALE)
    rows, ctxs, poss = [], [], []
    for path in sorted(planted["harvest"].glob("shard_*.safetensors")):
        r = read_split(path, split)
        rows.append(r.acts)
        ctxs.append(r.context_ids[r.row_ctx])
        poss.append(r.row_pos)
    x = norm.apply(torch.cat(rows))
    seen = {}
    points = sorted({k.point for k in keys})
    joint(x, "full", edit={p: (lambda name: lambda v: seen.__setitem__(name, v.detach()))(p) for p in points})
    values = torch.stack([seen[k.point][:, k.index] for k in keys], 1)
    return values, torch.cat(ctxs), torch.cat(poss)


def test_streaming_over_shards_larger_than_the_batch_equals_brute_force(planted):
    keys = KEYS + [FeatureKey("nfm.hook_hidden", 11), FeatureKey("secondary.hook_latents", 2)]
    paths = sorted(planted["harvest"].glob("shard_*.safetensors"))
    assert len(paths) == 14
    res = stream_features(planted["joint"], Normalizer("expected_norm", scale=SCALE), keys, paths,
                          lambda c: c % 10 == 0, top=5, batch_size=7)
    assert res.max_batch_rows == 7  # the joint model never saw more than one batch; shards hold > 7 rows
    values, ctx, pos = _brute_force(planted, keys)
    assert res.n_tokens == len(values)
    np.testing.assert_array_equal(res.n_fire.numpy(), (values > 0).sum(0).numpy())
    torch.testing.assert_close(res.vmax, values.max(0).values)
    for f in range(len(keys)):
        v = values[:, f]
        pos_v = v[v > 0].double()
        bins = ((pos_v.log10() - HIST_LOG_MIN) * HIST_PER_DECADE).floor().long().clamp(0, N_FINE_BINS - 1)
        np.testing.assert_array_equal(res.hist[f].numpy(), np.bincount(bins.numpy(), minlength=N_FINE_BINS))
        per_ctx = {}
        for c, val in zip(ctx.tolist(), v.tolist()):
            per_ctx[c] = max(per_ctx.get(c, float("-inf")), val)
        best = sorted(per_ctx.values(), reverse=True)[:5]
        np.testing.assert_allclose(res.top_val[f].numpy(), best, rtol=1e-5, atol=1e-6)
        for r in range(5):  # the recorded position holds the context's maximum
            at = (ctx == res.top_ctx[f, r]) & (pos == res.top_pos[f, r])
            if res.top_val[f, r] > 0:
                assert float(v[at][0]) == pytest.approx(float(res.top_val[f, r]), rel=1e-5)


def test_markdown_and_cli_output(planted, tiny_bridge, tmp_path, monkeypatch, capsys, cards):
    md = card_markdown(cards[2])
    for text in ["# Feature 7 at secondary.hook_latents", "## Top-activating contexts", "⟦ beach⟧",
                 "## Output direction (logit lens)", "mlp_out.weight @ W_dec_sec[j]", "' music'",
                 "## What it integrates", "Histogram", "held-out contexts"]:
        assert text in md, text
    import fis_interventions.models as models

    monkeypatch.setattr(models, "load_model", lambda name, **kw: tiny_bridge)
    out = tmp_path / "cards"
    code = main(["features", str(planted["ckpt"]), "--point", "nfm.hook_hidden", "--ids", f"{H0},11",
                 "--top", "3", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["fingerprint.json", "index.md", "inputs.json",
                                                     "nfm.hook_hidden_11.json", "nfm.hook_hidden_11.md",
                                                     "nfm.hook_hidden_3.json", "nfm.hook_hidden_3.md"]
    from fis_interventions import recorded_paths

    inputs = json.loads((out / "inputs.json").read_text())  # absolute and relative to the folder
    assert recorded_paths.resolve_input(out, inputs, "checkpoint").resolve() == Path(planted["ckpt"]).resolve()
    # other settings into the same folder: refused (one line, exit 2); --overwrite replaces what fis wrote
    args = ["features", str(planted["ckpt"]), "--point", "nfm.hook_hidden", "--ids", f"{H0}", "--out", str(out)]
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0 and not (out / "nfm.hook_hidden_11.md").exists()
    (out / "notes.txt").write_text("mine")
    assert main([*args, "--top", "2", "--overwrite"]) == 2 and (out / "notes.txt").exists()
    capsys.readouterr()
    out = tmp_path / "cards2"
    assert main(["features", str(planted["ckpt"]), "--point", "nfm.hook_hidden", "--ids", f"{H0},11",
                 "--top", "3", "--out", str(out)]) == 0
    card = json.loads((out / "nfm.hook_hidden_3.json").read_text())
    assert card["format"] == "fis-feature-card/1" and len(card["top_contexts"]) == 3
    assert card["integration"]["pairs"][0]["latents"] == [A, B]
    assert main(["features", str(planted["ckpt"]), "--point", "sae.hook_latents", "--ids", str(A)]) == 0
    assert "# Feature 5 at sae.hook_latents" in capsys.readouterr().out
    # --design adds the feature on the design's own stimuli (per cell, token by token); a bad file: one line
    design = Path(__file__).resolve().parents[1] / "stimuli" / "negation_sentiment.yaml"
    assert main(["features", str(planted["ckpt"]), "--point", "sae.hook_latents", "--ids", str(B),
                 "--design", str(design)]) == 0
    printed = capsys.readouterr().out
    assert "## On the design's stimuli (negation_sentiment)" in printed and "Activation by cell" in printed
    assert "**(" in printed  # latent B is always on: every kept token is marked with its value
    assert main(["features", str(planted["ckpt"]), "--point", "sae.hook_latents", "--ids", str(B),
                 "--design", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "missing.yaml" in err and len(err.strip().splitlines()) == 1


def _other_harvest(planted, tmp_path, **changes) -> Path:
    folder = tmp_path / "other"
    folder.mkdir()
    for p in planted["harvest"].iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("args,message", [
    (["--point", "nfm.hook_nope", "--ids", "1"], "unknown feature point 'nfm.hook_nope'"),
    (["--point", "nfm.hook_hidden", "--ids", "32"], "feature 32 is out of range for nfm.hook_hidden (width 32)"),
    (["--point", "sae.hook_latents", "--ids", "x,2"], "feature ids must be integers"),
    (["--point", "sae.hook_latents", "--ids", "1", "--split", "test"], "unknown split"),
    (["--point", "sae.hook_latents", "--ids", "1", "--activations", "HOOK"], "harvest is of hook"),
    (["--point", "sae.hook_latents", "--ids", "1", "--activations", "MODEL"], "harvest is of model"),
    (["--point", "sae.hook_latents", "--ids", "1", "--activations", "/nonexistent"], "harvest folder not found"),
    (["--point", "sae.hook_latents", "--ids", "1", "--activations", "FLIPPED"], "does not match the SHA-256"),
])
def test_bad_input_is_one_line_exit_2(planted, tiny_bridge, tmp_path, monkeypatch, capsys, args, message):
    import fis_interventions.models as models

    monkeypatch.setattr(models, "load_model", lambda name, **kw: tiny_bridge)
    if "HOOK" in args:
        args[args.index("HOOK")] = str(_other_harvest(planted, tmp_path, hook="blocks.2.hook_resid_post",
                                                      hook_canonical="blocks.2.hook_out"))
    if "FLIPPED" in args:  # one bit of one shard changed after the harvest: the card pass checks the hash
        folder = _other_harvest(planted, tmp_path)
        shard = folder / json.loads((folder / "manifest.json").read_text())["shards"][0]["file"]
        data = bytearray(shard.read_bytes())
        data[-5] ^= 0x01
        shard.write_bytes(bytes(data))
        args[args.index("FLIPPED")] = str(folder)
    if "MODEL" in args:
        args[args.index("MODEL")] = str(_other_harvest(planted, tmp_path, model="smollm2-135m"))
    out = tmp_path / "out"
    assert main(["features", str(planted["ckpt"]), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.fixture(scope="module")
def report_out(planted, tiny_bridge) -> Path:
    from fis_interventions.reports import report, write_synthetic_run

    run = write_synthetic_run(planted["root"] / "run", n_items=6, n_prompts=1, values=(1.0, 4.0), extras=False)
    info = json.loads((run / "run.json").read_text())
    info.update(checkpoint=str(planted["ckpt"]), model="tiny-random")
    (run / "run.json").write_text(json.dumps(info))
    return report(run, planted["root"] / "report", cards=True, card_top=4, bridge=tiny_bridge)


def test_report_has_a_card_next_to_each_clamped_feature(report_out):
    md = (report_out / "report.md").read_text(encoding="utf-8")
    features = md.split("## Features")[1].split("## KL divergence")[0]
    sections = features.split("### formality_emotion: feature ")[1:]
    assert len(sections) == 3
    for section in sections:
        feature = section.split(" ")[0]
        # report.md stays short: it links the card written beside it; report.html shows the card inline
        link = f"[cards/secondary.hook_latents_{feature}.md](cards/secondary.hook_latents_{feature}.md)"
        assert link in section
        assert section.index("](figures/dose_") < section.index(link)  # next to its plots
        assert "Top-activating contexts" not in section
    seven = (report_out / "cards" / "secondary.hook_latents_7.md").read_text(encoding="utf-8")
    assert "⟦ beach⟧" in seven and "' music'" in seven and "What it integrates" in seven
    assert sorted(p.name for p in (report_out / "cards").iterdir()) == sorted(
        [f"secondary.hook_latents_{i}.{ext}" for i in (7, 12, 345) for ext in ("json", "md")] + ["index.md"])
    page = (report_out / "report.html").read_text(encoding="utf-8")
    assert "<script" not in page and "<link" not in page and "http://" not in page and "https://" not in page
    assert page.count("Card: feature") == 3 and "⟦ beach⟧" in page
    assert "Output direction (logit lens)" in page and "Top-activating contexts" in page
    # each card shows the feature on the design's own stimuli (the battery's items): per cell and token by token
    assert page.count("s stimuli (formality_emotion)</h") == 3 and 'class="tok"' in page
    assert "Activation by cell" in seven and "Token by token" in seven
    card = json.loads((report_out / "cards" / "secondary.hook_latents_7.json").read_text(encoding="utf-8"))
    # the synthetic run's item names are not the design file's: every item of the design is shown, and said
    assert card["stimuli"]["n_stimuli"] == 24 * 4 and [c["n_items"] for c in card["stimuli"]["cells"]] == [24] * 4
    assert "none of the battery's item names" in card["stimuli"]["items"]
    assert "not explained here" in seven  # the share of the activation the listed pairs leave unexplained


def test_report_without_reachable_checkpoint_warns_or_fails_on_request(tmp_path):
    from fis_interventions.errors import FisError
    from fis_interventions.reports import report, write_synthetic_run

    run = write_synthetic_run(tmp_path / "run", n_items=4, n_prompts=1, values=(1.0, 4.0), extras=False)
    out = report(run, tmp_path / "rep")
    warnings = (out / "report.md").read_text(encoding="utf-8").split("## Warnings")[1]
    assert "no feature cards" in warnings and "checkpoint not found" in warnings
    assert not (out / "cards").exists()
    with pytest.raises(FisError, match="checkpoint not found"):
        report(run, tmp_path / "rep2", cards=True)
    assert not (tmp_path / "rep2").exists()
    assert main(["report", str(run), "--out", str(tmp_path / "rep3"), "--cards"]) == 2


@pytest.mark.browser
def test_report_with_cards_renders_in_headless_chromium(report_out):
    from fis_interventions.reports.browser import chromium_binary, probe_html

    if chromium_binary() is None:
        pytest.skip("the chromium binary is not installed (apt-get install chromium)")
    result = probe_html(report_out / "report.html")
    assert result["title"] == "fis-probe-ok", result
    assert result["errors"] == []
    assert len(result["images"]) == 6 and all(i["complete"] and i["naturalWidth"] > 100 for i in result["images"])


def test_screen_cards_for_the_top_features(planted, tiny_bridge, tmp_path, monkeypatch, capsys):
    from fis_interventions.errors import FisError
    from fis_interventions.screening import screen

    design = Path(__file__).resolve().parents[1] / "stimuli" / "negation_sentiment.yaml"
    out = tmp_path / "screen"
    res = screen(planted["ckpt"], design, bridge=tiny_bridge, out=out, points=["nfm.hook_hidden"], cards=2,
                 progress=False)
    best = [(t["point"], t["feature"]) for t in res.top[:2]]
    assert [(c["point"], c["feature"]) for c in res.cards] == best
    assert sorted(p.name for p in (out / "cards").iterdir()) == sorted(
        ["index.md"] + [f"{p}_{f}.{ext}" for p, f in best for ext in ("md", "json")])
    assert json.loads((out / "screen.json").read_text())["cards"] == [f"cards/{p}_{f}.md" for p, f in best]
    # a harvest that cannot serve the cards is refused before anything is screened or written
    other = _other_harvest(planted, tmp_path, hook="blocks.2.hook_resid_post", hook_canonical="blocks.2.hook_out")
    with pytest.raises(FisError, match="harvest is of hook"):
        screen(planted["ckpt"], design, bridge=tiny_bridge, out=tmp_path / "s2", cards=1, cards_activations=other,
               progress=False)
    assert not (tmp_path / "s2").exists()
    import fis_interventions.models as models

    monkeypatch.setattr(models, "load_model", lambda name, **kw: tiny_bridge)
    assert main(["screen", "--checkpoint", str(planted["ckpt"]), "--design", str(design), "--point",
                 "secondary.hook_latents", "--cards", "1", "--top", "1"]) == 0
    assert "card secondary.hook_latents" in capsys.readouterr().out


def test_harvest_recorded_under_a_hook_alias_is_accepted(planted, tiny_bridge, tmp_path):
    other = _other_harvest(planted, tmp_path, hook="blocks.1.hook_out")  # same hook, canonical name
    cards = build_cards(planted["ckpt"], [FeatureKey("sae.hook_latents", A)], activations=other, top=2,
                        bridge=tiny_bridge)
    assert cards[0]["harvest"]["folder"] == str(other) and cards[0]["top_contexts"][0]["token"] == " beach"
    assert "not trained on" in cards[0]["harvest"]["split_rule"]  # another folder: no "never trained on" claim
