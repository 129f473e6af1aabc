"""The design commands' tokenizer (tokenizer.json read by `tokenizers`) gives what the HF tokenizer gives."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fis_interventions.designs import expand, read_design, target_tokens
from fis_interventions.designs.inspection import default_tokenizer
from fis_interventions.models import load_tokenizer

STIMULI = sorted((Path(__file__).resolve().parent.parent / "stimuli").glob("*.yaml"))


@pytest.fixture(scope="module")
def tokenizers():
    return default_tokenizer(), load_tokenizer()


@pytest.mark.parametrize("path", STIMULI, ids=lambda p: p.stem)
def test_same_ids_tokens_and_text_as_hf_on_every_shipped_design(tokenizers, path):
    fast, hf = tokenizers
    design = read_design(path)
    ours, theirs = target_tokens(design, fast), target_tokens(design, hf)
    assert ours.sets == theirs.sets and ours.warnings == theirs.warnings
    texts = sorted(set(expand(design)["text"]))
    for text in texts:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert fast(text, add_special_tokens=False)["input_ids"] == ids
        assert fast.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
        assert fast.decode(ids) == hf.decode(ids) and fast.decode(ids[:1]) == hf.decode(ids[:1])
    assert (fast.unk_token_id, fast.bos_token_id, fast.eos_token_id) == (hf.unk_token_id, hf.bos_token_id,
                                                                         hf.eos_token_id)


def test_validating_a_design_imports_neither_torch_nor_transformers():
    code = ("import sys; from fis_interventions.designs import validate; "
            f"validate({str(STIMULI[0])!r}); print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
