"""Expansion of designs into rows, template rendering, warnings, and the target-word rules (fake tokenizer)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from fis_interventions.designs import (design_from_dict, design_warnings, expand, full_text, load_design,
                                       target_tokens)
from fis_interventions.errors import FisError, FisWarning

FACTORS = {"formality": ["formal", "informal"], "emotion": ["neutral", "emotional"]}


def template_design(**readout) -> dict:
    return {"name": "t", "factors": FACTORS, "template": "{greeting} {body}",
            "slots": {"body": {"neutral": "the report is attached.", "emotional": "I love the report!"}},
            "items": [{"id": 1, "slots": {"greeting": {"formal": "Dear all,", "informal": "hey,"}}},
                      {"id": "b", "template": "{body} {greeting}",
                       "slots": {"greeting": {"formal.neutral": "Regards.", "formal.emotional": "Warmly.",
                                              "informal.neutral": "cya", "informal.emotional": "xoxo!!"}}}],
            "readout": readout}


def test_expand_template_items_rows_and_columns() -> None:
    d = design_from_dict(template_design(prompts={"tone": "The tone is", "feel": "It feels"}))
    df = expand(d)
    assert len(df) == 2 * 4 * 2
    assert list(df.columns) == ["design", "item", "cell", "formality", "emotion", "stimulus", "prompt_id",
                                "prompt", "text", "readout_start", "readout_end"]
    assert list(df["formality"].cat.categories) == ["formal", "informal"]
    row = df[(df["item"] == "1") & (df["cell"] == "informal.emotional") & (df["prompt_id"] == "feel")].iloc[0]
    assert row["stimulus"] == "hey, I love the report!"
    assert row["text"] == "hey, I love the report! It feels"
    assert (row["formality"], row["emotion"]) == ("informal", "emotional")
    assert row["readout_end"] == len(row["text"])
    # item-level template and a slot keyed by cell
    row = df[(df["item"] == "b") & (df["cell"] == "formal.emotional")].iloc[0]
    assert row["stimulus"] == "I love the report! Warmly."
    # every item appears in every cell exactly once per prompt: items are crossed with the design
    assert (df.groupby(["item", "cell"]).size() == 2).all()
    assert df.attrs["shape"] == "items"


def test_slot_position_gives_slot_span() -> None:
    d = design_from_dict(template_design(position="greeting"))
    df = expand(d)
    for _, row in df.iterrows():
        greeting = row["text"][row["readout_start"]:row["readout_end"]]
        assert greeting in {"Dear all,", "hey,", "Regards.", "Warmly.", "cya", "xoxo!!"}
    assert (df["prompt"] == "").all() and (df["prompt_id"] == "").all()
    first = df.iloc[0]
    assert (first["readout_start"], first["readout_end"]) == (0, 9)


def test_cell_lists_generated_ids_and_unbalanced_warning(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("""name: c
factors: {formality: [formal, informal], emotion: [neutral, emotional]}
cells:
  formal.neutral: [A one., A two., A three.]
  formal.emotional: [B one., B two.]
  informal.neutral: [C one., C two.]
  informal.emotional: ["  D one.  ", D two.]
readout:
  prompts: [It is]
""", encoding="utf-8")
    with pytest.warns(FisWarning, match=r"unbalanced cell sizes \(formal.neutral=3, formal.emotional=2"):
        d = load_design(path)
    df = expand(d)
    assert len(df) == 9
    assert df["item"].tolist()[:4] == ["formal.neutral:001", "formal.neutral:002", "formal.neutral:003",
                                       "formal.emotional:001"]
    assert df["item"].is_unique
    assert df.iloc[-2]["text"] == "D one. It is"  # surrounding whitespace of a sentence is dropped
    assert df.iloc[0]["prompt_id"] == "p1"
    assert df.attrs["shape"] == "cells"


def test_full_text_join_rule() -> None:
    assert full_text("Hi there.", "It is", " ") == "Hi there. It is"
    assert full_text("Hi there.", "", " ") == "Hi there."
    assert full_text("Hi there.", "It is", "\n") == "Hi there.\nIt is"


def test_design_warnings_identical_cells_and_shared_word() -> None:
    data = template_design(targets={"a": ["formal", "nice"], "b": ["nice"]})
    data["items"][0]["slots"]["greeting"] = "Hello,"
    d = design_from_dict(data)
    found = design_warnings(d)
    assert any("item '1' has the same text in cells" in w for w in found)
    assert any("'nice' is in both 'a' and 'b'" in w for w in found)
    assert design_warnings(design_from_dict(template_design())) == []


def test_python_built_design_gets_same_checks() -> None:
    data = template_design()
    del data["items"][0]["slots"]["greeting"]["informal"]
    with pytest.raises(FisError, match="no value for level\\(s\\) informal"):
        design_from_dict(data)


class FakeTokenizer:
    """Character-level stand-in: 'Ġ' + the word's first two letters, then two-letter chunks."""

    unk_token_id = 99

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {"<unk>": 99}

    def _tok(self, piece: str) -> int:
        if "@" in piece:
            return 99
        return self.vocab.setdefault(piece, len(self.vocab) + 100)

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        pieces = []
        if text.startswith(" "):
            text, head = text[1:], "Ġ"
        else:
            head = ""
        if text == "":
            return {"input_ids": []}
        if text.startswith("#"):  # a word whose leading space is its own token
            pieces = [head] if head else []
            text = text[1:]
            head = ""
        chunks = [text[i:i + 2] for i in range(0, len(text), 2)]
        pieces += [head + chunks[0], *chunks[1:]]
        return {"input_ids": [self._tok(p) for p in pieces]}

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        inv = {v: k for k, v in self.vocab.items()}
        return [inv.get(i, "<unk>") for i in ids]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.convert_ids_to_tokens(ids)).replace("Ġ", " ")


