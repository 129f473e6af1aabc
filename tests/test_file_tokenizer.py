"""The design commands' tokenizer (tokenizer.json read by `tokenizers`) gives what the HF tokenizer gives."""

from __future__ import annotations

import json
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



def _word_piece_folder(folder: Path, **config: object) -> Path:
    """A tiny WordPiece tokenizer (the kind HF's clean-up is for) saved as a model folder's tokenizer files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = ["well", "i", "can", "'", "t", "say", "it", "s", "over", ".", ",", "?", "!", "are", "you", "m", "done"]
    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.BertPreTokenizer(), decoders.WordPiece()
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"unk_token": "[UNK]", **config}))
    return folder


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "bpe-forced"])
@pytest.mark.parametrize("clean_up", [True, False])
def test_decode_cleans_up_spaces_as_hf_does(tmp_path, kind, clean_up):
    """The config's clean-up flag, on a WordPiece and a BPE tokenizer, decodes as transformers does."""
    from transformers import PreTrainedTokenizerFast

    from fis_interventions.file_tokenizer import FileTokenizer
    from fis_interventions.models import load_tokenizer

    text = "well , i can ' t say it ' s over . are you ? i ' m done !"
    if kind == "wordpiece":
        folder = _word_piece_folder(tmp_path / "wp", clean_up_tokenization_spaces=clean_up)
    else:
        folder = tmp_path / "bpe"
        load_tokenizer().save_pretrained(folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["clean_up_tokenization_spaces"] = clean_up
        config["clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"] = kind == "bpe-forced"
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    hf = PreTrainedTokenizerFast.from_pretrained(folder)
    ours = FileTokenizer(folder)
    ids = hf(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == hf.decode(ids)
    cleaned = hf.decode(ids) != hf.decode(ids, clean_up_tokenization_spaces=False)
    assert cleaned == (clean_up and kind != "bpe")  # the flag took effect exactly where HF applies it
