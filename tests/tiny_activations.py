"""Small harvests the tests train and evaluate on (a helper module, not a test file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def harvest_sentences(root: Path, bridge: Any, sentence: str, n: int, model: str = "tiny-random",
                      hook: str = "blocks.1.hook_resid_post", **harvest_kwargs: Any) -> Path:
    """Write ``n`` numbered sentences (``sentence`` with ``{i}``) to ``root/c.txt`` and harvest ``bridge``'s
    activations at ``hook`` over them into ``root/acts`` (no progress bar); returns that folder."""
    from fis_interventions.activations import harvest

    corpus = write_numbered_corpus(root / "c.txt", sentence, n)
    harvest(bridge=bridge, model=model, hook=hook, corpus=[str(corpus)], out=root / "acts", progress=False,
            **harvest_kwargs)
    return root / "acts"


CATS = "Sentence number {i} talks about cats, dogs and the weather today."


def write_numbered_corpus(path: Path, sentence: str = CATS, n: int = 300) -> Path:
    """Write ``n`` numbered sentences (``sentence`` with ``{i}``) to ``path``; returns it."""
    path.write_text(" ".join(sentence.format(i=i) for i in range(n)))
    return path


def harvest_tiny(bridge: Any, out: Path, corpus: Path, hook: str = "blocks.1.hook_resid_post", **kw: Any):
    """Harvest the tiny model's ``hook`` over ``corpus`` into ``out`` (2000 tokens, 32-token contexts, 16 per
    shard, no progress bar; ``kw`` overrides any of them)."""
    from fis_interventions.activations import harvest

    args = dict(bridge=bridge, model="tiny-random", hook=hook, corpus=[str(corpus)], out=out, tokens=2000,
                context_length=32, contexts_per_shard=16, progress=False)
    return harvest(**{**args, **kw})
