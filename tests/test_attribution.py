"""Attribution screening: the first-order estimate equals the battery's measured shift for small edits (every
point), integrated gradients add up to the whole point's ablation, the screen carries both estimates, bad input
is one line with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fis_interventions.attach import attach
from fis_interventions.attribution import attribute, parse_methods
from fis_interventions.cli import main
from fis_interventions.designs import expand, read_design
from fis_interventions.errors import FisError
from fis_interventions.interventions.battery import Readouts, _prepare, _stacked_logits, encode_rows
from fis_interventions.interventions.features import Condition, Target
from fis_interventions.sae import load_checkpoint, save_checkpoint

from tiny_checkpoints import save_tiny_joint_checkpoint

DESIGN = Path(__file__).resolve().parents[1] / "stimuli" / "negation_sentiment.yaml"
POINTS = ["sae.hook_latents", "nfm.hook_hidden", "secondary.hook_latents"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_bridge) -> Path:
    """The battery tests' tiny joint checkpoint with a non-zero NFM output layer (init is zero: no interaction
    path to attribute through) and larger decoder rows, so every point moves the readout."""
    path = save_tiny_joint_checkpoint(tmp_path_factory.mktemp("ck") / "raw", tiny_bridge.tokenizer, seed=3)
    loaded = load_checkpoint(path)
    joint = loaded.model
    torch.manual_seed(1)
    with torch.no_grad():
        joint.nfm.mlp_out.weight.normal_(0, 0.1)
        joint.nfm.V.mul_(3.0)
    return save_checkpoint(path.parent / "joint", joint, model_name="tiny-random", hook=loaded.hook,
                           normalization=loaded.normalization)


@pytest.fixture(scope="module")
def setup(ckpt, tiny_bridge):
    design = read_design(DESIGN)
    rows = expand(design)
    rows = rows[rows["item"].isin(list(dict.fromkeys(rows["item"]))[:2])].reset_index(drop=True)
    return attach(tiny_bridge, ckpt), design, rows


def _measured(attached, design, rows, point: str, feature: int, kind: str, amount: float) -> np.ndarray:
    """The battery's own shift of the design's first contrast, per row (its stacked pass, copy 0 clean)."""
    readouts = Readouts.for_design(design, attached.split.bridge.tokenizer)
    prep = _prepare(attached, encode_rows(rows, attached.split.bridge.tokenizer))
    blocks = [(Target(point, (feature,), "feature"), Condition(kind, amount, "all", amount))]
    logits = _stacked_logits(attached, prep, prep.enc.readout.unsqueeze(1), blocks)[:, 0]
    _, con = readouts.scores(logits)
    c = next(iter(con.values())).view(2, len(rows))
    return (c[1] - c[0]).double().numpy()


def _active_feature(result, point: str) -> int:
    return int(np.abs(result.B[point]).sum(0).argmax())


@pytest.mark.parametrize("point", POINTS)
def test_first_order_estimate_matches_small_battery_edits(setup, point):
    attached, design, rows = setup
    res = attribute(attached, design, rows, POINTS, batch_size=5)
    j = _active_feature(res, point)
    for kind, amount in (("add", 1e-4), ("scale", 1.001)):
        est = res.estimate(point, kind, amount)[:, j]
        real = _measured(attached, design, rows, point, j, kind, amount)
        assert np.abs(real).max() > 1e-6, "the edit must move the readout for the test to mean anything"
        np.testing.assert_allclose(est, real, rtol=0.05, atol=2e-3 * np.abs(real).max())
    assert np.isfinite(res.clean).all() and res.A[point].shape == res.B[point].shape


def test_logprob_contrast_is_the_logit_contrast(setup):
    """The attribution reads only the target words' columns of the unembedding: for ``score: logprob`` the
    normaliser cancels in a contrast (mean of set A - mean of set B), so the estimates equal the logit ones and
    the clean contrast equals the battery's log-softmax one."""
    attached, design, rows = setup
    by_score = {}
    for score in ("logit", "logprob"):
        d = design.model_copy(deep=True)
        d.readout.score = score
        by_score[score] = attribute(attached, d, rows, POINTS, batch_size=5)
    for point in POINTS:
        np.testing.assert_allclose(by_score["logprob"].A[point], by_score["logit"].A[point], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(by_score["logprob"].B[point], by_score["logit"].B[point], rtol=1e-6, atol=1e-9)
    d = design.model_copy(deep=True)
    d.readout.score = "logprob"
    readouts = Readouts.for_design(d, attached.split.bridge.tokenizer)
    prep = _prepare(attached, encode_rows(rows, attached.split.bridge.tokenizer))
    logits = attached.split.suffix(prep.resid, prep.state, prep.enc.readout.unsqueeze(1))[:, 0]
    clean = next(iter(readouts.scores(logits)[1].values())).double().numpy()
    np.testing.assert_allclose(by_score["logprob"].clean, clean, rtol=1e-5, atol=1e-5)


def test_ig_adds_up_to_the_whole_point_ablation(setup):
    """Completeness: for zero ablation the IG estimates of every feature of a point add up to the change of
    ablating the whole point (scaling it by 0), up to the midpoint rule's error."""
    attached, design, rows = setup
    res = attribute(attached, design, rows, ["nfm.hook_hidden"], method="ig", steps=12, batch_size=12)
    total = res.estimate("nfm.hook_hidden", "set", 0.0).sum(1)
    width = attached.joint.nfm.mlp_in.out_features
    readouts = Readouts.for_design(design, attached.split.bridge.tokenizer)
    prep = _prepare(attached, encode_rows(rows, attached.split.bridge.tokenizer))
    blocks = [(Target("nfm.hook_hidden", tuple(range(width)), "feature"), Condition("zero", 0.0, "all", 0.0))]
    logits = _stacked_logits(attached, prep, prep.enc.readout.unsqueeze(1), blocks)[:, 0]
    c = next(iter(readouts.scores(logits)[1].values())).view(2, len(rows))
    real = (c[1] - c[0]).double().numpy()
    np.testing.assert_allclose(total, real, rtol=0.02, atol=1e-3 * np.abs(real).max())


def test_parse_methods_and_bad_flags():
    assert parse_methods("activation, attribution") == ["activation", "attribution"]
    with pytest.raises(FisError, match="--method"):
        parse_methods("gradient")


def _run_cli(capsys, args):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_screen_carries_both_estimates_and_ranks_by_the_first_method(ckpt, tiny_bridge, tmp_path, capsys):
    from fis_interventions.screening import screen

    res = screen(ckpt, DESIGN, bridge=tiny_bridge, batch_size=12, progress=False, method="attribution,activation",
                 clamps=[2.0], out=tmp_path / "s", top=5)
    t = res.table
    for col in ["F_ab", "p_ab", "q_ab", "attribution_zero_effect", "attribution_zero_p_ab", "attribution_zero_q_ab",
                "attribution_set_2_p_ab", "attribution_zero_mean_affirmed_positive"]:
        assert col in t.columns
    assert len(t) == 128 + 32 + 64 and t[["point", "feature"]].duplicated().sum() == 0
    p = t["attribution_zero_p_ab"].to_numpy()
    assert np.all(np.diff(p[np.isfinite(p)]) >= 0)
    top = json.loads((tmp_path / "s" / "top.json").read_text())
    assert [x["ranked_by"] for x in top] == ["attribution"] * 5
    assert top[0]["p_ab"] == pytest.approx(np.nanmin(p))
    summary = json.loads((tmp_path / "s" / "screen.json").read_text())
    assert summary["attribution"]["contrast"] == "valence" and summary["split"]["confirmation"]
    # discovery items only: the per-stimulus estimates come from the battery rows of those items
    assert summary["attribution"]["readout_rows"] == summary["n_stimuli"] * 3  # three prompts per stimulus
    # each (method, clamp) is its own BH family, counted as such (the CLI once printed the activation family's size)
    for key in ("attribution_zero", "attribution_set_2"):
        assert summary["attribution"]["family_size"][key] == int(t[f"{key}_p_ab"].notna().sum())
    from fis_interventions.screening_attribution import echo_attribution

    echo_attribution(summary)
    printed = capsys.readouterr().out
    n, size = summary["attribution"]["n_q_below_alpha"]["attribution_zero"], \
        summary["attribution"]["family_size"]["attribution_zero"]
    assert f"attribution_zero: {n} of {size} features" in printed
    # a battery selecting from this screen takes the attribution ranking, not the activation p (it did once)
    from fis_interventions.interventions.config import FeatureSpec
    from fis_interventions.interventions.features import _from_screening

    for point in (None, "secondary.hook_latents"):
        chosen = _from_screening(FeatureSpec(from_screening=tmp_path / "s", top=3, point=point))
        mine = [x for x in top if point is None or x["point"] == point]
        want = sorted(((x["attribution_zero_p_ab"], x["point"], x["feature"]) for x in t.to_dict("records")
                       if (point is None or x["point"] == point) and np.isfinite(x["attribution_zero_p_ab"])))[:3]
        assert [(c.point, c.indices[0]) for c in chosen] == [(w[1], w[2]) for w in want]
        if point is None:
            assert [(c.point, c.indices[0]) for c in chosen] == [(x["point"], x["feature"]) for x in mine[:3]]


@pytest.mark.parametrize("args,flag", [
    (["--method", "gradient"], "--method"),
    (["--method", "ig", "--steps", "0"], "--steps"),
    (["--method", "attribution", "--contrast", "nope"], "--contrast"),
    (["--method", "attribution", "--precision", "float16"], "--precision"),
])
def test_bad_flags_exit_2_with_one_line(ckpt, capsys, tmp_path, args, flag):
    code, out, err = _run_cli(capsys, ["screen", "--checkpoint", str(ckpt), "--design", str(DESIGN),
                                       "--model", "tiny-random", *args])
    assert code == 2 and flag in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_design_without_contrast_is_refused(ckpt, tiny_bridge, tmp_path):
    from fis_interventions.screening import screen

    text = DESIGN.read_text()
    start = text.index("  contrasts:")
    no_contrast = tmp_path / "no_contrast.yaml"
    no_contrast.write_text(text[:start] + "".join(line + "\n" for line in text[start:].splitlines()[2:]))
    with pytest.raises(FisError, match="no contrast"):
        screen(ckpt, no_contrast, bridge=tiny_bridge, method="attribution", progress=False)


def test_card_and_report_show_the_attribution_per_cell():
    from types import SimpleNamespace

    import pandas as pd

    from fis_interventions.cards.render import attribution_block
    from fis_interventions.reports.attribution import attribution_section
    from fis_interventions.reports.render import Doc, to_markdown
    from fis_interventions.screening_attribution import attribution_of

    levels = {"negation": ["affirmed", "negated"], "sentiment": ["positive", "negative"]}
    table = pd.DataFrame({"point": ["sae.hook_latents"], "feature": [7], "p_ab": [0.2],
                          "attribution_zero_effect": [1.5], "attribution_zero_F_ab": [9.0],
                          "attribution_zero_p_ab": [0.01], "attribution_zero_q_ab": [0.04],
                          "attribution_zero_mean_affirmed_positive": [0.5],
                          "attribution_zero_mean_affirmed_negative": [-0.25],
                          "attribution_zero_mean_negated_positive": [0.0],
                          "attribution_zero_mean_negated_negative": [0.75]})
    att = attribution_of(table, "sae.hook_latents", 7, levels)
    assert att["cells"] == {"affirmed.positive": 0.5, "affirmed.negative": -0.25, "negated.positive": 0.0,
                            "negated.negative": 0.75} and att["activation_p_ab"] == 0.2
    doc = Doc("card")
    attribution_block(doc, att, 1)
    md = to_markdown(doc)
    assert "Attribution per cell" in md and "affirmed.negative" in md and "-0.25" in md
    assert attribution_of(table.drop(columns=[c for c in table if c.startswith("attribution")]),
                          "sae.hook_latents", 7, levels) is None
    run = SimpleNamespace(screening=table, info=SimpleNamespace(
        designs={"d": SimpleNamespace(factors=levels)},
        features=[SimpleNamespace(point="sae.hook_latents", feature="7", role="top")]))
    doc = Doc("report")
    attribution_section(doc, run)
    md = to_markdown(doc)
    assert "Attribution screen" in md and "est. negated.negative" in md


def test_shared_pass_gives_the_same_estimates_as_a_separate_pass(ckpt, tiny_bridge, monkeypatch):
    """A design without prompts: the attribution reuses the activation screen's prefix pass and joint forward
    (one pass instead of two); its columns equal those of a run that makes its own passes."""
    import fis_interventions.screening_attribution as sa
    from fis_interventions.screening import screen

    design = Path(__file__).resolve().parents[1] / "stimuli" / "agreement_attractor.yaml"
    calls = {"prefix": 0}
    real_prefix = type(tiny_bridge_split := attach(tiny_bridge, ckpt).split).prefix

    def counting(self, *a, **k):
        calls["prefix"] += 1
        return real_prefix(self, *a, **k)

    monkeypatch.setattr(type(tiny_bridge_split), "prefix", counting)
    kw = dict(bridge=tiny_bridge, batch_size=7, progress=False, method="activation,attribution", permutations=0,
              random_init=False)
    shared = screen(ckpt, design, **kw).table
    n_shared = calls["prefix"]
    monkeypatch.setattr(sa, "shared_pass", lambda accs, rows: None)
    calls["prefix"] = 0
    apart = screen(ckpt, design, **kw).table
    assert n_shared * 2 == calls["prefix"] and n_shared > 1
    cols = [c for c in shared.columns if c.startswith("attribution_")]
    key = ["point", "feature"]
    a, b = shared.sort_values(key)[cols].to_numpy(float), apart.sort_values(key)[cols].to_numpy(float)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, equal_nan=True)


