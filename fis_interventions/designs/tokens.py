"""Target words -> token ids, with the multi-token rule made explicit.

A word is tokenised as it would follow a prompt: with a leading space by default (``" formal"``). When a
word becomes several tokens, ``multi_token: first_token`` (default) scores only the first one and warns;
``multi_token: sum_logprob`` keeps every id so the whole word is scored by teacher forcing. A word that
gives no token, an unknown token, or (with first_token) a first token that is only the space, is an error:
its score would be meaningless.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import FisWarning
from .checks import fail
from .schema import Design


@dataclass(frozen=True)
class TargetWord:
    """One target word: the text tokenised, all its tokens, and the ids that are scored."""

    word: str
    text: str
    all_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    token_ids: tuple[int, ...]

    @property
    def split(self) -> bool:
        """True when the tokenizer splits the word into more than one token."""
        return len(self.all_ids) > 1


@dataclass
class TargetSets(Mapping[str, list[TargetWord]]):
    """Set name -> its words with token ids (file order), plus the warnings raised while building it."""

    sets: dict[str, list[TargetWord]]
    multi_token: str
    warnings: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> list[TargetWord]:
        return self.sets[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.sets)

    def __len__(self) -> int:
        return len(self.sets)

    def first_ids(self, name: str) -> list[int]:
        """The first token id of every word of a set (what ``first_token`` scores)."""
        return [w.token_ids[0] for w in self.sets[name]]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def target_tokens(design: Design, tokenizer: Any) -> TargetSets:
    """Tokenise every target word of the design's readout; warn (FisWarning) for each split word."""
    r = design.readout
    unk = getattr(tokenizer, "unk_token_id", None)
    out: dict[str, list[TargetWord]] = {}
    notes: list[str] = []
    first_owner: dict[int, tuple[str, str]] = {}
    for name, words in r.targets.items():
        out[name] = []
        for i, word in enumerate(words):
            loc = ("readout", "targets", name, i)
            text = (" " + word) if r.leading_space else word
            ids = _encode(tokenizer, text)
            if not ids:
                fail(design, loc, f"word '{word}' gives no token", "remove it")
            tokens = tuple(str(t) for t in tokenizer.convert_ids_to_tokens(ids))
            if unk is not None and unk in ids:
                fail(design, loc, f"word '{word}' contains the unknown token ({tokens})",
                     "choose a word the tokenizer knows")
            scored = tuple(ids)
            if len(ids) > 1 and r.multi_token == "first_token":
                if not tokenizer.decode(ids[:1]).strip():
                    fail(design, loc, f"the first token of '{text}' is only the space {tokens}",
                         "set 'leading_space: false' or 'multi_token: sum_logprob'")
                scored = (ids[0],)
                notes.append(f"readout.targets.{name}: '{word}' is split into {len(ids)} tokens "
                             f"{list(tokens)}; only the first is scored (multi_token: first_token)")
            if r.multi_token == "first_token":
                if scored[0] in first_owner:
                    other = first_owner[scored[0]]
                    notes.append(f"readout.targets.{name}: '{word}' and '{other[1]}' (set '{other[0]}') are "
                                 f"scored by the same token {tokens[0]!r}")
                first_owner.setdefault(scored[0], (name, word))
            out[name].append(TargetWord(word, text, tuple(ids), tokens, scored))
    src = design.source or "<design>"
    for note in notes:
        warnings.warn(f"{src}: {note}", FisWarning, stacklevel=2)
    return TargetSets(out, r.multi_token, notes)
