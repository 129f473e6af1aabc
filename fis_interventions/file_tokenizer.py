"""A model folder's tokenizer read straight from its ``tokenizer.json``, for commands that need no model.

Why: ``fis stimuli validate`` / ``show`` only tokenise words and sentences, yet ``transformers.AutoTokenizer``
costs seconds of imports (and torch with them). The ``tokenizers`` library reads the same file that the HF fast
tokenizer wraps, so ids, tokens and decoded text are the same (tested on every shipped design); the few
attributes the design checks use are read from ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import FisError


class FileTokenizer:
    """The subset of the HF tokenizer interface that ``designs`` uses, over ``tokenizers.Tokenizer``."""

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FisError("the model folder has no tokenizer.json", source=folder, field="model",
                           fix="pass a folder saved with save_pretrained (it writes tokenizer.json)")
        self._tok = Tokenizer.from_file(str(path))
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self._force_clean_up = bool(config.get(
            "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))
        self.unk_token_id = self._special_id(config.get("unk_token"))
        self.bos_token_id = self._special_id(config.get("bos_token"))
        self.eos_token_id = self._special_id(config.get("eos_token"))

    def _special_id(self, token: Any) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        return None if token is None else self._tok.token_to_id(str(token))

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)}

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self._tok.id_to_token(int(i)) for i in ids]

    def decode(self, ids: list[int]) -> str:
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
        # transformers 5 applies the config's clean-up only to non-BPE models (it would strip real spaces from BPE
        # text): the same rule and the same replacements as its ``clean_up_tokenization``, tested against it.
        if self.clean_up_tokenization_spaces and (type(self._tok.model).__name__ != "BPE" or self._force_clean_up):
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)