def test_target_tokens_first_token_warns_and_keeps_first() -> None:
    d = design_from_dict(template_design(targets={"short": ["ab", "cd"], "long": ["abcdef"]}))
    tok = FakeTokenizer()
    with pytest.warns(FisWarning) as rec:
        sets = target_tokens(d, tok)
    assert list(sets) == ["short", "long"]
    long = sets["long"][0]
    assert long.split and long.tokens == ("Ġab", "cd", "ef") and len(long.all_ids) == 3
    assert long.token_ids == (long.all_ids[0],)
    assert sets["short"][0].text == " ab" and not sets["short"][0].split
    # 'abcdef' is scored by the first token 'Ġab', which also scores 'ab': both warned, also as data
    assert any("split into 3 tokens" in w for w in sets.warnings)
    assert any("scored by the same token" in w for w in sets.warnings)
    assert len(rec) == len(sets.warnings) == 2
    assert sets.first_ids("short") == [sets["short"][0].all_ids[0], sets["short"][1].all_ids[0]]


def test_target_tokens_sum_logprob_keeps_all_ids() -> None:
    d = design_from_dict(template_design(targets={"long": ["abcdef"]}, multi_token="sum_logprob",
                                         score="logprob"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FisWarning)  # no warning in sum_logprob mode
        sets = target_tokens(d, FakeTokenizer())
    assert len(sets["long"][0].token_ids) == 3


def test_target_tokens_leading_space_false() -> None:
    d = design_from_dict(template_design(targets={"s": ["ab"]}, leading_space=False))
    assert target_tokens(d, FakeTokenizer())["s"][0].tokens == ("ab",)


@pytest.mark.parametrize(("word", "fragment"), [("x@", "unknown token"), ("#abcd", "only the space")])
def test_target_tokens_errors(word: str, fragment: str) -> None:
    d = design_from_dict(template_design(targets={"s": ["ok", word]}))
    with pytest.raises(FisError, match=fragment) as info:
        target_tokens(d, FakeTokenizer())
    assert info.value.field == "readout.targets.s[1]"


def test_target_token_error_has_file_line(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text("""name: d
factors: {formality: [formal, informal], emotion: [neutral, emotional]}
cells: {formal.neutral: [a], formal.emotional: [b], informal.neutral: [c], informal.emotional: [d]}
readout:
  targets:
    s:
      - ok
      - "x@"
""", encoding="utf-8")
    with pytest.raises(FisError) as info:
        target_tokens(load_design(path), FakeTokenizer())
    assert str(info.value).startswith(f"{path}: readout.targets.s[1]: line 8: word 'x@'")


def test_readme_example_is_a_valid_design(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "stimuli" / "README.md").read_text(encoding="utf-8")
    block = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "example.yaml"
    path.write_text(block, encoding="utf-8")
    d = load_design(path)
    df = expand(d)
    assert len(df) == 2 * 4 * 2
    row = df[(df["item"] == "meeting") & (df["cell"] == "formal.emotional") & (df["prompt_id"] == "tone")]
    assert row["text"].item() == ("Dear colleagues, I'm thrilled we finally meet Tuesday! Cheers. "
                                  "Overall, the tone of this message is")
    assert d.readout.contrast_terms() == {"formality": ("formal", "casual")}