def test_merged_suffix_batches_give_the_same_estimates(setup, monkeypatch):
    """Short batches of different widths merged for ONE suffix pass (``SUFFIX_TOKENS``) give the estimates of
    one suffix pass per batch."""
    import fis_interventions.attribution as at

    attached, design, rows = setup
    tok = attached.split.bridge.tokenizer
    widths = {encode_rows(rows.iloc[s:s + 3], tok).tokens.shape[1] for s in range(0, len(rows), 3)}
    assert len(widths) > 1, "the batches must differ in width for the merge to pad anything"
    passes = {"n": 0}
    real = at.contrast_grad

    def counting(*a, **k):
        passes["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(at, "contrast_grad", counting)
    monkeypatch.setattr(at, "SUFFIX_TOKENS", 1)  # every batch alone
    apart = attribute(attached, design, rows, POINTS, batch_size=3)
    n_apart, passes["n"] = passes["n"], 0
    monkeypatch.setattr(at, "SUFFIX_TOKENS", 10**6)
    merged = attribute(attached, design, rows, POINTS, batch_size=3)
    assert passes["n"] == 1 and n_apart == -(-len(rows) // 3) > 1
    for point in POINTS:
        for got, want in ((merged.A[point], apart.A[point]), (merged.B[point], apart.B[point])):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    np.testing.assert_allclose(merged.clean, apart.clean, rtol=1e-5, atol=1e-6)


def test_packed_prompts_give_each_stimulus_its_mean_over_prompts(setup, monkeypatch):
    """A stimulus' prompts packed into one sequence (the stimulus once): per stimulus, the mean over its prompts
    of the estimates and the clean contrasts equal the unpacked ones, in fewer suffix passes over fewer tokens."""
    import fis_interventions.attribution as at
    from fis_interventions.screening_attribution import prompt_means

    attached, design, rows = setup
    assert rows.groupby(["item", "cell"]).size().min() > 1, "the design needs prompts for packing to mean anything"
    apart = attribute(attached, design, rows, POINTS, batch_size=4)
    tokens = {"n": 0}
    real = at.contrast_grad

    def counting(attached_, prep, *a, **k):
        tokens["n"] += int(prep.enc.mask.sum())
        return real(attached_, prep, *a, **k)

    monkeypatch.setattr(at, "contrast_grad", counting)
    packed = attribute(attached, design, rows, POINTS, batch_size=4, pack=True)
    assert packed.packed and not apart.packed
    unpacked_tokens = int(encode_rows(rows, attached.split.bridge.tokenizer).mask.sum())
    assert 0 < tokens["n"] < 0.8 * unpacked_tokens
    stim = rows.drop_duplicates(["item", "cell"])[["item", "cell"]].reset_index(drop=True)
    M = prompt_means(rows, stim)
    for point in POINTS:
        for value in (0.0, 2.0):
            want = M @ apart.estimate(point, "set", value)
            got = M @ packed.estimate(point, "set", value)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(packed.clean, apart.clean, rtol=1e-4, atol=1e-5)


def test_bfloat16_suffix_is_close_to_float32_and_puts_the_weights_back(setup):
    """``precision="bfloat16"``: the estimates move by a small fraction of their range, rank the same, and the
    model's float32 weights are back afterwards (also after an error inside the swap)."""
    from scipy.stats import spearmanr

    from fis_interventions.attribution import LowPrecisionWeights

    attached, design, rows = setup
    hf = attached.split.hf
    before = {n: p.detach().clone() for n, p in hf.named_parameters()}
    f32 = attribute(attached, design, rows, POINTS, batch_size=5)
    b16 = attribute(attached, design, rows, POINTS, batch_size=5, precision="bfloat16")
    assert b16.precision == "bfloat16" and f32.precision == "float32"
    for point in POINTS:
        a, b = f32.estimate(point), b16.estimate(point)
        assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()
        live = a.ravel() != 0
        assert spearmanr(a.ravel()[live], b.ravel()[live])[0] > 0.98
    ig = {p: attribute(attached, design, rows, ["nfm.hook_hidden"], method="ig", steps=2, batch_size=12,
                       precision=p).estimate("nfm.hook_hidden") for p in ("float32", "bfloat16")}
    assert np.abs(ig["bfloat16"] - ig["float32"]).max() <= 0.05 * np.abs(ig["float32"]).max()
    low = LowPrecisionWeights(attached.split)
    assert low.swaps, "the fast split path has linear weights to swap"
    with pytest.raises(RuntimeError), low:
        assert {p.dtype for _, p in hf.named_parameters()} >= {torch.bfloat16}
        raise RuntimeError("inside the swap")
    after = dict(hf.named_parameters())
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), name


def test_precision_checks_the_hardware(monkeypatch):
    """bfloat16 on a CUDA GPU without it: one line naming --precision; on a CPU without bfloat16 units: a
    warning that it is emulated (slower), not a refusal."""
    from fis_interventions.attribution import check_precision, precision_warnings

    assert check_precision("bfloat16") == "bfloat16" and check_precision("float32", "cuda") == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(FisError, match="--precision"):
        check_precision("bfloat16", "cuda:0")
    assert precision_warnings("float32", torch.device("cpu")) == []
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    (warning,) = precision_warnings("bfloat16", torch.device("cpu"))
    assert "slower" in warning
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert precision_warnings("bfloat16", torch.device("cpu")) == []


def test_screen_records_the_precision_and_keeps_precisions_apart(ckpt, tiny_bridge, tmp_path):
    from fis_interventions.screening import screen

    out = tmp_path / "screen"
    kw = dict(bridge=tiny_bridge, progress=False, method="attribution", permutations=0, random_init=False, out=out)
    screen(ckpt, DESIGN, precision="bfloat16", **kw)
    assert json.loads((out / "screen.json").read_text())["attribution"]["precision"] == "bfloat16"
    with pytest.raises(FisError, match="--overwrite|overwrite|other settings"):
        screen(ckpt, DESIGN, precision="float32", **kw)
    assert json.loads((out / "screen.json").read_text())["attribution"]["precision"] == "bfloat16"
    act = screen(ckpt, DESIGN, bridge=tiny_bridge, progress=False, permutations=0, random_init=False,
                 precision="bfloat16")
    assert any("--precision" in w for w in act.summary["warnings"])


def _no_contrast(tmp_path: Path) -> Path:
    text = DESIGN.read_text()
    start = text.index("  contrasts:")
    path = tmp_path / "no_contrast.yaml"
    path.write_text(text[:start] + "".join(line + "\n" for line in text[start:].splitlines()[2:]))
    return path


def _unknown_word(tmp_path: Path) -> Path:
    """The design with one target word the tokenizer maps to its unknown token."""
    design = read_design(DESIGN)
    name, words = next(iter(design.readout.targets.items()))
    text = DESIGN.read_text()
    path = tmp_path / "unknown_word.yaml"
    path.write_text(text.replace(f"[{', '.join(words)}]", f"[{', '.join(['<|endoftext|>', *words[1:]])}]", 1))
    assert path.read_text() != text
    return path


@pytest.mark.parametrize("make,needle", [(_no_contrast, "contrast"), (_unknown_word, "unknown token")])
def test_bad_readout_exits_2_with_one_line_and_writes_nothing(ckpt, capsys, tmp_path, make, needle):
    """A readout without a contrast, or a target word missing from the vocabulary: ``fis screen --method
    attribution`` exits 2 with one line naming the field and the fix, before any output is written."""
    design = make(tmp_path)
    out = tmp_path / "out"
    code, _, err = _run_cli(capsys, ["screen", "--checkpoint", str(ckpt), "--design", str(design),
                                     "--model", "tiny-random", "--method", "attribution", "--out", str(out)])
    lines = [line for line in err.strip().splitlines() if "Warning" not in line and line.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert "fix" in lines[0].lower() or "use" in lines[0] or "choose" in lines[0]
    assert not out.exists()


def test_screen_blocks_equals_one_screen_per_block():
    """The activation and attribution screens test every block (point, or point x method x clamp) in one
    vectorised call; each block's F, p, cell means and within-block BH equal a separate call's."""
    import pandas as pd

    from fis_interventions.screening import screen_blocks
    from fis_interventions.stats.screen import screen_features

    rng = np.random.default_rng(0)
    rows = pd.DataFrame([{"item": i, "A": a, "B": b} for i in range(8) for a in ("x", "y") for b in ("u", "v")])
    levels = {"A": ["x", "y"], "B": ["u", "v"]}
    blocks = {"p1": rng.normal(size=(32, 5)), "p2": rng.normal(size=(32, 3))}
    blocks["p2"][:, 1] = 0.0  # a degenerate column stays out of its block's BH family
    blocks["p1"][:, 0] += np.where((rows["A"] == "y") & (rows["B"] == "v"), 3.0, 0.0)  # a planted interaction
    got = screen_blocks(blocks, rows, "A", "B", levels, item="item")
    for key, X in blocks.items():
        want = screen_features(X, rows, "A", "B", levels=levels, item="item")
        cols = ["feature", "F_ab", "p_ab", "q_ab", "mean_y_v", "degenerate"]
        pd.testing.assert_frame_equal(got[key][cols].reset_index(drop=True), want[cols].reset_index(drop=True),
                                      check_dtype=False)
    assert got["p1"]["p_ab"].iloc[0] < 1e-3 and bool(got["p2"]["degenerate"].iloc[1])
